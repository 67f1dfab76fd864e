"""DLRM and DCNv2: layers against NumPy references, whole-model wiring, training, save/load round trips."""

import numpy as np
import pytest
import tensorflow as tf

from tfcompress._keras import keras
from tfcompress.layers import FullEmbedding, RobeEmbedding
from tfcompress.models import Cross, DotInteraction, build_dcn, build_dlrm, build_mlp
from tfcompress.plan import make_plan

CARDS = [50, 7, 300, 20]


def features(rows, n_dense=3, cards=CARDS, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense": rng.normal(size=(rows, n_dense)).astype(np.float32),
        "sparse": np.stack([rng.integers(0, n, rows) for n in cards], axis=1).astype(np.int64),
    }


def relu(x):
    return np.maximum(x, 0.0)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def dense_forward(model, layer_name, x, activation):
    kernel, bias = model.get_layer(layer_name).get_weights() if isinstance(layer_name, str) else layer_name
    y = x @ kernel + bias
    return relu(y) if activation == "relu" else y


def mlp_forward(block, x):
    for layer in block.layers:
        kernel, bias = layer.get_weights()
        x = x @ kernel + bias
        x = relu(x) if layer.get_config()["activation"] == "relu" else x
    return x


# ---- DotInteraction ----------------------------------------------------------------------------------------------


def pairwise_dots_reference(x, self_interaction=False):
    """Loop over pairs (i, j), i < j (or i <= j), in row-major order."""
    n = x.shape[1]
    pairs = [(i, j) for i in range(n) for j in range(n) if (i <= j if self_interaction else i < j)]
    return np.stack([np.sum(x[:, i] * x[:, j], axis=-1) for i, j in pairs], axis=1)


@pytest.mark.parametrize("self_interaction", [False, True])
def test_dot_interaction_equals_pairwise_dots(self_interaction):
    x = np.random.default_rng(1).normal(size=(3, 5, 4)).astype(np.float32)
    out = DotInteraction(self_interaction=self_interaction)(x).numpy()
    expected = pairwise_dots_reference(x, self_interaction)
    assert out.shape == (3, 10 if not self_interaction else 15)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_dot_interaction_hand_worked():
    # Vectors a=(1,0), b=(2,3), c=(-1,1): <a,b>=2, <a,c>=-1, <b,c>=1.
    x = np.array([[[1, 0], [2, 3], [-1, 1]]], dtype=np.float32)
    np.testing.assert_array_equal(DotInteraction()(x).numpy(), [[2, -1, 1]])


def test_dot_interaction_rejects_bad_arguments():
    with pytest.raises(ValueError, match="self_interaction"):
        DotInteraction(self_interaction="yes")
    with pytest.raises(ValueError, match=r"\[batch, N, D\]"):
        DotInteraction()(np.ones((2, 3), dtype=np.float32))


# ---- Cross -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection_dim", [None, 2])
def test_cross_layer_equals_formula(projection_dim):
    rng = np.random.default_rng(2)
    x0 = rng.normal(size=(4, 6)).astype(np.float32)
    xl = rng.normal(size=(4, 6)).astype(np.float32)
    layer = Cross(projection_dim=projection_dim, bias_initializer="random_normal")
    out = layer([x0, xl]).numpy()
    if projection_dim is None:
        kernel, bias = layer.get_weights()
        assert kernel.shape == (6, 6)
    else:
        down, up, bias = layer.get_weights()
        assert down.shape == (6, 2) and up.shape == (2, 6)
        kernel = down @ up
    np.testing.assert_allclose(out, x0 * (xl @ kernel + bias) + xl, rtol=1e-5, atol=1e-5)


def test_cross_rejects_bad_arguments():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="projection_dim"):
            Cross(projection_dim=bad)
    with pytest.raises(ValueError, match="same shape"):
        Cross()([np.ones((2, 3), np.float32), np.ones((2, 4), np.float32)])


