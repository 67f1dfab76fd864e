"""MLET: the paper's identities (forward, closed-form gradients, dense updates), folding, plans, round trips."""

import math
import warnings

import numpy as np
import pytest
import tensorflow as tf

from tfcompress._keras import keras
from tfcompress.model_rewrite import fold, fold_layer, folded_tables
from tfcompress.layers import (FullEmbedding, HashingTrickEmbedding, MLETEmbedding, PlannedEmbedding,
                               QuantizedEmbedding, RobeEmbedding)
from tfcompress.plan import CompressionPlan, make_plan

CARDS = [300, 17, 90]


def random_ids(rows=48, cards=CARDS, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, n, rows) for n in cards], axis=1).astype(np.int64)


def numpy_weights(layer):
    return [t.numpy().astype(np.float64) for t in layer.tables], layer.projections.numpy().astype(np.float64)


def table_rows(ids, layer):
    """Row of each id in each trained table: the id, or id mod m_f when hashed."""
    return ids % np.asarray(layer.num_buckets) if layer.hashed else ids


# ---- forward and gradients against the closed forms ----------------------------------------------------------------


@pytest.mark.parametrize("num_buckets", [None, [64, 17, 11]])
def test_forward_equals_rows_of_table_times_projection(num_buckets):
    layer = MLETEmbedding(CARDS, 6, inner_dim=10, num_buckets=num_buckets)
    ids = random_ids()
    out = layer(ids).numpy()
    tables, projections = numpy_weights(layer)
    rows = table_rows(ids, layer)
    for f in range(len(CARDS)):
        want = (tables[f] @ projections[f])[rows[:, f]]
        np.testing.assert_allclose(out[:, f], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gradient", ["sparse", "dense"])
@pytest.mark.parametrize("num_buckets", [None, [40, 5, 90]])
def test_gradients_equal_the_papers_closed_forms(gradient, num_buckets):
    """Paper eqs. 7-8 for y_b = E[x_b] P and upstream G = dL/dy:
    dL/dP = sum_b E[x_b]^T G_b and dL/dE[x] = sum over b with x_b = x of G_b P^T."""
    layer = MLETEmbedding(CARDS, 5, inner_dim=7, num_buckets=num_buckets, gradient=gradient)
    ids = random_ids(64, seed=1)
    ids[:8, 1] = 3  # make sure some rows are looked up several times in a batch
    upstream = np.random.default_rng(2).normal(size=(64, len(CARDS), 5))
    layer.build((None, len(CARDS)))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(ids) * tf.constant(upstream, tf.float32))
    grads = tape.gradient(loss, layer.tables + [layer.projections])
    tables, projections = numpy_weights(layer)
    rows = table_rows(ids, layer)
    for f, table in enumerate(tables):
        g = upstream[:, f, :]
        want_p = table[rows[:, f]].T @ g  # eq. 7
        want_e = np.zeros_like(table)
        np.add.at(want_e, rows[:, f], g @ projections[f].T)  # eq. 8
        np.testing.assert_allclose(tf.convert_to_tensor(grads[f]).numpy(), want_e, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grads[-1].numpy()[f], want_p, rtol=1e-4, atol=1e-5)


