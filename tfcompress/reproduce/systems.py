"""Systems: training and serving samples/s and peak resident memory, full tables against ROBE-Z 1000x.

Both models are the same DLRM (the profile's embedding width and MLPs, its optimizer and batch sizes) over the 26
Criteo Kaggle tables scaled by `cardinality_scale` (big enough that full tables cost real memory; the profile's
accuracy tables are too small to show it), built directly with `tfcompress.plan.make_plan` + `build_dlrm`: only
speed and memory are measured, so the ids are drawn (Zipf-distributed, as click logs are; serving also uniform)
rather than read from the data, and a run with --data measures the same synthetic tables.

- Training samples/s: both models in one process, `train_on_batch` on the same batches, alternating blocks of
  `block` steps so that machine load hits both alike; the median step time of each.
- Serving samples/s: both models exported with `tfcompress.export.export_saved_model` (stock TF ops), the Keras
  models dropped, both SavedModels loaded into this process and called through `serving_default` alternately on
  the same batches (as bench/bench_serving.py does); the median call time of each.
- Peak resident memory: one fresh subprocess per configuration (`python -m tfcompress.reproduce.systems SPEC`)
  that builds and trains, or loads and serves, one model and reports its VmHWM (ru_maxrss where /proc is absent);
  a "floor" process that imports the same libraries and builds nothing gives the runtime's own share.

Every number is reported as ROBE / full from the same run.
"""

import concurrent.futures
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import types

import numpy as np
import tensorflow as tf

from tfcompress import export
from tfcompress._keras import keras
from tfcompress.data.synthetic import CRITEO_KAGGLE_CARDINALITIES, scale_cardinalities
from tfcompress.models import build_dlrm
from tfcompress.plan import make_plan
from tfcompress.reproduce.report import markdown_table
from tfcompress.sizes import format_bytes
from tfcompress.train import make_optimizer

NAME = "systems"
TITLE = "Systems: training and serving throughput, peak memory"
SETTINGS = {
    # Kaggle x 0.5: 16.9M ids, 1.08 GB of float32 full tables at d=16 (plus as much Adagrad state in training);
    # about a minute on 2 cores; this process and the full-table training process each peak near 3.3 GB (x 1.0
    # would double that, too much next to other work on a 24 GB machine).
    "full": {"cardinality_scale": 0.5, "compression": 1000.0, "chunk_size": 4, "train_steps": 100, "block": 10,
             "serve_repeats": 30, "memory_train_steps": 20, "memory_serve_calls": 5, "memory_processes": 2},
    "tiny": {"cardinality_scale": 0.002, "compression": 1000.0, "chunk_size": 2, "train_steps": 4, "block": 2,
             "serve_repeats": 3, "memory_train_steps": 2, "memory_serve_calls": 1, "memory_processes": 2},
}
KINDS = ("full", "robe")
N_DENSE = 13
DISTRIBUTIONS = ("zipf", "uniform")
RESULT_PREFIX = "SYSTEMS_RESULT "  # the line a memory subprocess prints its numbers on


def make_batches(cardinalities, batch, count, distribution, seed, n_dense=N_DENSE):
    """`count` (dense, sparse) batches of tf constants: log-normal dense features, ids per `distribution`.

    Args:
        cardinalities: ids per table; every id drawn is in [0, n_t).
        batch: rows per batch.
        distribution: "uniform" (every lookup of a large full table misses the cache: its worst case) or "zipf"
            (Zipf(1.1) ranks, a few hot ids per table as in click logs, scrambled over the table by a fixed
            multiplicative hash so the hot rows are not neighbours).
        seed: numpy seed.
    """

    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    rng = np.random.default_rng(seed)
    cards = np.asarray(cardinalities, np.int64)
    batches = []
    for _ in range(count):
        if distribution == "uniform":
            sparse = (rng.random((batch, len(cards))) * cards).astype(np.int64)
        else:
            ranks = rng.zipf(1.1, size=(batch, len(cards))) - 1
            # int64 products of huge ranks wrap around (numpy arrays do not raise); still one id per rank, and
            # the floor modulo keeps every id in [0, n_t).
            sparse = (ranks * 2654435761) % cards
        dense = rng.lognormal(1.0, 1.0, size=(batch, n_dense)).astype(np.float32)
        batches.append((tf.constant(np.log1p(dense)), tf.constant(sparse)))
    return batches


