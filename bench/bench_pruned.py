"""Chunk-pruned embeddings (FIITED): peak memory and step time at Criteo Kaggle size, and AUC on planted data.

Three measurements, each configuration in its own subprocess (peak RSS is per process):

- memory: a DLRM on the 26 Criteo Kaggle tables (33.7M rows, d = 16) trained for --steps batches of random,
  head-heavy ids with the same optimizer, once with full tables and once per K with a ChunkPrunedEmbedding at
  --budget (0.1 = 10x smaller pool); peak RSS (VmHWM) of the process, and the RSS after imports (the floor).
- step time: from the same runs, the median training step (utility recording included) and the mean time of
  one pruning event (ChunkPruningCallback, every --period steps), K = 1, 2, 4, 8 next to the full tables.
- auc: planted-signal synthetic Criteo (tfcompress.data.synthetic, --cardinality-scale), full tables vs 10x
  pruning with K = 1 and K = 2 (same pool memory), exact eval AUC per seed.

Run (the numbers in BENCHMARKS.md):

    python bench/bench_pruned.py memory --steps 40
    python bench/bench_pruned.py auc --rows 300000 --seeds 0 1

Output: markdown tables on stdout (and --json for the raw numbers).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["memory", "auc", "all"], help="which measurement")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8], help="K values (memory/step time)")
    parser.add_argument("--budget", type=float, default=0.1, help="live fraction of the chunks (0.1 = 10x)")
    parser.add_argument("--dim", type=int, default=16, help="embedding width d")
    parser.add_argument("--steps", type=int, default=40, help="training steps per memory run")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--period", type=int, default=10, help="T, steps between pruning events")
    parser.add_argument("--sample-size", type=int, default=100_000, help="m, rows sampled per pruning event")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "sparse_adagrad"],
                        help="the same for every run (Keras 3 Adagrad/Adam would densify the table updates)")
    parser.add_argument("--learning-rate", type=float, default=0.05, help="memory / step-time runs")
    parser.add_argument("--auc-learning-rate", type=float, default=0.5, help="auc runs")
    parser.add_argument("--memory-scale", type=float, default=1.0, help="multiplies the Kaggle table sizes")
    parser.add_argument("--rows", type=int, default=300_000, help="auc: training rows of the synthetic data")
    parser.add_argument("--eval-rows", type=int, default=100_000, help="auc: evaluation rows")
    parser.add_argument("--cardinality-scale", type=float, default=0.01, help="auc: scales the Kaggle tables")
    parser.add_argument("--auc-period", type=int, default=20, help="auc: T of the pruning callback")
    parser.add_argument("--epochs", type=int, default=2, help="auc: epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="auc: training seeds")
    parser.add_argument("--data-dir", default=None, help="auc: where the synthetic data is generated (reused)")
    parser.add_argument("--json", default=None, help="also write every run's numbers to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one run, JSON config (internal)
    return parser.parse_args(argv)


def status_kib(field):
    """VmHWM / VmRSS of this process in KiB, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_optimizer(name, learning_rate):
    from tfcompress._keras import keras
    from tfcompress.optimizers import SparseAdagrad

    return keras.optimizers.SGD(learning_rate) if name == "sgd" else SparseAdagrad(learning_rate)


def embedding_layer(config, cardinalities):
    from tfcompress.layers import ChunkPrunedEmbedding, FullEmbedding

    if config["method"] == "full":
        return FullEmbedding(cardinalities, config["dim"], gradient="sparse")
    return ChunkPrunedEmbedding(cardinalities, config["dim"], num_chunks=config["chunks"], budget=config["budget"],
                                gradient="sparse")


def timed_pruning_callback(period, sample_size, seed=0):
    """A ChunkPruningCallback that records how long each pruning event took."""
    from tfcompress.chunk_pruning import ChunkPruningCallback

    class Timed(ChunkPruningCallback):
        def prune(self, step):
            started = time.perf_counter()
            super().prune(step)
            self.event_seconds.append(time.perf_counter() - started)

    callback = Timed(period=period, sample_size=sample_size, seed=seed)
    callback.event_seconds = []
    return callback


