"""`tfcompress train --strategy mirrored --cpu-replicas 2`: data-parallel training equals one-device training.

Each run is a subprocess of the CLI because the CPU can only be split into logical devices before TensorFlow
initializes them, which the test process has long done.
"""

import io
import json
import os
import socket
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tfcompress.train import configure_cpu_replicas, make_strategy

from test_train_cli import ROOT, write_pipeline


def train_cli(pipeline, runs, *args, env=None):
    env = env or dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    completed = subprocess.run(
        [sys.executable, "-m", "tfcompress.cli", "train", "--pipeline", pipeline, "--runs-dir", runs,
         "--verbose", "0", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def saved_weights(path):
    import tfcompress.layers.planned  # noqa: F401 (these imports register the custom classes load_model needs)
    import tfcompress.models  # noqa: F401
    from tfcompress._keras import keras

    return [np.asarray(w) for w in keras.models.load_model(path).get_weights()]


@pytest.mark.parametrize("method, compression", [("full", ""), ("robe", "ratio = 10.0\nchunk_size = 4")])
def test_two_replica_mirrored_equals_one_device_with_the_same_global_batch(tmp_path, method, compression):
    # Plain SGD and a fixed reader order: the two replicas' per-replica batches of 64 are, row for row, the
    # one-device batch of 128, and the all-reduced gradient is its gradient (the loss is the global-batch mean).
    pipeline = write_pipeline(str(tmp_path), "tiny", method=method, compression=compression)
    common = ["--set", "train.optimizer=sgd", "--set", "train.learning_rate=0.1", "--set", "train.epochs=1",
              "--set", "train.deterministic=true"]
    train_cli(pipeline, str(tmp_path / "single"), *common, "--set", "train.batch_size=128")
    train_cli(pipeline, str(tmp_path / "mirrored"), *common, "--set", "train.batch_size=64",
              "--strategy", "mirrored", "--cpu-replicas", "2")
    for runs, replicas in (("single", 1), ("mirrored", 2)):
        with open(tmp_path / runs / "tiny" / "results.json") as f:
            result = json.load(f)["result"]
        assert (result["replicas"], result["global_batch_size"]) == (replicas, 128)

    a = saved_weights(str(tmp_path / "single" / "tiny" / "model.keras"))
    b = saved_weights(str(tmp_path / "mirrored" / "tiny" / "model.keras"))
    assert len(a) == len(b) and len(a) > 2
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


def test_make_strategy_names():
    assert make_strategy("default").num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="strategy must be one of"):
        make_strategy("parameter_server")


def test_configure_cpu_replicas_rejects_bad_counts():
    with pytest.raises(ValueError, match="cpu replicas must be an integer >= 1, got 0"):
        configure_cpu_replicas(0)


def archived_weights(path):
    """Every array in the weights file of a .keras archive, by its HDF5 path (read without Keras)."""
    import h5py

    arrays = {}
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as raw:
        with h5py.File(io.BytesIO(raw.read()), "r") as weights:
            weights.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                               if isinstance(item, h5py.Dataset) else None)
    return arrays


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_train_to_identical_weights_and_match_one_worker(tmp_path):
    # Legacy tf.keras keeps Keras' fit (Keras 3 trains with tfcompress.multiworker's loop: test_multiworker.py).
    pipeline = write_pipeline(str(tmp_path), "tiny")
    common = ["--set", "train.epochs=1", "--set", "train.save_model=true"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", TF_USE_LEGACY_KERAS="1")
    train_cli(pipeline, str(tmp_path / "single"), *common, "--set", "train.batch_size=256", env=env)

    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tfcompress.cli", "train", "--pipeline", pipeline, "--runs-dir",
             str(tmp_path / "multi"), "--verbose", "0", "--strategy", "multiworker", *common,
             "--set", "train.batch_size=128"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(env, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})))
        for i in range(2)
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output

    with open(tmp_path / "multi" / "tiny" / "results.json") as f:
        multi = json.load(f)["result"]
    with open(tmp_path / "single" / "tiny" / "results.json") as f:
        single = json.load(f)["result"]
    assert (multi["replicas"], multi["global_batch_size"]) == (2, 256)
    # Every worker holds the same weights (worker 0 is the chief and writes runs/<name>/).
    a = archived_weights(tmp_path / "multi" / "tiny" / "model.keras")
    b = archived_weights(tmp_path / "multi" / "tiny" / "worker_1" / "model.keras")
    assert sorted(a) == sorted(b) and len(a) > 2
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # Same global batch, same number of steps, but the workers shard the rows, so the order differs from the
    # single worker's: AUC within the run-to-run noise of this tiny data set (orders of 0.01).
    assert abs(multi["auc"] - single["auc"]) < 0.03
