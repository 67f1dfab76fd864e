"""Crash-safe training: `[train] checkpoint_every_steps` + `backup_dir` (a checkpoint every N steps and at epoch
end). A CLI training run killed with SIGKILL mid-epoch and started again ends with the weights, optimizer state and
step count of an uninterrupted run of the same seed: for a run with a known step count (synthetic data: a
repeating stream, `steps_per_epoch` steps per epoch) and for an epoch-sized run (TFRecords of unknown length: each
epoch one pass, killed in its third epoch).

Exactness needs the same batches after the restart: the pipeline sets `deterministic = true` (fixed reader order
for a seed), and `train` finishes the interrupted epoch on exactly the batches the uninterrupted run had left in it
(Keras' BackupAndRestore alone restarts the interrupted epoch from its first batch).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train_cli import ROOT, write_pipeline

EPOCHS = 3
BATCH_SIZE = 64
TRAIN_ROWS = 6000  # test_train_cli's tiny pipeline
STEPS_PER_EPOCH = TRAIN_ROWS // BATCH_SIZE
CHECKPOINT_EVERY = 20


def train_command(pipeline, runs):
    return [sys.executable, "-m", "tfcompress.cli", "train", "--pipeline", pipeline, "--runs-dir", runs,
            "--verbose", "2", "--set", f"train.epochs={EPOCHS}", "--set", f"train.batch_size={BATCH_SIZE}",
            "--set", "train.deterministic=true", "--set", f"train.checkpoint_every_steps={CHECKPOINT_EVERY}"]


def run_env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")


def run_to_end(pipeline, runs):
    completed = subprocess.run(train_command(pipeline, runs), cwd=ROOT, env=run_env(), capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def checkpointed_batches(metadata_path):
    """Batches trained at the checkpoint in `metadata_path` (0 when there is none yet, or it is being replaced)."""
    try:
        with open(metadata_path) as f:
            metadata = json.load(f)
    except (OSError, ValueError):
        return 0
    return metadata.get("batches", metadata["step"])


def kill_after_checkpoint(pipeline, runs, metadata_path, min_batches=1):
    """Start a training run, SIGKILL it as soon as a checkpoint of at least `min_batches` batches exists; return
    the checkpoint's step."""
    process = subprocess.Popen(train_command(pipeline, runs), cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while checkpointed_batches(metadata_path) < min_batches:
            assert process.poll() is None, "training ended before writing that checkpoint"
            assert time.monotonic() < deadline, "no such checkpoint within 240 s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    with open(metadata_path) as f:
        return json.load(f)["step"]


def load_model(path):
    import tfcompress.layers.planned  # noqa: F401 (these imports register the custom classes load_model needs)
    import tfcompress.models  # noqa: F401
    from tfcompress._keras import keras

    return keras.models.load_model(path)


def tfrecord_pipeline(directory, data):
    """The tiny pipeline reading test_train_cli's synthetic data as plain TFRecords: no row count, so each epoch
    is one pass of the reader."""
    from tfcompress.data import synthetic

    from test_train_safety import write_pipeline as write_tfrecord_pipeline

    synthetic.generate(data, dataset="criteo", rows=TRAIN_ROWS, eval_rows=3000, seed=1, cardinality_scale=0.001)
    return write_tfrecord_pipeline(directory, "tiny", data)


@pytest.mark.parametrize("source", [
    "synthetic",
    # Killed in the third epoch, so that the resumed run also has to find that epoch's shuffle order.
    pytest.param("tfrecord", marks=pytest.mark.slow),
])
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, source):
    data = str(tmp_path / "data")
    if source == "synthetic":
        pipeline = write_pipeline(str(tmp_path), "tiny", data_path=data)  # ROBE tables, Adam (moments get restored)
        # A repeating stream of STEPS_PER_EPOCH steps per epoch: one optimizer step per batch.
        total_steps, kill_after = EPOCHS * STEPS_PER_EPOCH, CHECKPOINT_EVERY
    else:
        pipeline = tfrecord_pipeline(str(tmp_path), data)  # ROBE tables, Adam
        total_steps, kill_after = EPOCHS * STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH + 1
    backup = tmp_path / "crashed" / "tiny" / "backup"  # default backup_dir: runs/<name>/backup

    run_to_end(pipeline, str(tmp_path / "reference"))
    saved_step = kill_after_checkpoint(pipeline, str(tmp_path / "crashed"), str(backup / "training_metadata.json"),
                                       min_batches=kill_after)
    # Killed after such a checkpoint and before the end (the run deletes its backup when it completes).
    assert kill_after <= saved_step < total_steps
    assert not os.path.exists(tmp_path / "crashed" / "tiny" / "model.keras")

    output = run_to_end(pipeline, str(tmp_path / "crashed"))
    assert f"resuming from the checkpoint at step {saved_step:,}" in output
    assert not backup.exists()  # removed once training completed

    reference = load_model(str(tmp_path / "reference" / "tiny" / "model.keras"))
    resumed = load_model(str(tmp_path / "crashed" / "tiny" / "model.keras"))
    # Nothing lost, nothing trained twice: both took exactly the planned number of optimizer steps.
    assert int(reference.optimizer.iterations.numpy()) == total_steps
    assert int(resumed.optimizer.iterations.numpy()) == total_steps
    weights_a, weights_b = reference.get_weights(), resumed.get_weights()
    assert len(weights_a) == len(weights_b) > 2
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # The optimizer's moments were restored too.
    for a, b in zip(reference.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
