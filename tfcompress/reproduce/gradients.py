"""Dense vs sparse gradients of the ROBE array as it grows: the shape of the PSS paper's Table 2.

One training step of the embedding part alone (forward, backward, SGD update of the array) with the dense gradient
(one scatter-add into an |M|-sized tensor, then a dense update) and with the sparse one (coalesced IndexedSlices,
then a scatter update), for |M| over several orders of magnitude, on the same batch of ids. The dense step costs
O(|M|) per step whatever the batch; the sparse one O(lookups log lookups): dense wins on small arrays, sparse on
large ones. Both forms run round-robin inside each repeat (so load from other processes hits them alike) and the
table reports medians and their ratio; absolute times depend on the machine.

Not a training run: it times the layer directly, on the first batch of the run's training data (synthetic or
--data), so it needs no `context.train`. `median_times`, `materialize`, `training_step` and
`time_gradient_forms` are also what `bench/bench_robe_ops.py` measures with.
"""

import gc
import statistics
import time

import numpy as np
import tensorflow as tf

from tfcompress import fused_ops
from tfcompress._keras import keras
from tfcompress.data import read
from tfcompress.layers.robe import RobeEmbedding
from tfcompress.lookup import DENSE_GRADIENT_MAX_ELEMENTS
from tfcompress.reproduce.report import markdown_table

NAME = "gradients"
TITLE = "Dense vs sparse gradients as the ROBE array grows"
SETTINGS = {
    # 2^16 .. 2^26 floats (256 KiB .. 256 MiB), chunk size as robe_ratios uses.
    "full": {"log2_sizes": [16, 18, 20, 22, 24, 26], "repeats": 15, "chunk_size": 4},
    "tiny": {"log2_sizes": [12, 16, 20], "repeats": 3, "chunk_size": 2},
}


def median_times(methods, repeats, warmup=2):
    """{name: median seconds of `repeats` calls}; each repeat calls every method once, in turn.

    Args:
        methods: {name: zero-argument callable that blocks until its work is done}.
        repeats: timed rounds, >= 1.
        warmup: untimed rounds first (tracing, allocator warm-up).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def materialize(result):
    """Block on the result (CPU eager returns when done; reading one element makes that explicit and is cheap)."""

    flat = tf.nest.flatten(result)
    return [t.numpy().ravel()[:1] if hasattr(t, "numpy") and t.shape.rank else t for t in flat]


def training_step(layer_or_fn, variables, optimizer, upstream):
    """One compiled step: forward, loss = sum(out * upstream), gradients, optimizer update; returns the loss.

    A fixed random `upstream` stands in for the rest of the model: the backward pass sees a realistic dense
    gradient per looked-up element without timing any MLP.
    """

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer_or_fn(x) * upstream)
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    return step


def time_gradient_forms(ids, cardinalities, output_dim, chunk_size, memory_sizes, repeats, use_custom_op="auto",
                        on_size=None):
    """Median seconds of one ROBE-Z training step (fwd + bwd + SGD) with the dense and the sparse gradient.

    Args:
        ids: int64 [batch, F] ids (column f in [0, cardinalities[f])), the same batch for every step.
        cardinalities: the F table sizes.
        output_dim: embedding width D.
        chunk_size: ROBE-Z chunk size Z in [1, D].
        memory_sizes: the |M| values (floats) to time, each >= chunk_size.
        repeats: timed rounds per size (each runs the dense and the sparse step once).
        use_custom_op: as `RobeEmbedding` ("auto": the fused op when it loads).
        on_size: optional callback(memory_size, {"dense": s, "sparse": s}) after each size (progress output).

    Returns:
        {memory_size: {"dense": seconds, "sparse": seconds}}.
    """

    ids = np.asarray(ids, dtype=np.int64)
    upstream = tf.constant(np.random.default_rng(6).standard_normal((*ids.shape, output_dim)).astype(np.float32)
                           * 1e-3)
    ids_tensor = tf.constant(ids)
    results = {}
    for memory_size in memory_sizes:
        steps = {}
        for gradient in ("dense", "sparse"):
            layer = RobeEmbedding(cardinalities, output_dim, memory_size=int(memory_size), chunk_size=chunk_size,
                                  gradient=gradient, use_custom_op=use_custom_op)
            layer.build(ids.shape)
            optimizer = keras.optimizers.SGD(0.01)
            optimizer.build(layer.trainable_variables)
            steps[gradient] = training_step(layer, layer.trainable_variables, optimizer, upstream)
        results[int(memory_size)] = median_times(
            {name: (lambda fn=fn: materialize(fn(ids_tensor))) for name, fn in steps.items()}, repeats)
        if on_size is not None:
            on_size(int(memory_size), results[int(memory_size)])
        # Free the two arrays (up to 2 x 256 MiB at 2^26) before the next size allocates bigger ones.
        del steps, layer, optimizer
        gc.collect()
    return results


def first_batch_ids(context):
    """The sparse ids of the first `batch_size` rows of the run's training data (fewer if the data is smaller)."""

    data = context.data()
    dataset = read(data.train_files, context.profile.batch_size, schema=data.schema, shuffle=False, repeat=False,
                   deterministic=True)
    features, _ = next(iter(dataset))
    return features["sparse"].numpy()


