"""CompressedEmbedding (the drop-in for keras.layers.Embedding), bags, RobeMemory sharing, CompressedEmbeddings.

References are independent of the layer's own reshaping and pooling: the single-feature layer of the same method
with the same weights, `tf.nn.safe_embedding_lookup_sparse` on the materialized table, and one multi-table
`RobeEmbedding` over the same array.
"""

import numpy as np
import pytest
import tensorflow as tf

from tfcompress._keras import USING_LEGACY_KERAS, keras
from tfcompress.layers import (ChunkPrunedEmbedding, CompressedEmbedding, FullEmbedding, HashingTrickEmbedding,
                               MLETEmbedding, QREmbedding, RobeEmbedding, RobeMemory)
from tfcompress.layers.bag import bag_lookup

N, D = 200, 8

# method -> (CompressedEmbedding arguments, the equivalent single-feature layer)
METHOD_CASES = {
    "robe": (dict(compression=10.0, chunk_size=4),
             lambda: RobeEmbedding([N], D, compression=10.0, chunk_size=4)),
    "full": (dict(), lambda: FullEmbedding([N], D)),
    "hashing": (dict(compression=4.0), lambda: HashingTrickEmbedding([N], D, compression=4.0)),
    "qr": (dict(compression=4.0, options={"operation": "add"}),
           lambda: QREmbedding([N], D, compression=4.0, operation="add")),
    "mlet": (dict(options={"inner_dim": 12}), lambda: MLETEmbedding([N], D, inner_dim=12)),
    "pruned": (dict(compression=2.0, options={"num_chunks": 2}),
               lambda: ChunkPrunedEmbedding([N], D, num_chunks=2, budget=0.5)),
}


def random_weights(layer, seed=0):
    """Give every float weight of a built layer distinct random values (pruned pools read zeros otherwise)."""
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        if weight.dtype == tf.float32 and weight.trainable:
            weight.assign(rng.normal(size=weight.shape).astype(np.float32))


def materialized(layer, rows=N):
    """The logical [rows, D] table a single-table layer represents: the lookup of every id."""
    return layer(tf.range(rows, dtype=tf.int64)).numpy()


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_any_shape_ids_equal_the_single_feature_layer(method):
    arguments, reference_layer = METHOD_CASES[method]
    layer = CompressedEmbedding(N, D, method=method, **arguments)
    reference = reference_layer()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, N, size=(3, 5, 2))
    layer(ids[0, 0])  # builds
    reference.build((None, 1))
    random_weights(layer)
    reference.set_weights(layer.get_weights())
    if method == "pruned":  # make half of the chunks live, the same in both
        for target in (layer.inner, reference):
            keys = np.arange(0, N * 2, 2)
            target.addresses.assign(tf.tensor_scatter_nd_update(target.addresses, keys[:, None],
                                                                np.arange(N, dtype=np.int32)))
    expected = reference(ids.reshape(-1, 1), **({"training": False} if method == "pruned" else {})).numpy()
    expected = expected.reshape(-1, D)
    for shaped in (ids[0, 0, 0], ids[0, 0], ids[0], ids):  # [], [B], [B, L], [B, L, K]
        kwargs = {"training": False} if method == "pruned" else {}
        out = layer(shaped, **kwargs).numpy()
        assert out.shape == np.shape(shaped) + (D,)
        np.testing.assert_array_equal(out.reshape(-1, D), expected[:np.size(shaped)])
        served = layer.serving_lookup(shaped).numpy()
        np.testing.assert_array_equal(served, out)