def run_memory(config):
    """One memory / step-time run in this process: returns its numbers."""
    import numpy as np
    import tensorflow as tf

    from tfcompress._keras import keras
    from tfcompress.data.synthetic import CRITEO_KAGGLE_CARDINALITIES
    from tfcompress.models import build_dlrm

    floor_kib = status_kib("VmRSS")
    cards = [max(1, round(n * config["scale"])) for n in CRITEO_KAGGLE_CARDINALITIES]
    keras.utils.set_random_seed(0)
    layer = embedding_layer(config, cards)
    model = build_dlrm((13, len(cards)), layer, (32,), (32,), name="bench")
    model.compile(make_optimizer(config["optimizer"], config["learning_rate"]), "binary_crossentropy")
    batch = config["batch_size"]
    card_tensor = tf.constant(cards, tf.float32)

    def make_batch(step):
        # Head-heavy ids (u^4: a quarter of the draws fall in the first 0.4% of a table), as click logs are.
        u = tf.random.stateless_uniform([batch, len(cards)], seed=tf.stack([step, 1]))
        ids = tf.minimum(tf.cast(tf.floor(u ** 4 * card_tensor), tf.int64), tf.constant(cards, tf.int64) - 1)
        dense = tf.random.stateless_normal([batch, 13], seed=tf.stack([step, 2]))
        labels = tf.cast(tf.random.stateless_uniform([batch, 1], seed=tf.stack([step, 3])) < 0.25, tf.float32)
        return {"dense": dense, "sparse": ids}, labels

    data = tf.data.Dataset.range(config["steps"]).map(make_batch).prefetch(2)

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_train_batch_begin(self, batch, logs=None):
            self.started = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    timer = StepTimer()
    callbacks = [timer]  # first: its batch end is measured before any pruning event runs
    pruning = None
    if config["method"] == "pruned":
        pruning = timed_pruning_callback(config["period"], config["sample_size"])
        callbacks.append(pruning)
    model.fit(data, epochs=1, verbose=0, callbacks=callbacks)
    steady = timer.seconds[3:] or timer.seconds
    result = {
        "peak_rss_bytes": status_kib("VmHWM") * 1024,
        "floor_rss_bytes": floor_kib * 1024,
        "median_step_s": float(np.median(steady)),
        "embedding_weight_bytes": int(sum(int(np.prod(w.shape)) * tf.as_dtype(w.dtype).size for w in layer.weights)),
        "logical_bytes": int(layer.logical_parameters) * 4,
    }
    if pruning is not None:
        result["prune_event_s"] = float(np.mean(pruning.event_seconds)) if pruning.event_seconds else None
        result["live_chunks"] = layer.live_chunk_count()
        result["capacity"] = layer.capacity
    return result


def run_auc(config):
    """One AUC run (full or pruned) on the synthetic dataset in config["data_dir"]: returns its numbers."""
    import tensorflow as tf

    from tfcompress._keras import keras
    from tfcompress.data import read
    from tfcompress.data.schema import Schema
    from tfcompress.models import build_dlrm
    from tfcompress.train import exact_metrics

    data_dir = config["data_dir"]
    schema = Schema.load(os.path.join(data_dir, "schema.json"))
    keras.utils.set_random_seed(config["seed"])
    layer = embedding_layer(config, schema.cardinalities)
    model = build_dlrm(schema, layer, (64, 32), (128, 64), name="bench")
    model.compile(make_optimizer(config["optimizer"], config["learning_rate"]), "binary_crossentropy")
    train = read(os.path.join(data_dir, "train"), 1024, schema=schema, shuffle=True, repeat=False,
                 seed=config["seed"], drop_remainder=True)
    evaluation = read(os.path.join(data_dir, "eval"), 8192, schema=schema, shuffle=False, repeat=False,
                      deterministic=True)
    callbacks = []
    if config["method"] == "pruned":
        callbacks.append(timed_pruning_callback(config["period"], config["sample_size"], config["seed"]))
    model.fit(train, epochs=config["epochs"], verbose=0, callbacks=callbacks)
    auc, loss = exact_metrics(model, evaluation)
    result = {"auc": auc, "log_loss": loss}
    if config["method"] == "pruned":
        result["live_chunks"] = layer.live_chunk_count()
        result["capacity"] = layer.capacity
    del tf
    return result


