"""Train one pipeline end to end: data -> compression plan -> model -> Keras fit -> exact metrics -> saved model.

Example::

    from tfcompress.pipeline import load_pipeline
    from tfcompress.train import train, format_results_table

    result = train(load_pipeline("pipelines/synthetic_dlrm_robe.toml"))
    print(format_results_table([result]))
"""

import contextlib
import dataclasses
import datetime
import errno
import glob
import json
import math
import os
import re
import socket
import time
import warnings

try:
    import fcntl
except ImportError:  # not on POSIX: the lock file works by pid alone
    fcntl = None

import numpy as np
import tensorflow as tf

from tfcompress._files import write_atomically, write_json_atomically
from tfcompress._keras import USING_LEGACY_KERAS, keras
from tfcompress.chunk_pruning import ChunkPruningCallback, chunk_pruned_layers
from tfcompress.data import read, synthetic
from tfcompress.data.schema import Schema
from tfcompress.metrics import exact_auc, log_loss
from tfcompress import multiworker
from tfcompress.models import build_dcn, build_dlrm
from tfcompress.optimizers import LazyAdam, SparseAdagrad
from tfcompress.plan import make_plan
from tfcompress.sizes import BYTES_PER_PARAMETER, format_bytes

# Keras' streaming AUC only approximates the ROC curve by bucketing scores; enough thresholds make the per-epoch
# numbers close to the exact AUC that the final report computes with NumPy.
AUC_THRESHOLDS = 10_000

# Keras 3's Adam turns a sparse (IndexedSlices) gradient into work over the whole variable (it updates the full
# moment tensors), so every step costs time proportional to the table size. Above this many floats in 2-D tables
# the pipeline warns and suggests the row-sparse choices (SGD, SparseAdagrad, LazyAdam).
DENSE_OPTIMIZER_WARN_ELEMENTS = 50_000_000


@dataclasses.dataclass
class PreparedData:
    """What training needs to know about its data."""

    schema: object
    train_files: list
    eval_files: list
    train_rows: int = None
    eval_rows: int = None
    ceiling_auc: float = None


def prepare_data(data_config, source="<pipeline>", verbose=1):
    """Generate (synthetic, cached) or locate (tfrecord) the data of a pipeline's [data] section.

    Returns:
        PreparedData with the schema, the shard lists, the training row count when known, and the planted
        model's AUC on the eval split (synthetic only).

    Raises:
        ValueError: no files match a train/eval path, naming the pipeline file and the path.
    """

    if data_config.source == "synthetic":
        out_dir = data_config.synthetic_path()
        if verbose:
            print(f"data: synthetic {data_config.dataset}, {data_config.rows:,} train + {data_config.eval_rows:,} "
                  f"eval rows, seed {data_config.seed}, cardinality scale {data_config.cardinality_scale:g} "
                  f"-> {out_dir}", flush=True)
        started = time.perf_counter()
        with _generation_lock(out_dir):
            stats = synthetic.generate(
                out_dir,
                dataset=data_config.dataset,
                rows=data_config.rows,
                eval_rows=data_config.eval_rows,
                seed=data_config.seed,
                cardinality_scale=data_config.cardinality_scale,
            )
        if verbose:
            print(f"data: ready in {time.perf_counter() - started:.1f} s", flush=True)
        return PreparedData(
            schema=Schema.load(out_dir),
            train_files=_match_files(os.path.join(out_dir, "train"), source, "train"),
            eval_files=_match_files(os.path.join(out_dir, "eval"), source, "eval"),
            train_rows=stats["splits"]["train"]["rows"],
            eval_rows=stats["splits"]["eval"]["rows"],
            ceiling_auc=stats["splits"]["eval"].get("ceiling_auc"),
        )
    train_files = _match_files(data_config.train, source, "train")
    eval_files = _match_files(data_config.eval, source, "eval")
    schema_location = data_config.schema or os.path.dirname(train_files[0])
    return PreparedData(schema=Schema.load(schema_location), train_files=train_files, eval_files=eval_files)


@contextlib.contextmanager
def _generation_lock(out_dir):
    """An exclusive flock on `<out_dir>/.generate.lock` while the synthetic data is generated or checked.

    Workers of a multi-worker job on one machine (and any two runs of pipelines sharing a data path) generate
    the same cached dataset at once; without the lock the second to finish fails moving its split onto the
    first's. With it, the second waits and then finds the finished dataset.
    """
    if fcntl is None:
        yield
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".generate.lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _match_files(paths, source, key):
    """TFRecord files named by a directory, a glob or a list of them, sorted; ValueError if none match."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    files = []
    for path in paths:
        if os.path.isdir(path):
            matches = sorted(glob.glob(os.path.join(path, "*.tfrecord")))
        else:
            matches = sorted(glob.glob(path))
        if not matches:
            raise ValueError(f"{source}: [data] {key}: no TFRecord files match {path!r}")
        files.extend(matches)
    return files


def build_model(model_config, schema, embedding_layer, name="model"):
    """The [model] section's architecture on top of `embedding_layer`."""

    if model_config.arch == "dlrm":
        return build_dlrm(schema, embedding_layer, model_config.bottom_mlp, model_config.top_mlp, name=name)
    return build_dcn(
        schema,
        embedding_layer,
        cross_layers=model_config.cross_layers,
        deep_layers=model_config.deep_layers,
        projection_dim=model_config.projection_dim,
        structure=model_config.structure,
        name=name,
    )


def make_optimizer(train_config):
    """The [train] section's optimizer at its learning rate.

    "adagrad" is `tfcompress.optimizers.SparseAdagrad`: Keras' Adagrad results with row-sparse table updates.
    "lazy_adam" is `tfcompress.optimizers.LazyAdam`: Adam that updates only the looked-up rows of a table.
    """

    optimizers = {"sgd": keras.optimizers.SGD, "adagrad": SparseAdagrad, "adam": keras.optimizers.Adam,
                  "lazy_adam": LazyAdam}
    return optimizers[train_config.optimizer](learning_rate=train_config.learning_rate)


