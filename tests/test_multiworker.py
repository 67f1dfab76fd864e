"""`tfcompress train --strategy multiworker` on Keras 3 (tfcompress.multiworker's loop), on loopback.

Each worker is a CLI subprocess with its own TF_CONFIG naming free localhost ports. With `deterministic = true`
every global batch holds the rows of the one-device run's batch of the same global size, so two workers of
batch B and one device of batch 2B train to the same weights (up to float summation order).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tfcompress.multiworker import check_tf_config

from test_distributed import archived_weights, free_port as any_free_port
from test_train_cli import ROOT, write_pipeline

FUSED_ROBE = "ratio = 10.0\nchunk_size = 4\nuse_custom_op = true"  # fails instead of falling back without the op


_USED_PORTS = set()


def free_port():
    """A free localhost port not handed out before in this session: a worker's port of an earlier run may still
    linger in TIME_WAIT, and the next server to bind it would fail."""
    while True:
        port = any_free_port()
        if port not in _USED_PORTS:
            _USED_PORTS.add(port)
            return port


def env_for(tf_config=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_USE_LEGACY_KERAS", None)
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = tf_config if isinstance(tf_config, str) else json.dumps(tf_config)
    return env


def train_command(pipeline, runs, *args):
    return [sys.executable, "-m", "tfcompress.cli", "train", "--pipeline", pipeline, "--runs-dir", runs,
            "--verbose", "1", *args]


def start_workers(pipeline, runs, count, *args):
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(count)]}
    return [subprocess.Popen(train_command(pipeline, runs, "--strategy", "multiworker", *args), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env_for({"cluster": cluster, "task": {"type": "worker", "index": i}}))
            for i in range(count)]


def finish(workers, timeout=300):
    outputs = []
    for worker in workers:
        output, _ = worker.communicate(timeout=timeout)
        outputs.append(output)
    return outputs


def steps_args(optimizer, learning_rate, batch_size, steps):
    return ["--set", f"train.optimizer={optimizer}", "--set", f"train.learning_rate={learning_rate}",
            "--set", f"train.batch_size={batch_size}", "--set", "train.epochs=1",
            "--set", f"train.steps_per_epoch={steps}", "--set", "train.deterministic=true",
            "--set", "train.tensorboard=false", "--set", "train.cluster_timeout_s=120"]


def assert_same_weights(a, b, atol):
    assert sorted(a) == sorted(b) and len(a) > 4
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


def two_workers_against_one_device(tmp_path, optimizer, learning_rate, steps=10):
    pipeline = write_pipeline(str(tmp_path), "tiny", compression=FUSED_ROBE)
    single = subprocess.run(train_command(pipeline, str(tmp_path / "single"),
                                          *steps_args(optimizer, learning_rate, 256, steps)),
                            cwd=ROOT, env=env_for(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    workers = start_workers(pipeline, str(tmp_path / "multi"), 2, *steps_args(optimizer, learning_rate, 128, steps))
    for worker, output in zip(workers, finish(workers)):
        assert worker.returncode == 0, output
    with open(tmp_path / "multi" / "tiny" / "results.json") as f:
        result = json.load(f)["result"]
    assert (result["replicas"], result["global_batch_size"]) == (2, 256)
    chief = archived_weights(tmp_path / "multi" / "tiny" / "model.keras")
    # Both workers hold the same weights, bit for bit (worker 1 writes a folder of its own)...
    assert_same_weights(chief, archived_weights(tmp_path / "multi" / "tiny" / "worker_1" / "model.keras"), 0)
    # ... and they are the one-device run's: the model's weights and the optimizer's slots.
    assert_same_weights(chief, archived_weights(tmp_path / "single" / "tiny" / "model.keras"), 1e-5)


def test_two_workers_equal_one_device_robe_fused_op_sparse_adagrad(tmp_path):
    two_workers_against_one_device(tmp_path, "adagrad", 0.05)


@pytest.mark.slow
def test_two_workers_equal_one_device_robe_fused_op_lazy_adam(tmp_path):
    two_workers_against_one_device(tmp_path, "lazy_adam", 0.01)


@pytest.mark.parametrize("tf_config, message", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('["worker"]', "TF_CONFIG must be a JSON object"),
    ('{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG key "cluster"'),
    ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG key \"cluster\".'worker'\\[0\\] must be \"host:port\", got 'localhost'"),
    ('{"cluster": {"ps": ["localhost:1"]}, "task": {"type": "ps", "index": 0}}', "takes only \"chief\" and"),
    ('{"cluster": {"worker": ["localhost:1"]}}', 'TF_CONFIG key "task"'),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "chief", "index": 0}}',
     'TF_CONFIG key "task"."type" must be one of the cluster\'s task types \\[\'worker\'\\], got \'chief\''),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 1}}',
     'TF_CONFIG key "task"."index" must be an integer in \\[0, 1\\)'),
])
def test_malformed_tf_config_names_the_key(tf_config, message):
    with pytest.raises(ValueError, match=message):
        check_tf_config({"TF_CONFIG": tf_config})


def test_tf_config_is_required_and_a_good_one_is_read():
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        check_tf_config({})
    cluster = {"chief": ["a:1"], "worker": ["b:2", "c:3"]}
    assert check_tf_config({"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})}) \
        == (cluster, "worker", 1)


def test_cli_fails_at_once_on_a_malformed_tf_config(tmp_path):
    pipeline = write_pipeline(str(tmp_path), "tiny")
    completed = subprocess.run(train_command(pipeline, str(tmp_path / "runs"), "--strategy", "multiworker"),
                               cwd=ROOT, env=env_for('{"cluster": {"worker": ["127.0.0.1:x"]}}'),
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "TF_CONFIG key \"cluster\".'worker'[0] must be \"host:port\"" in completed.stderr
    assert not os.path.exists(tmp_path / "data")  # before any work


def test_unreachable_worker_fails_within_the_timeout_naming_it(tmp_path):
    # Worker 1 never starts (its address is a port nothing listens on): worker 0 would wait forever to join.
    pipeline = write_pipeline(str(tmp_path), "tiny")
    silent = f"127.0.0.1:{free_port()}"
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{free_port()}", silent]}, "task": {"type": "worker", "index": 0}}
    completed = subprocess.run(
        train_command(pipeline, str(tmp_path / "runs"), "--strategy", "multiworker", "--set",
                      "train.cluster_timeout_s=3"),
        cwd=ROOT, env=env_for(tf_config), capture_output=True, text=True, timeout=120)
    assert completed.returncode == -signal.SIGKILL, completed.stdout + completed.stderr
    assert (f"multi-worker training failed on worker 0: joining the cluster did not finish within [train] "
            f"cluster_timeout_s = 3 s; no answer from worker 1 at {silent}") in completed.stderr


def checkpointed_batches(metadata_path):
    try:
        with open(metadata_path) as f:
            return json.load(f).get("batches", 0)
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_a_worker_killed_and_the_job_restarted_resumes_to_the_uninterrupted_weights(tmp_path):
    pipeline = write_pipeline(str(tmp_path), "tiny", compression=FUSED_ROBE)
    args = [*steps_args("adagrad", 0.05, 128, 40), "--set", "train.checkpoint_every_steps=5",
            "--set", "train.cluster_timeout_s=15"]
    whole = start_workers(pipeline, str(tmp_path / "whole"), 2, *args)
    for worker, output in zip(whole, finish(whole)):
        assert worker.returncode == 0, output

    runs = str(tmp_path / "killed")
    metadata = os.path.join(runs, "tiny", "backup", "worker_1", "training_metadata.json")
    workers = start_workers(pipeline, runs, 2, *args)
    deadline = time.monotonic() + 300
    while checkpointed_batches(metadata) < 10:
        if workers[1].poll() is not None or time.monotonic() > deadline:
            for worker in workers:
                worker.kill()
            raise AssertionError("worker 1 ended before a checkpoint:\n" + "\n".join(finish(workers)))
        time.sleep(0.1)
    workers[1].send_signal(signal.SIGKILL)
    survivor, _ = finish(workers)
    # The chief does not hang: TensorFlow reports the lost peer, or the watchdog names it.
    assert workers[0].returncode != 0
    assert "worker 1" in survivor or "task:1" in survivor or "/task:1" in survivor, survivor[-3000:]

    restarted = start_workers(pipeline, runs, 2, *args)
    outputs = finish(restarted)
    for worker, output in zip(restarted, outputs):
        assert worker.returncode == 0, output
    assert "resuming from the checkpoint" in outputs[0]
    assert_same_weights(archived_weights(tmp_path / "whole" / "tiny" / "model.keras"),
                        archived_weights(os.path.join(runs, "tiny", "model.keras")), 1e-6)
