"""Multi-worker training on Keras 3: MultiWorkerMirroredStrategy with a training loop of our own.

Keras 3.15's `fit` cannot train under MultiWorkerMirroredStrategy with two or more workers: it reduces its first
(dict) batch and its scalar per-step logs with collective reductions along an axis that the strategy rejects
(keras-team/keras#20585). `fit_multiworker` runs the same model, optimizer and callbacks without `fit`:

- each step runs `strategy.run` on every worker's replicas; each replica's loss is its binary cross-entropy
  summed over its rows and divided by the GLOBAL batch size (`tf.nn.compute_average_loss`), so the optimizer's
  all-reduced sum of the replicas' gradients is the gradient of the global batch's mean loss, as on one device;
- the Keras optimizer all-reduces the gradients itself (sparse IndexedSlices are all-gathered, which is why the
  row-sparse optimizers deduplicate rows);
- the per-step loss is reduced by this module (`strategy.reduce(SUM)` of the replicas' scaled losses) and fed to
  the callbacks as `logs["loss"]` / `logs["log_loss"]`; validation (`val_auc`, `val_log_loss`, `val_loss`) is the
  exact AUC and log loss of a plain forward pass over the whole eval set, identical on every worker because the
  weights are;
- the callbacks get the Keras callback protocol through `keras.callbacks.CallbackList` (train/epoch/batch begin
  and end, `model.stop_training`), so checkpoints, TensorBoard logs, the non-finite-loss stop and the best-epoch
  tracking are the ones `fit` runs.

A cluster that never assembles, a worker that dies mid-step, or a TF_CONFIG that names an address where nothing
answers would otherwise leave the surviving workers blocked in a collective forever. `ClusterWatchdog` gives every
collective phase `[train] cluster_timeout_s` seconds; past it a watchdog process prints which workers of TF_CONFIG
do not answer on their port and kills the training process (TensorFlow holds the GIL while it waits, so nothing
inside the process can act). `check_tf_config` rejects a malformed TF_CONFIG before TensorFlow reads it.
"""

import contextlib
import json
import os
import subprocess
import sys

import tensorflow as tf

from tfcompress._keras import keras