def _model_name(pipeline_name):
    """Keras model names must be identifiers-ish; pipeline names may hold dashes or dots."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in pipeline_name) or "model"


class ThroughputCallback(keras.callbacks.Callback):
    """Measures training samples per second from batch end to batch end.

    The first batch of each epoch is not counted: in epoch 1 it includes tracing and compiling the train step, and
    in every epoch it includes starting the input pipeline. Validation runs after the last batch end, so it is not
    counted either.

    Args:
        batch_size: samples per training batch (the reader drops the last partial batch, so this is exact).
    """

    def __init__(self, batch_size):
        super().__init__()
        self.batch_size = int(batch_size)
        self.samples = 0
        self.seconds = 0.0
        self._last_batch_end = None

    def on_epoch_begin(self, epoch, logs=None):
        self._last_batch_end = None

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self._last_batch_end is not None:
            self.samples += self.batch_size
            self.seconds += now - self._last_batch_end
        self._last_batch_end = now

    @property
    def samples_per_s(self):
        return self.samples / self.seconds if self.seconds > 0 else None


class EmbeddingSummaryCallback(keras.callbacks.Callback):
    """Writes what Keras' TensorBoard callback does not know to the same log: per epoch, the embedding's logical,
    physical (trained) and deployed bytes, the compression ratio and training samples/s (from `throughput`).

    Args:
        log_dir: the TensorBoard log directory (these scalars go to its "train" run, next to Keras' loss and AUC).
        plan: the run's `CompressionPlan`.
        throughput: the run's `ThroughputCallback`.
    """

    def __init__(self, log_dir, plan, throughput):
        super().__init__()
        self.log_dir, self.plan, self.throughput = log_dir, plan, throughput

    def on_epoch_end(self, epoch, logs=None):
        writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        with writer.as_default(step=epoch):
            tf.summary.scalar("embedding_logical_bytes", float(self.plan.logical_bytes))
            tf.summary.scalar("embedding_physical_bytes", float(self.plan.physical_bytes))
            tf.summary.scalar("embedding_deployed_bytes", float(self.plan.deployed_parameters * BYTES_PER_PARAMETER))
            tf.summary.scalar("compression_ratio", float(self.plan.ratio))
            if self.throughput.samples_per_s is not None:
                tf.summary.scalar("samples_per_s", self.throughput.samples_per_s)
        writer.close()


def exact_metrics(model, eval_dataset):
    """Exact AUC and log loss of the model on one pass over `eval_dataset` ((features, labels) batches)."""

    if model.distribute_strategy is tf.distribute.get_strategy():
        predict = model.predict_on_batch
    else:
        # Under a MirroredStrategy predict_on_batch hands the whole batch to every replica and concatenates
        # their outputs (twice the rows for two replicas); one plain forward pass reads the mirrored weights once.
        predict = tf.function(lambda features: model(features, training=False))
    labels, probs = [], []
    for features, batch_labels in eval_dataset:
        probs.append(np.asarray(predict(features)).reshape(-1))
        labels.append(np.asarray(batch_labels).reshape(-1))
    labels, probs = np.concatenate(labels), np.concatenate(probs)
    return exact_auc(labels, probs), log_loss(labels, probs)


def configure_cpu_replicas(count):
    """Split the first CPU into `count` logical devices, so MirroredStrategy can run `count` replicas on a CPU.

    Must run before TensorFlow initializes its devices (before the first op or dataset): afterwards TensorFlow
    refuses to change the device list.

    Raises:
        ValueError: count < 1, or TensorFlow's devices are already initialized.
    """

    if int(count) != count or count < 1:
        raise ValueError(f"cpu replicas must be an integer >= 1, got {count!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(count))
    except RuntimeError as error:
        raise ValueError(f"cannot split the CPU into {count} logical devices: {error}") from None


def make_strategy(name):
    """The tf.distribute strategy named by [train] strategy.

    "default": the default strategy (one device). "mirrored": MirroredStrategy over every local GPU, or over every
    logical CPU when there is no GPU (see `configure_cpu_replicas`). "multiworker": MultiWorkerMirroredStrategy,
    which reads the cluster from the TF_CONFIG environment variable; it must be created before other TensorFlow
    work, which is why `train` makes it first.

    Optimizers: an all-reduce of the embedding tables' IndexedSlices gradients concatenates the replicas' slices,
    so the same row can appear several times. SGD adds them correctly; Keras' stock Adagrad does not (it reads the
    accumulator once per duplicate), which is why [train] optimizer "adagrad" is `tfcompress.optimizers.
    SparseAdagrad` and "lazy_adam" is `LazyAdam`: both deduplicate rows before updating.
    """

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        # Without GPUs NCCL is unavailable; reducing on one device works for any device kind.
        cross_device_ops = None if gpus else tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=cross_device_ops)
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy must be one of ['default', 'mirrored', 'multiworker'], got {name!r}")


class NonFiniteLossError(ValueError):
    """Training produced a non-finite loss (or non-finite weights at a checkpoint).

    A ValueError, so that `tfcompress train` prints the message and exits with status 2.
    """


class BackupInUseError(ValueError):
    """Another training run holds the lock of the backup directory (a ValueError: the CLI prints it, exits 2)."""


# Files of a backup directory. The marker says that tfcompress made (or adopted) the directory, so only a marked
# directory is ever cleaned up, and then only of the files below.
BACKUP_MARKER = ".tfcompress-backup"
BACKUP_LOCK = "lock"
BACKUP_METADATA = "training_metadata.json"
# What a backup writes (and what older versions and Keras' BackupAndRestore wrote): an existing directory that
# holds nothing else may be adopted; anything else in it is someone else's and is never touched.
_BACKUP_FILES = re.compile(
    r"(step|partial|best|partial-best)-\d+\.weights\.h5|latest\.weights\.h5(\.bkp)?"
    r"|training_metadata\.json(\.bkp|\.tmp-\d+)?|\.tfcompress-backup(\.tmp-\d+)?|lock")
# Multi-worker: the other workers' backups, in folders of the chief's (each worker owns and cleans up its own).
_TASK_DIRS = re.compile(r"(chief|worker)_\d+")


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # a process of another user, or a pid we cannot check: assume it runs
    return True


def _try_flock(fd):
    """Take an exclusive flock on fd without waiting: True when taken (or flock does not exist here)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        return True  # a file system without flock: the pid check below is all there is
    return True


