"""Every ROBE-Z serving layout (`TableReader` chunk_reads x unique_ids x jit_compile, float and int8 tables) equals
the training layer's lookup bit for bit (docs/export_contract.md "Serving layout")."""

import functools
import itertools

import numpy as np
import pytest
import tensorflow as tf

from tfcompress import robe_hash
from tfcompress.layers import RobeEmbedding
from tfcompress.lookup import CHUNK_READS, TableReader
from tfcompress.quantize import quantize_int8

CARDS = [1000, 50, 7, 3000]
LAYOUTS = list(itertools.product(CHUNK_READS, (False, True), (False, True)))


def _ids(rows, seed):
    rng = np.random.default_rng(seed)
    ids = (rng.random((rows, len(CARDS))) * np.asarray(CARDS)).astype(np.int64)
    ids[0] = 0
    ids[-1] = np.asarray(CARDS) - 1
    ids[rows // 2:] = ids[: rows - rows // 2]  # repeated rows: what unique_ids dedupes
    return ids


# (output_dim, chunk_size, memory_size, signed): Z = D (one chunk), Z | D, a partial last chunk, Z = 1, a tiny M.
@pytest.mark.parametrize("dim, chunk, memory, signed", [(8, 8, 4000, False), (8, 4, 4000, True),
                                                        (7, 3, 999, False), (6, 1, 500, True), (4, 4, 4, False)])
def test_every_serving_layout_equals_call_bit_for_bit(dim, chunk, memory, signed):
    layer = RobeEmbedding(CARDS, dim, memory_size=memory, chunk_size=chunk, signed=signed, use_custom_op=False)
    spec = tf.TensorSpec([None, len(CARDS)], tf.int64)
    for rows in (2, 700):  # per_call: 2 rows take the element branch, 700 rows the window branch
        ids = _ids(rows, rows)
        expected = layer(ids).numpy()
        for chunk_reads, unique_ids, jit_compile in LAYOUTS:
            reader = TableReader(chunk_reads=chunk_reads, unique_ids=unique_ids, jit_compile=jit_compile)
            traced = tf.function(functools.partial(layer.serving_lookup, out_of_range="mod", tables=reader))
            got = traced.get_concrete_function(spec)(tf.constant(ids)).numpy()
            np.testing.assert_array_equal(got, expected, err_msg=f"{chunk_reads} {unique_ids} {jit_compile}")
    # One id out of range in a batch: the serving rule folds the batch (the in-range batches skip that division).
    ids = _ids(40, 7)
    folded = layer(ids).numpy()
    ids[3, 1] += CARDS[1]
    ids[5, 3] -= CARDS[3]  # negative
    for chunk_reads, unique_ids, jit_compile in LAYOUTS:
        reader = TableReader(chunk_reads=chunk_reads, unique_ids=unique_ids, jit_compile=jit_compile)
        traced = tf.function(functools.partial(layer.serving_lookup, out_of_range="mod", tables=reader))
        got = traced.get_concrete_function(spec)(tf.constant(ids)).numpy()
        np.testing.assert_array_equal(got, folded, err_msg=f"out of range: {chunk_reads} {unique_ids} {jit_compile}")


def test_windows_is_the_window_matrix_of_the_table_or_of_its_int8_copy():
    layer = RobeEmbedding(CARDS, 8, memory_size=3000, chunk_size=4, use_custom_op=False)
    ids = _ids(300, 3)
    layer(ids)
    memory = layer.memory.numpy()
    reader = TableReader(chunk_reads="windows")
    layer.serving_lookup(ids, tables=reader)
    (windows,) = reader.window_matrices.values()
    assert windows.shape == (3000 - 4 + 1, 4) and not windows.trainable
    np.testing.assert_array_equal(windows.numpy()[17], memory[17:21])
    np.testing.assert_array_equal(windows.numpy()[-1], memory[-4:])
    # int8: W holds the int8 values, scaled after the row gather exactly as the element gather is.
    key = next(iter(reader.tables))
    values, scale = quantize_int8(memory)
    copy = tf.Variable(values)
    expected = layer.serving_lookup(ids, tables=TableReader({key: (copy, float(scale))}, chunk_reads="elements"))
    quantized = TableReader({key: (copy, float(scale))}, chunk_reads="windows")
    np.testing.assert_array_equal(layer.serving_lookup(ids, tables=quantized).numpy(), expected.numpy())
    (int8_windows,) = quantized.window_matrices.values()
    assert int8_windows.dtype == tf.int8
    positions = robe_hash.robe_indices(ids, CARDS, 8, 4, 3000)
    np.testing.assert_array_equal(expected.numpy(), values[positions].astype(np.float32) * np.float32(scale))


def test_z1_windows_reads_the_array_itself():
    layer = RobeEmbedding(CARDS, 4, memory_size=300, chunk_size=1, use_custom_op=False)
    ids = _ids(20, 1)
    reader = TableReader(chunk_reads="windows")
    expected = layer(ids).numpy()
    np.testing.assert_array_equal(layer.serving_lookup(ids, tables=reader).numpy(), expected)
    assert reader.window_matrices == {}  # W of Z = 1 would be a copy of M


def test_table_reader_refuses_unknown_layout_options():
    with pytest.raises(ValueError, match="chunk_reads must be one of"):
        TableReader(chunk_reads="rows")
    with pytest.raises(TypeError, match="unique_ids must be True or False"):
        TableReader(unique_ids="yes")
    with pytest.raises(TypeError, match="jit_compile must be True or False"):
        TableReader(jit_compile=1)


@pytest.mark.parametrize("compression, expected", [(1000.0, "windows"), (40.0, "windows"), (39.0, "per_call"),
                                                   (8.0, "per_call")])
def test_auto_reads_windows_only_where_they_are_small_beside_the_full_tables(compression, expected):
    """"auto": W (Z x |M| floats) at most a tenth of the full tables (compression >= 10 Z, Z = 4 here), else per_call;
    for a shared memory the full tables of every sharer count. Values stay bit-identical either way."""
    from tfcompress.layers import CompressedEmbedding, RobeMemory

    layer = RobeEmbedding([20000, 20000], 8, compression=compression, chunk_size=4)
    ids = tf.constant([[3, 19999], [0, 7]], tf.int64)
    layer(ids)
    expected_values = layer.serving_lookup(ids, tables=TableReader(chunk_reads="elements")).numpy()
    reader = TableReader(chunk_reads="auto")
    np.testing.assert_array_equal(layer.serving_lookup(ids, tables=reader).numpy(), expected_values)
    assert bool(reader.window_matrices) == (expected == "windows")

    memory = RobeMemory(compression=compression, chunk_size=4)
    sharers = [CompressedEmbedding(20000, 8, memory=memory, name=f"t{i}") for i in range(2)]
    for sharer in sharers:
        sharer(tf.constant([1]))
    reader = TableReader(chunk_reads="auto")
    sharers[0].serving_lookup(tf.constant([5]), tables=reader)
    assert bool(reader.window_matrices) == (expected == "windows")


# ---- export round trip with each layout ------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"chunk_reads": "windows"}, {"chunk_reads": "elements"},
                                     {"chunk_reads": "per_call"},
                                     {"unique_ids": True}, {"jit_compile": True}, {"quantize": "int8"}])