def check_tf_config(environ=None):
    """The cluster and task of the TF_CONFIG environment variable, checked.

    Returns:
        (cluster, task_type, task_index): cluster maps a task type ("chief", "worker") to its "host:port" list.

    Raises:
        ValueError: TF_CONFIG is unset, not JSON, or a key is missing or wrong; the message names the key.
    """

    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG")
    if not text:
        raise ValueError("[train] strategy \"multiworker\" needs the TF_CONFIG environment variable (the cluster "
                         "and this worker's task), e.g. TF_CONFIG='{\"cluster\": {\"worker\": [\"host1:12345\", "
                         "\"host2:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}'")
    try:
        config = json.loads(text)
    except ValueError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {text[:200]!r}") from None
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object with keys \"cluster\" and \"task\", got {text[:200]!r}")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError(f"TF_CONFIG key \"cluster\" must map task types to address lists, got {cluster!r}")
    for task_type, addresses in cluster.items():
        if task_type not in ("chief", "worker"):
            raise ValueError(f"TF_CONFIG key \"cluster\".{task_type!r}: MultiWorkerMirroredStrategy takes only "
                             "\"chief\" and \"worker\" tasks")
        if not isinstance(addresses, list) or not addresses:
            raise ValueError(f"TF_CONFIG key \"cluster\".{task_type!r} must be a non-empty list of \"host:port\" "
                             f"addresses, got {addresses!r}")
        for i, address in enumerate(addresses):
            host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"TF_CONFIG key \"cluster\".{task_type!r}[{i}] must be \"host:port\", got "
                                 f"{address!r}")
    if len(cluster.get("chief", [])) > 1:
        raise ValueError(f"TF_CONFIG key \"cluster\".'chief' holds {len(cluster['chief'])} addresses; there is at "
                         "most one chief")
    task = config.get("task")
    if not isinstance(task, dict):
        raise ValueError(f"TF_CONFIG key \"task\" must be an object such as {{\"type\": \"worker\", \"index\": 0}}, "
                         f"got {task!r}")
    task_type, index = task.get("type"), task.get("index")
    if task_type not in cluster:
        raise ValueError(f"TF_CONFIG key \"task\".\"type\" must be one of the cluster's task types "
                         f"{sorted(cluster)}, got {task_type!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
        raise ValueError(f"TF_CONFIG key \"task\".\"index\" must be an integer in [0, {len(cluster[task_type])}) "
                         f"for the {len(cluster[task_type])} {task_type!r} address(es), got {index!r}")
    return cluster, task_type, index


class ClusterWatchdog:
    """Fails the job when a collective phase (joining the cluster, a training step) outlasts `timeout_s`.

    `phase(what)` is a context manager around code that waits for the other workers. TensorFlow holds the GIL
    while it waits to join a cluster (measured with TF 2.21: no Python thread runs, and SIGTERM is not acted
    on), so the watchdog is a small process of its own: when a phase does not end in time it checks which
    workers of the cluster accept connections on their port, prints a message naming the phase, the timeout and
    the workers that do not answer (or, when all answer, that the collective is stuck, as when a worker crashed
    and was restarted alone), and kills the training process with SIGKILL (exit status 137; a checkpointed run
    resumes from its backup when the job is started again).

    Args:
        cluster, task_type, task_index: what `check_tf_config` returns.
        timeout_s: seconds a phase may last ([train] cluster_timeout_s).
        source: the pipeline file, for the message.
    """

    def __init__(self, cluster, task_type, task_index, timeout_s, source="<pipeline>"):
        self.cluster, self.task_type, self.task_index = cluster, task_type, int(task_index)
        self.timeout_s, self.source = float(timeout_s), source
        arguments = [os.getpid(), self.timeout_s, source, f"{task_type} {self.task_index}", self.peers()]
        self._process = subprocess.Popen(
            [sys.executable, "-c", "import json, sys; from tfcompress._watchdog import watch; "
             "watch(*json.loads(sys.argv[1]))", json.dumps(arguments)],
            stdin=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])))

    def _send(self, line):
        self._process.stdin.write((line.replace("\n", " ") + "\n").encode())
        self._process.stdin.flush()

    @contextlib.contextmanager
    def phase(self, what):
        self._send(f"arm {what}")
        try:
            yield
        finally:
            self._send("disarm")

    def stop(self):
        if self._process.poll() is None:
            self._process.stdin.close()
            self._process.wait()

    def peers(self):
        """(task name, address) of every other task of the cluster."""
        return [(f"{task_type} {i}", address) for task_type, addresses in sorted(self.cluster.items())
                for i, address in enumerate(addresses)
                if (task_type, i) != (self.task_type, self.task_index)]


def worker_count(strategy):
    """The number of workers (chief included) of a MultiWorkerMirroredStrategy."""
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def common_checkpoint(strategy, metadata, backup_path, source="<pipeline>"):
    """The checkpoint every worker holds: this worker's `metadata` (TrainingBackup.load()) or the previous one
    it records, whichever has the most batches among those that every worker has; None when no worker has one.

    Every worker checkpoints at the same steps, but a worker killed between the others' checkpoint and its own
    misses the newest; each checkpoint records the one before, so the workers settle on the newest they share.

    Raises:
        ValueError: the workers share no checkpoint (naming each worker's checkpointed batches).
    """

    def batches(entry):
        return -1 if entry is None else int(entry.get("batches", entry.get("step", 0)))

    mine = [batches(metadata), batches(metadata.get("previous") if metadata else None)]
    values = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant([mine], tf.int64))
    every = strategy.gather(values, axis=0).numpy()  # [replicas, 2]: one row per replica, workers in task order
    if (every[:, 0] < 0).all():
        return None  # a fresh start everywhere
    shared = set(every[0][every[0] >= 0])
    for row in every[1:]:
        shared &= set(row[row >= 0])
    if not shared:
        held = "; ".join(f"replica {i}: {', '.join(str(b) for b in row if b >= 0) or 'none'}"
                         for i, row in enumerate(every.tolist()))
        raise ValueError(f"{source}: [train] backup_dir: the workers hold no common checkpoint to resume from "
                         f"(batches checkpointed by {held}; this worker's backup is {backup_path}); delete every "
                         "worker's backup directory to start over")
    chosen = max(shared)
    if batches(metadata) == chosen:
        return metadata
    return metadata["previous"]