def test_one_sgd_step_changes_every_folded_row_but_a_full_table_only_queried_rows():
    lr = 0.05
    ids = np.array([[3, 1, 7], [3, 2, 8]])
    upstream = tf.constant(np.random.default_rng(0).normal(size=(2, 3, 4)), tf.float32)

    def sgd_step(layer):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids) * upstream)
        variables = layer.trainable_variables
        keras.optimizers.SGD(lr).apply_gradients(zip(tape.gradient(loss, variables), variables))

    mlet = MLETEmbedding(CARDS, 4, inner_dim=8)
    mlet.build((None, 3))
    before = folded_tables(mlet)
    tables_before, projections_before = numpy_weights(mlet)
    sgd_step(mlet)
    after = folded_tables(mlet)
    tables_after, projections_after = numpy_weights(mlet)
    for f, (w0, w1) in enumerate(zip(before, after)):
        assert np.all(np.any(np.abs(w1 - w0) > 1e-7, axis=1)), f"feature {f}: some folded rows did not move"
        # A row that was not looked up keeps E[x]; its folded row moves by E[x] (P' - P) only.
        unqueried = np.setdiff1d(np.arange(CARDS[f]), ids[:, f])
        np.testing.assert_array_equal(tables_after[f][unqueried], tables_before[f][unqueried])
        np.testing.assert_allclose(w1[unqueried] - w0[unqueried],
                                   tables_before[f][unqueried] @ (projections_after[f] - projections_before[f]),
                                   atol=1e-6)

    full = FullEmbedding(CARDS, 4)
    full.build((None, 3))
    before = [t.numpy().copy() for t in full.tables]
    sgd_step(full)
    for f, (table, w0) in enumerate(zip(full.tables, before)):
        changed = np.flatnonzero(np.any(table.numpy() != w0, axis=1))
        assert list(changed) == sorted(set(ids[:, f]))


# ---- construction, sizes, initialization ---------------------------------------------------------------------------


def test_sizes_training_and_folded():
    layer = MLETEmbedding([1000, 30], 8, inner_dim=32, compression=4.0)
    assert layer.num_buckets == [250, 8]
    assert layer.logical_parameters == 1030 * 8
    assert layer.physical_parameters == (250 + 8) * 32 + 2 * 32 * 8
    assert layer.folded_parameters == (250 + 8) * 8
    layer.build((None, 2))
    assert sum(int(np.prod(w.shape)) for w in layer.weights) == layer.physical_parameters


def test_initialization_is_glorot_tables_and_gaussian_projections():
    keras.utils.set_random_seed(3)
    layer = MLETEmbedding([500, 500], 16, inner_dim=64, projection_stddev=0.1)
    layer.build((None, 2))
    projections = layer.projections.numpy()
    assert projections.std() == pytest.approx(0.1, rel=0.05)
    assert abs(projections.mean()) < 0.01
    table = layer.tables[0].numpy()
    limit = np.sqrt(6.0 / (500 + 64))  # Glorot uniform bound for a 500 x 64 matrix
    assert np.abs(table).max() <= limit and np.abs(table).max() > 0.95 * limit
    assert table.std() == pytest.approx(limit / np.sqrt(3), rel=0.05)  # std of U(-a, a) is a / sqrt(3)


