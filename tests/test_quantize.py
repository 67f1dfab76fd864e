"""Post-training int8: the grid-searched scale, the int8 lookup layer, model conversion, size accounting."""

import numpy as np
import pytest

from tfcompress._keras import keras
from tfcompress.layers import (FullEmbedding, HashingTrickEmbedding, PlannedEmbedding, QuantizedEmbedding,
                               RobeEmbedding)
from tfcompress.model_rewrite import quantize_layer, quantize_model
from tfcompress.quantize import quantize_int8
from tfcompress.sizes import deployment_sizes, format_deployment_sizes


def l2_error(table, values, scale):
    """Independent reference: squared error of values * scale against table, in float64."""
    return float(np.sum((values.astype(np.float64) * scale - table.astype(np.float64)) ** 2))


def max_abs_quantization(table):
    """The textbook baseline: scale = max|w| / 127, round to nearest."""
    scale = np.abs(table).max() / 127.0
    return np.round(table / scale).astype(np.int8), scale


TABLES = {
    "gaussian": np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32),
    "uniform": np.random.default_rng(1).uniform(-0.05, 0.05, size=(300, 16)).astype(np.float32),
    "heavy_tailed": np.random.default_rng(2).standard_t(2, size=(500, 8)).astype(np.float32),
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_grid_scale_is_never_worse_than_max_abs(name):
    table = TABLES[name]
    values, scale = quantize_int8(table)
    assert values.dtype == np.int8 and values.shape == table.shape
    assert np.abs(values.astype(np.int32)).max() <= 127
    assert l2_error(table, values, scale) <= l2_error(table, *max_abs_quantization(table)) * (1 + 1e-9)


def test_a_long_tail_makes_the_search_clip_and_win():
    # In a large Laplace-distributed table the few largest values make the max-abs step coarse for all the
    # others; a smaller scale that clips those few costs less in total (ACIQ, Banner et al. 2019).
    table = np.random.default_rng(3).laplace(size=(10000, 16)).astype(np.float32)
    values, scale = quantize_int8(table)
    assert scale < 0.9 * np.abs(table).max() / 127.0
    assert l2_error(table, values, scale) < 0.8 * l2_error(table, *max_abs_quantization(table))


def test_chosen_scale_is_the_best_of_its_grid():
    table = TABLES["gaussian"]
    values, scale = quantize_int8(table, grid_size=20)
    best = l2_error(table, values, scale)
    peak = float(np.abs(table).max())
    for j in range(1, 21):
        s = peak / 127.0 * j / 20
        q = np.clip(np.round(table / s), -127, 127)
        assert best <= l2_error(table, q, s) * (1 + 1e-6)  # float32 vs float64 rounding of the scale


def test_rounding_error_is_at_most_half_a_step_where_not_clipped():
    table = TABLES["uniform"]
    values, scale = quantize_int8(table)
    inside = np.abs(table) <= 127 * scale
    assert np.all(np.abs(values * np.float64(scale) - table)[inside] <= scale / 2 + 1e-9)


