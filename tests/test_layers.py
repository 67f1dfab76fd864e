"""Embedding layers: forward against independent references, gradients, training, config and save round trips."""

import numpy as np
import pytest
import tensorflow as tf

from tfcompress import chunk_pruning, robe_hash
from tfcompress._keras import keras
from tfcompress.layers import (ChunkPrunedEmbedding, FullEmbedding, HashingTrickEmbedding, LearnedHashEmbedding,
                               MLETEmbedding, PlannedEmbedding, QREmbedding, QuantizedEmbedding, RobeEmbedding)
from tfcompress.layers.base import IdLayer
from tfcompress.learn_hash.mapping import TableMapping
from tfcompress.lookup import TableReader

CARDS = [1000, 50, 7, 3000]


def random_ids(rows=64, cards=CARDS, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, n, rows) for n in cards], axis=1).astype(np.int64)


def all_layers():
    return [
        RobeEmbedding(CARDS, 8, memory_size=256, chunk_size=4),
        RobeEmbedding(CARDS, 8, compression=20.0, chunk_size=3, signed=True, gradient="sparse"),
        FullEmbedding(CARDS, 8),
        HashingTrickEmbedding(CARDS, 8, compression=10.0),
        QREmbedding(CARDS, 8, compression=4.0, operation="mult"),
        QREmbedding(CARDS, 8, num_buckets=10, operation="concat"),
        PlannedEmbedding(4, 8, [{"features": [2, 0], "layer": FullEmbedding([7, 1000], 8)},
                                {"features": [1, 3], "layer": RobeEmbedding([50, 3000], 8, memory_size=100)}]),
    ]


# ---- ROBE forward against explicit references -------------------------------------------------------------------


def sketch_matrix(cards, dim, chunk_size, memory_size, signed):
    """S with virtual_table = S @ M: row (a, i) of the logical table reads position idx(a, i) with its sign."""
    ids_per_table = [np.arange(n) for n in cards]
    rows = []
    for t, ids in enumerate(ids_per_table):
        full = np.zeros((len(ids), len(cards)), dtype=np.int64)
        full[:, t] = ids
        idx = robe_hash.robe_indices(full, cards, dim, chunk_size, memory_size)[:, t, :]
        sign = robe_hash.robe_signs(full, cards, dim)[:, t, :] if signed else np.ones_like(idx, dtype=np.float32)
        s = np.zeros((len(ids) * dim, memory_size), dtype=np.float32)
        s[np.arange(len(ids) * dim), idx.reshape(-1)] = sign.reshape(-1)
        rows.append(s)
    return np.concatenate(rows)


@pytest.mark.parametrize("signed", [False, True])
def test_robe_forward_equals_sketch_matrix_product(signed):
    cards, dim, chunk, memory = [30, 12, 5], 6, 4, 41
    layer = RobeEmbedding(cards, dim, memory_size=memory, chunk_size=chunk, signed=signed)
    ids = random_ids(20, cards)
    out = layer(ids).numpy()
    virtual = (sketch_matrix(cards, dim, chunk, memory, signed) @ layer.memory.numpy()).reshape(-1, dim)
    offsets = robe_hash.table_offsets(cards)
    np.testing.assert_allclose(out, virtual[ids + offsets], rtol=0, atol=1e-6)


def test_chunk_size_one_is_elementwise_hashing():
    cards, dim, memory = [100, 40], 5, 97
    layer = RobeEmbedding(cards, dim, memory_size=memory, chunk_size=1)
    ids = random_ids(16, cards)
    r1, r2, r3 = 634329019, 1825252241, 871205356
    out = layer(ids).numpy()
    weights = layer.memory.numpy()
    for b in range(16):
        for t in range(2):
            a = int(ids[b, t]) + (100 if t else 0)
            want = [weights[((a * r3 + i * r2 + r1) % 2038074743) % memory] for i in range(dim)]
            np.testing.assert_array_equal(out[b, t], want)


def test_compression_sets_memory_size():
    layer = RobeEmbedding([1000, 1000], 16, compression=100.0)
    assert layer.memory_size == 320
    assert layer.logical_parameters / layer.physical_parameters == pytest.approx(100.0)


