"""Fused pooled (bag) ROBE-Z lookup vs the composites it replaces, side by side in one run (medians of rounds).

    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_bag_op.py            # the full run (about 1-2 min on 2 cores)
    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_bag_op.py --quick    # fewer rounds (smoke test)
    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_bag_op.py --layer    # the same bags through CompressedEmbedding

Shape (issue 16): 16384 rows x 20 ids per row = 327,680 Zipf-distributed ids of one 10M-row table, output_dim 16,
chunk_size 4, ROBE-Z at 1000x (|M| = 160,000 floats, a table that starts at offset 0 of the array). Methods, all
compiled with tf.function and reading the same tf.Variable:

- fused:     `fused_ops.robe_bag_lookup` (one kernel: hash + gather + per-row combine);
- pure-TF:   `lookup.robe_bag_lookup_reference` (ROBE-Z positions in TF ops, tf.gather of [N, D], weights,
             unsorted_segment_sum, divide_no_nan): the issue's "pure-TF composite";
- op+segsum: the fused per-element op `fused_ops.robe_lookup` on ids [N, 1], then the same weights and segment sum
             (what a layer gets by composing the existing op with TF's pooling).

Two cases: "mean" without weights (a multi-hot bag) and "sum" with per-id weights. For each, the forward and the
forward + backward (the memory gradient, dense as "auto" picks for this |M|, and the weights gradient when weighted;
loss = sum(out * fixed upstream)). Each round runs every method once, in turn, so load from other processes hits
them alike; the ratios are the result.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfcompress import fused_ops, lookup  # noqa: E402
from tfcompress.reproduce.gradients import materialize, median_times  # noqa: E402

ROWS = 16384
IDS_PER_ROW = 20
CARDINALITY = 10_000_000
OUTPUT_DIM = 16
CHUNK_SIZE = 4
COMPRESSION = 1000
SEED = 1024


def composite_with_op(memory, ids, row_splits, weights, offset, cardinality, output_dim, chunk_size, seed, signed,
                      combiner, gradient):
    """The per-element fused op + TF pooling (offset must be 0: the per-element op numbers tables from 0)."""
    assert offset == 0
    values = fused_ops.robe_lookup(memory, ids[:, None], [cardinality], output_dim, chunk_size, seed, signed,
                                   gradient)[:, 0, :]
    segments = tf.ragged.row_splits_to_segment_ids(row_splits)
    rows = tf.shape(row_splits, out_type=tf.int64)[0] - 1
    if weights is not None:
        values = values * weights[:, None]
    else:
        weights = tf.ones(tf.shape(ids), tf.float32)
    summed = tf.math.unsorted_segment_sum(values, segments, rows)
    if combiner == "sum":
        return summed
    if combiner == "mean":
        return tf.math.divide_no_nan(summed, tf.math.unsorted_segment_sum(weights, segments, rows)[:, None])
    return tf.math.divide_no_nan(summed, tf.sqrt(tf.math.unsorted_segment_sum(tf.square(weights), segments,
                                                                              rows))[:, None])


METHODS = {
    "fused": fused_ops.robe_bag_lookup,
    "pure-TF": lookup.robe_bag_lookup_reference,
    "op+segsum": composite_with_op,
}


def build_steps(fn, memory, ids, row_splits, weights, combiner, upstream):
    kwargs = dict(offset=0, cardinality=CARDINALITY, output_dim=OUTPUT_DIM, chunk_size=CHUNK_SIZE, seed=SEED,
                  signed=False, combiner=combiner, gradient="dense")

    @tf.function
    def forward():
        return fn(memory, ids, row_splits, weights, **kwargs)

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            if weights is not None:
                tape.watch(weights)
            loss = tf.reduce_sum(fn(memory, ids, row_splits, weights, **kwargs) * upstream)
        targets = [memory] if weights is None else [memory, weights]
        return tape.gradient(loss, targets)

    return (lambda: materialize(forward())), (lambda: materialize(forward_backward()))


def layer_main(rounds, ids, row_splits, upstream):
    """CompressedEmbedding(combiner="mean") on the same bags (a RaggedTensor): the layer's fused bag path (what
    `call` takes now) vs its composite over the per-element fused op (what it took before, `fused_bags=False`) vs
    the composite over the pure-TF lookup (`use_custom_op=False`). Forward + backward (dense memory gradient)."""
    from tfcompress.layers import CompressedEmbedding

    def make(options):
        layer = CompressedEmbedding(CARDINALITY, OUTPUT_DIM, method="robe", compression=COMPRESSION,
                                    chunk_size=CHUNK_SIZE, seed=SEED, combiner="mean", gradient="dense",
                                    options=options)
        layer.build(None)
        return layer

    fused, pure = make({}), make({"use_custom_op": False})
    pure.inner.memory.assign(fused.inner.memory)
    bags = tf.RaggedTensor.from_row_splits(ids, row_splits)
    calls = {
        "layer fused bag": lambda: fused(bags),
        "layer composite + per-element op": lambda: fused._lookup(bags, None, fused._lookup_flat, fused_bags=False),
        "layer composite pure-TF": lambda: pure(bags),
    }
    steps = {}
    for name, call in calls.items():
        layer = pure if "pure" in name else fused

        @tf.function
        def step(call=call, layer=layer):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(call() * upstream)
            return tape.gradient(loss, layer.trainable_variables)

        steps[name] = lambda step=step: materialize(step())
    timings = median_times(steps, rounds)
    print("\n## CompressedEmbedding(combiner='mean'), ragged [16384, 20], forward + backward")
    base = timings["layer fused bag"]
    for name in calls:
        print(f"  {name:<34s} {timings[name] * 1e3:9.2f} ms   {timings[name] / base:6.2f}x of fused", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 15")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--layer", action="store_true", help="only the CompressedEmbedding layer-level comparison")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    if not fused_ops.is_available():
        raise SystemExit(f"the custom ops did not load: {fused_ops.unavailable_reason()}")

    rng = np.random.default_rng(0)
    n = ROWS * IDS_PER_ROW
    ids = tf.constant(((rng.zipf(1.1, n) - 1) * 2654435761 + 12345) % CARDINALITY, tf.int64)
    row_splits = tf.constant(np.arange(ROWS + 1) * IDS_PER_ROW, tf.int64)
    memory_size = CARDINALITY * OUTPUT_DIM // COMPRESSION
    memory = tf.Variable(rng.standard_normal(memory_size).astype(np.float32) * 0.01)
    upstream = tf.constant(rng.standard_normal([ROWS, OUTPUT_DIM]), tf.float32)
    weights = tf.constant(rng.uniform(0.1, 2.0, n).astype(np.float32))
    threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    print(f"{ROWS} rows x {IDS_PER_ROW} ids = {n} ids, table {CARDINALITY} x {OUTPUT_DIM}, Z={CHUNK_SIZE}, "
          f"|M|={memory_size}, {rounds} rounds (median), intra-op threads {threads}")
    if args.layer:
        layer_main(rounds, ids, row_splits, upstream)
        return

    for combiner, w in (("mean", None), ("sum", weights)):
        label = f"{combiner}, {'weighted' if w is not None else 'unweighted'}"
        forward, both = {}, {}
        for name, fn in METHODS.items():
            forward[name], both[name] = build_steps(fn, memory, ids, row_splits, w, combiner, upstream)
        # Forward and forward + backward in the same rounds: one table of ratios from one run.
        timings = median_times({**{("fwd", k): v for k, v in forward.items()},
                                **{("fwd+bwd", k): v for k, v in both.items()}}, rounds)
        print(f"\n## {label}")
        print(f"  {'method':<12s} {'fwd ms':>9s} {'fwd+bwd ms':>11s}   fused speedup: fwd  fwd+bwd")
        for name in METHODS:
            f, b = timings[("fwd", name)], timings[("fwd+bwd", name)]
            ratio = (f"{f / timings[('fwd', 'fused')]:10.2f}x {b / timings[('fwd+bwd', 'fused')]:7.2f}x"
                     if name != "fused" else "")
            print(f"  {name:<12s} {f * 1e3:9.2f} {b * 1e3:11.2f}   {ratio}", flush=True)


if __name__ == "__main__":
    main()
