"""Nothing lost, nothing silently wrong: what `tfcompress train` does around the training itself.

- The backup directory is tfcompress's own (created and marked; a foreign one is refused and left alone) and
  locked while a run uses it (a second run names the holder; a dead run's lock is taken over).
- A run interrupted inside an epoch of an epoch-sized run (TFRecords: no known row count, each epoch one pass)
  resumes to the weights of an uninterrupted run.
- A non-finite loss stops training at once, naming the step and the likely causes.
- restore_best / patience: the best epoch (eval AUC) is reported beside the last, and its weights are saved.
- The results table shows the trained and the deployed (folded) embedding sizes.
- [compression] keys the method does not take fail when the pipeline is loaded, before any data is made.

Everything runs in-process on tiny data except the CLI checks (a subprocess each).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tfcompress import train as train_module
from tfcompress.pipeline import load_pipeline

from test_train_cli import ROOT, run_cli

TRAIN_ROWS, BATCH_SIZE, EPOCHS = 6000, 256, 3
BATCHES_PER_EPOCH = TRAIN_ROWS // BATCH_SIZE  # 23: the reader drops the last partial batch

PIPELINE = """
name = "{name}"

[data]
source = "tfrecord"
train = "{data}/train"
eval = "{data}/eval"

[model]
arch = "dlrm"
embedding_dim = 8
bottom_mlp = [16]
top_mlp = [16]

[compression]
{compression}

[train]
{train}
"""
TRAIN_DEFAULTS = {"optimizer": '"adam"', "learning_rate": "0.01", "batch_size": str(BATCH_SIZE), "epochs": str(EPOCHS),
                  "eval_batch_size": "1024", "seed": "0", "deterministic": "true", "tensorboard": "false"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """test_train_cli's tiny synthetic Criteo data, read as plain TFRecords (no row count known to train)."""
    from tfcompress.data import synthetic

    path = str(tmp_path_factory.mktemp("tiny") / "data")
    synthetic.generate(path, dataset="criteo", rows=TRAIN_ROWS, eval_rows=3000, seed=1, cardinality_scale=0.001)
    return path


def write_pipeline(directory, name, data, train="", compression="method = \"robe\"\nratio = 10.0\nchunk_size = 4",
                   epochs=EPOCHS):
    """A tiny epoch-sized pipeline over `data`; `train` holds "key = value" lines that replace or add to
    TRAIN_DEFAULTS."""
    values = dict(TRAIN_DEFAULTS, epochs=str(epochs))
    for line in train.splitlines():
        if line.strip():
            key, value = (part.strip() for part in line.split("=", 1))
            values[key] = value
    path = os.path.join(str(directory), f"{name}.toml")
    with open(path, "w") as f:
        f.write(PIPELINE.format(name=name, data=data, compression=compression,
                                train="\n".join(f"{k} = {v}" for k, v in values.items())))
    return path


def load_model(path):
    import tfcompress.layers.planned  # noqa: F401 (these imports register the custom classes load_model needs)
    import tfcompress.models  # noqa: F401
    from tfcompress._keras import keras

    return keras.models.load_model(path)


class SimulatedCrash(Exception):
    """Stands for a kill: raised right after a checkpoint is written."""


def crash_after_checkpoint(monkeypatch, step):
    """Make training stop (as if killed) right after the first checkpoint at or beyond `step`."""
    save = train_module.StepBackupAndRestore._save_model

    def save_then_crash(self):
        save(self)
        if int(self.model.optimizer.iterations.numpy()) >= step:
            raise SimulatedCrash(step)

    monkeypatch.setattr(train_module.StepBackupAndRestore, "_save_model", save_then_crash)


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ---- the backup directory --------------------------------------------------------------------------------------


