"""Crash-safe training: `[train] checkpoint_every_steps` + `backup_dir` (BackupAndRestore every N steps and at
epoch end). A CLI training run killed with SIGKILL mid-epoch and started again ends with the weights, optimizer
state and step count of an uninterrupted run of the same seed.

Exactness needs the same batches after the restart: the pipeline sets `deterministic = true` (fixed reader order
for a seed), and `train` skips the batches the checkpoint has already trained on and stops after the planned
number of steps (Keras' BackupAndRestore alone restarts the interrupted epoch from its first batch).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

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


def kill_after_first_checkpoint(pipeline, runs, metadata_path):
    """Start a training run, SIGKILL it as soon as a checkpoint exists; return the checkpointed step."""
    process = subprocess.Popen(train_command(pipeline, runs), cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(metadata_path):
            assert process.poll() is None, "training ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
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


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    data = str(tmp_path / "data")
    pipeline = write_pipeline(str(tmp_path), "tiny", data_path=data)  # ROBE tables, Adam (moments get restored)
    backup = tmp_path / "crashed" / "tiny" / "backup"  # default backup_dir: runs/<name>/backup
    total_steps = EPOCHS * STEPS_PER_EPOCH

    run_to_end(pipeline, str(tmp_path / "reference"))
    saved_step = kill_after_first_checkpoint(pipeline, str(tmp_path / "crashed"),
                                             str(backup / "training_metadata.json"))
    # Killed after at least one checkpoint and before the end (the run deletes its backup when it completes).
    assert CHECKPOINT_EVERY <= saved_step < total_steps
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