class TrainingBackup:
    """The backup directory of one training run: created and marked by tfcompress, locked while a run uses it,
    and cleaned up (only of its own files) when the run has saved its results.

    `claim()` creates the directory and writes the marker file `.tfcompress-backup`; an existing directory is
    used only when it carries the marker, or is empty, or holds nothing but backup files (what earlier versions
    wrote). `lock()` takes `lock` in it (pid, host, start time; an exclusive flock while held, which the kernel
    drops when the process dies): a second run of the same backup stops with BackupInUseError naming the holder;
    the lock of a dead process on this host is taken over with a warning. `finish()` deletes the checkpoint files,
    the marker and the lock, and the directory itself only when tfcompress made it and nothing else is in it.

    Args:
        path: the directory.
        where: how errors name the setting, e.g. "pipelines/x.toml: [train] backup_dir".
    """

    def __init__(self, path, where="[train] backup_dir"):
        self.path = path
        self.where = where
        self._lock_fd = None
        self._created = False

    @property
    def metadata_path(self):
        return os.path.join(self.path, BACKUP_METADATA)

    def claim(self):
        """Make the directory ours (create and mark it), or raise ValueError if it belongs to someone else."""
        marker = os.path.join(self.path, BACKUP_MARKER)
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"{self.where}: {self.path} exists and is not a directory")
        if os.path.isdir(self.path):
            if os.path.isfile(marker):
                with open(marker) as f:
                    try:
                        self._created = bool(json.load(f).get("created_directory", False))
                    except ValueError:
                        self._created = False
                return
            foreign = sorted(name for name in os.listdir(self.path)
                             if not (_BACKUP_FILES.fullmatch(name) or _TASK_DIRS.fullmatch(name)))
            if foreign:
                raise ValueError(
                    f"{self.where}: {self.path} is not empty and is not a tfcompress backup directory (it holds "
                    f"{foreign[0]!r}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); training keeps "
                    "its checkpoints in a directory of its own and deletes them when it completes: name a new "
                    "or empty directory")
            self._created = False
        else:
            try:
                os.makedirs(self.path)
            except FileExistsError:
                # Multi-worker: another worker made it at the same moment, as the parent of its own
                # <task>_<i> folder: checked (and used) as an existing directory.
                return self.claim()
            self._created = True
        write_json_atomically(marker, {"written_by": "tfcompress train", "created_directory": self._created,
                                       "time": _now()})

    def lock(self, pipeline_name=None):
        """Take the directory's lock file, or raise BackupInUseError naming the run that holds it."""
        path = os.path.join(self.path, BACKUP_LOCK)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "pipeline": pipeline_name}
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                taken = _try_flock(fd)
                holder = _read_lock(fd)
                if not taken:
                    raise BackupInUseError(self._in_use(holder, path))
                try:
                    current = os.path.samestat(os.fstat(fd), os.stat(path))
                except FileNotFoundError:
                    current = False
                if not current:  # the holder released (deleted) it between our open and flock: open the new one
                    os.close(fd)
                    continue
                if holder:
                    if holder.get("host") != me["host"]:
                        raise BackupInUseError(self._in_use(holder, path) + "; if that run is no longer running, "
                                               f"delete {path}")
                    if holder.get("pid") != me["pid"] and _pid_alive(holder.get("pid")):
                        raise BackupInUseError(self._in_use(holder, path))
                    warnings.warn(
                        f"taking over the stale lock {path} of pid {holder.get('pid')} on {holder.get('host')} "
                        f"(started {holder.get('started')}): that process no longer runs", stacklevel=3)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
            return

    def _in_use(self, holder, path):
        who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
               + (f" (pipeline {holder['pipeline']!r})" if holder.get("pipeline") else "")) if holder else \
            "a process that has not yet written its details"
        return (f"{self.where}: {self.path} is in use by another training run: {who}; lock file {path}. Two runs "
                "of one backup would overwrite each other's checkpoints: wait for that run, stop it, or give this "
                "run another backup_dir (or --runs-dir)")

    def unlock(self):
        """Release the lock (delete the lock file, then drop the flock)."""
        if self._lock_fd is None:
            return
        try:
            os.remove(os.path.join(self.path, BACKUP_LOCK))
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

    def finish(self):
        """The run is saved: delete the checkpoints, the marker and the lock; the directory too when tfcompress
        made it and it is then empty. Files that are not the backup's stay."""
        if os.path.isdir(self.path):
            for name in os.listdir(self.path):
                path = os.path.join(self.path, name)
                if _BACKUP_FILES.fullmatch(name) and name not in (BACKUP_MARKER, BACKUP_LOCK) and os.path.isfile(path):
                    os.remove(path)
            marker = os.path.join(self.path, BACKUP_MARKER)
            if os.path.exists(marker):
                os.remove(marker)
        self.unlock()
        if self._created:
            try:
                os.rmdir(self.path)
            except OSError:
                pass  # something else was put there: it stays, and so does the directory

    def load(self):
        """The metadata of the last checkpoint (a dict), or None when there is none."""
        if not os.path.exists(self.metadata_path):
            return None
        with open(self.metadata_path) as f:
            return json.load(f)


def _read_lock(fd):
    try:
        text = os.pread(fd, 65536, 0).decode()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class TrainingPosition(keras.callbacks.Callback):
    """Where training stands: the epoch, the batches done in it, and the batches trained in all (`step`).

    Fit is called twice on a resumed run (the rest of the interrupted epoch, then whole epochs), so the position
    is kept here instead of being taken from the batch index Keras passes. `step` counts batches, and at every
    epoch end the optimizer's `iterations` is set to it: Keras 3.15's train function also increments `iterations`
    on the call that finds an epoch-sized dataset exhausted (the increment does not wait for the failing read), one
    step too many per epoch.

    Args:
        epoch, epoch_batches, step: the position at the start (a checkpoint's, or zeros).
    """

    def __init__(self, epoch=0, epoch_batches=0, step=0):
        super().__init__()
        self.epoch, self.epoch_batches, self.step = int(epoch), int(epoch_batches), int(step)

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self.epoch:  # a new epoch; the first epoch of a resumed fit continues the recorded one
            self.epoch, self.epoch_batches = epoch, 0

    def on_train_batch_end(self, batch, logs=None):
        self.epoch_batches += 1
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        self.epoch, self.epoch_batches = epoch + 1, 0
        iterations = self.model.optimizer.iterations
        if int(iterations.numpy()) != self.step:
            # The spurious increment at the end of an epoch-sized epoch (see above), which does not always happen
            # under a distribution strategy: undone, so that Adam's bias correction and the pruning period see the
            # number of steps actually taken, and a resumed run the same count as an uninterrupted one.
            iterations.assign(self.step)


NON_FINITE_CAUSES = ("Likely causes: the learning rate ({learning_rate:g} with optimizer {optimizer!r}) is too high "
                     "for this model, or the training data holds NaN, infinite or huge values (dense features, "
                     "labels)")


