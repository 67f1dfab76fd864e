"""Train one pipeline end to end: data -> compression plan -> model -> Keras fit -> exact metrics -> saved model.

Example::

    from tfcompress.pipeline import load_pipeline
    from tfcompress.train import train, format_results_table

    result = train(load_pipeline("pipelines/synthetic_dlrm_robe.toml"))
    print(format_results_table([result]))
"""

import dataclasses
import glob
import json
import os
import time
import warnings

import numpy as np
import tensorflow as tf

from tfcompress._files import write_json_atomically
from tfcompress._keras import USING_LEGACY_KERAS, keras
from tfcompress.chunk_pruning import ChunkPruningCallback, chunk_pruned_layers
from tfcompress.data import read, synthetic
from tfcompress.data.schema import Schema
from tfcompress.metrics import exact_auc, log_loss
from tfcompress.models import build_dcn, build_dlrm
from tfcompress.optimizers import LazyAdam, SparseAdagrad
from tfcompress.plan import make_plan
from tfcompress.sizes import format_bytes

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
    """Writes what Keras' TensorBoard callback does not know to the same log: per epoch, the embedding's logical and
    physical bytes, the compression ratio and training samples/s (from `throughput`).

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


class StepBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore that also checkpoints at every epoch end and records the global step.

    Keras restores the weights, the optimizer state and the epoch, not the position inside the epoch. `train`
    reads the recorded step (`saved_step`) before fitting, skips that many batches of its (deterministic,
    repeating) training stream and stops after the planned total number of steps, so a resumed run sees exactly
    the batches the uninterrupted run would have seen.

    Args:
        backup_dir: the checkpoint directory (deleted when training completes).
        save_freq: steps between checkpoints.
    """

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self._save_model()

    def _save_model(self):
        # Keras writes the weights and then the metadata in place, so a kill between (or during) the two writes
        # leaves weights and metadata of different steps. Here each checkpoint's weights go to a file of their
        # own (step-N.weights.h5, renamed into place when complete), and the metadata, which names that file
        # and records the step, is replaced atomically last: at any kill it points at complete weights of its
        # own step.
        os.makedirs(self.backup_dir, exist_ok=True)
        step = int(self.model.optimizer.iterations.numpy())
        weights = f"step-{step}.weights.h5"
        partial = os.path.join(self.backup_dir, f"partial-{step}.weights.h5")
        self.model.save_weights(partial, overwrite=True)
        os.replace(partial, os.path.join(self.backup_dir, weights))
        metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen, "step": step, "weights": weights}
        write_json_atomically(self._training_metadata_path, metadata)
        for name in os.listdir(self.backup_dir):  # older checkpoints, and any partial file of a killed save
            if name.endswith(".weights.h5") and name != weights:
                os.remove(os.path.join(self.backup_dir, name))

    def _load_model(self):
        if not os.path.exists(self._training_metadata_path):
            return
        with open(self._training_metadata_path) as f:
            metadata = json.load(f)
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)  # its slots must exist to be restored
        self.model.load_weights(os.path.join(self.backup_dir, metadata["weights"]))
        self.model._initial_epoch = metadata["epoch"]

    @staticmethod
    def saved_step(backup_dir):
        """The global step of the checkpoint in `backup_dir` (0 when there is none)."""
        path = os.path.join(backup_dir, "training_metadata.json")
        if not os.path.exists(path):
            return 0
        with open(path) as f:
            return int(json.load(f).get("step", 0))


class StopAtStep(keras.callbacks.Callback):
    """Stops fit once the optimizer has taken `total_steps` steps (a resumed run starts part-way into an epoch)."""

    def __init__(self, total_steps):
        super().__init__()
        self.total_steps = int(total_steps)

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.total_steps:
            self.model.stop_training = True