# ---- gradients -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [False, True])
def test_robe_dense_and_sparse_gradients_equal_a_plain_gather(signed):
    cards, dim, chunk, memory = [300, 20], 8, 4, 64
    ids = random_ids(128, cards)  # many duplicate positions: 128*2*8 lookups into 64 floats
    upstream = tf.random.stateless_normal([128, 2, dim], seed=[1, 2])
    grads = {}
    for mode in ("sparse", "dense"):
        layer = RobeEmbedding(cards, dim, memory_size=memory, chunk_size=chunk, signed=signed, gradient=mode,
                              embeddings_initializer=keras.initializers.RandomUniform(seed=5))
        layer.build((None, 2))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids) * upstream)
        grad = tape.gradient(loss, layer.memory)  # a Keras 3 KerasVariable or a tf_keras tf.Variable: both work
        if mode == "sparse":
            assert isinstance(grad, tf.IndexedSlices)
            assert len(np.unique(grad.indices.numpy())) == len(grad.indices.numpy()), "duplicates not coalesced"
        grads[mode] = tf.convert_to_tensor(grad).numpy()
    # Reference: tf.GradientTape through a plain tf.gather from a plain variable.
    variable = tf.Variable(layer.memory.numpy())
    idx = robe_hash.robe_indices(ids, cards, dim, chunk, memory)
    sign = robe_hash.robe_signs(ids, cards, dim) if signed else 1.0
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(variable, idx) * sign * upstream)
    reference = tf.convert_to_tensor(tape.gradient(loss, variable)).numpy()
    np.testing.assert_allclose(grads["dense"], reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["sparse"], reference, rtol=1e-5, atol=1e-5)


def test_auto_gradient_picks_by_size():
    assert RobeEmbedding([10**6], 16, compression=1000.0)._gradient_mode == "dense"
    assert RobeEmbedding([10**9], 16, compression=10.0)._gradient_mode == "sparse"


def test_full_embedding_updates_only_queried_rows():
    layer = FullEmbedding([100, 100], 4)
    layer.build((None, 2))
    before = [t.numpy().copy() for t in layer.tables]
    ids = np.array([[3, 5], [3, 9]])
    optimizer = keras.optimizers.SGD(0.1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(ids))
    optimizer.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables))
    changed = [np.flatnonzero(np.any(t.numpy() != b, axis=1)) for t, b in zip(layer.tables, before)]
    assert list(changed[0]) == [3] and list(changed[1]) == [5, 9]
    # row 3 of table 0 was looked up twice: its gradient is 2 per element.
    np.testing.assert_allclose(layer.tables[0].numpy()[3], before[0][3] - 0.2, rtol=1e-6)


# ---- baselines against references ------------------------------------------------------------------------------------