def test_mask_zero_masks_id_zero_like_keras_embedding():
    layer = CompressedEmbedding(N, D, method="full", mask_zero=True)
    ids = tf.constant([[3, 0, 5], [0, 0, 1]])
    np.testing.assert_array_equal(layer.compute_mask(ids).numpy(),
                                  keras.layers.Embedding(N, D, mask_zero=True).compute_mask(ids).numpy())
    assert CompressedEmbedding(N, D, method="full").compute_mask(ids) is None
    # The mask reaches a masking consumer in a functional model: masked steps do not move the mean.
    inputs = keras.Input(shape=(3,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(layer(inputs))
    model = keras.Model(inputs, pooled)
    table = materialized(layer)
    np.testing.assert_allclose(model(ids).numpy()[1], table[1], rtol=1e-6)


# ---- bags: the safe_embedding_lookup_sparse contract ------------------------------------------------------------

BAGS = [[3, 7, 7, 199], [], [-1, 5], [0], [-4], [11, 12, 13, 14, 15, 16]]  # an empty row, ids < 0, repeats
BAG_WEIGHTS = [[1.0, 0.5, 2.0, -1.0], [], [3.0, 0.0], [2.5], [1.0], [1.0, 0.0, -2.0, 4.0, 0.25, 1.0]]


def sparse_of(rows, dtype):
    indices = [[r, c] for r, row in enumerate(rows) for c in range(len(row))]
    values = [v for row in rows for v in row]
    return tf.SparseTensor(tf.constant(indices, tf.int64), tf.constant(values, dtype), [len(rows), 6])


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", ["sparse", "ragged"])
def test_bags_equal_safe_embedding_lookup_sparse(combiner, weighted, kind):
    layer = CompressedEmbedding(N, D, method="robe", compression=5.0, chunk_size=4, combiner=combiner)
    layer.build(None)
    random_weights(layer)
    table = tf.constant(materialized(layer))
    expected = tf.nn.safe_embedding_lookup_sparse(
        table, sparse_of(BAGS, tf.int64), sparse_of(BAG_WEIGHTS, tf.float32) if weighted else None,
        combiner=combiner).numpy()
    if kind == "sparse":
        ids, weights = sparse_of(BAGS, tf.int64), sparse_of(BAG_WEIGHTS, tf.float32) if weighted else None
    else:
        ids = tf.ragged.constant(BAGS, dtype=tf.int64)
        weights = tf.ragged.constant(BAG_WEIGHTS, dtype=tf.float32) if weighted else None
    out = layer(ids, weights=weights).numpy()
    assert out.shape == (len(BAGS), D)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out[1], np.zeros(D))  # the empty row
    np.testing.assert_allclose(layer.serving_lookup(ids, weights=weights).numpy(), out, rtol=1e-6, atol=1e-7)


def test_sparse_ids_in_any_order_pool_like_ordered_ones():
    layer = CompressedEmbedding(N, D, method="full", combiner="sum")
    ordered = sparse_of(BAGS, tf.int64)
    weights = sparse_of(BAG_WEIGHTS, tf.float32)
    order = np.random.default_rng(0).permutation(len(ordered.values))
    shuffled = tf.SparseTensor(tf.gather(ordered.indices, order), tf.gather(ordered.values, order),
                               ordered.dense_shape)
    shuffled_weights = tf.SparseTensor(shuffled.indices, tf.gather(weights.values, order), weights.dense_shape)
    np.testing.assert_allclose(layer(shuffled, weights=shuffled_weights).numpy(),
                               layer(ordered, weights=weights).numpy(), rtol=1e-6)


def test_bag_gradient_equals_safe_embedding_lookup_sparse_gradient():
    layer = CompressedEmbedding(N, D, method="full", combiner="mean")
    layer.build(None)
    table = layer.inner.tables[0]
    table = getattr(table, "value", table) if not USING_LEGACY_KERAS else table  # the tf.Variable itself
    ids, weights = sparse_of(BAGS, tf.int64), sparse_of(BAG_WEIGHTS, tf.float32)
    upstream = tf.constant(np.random.default_rng(0).normal(size=(len(BAGS), D)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        ours = tf.reduce_sum(layer(ids, weights=weights) * upstream)
        reference = tf.reduce_sum(tf.nn.safe_embedding_lookup_sparse(table, ids, weights, combiner="mean") * upstream)
    np.testing.assert_allclose(tf.convert_to_tensor(tape.gradient(ours, table)).numpy(),
                               tf.convert_to_tensor(tape.gradient(reference, table)).numpy(), rtol=1e-6, atol=1e-7)


def test_bag_lookup_takes_any_lookup_function():
    """The seam a fused bag op replaces: bag_lookup only needs ids -> rows."""
    table = tf.constant(np.arange(40, dtype=np.float32).reshape(10, 4))
    out = bag_lookup(lambda ids: tf.gather(table, ids), tf.constant([1, 2, -1, 3]), tf.constant([0, 2, 2, 4]),
                     None, "sum").numpy()
    np.testing.assert_array_equal(out, [table[1] + table[2], np.zeros(4), table[3]])


def test_ragged_ids_without_a_combiner_give_ragged_embeddings():
    layer = CompressedEmbedding(N, D, method="hashing", compression=3.0)
    ids = tf.ragged.constant([[3, 7, 9], [], [5]], dtype=tf.int64)
    out = layer(ids)
    assert isinstance(out, tf.RaggedTensor)
    np.testing.assert_array_equal(out.row_lengths().numpy(), [3, 0, 1])
    np.testing.assert_array_equal(out.flat_values.numpy(), layer(ids.flat_values).numpy())
    assert isinstance(layer.serving_lookup(ids), tf.RaggedTensor)


# ---- bad input -------------------------------------------------------------------------------------------------


def test_bad_input_is_refused_naming_the_layer():
    layer = CompressedEmbedding(N, D, method="full", name="genres")
    with pytest.raises(TypeError, match="genres.*float32"):
        layer(tf.constant([1.0, 2.0]))
    with pytest.raises(ValueError, match="genres.*combiner"):
        layer(sparse_of(BAGS, tf.int64))
    with pytest.raises(ValueError, match="genres.*combiner"):
        layer(tf.ragged.constant([[1]]), weights=tf.ragged.constant([[1.0]]))
    with pytest.raises(ValueError, match="weights"):
        layer(tf.constant([1]), weights=tf.constant([1.0]))
    with pytest.raises(ValueError, match="method"):
        CompressedEmbedding(N, D, method="bloom")
    with pytest.raises(ValueError, match="compression"):
        CompressedEmbedding(N, D, method="hashing")
    with pytest.raises(ValueError, match="combiner"):
        CompressedEmbedding(N, D, method="full", combiner="max")
    with pytest.raises(ValueError, match="chunk_size.*robe"):
        CompressedEmbedding(N, D, method="full", chunk_size=4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="id out of range"):
        layer(tf.constant([N]))


# ---- config and saving -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_config_round_trip(method):
    arguments, _ = METHOD_CASES[method]
    layer = CompressedEmbedding(N, D, method=method, mask_zero=True, **arguments)
    ids = np.array([[1, 2], [3, 199]])
    kwargs = {"training": False} if method == "pruned" else {}
    layer(ids, **kwargs)
    random_weights(layer)
    clone = CompressedEmbedding.from_config(layer.get_config())
    clone(ids, **kwargs)
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == layer.get_config()
    np.testing.assert_array_equal(clone(ids, **kwargs).numpy(), layer(ids, **kwargs).numpy())


# ---- one shared ROBE memory ------------------------------------------------------------------------------------

SHARED_CARDS = [300, 17, 1000]


@pytest.mark.parametrize("use_custom_op", [False, "auto"])
@pytest.mark.parametrize("signed", [False, True])
def test_shared_memory_layers_equal_one_multi_table_robe_bit_for_bit(use_custom_op, signed):
    """N CompressedEmbedding layers over one RobeMemory read, and train, exactly one N-table RobeEmbedding."""
    memory = RobeMemory(size=97, chunk_size=3, seed=7, signed=signed)
    layers = [CompressedEmbedding(n, D, memory=memory, options={"use_custom_op": use_custom_op})
              for n in SHARED_CARDS]
    assert [layer.inner.table_offset for layer in layers] == [0, 300, 317]
    reference = RobeEmbedding(SHARED_CARDS, D, memory_size=97, chunk_size=3, seed=7, signed=signed,
                              use_custom_op=use_custom_op)
    rng = np.random.default_rng(3)
    ids = np.stack([rng.integers(0, n, 64) for n in SHARED_CARDS], axis=1)
    for layer in layers:
        layer.build(None)
    reference.build((None, len(SHARED_CARDS)))
    memory.array.assign(rng.normal(size=97).astype(np.float32))
    reference.memory.assign(memory.array)
    # Integer upstream gradients: every partial sum is exact, so the two gradients agree bit for bit whatever
    # order the scatter-adds run in.
    upstream = rng.integers(-3, 4, size=(64, len(SHARED_CARDS), D)).astype(np.float32)
    with tf.GradientTape(persistent=True) as tape:
        shared = tf.stack([layer(ids[:, t]) for t, layer in enumerate(layers)], axis=1)
        expected = reference(ids)
        shared_loss = tf.reduce_sum(shared * upstream)
        expected_loss = tf.reduce_sum(expected * upstream)
    np.testing.assert_array_equal(shared.numpy(), expected.numpy())
    np.testing.assert_array_equal(tf.convert_to_tensor(tape.gradient(shared_loss, memory.array)).numpy(),
                                  tf.convert_to_tensor(tape.gradient(expected_loss, reference.memory)).numpy())
    served = np.stack([layer.serving_lookup(ids[:, t]).numpy() for t, layer in enumerate(layers)], axis=1)
    np.testing.assert_array_equal(served, reference.serving_lookup(ids).numpy())


def test_robe_embedding_and_compressed_embedding_share_one_memory():
    memory = RobeMemory(compression=20.0, chunk_size=4)
    pair = RobeEmbedding(SHARED_CARDS[:2], D, memory=memory)
    single = CompressedEmbedding(SHARED_CARDS[2], D, memory=memory, table_offset=None)
    assert single.inner.table_offset == sum(SHARED_CARDS[:2])
    model_weights_before = len(memory.weights)
    ids = np.array([[1, 2, 3], [299, 16, 999]])
    out_pair, out_single = pair(ids[:, :2]), single(ids[:, 2])
    assert memory.size == int(np.ceil(sum(SHARED_CARDS) * D / 20.0))
    assert pair.memory is single.inner.memory is memory.array and model_weights_before == 0
    reference = RobeEmbedding(SHARED_CARDS, D, memory_size=memory.size, chunk_size=4)
    reference.build((None, 3))
    reference.memory.assign(memory.array)
    expected = reference(ids).numpy()
    np.testing.assert_array_equal(out_pair.numpy(), expected[:, :2])
    np.testing.assert_array_equal(out_single.numpy(), expected[:, 2])


def test_shared_memory_is_one_weight_of_the_model_and_trains():
    memory = RobeMemory(size=128, chunk_size=4)
    users, items = CompressedEmbedding(500, D, memory=memory), CompressedEmbedding(80, D, memory=memory)
    user_ids = keras.Input(shape=(), dtype="int64")
    item_ids = keras.Input(shape=(), dtype="int64")
    score = keras.layers.Dense(1)(keras.layers.Concatenate()([users(user_ids), items(item_ids)]))
    model = keras.Model([user_ids, item_ids], score)
    assert sum(w.shape == (128,) for w in model.weights) == 1
    assert model.count_params() == 128 + 2 * D + 1
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    rng = np.random.default_rng(0)
    x = [rng.integers(0, 500, 256), rng.integers(0, 80, 256)]
    y = (x[0] % 2).astype(np.float32)
    before = memory.array.numpy().copy()
    history = model.fit(x, y, epochs=3, batch_size=64, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert not np.array_equal(before, memory.array.numpy())


def test_mismatched_shared_memory_settings_are_refused_naming_both():
    memory = RobeMemory(size=64, chunk_size=4, name="ads_memory")
    CompressedEmbedding(100, D, memory=memory)
    with pytest.raises(ValueError, match="(?s)items.*chunk_size=2.*ads_memory.*chunk_size=4"):
        CompressedEmbedding(100, D, memory=memory, chunk_size=2, name="items")
    with pytest.raises(ValueError, match="seed"):
        RobeEmbedding([10], D, memory=memory, seed=3)
    with pytest.raises(ValueError, match="compression= or memory="):
        CompressedEmbedding(100, D, memory=memory, compression=4.0)
    with pytest.raises(ValueError, match="method='robe'"):
        CompressedEmbedding(100, D, method="full", memory=memory)
    with pytest.raises(ValueError, match="overlap"):
        CompressedEmbedding(100, D, memory=memory, table_offset=50)
    with pytest.raises(ValueError, match="output_dim=2 is below the chunk_size=4"):
        CompressedEmbedding(100, 2, memory=memory)
    late = RobeMemory(compression=10.0, chunk_size=4)
    CompressedEmbedding(100, D, memory=late)(tf.constant([1]))
    with pytest.raises(ValueError, match="after its array was made"):
        CompressedEmbedding(100, D, memory=late)


def shared_model():
    memory = RobeMemory(compression=8.0, chunk_size=4)
    history = keras.Input(shape=(5,), dtype="int64", name="history")
    item = keras.Input(shape=(), dtype="int64", name="item")
    # Used in the graph in the opposite order of creation: offsets must come from the config, not the call order.
    item_layer = CompressedEmbedding(300, D, memory=memory, name="item_embedding")
    history_layer = CompressedEmbedding(300, D, memory=memory, mask_zero=True, name="history_embedding")
    genre_layer = CompressedEmbedding(40, D, method="hashing", compression=2.0, name="genre_embedding")
    pooled = keras.layers.GlobalAveragePooling1D()(history_layer(history))
    genre = keras.Input(shape=(3,), dtype="int64", name="genre")
    genres = keras.layers.GlobalAveragePooling1D()(genre_layer(genre))
    out = keras.layers.Dense(1)(keras.layers.Concatenate()([pooled, item_layer(item), genres]))
    return keras.Model([history, item, genre], out)


def model_inputs(rows=16, seed=0):
    rng = np.random.default_rng(seed)
    history = rng.integers(0, 300, (rows, 5))
    history[:, 3:] = 0
    return [history, rng.integers(0, 300, rows), rng.integers(0, 40, (rows, 3))]


def test_keras_file_round_trip_keeps_the_memory_shared(tmp_path):
    model = shared_model()
    inputs = model_inputs()
    model.predict(inputs, verbose=0)
    for weight in model.weights:
        weight.assign(np.random.default_rng(1).normal(size=weight.shape).astype(np.float32))
    path = str(tmp_path / "shared.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0))
    item, history = loaded.get_layer("item_embedding"), loaded.get_layer("history_embedding")
    assert item.memory is history.memory
    assert (item.inner.table_offset, history.inner.table_offset) == (0, 300)
    assert len(loaded.weights) == len(model.weights)