# ---- whole models against a NumPy forward pass ------------------------------------------------------------------


def test_dlrm_forward_equals_numpy_reference():
    embedding = FullEmbedding(CARDS, 4, embeddings_initializer="random_normal")
    model = build_dlrm((3, 4), embedding, bottom_mlp=(8,), top_mlp=(6, 5))
    x = features(7)
    out = model(x).numpy()

    tables = embedding.get_weights()
    emb = np.stack([tables[f][x["sparse"][:, f]] for f in range(len(CARDS))], axis=1)  # [B, F, D]
    bottom = mlp_forward(model.get_layer("bottom_mlp"), x["dense"])  # ends in a width-4 ReLU layer
    assert bottom.shape == (7, 4)
    assert all(layer.get_config()["activation"] == "relu" for layer in model.get_layer("bottom_mlp").layers)
    vectors = np.concatenate([bottom[:, None, :], emb], axis=1)  # bottom first, then the F embeddings
    top_input = np.concatenate([bottom, pairwise_dots_reference(vectors)], axis=1)
    assert top_input.shape == (7, 4 + 10)
    logit = dense_forward(model, "logit", mlp_forward(model.get_layer("top_mlp"), top_input), None)
    np.testing.assert_allclose(out, sigmoid(logit), rtol=1e-4, atol=1e-5)


def test_dlrm_without_dense_features_interacts_embeddings_only():
    embedding = FullEmbedding(CARDS, 4, embeddings_initializer="random_normal")
    model = build_dlrm((0, 4), embedding, bottom_mlp=(8,), top_mlp=(6,))
    x = features(5, n_dense=0)
    out = model(x).numpy()
    tables = embedding.get_weights()
    emb = np.stack([tables[f][x["sparse"][:, f]] for f in range(len(CARDS))], axis=1)
    logit = dense_forward(model, "logit", mlp_forward(model.get_layer("top_mlp"), pairwise_dots_reference(emb)), None)
    np.testing.assert_allclose(out, sigmoid(logit), rtol=1e-4, atol=1e-5)
    assert all(layer.name != "bottom_mlp" for layer in model.layers)


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
def test_dcn_forward_equals_numpy_reference(structure):
    embedding = FullEmbedding(CARDS, 3, embeddings_initializer="random_normal")
    model = build_dcn((3, 4), embedding, cross_layers=2, deep_layers=(5,), projection_dim=None, structure=structure)
    x = features(6)
    out = model(x).numpy()
    tables = embedding.get_weights()
    emb = np.stack([tables[f][x["sparse"][:, f]] for f in range(len(CARDS))], axis=1)
    x0 = np.concatenate([emb.reshape(6, -1), x["dense"]], axis=1)  # embeddings flattened, then dense
    xl = x0
    for i in range(2):
        kernel, bias = model.get_layer(f"cross_{i}").get_weights()
        xl = x0 * (xl @ kernel + bias) + xl
    deep = model.get_layer("deep_mlp")
    hidden = mlp_forward(deep, xl) if structure == "stacked" else np.concatenate([xl, mlp_forward(deep, x0)], 1)
    np.testing.assert_allclose(out, sigmoid(dense_forward(model, "logit", hidden, None)), rtol=1e-4, atol=1e-5)


def test_models_take_a_schema_like_object_and_check_arguments():
    class SchemaLike:
        n_dense, n_sparse = 3, 4

    assert build_dlrm(SchemaLike(), RobeEmbedding(CARDS, 4, memory_size=64), (8,), (4,)).output_shape == (None, 1)
    assert build_dcn({"n_dense": 3, "n_sparse": 4}, RobeEmbedding(CARDS, 4, memory_size=64), 1, ()).output_shape == (
        None, 1)
    with pytest.raises(ValueError, match="bottom_mlp"):
        build_dlrm((3, 4), RobeEmbedding(CARDS, 4, memory_size=64), bottom_mlp=(8, 0))
    with pytest.raises(ValueError, match="n_sparse"):
        build_dlrm((3, 0), RobeEmbedding(CARDS, 4, memory_size=64))
    with pytest.raises(ValueError, match="cross_layers"):
        build_dcn((3, 4), RobeEmbedding(CARDS, 4, memory_size=64), cross_layers=-1)
    with pytest.raises(ValueError, match="structure"):
        build_dcn((3, 4), RobeEmbedding(CARDS, 4, memory_size=64), structure="mixed")
    # An embedding layer for a different number of features does not fit the sparse input.
    with pytest.raises(ValueError):
        build_dlrm((3, 4), RobeEmbedding(CARDS[:3], 4, memory_size=64))