def check_weights_finite(model, message):
    """NonFiniteLossError(message) when a trainable weight holds NaN or infinity."""
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in model.trainable_variables])
    if not bool(finite):
        raise NonFiniteLossError(message)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises NonFiniteLossError at the first batch whose loss is NaN or infinite, and at the end of an epoch whose
    weights hold NaN or infinity.

    Keras' batch logs carry the epoch's running mean of the loss, which turns non-finite at the first non-finite
    batch loss and stays so. Keras' own TerminateOnNaN only stops quietly, after which the eval metrics fail on
    NaN predictions. Weights can also turn NaN while the loss stays finite (a NaN dense feature poisons the first
    layer's kernel, and the fused ReLU turns the NaN activations into zeros; a huge learning rate saturates the
    output), which is why the weights are checked at every epoch end (and before every checkpoint).

    Args:
        position: the run's `TrainingPosition` (for the step, epoch and batch in the message).
        train_config: the [train] section (learning rate and optimizer in the message).
        source: the pipeline file.
    """

    def __init__(self, position, train_config, source="<pipeline>"):
        super().__init__()
        self.position, self.train_config, self.source = position, train_config, source

    def causes(self):
        return NON_FINITE_CAUSES.format(learning_rate=self.train_config.learning_rate,
                                        optimizer=self.train_config.optimizer)

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(loss)
        if math.isfinite(loss):
            return
        p = self.position
        raise NonFiniteLossError(
            f"{self.source}: training stopped: the loss is {loss} at step {p.step:,} (epoch {p.epoch + 1}, batch "
            f"{p.epoch_batches}); the weights are no longer usable. {self.causes()}")

    def on_epoch_end(self, epoch, logs=None):
        check_weights_finite(self.model, (
            f"{self.source}: training stopped: the weights hold NaN or infinite values at the end of epoch "
            f"{epoch + 1} (step {self.position.step:,}), although the loss looked finite. {self.causes()}"))


class BestEpochCallback(keras.callbacks.Callback):
    """Follows the eval AUC (Keras' `val_auc`) of every epoch: the best epoch for the results, its weights when
    `restore` is set, and early stopping after `patience` epochs without a higher AUC.

    The best weights are kept in memory, or, when the run has a backup directory, in a file there
    (`best-<epoch>.weights.h5`) that the checkpoint metadata names, so that a resumed run still has them.
    Everything is keyed by epoch, so an epoch run again after a resume replaces its own entry.

    Args:
        restore: keep the best epoch's weights (`restore_weights` puts them into the model).
        patience: stop after this many epochs without improvement (None: never).
        backup_dir: where the best weights go (None: memory).
    """

    monitor = "val_auc"

    def __init__(self, restore=False, patience=None, backup_dir=None):
        super().__init__()
        self.restore, self.patience, self.backup_dir = restore, patience, backup_dir
        self.values = {}  # epoch (0-based) -> val_auc
        self.best_weights = None
        self.best_weights_file = None
        self.best_weights_epoch = None
        self.stopped = False

    @property
    def best_epoch(self):
        """The epoch (0-based) of the highest eval AUC, the first of equals; None before any epoch ended."""
        if not self.values:
            return None
        return max(sorted(self.values), key=lambda e: self.values[e] if math.isfinite(self.values[e]) else -1.0)

    @property
    def last_epoch(self):
        return max(self.values) if self.values else None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        self.values = {e: v for e, v in self.values.items() if e < epoch}  # an epoch run again replaces itself
        self.values[epoch] = float(value)
        best = self.best_epoch
        if self.restore and best == epoch:
            self._keep_weights(epoch)
        if self.patience is not None and epoch - best >= self.patience:
            self.stopped = True
            self.model.stop_training = True

    def _keep_weights(self, epoch):
        self.best_weights_epoch = epoch
        if self.backup_dir is None:
            self.best_weights = self.model.get_weights()  # NumPy copies
            return
        name = f"best-{epoch}.weights.h5"
        partial = os.path.join(self.backup_dir, f"partial-best-{epoch}.weights.h5")
        self.model.save_weights(partial, overwrite=True)
        os.replace(partial, os.path.join(self.backup_dir, name))
        self.best_weights_file = name

    def state(self):
        """What a checkpoint records (JSON)."""
        return {"values": {str(e): v for e, v in self.values.items()}, "weights": self.best_weights_file,
                "weights_epoch": self.best_weights_epoch, "stopped": self.stopped}

    def load_state(self, state):
        self.values = {int(e): float(v) for e, v in state.get("values", {}).items()}
        self.best_weights_file = state.get("weights")
        self.best_weights_epoch = state.get("weights_epoch")
        self.stopped = bool(state.get("stopped", False))

    def restore_weights(self, model):
        """Put the best epoch's weights into `model` (the optimizer keeps its state, as with Keras' EarlyStopping);
        False when there are none to restore."""
        if self.best_weights is not None:
            model.set_weights(self.best_weights)
            return True
        if self.best_weights_file is not None:
            # The file holds the optimizer's state of that epoch too: put the current one back after loading.
            state = [np.array(v) for v in model.optimizer.variables] if model.optimizer is not None else []
            model.load_weights(os.path.join(self.backup_dir, self.best_weights_file))
            for variable, value in zip(model.optimizer.variables if state else [], state):
                variable.assign(value)
            return True
        return False


class StepBackupAndRestore(keras.callbacks.Callback):
    """Checkpoints every `save_freq` steps and at every epoch end: weights, optimizer state and the position.

    Keras' BackupAndRestore restores the weights, the optimizer state and the epoch, not the position inside the
    epoch (and deletes its whole directory at the end). This callback records the epoch, the batches done in it
    and the global step (`TrainingPosition`), plus a description of the training stream; `train` restores the
    weights with `restore` and, with `deterministic = true`, feeds the resumed run exactly the batches the
    uninterrupted run would have seen next. It never deletes anything but its own older checkpoint files;
    `TrainingBackup.finish` removes the rest once the run is saved.

    Args:
        backup: the run's `TrainingBackup` (claimed and locked).
        save_freq: steps between checkpoints.
        position: the run's `TrainingPosition`.
        stream: a JSON-able description of the training stream (files, batch size, seed, ...), recorded so that a
            resume can tell whether it sees the same data.
        best: the run's `BestEpochCallback` (its state goes into each checkpoint), or None.
        guard: the run's `StopOnNonFiniteLoss`: with it, weights holding NaN or infinity are never checkpointed
            (NonFiniteLossError instead).
        steps_per_epoch: when known, a checkpoint is not taken at the last batch of an epoch (the epoch-end one
            follows at once).
    """

    def __init__(self, backup, save_freq, position, stream=None, best=None, guard=None, steps_per_epoch=None,
                 keep_previous=False):
        super().__init__()
        self.backup, self.save_freq, self.position = backup, int(save_freq), position
        self.keep_previous = keep_previous
        self.stream, self.best, self.guard, self.steps_per_epoch = stream, best, guard, steps_per_epoch

    @property
    def backup_dir(self):
        return self.backup.path

    def on_train_batch_end(self, batch, logs=None):
        if self.position.step % self.save_freq == 0 and self.position.epoch_batches != self.steps_per_epoch:
            self._save_model()

    def on_epoch_end(self, epoch, logs=None):
        self._save_model()

    def _save_model(self):
        # Each checkpoint's weights go to a file of their own (step-N.weights.h5, renamed into place when
        # complete), and the metadata, which names that file and records the position, is replaced atomically
        # last: at any kill it points at complete weights of its own step.
        if self.guard is not None:
            check_weights_finite(self.model, (
                f"{self.guard.source}: training stopped: the weights hold NaN or infinite values at step "
                f"{self.position.step:,} (epoch {self.position.epoch + 1}), although the loss looked finite; not "
                f"checkpointed (the last checkpoint in {self.backup_dir} is from before). {self.guard.causes()}"))
        step = int(self.model.optimizer.iterations.numpy())
        weights = f"step-{step}.weights.h5"
        partial = os.path.join(self.backup_dir, f"partial-{step}.weights.h5")
        self.model.save_weights(partial, overwrite=True)
        os.replace(partial, os.path.join(self.backup_dir, weights))
        metadata = {"epoch": self.position.epoch, "epoch_batches": self.position.epoch_batches,
                    "batches": self.position.step, "step": step, "weights": weights, "stream": self.stream}
        if self.best is not None:
            metadata["best"] = self.best.state()
        previous = self.backup.load() if self.keep_previous else None
        if previous is not None and previous.get("weights") != weights:
            # Multi-worker: a worker killed while the others checkpoint may have missed the newest checkpoint;
            # the one before lets the restarted job resume where every worker has one (multiworker.
            # common_checkpoint).
            previous.pop("previous", None)
            metadata["previous"] = previous
        write_json_atomically(self.backup.metadata_path, metadata)
        keep = {weights, metadata.get("best", {}).get("weights")}
        if "previous" in metadata:
            keep |= {metadata["previous"].get("weights"), metadata["previous"].get("best", {}).get("weights")}
        for name in os.listdir(self.backup_dir):  # older checkpoints, and any partial file of a killed save
            if name.endswith(".weights.h5") and name not in keep:
                os.remove(os.path.join(self.backup_dir, name))

    def restore(self, model, metadata):
        """Load the checkpoint that `metadata` (TrainingBackup.load) describes into `model`."""
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)  # its slots must exist to be restored
        model.load_weights(os.path.join(self.backup_dir, metadata["weights"]))

    @staticmethod
    def saved_step(backup_dir):
        """The global step of the checkpoint in `backup_dir` (0 when there is none)."""
        path = os.path.join(backup_dir, BACKUP_METADATA)
        if not os.path.exists(path):
            return 0
        with open(path) as f:
            return int(json.load(f).get("step", 0))


def _checkpoint_position(metadata, steps_per_epoch):
    """(epoch, batches done in it, batches trained, exact) of a checkpoint's metadata; `exact` is False for
    metadata of older versions that did not record the batches of an epoch-sized run."""
    if "epoch_batches" in metadata:
        return int(metadata["epoch"]), int(metadata["epoch_batches"]), int(metadata["batches"]), True
    step = int(metadata.get("step", 0))  # older metadata: the optimizer's step, one per batch with a known length
    if steps_per_epoch:
        return step // steps_per_epoch, step % steps_per_epoch, step, True
    return int(metadata.get("epoch", 0)), 0, step, False


def _pruning_callbacks(pipeline, model):
    """A ChunkPruningCallback when the model has chunk-pruned tables: without it they are never pruned."""

    if not chunk_pruned_layers(model):
        return []
    period = pipeline.compression.pruning_period
    if period is None:
        raise ValueError(f"{pipeline.source}: [compression] pruning_period: method 'pruned' needs the number of "
                         "steps between pruning events, e.g. pruning_period = 1000")
    return [ChunkPruningCallback(period=period)]


def _warn_if_optimizer_densifies(optimizer_name, model):
    if optimizer_name != "adam":
        return
    large = sum(int(v.shape.num_elements() or 0) for v in model.trainable_variables if len(v.shape) == 2)
    if large > DENSE_OPTIMIZER_WARN_ELEMENTS:
        warnings.warn(
            f"optimizer {optimizer_name!r} updates every element of the embedding tables each step in Keras 3 "
            f"({large:,} floats here), which is slow for large full tables; optimizer = \"sgd\", \"adagrad\" or "
            "\"lazy_adam\" keeps the update sparse",
            stacklevel=3,
        )


def _backup_for(config, pipeline, runs_dir, strategy):
    """The run's `TrainingBackup` (None without [train] checkpoint_every_steps)."""
    if config.checkpoint_every_steps is None:
        return None
    path = config.backup_dir or os.path.join(runs_dir, pipeline.name, "backup")
    if not strategy.extended.should_checkpoint:
        # Multi-worker: the chief checkpoints into backup_dir, every other worker into a folder of its own in it.
        task = strategy.cluster_resolver
        path = os.path.join(path, f"{task.task_type}_{task.task_id}")
    return TrainingBackup(path, where=f"{pipeline.source}: [train] backup_dir")