def test_export_round_trip_with_each_layout(tmp_path, options):
    """The loaded SavedModel's probabilities equal the serving graph's (what verify checks in a fresh process),
    the metadata records the layout and the size table lists the window matrix as embedding bytes."""
    import json
    import os

    from tfcompress.export import export_saved_model
    from tfcompress.models import build_dlrm

    cards = [5000, 3000]
    robe = RobeEmbedding(cards, 8, memory_size=4000, chunk_size=4, signed=True)
    model = build_dlrm((2, 2), robe, (8,), (8,))
    path = export_saved_model(model, base_dir=str(tmp_path), name="robe", **options)
    with open(os.path.join(path, "assets.extra", "tfcompress_export.json")) as f:
        metadata = json.load(f)
    layout = {"chunk_reads": "auto", "unique_ids": False, "jit_compile": False}
    layout.update({key: value for key, value in options.items() if key != "quantize"})
    assert metadata["serving_layout"] == layout
    windows = [row for row in metadata["variables"] if "/windows" in row["name"]]
    # "auto" saves only M here: W (3997 x 4 floats) would be 25% of the full tables (8000 x 8), above the tenth.
    if layout["chunk_reads"] == "windows":
        dtype = "int8" if options.get("quantize") else "float32"
        assert [(row["shape"], row["dtype"], row["embedding"]) for row in windows] == [([3997, 4], dtype, True)]
        assert metadata["window_matrix_bytes"] == windows[0]["bytes"] == 3997 * 4 * (1 if dtype == "int8" else 4)
    else:
        assert windows == [] and metadata["window_matrix_bytes"] == 0
    loaded = tf.saved_model.load(path)
    with np.load(os.path.join(path, "assets.extra", "tfcompress_samples.npz")) as data:
        got = loaded.signatures["serving_default"](dense=tf.constant(data["dense"]),
                                                   sparse=tf.constant(data["sparse"]))["probability"].numpy()
        np.testing.assert_array_equal(got, data["serving_probability"])
        assert np.max(np.abs(got - data["keras_probability"])) <= metadata["keras_tolerance"]