def run(context):
    settings = SETTINGS[context.profile.name]
    ids = first_batch_ids(context)
    cardinalities = context.data().schema.cardinalities
    dim = context.profile.embedding_dim
    chunk_size = min(settings["chunk_size"], dim)
    sizes = [2 ** k for k in settings["log2_sizes"]]

    def progress(memory_size, timings):
        print(f"{NAME}: |M| = {memory_size:,} floats: dense {timings['dense'] * 1e3:.2f} ms, sparse "
              f"{timings['sparse'] * 1e3:.2f} ms", flush=True)

    timings = time_gradient_forms(ids, cardinalities, dim, chunk_size, sizes, settings["repeats"],
                                  on_size=progress)
    rows = [{"memory_size": size, "dense_s": t["dense"], "sparse_s": t["sparse"],
             "dense_over_sparse": t["dense"] / t["sparse"]} for size, t in timings.items()]
    return {"rows": rows, "batch": int(ids.shape[0]), "features": int(ids.shape[1]), "embedding_dim": dim,
            "chunk_size": chunk_size, "repeats": settings["repeats"], "custom_op": fused_ops.should_use("auto")}


def report(results, context):
    import matplotlib  # lazily: only the report draws (after choosing the Agg backend)

    matplotlib.use("Agg")
    from matplotlib import ticker  # lazily: only the report draws (after choosing the Agg backend)
    import matplotlib.pyplot as plt  # lazily: only the report draws (after choosing the Agg backend)

    rows = results["rows"]
    sizes = [r["memory_size"] for r in rows]
    table = [[f"2^{r['memory_size'].bit_length() - 1}" if r["memory_size"] & (r["memory_size"] - 1) == 0
              else f"{r['memory_size']:,}", f"{r['memory_size'] * 4 / 2**20:,.2f}", f"{r['dense_s'] * 1e3:.2f}",
              f"{r['sparse_s'] * 1e3:.2f}", f"{r['dense_over_sparse']:.2f}"] for r in rows]
    sparse_wins = [f"{r['memory_size']:,}" for r in rows if r["dense_over_sparse"] > 1.0]
    crossover = (f"Sparse was faster at |M| = {', '.join(sparse_wins)} floats, dense at the other sizes"
                 if sparse_wins else "Dense was faster at every size measured")
    lookups = results["batch"] * results["features"]

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(sizes, [r["dense_s"] * 1e3 for r in rows], marker="o", label="dense gradient")
    left.plot(sizes, [r["sparse_s"] * 1e3 for r in rows], marker="s", label="sparse gradient")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    # Plain numbers on the log time axis, minor ticks labelled too when the times span less than ~a decade.
    left.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    left.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    left.set_xlabel("|M| (floats in the ROBE array)")
    left.set_ylabel("ms per training step (median)")
    right.semilogx(sizes, [r["dense_over_sparse"] for r in rows], marker="o", base=2, color="C2")
    right.axhline(1.0, color="0.5", linestyle=":")
    right.set_xlabel("|M| (floats in the ROBE array)")
    right.set_ylabel("dense time / sparse time")
    if min(sizes) <= DENSE_GRADIENT_MAX_ELEMENTS <= max(sizes):
        for axis in (left, right):
            axis.axvline(DENSE_GRADIENT_MAX_ELEMENTS, color="k", linestyle="--", linewidth=0.8,
                         label="gradient=\"auto\" switches to sparse")
    left.legend(fontsize=7)
    figure_md = context.figure(figure, NAME, f"ROBE-Z training step (fwd + bwd + SGD) on {lookups:,} ids, dense vs "
                                             "sparse gradient, as the array grows.")
    path = "the fused custom op" if results["custom_op"] else "the pure-TensorFlow path (custom op not loaded)"
    return "\n".join([
        f"## {TITLE}", "",
        f"One training step of the ROBE-Z embedding alone (forward, backward, SGD update of the array) on the first "
        f"training batch ({results['batch']:,} rows x {results['features']} features = {lookups:,} ids), "
        f"embedding dim {results['embedding_dim']}, Z={results['chunk_size']}, through {path}; dense gradient "
        "(scatter-add into an |M|-sized tensor) vs sparse (coalesced IndexedSlices), the two run in turn inside "
        f"each of {results['repeats']} repeats, medians reported. {crossover}. In the PSS paper's Table 2 the "
        "dense step grows with the array while the sparse one stays flat. The layers' `gradient=\"auto\"` "
        f"switches to sparse above {DENSE_GRADIENT_MAX_ELEMENTS:,} floats (dashed line).", "",
        markdown_table(["array floats", "MiB", "dense ms", "sparse ms", "dense / sparse"], table),
        figure_md])