def _check_multiworker_supported(strategy):
    """ValueError for MultiWorkerMirroredStrategy with several workers under Keras 3.

    Keras 3's fit (checked with 3.15) reduces its first batch and its per-step logs with collective reductions
    that MultiWorkerMirroredStrategy rejects as soon as there are two workers; legacy tf.keras (tf_keras) trains
    the same pipelines across workers.
    """

    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or USING_LEGACY_KERAS:
        return
    cluster = resolver.cluster_spec().as_dict()
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    if workers > 1:
        raise ValueError(
            f"[train] strategy \"multiworker\" with {workers} workers needs legacy tf.keras: Keras 3's fit cannot "
            "reduce its batches and logs across workers; set TF_USE_LEGACY_KERAS=1 (with tf_keras installed)")


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


def train(pipeline, runs_dir="runs", verbose=1):
    """Train and evaluate one pipeline.

    Args:
        pipeline: a validated `tfcompress.pipeline.Pipeline`.
        runs_dir: the model is saved to `<runs_dir>/<pipeline name>/model.keras` (with results.json).
        verbose: 0 silent, 1 progress bar and per-epoch metrics, 2 one line per epoch.

    Returns:
        dict with name, method, logical_bytes, physical_bytes, ratio, auc, log_loss (exact, on the eval split),
        ceiling_auc (synthetic data: the planted model's AUC on the eval split; else None), train_samples_per_s,
        epochs, replicas, global_batch_size, model_path (None when [train] save_model = false), train_seconds and
        history (Keras' per-epoch loss/auc/log_loss and val_ metrics).

    Raises:
        ValueError: bad data paths or compression options (named with the pipeline file and section).
    """

    config = pipeline.train
    # First: MultiWorkerMirroredStrategy must exist before any other TensorFlow work.
    strategy = make_strategy(config.strategy)
    _check_multiworker_supported(strategy)
    replicas = strategy.num_replicas_in_sync
    global_batch_size = config.batch_size * replicas
    data = prepare_data(pipeline.data, pipeline.source, verbose)
    keras.utils.set_random_seed(config.seed)
    try:
        plan = make_plan(data.schema.cardinalities, pipeline.model.embedding_dim, **pipeline.compression.plan_kwargs())
    except ValueError as error:
        raise ValueError(f"{pipeline.source}: [compression]: {error}") from None
    # Variables made in the scope are mirrored on every replica; compile's optimizer and metrics too.
    with strategy.scope():
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
        print(f"model: {pipeline.model.arch}, embeddings {plan.method}: logical {format_bytes(plan.logical_bytes)} "
              f"-> physical {format_bytes(plan.physical_bytes)} ({plan.ratio:,.1f}x), "
              f"{model.count_params():,} parameters; strategy {config.strategy}, {replicas} replica(s), "
              f"global batch {global_batch_size:,}", flush=True)

    steps_per_epoch = config.steps_per_epoch
    if steps_per_epoch is None and data.train_rows:
        steps_per_epoch = max(1, data.train_rows // global_batch_size)
    backup_dir = None
    resume_step = 0
    if config.checkpoint_every_steps is not None:
        backup_dir = config.backup_dir or os.path.join(runs_dir, pipeline.name, "backup")
        if steps_per_epoch is not None:
            resume_step = StepBackupAndRestore.saved_step(backup_dir)
        if verbose and resume_step:
            print(f"resuming from the checkpoint at step {resume_step:,} in {backup_dir}", flush=True)

    def train_input(input_context=None):
        # With a known step count the stream repeats (Keras shows an ETA); without one each epoch is one pass.
        dataset = read(data.train_files, config.batch_size, schema=data.schema, shuffle=True,
                       repeat=steps_per_epoch is not None, seed=config.seed, drop_remainder=True,
                       deterministic=config.deterministic, input_context=input_context)
        if resume_step:
            # The batches the checkpointed run already trained on: each input pipeline feeds
            # replicas / pipelines replicas per step.
            pipelines = input_context.num_input_pipelines if input_context is not None else 1
            dataset = dataset.skip(resume_step * (replicas // pipelines))
        return dataset

    if config.strategy == "default":
        train_dataset = train_input()
        # Under a distribution strategy Keras' fit makes one iterator of the training data for its symbolic build
        # and discards it before making its own, and the reader reshuffles on every new iterator, so fit trains
        # on the data's second shuffle order. Discarding one iterator here too gives the same seed the same
        # batches with any strategy (and a 2-replica run equals a one-device run).
        iter(train_dataset)  # made and dropped at once
    else:
        # One input pipeline per worker, sharded by the input context; read() takes the per-replica batch.
        train_dataset = strategy.distribute_datasets_from_function(train_input)
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
    throughput = ThroughputCallback(global_batch_size)
    callbacks = [throughput] + _pruning_callbacks(pipeline, model)
    if config.tensorboard:
        # Loss, AUC and log loss per epoch from Keras, plus bytes, ratio and samples/s: `tensorboard --logdir runs`.
        log_dir = os.path.join(runs_dir, pipeline.name, "tensorboard")
        callbacks += [keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False),
                      EmbeddingSummaryCallback(log_dir, plan, throughput)]
    if backup_dir is not None:
        callbacks.append(StepBackupAndRestore(backup_dir, save_freq=config.checkpoint_every_steps))
        if steps_per_epoch is not None:
            callbacks.append(StopAtStep(config.epochs * steps_per_epoch))
    started = time.perf_counter()
    with warnings.catch_warnings():
        # Keras warns "input ran out of data" whenever a dataset of unknown length ends, which is how a single
        # pass (validation, or training without steps_per_epoch) is meant to end here; a repeating training
        # stream never runs out.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        history = model.fit(
            train_dataset,
            epochs=config.epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=eval_dataset,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the reader shuffles
        )
    train_seconds = time.perf_counter() - started
    auc, loss = exact_metrics(model, eval_dataset)

    result = {
        "name": pipeline.name,
        "method": plan.method,
        "logical_bytes": plan.logical_bytes,
        "physical_bytes": plan.physical_bytes,
        "ratio": plan.ratio,
        "auc": auc,
        "log_loss": loss,
        "ceiling_auc": data.ceiling_auc,
        "train_samples_per_s": throughput.samples_per_s,
        "epochs": config.epochs,
        "replicas": replicas,
        "global_batch_size": global_batch_size,
        "train_seconds": train_seconds,
        # Keras' per-epoch metrics (val_auc is the 10,000-threshold approximation; auc above is exact).
        "history": {key: [float(v) for v in values] for key, values in history.history.items()},
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
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({"result": result, "pipeline": pipeline.to_dict(), "plan": plan.to_dict()}, f, indent=2,
                  default=str)
        f.write("\n")
    if verbose:
        print(f"{pipeline.name}: exact eval AUC {auc:.4f}, log loss {loss:.4f}"
              + (f" (ceiling AUC {data.ceiling_auc:.4f})" if data.ceiling_auc is not None else ""), flush=True)
    return result


def format_results_table(results):
    """Side-by-side table of `train` results: one row per pipeline.

    Columns: pipeline, method, logical and physical embedding bytes, achieved ratio, exact AUC and log loss on the
    eval split, the ceiling AUC (planted model, synthetic data) and training samples/s.
    """
    header = ("pipeline", "method", "logical", "physical", "ratio", "AUC", "log loss", "ceiling AUC", "samples/s")
    rows = [
        (
            r["name"],
            r["method"],
            format_bytes(r["logical_bytes"]),
            format_bytes(r["physical_bytes"]),
            f"{r['ratio']:,.1f}x",
            f"{r['auc']:.4f}",
            f"{r['log_loss']:.4f}",
            "-" if r.get("ceiling_auc") is None else f"{r['ceiling_auc']:.4f}",
            "-" if r.get("train_samples_per_s") is None else f"{r['train_samples_per_s']:,.0f}",
        )
        for r in results
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        # Text columns left-aligned, numbers right-aligned.
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in rows])