def _stream_description(pipeline, data, global_batch_size, steps_per_epoch, replicas):
    """What decides the order of the training batches: a resume that sees the same is exact (deterministic)."""
    config = pipeline.train
    return {"pipeline": pipeline.name, "train_files": [os.path.abspath(f) for f in data.train_files],
            "global_batch_size": global_batch_size, "steps_per_epoch": steps_per_epoch, "seed": config.seed,
            "deterministic": config.deterministic, "replicas": replicas}


def _check_resume(backup, metadata, stream, config, exact_position, exact_strategy=False):
    """ValueError for another pipeline's checkpoint; a warning for each reason the resume will not be exact."""
    recorded = metadata.get("stream") or {}
    if recorded.get("pipeline") not in (None, stream["pipeline"]):
        raise ValueError(f"{backup.where}: {backup.path} holds a checkpoint of pipeline {recorded['pipeline']!r}, "
                         f"not {stream['pipeline']!r}; give this pipeline its own backup_dir")
    reasons = []
    if not config.deterministic:
        reasons.append("[train] deterministic is false, so the reader's order differs from run to run")
    if config.strategy != "default" and not exact_strategy:
        reasons.append(f"strategy {config.strategy!r} rebuilds the input pipeline per replica, and the batches after "
                       "the skipped ones are not guaranteed to be the uninterrupted run's (exact with strategy "
                       "\"default\")")
    if not exact_position:
        reasons.append("the checkpoint (written by an older tfcompress) does not record the batches done in its "
                       "epoch; the epoch restarts from its first batch")
    changed = sorted(k for k in stream if k in recorded and k != "pipeline" and recorded[k] != stream[k])
    if changed:
        reasons.append("the training stream differs from the checkpointed run's in " + ", ".join(changed))
    if reasons:
        warnings.warn(f"resuming from {backup.path} will not give the weights of an uninterrupted run: "
                      + "; ".join(reasons), stacklevel=3)