def test_hashing_trick_reads_id_mod_buckets():
    layer = HashingTrickEmbedding([1000, 50], 4, num_buckets=[7, 50])
    ids = np.array([[999, 49], [6, 0], [13, 12]])
    out = layer(ids).numpy()
    tables = [t.numpy() for t in layer.tables]
    for b in range(3):
        np.testing.assert_array_equal(out[b, 0], tables[0][ids[b, 0] % 7])
        np.testing.assert_array_equal(out[b, 1], tables[1][ids[b, 1]])


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_qr_combines_quotient_and_remainder(operation):
    layer = QREmbedding([1000], 6, num_buckets=30, operation=operation)
    ids = np.array([[0], [29], [30], [999]])
    out = layer(ids).numpy()[:, 0]
    q, r = layer.quotient_tables[0].numpy(), layer.remainder_tables[0].numpy()
    assert q.shape[0] == 34 and r.shape[0] == 30
    for row, x in enumerate(ids[:, 0]):
        qv, rv = q[x // 30], r[x % 30]
        want = {"mult": qv * rv, "add": qv + rv, "concat": np.concatenate([qv, rv])}[operation]
        np.testing.assert_allclose(out[row], want, rtol=1e-6)
    # Every id keeps a distinct (quotient, remainder) pair.
    pairs = {(x // 30, x % 30) for x in range(1000)}
    assert len(pairs) == 1000


def test_planned_embedding_restores_feature_order():
    planned = all_layers()[-1]
    ids = random_ids(10)
    out = planned(ids).numpy()
    full, robe = planned.members
    np.testing.assert_array_equal(out[:, [2, 0]], full(ids[:, [2, 0]]).numpy())
    np.testing.assert_array_equal(out[:, [1, 3]], robe(ids[:, [1, 3]]).numpy())


# ---- every layer: shapes, training, graph mode, round trips ----------------------------------------------------------


@pytest.mark.parametrize("layer", all_layers(), ids=lambda l: type(l).__name__)
def test_graph_mode_matches_eager(layer):
    ids = random_ids(32)
    eager = layer(ids).numpy()
    graph = tf.function(lambda x: layer(x))(tf.constant(ids)).numpy()
    assert eager.shape == (32, 4, 8)
    np.testing.assert_array_equal(eager, graph)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("make_layer", [lambda: all_layers()[i] for i in range(len(all_layers()))],
                         ids=[type(l).__name__ + str(i) for i, l in enumerate(all_layers())])
def test_short_fit_lowers_the_loss(make_layer, optimizer):
    keras.utils.set_random_seed(0)
    ids = random_ids(512, seed=1)
    labels = ((ids[:, 2] >= 4) | (ids[:, 1] < 10)).astype("float32")[:, None]
    inputs = keras.Input((4,), dtype="int64")
    x = keras.layers.Flatten()(make_layer()(inputs))
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs)
    learning_rate = {"sgd": 0.5, "adagrad": 0.5, "adam": 0.02}[optimizer]
    model.compile(keras.optimizers.get({"class_name": optimizer, "config": {"learning_rate": learning_rate}}),
                  "binary_crossentropy")
    history = model.fit(ids, labels, epochs=8, batch_size=64, verbose=0).history["loss"]
    assert history[-1] < history[0] * 0.85, history


@pytest.mark.parametrize("layer", all_layers(), ids=lambda l: type(l).__name__)
def test_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    ids = random_ids(8)
    layer(ids)
    clone(ids)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(ids).numpy(), layer(ids).numpy())


@pytest.mark.parametrize("layer", all_layers(), ids=lambda l: type(l).__name__)
def test_keras_file_round_trip(layer, tmp_path):
    inputs = keras.Input((4,), dtype="int64")
    model = keras.Model(inputs, layer(inputs))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    ids = random_ids(16, seed=4)
    np.testing.assert_array_equal(loaded.predict(ids, verbose=0), model.predict(ids, verbose=0))


# ---- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", all_layers(), ids=lambda l: type(l).__name__)
def test_out_of_range_id_raises_naming_feature_and_value(layer):
    ids = random_ids(4)
    ids[2, 3] = 3000  # feature 3 has 3000 rows: 3000 is one past the end
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"feature[\s\S]*3[\s\S]*value[\s\S]*3000"):
        layer(ids)
    ids[2, 3] = -1
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"value[\s\S]*-1"):
        layer(ids)