def test_a_backup_dir_holding_other_files_is_refused_and_left_alone(tmp_path, tiny_data):
    precious = tmp_path / "my_results"
    precious.mkdir()
    (precious / "notes.txt").write_text("a week of work")
    pipeline = load_pipeline(write_pipeline(tmp_path, "tiny", tiny_data, epochs=1),
                             ["train.checkpoint_every_steps=10", f"train.backup_dir={json.dumps(str(precious))}"])
    with pytest.raises(ValueError) as error:
        train_module.train(pipeline, runs_dir=str(tmp_path / "runs"), verbose=0)
    message = str(error.value)
    assert str(precious) in message and "[train] backup_dir" in message and "notes.txt" in message, message
    assert (precious / "notes.txt").read_text() == "a week of work"
    assert sorted(os.listdir(precious)) == ["notes.txt"]
    assert not (tmp_path / "runs" / "tiny").exists()  # refused before any work


def test_the_backup_is_made_in_its_own_directory_and_only_that_is_removed(tmp_path, tiny_data):
    parent = tmp_path / "shared"
    parent.mkdir()
    (parent / "other.txt").write_text("not the backup's")
    made = parent / "backup"  # does not exist: tfcompress creates it, marks it, and removes it at the end
    given = tmp_path / "empty"  # exists and is empty: used, then emptied, but kept (tfcompress did not make it)
    given.mkdir()
    for name, backup_dir in (("made", made), ("given", given)):
        pipeline = load_pipeline(write_pipeline(tmp_path, name, tiny_data, epochs=1),
                                 ["train.checkpoint_every_steps=10", f"train.backup_dir={json.dumps(str(backup_dir))}"])
        seen = []
        save = train_module.StepBackupAndRestore._save_model

        def spy(self, save=save, seen=seen, backup_dir=backup_dir):
            save(self)
            seen.append(sorted(os.listdir(backup_dir)))

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_module.StepBackupAndRestore, "_save_model", spy)
            train_module.train(pipeline, runs_dir=str(tmp_path / "runs"), verbose=0)
        # While training: the marker, the lock, the metadata and one checkpoint.
        assert seen and all({".tfcompress-backup", "lock", "training_metadata.json"} <= set(s) for s in seen), seen
        assert os.path.isfile(tmp_path / "runs" / name / "model.keras")
    assert not made.exists()
    assert sorted(os.listdir(parent)) == ["other.txt"]
    assert given.is_dir() and os.listdir(given) == []


def test_a_second_training_of_the_same_backup_stops_and_names_the_first(tmp_path, tiny_data):
    path = write_pipeline(tmp_path, "tiny", tiny_data, epochs=1, train="checkpoint_every_steps = 10")
    runs = str(tmp_path / "runs")
    backup = os.path.join(runs, "tiny", "backup")
    # The first run: a process that holds the backup's lock the way train() does.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from tfcompress.train import TrainingBackup\n"
         "backup = TrainingBackup(sys.argv[1]); backup.claim(); backup.lock('tiny')\n"
         "print('locked', flush=True); time.sleep(600)", backup],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        completed = run_cli("train", "--pipeline", path, "--runs-dir", runs, "--verbose", "0")
        assert completed.returncode == 2, completed.stdout + completed.stderr
        err = completed.stderr.strip().splitlines()[-1]  # after TensorFlow's start-up lines
        assert err.startswith("error: ") and "Traceback" not in completed.stderr, completed.stderr
        assert "in use by another training run" in err and f"pid {holder.pid} on host {socket.gethostname()}" in err
        assert "started 20" in err and os.path.join(backup, "lock") in err, err
        assert not os.path.exists(os.path.join(runs, "tiny", "model.keras"))
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (killed: its lock file stays behind): the next run takes the stale lock over.
    with open(os.path.join(backup, "lock")) as f:
        assert json.load(f)["pid"] == holder.pid
    with pytest.warns(UserWarning, match=rf"taking over the stale lock .* of pid {holder.pid} .*no longer runs"):
        train_module.train(load_pipeline(path), runs_dir=runs, verbose=0)
    assert not os.path.exists(backup)


