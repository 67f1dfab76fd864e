"""CompressedEmbedding (the drop-in for keras.layers.Embedding), bags, RobeMemory sharing, CompressedEmbeddings.

References are independent of the layer's own reshaping and pooling: the single-feature layer of the same method
with the same weights, `tf.nn.safe_embedding_lookup_sparse` on the materialized table, and one multi-table
`RobeEmbedding` over the same array.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfcompress._keras import USING_LEGACY_KERAS, keras
from tfcompress.layers import (ChunkPrunedEmbedding, CompressedEmbedding, CompressedEmbeddings, FullEmbedding,
                               HashingTrickEmbedding, MLETEmbedding, QREmbedding, RobeEmbedding, RobeMemory,
                               sharing_scope)
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
    # A pooled bag has no per-id axis left to mask.
    assert CompressedEmbedding(N, D, method="full", mask_zero=True, combiner="sum").compute_mask(ids) is None
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


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_sparse_ids_that_are_not_right_ragged_pool_like_safe_embedding_lookup_sparse(combiner):
    # Only each entry's row counts: columns with gaps ([3, 0], [3, 2]), starting past 0 ([1, 4]) and given out of
    # order are a valid bag, as for safe_embedding_lookup_sparse (RaggedTensor.from_sparse would refuse them).
    layer = CompressedEmbedding(N, D, method="robe", compression=5.0, chunk_size=4, combiner=combiner)
    layer.build(None)
    random_weights(layer)
    table = tf.constant(materialized(layer))
    indices = tf.constant([[3, 2], [1, 4], [3, 0], [1, 5], [4, 1]], tf.int64)
    ids = tf.SparseTensor(indices, tf.constant([17, 4, 199, -1, 8], tf.int64), [6, 6])
    weights = tf.SparseTensor(indices, tf.constant([0.5, 2.0, 1.5, 1.0, 0.0]), [6, 6])
    for w in (None, weights):
        expected = tf.nn.safe_embedding_lookup_sparse(table, ids, w, combiner=combiner).numpy()
        for out in (layer(ids, weights=w), layer.serving_lookup(ids, weights=w)):
            np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert not layer(ids).numpy()[[0, 2, 5]].any()


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
    with pytest.raises(ValueError, match="input_dim must be an integer >= 1, got 0"):
        CompressedEmbedding(0, D, method="full")
    with pytest.raises(ValueError, match="compression"):
        CompressedEmbedding(N, D, method="hashing")
    with pytest.raises(ValueError, match="combiner"):
        CompressedEmbedding(N, D, method="full", combiner="max")
    with pytest.raises(ValueError, match="chunk_size.*robe"):
        CompressedEmbedding(N, D, method="full", chunk_size=4)
    with pytest.raises(ValueError, match="options may not set 'budget'"):
        CompressedEmbedding(N, D, method="pruned", options={"budget": 0.5})
    with pytest.raises(ValueError, match="QREmbedding has no option 'inner_dim'"):
        CompressedEmbedding(N, D, method="qr", compression=2.0, options={"inner_dim": 4})
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
    with pytest.raises(ValueError, match="initialized by its RobeMemory"):
        CompressedEmbedding(100, D, memory=memory, embeddings_initializer="zeros")
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


def test_config_round_trip_of_shared_layers_needs_the_sharing_scope():
    model = shared_model()
    inputs = model_inputs()
    model.predict(inputs, verbose=0)
    if USING_LEGACY_KERAS:
        # tf_keras' Model.from_config opens its own shared-object loading scope, which keeps the memory shared.
        clone = keras.Model.from_config(model.get_config())
        assert clone.get_layer("item_embedding").memory is clone.get_layer("history_embedding").memory
    else:
        # Keras re-raises the ValueError of a layer's from_config as a TypeError quoting it.
        with pytest.raises((ValueError, TypeError), match="(?s)holds 2 tables.*sharing_scope"):
            keras.Model.from_config(model.get_config())
    with sharing_scope():
        clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    assert clone.get_layer("item_embedding").memory is clone.get_layer("history_embedding").memory
    np.testing.assert_array_equal(clone.predict(inputs, verbose=0), model.predict(inputs, verbose=0))



def test_saved_model_round_trip_keeps_the_memory_shared(tmp_path):
    """Keras 3: `model.export` serves the same predictions. tf_keras (TFRS stacks): a SavedModel directory serves
    them, and `load_model(directory)` rebuilds the layers with one shared memory (not generic revived layers,
    which would lose the mask)."""
    model = shared_model()
    inputs = model_inputs()
    expected = model.predict(inputs, verbose=0)
    path = str(tmp_path / "saved_model")
    if not USING_LEGACY_KERAS:
        model.export(path, verbose=False)
        reloaded = tf.saved_model.load(path)  # kept: its functions read variables the object owns
        np.testing.assert_allclose(reloaded.serve(inputs).numpy(), expected, rtol=1e-6)
        return
    model.save(path, save_format="tf")
    served = tf.saved_model.load(path).signatures["serving_default"](
        history=tf.constant(inputs[0]), item=tf.constant(inputs[1]), genre=tf.constant(inputs[2]))
    np.testing.assert_allclose(list(served.values())[0].numpy(), expected, rtol=1e-6)
    loaded = keras.models.load_model(path)
    assert type(loaded.get_layer("history_embedding")) is CompressedEmbedding
    assert loaded.get_layer("item_embedding").memory is loaded.get_layer("history_embedding").memory
    np.testing.assert_allclose(loaded.predict(inputs, verbose=0), expected, rtol=1e-6)

# ---- legacy tf.keras ---------------------------------------------------------------------------------------------

LEGACY_CHILD = """
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
import test_compressed_embedding as t
from tfcompress._keras import USING_LEGACY_KERAS
assert USING_LEGACY_KERAS, "the child did not run on tf_keras"
for method in sorted(t.METHOD_CASES):
    t.test_any_shape_ids_equal_the_single_feature_layer(method)