def train(pipeline, runs_dir="runs", verbose=1):
    """Train and evaluate one pipeline.

    Args:
        pipeline: a validated `tfcompress.pipeline.Pipeline`.
        runs_dir: the model is saved to `<runs_dir>/<pipeline name>/model.keras` (with results.json).
        verbose: 0 silent, 1 progress bar and per-epoch metrics, 2 one line per epoch.

    Returns:
        dict with name, method, logical_bytes, physical_bytes (the trained embedding), deployed_bytes (after
        export's rewrites: MLET folds to n*d), ratio (logical / physical), deployed_ratio, auc, log_loss (exact, on
        the eval split, of the saved weights), ceiling_auc (synthetic data: the planted model's AUC on the eval
        split; else None), train_samples_per_s, epochs (planned), epochs_run, best_epoch (1-based, highest eval
        AUC), best_val_auc, last_val_auc (Keras' per-epoch eval AUC), restored_best (the saved weights are the
        best epoch's), stopped_early, last_auc, last_log_loss (exact, of the last epoch's weights), replicas,
        global_batch_size, model_path (None when [train] save_model = false), train_seconds and history (Keras'
        per-epoch loss/auc/log_loss and val_ metrics of the epochs this process trained).

    Raises:
        ValueError: bad data paths or compression options (named with the pipeline file and section); a backup
            directory that is not tfcompress's.
        BackupInUseError: another run holds the backup directory's lock.
        NonFiniteLossError: the loss turned NaN or infinite (the message names the step and the likely causes).
    """

    config = pipeline.train
    watchdog = None
    if config.strategy == "multiworker":
        # A malformed TF_CONFIG fails here, naming the key, before TensorFlow reads it; joining the cluster (and,
        # on Keras 3, every training step) is timed, so that a worker that never answers fails the job.
        cluster, task_type, task_index = multiworker.check_tf_config()
        watchdog = multiworker.ClusterWatchdog(cluster, task_type, task_index, config.cluster_timeout_s,
                                               source=pipeline.source)
    try:
        # First: MultiWorkerMirroredStrategy must exist before any other TensorFlow work.
        with watchdog.phase("joining the cluster") if watchdog else contextlib.nullcontext():
            strategy = make_strategy(config.strategy)
        backup = _backup_for(config, pipeline, runs_dir, strategy)
        if backup is None:
            return _train(pipeline, strategy, None, runs_dir, verbose, watchdog)
        # Before the data step: a directory that is not ours, or one another run is using, stops this run at once.
        backup.claim()
        backup.lock(pipeline.name)
        try:
            return _train(pipeline, strategy, backup, runs_dir, verbose, watchdog)
        finally:
            backup.unlock()  # finish() has already done so when the run completed
    finally:
        if watchdog is not None:
            watchdog.stop()