def test_degenerate_and_invalid_tables():
    values, scale = quantize_int8(np.zeros((3, 4), np.float32))
    assert np.all(values == 0) and scale > 0
    values, scale = quantize_int8(np.full((2, 2), -0.5, np.float32))
    np.testing.assert_allclose(values * scale, -0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_int8(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="grid_size"):
        quantize_int8(np.ones((2, 2)), grid_size=0)


# ---- the int8 layer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_buckets", [None, [7, 5]])
def test_quantized_lookup_is_int8_row_times_scale(num_buckets):
    cards = [40, 5]
    layer = QuantizedEmbedding(cards, 3, num_buckets=num_buckets)
    rows = num_buckets or cards
    rng = np.random.default_rng(0)
    values = [rng.integers(-127, 128, size=(m, 3)).astype(np.int8) for m in rows]
    layer.set_quantized(values, [0.5, 0.01])
    ids = np.array([[39, 4], [7, 0], [0, 3]])
    out = layer(ids).numpy()
    for b in range(3):
        for f, scale in enumerate([0.5, 0.01]):
            np.testing.assert_allclose(out[b, f], values[f][ids[b, f] % rows[f]] * scale, rtol=1e-6)
    assert layer.trainable_weights == []
    assert layer.physical_bytes == sum(rows) * 3 + 2 * 4


def test_set_quantized_checks_dtype_and_shape():
    layer = QuantizedEmbedding([10], 2)
    with pytest.raises(ValueError, match="int8 of shape"):
        layer.set_quantized([np.zeros((10, 2), np.float32)], [1.0])
    with pytest.raises(ValueError, match="int8 of shape"):
        layer.set_quantized([np.zeros((9, 2), np.int8)], [1.0])
    with pytest.raises(ValueError, match="expected 1 tables"):
        layer.set_quantized([], [])


def test_quantize_layer_converts_full_and_hashed_tables_and_leaves_others():
    full = FullEmbedding([30, 8], 4)
    hashed = HashingTrickEmbedding([30, 8], 4, num_buckets=6)
    robe = RobeEmbedding([30], 4, memory_size=16)
    ids = np.array([[29, 7], [0, 1], [12, 6]])
    for layer in (full, hashed):
        want = layer(ids).numpy()
        quantized = quantize_layer(layer)
        assert type(quantized) is QuantizedEmbedding and quantized.name == layer.name
        scales = quantized.scales.numpy()
        # Each output element is within half a step of the float value (these tables have no outliers to clip).
        assert np.all(np.abs(quantized(ids).numpy() - want) <= scales[None, :, None] / 2 + 1e-7)
    assert quantize_layer(robe) is None
    planned = PlannedEmbedding(2, 4, [{"features": [1], "layer": FullEmbedding([8], 4)},
                                      {"features": [0], "layer": RobeEmbedding([30], 4, memory_size=16)}])
    planned(ids)
    converted = quantize_layer(planned)
    assert [type(m) for m in converted.members] == [QuantizedEmbedding, RobeEmbedding]
    np.testing.assert_array_equal(converted.members[1].memory.numpy(), planned.members[1].memory.numpy())
    assert converted.members[1].memory is not planned.members[1].memory


def test_quantize_model_and_keras_round_trip(tmp_path):
    inputs = keras.Input((2,), dtype="int64")
    hidden = keras.layers.Flatten()(HashingTrickEmbedding([100, 10], 4, num_buckets=[50, 10], name="emb")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden))
    ids = np.array([[99, 9], [3, 0], [53, 4]])
    small = quantize_model(model)
    assert type(small.get_layer("emb")) is QuantizedEmbedding
    np.testing.assert_allclose(small(ids).numpy(), model(ids).numpy(), atol=1e-2)
    path = str(tmp_path / "int8.keras")
    small.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(loaded.get_layer("emb").weights, small.get_layer("emb").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(loaded(ids).numpy(), small(ids).numpy())


# ---- size accounting -----------------------------------------------------------------------------------------------


def test_deployment_sizes_are_d_d2_d4_d8():
    cards, d = [1000, 20000, 6], 16
    sizes = {name: (size, ratio) for name, size, ratio in deployment_sizes(cards, d, inner_dim=64)}
    full = sum(cards) * d * 4
    assert sizes["full / folded (float32)"] == (full, 1.0)
    assert sizes["hashed (float32)"][0] == sum(cards) // 2 * d * 4  # halved rows: d/2 floats' worth per id
    assert sizes["full / folded (int8)"][0] == sum(cards) * d + 3 * 4  # d/4 plus one scale per table
    assert sizes["hashed (int8)"][0] == sum(cards) // 2 * d + 3 * 4  # d/8 plus the scales
    assert sizes["hashed (int8)"][1] == pytest.approx(1 / 8, rel=1e-3)
    assert sizes["MLET training, k=64 (float32)"][0] == (sum(cards) * 64 + 3 * 64 * d) * 4
    text = format_deployment_sizes(cards, d)
    assert text.count("\n") == 5 and "0.125" in text
    with pytest.raises(ValueError, match="hashed_rows"):
        deployment_sizes(cards, d, hashed_rows=[1])