# ---- training and save/load --------------------------------------------------------------------------------------


def learnable_problem(rows=4096, seed=3):
    """Clicks driven by feature 0's id (a lookup table) and the first dense value: a model must learn both."""
    x = features(rows, seed=seed)
    effect = np.random.default_rng(seed + 1).normal(scale=2.0, size=CARDS[0])
    logit = effect[x["sparse"][:, 0]] + 1.5 * x["dense"][:, 0]
    y = (np.random.default_rng(seed + 2).random(rows) < sigmoid(logit)).astype(np.float32)[:, None]
    return x, y


@pytest.mark.parametrize("arch", ["dlrm", "dcn"])
def test_short_fit_lowers_the_loss(arch):
    keras.utils.set_random_seed(0)
    embedding = RobeEmbedding(CARDS, 8, compression=4.0, chunk_size=4)
    if arch == "dlrm":
        model = build_dlrm((3, 4), embedding, bottom_mlp=(16,), top_mlp=(16,))
    else:
        model = build_dcn((3, 4), embedding, cross_layers=2, deep_layers=(16,))
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
    x, y = learnable_problem()
    before = model.evaluate(x, y, batch_size=1024, verbose=0)
    model.fit(x, y, batch_size=256, epochs=4, verbose=0)
    after = model.evaluate(x, y, batch_size=1024, verbose=0)
    assert after < 0.85 * before, (before, after)


@pytest.mark.parametrize("arch", ["dlrm", "dcn"])
def test_keras_save_load_round_trip(arch, tmp_path):
    embedding = RobeEmbedding(CARDS, 4, compression=3.0, chunk_size=2, signed=True)
    if arch == "dlrm":
        model = build_dlrm((3, 4), embedding, bottom_mlp=(8,), top_mlp=(6,))
    else:
        model = build_dcn((3, 4), embedding, cross_layers=2, deep_layers=(6,), projection_dim=3)
    model.compile(keras.optimizers.SGD(0.1), "binary_crossentropy")
    x, y = learnable_problem(512)
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)  # weights away from their initial values
    path = str(tmp_path / f"{arch}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert isinstance(loaded.get_layer(embedding.name), RobeEmbedding)


def test_plan_layer_works_inside_both_models():
    plan = make_plan(CARDS, 4, "robe", ratio=4.0, uncompressed_below=30, chunk_size=2)
    x = features(9)
    for model in (build_dlrm((3, 4), plan.build_layer(), (8,), (4,)), build_dcn((3, 4), plan.build_layer(), 1, (4,))):
        out = model(x).numpy()
        assert out.shape == (9, 1) and np.all((out > 0) & (out < 1))


def test_build_mlp_layers_and_activations():
    block = build_mlp((5, 3), name="tower", final_activation="linear")
    x = np.random.default_rng(4).normal(size=(2, 4)).astype(np.float32)
    out = block(x).numpy()
    (k0, b0), (k1, b1) = block.layers[0].get_weights(), block.layers[1].get_weights()
    np.testing.assert_allclose(out, relu(x @ k0 + b0) @ k1 + b1, rtol=1e-5, atol=1e-6)
    assert [layer.name for layer in block.layers] == ["tower_0", "tower_1"]
    with pytest.raises(ValueError, match="units"):
        build_mlp("512", name="units")