def in_subprocess(config):
    """Run one configuration in a fresh interpreter (its own peak RSS) and return its JSON result."""
    command = [sys.executable, os.path.abspath(__file__), config["kind"], "--worker", json.dumps(config)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"run {config} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def mib(n):
    return f"{n / 2**20:,.0f}"


def memory_table(args):
    base = {"kind": "memory", "dim": args.dim, "steps": args.steps, "batch_size": args.batch_size,
            "optimizer": args.optimizer, "learning_rate": args.learning_rate, "scale": args.memory_scale,
            "period": args.period, "sample_size": args.sample_size, "budget": args.budget}
    configs = [dict(base, method="full", chunks=None)]
    configs += [dict(base, method="pruned", chunks=k) for k in args.chunks]
    runs = []
    for config in configs:
        result = in_subprocess(config)
        runs.append(dict(config, **result))
        print(f"  {config['method']} K={config['chunks']}: peak {mib(result['peak_rss_bytes'])} MiB", flush=True,
              file=sys.stderr)
    full = runs[0]
    lines = [f"Criteo Kaggle tables x{args.memory_scale} (d = {args.dim}), {args.steps} steps of {args.batch_size}, "
             f"{args.optimizer}, pruning budget {args.budget} (every {args.period} steps, m = {args.sample_size})",
             "",
             "| config | embedding state MiB | peak RSS MiB | peak - floor MiB | vs full | median step ms | "
             "step vs full | pruning event ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    full_used = full["peak_rss_bytes"] - full["floor_rss_bytes"]
    for run in runs:
        used = run["peak_rss_bytes"] - run["floor_rss_bytes"]
        name = "full tables" if run["method"] == "full" else f"pruned K={run['chunks']}"
        event = run.get("prune_event_s")
        lines.append(f"| {name} | {mib(run['embedding_weight_bytes'])} | {mib(run['peak_rss_bytes'])} | {mib(used)} | "
                     f"{used / full_used:.2f}x | {run['median_step_s'] * 1e3:.1f} | "
                     f"{run['median_step_s'] / full['median_step_s']:.2f}x | "
                     f"{'' if event is None else f'{event * 1e3:.0f}'} |")
    return "\n".join(lines), runs


def auc_table(args):
    from tfcompress.data.synthetic import generate

    data_dir = args.data_dir or os.path.join(
        tempfile.gettempdir(), f"tfcompress_bench_pruned_{args.rows}_{args.eval_rows}_{args.cardinality_scale}")
    stats = generate(data_dir, rows=args.rows, eval_rows=args.eval_rows, cardinality_scale=args.cardinality_scale)
    base = {"kind": "auc", "dim": args.dim, "optimizer": args.optimizer, "learning_rate": args.auc_learning_rate,
            "data_dir": data_dir, "epochs": args.epochs, "period": args.auc_period,
            "sample_size": args.sample_size, "budget": args.budget}
    configs = [("full tables", dict(base, method="full", chunks=None))]
    configs += [(f"pruned {1 / args.budget:g}x K={k}", dict(base, method="pruned", chunks=k)) for k in (1, 2)]
    runs, rows = [], []
    import numpy as np

    for name, config in configs:
        aucs = []
        for seed in args.seeds:
            result = in_subprocess(dict(config, seed=seed))
            runs.append(dict(config, seed=seed, **result))
            aucs.append(result["auc"])
            print(f"  {name} seed {seed}: AUC {result['auc']:.4f}", flush=True, file=sys.stderr)
        rows.append((name, np.mean(aucs), np.std(aucs)))
    full_auc = rows[0][1]
    lines = [f"planted-signal synthetic Criteo, cardinality scale {args.cardinality_scale}, {args.rows} train / "
             f"{args.eval_rows} eval rows, {args.epochs} epochs, {args.optimizer} lr {args.auc_learning_rate}, "
             f"seeds {args.seeds}; ceiling AUC {stats['splits']['eval']['ceiling_auc']:.4f}",
             "",
             "| config | eval AUC (mean +- std) | relative to full |",
             "|---|---:|---:|"]
    for name, mean, std in rows:
        lines.append(f"| {name} | {mean:.4f} +- {std:.4f} | {(mean - full_auc) / full_auc * 100:+.2f}% |")
    return "\n".join(lines), runs


def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        config = json.loads(args.worker)
        result = run_memory(config) if config["kind"] == "memory" else run_auc(config)
        print(json.dumps(result))
        return
    everything = []
    if args.what in ("memory", "all"):
        table, runs = memory_table(args)
        print(table + "\n")
        everything += runs
    if args.what in ("auc", "all"):
        table, runs = auc_table(args)
        print(table + "\n")
        everything += runs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=2)


if __name__ == "__main__":
    main()
