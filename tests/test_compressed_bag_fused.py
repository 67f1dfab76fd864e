"""CompressedEmbedding bags in training through the fused ROBE bag op (`RobeEmbedding.fused_bag_lookup`).

The reference is the composite path the layer takes without the op: `bag.bag_lookup` over the per-element lookup
(a layer with `use_custom_op=False`, or the inner layer's own `call`), with the same memory. The fused bag op and
the composite both sum each row in id order and divide last, so forward values are compared bit for bit; memory
gradients are sums in another order and are compared to 1e-6. The library must load here (as in test_bag_op.py):
a machine without it fails with the reason rather than skipping.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfcompress import fused_ops
from tfcompress._keras import USING_LEGACY_KERAS, keras
from tfcompress.layers import CompressedEmbedding, RobeMemory
from tfcompress.layers.bag import bag_lookup

N, D = 200, 8
# An empty row, ids < 0 (pruned), repeats, weights <= 0 (pruned for mean/sqrtn, kept for sum), a row all pruned.
BAGS = [[3, 7, 7, 199], [], [-1, 5], [0], [-4], [11, 12, 13, 14, 15, 16]]
BAG_WEIGHTS = [[1.0, 0.5, 2.0, -1.0], [], [3.0, 0.0], [2.5], [1.0], [1.0, 0.0, -2.0, 4.0, 0.25, 1.0]]
BAG_OPS = {"RobeBagLookup", "RobeResourceBagLookup"}


@pytest.fixture(scope="module", autouse=True)
def library():
    assert fused_ops.load_library() is not None, f"custom ops did not load: {fused_ops.unavailable_reason()}"


def sparse_of(rows, dtype):
    indices = [[r, c] for r, row in enumerate(rows) for c in range(len(row))]
    values = [v for row in rows for v in row]
    return tf.SparseTensor(tf.constant(indices, tf.int64), tf.constant(values, dtype), [len(rows), 6])


def bag_input(kind, weighted):
    if kind == "sparse":
        return sparse_of(BAGS, tf.int64), sparse_of(BAG_WEIGHTS, tf.float32) if weighted else None
    return (tf.ragged.constant(BAGS, dtype=tf.int64),
            tf.ragged.constant(BAG_WEIGHTS, dtype=tf.float32) if weighted else None)


def memory_variable(layer):
    memory = layer.inner.memory
    return memory if USING_LEGACY_KERAS else getattr(memory, "value", memory)


def fused_and_composite(combiner, gradient, **arguments):
    """Two layers with the same random memory: the default (fused bag op) and use_custom_op=False (composite)."""
    layers = [CompressedEmbedding(N, D, method="robe", compression=5.0, chunk_size=4, combiner=combiner,
                                  gradient=gradient, options=dict(options, **arguments.get("options", {})),
                                  **{k: v for k, v in arguments.items() if k != "options"})
              for options in ({}, {"use_custom_op": False})]
    values = np.random.default_rng(0).normal(size=layers[0].inner.memory_size).astype(np.float32)
    for layer in layers:
        layer.build(None)
        layer.inner.memory.assign(values)
    assert layers[0].uses_fused_bag_op() and not layers[1].uses_fused_bag_op()
    return layers


def op_types(function, *args):
    return {op.type for op in tf.function(function).get_concrete_function(*args).graph.get_operations()}


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", ["ragged", "sparse"])
@pytest.mark.parametrize("gradient", ["dense", "sparse"])
def test_fused_bags_equal_the_composite_forward_bit_for_bit_and_gradients(combiner, weighted, kind, gradient):
    fused, composite = fused_and_composite(combiner, gradient)
    ids, weights = bag_input(kind, weighted)
    upstream = tf.constant(np.random.default_rng(1).normal(size=(len(BAGS), D)), tf.float32)
    outputs, gradients = [], []
    for layer in (fused, composite):
        with tf.GradientTape() as tape:
            out = layer(ids, weights=weights)
            loss = tf.reduce_sum(out * upstream)
        grad = tape.gradient(loss, memory_variable(layer))
        assert isinstance(grad, tf.IndexedSlices) == (gradient == "sparse"), type(grad)
        outputs.append(out.numpy())
        gradients.append(tf.convert_to_tensor(grad).numpy())
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not outputs[0][[1, 4]].any(), "an empty row and a row of pruned ids are zeros"
    np.testing.assert_allclose(gradients[0], gradients[1], rtol=1e-6, atol=1e-6)
    assert np.abs(gradients[0]).sum() > 0


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_weights_gradient_and_dense_bags_through_the_fused_op(combiner):
    fused, composite = fused_and_composite(combiner, "dense")
    ids = tf.constant([[3, 9, 9], [0, 199, 5]])
    weights = tf.Variable([[1.0, 0.5, 2.0], [0.25, 3.0, 1.5]])
    results = []
    for layer in (fused, composite):
        with tf.GradientTape() as tape:
            out = layer(ids, weights=weights)
            loss = tf.reduce_sum(out * tf.range(1.0, D + 1.0))
        results.append((out.numpy(), tape.gradient(loss, weights).numpy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)


def test_shared_memory_layers_at_nonzero_offsets_pool_the_same_rows():
    # The bag op hashes a = id + table_offset; the per-element op gets the same a by growing its first table by the
    # offset. Three layers of one memory, the last at an explicit offset beyond the others.
    memory = RobeMemory(size=997, chunk_size=4, signed=True)
    layers = [CompressedEmbedding(N, D, memory=memory, combiner="sqrtn"),
              CompressedEmbedding(50, D, memory=memory, combiner="sqrtn", gradient="sparse"),
              CompressedEmbedding(N, 16, memory=memory, combiner="sqrtn", table_offset=5000)]
    for layer in layers:
        layer.build(None)
    memory.array.assign(np.random.default_rng(2).normal(size=997).astype(np.float32))
    assert [layer.inner.table_offset for layer in layers] == [0, N, 5000]
    bags = tf.ragged.constant([[3, 7, 49], [], [-2, 0], [1, 1, 1]], dtype=tf.int64)
    weights = tf.ragged.constant([[1.0, 2.0, 0.5], [], [1.0, 3.0], [1.0, -1.0, 2.0]])
    for layer in layers:
        assert layer.uses_fused_bag_op()
        per_element = lambda flat, layer=layer: layer.inner(tf.reshape(flat, [-1, 1]))[:, 0, :]  # noqa: E731
        expected = bag_lookup(per_element, bags.values, bags.row_splits, weights.values, "sqrtn").numpy()
        out = layer(bags, weights=weights).numpy()
        np.testing.assert_array_equal(out, expected)
        assert out[0].any() and not out[1].any()
        served = layer.serving_lookup(bags, weights=weights, out_of_range="as_trained").numpy()
        np.testing.assert_allclose(served, out, rtol=1e-6, atol=1e-7)


def test_the_fused_bag_op_is_in_the_training_graph_only():
    fused, composite = fused_and_composite("mean", "auto")
    ids = tf.ragged.constant(BAGS, dtype=tf.int64)
    assert BAG_OPS & op_types(lambda x: fused(x), ids)
    assert not BAG_OPS & op_types(lambda x: composite(x), ids)  # use_custom_op=False: the composite
    # Dense ids with a combiner take the same path.
    assert BAG_OPS & op_types(lambda x: fused(x), tf.constant([[1, 2], [3, 4]]))
    # Serving graphs hold stock ops only.
    assert not BAG_OPS & op_types(lambda x: fused.serving_lookup(x), ids)
    served = fused.serving_lookup(ids, out_of_range="as_trained").numpy()
    np.testing.assert_allclose(served, fused(ids).numpy(), rtol=1e-6, atol=1e-7)


def test_out_of_range_rules_apply_to_the_ids_left_after_pruning():
    fused, composite = fused_and_composite("sum", "auto", out_of_range="mod")
    bags = tf.ragged.constant([[N, 2 * N + 3, -1], [5]], dtype=tf.int64)  # -1 is pruned, not folded
    np.testing.assert_array_equal(fused(bags).numpy(), composite(bags).numpy())
    np.testing.assert_array_equal(fused(bags).numpy()[0], fused(tf.ragged.constant([[0, 3]])).numpy()[0])
    strict, _ = fused_and_composite("sum", "auto")
    with pytest.raises(tf.errors.InvalidArgumentError, match=str(N)):
        strict(tf.ragged.constant([[1, N]], dtype=tf.int64))
    np.testing.assert_array_equal(strict(tf.ragged.constant([[-5]])).numpy(), np.zeros((1, D)))


def test_mixed_precision_bags_fused_and_composite_agree():
    # Under mixed_float16 the layer reads the memory as float16 (the fused op then computes in float32 on a copy);
    # the composite pooled float16 rows with float32 weight sums and failed with a dtype TypeError before.
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        fused, composite = fused_and_composite("mean", "auto")
        ids, weights = bag_input("ragged", True)
        outputs = [layer(ids, weights=weights) for layer in (fused, composite)]
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert outputs[0].dtype == outputs[1].dtype == tf.float16
    np.testing.assert_allclose(outputs[0].numpy(), outputs[1].numpy(), rtol=2e-3, atol=2e-3)


SWITCHED_OFF_CHILD = """
import tensorflow as tf
from tfcompress.layers import CompressedEmbedding
layer = CompressedEmbedding(200, 8, compression=5.0, combiner="sum")
bags = tf.ragged.constant([[1, 2], [], [-1, 3]], dtype=tf.int64)
ops = {op.type for op in tf.function(lambda x: layer(x)).get_concrete_function(bags).graph.get_operations()}
assert not layer.uses_fused_bag_op() and not {"RobeBagLookup", "RobeResourceBagLookup"} & ops, ops
assert layer(bags).shape == (3, 8)
print("switched off: composite")
"""


def test_tfcompress_custom_ops_0_switches_the_bag_op_off():
    # The switch is read once per process when the library loads, so it is checked in a fresh one.
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TFCOMPRESS_CUSTOM_OPS="0", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", SWITCHED_OFF_CHILD], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "switched off: composite" in result.stdout