def test_export_refuses_an_unknown_layout(tmp_path):
    from tfcompress.export import export_saved_model
    from tfcompress.models import build_dlrm

    model = build_dlrm((2, 2), RobeEmbedding([50, 30], 4, memory_size=100), (4,), (4,))
    with pytest.raises(ValueError, match="chunk_reads must be one of"):
        export_saved_model(model, base_dir=str(tmp_path), name="m", chunk_reads="rows")
    with pytest.raises(TypeError, match="jit_compile must be True or False"):
        export_saved_model(model, base_dir=str(tmp_path), name="m", jit_compile="yes")
    with pytest.raises(ValueError, match="jit_compile=True cannot be combined with onnx=True"):
        export_saved_model(model, base_dir=str(tmp_path), name="m", jit_compile=True, onnx=True)


def test_every_layout_verifies_in_a_fresh_process(tmp_path):
    """`tfcompress verify` (a process without tfcompress) loads each non-default layout and finds its predictions
    equal to the exporter's, and prints the layout and the window matrix bytes, read from the checkpoint (the default
    layout is verified in tests/test_export.py)."""
    import json
    import os

    from tfcompress.export import export_saved_model
    from tfcompress.export.verify import verify
    from tfcompress.models import build_dlrm

    model = build_dlrm((2, 2), RobeEmbedding([5000, 3000], 8, memory_size=4000, chunk_size=4, signed=True), (8,),
                       (8,))
    paths = [export_saved_model(model, base_dir=str(tmp_path), name="robe", **options)
             for options in ({"chunk_reads": "elements"}, {"chunk_reads": "per_call", "unique_ids": True},
                             {"jit_compile": True}, {"chunk_reads": "windows"})]
    result = verify(paths)
    assert result.ok, result.output
    for path in paths:
        with open(os.path.join(path, "assets.extra", "tfcompress_export.json")) as f:
            window_bytes = json.load(f)["window_matrix_bytes"]
        assert result.report(path)["sizes"]["window_matrix_bytes"] == window_bytes
    assert window_bytes == 3997 * 4 * 4  # the "windows" export: W of 3997 x 4 float32
    assert "of which ROBE window matrices (serving layout)" in result.output
    assert "serving layout: chunk_reads=per_call unique_ids=True jit_compile=False" in result.output
    assert "start tensorflow_model_server with --xla_cpu_compilation_enabled=true" in result.output


def test_export_warns_when_an_asked_window_matrix_outgrows_half_the_full_tables(tmp_path):
    """chunk_reads="windows" is exported as asked, with a warning; the default "auto" saves only M there."""
    import warnings

    from tfcompress.export import export_saved_model
    from tfcompress.models import build_dlrm

    model = build_dlrm((2, 2), RobeEmbedding([50, 30], 8, compression=2.0, chunk_size=8), (4,), (4,))
    with pytest.warns(RuntimeWarning, match="window matrices take .* chunk_reads='elements' or 'per_call'"):
        export_saved_model(model, base_dir=str(tmp_path), name="m", chunk_reads="windows")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        export_saved_model(model, base_dir=str(tmp_path), name="m")
        export_saved_model(model, base_dir=str(tmp_path), name="m", chunk_reads="per_call")
