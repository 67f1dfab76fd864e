"""Data-parallel training overhead: samples/s and step time for 1 vs 2 workers (MultiWorkerMirroredStrategy on
loopback, tfcompress.multiworker's loop) and MirroredStrategy with 1 vs 2 logical CPU devices (Keras fit), full
tables vs ROBE-1000x, with the gradient bytes each replica contributes to the all-reduce per step.

Every configuration is a `tfcompress train` run (a subprocess per worker) on the same synthetic Criteo data, the
same per-replica batch and SGD; samples/s is the run's ThroughputCallback figure (first batch excluded). On a
machine with fewer cores than replicas nothing speeds up: what carries to a real cluster is the step time added
by the second replica (collectives, input sharding) and the bytes exchanged.

The bytes: one gradient of the model on one per-replica batch. A dense gradient (MLPs, a ROBE array) is
all-reduced whole; an IndexedSlices gradient (full tables) is all-gathered as its values and int64 indices. So the
full model exchanges the looked-up rows of its tables, and ROBE-1000x its whole (1000x smaller) array.

    python bench/bench_distributed.py                      # the BENCHMARKS.md table
    python bench/bench_distributed.py --steps 20 --rows 20000
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PIPELINE = """
name = "{name}"

[data]
source = "synthetic"
dataset = "criteo"
rows = {rows}
eval_rows = 2000
seed = 1
cardinality_scale = {scale}
path = "{data}"

[model]
arch = "dlrm"
embedding_dim = 16
bottom_mlp = [64, 16]
top_mlp = [64]

[compression]
method = "{method}"
{compression}

[train]
optimizer = "sgd"
learning_rate = 0.1
batch_size = {batch}
epochs = 1
steps_per_epoch = {steps}
seed = 0
save_model = false
tensorboard = false
deterministic = true
cluster_timeout_s = 600.0
"""

COMPRESSION = {"full": "", "robe": "ratio = 1000.0\nchunk_size = 4"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                    if p]))
    env.pop("TF_USE_LEGACY_KERAS", None)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def run(pipeline, runs, strategy, count):
    """One configuration; its results.json (the chief's)."""
    command = [sys.executable, "-m", "tfcompress.cli", "train", "--pipeline", pipeline, "--runs-dir", runs,
               "--verbose", "0", "--strategy", strategy]
    if strategy == "mirrored":
        processes = [subprocess.Popen(command + ["--cpu-replicas", str(count)], cwd=ROOT, env=environment(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    else:
        cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(count)]}
        processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=environment(TF_CONFIG=json.dumps(
                                          {"cluster": cluster, "task": {"type": "worker", "index": i}})))
                     for i in range(count)]
    for process in processes:
        output, _ = process.communicate(timeout=1800)
        if process.returncode != 0:
            raise SystemExit(f"{strategy} x{count} failed:\n{output[-4000:]}")
    name = os.path.splitext(os.path.basename(pipeline))[0]
    with open(os.path.join(runs, name, "results.json")) as f:
        return json.load(f)["result"]


def gradient_bytes(pipeline_path):
    """(dense bytes, sparse bytes) of one per-replica batch's gradient: what one replica puts into the all-reduce
    (dense) and the all-gather (IndexedSlices values + indices) per step."""
    import tensorflow as tf

    from tfcompress._keras import keras
    from tfcompress.data import read
    from tfcompress.pipeline import load_pipeline
    from tfcompress.plan import make_plan
    from tfcompress.train import build_model, prepare_data

    pipeline = load_pipeline(pipeline_path)
    data = prepare_data(pipeline.data, pipeline.source, verbose=0)
    plan = make_plan(data.schema.cardinalities, pipeline.model.embedding_dim, **pipeline.compression.plan_kwargs())
    model = build_model(pipeline.model, data.schema, plan.build_layer())
    features, labels = next(iter(read(data.train_files, pipeline.train.batch_size, schema=data.schema,
                                      shuffle=False, repeat=False)))
    with tf.GradientTape() as tape:
        loss = keras.losses.binary_crossentropy(labels, model(features, training=True))
    dense = sparse = 0
    for gradient in tape.gradient(loss, model.trainable_variables):
        if isinstance(gradient, tf.IndexedSlices):
            sparse += gradient.values.numpy().nbytes + gradient.indices.numpy().nbytes
        else:
            dense += gradient.numpy().nbytes
    return dense, sparse, plan.physical_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--steps", type=int, default=40, help="steps per run (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=512, help="per replica")
    parser.add_argument("--cardinality-scale", type=float, default=0.01)
    parser.add_argument("--methods", default="full,robe")
    parser.add_argument("--work-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args()

    work = args.work_dir or tempfile.mkdtemp(prefix="bench_distributed_")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data")
    configurations = [("mirrored", 1), ("mirrored", 2), ("multiworker", 1), ("multiworker", 2)]
    rows = []
    for method in args.methods.split(","):
        pipeline = os.path.join(work, f"bench_{method}.toml")
        with open(pipeline, "w") as f:
            f.write(PIPELINE.format(name=f"bench_{method}", rows=args.rows, scale=args.cardinality_scale, data=data,
                                    method=method, compression=COMPRESSION[method], batch=args.batch_size,
                                    steps=args.steps))
        dense, sparse, physical = gradient_bytes(pipeline)
        for strategy, count in configurations:
            started = time.perf_counter()
            result = run(pipeline, os.path.join(work, f"runs_{method}_{strategy}_{count}"), strategy, count)
            per_s = result["train_samples_per_s"]
            rows.append({"method": method, "strategy": strategy, "replicas": count,
                         "global_batch": result["global_batch_size"], "samples_per_s": per_s,
                         "step_ms": 1000 * result["global_batch_size"] / per_s, "embedding_bytes": physical,
                         "dense_grad_bytes": dense, "sparse_grad_bytes": sparse,
                         "wall_s": time.perf_counter() - started})
            print(json.dumps(rows[-1]), flush=True)

    print(f"\nper-replica batch {args.batch_size}, {args.steps} steps (first not timed), SGD, synthetic Criteo "
          f"x{args.cardinality_scale:g}, DLRM dim 16\n")
    print("| method | embedding | strategy | replicas | samples/s | step ms | added ms/step vs 1 replica "
          "| all-reduce bytes/step/replica (dense) | all-gather bytes/step/replica (sparse rows) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        base = next(r for r in rows if r["method"] == row["method"] and r["strategy"] == row["strategy"]
                    and r["replicas"] == 1)
        added = row["step_ms"] - base["step_ms"]
        exchanged = row["replicas"] > 1
        print(f"| {row['method']} | {row['embedding_bytes'] / 1e6:,.2f} MB | {row['strategy']} | {row['replicas']} "
              f"| {row['samples_per_s']:,.0f} | {row['step_ms']:.1f} | {added:+.1f} "
              f"| {row['dense_grad_bytes'] if exchanged else 0:,} | {row['sparse_grad_bytes'] if exchanged else 0:,} |")


if __name__ == "__main__":
    main()
