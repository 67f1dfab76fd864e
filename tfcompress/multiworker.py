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
collective phase `[train] cluster_timeout_s` seconds; past it the process prints which workers of TF_CONFIG do not
answer on their port and exits with status 2 (a thread cannot interrupt a blocked TensorFlow op, so exiting the
process is the only way out). `check_tf_config` rejects a malformed TF_CONFIG before TensorFlow reads it.
"""

import contextlib
import json
import os
import socket
import sys
import threading
import time

import tensorflow as tf

from tfcompress._keras import keras

# Exit status of a job stopped by the watchdog: the CLI's status for a usage/input problem (ValueError).
WATCHDOG_EXIT_STATUS = 2


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


def _answers(address, timeout_s=1.0):
    """Whether something accepts TCP connections at "host:port"."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


class ClusterWatchdog:
    """Fails the job when a collective phase (joining the cluster, a training step) outlasts `timeout_s`.

    `phase(what)` is a context manager around code that waits for the other workers. When it does not end in
    time, the watchdog thread checks which workers of the cluster accept connections on their port, prints a
    message naming the phase, the timeout and the workers that do not answer (or, when all answer, that the
    collective is stuck, as when a worker crashed and was restarted alone) and ends the process with status
    `WATCHDOG_EXIT_STATUS`.

    Args:
        cluster, task_type, task_index: what `check_tf_config` returns.
        timeout_s: seconds a phase may last ([train] cluster_timeout_s).
        source: the pipeline file, for the message.
        exit: called with the status to end the process (tests replace it).
    """

    def __init__(self, cluster, task_type, task_index, timeout_s, source="<pipeline>", exit=os._exit):
        self.cluster, self.task_type, self.task_index = cluster, task_type, int(task_index)
        self.timeout_s, self.source, self._exit = float(timeout_s), source, exit
        self._lock = threading.Lock()
        self._deadline = None
        self._what = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tfcompress-cluster-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def phase(self, what):
        with self._lock:
            self._what, self._deadline = what, time.monotonic() + self.timeout_s
        try:
            yield
        finally:
            with self._lock:
                self._what, self._deadline = None, None

    def stop(self):
        self._stopped.set()

    def peers(self):
        """(task name, address) of every other task of the cluster."""
        return [(f"{task_type} {i}", address) for task_type, addresses in sorted(self.cluster.items())
                for i, address in enumerate(addresses)
                if (task_type, i) != (self.task_type, self.task_index)]

    def message(self, what):
        silent = [f"{name} at {address}" for name, address in self.peers() if not _answers(address)]
        me = f"{self.task_type} {self.task_index}"
        if silent:
            cause = ("no answer from " + ", ".join(silent) + ": the worker is not running (crashed, killed, not yet "
                     "started) or TF_CONFIG names a wrong or unreachable address")
        else:
            cause = ("every worker of TF_CONFIG answers on its port, but the collective does not complete: a worker "
                     "may have crashed and been restarted alone (restart the whole job; it resumes from its "
                     "checkpoints), or the workers run different pipelines or steps")
        return (f"{self.source}: multi-worker training failed on {me}: {what} did not finish within [train] "
                f"cluster_timeout_s = {self.timeout_s:g} s; {cause}")

    def _watch(self):
        while not self._stopped.wait(0.5):
            with self._lock:
                what, deadline = self._what, self._deadline
            if deadline is None or time.monotonic() < deadline:
                continue
            print(self.message(what), file=sys.stderr, flush=True)
            self._exit(WATCHDOG_EXIT_STATUS)
            return


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