def time_side_by_side(signatures, batches, repeats):
    """Median seconds per batch of each serving signature, calls interleaved so load drifts affect all alike."""
    for fn in signatures.values():  # warm up: first calls build kernels and thread pools
        for dense, sparse in batches[:2]:
            fn(dense=dense, sparse=sparse)["probability"].numpy()
    times = {name: [] for name in signatures}
    for r in range(repeats):
        dense, sparse = batches[r % len(batches)]
        for name, fn in signatures.items():
            started = time.perf_counter()
            fn(dense=dense, sparse=sparse)["probability"].numpy()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def table_sizes(settings):
    return scale_cardinalities(CRITEO_KAGGLE_CARDINALITIES, settings["cardinality_scale"])


def model_spec(context, settings):
    """Everything a (sub)process needs to build and train the two models: JSON-able."""
    p = context.profile
    return {"cardinalities": table_sizes(settings), "embedding_dim": p.embedding_dim,
            "bottom_mlp": list(p.bottom_mlp), "top_mlp": list(p.top_mlp), "optimizer": p.optimizer,
            "learning_rate": p.learning_rate, "batch_size": p.batch_size, "eval_batch_size": p.eval_batch_size,
            "compression": settings["compression"], "chunk_size": settings["chunk_size"], "seed": context.seed}


def build_model(spec, kind):
    """(model, embedding bytes): the DLRM of `spec` with full tables (kind "full") or one ROBE-Z array (kind
    "robe"), compiled with the profile's optimizer."""

    keras.utils.set_random_seed(spec["seed"])
    cards, dim = spec["cardinalities"], spec["embedding_dim"]
    if kind == "full":
        plan = make_plan(cards, dim, "full")
    else:
        plan = make_plan(cards, dim, "robe", ratio=spec["compression"], chunk_size=spec["chunk_size"])
    model = build_dlrm((N_DENSE, len(cards)), plan.build_layer(), spec["bottom_mlp"], spec["top_mlp"],
                       name=f"systems_{kind}")
    config = types.SimpleNamespace(optimizer=spec["optimizer"], learning_rate=spec["learning_rate"])
    model.compile(optimizer=make_optimizer(config), loss=keras.losses.BinaryCrossentropy())
    return model, plan.physical_bytes


def training_batches(spec, count):
    """(inputs, labels) training batches of Zipf ids with ~25% positive labels."""

    rng = np.random.default_rng(spec["seed"] + 1)
    return [({"dense": dense, "sparse": sparse},
             tf.constant((rng.random((spec["batch_size"], 1)) < 0.25).astype(np.float32)))
            for dense, sparse in make_batches(spec["cardinalities"], spec["batch_size"], count, "zipf", spec["seed"])]