t.test_config_round_trip("robe")
t.test_mask_zero_masks_id_zero_like_keras_embedding()
for combiner, kind in (("sum", "ragged"), ("mean", "sparse"), ("sqrtn", "ragged")):
    t.test_bags_equal_safe_embedding_lookup_sparse(combiner, True, kind)
t.test_dense_ids_with_a_combiner_pool_the_last_axis_like_embed_reduce("mean")
t.test_bag_gradient_equals_safe_embedding_lookup_sparse_gradient()
t.test_ragged_ids_without_a_combiner_give_ragged_embeddings()
t.test_shared_memory_layers_equal_one_multi_table_robe_bit_for_bit(False, True)
t.test_shared_memory_is_one_weight_of_the_model_and_trains()
t.test_keras_file_round_trip_keeps_the_memory_shared(Path(tempfile.mkdtemp()))
t.test_config_round_trip_of_shared_layers_needs_the_sharing_scope()
t.test_saved_model_round_trip_keeps_the_memory_shared(Path(tempfile.mkdtemp()))
t.test_bad_input_is_refused_naming_the_layer()
print("legacy tf.keras: all passed")
"""


def test_the_same_tests_pass_under_legacy_tf_keras():
    """One child process on tf_keras (TF_USE_LEGACY_KERAS=1 must be set before TensorFlow is imported) runs the
    contract tests of this file: any-shape ids, mask, bags, sharing, .keras and config round trips, bad input."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", LEGACY_CHILD], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "legacy tf.keras: all passed" in result.stdout


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_dense_ids_with_a_combiner_pool_the_last_axis_like_embed_reduce(combiner):
    keras_rs = pytest.importorskip("keras_rs") if not USING_LEGACY_KERAS else None
    layer = CompressedEmbedding(N, D, method="full", combiner=combiner)
    ids = np.random.default_rng(0).integers(0, N, size=(4, 3))
    weights = np.random.default_rng(1).uniform(0.5, 2.0, size=(4, 3)).astype(np.float32)
    layer.build(None)
    table = materialized(layer)
    out = layer(ids, weights=weights).numpy()
    assert out.shape == (4, D) and layer.compute_output_shape((4, 3)) == (4, D)
    if keras_rs is not None:
        reference = keras_rs.layers.EmbedReduce(N, D, combiner=combiner)
        reference.build((None, 3))
        reference.set_weights([table])
        np.testing.assert_allclose(out, reference(ids, weights).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer(ids[:, 0]).numpy(), reference(ids[:, 0]).numpy(), rtol=1e-6)
    np.testing.assert_allclose(out[:, None], layer(ids[:, None], weights=weights[:, None]).numpy(), rtol=1e-6)


# ---- keras-rs feature configs ------------------------------------------------------------------------------------


def keras_rs_features(keras_rs):
    items = keras_rs.layers.TableConfig("items", vocabulary_size=500, embedding_dim=D, combiner="sum")
    genres = keras_rs.layers.TableConfig("genres", vocabulary_size=30, embedding_dim=4, combiner="mean")
    return {
        "item": keras_rs.layers.FeatureConfig("item", items, (None,), (None, D)),
        "context": {"history": keras_rs.layers.FeatureConfig("history", items, (None, 6), (None, D)),
                    "genres": keras_rs.layers.FeatureConfig("genres", genres, (None, None), (None, 4))},
    }


def keras_rs_inputs(rows=8, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 4, rows)
    genres = tf.RaggedTensor.from_row_lengths(rng.integers(0, 30, int(lengths.sum())), lengths)
    return {"item": rng.integers(0, 500, rows), "context": {"history": rng.integers(0, 500, (rows, 6)),
                                                             "genres": genres}}


