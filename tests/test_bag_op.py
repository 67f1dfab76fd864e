"""The fused pooled (bag) ROBE-Z op (custom_ops/robe_bag_*.cc, `fused_ops.robe_bag_lookup`) against references.

References: `lookup.robe_bag_lookup_reference` (the per-element pure-TF ROBE-Z lookup + weights + segment sum +
divide_no_nan) and, for the semantics, `tf.nn.safe_embedding_lookup_sparse` on the materialized table. Gradients
are checked against tf.GradientTape over the reference. The library is built on first use; a machine where it
cannot load fails here (with the reason) rather than skipping.
"""

import numpy as np
import pytest
import tensorflow as tf

from tfcompress import fused_ops, lookup

CARDINALITY = 300
OFFSET = 1234  # a table that is not the first of the shared array
MEMORY_SIZE = 4001
COMBINERS = ("sum", "mean", "sqrtn")


@pytest.fixture(scope="module", autouse=True)
def library():
    assert fused_ops.load_library() is not None, f"custom ops did not load: {fused_ops.unavailable_reason()}"


def ragged_bag(rng, lengths):
    """(ids i64[N], row_splits i64[B + 1], weights f32[N] in [0.1, 2))."""
    row_splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(0, CARDINALITY, row_splits[-1]).astype(np.int64)
    weights = rng.uniform(0.1, 2.0, row_splits[-1]).astype(np.float32)
    return ids, row_splits, weights


# Empty rows first, in the middle and last (segment_sum would drop a trailing one); a row of 2000 ids.
LENGTHS = [0, 3, 1, 0, 7, 2000, 5, 0, 1, 0]


def spec(output_dim=12, chunk_size=4, signed=False, combiner="sum", seed=77):
    return dict(offset=OFFSET, cardinality=CARDINALITY, output_dim=output_dim, chunk_size=chunk_size, seed=seed,
                signed=signed, combiner=combiner)


def memory_values(rng, size=MEMORY_SIZE):
    return rng.standard_normal(size).astype(np.float32)