@pytest.mark.parametrize("host, alive, taken_over", [("here", False, True), ("here", True, False),
                                                      ("elsewhere", False, False)])
def test_lock_file_of_another_run(tmp_path, tiny_data, host, alive, taken_over):
    path = write_pipeline(tmp_path, "tiny", tiny_data, epochs=1, train="checkpoint_every_steps = 10")
    backup = tmp_path / "runs" / "tiny" / "backup"
    backup.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) if alive else None
    pid = sleeper.pid if alive else dead_pid()
    hostname = socket.gethostname() if host == "here" else "another-host.example"
    (backup / "lock").write_text(json.dumps({"pid": pid, "host": hostname, "started": "2030-01-02T03:04:05"}))
    try:
        if taken_over:
            with pytest.warns(UserWarning, match=f"taking over the stale lock .* of pid {pid}"):
                train_module.train(load_pipeline(path), runs_dir=str(tmp_path / "runs"), verbose=0)
            assert os.listdir(backup) == []  # emptied; kept, as tfcompress did not make it
        else:
            with pytest.raises(train_module.BackupInUseError) as error:
                train_module.train(load_pipeline(path), runs_dir=str(tmp_path / "runs"), verbose=0)
            message = str(error.value)
            assert f"pid {pid} on host {hostname}, started 2030-01-02T03:04:05" in message, message
            assert ("delete" in message) == (host == "elsewhere")
            assert json.loads((backup / "lock").read_text())["pid"] == pid  # not ours to remove
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()


# ---- exact resume of epoch-sized runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_data):
    """An uninterrupted epoch-sized run: its weights, optimizer state and result, per [train] variant."""
    runs = {}

    def run(train):
        if train not in runs:
            directory = tmp_path_factory.mktemp("reference")
            pipeline = load_pipeline(write_pipeline(directory, "tiny", tiny_data, train=train))
            result = train_module.train(pipeline, runs_dir=str(directory / "runs"), verbose=0)
            model = load_model(result["model_path"])
            result = dict(result, iterations=int(model.optimizer.iterations.numpy()))
            runs[train] = (model.get_weights(), [np.asarray(v) for v in model.optimizer.variables], result)
        return runs[train]

    return run