def time_training(models, batches, steps, block):
    """Median seconds per training step of each model, blocks of `block` steps alternating between the models."""
    for model in models.values():  # warm up: tracing, optimizer slots, thread pools
        for inputs, labels in batches[:2]:
            model.train_on_batch(inputs, labels)
    times = {name: [] for name in models}
    for start in range(0, steps, block):
        for name, model in models.items():
            for step in range(start, min(steps, start + block)):
                inputs, labels = batches[step % len(batches)]
                started = time.perf_counter()
                model.train_on_batch(inputs, labels)  # returns numpy losses: the step has finished
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def directory_bytes(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def peak_resident_bytes():
    """This process's peak resident set size: VmHWM from /proc, else ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure_peak_memory(task):
    """Run `task` ({"mode": "floor" | "train" | "serve", ...}) in a fresh process; its peak resident bytes.

    A fresh interpreter per configuration: the peak of a process is monotone, so two models measured in one
    process would hide the smaller one.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    completed = subprocess.run([sys.executable, "-m", "tfcompress.reproduce.systems", json.dumps(task)],
                               capture_output=True, text=True, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"memory subprocess for {task['mode']} {task.get('kind', '')} failed "
                           f"(exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])["peak_bytes"]


def memory_task_main(task):
    """Body of a memory subprocess: do the task, print its peak resident bytes on a RESULT_PREFIX line."""

    mode = task["mode"]
    if mode == "floor":
        tf.constant(1.0).numpy()
    elif mode == "train":
        spec = task["spec"]
        model, _ = build_model(spec, task["kind"])
        batches = training_batches(spec, 2)
        for step in range(task["steps"]):
            model.train_on_batch(*batches[step % len(batches)])
    elif mode == "serve":
        serve = tf.saved_model.load(task["path"]).signatures["serving_default"]
        batches = make_batches(task["cardinalities"], task["batch"], 1, "zipf", task["seed"])
        for _ in range(task["calls"]):
            dense, sparse = batches[0]
            serve(dense=dense, sparse=sparse)["probability"].numpy()
    else:
        raise ValueError(f"mode must be floor, train or serve, got {mode!r}")
    print(RESULT_PREFIX + json.dumps({"peak_bytes": peak_resident_bytes()}), flush=True)


def run(context):
    settings = SETTINGS[context.profile.name]
    spec = model_spec(context, settings)
    results = {"settings": settings, "spec": {k: v for k, v in spec.items() if k != "cardinalities"},
               "ids": sum(spec["cardinalities"]), "threads": os.cpu_count()}

    started = time.perf_counter()
    stage_seconds = results["stage_seconds"] = {}

    def stage_done(stage):  # where the experiment's minutes go, for sizing SETTINGS
        nonlocal started
        stage_seconds[stage] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()

    # (a) training, side by side in this process.
    models, results["embedding_bytes"] = {}, {}
    for kind in KINDS:
        models[kind], results["embedding_bytes"][kind] = build_model(spec, kind)
    step_seconds = time_training(models, training_batches(spec, 4), settings["train_steps"], settings["block"])
    results["train_samples_per_s"] = {kind: spec["batch_size"] / s for kind, s in step_seconds.items()}
    stage_done("training")

    # (b) serving: export, drop the Keras models, load both SavedModels here, alternate calls.
    base_dir = os.path.join(context.out_dir, NAME, "saved_models")
    shutil.rmtree(base_dir, ignore_errors=True)  # leftovers of an interrupted run
    paths = {kind: export.export_saved_model(models.pop(kind), base_dir=base_dir, name=f"systems_{kind}")
             for kind in KINDS}
    results["export_bytes"] = {kind: directory_bytes(path) for kind, path in paths.items()}
    stage_done("export")
    gc.collect()
    keras.backend.clear_session()
    signatures = {kind: tf.saved_model.load(path).signatures["serving_default"] for kind, path in paths.items()}
    results["serve_samples_per_s"] = {}
    for distribution in DISTRIBUTIONS:
        batches = make_batches(spec["cardinalities"], spec["eval_batch_size"], 4, distribution, context.seed + 2)
        medians = time_side_by_side(signatures, batches, settings["serve_repeats"])
        results["serve_samples_per_s"][distribution] = {k: spec["eval_batch_size"] / s for k, s in medians.items()}
    del signatures
    gc.collect()
    stage_done("serving")

    # (c) peak resident memory, one fresh process per configuration; a process's peak is its own, so several
    # may run at once (starting TensorFlow takes most of a small configuration's time).
    tasks = {"floor": {"mode": "floor"}}
    for kind in KINDS:
        tasks[f"train_{kind}"] = {"mode": "train", "kind": kind, "spec": spec,
                                  "steps": settings["memory_train_steps"]}
        tasks[f"serve_{kind}"] = {"mode": "serve", "path": paths[kind], "cardinalities": spec["cardinalities"],
                                  "batch": spec["eval_batch_size"], "seed": context.seed,
                                  "calls": settings["memory_serve_calls"]}
    with concurrent.futures.ThreadPoolExecutor(settings["memory_processes"]) as pool:
        peaks = dict(zip(tasks, pool.map(measure_peak_memory, tasks.values())))
    results["peak_bytes"] = peaks
    stage_done("memory")
    shutil.rmtree(base_dir, ignore_errors=True)  # hundreds of MB of full tables; the numbers are kept
    return results


def metric_rows(results):
    """(metric, full value, ROBE-Z value, unit) per measured quantity."""
    peaks, floor = results["peak_bytes"], results["peak_bytes"]["floor"]
    rows = [("training samples/s (Zipf ids)", results["train_samples_per_s"]["full"],
             results["train_samples_per_s"]["robe"], "samples/s")]
    for distribution in DISTRIBUTIONS:
        serve = results["serve_samples_per_s"][distribution]
        rows.append((f"serving samples/s ({distribution.capitalize()} ids)", serve["full"], serve["robe"],
                     "samples/s"))
    for stage, label in (("train", "training"), ("serve", "serving")):
        rows.append((f"{label} peak RSS", peaks[f"{stage}_full"], peaks[f"{stage}_robe"], "bytes"))
        rows.append((f"{label} peak RSS above the floor", peaks[f"{stage}_full"] - floor,
                     peaks[f"{stage}_robe"] - floor, "bytes"))
    rows.append(("embedding bytes", results["embedding_bytes"]["full"], results["embedding_bytes"]["robe"],
                 "bytes"))
    rows.append(("SavedModel directory bytes", results["export_bytes"]["full"], results["export_bytes"]["robe"],
                 "bytes"))
    return rows


def _format(value, unit):
    return format_bytes(value) if unit == "bytes" else f"{value:,.0f}"


def report(results, context):
    import matplotlib  # lazily: only the report draws (after choosing the Agg backend)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazily: only the report draws (after choosing the Agg backend)
    import matplotlib.ticker  # lazily: only the report draws (after choosing the Agg backend)

    spec, settings = results["spec"], results["settings"]
    rows = metric_rows(results)
    table = [[metric, _format(full, unit), _format(robe, unit), f"{robe / full:.3g}" if full > 0 else "-"]
             for metric, full, robe, unit in rows]
    plotted = [(metric, robe / full) for metric, full, robe, unit in rows
               if full > 0 and robe > 0 and "bytes" not in metric]
    figure, axis = plt.subplots(figsize=(7.5, 3.8))
    labels = [metric for metric, _ in plotted]
    ratios = [ratio for _, ratio in plotted]
    colors = ["C0" if "samples" in metric else "C1" for metric in labels]
    # Lollipops from 1 (no difference): on a log axis a bar from the axis edge would have a meaningless length.
    axis.hlines(range(len(plotted)), 1.0, ratios, colors=colors, linewidth=3)
    axis.scatter(ratios, range(len(plotted)), color=colors, zorder=3)
    axis.set_yticks(range(len(plotted)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xscale("log")
    low, high = min(ratios + [1.0]), max(ratios + [1.0])
    axis.set_xlim(low / 1.6, high * 1.6)
    ticks = [m * 10.0**e for e in range(-4, 3) for m in (1, 2, 5) if low / 1.6 <= m * 10.0**e <= high * 1.6]
    axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.axvline(1.0, color="k", linewidth=1)
    for i, ratio in enumerate(ratios):
        axis.annotate(f"{ratio:.2f}x", (ratio, i), xytext=(6 if ratio >= 1 else -6, 0), textcoords="offset points",
                      ha="left" if ratio >= 1 else "right", va="center", fontsize=8)
    axis.set_xlabel("ROBE-Z / full tables (log scale): throughput > 1 and memory < 1 favour ROBE-Z")
    figure_md = context.figure(figure, NAME, f"ROBE-Z {settings['compression']:g}x against full tables: "
                                             "throughput and peak-memory ratios from the same run.")
    floor = results["peak_bytes"]["floor"]
    return "\n".join([
        f"## {TITLE}", "",
        f"The same DLRM (embedding dim {spec['embedding_dim']}, bottom MLP {spec['bottom_mlp']} + "
        f"{spec['embedding_dim']}, top MLP {spec['top_mlp']} + 1, {spec['optimizer']} lr {spec['learning_rate']:g})"
        f" on the 26 Criteo Kaggle tables x {settings['cardinality_scale']:g} ({results['ids']:,} ids), with "
        f"full float32 tables and with one ROBE-Z array {settings['compression']:g}x smaller (Z="
        f"{settings['chunk_size']}); ids are drawn, not read from the data. Training: batch "
        f"{spec['batch_size']:,}, `train_on_batch`, median of {settings['train_steps']} steps per model in "
        f"alternating blocks of {settings['block']}. Serving: both exported SavedModels loaded in one process, "
        f"`serving_default` called alternately on the same batches of {spec['eval_batch_size']:,} rows, median of "
        f"{settings['serve_repeats']} calls. Peak RSS: one fresh process per configuration "
        f"({settings['memory_train_steps']} training steps, or loading and {settings['memory_serve_calls']} "
        "serving call(s)); the floor, a process "
        f"that only imports TensorFlow and tfcompress, is {format_bytes(floor)}. {results['threads']} CPU "
        "thread(s).", "",
        markdown_table(["metric", "full", "ROBE-Z", "ROBE/full"], table),
        figure_md])


if __name__ == "__main__":
    memory_task_main(json.loads(sys.argv[1]))