def test_out_of_range_mod_folds_into_range():
    layer = RobeEmbedding([10, 20], 4, memory_size=50, chunk_size=2, out_of_range="mod")
    np.testing.assert_array_equal(layer(np.array([[13, -1]])).numpy(), layer(np.array([[3, 19]])).numpy())
    full = FullEmbedding([10, 20], 4, out_of_range="mod")
    np.testing.assert_array_equal(full(np.array([[-10, 45]])).numpy(), full(np.array([[0, 5]])).numpy())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cardinalities=[10], output_dim=8, memory_size=100, chunk_size=9), "chunk_size"),
        (dict(cardinalities=[10], output_dim=8, memory_size=100, chunk_size=0), "chunk_size"),
        (dict(cardinalities=[10], output_dim=8, memory_size=3, chunk_size=4), "memory_size"),
        (dict(cardinalities=[10], output_dim=8, compression=0.5), "compression"),
        (dict(cardinalities=[], output_dim=8, compression=10.0), "cardinalities"),
        (dict(cardinalities=[10, 0], output_dim=8, compression=10.0), r"cardinalities\[1\]"),
        (dict(cardinalities=[10], output_dim=8), "exactly one"),
        (dict(cardinalities=[10], output_dim=8, compression=2.0, gradient="fast"), "gradient"),
        (dict(cardinalities=[10], output_dim=8, compression=2.0, out_of_range="clip"), "out_of_range"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RobeEmbedding(**kwargs)


def test_wrong_number_of_id_columns_is_rejected():
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        RobeEmbedding([10, 20], 4, memory_size=50)(np.zeros((3, 5), dtype=np.int64))


# ---- serving_lookup: the stock-op twin of call that exports trace -----------------------------------------------


def _mappings(cards, seed, parts=1, combiner=None):
    rng = np.random.default_rng(seed)
    if combiner is None:
        return [rng.integers(0, max(1, n // 3), n) for n in cards]
    return [TableMapping(rows=np.stack([rng.integers(0, 11, n) for _ in range(parts)]), num_rows=[11] * parts,
                         combiner=combiner) for n in cards]


def _pruned(**kwargs):
    layer = ChunkPrunedEmbedding(CARDS, 8, num_chunks=2, budget=0.3, **kwargs)
    layer(random_ids(2))
    chunk_pruning.allocate(layer, np.arange(0, layer.num_rows * 2, 4))  # some rows partly, some fully pruned
    return layer


def _quantized(**kwargs):
    layer = QuantizedEmbedding(CARDS, 8, **kwargs)
    rng = np.random.default_rng(5)
    layer.set_quantized([rng.integers(-127, 128, (m, 8)).astype(np.int8) for m in layer.table_rows],
                        rng.uniform(0.001, 0.1, len(CARDS)))
    return layer


# One case per id layer class and per code path of its lookup (ROBE: element and chunk gathers, whole and partial
# chunks; pruning: hashed ids; learned hashing: several mappings).
SERVING_CASES = {
    "robe": lambda: RobeEmbedding(CARDS, 8, memory_size=256, chunk_size=4),
    "robe_signed_partial_chunk": lambda: RobeEmbedding(CARDS, 8, compression=20.0, chunk_size=3, signed=True),
    "robe_z1": lambda: RobeEmbedding(CARDS, 8, memory_size=300, chunk_size=1),
    "robe_whole_rows_mod": lambda: RobeEmbedding(CARDS, 8, memory_size=64, chunk_size=8, out_of_range="mod"),
    "full": lambda: FullEmbedding(CARDS, 8),
    "full_dense_gradient": lambda: FullEmbedding(CARDS, 8, gradient="dense"),
    "hashing_trick": lambda: HashingTrickEmbedding(CARDS, 8, compression=10.0),
    "qr_mult": lambda: QREmbedding(CARDS, 8, compression=4.0, operation="mult"),
    "qr_concat": lambda: QREmbedding(CARDS, 8, num_buckets=10, operation="concat"),
    "mlet": lambda: MLETEmbedding(CARDS, 8, inner_dim=16),
    "mlet_hashed": lambda: MLETEmbedding(CARDS, 8, inner_dim=16, compression=10.0),
    "chunk_pruned": _pruned,
    "chunk_pruned_hash_ids": lambda: _pruned(hash_ids=True),
    "learned_hash": lambda: LearnedHashEmbedding(mappings=_mappings(CARDS, 1), output_dim=8),
    "learned_hash_concat": lambda: LearnedHashEmbedding(mappings=_mappings(CARDS, 2, 2, "concat"), output_dim=8),
    "quantized": _quantized,
    "quantized_hashed": lambda: _quantized(num_buckets=[100, 50, 7, 30]),
    "planned": lambda: PlannedEmbedding(4, 8, [
        {"features": [2, 0], "layer": FullEmbedding([7, 1000], 8)},
        {"features": [3], "layer": RobeEmbedding([3000], 8, memory_size=100, chunk_size=4)},
        {"features": [1], "layer": QREmbedding([50], 8, num_buckets=6)}]),
}


def serving_case(name):
    layer = SERVING_CASES[name]()
    if not layer.built:
        layer(random_ids(2))
    return layer


def bad_ids(cards=CARDS):
    """Ids no table has (-1, n, n + 12345, +-2^40) and a row mixing valid ones."""
    cards = np.asarray(cards, np.int64)
    return np.stack([-np.ones_like(cards), cards, cards + 12345, np.full_like(cards, 2**40),
                     np.full_like(cards, -(2**40) - 3), np.where(np.arange(len(cards)) % 2 == 0, cards - 1, -7)])


@pytest.mark.parametrize("name", SERVING_CASES)
def test_serving_lookup_equals_call_bit_for_bit(name):
    layer = serving_case(name)
    for rows in (1, 7, 300):  # ROBE: 1 and 7 rows gather element-wise, 300 rows chunk-wise
        ids = random_ids(rows, seed=rows)
        ids[0] = 0
        ids[-1] = np.asarray(CARDS) - 1
        expected = layer(ids).numpy()
        for rule in ("mod", "as_trained", "error"):
            np.testing.assert_array_equal(layer.serving_lookup(ids, rule).numpy(), expected, err_msg=rule)
        traced = tf.function(layer.serving_lookup).get_concrete_function(tf.TensorSpec([None, 4], tf.int64))
        np.testing.assert_array_equal(traced(tf.constant(ids)).numpy(), expected)
        assert not any(op.type.startswith("Robe") for op in traced.graph.get_operations())  # stock ops only


@pytest.mark.parametrize("name", SERVING_CASES)
def test_serving_lookup_folds_out_of_range_ids_with_mod(name):
    layer = serving_case(name)
    ids = bad_ids()
    hashed = getattr(layer, "hash_ids", False)  # hashed ids have no range: every int64 is hashed, as in call
    folded = ids if hashed else np.mod(ids, np.asarray(CARDS))
    np.testing.assert_array_equal(layer.serving_lookup(ids).numpy(), layer(folded).numpy())
    if hashed:
        np.testing.assert_array_equal(layer.serving_lookup(ids, "error").numpy(), layer(ids).numpy())
        return
    with pytest.raises(tf.errors.InvalidArgumentError, match="id out of range"):
        layer.serving_lookup(ids, "error")
    trained = layer.serving_lookup(ids, "as_trained") if layer.out_of_range == "mod" else None
    if trained is None:
        with pytest.raises(tf.errors.InvalidArgumentError, match="id out of range"):
            layer.serving_lookup(ids, "as_trained")
    else:
        np.testing.assert_array_equal(trained.numpy(), layer(folded).numpy())
    assert layer.out_of_range == SERVING_CASES[name]().out_of_range  # the layer's own rule is untouched


def test_serving_lookup_reads_tables_through_the_reader():
    layer = FullEmbedding([10, 20], 4)
    ids = np.array([[1, 2], [9, 19], [0, 0]])
    layer(ids)
    reader = TableReader()
    layer.serving_lookup(ids, tables=reader)
    assert len(reader.tables) == 2 and all(key == id(variable) for key, variable in reader.tables.items())
    copy = tf.Variable(layer.tables[1].numpy().astype(np.float16))
    key = next(key for key, variable in reader.tables.items() if variable.shape[0] == 20)
    out = layer.serving_lookup(ids, tables=TableReader({key: (copy, 2.0)})).numpy()
    np.testing.assert_array_equal(out[:, 0], layer(ids).numpy()[:, 0])
    np.testing.assert_array_equal(out[:, 1], layer.tables[1].numpy().astype(np.float16)[ids[:, 1]] * 2.0)


def test_serving_lookup_rejects_an_unknown_rule_and_an_id_layer_without_one():
    with pytest.raises(ValueError, match="out_of_range must be one of"):
        FullEmbedding([10], 4).serving_lookup(np.zeros((1, 1), np.int64), "clip")
    with pytest.raises(NotImplementedError, match="Bare does not implement serving_lookup"):
        type("Bare", (IdLayer,), {})([10], 4).serving_lookup(np.zeros((1, 1), np.int64))



# ---- ids that would be read silently wrong are refused ----------------------------------------------------------


@pytest.mark.parametrize("name", SERVING_CASES)
def test_float_ids_are_a_type_error_naming_the_layer(name):
    layer = serving_case(name)
    ids = random_ids(3).astype(np.float32) + 0.7  # 1.7 would read row 1 if cast
    for lookup in (layer, layer.serving_lookup):
        with pytest.raises(TypeError, match=rf"{type(layer).__name__} .*integer.*float32"):
            lookup(ids)
    with pytest.raises(TypeError, match="integer"):
        layer(np.full(ids.shape, np.nan))  # NaN would become INT64_MIN


@pytest.mark.parametrize("name", SERVING_CASES)
def test_ids_of_another_rank_are_refused_before_they_broadcast(name):
    layer = serving_case(name)
    features = random_ids(1).shape[1]
    for ids in (random_ids(3)[:, :, None], random_ids(3)[:, 0]):  # [3, F, 1] and [3]
        for lookup in (layer, layer.serving_lookup):
            with pytest.raises(ValueError, match=rf"ids must have shape \[batch, {features}\].*got shape"):
                lookup(ids)


def test_the_fused_op_path_refuses_bad_ids_with_the_pure_tf_message():
    messages = {}
    for use_custom_op in (True, False):
        layer = RobeEmbedding(CARDS, 8, memory_size=256, chunk_size=4, use_custom_op=use_custom_op, name="robe")
        layer(random_ids(2))
        with pytest.raises(ValueError) as shape_error:
            layer(random_ids(3)[:, :, None])
        with pytest.raises(TypeError) as dtype_error:
            layer(random_ids(3).astype(np.float64))
        messages[use_custom_op] = (str(shape_error.value), str(dtype_error.value))
    assert messages[True] == messages[False]