class _History:
    """What `fit` returns, as far as train() reads it: `history` maps a log name to its per-epoch values."""

    def __init__(self):
        self.history = {}


def fit_multiworker(model, strategy, make_dataset, epochs, steps_per_epoch, global_batch_size, callbacks,
                    evaluate, initial_epoch=0, watchdog=None, verbose=1):
    """Train `model` (built and compiled in `strategy.scope()`) from epoch `initial_epoch` to `epochs`.

    Args:
        model: a compiled Keras model; its optimizer updates the weights (it all-reduces the gradients).
        strategy: the MultiWorkerMirroredStrategy.
        make_dataset: called with no arguments, returns the distributed training dataset (of (features, label)
            per-replica batches); with `steps_per_epoch` one iterator serves every epoch (a repeating stream),
            without one every epoch is one pass over a new iterator.
        epochs: the epoch to stop before (0-based exclusive), as `fit`'s `epochs`.
        steps_per_epoch: steps per epoch, or None for one pass.
        global_batch_size: rows per step over all replicas (each replica's loss is divided by it).
        callbacks: Keras callbacks (a list); they get the `fit` protocol.
        evaluate: called with the model at every epoch end, returns (auc, log_loss) on the eval set.
        watchdog: a ClusterWatchdog timing every step, or None.
        verbose: 0 silent, else one line per epoch.

    Returns:
        an object whose `history` maps "loss", "log_loss", "val_auc", "val_log_loss", "val_loss" to per-epoch
        values.
    """

    callback_list = keras.callbacks.CallbackList(callbacks, model=model, add_history=False, add_progbar=False,
                                                 epochs=epochs, steps=steps_per_epoch, verbose=verbose)
    loss_function = keras.losses.binary_crossentropy
    optimizer = model.optimizer

    def replica_step(features, labels):
        with tf.GradientTape() as tape:
            predictions = model(features, training=True)
            per_example = loss_function(tf.reshape(labels, tf.shape(predictions)), predictions)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
            if model.losses:
                # Regularization is counted once per step: each replica adds its share.
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        variables = model.trainable_variables
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables))
        return loss

    @tf.function
    def train_step(batch):
        features, labels = batch
        per_replica_loss = strategy.run(replica_step, args=(features, labels))
        # Each replica's loss is already divided by the global batch: their sum is the global batch's mean.
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)

    def timed(what):
        return watchdog.phase(what) if watchdog is not None else contextlib.nullcontext()

    history = _History()
    model.stop_training = False
    callback_list.on_train_begin()
    iterator = iter(make_dataset()) if steps_per_epoch is not None else None
    step = 0
    for epoch in range(initial_epoch, epochs):
        callback_list.on_epoch_begin(epoch)
        if steps_per_epoch is None:
            iterator = iter(make_dataset())
        loss_sum, batches = 0.0, 0
        while steps_per_epoch is None or batches < steps_per_epoch:
            callback_list.on_train_batch_begin(batches)
            with timed(f"training step {step + 1} (epoch {epoch + 1}, batch {batches + 1})"):
                if steps_per_epoch is None:
                    # Every worker must agree that the pass has ended (their shards may differ by a batch):
                    # get_next_as_optional reduces "has a batch" across the workers.
                    optional = iterator.get_next_as_optional()
                    if not bool(optional.has_value()):
                        break
                    batch = optional.get_value()
                else:
                    batch = next(iterator)
                loss = float(train_step(batch))
            loss_sum += loss
            batches += 1
            step += 1
            mean = loss_sum / batches
            callback_list.on_train_batch_end(batches - 1, {"loss": mean, "log_loss": mean})
        logs = {"loss": loss_sum / max(batches, 1), "log_loss": loss_sum / max(batches, 1)}
        val_auc, val_log_loss = evaluate(model)
        logs.update(val_auc=val_auc, val_log_loss=val_log_loss, val_loss=val_log_loss)
        with timed(f"the end of epoch {epoch + 1} (checkpoint)"):
            callback_list.on_epoch_end(epoch, logs)
        for key, value in logs.items():
            history.history.setdefault(key, []).append(float(value))
        if verbose:
            print(f"epoch {epoch + 1}/{epochs}: {batches} steps, " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()),
                  flush=True)
        if model.stop_training:
            break
    callback_list.on_train_end()
    return history