@pytest.mark.parametrize(
    "every, crash_step, position, train",
    [
        (10, 50, (2, 4), ""),  # inside the third epoch: 4 of its batches trained
        (10, 46, (2, 0), ""),  # at the end of the second epoch
        # The mid-epoch checkpoint at the last batch of an epoch, killed before the epoch-end one: nothing of
        # epoch 1 is left to train, its end (validation, checkpoint) is.
        (BATCHES_PER_EPOCH, BATCHES_PER_EPOCH, (0, BATCHES_PER_EPOCH), ""),
        (10, 30, (1, 7), "restore_best = true"),  # the best epoch is tracked across the restart too
    ],
)
def test_interrupted_epoch_sized_run_resumes_to_the_uninterrupted_weights(tmp_path, tiny_data, monkeypatch,
                                                                           reference_run, every, crash_step,
                                                                           position, train):
    weights, optimizer_state, reference = reference_run(train)
    path = write_pipeline(tmp_path, "tiny", tiny_data, train=train + f"\ncheckpoint_every_steps = {every}")
    runs = str(tmp_path / "runs")
    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, crash_step)
        with pytest.raises(SimulatedCrash):
            train_module.train(load_pipeline(path), runs_dir=runs, verbose=0)
    with open(os.path.join(runs, "tiny", "backup", "training_metadata.json")) as f:
        metadata = json.load(f)

    result = train_module.train(load_pipeline(path), runs_dir=runs, verbose=0)
    resumed = load_model(result["model_path"])
    # Nothing skipped or trained twice: one optimizer step per batch, the same weights and optimizer state.
    assert int(resumed.optimizer.iterations.numpy()) == reference["iterations"] == EPOCHS * BATCHES_PER_EPOCH
    resumed_weights = resumed.get_weights()
    assert len(resumed_weights) == len(weights) > 2
    for a, b in zip(weights, resumed_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    for a, b in zip(optimizer_state, resumed.optimizer.variables):
        np.testing.assert_allclose(a, np.asarray(b), rtol=0, atol=1e-6)
    assert result["auc"] == pytest.approx(reference["auc"], abs=1e-6)
    for key in ("epochs_run", "best_epoch", "restored_best"):
        assert result[key] == reference[key], key
    for key in ("best_val_auc", "last_val_auc"):
        assert result[key] == pytest.approx(reference[key], abs=1e-6), key
    assert not os.path.exists(os.path.join(runs, "tiny", "backup"))
    # The interruption came where the case says.
    epoch, epoch_batches = position
    assert (metadata["epoch"], metadata.get("epoch_batches")) == position
    assert metadata["batches"] == epoch * BATCHES_PER_EPOCH + epoch_batches


def test_resume_without_deterministic_order_warns_that_it_is_not_exact(tmp_path, tiny_data, monkeypatch):
    path = write_pipeline(tmp_path, "tiny", tiny_data, epochs=1,
                          train="checkpoint_every_steps = 10\ndeterministic = false")
    runs = str(tmp_path / "runs")
    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, 10)
        with pytest.raises(SimulatedCrash):
            train_module.train(load_pipeline(path), runs_dir=runs, verbose=0)
    with pytest.warns(UserWarning, match="will not give the weights of an uninterrupted run: .*deterministic"):
        result = train_module.train(load_pipeline(path), runs_dir=runs, verbose=0)
    assert result["epochs_run"] == 1


# ---- non-finite loss -------------------------------------------------------------------------------------------


def test_a_huge_learning_rate_stops_at_the_first_non_finite_loss(tmp_path, tiny_data):
    path = write_pipeline(tmp_path, "tiny", tiny_data, epochs=2,
                          train="learning_rate = 1e6\ncheckpoint_every_steps = 2")
    runs = str(tmp_path / "runs")
    steps = []
    check = train_module.StopOnNonFiniteLoss.on_train_batch_end

    def spy(self, batch, logs=None):
        steps.append((self.position.step, float(logs["loss"])))
        check(self, batch, logs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module.StopOnNonFiniteLoss, "on_train_batch_end", spy)
        with pytest.raises(train_module.NonFiniteLossError) as error:
            train_module.train(load_pipeline(path), runs_dir=runs, verbose=0)
    message = str(error.value)
    step, loss = steps[-1]
    # It stopped at the first non-finite loss: every earlier one was finite.
    assert not np.isfinite(loss) and all(np.isfinite(value) for _, value in steps[:-1]), steps
    assert step < BATCHES_PER_EPOCH  # long before the end of the first epoch
    assert message.startswith(f"{path}: training stopped: the loss is {loss} at step {step:,} (epoch 1, batch {step})")
    assert "learning rate (1e+06 with optimizer 'adam')" in message and "training data" in message, message
    # No checkpoint holds non-finite weights: the last one is from before.
    with open(os.path.join(runs, "tiny", "backup", "training_metadata.json")) as f:
        assert json.load(f)["batches"] < step
    assert not os.path.exists(os.path.join(runs, "tiny", "model.keras"))