@pytest.mark.parametrize("combiner", COMBINERS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_forward_equals_reference_bit_for_bit(combiner, weighted, signed):
    # The kernel sums each row in id order and divides last, the order of the reference's unsorted_segment_sum and
    # divide_no_nan: the values agree exactly, not only within rounding.
    rng = np.random.default_rng(1)
    ids, row_splits, weights = ragged_bag(rng, LENGTHS)
    memory = tf.Variable(memory_values(rng))
    w = weights if weighted else None
    fused = fused_ops.robe_bag_lookup(memory, ids, row_splits, w, **spec(signed=signed, combiner=combiner))
    reference = lookup.robe_bag_lookup_reference(memory, ids, row_splits, w, **spec(signed=signed, combiner=combiner))
    assert fused.shape == (len(LENGTHS), 12)
    np.testing.assert_array_equal(fused.numpy(), reference.numpy())
    empty = [b for b, n in enumerate(LENGTHS) if n == 0]
    assert not fused.numpy()[empty].any(), "empty rows must be zeros"


@pytest.mark.parametrize("output_dim,chunk_size", [(1, 1), (16, 16), (7, 3), (33, 2), (40, 5)])
def test_forward_every_chunk_shape(output_dim, chunk_size):
    # Compile-time chunk sizes (1, 2, 4, ..., 32), the generic path (3, 5) and a shorter last chunk (7/3, 33/2).
    rng = np.random.default_rng(output_dim)
    ids, row_splits, weights = ragged_bag(rng, rng.integers(0, 9, 50))
    memory = tf.constant(memory_values(rng))
    kwargs = spec(output_dim=output_dim, chunk_size=chunk_size, combiner="sqrtn", signed=output_dim % 2 == 1)
    fused = fused_ops.robe_bag_lookup(memory, ids, row_splits, weights, **kwargs)
    reference = lookup.robe_bag_lookup_reference(memory, ids, row_splits, weights, **kwargs)
    np.testing.assert_allclose(fused.numpy(), reference.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("combiner", COMBINERS)
@pytest.mark.parametrize("weighted", [False, True])
def test_semantics_equal_safe_embedding_lookup_sparse(combiner, weighted):
    # The contract itself: the bag of the fused op equals tf.nn.safe_embedding_lookup_sparse over the table that
    # the per-element lookup materializes (row x = the ROBE-Z embedding of id x of this table).
    rng = np.random.default_rng(2)
    lengths = [2, 0, 5, 1, 0, 3]
    ids, row_splits, weights = ragged_bag(rng, lengths)
    memory = tf.constant(memory_values(rng))
    kwargs = spec(signed=True, combiner=combiner)
    all_ids = np.arange(CARDINALITY, dtype=np.int64)
    table = lookup.robe_bag_lookup_reference(memory, all_ids, np.arange(CARDINALITY + 1), **{**kwargs,
                                                                                              "combiner": "sum"})
    ragged = tf.RaggedTensor.from_row_splits(ids, row_splits)
    sparse_ids = ragged.to_sparse()
    sparse_weights = tf.RaggedTensor.from_row_splits(weights, row_splits).to_sparse() if weighted else None
    expected = tf.nn.safe_embedding_lookup_sparse(table, sparse_ids, sparse_weights, combiner=combiner)
    fused = fused_ops.robe_bag_lookup(memory, ids, row_splits, weights if weighted else None, **kwargs)
    np.testing.assert_allclose(fused.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_empty_batch_and_all_empty_rows():
    memory = tf.constant(memory_values(np.random.default_rng(3)))
    none = fused_ops.robe_bag_lookup(memory, np.zeros([0], np.int64), [0], **spec(combiner="mean"))
    assert none.shape == (0, 12)
    empty = fused_ops.robe_bag_lookup(memory, np.zeros([0], np.int64), [0, 0, 0], np.zeros([0], np.float32),
                                      **spec(combiner="sqrtn"))
    np.testing.assert_array_equal(empty.numpy(), np.zeros([2, 12], np.float32))


def gradients(fn, memory_init, ids, row_splits, weights, kwargs, use_variable):
    """(memory gradient as a dense array, its raw form, weights gradient or None) of sum(fn(...) * probe)."""
    probe = tf.constant(np.random.default_rng(9).standard_normal([len(row_splits) - 1, kwargs["output_dim"]]),
                        tf.float32)
    memory = tf.Variable(memory_init) if use_variable else tf.constant(memory_init)
    w = None if weights is None else tf.constant(weights)
    with tf.GradientTape() as tape:
        if not use_variable:
            tape.watch(memory)
        if w is not None:
            tape.watch(w)
        loss = tf.reduce_sum(fn(memory, ids, row_splits, w, **kwargs) * probe)
    memory_grad, weights_grad = tape.gradient(loss, [memory, w] if w is not None else [memory, memory])
    dense = tf.convert_to_tensor(memory_grad).numpy()
    return dense, memory_grad, (None if w is None else weights_grad.numpy())


@pytest.mark.parametrize("combiner", COMBINERS)
@pytest.mark.parametrize("gradient", ["dense", "sparse"])
@pytest.mark.parametrize("weighted", [False, True])
def test_gradients_equal_tape_over_reference(combiner, gradient, weighted):
    rng = np.random.default_rng(4)
    ids, row_splits, weights = ragged_bag(rng, [0, 3, 1, 0, 7, 300, 5, 0])
    init = memory_values(rng)
    w = weights if weighted else None
    kwargs = {**spec(signed=True, combiner=combiner), "gradient": gradient}
    for use_variable in (True, False):  # RobeResourceBagLookup and RobeBagLookup
        fused_dense, fused_raw, fused_w = gradients(fused_ops.robe_bag_lookup, init, ids, row_splits, w, kwargs,
                                                    use_variable)
        ref_dense, _, ref_w = gradients(lookup.robe_bag_lookup_reference, init, ids, row_splits, w, kwargs,
                                        use_variable)
        np.testing.assert_allclose(fused_dense, ref_dense, rtol=1e-5, atol=1e-5)
        if gradient == "sparse":
            assert isinstance(fused_raw, tf.IndexedSlices)
            indices = fused_raw.indices.numpy()
            assert np.all(np.diff(indices) > 0), "sparse gradient indices must be sorted and unique"
            assert int(fused_raw.dense_shape[0]) == MEMORY_SIZE
        else:
            assert isinstance(fused_raw, tf.Tensor)
        if weighted:
            np.testing.assert_allclose(fused_w, ref_w, rtol=1e-4, atol=1e-5)


def test_gradient_in_tf_function_and_for_a_weights_only_tape():
    # Graph mode (shape functions, the registered gradient in a FuncGraph), and a tape that watches only the
    # weights: the op must still give their gradient.
    rng = np.random.default_rng(5)
    ids, row_splits, weights = ragged_bag(rng, [4, 0, 6, 2])
    memory = tf.Variable(memory_values(rng))
    kwargs = spec(combiner="mean")

    @tf.function
    def step(fn, w):
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = tf.reduce_sum(tf.square(fn(memory, ids, row_splits, w, **kwargs)))
        return tape.gradient(loss, [memory, w])

    w = tf.constant(weights)
    (fused_m, fused_w), (ref_m, ref_w) = step(fused_ops.robe_bag_lookup, w), step(lookup.robe_bag_lookup_reference, w)
    np.testing.assert_allclose(fused_m.numpy(), ref_m.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused_w.numpy(), ref_w.numpy(), rtol=1e-5, atol=1e-6)
    with tf.GradientTape() as tape:
        tape.watch(w)
        loss = tf.reduce_sum(fused_ops.robe_bag_lookup(tf.constant(memory.numpy()), ids, row_splits, w, **kwargs))
    assert tape.gradient(loss, w) is not None


def test_scatter_algorithms_agree():
    # The bag's dense gradient reuses the per-element scatters: every algorithm gives the same sums, and serial
    # equals destination_ranges bit for bit.
    rng = np.random.default_rng(6)
    ids, row_splits, weights = ragged_bag(rng, rng.integers(0, 30, 400))
    grad = tf.constant(rng.standard_normal([400, 12]), tf.float32)
    library = fused_ops.load_library()
    attrs = fused_ops._bag_attrs(OFFSET, CARDINALITY, 12, 4, 77, True, "sqrtn", True)
    results = {algorithm: library.robe_bag_lookup_grad(grad, ids, row_splits, weights, MEMORY_SIZE,
                                                       scatter_algorithm=algorithm, **attrs).numpy()
               for algorithm in ("serial", "partial_sums", "destination_ranges", "auto")}
    np.testing.assert_array_equal(results["serial"], results["destination_ranges"])
    for values in results.values():
        np.testing.assert_allclose(values, results["serial"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row_splits,message", [
    ([0, 3, 2, 5], r"row_splits must be non-decreasing, got row_splits\[2\] = 2 < row_splits\[1\] = 3"),
    ([0, 2, 4], r"row_splits\[-1\] must equal the number of ids \(5\), got 4"),
    ([1, 2, 5], r"row_splits\[0\] must be 0, got 1"),
    ([], r"row_splits must be a vector \[B \+ 1\]"),
])
def test_bad_row_splits_are_named(row_splits, message):
    memory = tf.constant(memory_values(np.random.default_rng(7)))
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        fused_ops.robe_bag_lookup(memory, np.arange(5), np.array(row_splits, np.int64), **spec())


def test_bad_weights_ids_and_arguments_are_named():
    memory = tf.constant(memory_values(np.random.default_rng(8)))
    ids = np.array([1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match=r"weights must have the shape of ids \(5,\) \(one per id\), got \(4,\)"):
        fused_ops.robe_bag_lookup(memory, ids, [0, 2, 5], np.ones(4, np.float32), **spec())
    with pytest.raises(ValueError, match=r"ids must be 1-D, got shape \(5, 1\)"):
        fused_ops.robe_bag_lookup(memory, ids[:, None], [0, 2, 5], **spec())

    # With shapes unknown until run time the kernel names the argument.
    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.float32)])
    def unknown_lengths(ids, weights):
        return fused_ops.robe_bag_lookup(memory, ids, [0, 2, 5], weights, **spec())

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"weights must have shape \[5\] \(one per id\), got \[4\]"):
        unknown_lengths(ids, np.ones(4, np.float32))
    with pytest.raises(TypeError, match="ids must be an integer tensor, got dtype float32"):
        fused_ops.robe_bag_lookup(memory, ids.astype(np.float32), [0, 2, 5], **spec())
    with pytest.raises(TypeError, match="weights must be a float tensor, got dtype int64"):
        fused_ops.robe_bag_lookup(memory, ids, [0, 2, 5], np.ones(5, np.int64), **spec())
    with pytest.raises(TypeError, match="row_splits must be an integer tensor"):
        fused_ops.robe_bag_lookup(memory, ids, np.array([0.0, 2.0, 5.0]), **spec())
    with pytest.raises(ValueError, match="combiner must be one of"):
        fused_ops.robe_bag_lookup(memory, ids, [0, 2, 5], **{**spec(), "combiner": "max"})
    with pytest.raises(ValueError, match="gradient must be 'dense' or 'sparse'"):
        fused_ops.robe_bag_lookup(memory, ids, [0, 2, 5], **spec(), gradient="auto")
    bad = np.array([1, 2, CARDINALITY, 4, 5])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"id out of range: ids\[2\] = {CARDINALITY} \(row 1\), allowed \[0, {CARDINALITY}\)"):
        fused_ops.robe_bag_lookup(memory, bad, [0, 2, 5], **spec())
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"id out of range: ids\[0\] = -1 \(row 0\)"):
        fused_ops.robe_bag_lookup(memory, np.array([-1, 2]), [0, 2], **spec())