def _train(pipeline, strategy, backup, runs_dir, verbose, watchdog=None):
    config = pipeline.train
    # Keras 3's fit cannot train with several MultiWorkerMirroredStrategy workers: tfcompress.multiworker's loop
    # does (with one worker too, so that a one-worker run is the same code); legacy tf.keras keeps fit.
    own_loop = config.strategy == "multiworker" and not USING_LEGACY_KERAS

    def collective(what):
        return watchdog.phase(what) if watchdog is not None else contextlib.nullcontext()
    replicas = strategy.num_replicas_in_sync
    global_batch_size = config.batch_size * replicas
    data = prepare_data(pipeline.data, pipeline.source, verbose)
    keras.utils.set_random_seed(config.seed)
    try:
        plan = make_plan(data.schema.cardinalities, pipeline.model.embedding_dim, **pipeline.compression.plan_kwargs())
    except ValueError as error:
        raise ValueError(f"{pipeline.source}: [compression]: {error}") from None
    # Variables made in the scope are mirrored on every replica; compile's optimizer and metrics too.
    with strategy.scope(), collective("building the model (every worker starts from worker 0's initial weights)"):
        model = build_model(pipeline.model, data.schema, plan.build_layer(), name=_model_name(pipeline.name))
        _warn_if_optimizer_densifies(config.optimizer, model)
        model.compile(
            optimizer=make_optimizer(config),
            loss=keras.losses.BinaryCrossentropy(),
            metrics=[
                keras.metrics.AUC(num_thresholds=AUC_THRESHOLDS, name="auc"),
                keras.metrics.BinaryCrossentropy(name="log_loss"),
            ],
        )
    if verbose:
        deployed = plan.deployed_parameters * BYTES_PER_PARAMETER
        print(f"model: {pipeline.model.arch}, embeddings {plan.method}: logical {format_bytes(plan.logical_bytes)} "
              f"-> trained {format_bytes(plan.physical_bytes)} ({plan.ratio:,.1f}x)"
              + (f", deployed {format_bytes(deployed)} ({plan.deployed_ratio:,.1f}x)"
                 if plan.deployed_parameters != plan.physical_parameters else "")
              + f", {model.count_params():,} parameters; strategy {config.strategy}, {replicas} replica(s), "
              f"global batch {global_batch_size:,}", flush=True)

    # With a known step count (synthetic data: known rows) the stream repeats and Keras runs steps_per_epoch steps
    # per epoch; without one (TFRecords) each epoch is one pass over the data.
    steps_per_epoch = config.steps_per_epoch
    if steps_per_epoch is None and data.train_rows:
        steps_per_epoch = max(1, data.train_rows // global_batch_size)

    def train_input(input_context=None):
        return read(data.train_files, config.batch_size, schema=data.schema, shuffle=True,
                    repeat=steps_per_epoch is not None, seed=config.seed, drop_remainder=True,
                    deterministic=config.deterministic, input_context=input_context)

    def training_data(skip_batches=0, earlier_epochs=0):
        """The training data of one fit call: `skip_batches` global batches left out at its start, and
        `earlier_epochs` passes' worth of iterators made and dropped first.

        The reader reshuffles on every new iterator, in an order fixed by the seed (deterministic = true), so the
        k-th iterator made of a fresh dataset always gives the same order. Keras' fit makes one iterator for its
        symbolic build under a distribution strategy and discards it; on the default strategy one is made and
        dropped here, so that a seed gives the same batches with any strategy (and a 2-replica run equals a
        one-device run). An epoch-sized run makes a new iterator per epoch, so epoch e trains on the (e+2)-th
        iterator; a resumed run that starts at epoch e drops e more first.
        """
        def make(input_context=None):
            dataset = train_input(input_context)
            if skip_batches:
                # Each input pipeline feeds replicas / pipelines replicas per step.
                pipelines = input_context.num_input_pipelines if input_context is not None else 1
                dataset = dataset.skip(skip_batches * (replicas // pipelines))
            return dataset

        if own_loop:
            def make_for_worker(input_context):
                if not config.deterministic:
                    # Each worker reads its own files (or records) of the training data.
                    return make(input_context)
                # Deterministic: every worker reads the whole stream in per-replica batches and keeps its own
                # replicas' consecutive batches of every global batch, so that a global batch holds the rows of a
                # one-device run's batch of the same global size, whatever the number of workers (exact equality
                # with a one-worker run and exact resumes, at the cost of each worker parsing all rows).
                workers, worker = input_context.num_input_pipelines, input_context.input_pipeline_id
                local = input_context.num_replicas_in_sync // workers
                dataset = train_input(None)
                if skip_batches:
                    dataset = dataset.skip(skip_batches * replicas)
                if local > 1:
                    return dataset.batch(local, drop_remainder=True).shard(workers, worker).unbatch()
                return dataset.shard(workers, worker)

            # One iterator made and dropped, as with the default strategy (see above): same batches as fit's.
            dataset = strategy.distribute_datasets_from_function(make_for_worker)
            for _ in range(1 + earlier_epochs):
                iter(dataset)
            return lambda: dataset
        if config.strategy == "default":
            dataset = make()
            drops = 1 + earlier_epochs
        else:
            # One input pipeline per worker, sharded by the input context; read() takes the per-replica batch.
            dataset = strategy.distribute_datasets_from_function(make)
            drops = earlier_epochs
        for _ in range(drops):
            iter(dataset)  # made and dropped at once
        return dataset

    eval_dataset = read(data.eval_files, config.eval_batch_size, schema=data.schema, shuffle=False, repeat=False,
                        deterministic=True)
    if config.strategy != "default":
        # Keras distributes validation data itself; sharding it by file fails with fewer files than workers,
        # by element works with any number (each worker evaluates every num_workers-th batch).
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        eval_dataset = eval_dataset.with_options(options)
    if data.eval_rows:
        # A known length gives the validation progress bar its total.
        eval_dataset = eval_dataset.apply(
            tf.data.experimental.assert_cardinality(-(-data.eval_rows // config.eval_batch_size)))

    best = BestEpochCallback(restore=config.restore_best, patience=config.patience,
                             backup_dir=backup.path if backup is not None else None)
    position = TrainingPosition()
    guard = StopOnNonFiniteLoss(position, config, pipeline.source)
    checkpoints = None
    if backup is not None:
        stream = _stream_description(pipeline, data, global_batch_size, steps_per_epoch, replicas)
        checkpoints = StepBackupAndRestore(backup, config.checkpoint_every_steps, position, stream=stream, best=best,
                                           guard=guard, steps_per_epoch=steps_per_epoch, keep_previous=own_loop)
        metadata = backup.load()
        if own_loop and multiworker.worker_count(strategy) > 1:
            with collective("agreeing on the checkpoint to resume from"):
                metadata = multiworker.common_checkpoint(strategy, metadata, backup.path, pipeline.source)
        if metadata is not None:
            epoch, epoch_batches, batches, exact_position = _checkpoint_position(metadata, steps_per_epoch)
            _check_resume(backup, metadata, stream, config, exact_position,
                          exact_strategy=own_loop and config.deterministic)
            with strategy.scope():  # the optimizer's slots are made here: mirrored variables of the strategy
                checkpoints.restore(model, metadata)
            best.load_state(metadata.get("best") or {})
            position.epoch, position.epoch_batches, position.step = epoch, epoch_batches, batches
            if verbose:
                print(f"resuming from the checkpoint at step {int(metadata.get('step', batches)):,} in {backup.path} "
                      f"(epoch {epoch + 1}, {epoch_batches:,} batches into it)", flush=True)

    throughput = ThroughputCallback(global_batch_size)
    callbacks = [position, guard, throughput]
    callbacks += _pruning_callbacks(pipeline, model)
    if config.tensorboard:
        # Loss, AUC and log loss per epoch from Keras, plus bytes, ratio and samples/s: `tensorboard --logdir runs`.
        log_dir = os.path.join(runs_dir, pipeline.name, "tensorboard")
        if own_loop and not strategy.extended.should_checkpoint:
            # Only the chief writes the run's log; the other workers write logs of their own next to it.
            task = strategy.cluster_resolver
            log_dir = os.path.join(log_dir, f"{task.task_type}_{task.task_id}")
        callbacks += [keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False),
                      EmbeddingSummaryCallback(log_dir, plan, throughput)]
    callbacks.append(best)  # before the checkpoints: each records the best epoch as of its own epoch end
    if checkpoints is not None:
        callbacks.append(checkpoints)

    def fit(dataset, first_epoch, end_epoch, steps):
        if own_loop:
            return multiworker.fit_multiworker(
                model, strategy, dataset, end_epoch, steps, global_batch_size, callbacks,
                evaluate=lambda m: exact_metrics(m, eval_dataset), initial_epoch=first_epoch, watchdog=watchdog,
                verbose=verbose)
        with warnings.catch_warnings():
            # Keras warns "input ran out of data" whenever a dataset of unknown length ends, which is how a single
            # pass (validation, or an epoch-sized run) is meant to end here; a repeating stream never runs out.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            return model.fit(dataset, initial_epoch=first_epoch, epochs=end_epoch, steps_per_epoch=steps,
                             validation_data=eval_dataset, callbacks=callbacks, verbose=verbose,
                             shuffle=False)  # the reader shuffles

    # A run resumed inside an epoch finishes that epoch in a fit of its own (Keras' epochs all have one length),
    # on the batches the uninterrupted run had left in it; then whole epochs follow.
    histories = []
    started = time.perf_counter()
    epoch, done = position.epoch, position.epoch_batches
    if done and epoch < config.epochs and not best.stopped:
        if steps_per_epoch is not None:
            # The repeating stream, less the steps already taken (an epoch's worth of steps from each epoch).
            histories.append(fit(training_data(skip_batches=position.step), epoch, epoch + 1, steps_per_epoch - done))
        else:
            histories.append(fit(training_data(skip_batches=done, earlier_epochs=epoch), epoch, epoch + 1, None))
        epoch += 1
    if epoch < config.epochs and not best.stopped:
        if steps_per_epoch is not None:
            dataset = training_data(skip_batches=epoch * steps_per_epoch)
        else:
            dataset = training_data(earlier_epochs=epoch)
        histories.append(fit(dataset, epoch, config.epochs, steps_per_epoch))
    train_seconds = time.perf_counter() - started

    history = {}
    for h in histories:
        for key, values in h.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
    last_auc, last_loss = exact_metrics(model, eval_dataset)
    auc, loss = last_auc, last_loss
    restored = False
    if config.restore_best and best.best_epoch is not None and best.best_epoch != best.last_epoch:
        restored = best.restore_weights(model)
        if restored:
            auc, loss = exact_metrics(model, eval_dataset)

    result = {
        "name": pipeline.name,
        "method": plan.method,
        "logical_bytes": plan.logical_bytes,
        "physical_bytes": plan.physical_bytes,
        "deployed_bytes": plan.deployed_parameters * BYTES_PER_PARAMETER,
        "ratio": plan.ratio,
        "deployed_ratio": plan.deployed_ratio,
        "auc": auc,
        "log_loss": loss,
        "ceiling_auc": data.ceiling_auc,
        "train_samples_per_s": throughput.samples_per_s,
        "epochs": config.epochs,
        "epochs_run": None if best.last_epoch is None else best.last_epoch + 1,
        "best_epoch": None if best.best_epoch is None else best.best_epoch + 1,
        "best_val_auc": None if best.best_epoch is None else best.values[best.best_epoch],
        "last_val_auc": None if best.last_epoch is None else best.values[best.last_epoch],
        "restored_best": restored,
        "stopped_early": best.stopped,
        "last_auc": last_auc,
        "last_log_loss": last_loss,
        "replicas": replicas,
        "global_batch_size": global_batch_size,
        "train_seconds": train_seconds,
        # Keras' per-epoch metrics (val_auc is the 10,000-threshold approximation; auc above is exact).
        "history": history,
        "model_path": None,
    }
    run_dir = os.path.join(runs_dir, pipeline.name)
    if not strategy.extended.should_checkpoint:
        # Multi-worker: every worker holds the same weights; the chief writes runs/<name>/, the others a folder
        # of their own so that no two processes write one file.
        task = strategy.cluster_resolver
        run_dir = os.path.join(run_dir, f"{task.task_type}_{task.task_id}")
    os.makedirs(run_dir, exist_ok=True)
    if config.save_model:
        result["model_path"] = os.path.join(run_dir, "model.keras")
        model.save(result["model_path"])
    write_atomically(os.path.join(run_dir, "results.json"),
                     json.dumps({"result": result, "pipeline": pipeline.to_dict(), "plan": plan.to_dict()}, indent=2,
                                default=str) + "\n")
    if backup is not None:
        backup.finish()  # only now: a kill before this point resumes from the last checkpoint
    if verbose:
        print(f"{pipeline.name}: exact eval AUC {auc:.4f}, log loss {loss:.4f}"
              + (f" (ceiling AUC {data.ceiling_auc:.4f})" if data.ceiling_auc is not None else "")
              + (f"; weights of the best epoch, {result['best_epoch']} of {result['epochs_run']} (last epoch: AUC "
                 f"{last_auc:.4f})" if restored else ""), flush=True)
    return result


def format_results_table(results):
    """Side-by-side table of `train` results: one row per pipeline.

    Columns: pipeline, method, the embedding's logical, trained and deployed bytes (they differ where export
    rewrites the tables: MLET trains n*k + k*d floats per table and deploys n*d), ratio (logical / deployed, what
    a pipeline's ratio or budget is met by), exact AUC and log loss on the eval split of the saved weights, the
    ceiling AUC (planted model, synthetic data), the best and the last epoch (by Keras' eval AUC) with their eval
    AUCs, which of the two the saved weights are (best with [train] restore_best), and training samples/s.
    """
    header = ("pipeline", "method", "logical", "trained", "deployed", "ratio", "AUC", "log loss", "ceiling AUC",
              "epoch best/last", "val AUC best/last", "weights", "samples/s")

    def auc_cell(value):
        return "-" if value is None else f"{value:.4f}"

    rows = []
    for r in results:
        deployed = r.get("deployed_bytes", r["physical_bytes"])
        best, last = r.get("best_epoch"), r.get("epochs_run")
        rows.append((
            r["name"],
            r["method"],
            format_bytes(r["logical_bytes"]),
            format_bytes(r["physical_bytes"]),
            format_bytes(deployed),
            f"{r['logical_bytes'] / deployed:,.1f}x",
            f"{r['auc']:.4f}",
            f"{r['log_loss']:.4f}",
            auc_cell(r.get("ceiling_auc")),
            "-" if best is None else f"{best}/{last}",
            "-" if best is None else f"{auc_cell(r.get('best_val_auc'))}/{auc_cell(r.get('last_val_auc'))}",
            "best" if r.get("restored_best") else "last",
            "-" if r.get("train_samples_per_s") is None else f"{r['train_samples_per_s']:,.0f}",
        ))
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        # Text columns left-aligned, numbers right-aligned.
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in rows])