def test_weights_gone_non_finite_under_a_finite_loss_are_not_checkpointed(tmp_path, tiny_data):
    # SGD at 1e30: the outputs saturate, so the loss stays finite while the weights overflow.
    path = write_pipeline(tmp_path, "tiny", tiny_data, epochs=2, train="optimizer = \"sgd\"\nlearning_rate = 1e30\n"
                          "checkpoint_every_steps = 5")
    runs = str(tmp_path / "runs")
    with pytest.raises(train_module.NonFiniteLossError) as error:
        train_module.train(load_pipeline(path), runs_dir=runs, verbose=0)
    message = str(error.value)
    assert message.startswith(f"{path}: training stopped: the weights hold NaN or infinite values at step 5 "), message
    assert "not checkpointed" in message and "learning rate (1e+30 with optimizer 'sgd')" in message, message
    assert not os.path.exists(os.path.join(runs, "tiny", "backup", "training_metadata.json"))


def test_nan_in_the_data_stops_the_cli_with_the_message(tmp_path, tiny_data, capsys):
    import tensorflow as tf

    from tfcompress.cli import main

    bad = tmp_path / "bad"
    for split in ("train", "eval"):
        os.makedirs(bad / split)
        files = [os.path.join(tiny_data, split, n) for n in sorted(os.listdir(os.path.join(tiny_data, split)))]
        with tf.io.TFRecordWriter(str(bad / split / "part-00000.tfrecord")) as writer:
            for i, record in enumerate(tf.data.TFRecordDataset(files)):
                example = tf.train.Example.FromString(record.numpy())
                if split == "train" and i % 100 == 7:
                    example.features.feature["dense"].float_list.value[3] = float("nan")
                writer.write(example.SerializeToString())
    shutil.copy(os.path.join(tiny_data, "schema.json"), bad / "schema.json")
    # One NaN dense value in every 100 rows: the first layer's kernel turns NaN at once, yet the loss stays finite
    # (the fused ReLU maps the NaN activations to zeros) and the run would end with a silently worse model.
    path = write_pipeline(tmp_path, "tiny", str(bad), epochs=2)
    assert main(["train", "--pipeline", path, "--runs-dir", str(tmp_path / "runs"), "--verbose", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: training stopped: the weights hold NaN or infinite values at the end of "
                          f"epoch 1 (step {BATCHES_PER_EPOCH})"), err
    assert "training data holds NaN" in err
    assert not os.path.exists(tmp_path / "runs" / "tiny" / "model.keras")


# ---- best epoch --------------------------------------------------------------------------------------------------


def test_best_epoch_callback_keeps_the_best_weights_and_stops_after_patience():
    from tfcompress._keras import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.stop_training = False  # what fit sets
    callback = train_module.BestEpochCallback(restore=True, patience=2)
    callback.set_model(model)
    kept = {}
    for epoch, auc in enumerate([0.60, 0.70, 0.65, 0.70, 0.64, 0.90]):
        model.set_weights([np.full((2, 1), epoch, np.float32), np.full((1,), epoch, np.float32)])
        kept[epoch] = model.get_weights()
        callback.on_epoch_end(epoch, {"val_auc": auc, "loss": 0.5})
        if model.stop_training:
            break
    # 0.70 at epoch 1; epoch 3 only equals it; two epochs without a higher AUC: stop after epoch 3.
    assert (callback.best_epoch, callback.last_epoch, callback.stopped, epoch) == (1, 3, True, 3)
    assert callback.restore_weights(model)
    for a, b in zip(model.get_weights(), kept[1]):
        np.testing.assert_array_equal(a, b)
    # An epoch trained again after a resume replaces its own entry and everything after it.
    callback.stopped, model.stop_training = False, False
    callback.on_epoch_end(2, {"val_auc": 0.8})
    assert (callback.best_epoch, callback.last_epoch) == (2, 2) and sorted(callback.values) == [0, 1, 2]


def test_restore_best_saves_and_reports_the_best_epoch_beside_the_last(tmp_path, tiny_data):
    from tfcompress.data import read

    # Adam at a high rate on 6,000 rows: the eval AUC peaks in the first epoch and falls as the tables overfit.
    path = write_pipeline(tmp_path, "tiny", tiny_data, epochs=3, train="learning_rate = 0.05\nrestore_best = true")
    result = train_module.train(load_pipeline(path), runs_dir=str(tmp_path / "runs"), verbose=0)
    val_auc = result["history"]["val_auc"]
    assert len(val_auc) == 3 and result["epochs_run"] == 3 and not result["stopped_early"]
    best = int(np.argmax(val_auc))
    assert result["best_epoch"] == best + 1 < 3, val_auc
    assert (result["best_val_auc"], result["last_val_auc"]) == (pytest.approx(max(val_auc)),
                                                                pytest.approx(val_auc[-1]))
    assert result["restored_best"] and result["auc"] > result["last_auc"] + 0.005, result
    # The saved model is the best epoch's: its exact AUC is the one reported.
    model = load_model(result["model_path"])
    eval_split = read(os.path.join(tiny_data, "eval"), 1024, shuffle=False, repeat=False, deterministic=True)
    assert train_module.exact_metrics(model, eval_split)[0] == pytest.approx(result["auc"], abs=1e-6)
    row = train_module.format_results_table([result]).splitlines()[2]
    assert f"{best + 1}/3" in row and f"{max(val_auc):.4f}/{val_auc[-1]:.4f}" in row and " best " in row, row

    # patience: the same run stops once the AUC has not improved for 2 epochs.
    early = train_module.train(load_pipeline(path, ["train.patience=2", "train.epochs=10", "name=early"]),
                               runs_dir=str(tmp_path / "runs"), verbose=0)
    assert early["stopped_early"] and early["epochs_run"] == early["best_epoch"] + 2 < 10, early
    assert early["best_epoch"] == result["best_epoch"] and early["auc"] == pytest.approx(result["auc"], abs=1e-6)


# ---- sizes in the results table ----------------------------------------------------------------------------------


def test_results_show_the_trained_and_the_deployed_size_of_mlet(tmp_path, tiny_data):
    from tfcompress.plan import make_plan
    from tfcompress.data.schema import Schema

    path = write_pipeline(tmp_path, "tiny_mlet", tiny_data, epochs=1, train="steps_per_epoch = 5",
                          compression="method = \"mlet\"\nratio = 2.0\ninner_dim = 16")
    pipeline = load_pipeline(path, ["train.save_model=false"])
    result = train_module.train(pipeline, runs_dir=str(tmp_path / "runs"), verbose=0)
    plan = make_plan(Schema.load(tiny_data).cardinalities, 8, **pipeline.compression.plan_kwargs())
    assert result["physical_bytes"] == plan.physical_parameters * 4 > result["deployed_bytes"]
    assert result["deployed_bytes"] == plan.deployed_parameters * 4
    assert result["deployed_ratio"] == pytest.approx(2.0, rel=0.01)
    header, _, row = train_module.format_results_table([result]).splitlines()
    assert header.split()[2:6] == ["logical", "trained", "deployed", "ratio"]
    cells = row.split()
    from tfcompress.sizes import format_bytes

    assert " ".join(cells[2:8]) == " ".join([format_bytes(result["logical_bytes"]),
                                             format_bytes(result["physical_bytes"]),
                                             format_bytes(result["deployed_bytes"])])
    assert cells[8] == f"{result['deployed_ratio']:,.1f}x"


# ---- the pipeline is checked before any work ----------------------------------------------------------------------


def test_an_unknown_compression_option_fails_before_the_data_step(tmp_path, capsys):
    from tfcompress.cli import main

    from test_train_cli import write_pipeline as write_synthetic_pipeline

    path = write_synthetic_pipeline(str(tmp_path), "tiny", compression="ratio = 10.0\nchunksize = 4")
    started = time.perf_counter()
    assert main(["train", "--pipeline", path, "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: [compression] chunksize: method 'robe' has no option 'chunksize'" in err, err
    assert "did you mean 'chunk_size'?" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()  # no data generated
    assert time.perf_counter() - started < 5