@pytest.mark.skipif(USING_LEGACY_KERAS, reason="keras-rs is a Keras 3 library")
def test_compressed_embeddings_take_keras_rs_feature_configs_in_one_memory(tmp_path):
    import keras_rs

    features = keras_rs_features(keras_rs)
    layer = CompressedEmbeddings(features, method="robe", ratio=10)
    inputs = keras_rs_inputs()
    out = layer(inputs)
    assert tf.nest.map_structure(lambda t: tuple(t.shape), out) == {
        "item": (8, D), "context": {"history": (8, D), "genres": (8, 4)}}
    # One memory for both tables, sized by the ratio over all of them; features of one table read one layer.
    assert layer.memory.size == int(np.ceil((500 * D + 30 * 4) / 10))
    assert [w.shape for w in layer.weights] == [(layer.memory.size,)]
    # Tables are laid out in the order tf.nest flattens the features (dict keys sorted): genres, then items.
    genres, items = layer.table_layers
    assert (genres.name, items.name) == ("genres", "items")
    assert (genres.inner.table_offset, items.inner.table_offset) == (0, 30)
    np.testing.assert_array_equal(out["item"].numpy(), items(inputs["item"]).numpy())
    np.testing.assert_array_equal(out["context"]["history"].numpy(), items(inputs["context"]["history"]).numpy())
    # Per-id weights come in the inputs' structure and reach the table's bag.
    weights = tf.nest.map_structure(lambda ids: tf.ones_like(ids, tf.float32) * 2.0, inputs)
    weighted = layer(inputs, weights=weights)
    np.testing.assert_allclose(weighted["item"].numpy(), 2.0 * out["item"].numpy(), rtol=1e-6)  # "sum" table
    np.testing.assert_allclose(weighted["context"]["genres"].numpy(), out["context"]["genres"].numpy(),
                               rtol=1e-6, atol=1e-7)  # "mean" table: uniform weights cancel
    with pytest.raises(ValueError, match="structure of feature_configs"):
        layer({"item": inputs["item"]})
    # With full tables, the values keras-rs' own DistributedEmbedding returns for the same tables.
    full = CompressedEmbeddings(features, method="full")
    reference = keras_rs.layers.DistributedEmbedding(features)
    reference(inputs)
    full(inputs)
    for table_layer in full.table_layers:
        random_weights(table_layer)
        reference._default_device_embedding_layers[
            "item" if table_layer.name == "items" else "context.genres"].set_weights(table_layer.get_weights())
    tf.nest.map_structure(lambda a, b: np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7),
                          full(inputs), reference(inputs))
    # A functional model trains and round-trips through a .keras file.
    item_in = keras.Input(shape=(), dtype="int64", name="item")
    history_in = keras.Input(shape=(6,), dtype="int64", name="history")
    embedded = CompressedEmbeddings(keras_rs_features(keras_rs), method="hashing", budget=4000)(
        {"item": item_in, "context": {"history": history_in, "genres": history_in}})
    score = keras.layers.Dense(1)(keras.layers.Concatenate()(
        [embedded["item"], embedded["context"]["history"], embedded["context"]["genres"]]))
    model = keras.Model([item_in, history_in], score)
    model.compile(optimizer="adam", loss="mse")
    x = [inputs["item"], inputs["context"]["history"] % 30]
    model.fit(x, np.ones(8), epochs=1, verbose=0)
    path = str(tmp_path / "keras_rs.keras")
    model.save(path)
    np.testing.assert_array_equal(keras.models.load_model(path).predict(x, verbose=0), model.predict(x, verbose=0))
    clone = CompressedEmbeddings.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.table_layers[1].inner.table_offset == 30 and clone.memory.size == layer.memory.size


@pytest.mark.skipif(USING_LEGACY_KERAS, reason="keras.Input(ragged=True) is Keras 3's; tf_keras bags run eagerly")
def test_a_ragged_bag_input_trains_and_round_trips_in_a_functional_model(tmp_path):
    bags = keras.Input(shape=(None,), dtype="int64", ragged=True, name="genres")
    pooled = CompressedEmbedding(100, D, method="robe", compression=4.0, combiner="mean", name="genre_bag")(bags)
    assert tuple(pooled.shape) == (None, D) and not pooled.ragged
    passed_through = CompressedEmbedding(100, D, method="full")(bags)  # no combiner: a ragged output, marked so
    assert tuple(passed_through.shape) == (None, None, D) and passed_through.ragged
    model = keras.Model(bags, keras.layers.Dense(1)(pooled))
    x = tf.ragged.constant([[1, 2], [], [3, 4, 5], [7]], dtype=tf.int64)
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, np.ones(4), batch_size=4, epochs=2, verbose=0)
    path = str(tmp_path / "bags.keras")
    model.save(path)
    np.testing.assert_array_equal(keras.models.load_model(path)(x).numpy(), model(x).numpy())