def test_inner_dim_below_output_dim_warns():
    with pytest.warns(UserWarning, match="inner_dim=4 < output_dim=8"):
        MLETEmbedding([10], 8, inner_dim=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MLETEmbedding([10], 8, inner_dim=8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(inner_dim=0), "inner_dim"),
        (dict(inner_dim=2.5), "inner_dim"),
        (dict(inner_dim=8, projection_stddev=0), "projection_stddev"),
        (dict(inner_dim=8, projection_stddev="big"), "projection_stddev"),
        (dict(inner_dim=8, num_buckets=4, compression=2.0), "exactly one of num_buckets or compression"),
        (dict(inner_dim=8, compression=0.5), "compression"),
        (dict(inner_dim=8, gradient="fast"), "gradient"),
        (dict(inner_dim=8, out_of_range="clip"), "out_of_range"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLETEmbedding([100, 10], 8, **kwargs)


def test_out_of_range_ids_raise_or_fold():
    layer = MLETEmbedding([10, 5], 4, inner_dim=4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="id out of range"):
        layer(np.array([[3, 5]]))
    modded = MLETEmbedding([10, 5], 4, inner_dim=4, out_of_range="mod")
    out = modded(np.array([[13, -1]])).numpy()
    np.testing.assert_allclose(out, modded(np.array([[3, 4]])).numpy(), rtol=1e-6)


# ---- plans ---------------------------------------------------------------------------------------------------------


def test_plan_reports_training_and_folded_sizes():
    cards = [1000, 10, 5000]
    plan = make_plan(cards, 8, "mlet", ratio=1, inner_dim=32)
    (member,) = plan.members
    assert member.physical_parameters == sum(cards) * 32 + 3 * 32 * 8  # n*k + k*d per table
    assert member.folded_parameters == sum(cards) * 8  # n*d
    assert plan.deployed_parameters == plan.logical_parameters
    assert "after fold" in plan.summary()
    layer = plan.build_layer()
    layer.build((None, 3))
    assert sum(int(np.prod(w.shape)) for w in layer.weights) == plan.physical_parameters
    assert CompressionPlan.from_dict(plan.to_dict()) == plan


def test_plan_with_hashing_meets_the_ratio_with_the_folded_size():
    cards = [1000, 10, 5000]
    plan = make_plan(cards, 8, "mlet", ratio=2, inner_dim=16, uncompressed_below=100)
    full, mlet = plan.members
    assert full.method == "full" and full.features == [1]
    assert mlet.kwargs["compression"] > 1
    assert plan.deployed_parameters <= plan.logical_parameters / 2
    assert plan.deployed_ratio == pytest.approx(2, rel=0.01)
    layer = plan.build_layer().members[1]
    compression = mlet.kwargs["compression"]
    assert layer.num_buckets == [math.ceil(1000 / compression), math.ceil(5000 / compression)]
    assert mlet.physical_parameters == sum(layer.num_buckets) * 16 + 2 * 16 * 8


def test_plan_byte_budget_bounds_the_folded_tables():
    cards = [100000, 3000, 40]
    plan = make_plan(cards, 16, "mlet", budget="2MB", inner_dim=64)
    assert plan.deployed_parameters * 4 <= 2_000_000
    assert plan.deployed_parameters * 4 > 0.99 * 2_000_000
    assert plan.physical_parameters > plan.deployed_parameters  # training holds the 64-wide tables


def test_plan_without_inner_dim_names_the_problem():
    with pytest.raises(ValueError, match="inner_dim"):
        make_plan([100], 8, "mlet", ratio=1)


# ---- folding -------------------------------------------------------------------------------------------------------


def small_dlrm(embedding, n_dense=3):
    from tfcompress.models import build_dlrm

    return build_dlrm((n_dense, embedding.num_features if hasattr(embedding, "num_features")
                       else len(embedding.cardinalities)), embedding, bottom_mlp=(8,), top_mlp=(8,))


def dlrm_inputs(cards, rows=64, seed=0):
    rng = np.random.default_rng(seed)
    return {"dense": rng.random((rows, 3)).astype(np.float32), "sparse": random_ids(rows, cards, seed)}


def trained(model, cards):
    """A few Adam steps, so the weights are not just their initial values."""
    inputs = dlrm_inputs(cards, 128, seed=5)
    labels = (inputs["sparse"][:, 0] % 2).astype(np.float32)
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
    model.fit(inputs, labels, batch_size=32, epochs=1, verbose=0)
    return model


def predict(model, inputs):
    # A direct call: model.predict would trace a new tf.function for every model these tests build.
    return model(inputs, training=False).numpy()


_TRAINED = {}


def trained_planned_dlrm(hashed):
    """(cards, the planned embedding, a trained DLRM around it), built once per module for each `hashed`."""
    if hashed not in _TRAINED:
        cards, embedding = planned_mlet(hashed)
        _TRAINED[hashed] = cards, embedding, trained(small_dlrm(embedding), cards)
    return _TRAINED[hashed]


def planned_mlet(hashed):
    cards = [300, 17, 90, 40]
    mlet = MLETEmbedding([300, 90], 4, inner_dim=16, compression=2.0 if hashed else None, name="mlet_part")
    groups = [{"features": [0, 2], "layer": mlet},
              {"features": [3, 1], "layer": FullEmbedding([40, 17], 4, name="full_part")}]
    return cards, PlannedEmbedding(4, 4, groups, name="embedding")


@pytest.mark.parametrize("hashed", [False, True])
def test_fold_inside_a_dlrm_keeps_predictions(hashed):
    cards, embedding, model = trained_planned_dlrm(hashed)
    inputs = dlrm_inputs(cards, seed=9)
    want = predict(model, inputs)
    folded = fold(model)
    np.testing.assert_allclose(predict(folded, inputs), want, rtol=0, atol=1e-5)
    members = folded.get_layer("embedding").members
    assert type(members[0]) is (HashingTrickEmbedding if hashed else FullEmbedding)
    assert members[0].name == "mlet_part" and type(members[1]) is FullEmbedding
    # The folded tables are E . P, computed independently here.
    tables, projections = numpy_weights(model.get_layer("embedding").members[0])
    for f, table in enumerate(members[0].tables):
        np.testing.assert_allclose(table.numpy(), tables[f] @ projections[f], rtol=1e-5, atol=1e-7)
    # Everything else was copied: same weights, not shared variables.
    for name in ["bottom_mlp", "top_mlp", "logit"]:
        for a, b in zip(model.get_layer(name).weights, folded.get_layer(name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
            assert a is not b
    assert folded.get_layer("embedding").physical_parameters == embedding.members[0].folded_parameters + 57 * 4
    assert folded.loss == "binary_crossentropy"  # compiled like the original, so evaluate() works


def test_fold_leaves_the_original_model_untouched_and_independent():
    cards, embedding = planned_mlet(False)
    model = small_dlrm(embedding)
    inputs = dlrm_inputs(cards)
    before = [w.numpy().copy() for w in model.weights]
    folded = fold(model)
    with tf.GradientTape() as tape:  # one SGD step on the folded model only
        loss = tf.reduce_sum(folded(inputs, training=True))
    variables = folded.trainable_variables
    keras.optimizers.SGD(0.5).apply_gradients(zip(tape.gradient(loss, variables), variables))
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)
    assert not np.allclose(predict(folded, inputs), predict(model, inputs), atol=1e-7)
    assert any(isinstance(layer, MLETEmbedding) for layer in model.get_layer("embedding").members)


def test_fold_top_level_layer_in_sequential_and_nested_models():
    cards = [50, 20]
    inner = keras.Sequential([keras.Input((2,), dtype="int64"),
                              MLETEmbedding(cards, 3, inner_dim=6, name="mlet"),
                              keras.layers.Flatten(name="flat")], name="tower")
    inputs = keras.Input((2,), dtype="int64", name="ids")
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(inner(inputs)))
    ids = random_ids(16, cards)
    want = predict(model, ids)
    folded = fold(model)
    assert type(folded.get_layer("tower").get_layer("mlet")) is FullEmbedding
    np.testing.assert_allclose(predict(folded, ids), want, atol=1e-5)
    folded_inner = fold(inner)
    np.testing.assert_allclose(predict(folded_inner, ids), predict(inner, ids), atol=1e-5)


def test_fold_layer_of_a_single_layer_and_of_layers_without_mlet():
    layer = MLETEmbedding([40], 4, inner_dim=8, num_buckets=7)
    ids = np.array([[0], [7], [39]])
    want = layer(ids).numpy()
    folded = fold_layer(layer)
    assert type(folded) is HashingTrickEmbedding and folded.num_buckets == [7]
    np.testing.assert_allclose(folded(ids).numpy(), want, atol=1e-6)
    np.testing.assert_array_equal(want[0], want[1])  # 0 and 7 share a bucket
    assert fold_layer(FullEmbedding([40], 4)) is None
    robe_only = PlannedEmbedding(1, 4, [{"features": [0], "layer": RobeEmbedding([40], 4, memory_size=9)}])
    assert fold_layer(robe_only) is None
    with pytest.raises(ValueError, match="not built"):
        fold_layer(MLETEmbedding([40], 4, inner_dim=8))


def test_fold_rejects_what_it_cannot_rewrite():
    with pytest.raises(ValueError, match="keras.Model"):
        fold(MLETEmbedding([40], 4, inner_dim=8))

    class Custom(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.embedding = MLETEmbedding([40], 4, inner_dim=8)

        def call(self, ids):
            return self.embedding(ids)

    model = Custom()
    model(np.array([[1]]))
    with pytest.raises(ValueError, match="subclassed"):
        fold(model)
    with pytest.raises(ValueError, match="quantize"):
        fold(small_dlrm(planned_mlet(False)[1]), quantize="int4")


# ---- round trips ---------------------------------------------------------------------------------------------------


def test_config_round_trip():
    layer = MLETEmbedding(CARDS, 4, inner_dim=12, num_buckets=[100, 17, 30], projection_stddev=0.5,
                          gradient="dense", out_of_range="mod", name="m")
    again = MLETEmbedding.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()
    assert again.num_buckets == [100, 17, 30] and again.inner_dim == 12


def test_keras_file_round_trip_of_trained_and_folded_models(tmp_path):
    cards, embedding, model = trained_planned_dlrm(True)
    inputs = dlrm_inputs(cards, seed=4)
    for name, m in [("mlet", model), ("folded", fold(model))]:
        path = str(tmp_path / f"{name}.keras")
        m.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_allclose(predict(loaded, inputs), predict(m, inputs), atol=1e-6)
        assert type(loaded.get_layer("embedding").members[0]) is type(m.get_layer("embedding").members[0])


def test_hashed_mlet_folded_and_quantized_chain(tmp_path):
    cards, embedding, model = trained_planned_dlrm(True)
    inputs = dlrm_inputs(cards, seed=6)
    folded = fold(model)
    small = fold(model, quantize="int8")
    members = small.get_layer("embedding").members
    assert all(type(m) is QuantizedEmbedding for m in members)
    assert members[0].num_buckets == embedding.members[0].num_buckets and members[1].num_buckets is None
    # The int8 tables de-quantize to E . P within half a quantization step (or the clipped amount).
    tables, projections = numpy_weights(model.get_layer("embedding").members[0])
    scales = members[0].scales.numpy()
    for f, table in enumerate(members[0].tables):
        exact = tables[f] @ projections[f]
        restored = table.numpy().astype(np.float64) * scales[f]
        inside = np.abs(exact) <= 127 * scales[f]
        assert np.all(np.abs(restored - exact)[inside] <= scales[f] / 2 + 1e-7)
        assert np.all(np.abs(restored)[~inside] == pytest.approx(127 * scales[f]))
    # Sizes: int8 hashed tables are d/8 per id of the float32 full tables (plus the scales), d = 4 here.
    mlet_member = model.get_layer("embedding").members[0]
    assert members[0].physical_bytes == sum(mlet_member.num_buckets) * 4 + 4 * 2
    np.testing.assert_allclose(predict(small, inputs), predict(folded, inputs), atol=2e-2)
    path = str(tmp_path / "int8.keras")
    small.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("embedding").members[0].tables[0].dtype == "int8"
    np.testing.assert_allclose(predict(loaded, inputs), predict(small, inputs), atol=1e-7)


def test_equal_sized_tables_start_different():
    layer = MLETEmbedding([50, 50], 4, inner_dim=4)
    layer.build((None, 2))
    assert not np.array_equal(layer.tables[0].numpy(), layer.tables[1].numpy())
    assert not np.array_equal(layer.projections.numpy()[0], layer.projections.numpy()[1])


def test_fold_is_a_top_level_function():
    import tfcompress

    assert tfcompress.fold is fold
