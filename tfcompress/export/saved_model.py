"""Export a trained click model as a SavedModel that stock TensorFlow Serving loads (docs/export_contract.md).

    from tfcompress.export import export_saved_model

    path = export_saved_model(model, base_dir="saved_models", name="criteo_robe")          # saved_models/criteo_robe/1
    path = export_saved_model(model, name="criteo_robe", quantize="int8", onnx=True)      # .../2, plus model.onnx

What lands in `saved_models/NAME/VERSION/`:

- the SavedModel (`saved_model.pb`, `variables/`) with two signatures, both returning {"probability": f32[B, 1]}:
  `serving_default` on tensors (`dense` f32[B, n_dense], `sparse` i64[B, n_sparse]) and `examples` on a string
  vector of serialized `tf.train.Example` in the TFRecord layout (keys `dense` float[n_dense] and `sparse`
  int64[n_sparse]; `label` may be present and is ignored). The second is what a TF Serving Predict client sends
  when it has Examples (see `tfcompress.export.verify` for a PredictRequest round trip). With
  `raw_preprocessing=DATA_DIR` (a directory written by `tfcompress data convert`) also `raw` and `raw_features`
  on the raw fields of log rows as strings (`fields` string[B, F]: Criteo hex, Avazu strings), whose in-graph
  preprocessing equals the converter's (`tfcompress.export.raw_features`); `raw` returns the probability (NaN for a row
  the converter would have rejected) with `valid` and `reject_reason`.
- `assets.extra/`: `tfcompress_export.json` (signatures, size table, tolerances, out-of-range rule),
  `tfcompress_samples.npz` (sample rows with the Keras model's and the serving graph's predictions, which
  `tfcompress verify` compares against in a fresh process) and `tf_serving_warmup_requests` (TF Serving replays
  these PredictRequests when it loads the version). TF Serving ignores everything else in assets.extra.
- `model.onnx` with `onnx=True` (the tensor signature converted by tf2onnx at opset `DEFAULT_ONNX_OPSET`; its
  predictions are checked against the SavedModel's to 1e-5 before the export is published).

and `saved_models/models.config` (TF Serving's ModelServerConfig text format) gains or updates the entry NAME, so
`tensorflow_model_server --model_config_file=saved_models/models.config` serves the newest version. Both need
tensorflow-serving-api, installed without its dependencies (`tfcompress.export.serving_config` says why); without
it importing this module raises ImportError saying how to install it.

Models with other inputs (anything but exactly {"dense", "sparse"}: string ids with a StringLookup, several id
inputs, ragged bags, dense inputs of any names) get `serving_default` with one tensor per input (a ragged input NAME
as NAME_values + NAME_row_lengths) and `examples` with one feature per input (`tfcompress.export.model_inputs`),
returning the model's own outputs.

What the serving graph contains (stock TensorFlow ops only: TF Serving's binary cannot load our custom ops):

- the model's graph is traced with every id layer's `serving_lookup` in place of its `call`
  (`tfcompress.export.serving_model.ServingModel`; the user's model and its layers are not changed): stock ops,
  never the custom ops, and lookups are plain gathers (the training-time gradient plumbing of
  `tfcompress.lookup.gather_with_gradient` is dropped: serving needs no gradient), bit-identical to `call`;
- ROBE-Z: the one shared array plus the chunk hash of `tfcompress.robe_hash.robe_chunk_hash_tf` (int64 per id, int32
  per chunk), each chunk read as one contiguous slice (`RobeEmbedding.serving_lookup`); with the default
  chunk_reads="auto", where the array's window matrix W[j] = M[j : j + Z] is at most a tenth of the full tables,
  W is saved in its place and a chunk is one row of it (`tfcompress.export.serving_layout`);
- MLET: folded into one table per feature first (`tfcompress.fold`); full, hashed and QR tables as they are;
- `quantize="int8"`: every float embedding table (ROBE's array included) is stored as int8 with one scale per
  table (the least-error scale of `tfcompress.quantize.quantize_int8`) and de-quantized after the gather;
  `quantize="fp16"`: stored as float16 and cast back to float32 after the gather. Dense layers stay float32.

Out-of-range ids at serving. Training's "error" rule (an assertion) would fail a whole batched request for one
unseen id, so by default (`serving_out_of_range="mod"`) the serving graph folds every id into its table with a
floor modulo, exactly as layers built with out_of_range="mod" do in training (-1 reads row n_f - 1; nothing
raises, whatever int64 a client sends). `serving_out_of_range="as_trained"` keeps each layer's own rule: an id
outside [0, n_f) of an "error" layer then makes TF Serving answer that request with INVALID_ARGUMENT (naming the
feature and the value); the server itself keeps serving.

Malformed requests. Every signature declares its inputs with any shape in the signature_def and checks the
documented shapes first thing in graph (`tfcompress.export.signatures.checked_input`): a wrong rank or width, dense
and sparse of different batches, a record of `examples` that is not an Example with the layout's `sparse`/`dense`,
`fields` of the wrong width each make TF Serving answer INVALID_ARGUMENT naming the input, the expected and the
received shape (or the record and why). The metadata keeps the documented shapes under `inputs` and what the
signature_def declares under `signature_def_inputs`.
"""

import datetime
import json
import os
import shutil
import tempfile
import warnings

import numpy as np
import tensorflow as tf

import tfcompress
from tfcompress._keras import keras
from tfcompress.export.onnx import DEFAULT_ONNX_OPSET, export_onnx, onnx_predictions
from tfcompress.export.raw_features import (RAW_FEATURES_SIGNATURE, RAW_INPUT, RAW_SIGNATURE, RawPreprocessor,
                                            load_raw_spec, pack_fields, raw_sample_rows, reference_features)
from tfcompress.export.serving_config import check_model_name, update_models_config
from tfcompress.export import model_inputs
from tfcompress.export.serving_model import (ServingModel, embedding_layer_sizes, feature_counts, fold_for_serving,
                                             model_cardinalities, quantized_substitutes, size_embedding_layers,
                                             takes_dense_sparse, unique_names, variable_paths)
from tfcompress.export.signatures import (EXAMPLE_SIGNATURE, EXAMPLES_INPUT, OUTPUT_KEY, SERVED_SHAPE,
                                          TENSOR_SIGNATURE, example_features, model_input_functions,
                                          raw_serving_functions, serving_functions, write_model_input_warmup,
                                          write_warmup_requests)
from tfcompress.export.serving_layout import (DEFAULT_CHUNK_READS, serving_layout, warn_if_windows_are_large,
                                              window_matrix_paths)
from tfcompress.layers.base import nested_layers
from tfcompress.lookup import TableReader, resource_variable

QUANTIZE_CHOICES = (None, "int8", "fp16")
SERVING_OUT_OF_RANGE_CHOICES = ("mod", "as_trained")
# How far the exported model's probabilities may be from the float32 Keras model's. float32: the same arithmetic
# up to op fusion. fp16 tables: a relative rounding error of 2^-11 per element. int8: up to scale / 2 per element
# (about max|w| / 254), which moves a probability by well under 0.02 on the models tested.
KERAS_TOLERANCE = {None: 1e-5, "fp16": 1e-3, "int8": 2e-2}
# The SavedModel against the serving graph it was saved from (same ops, same values): float32 round-off only.
PARITY_TOLERANCE = 1e-5
DEFAULT_SAMPLE_ROWS = 64

METADATA_DIR = "assets.extra"
METADATA_FILE = "tfcompress_export.json"
SAMPLES_FILE = "tfcompress_samples.npz"
RAW_SAMPLES_FILE = "tfcompress_raw_samples.npz"
WARMUP_FILE = "tf_serving_warmup_requests"
ONNX_FILE = "model.onnx"
METADATA_FORMAT = 1
# `contract` in the metadata of a model with other inputs (absent: the {"dense", "sparse"} contract).
MODEL_INPUTS_CONTRACT = "model_inputs"


# ---------------------------------------------------------------------------------------------- size table
def size_table(named_variables, model):
    """One row per saved variable plus the totals; `uncompressed_bytes` is the model with full float32 tables.

    The uncompressed model keeps the non-embedding weights and replaces every embedding layer by full float32
    tables: sum over its features of cardinality x output_dim x 4 bytes.
    """
    embedding_layers = size_embedding_layers(model)
    embedding_ids = {id(resource_variable(w)) for layer in embedding_layers for w in layer.weights}
    rows = []
    for name, variable in named_variables.items():
        nbytes = int(np.prod(variable.shape, dtype=np.int64)) * variable.dtype.size
        # Quantized copies and ROBE window matrices (`tfcompress.export.serving_layout`) are embedding tables too.
        is_embedding = id(variable) in embedding_ids or name.endswith(("/int8", "/fp16")) or "/windows" in name
        rows.append({"name": name, "dtype": variable.dtype.name, "shape": [int(d) for d in variable.shape],
                     "bytes": nbytes, "embedding": bool(is_embedding)})
    dense_bytes = sum(row["bytes"] for row in rows if not row["embedding"])
    sizes = [embedding_layer_sizes(layer) for layer in embedding_layers]
    logical_bytes = sum(logical * 4 for _, _, logical in sizes)
    return {
        "variables": rows,
        "exported_bytes": sum(row["bytes"] for row in rows),
        "window_matrix_bytes": sum(row["bytes"] for row in rows if "/windows" in row["name"]),
        "uncompressed_bytes": dense_bytes + logical_bytes,
        "embedding_layers": [
            {"name": layer.name, "class": type(layer).__name__, "cardinalities": cardinalities,
             "output_dim": output_dim, "logical_parameters": logical}
            for layer, (cardinalities, output_dim, logical) in zip(embedding_layers, sizes)
        ],
    }


def format_size_table(table):
    """The size table as aligned text (also what `tfcompress verify` prints, computed there independently)."""
    lines = [f"{'variable':<48} {'dtype':<8} {'shape':<16} {'bytes':>14}"]
    for row in table["variables"]:
        lines.append(f"{row['name']:<48} {row['dtype']:<8} {str(tuple(row['shape'])):<16} {row['bytes']:>14,}")
    exported, uncompressed = table["exported_bytes"], table["uncompressed_bytes"]
    if table.get("window_matrix_bytes"):
        lines.append(f"{'of which ROBE window matrices (serving layout)':<74} {table['window_matrix_bytes']:>14,}")
    lines.append(f"{'total':<74} {exported:>14,}")
    lines.append(f"{'uncompressed (full float32 tables)':<74} {uncompressed:>14,}")
    lines.append(f"{'compression':<74} {uncompressed / max(exported, 1):>13.1f}x")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- samples
def sample_rows(n_dense, cardinalities, rows=DEFAULT_SAMPLE_ROWS, seed=0):
    """In-range sample rows: random dense values and ids, plus the edge ids 0 and n_f - 1 in the first two rows."""
    rng = np.random.default_rng(seed)
    cards = np.asarray(cardinalities, np.int64)
    sparse = (rng.random((rows, len(cards))) * cards).astype(np.int64)
    sparse[0] = 0
    if rows > 1:
        sparse[1] = cards - 1
    dense = rng.normal(size=(rows, n_dense)).astype(np.float32)
    return {"dense": dense, "sparse": sparse}


def out_of_range_rows(n_dense, cardinalities):
    """Ids no table has: -1, n_f, n_f + 12345, +-2^40 (and a row mixing valid ones), with zero dense values."""
    cards = np.asarray(cardinalities, np.int64)
    sparse = np.stack([-np.ones_like(cards), cards, cards + 12345, np.full_like(cards, 2**40),
                       np.full_like(cards, -(2**40) - 3), np.where(np.arange(len(cards)) % 2 == 0, cards - 1, -7)])
    return {"dense": np.zeros((len(sparse), n_dense), np.float32), "sparse": sparse}


def _check_inputs(inputs, n_dense, n_sparse):
    if not isinstance(inputs, dict) or not {"dense", "sparse"} <= set(inputs):
        raise ValueError(f"sample_inputs must be a dict with 'dense' [N, {n_dense}] and 'sparse' [N, {n_sparse}], "
                         f"got {sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__}")
    dense = np.asarray(inputs["dense"], np.float32)
    sparse = np.asarray(inputs["sparse"], np.int64)
    if dense.ndim != 2 or dense.shape[1] != n_dense or sparse.shape != (dense.shape[0], n_sparse):
        raise ValueError(f"sample_inputs must be dense [N, {n_dense}] and sparse [N, {n_sparse}] with the same N, "
                         f"got {dense.shape} and {sparse.shape}")
    return {"dense": dense, "sparse": sparse}


# ------------------------------------------------------------------------------------------------ versions
def existing_versions(model_dir):
    """Integer version directories under saved_models/NAME (what TF Serving sees), ascending."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(entry) for entry in os.listdir(model_dir)
                  if entry.isdigit() and os.path.isdir(os.path.join(model_dir, entry)))


def next_version(model_dir):
    """The next free integer version: one more than the largest, 1 for a new model."""
    versions = existing_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def _new_version(base_dir, name, version):
    """(model_dir, version, version_dir) of the version to write: `version`, or the next free one."""
    model_dir = os.path.join(base_dir, name)
    if version is None:
        version = next_version(model_dir)
    elif isinstance(version, bool) or int(version) != version or version < 1:
        raise ValueError(f"version must be an integer >= 1, got {version!r}")
    version = int(version)
    version_dir = os.path.join(model_dir, str(version))
    if os.path.exists(version_dir):
        raise ValueError(f"{version_dir} exists; versions are never overwritten (omit version= for the next one)")
    return model_dir, version, version_dir


# ------------------------------------------------------------------------------------------------ export
def _probability(function, inputs):
    return function(dense=tf.constant(inputs["dense"]), sparse=tf.constant(inputs["sparse"]))[OUTPUT_KEY].numpy()


def _check_stock_graph(concrete_functions):
    """Refuse to write a graph that references the ROBE custom ops (a guard; `verify` checks in a clean process)."""
    custom = set()
    for function in concrete_functions:
        graph_def = function.graph.as_graph_def()
        nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
        custom.update(node.op for node in nodes if node.op.startswith("Robe"))
    if custom:
        raise RuntimeError(f"internal error: the serving graph references custom ops {sorted(custom)}")


def _raw_spec(data_dir, n_dense, cardinalities):
    """The RawSpec of a converted data directory, checked against the model's inputs and table sizes."""

    spec = load_raw_spec(data_dir)
    if spec.n_dense != n_dense or list(spec.cardinalities) != [int(c) for c in cardinalities]:
        raise ValueError(f"raw_preprocessing {data_dir}: the conversion gives {spec.n_dense} dense columns and "
                         f"tables {list(spec.cardinalities)}, the model takes {n_dense} dense columns and tables "
                         f"{[int(c) for c in cardinalities]}; give the data directory the model was trained on")
    return spec


def _raw_samples(spec, concrete):
    """Sample raw rows with the converter's features for them; refuses an export whose graph disagrees."""
    fields = raw_sample_rows(spec)
    reference = reference_features(spec, fields)
    got = concrete[RAW_FEATURES_SIGNATURE](**{RAW_INPUT: tf.constant([[bytes(v) for v in row] for row in fields])})
    got = {key: value.numpy() for key, value in got.items()}
    same = (np.array_equal(got["sparse"], reference["sparse"]) and np.array_equal(got["valid"], reference["valid"])
            and np.array_equal(got["reject_reason"], reference["reject_reason"])
            and np.allclose(got["dense"], reference["dense"], rtol=1e-6, atol=1e-6))
    if not same:
        raise RuntimeError("internal error: the raw signature's preprocessing differs from the converter's on the "
                           "sample rows; the export was not published")
    return {**pack_fields(fields), **{f"converter_{key}": value for key, value in reference.items()}}


def _raw_signature_metadata(spec, n_dense, n_sparse):
    inputs = {RAW_INPUT: ["string", [None, len(spec.columns)]]}
    flags = {"valid": ["bool", [None]], "reject_reason": ["string", [None]]}
    return {
        RAW_SIGNATURE: {"inputs": inputs, "outputs": {OUTPUT_KEY: ["float32", [None, 1]], **flags},
                        "raw_preprocessing": spec.describe()},
        RAW_FEATURES_SIGNATURE: {"inputs": inputs, "outputs": {"dense": ["float32", [None, n_dense]],
                                                                "sparse": ["int64", [None, n_sparse]], **flags}},
    }


def _serving_reader(folded, serving_out_of_range, quantize, layout, paths, tensor_function):
    """The `TableReader` of the serving trace: with `quantize`, a first trace through a probe reader finds the tables
    every lookup reads, so that exactly those get int8/float16 copies (named in `paths`, updated in place).
    `tensor_function(served)`: the serving_default tf.function of a `ServingModel` (one per contract)."""
    substitutes = {}
    if quantize is not None:
        probe = TableReader()
        tensor_function(ServingModel(folded, serving_out_of_range, probe)).get_concrete_function()
        substitutes = quantized_substitutes(probe.tables, quantize, paths)
        for values, _ in substitutes.values():
            paths[id(values)] = values.name.split(":")[0]
    return TableReader(substitutes, **layout)


def _saved_variables(concrete, reader, paths, folded):
    """({saved name: variable}, size table) of exactly the variables the signatures read, the window matrices
    `reader` made included (they are made in `tf.init_scope`, so no concrete function lists them)."""
    paths.update(window_matrix_paths(reader, paths))
    captured = {id(v): v for function in concrete.values() for v in function.variables}
    captured.update({id(v): v for v in reader.window_matrices.values()})
    named = unique_names(captured.values(), paths)
    return named, size_table(named, folded)


def _metadata_header(model, name, version):
    """The metadata keys every export starts with."""
    return {
        "format": METADATA_FORMAT,
        "name": name,
        "version": version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tfcompress": tfcompress.__version__,
        "tensorflow": tf.__version__,
        "keras_model": model.name,
    }


def _signature_def_inputs(signatures):
    """Adds to each signature's metadata the shapes its signature_def declares: `SERVED_SHAPE` (any), because the
    graph checks the documented `inputs` shapes itself (`tfcompress.export.signatures.checked_input`)."""
    return {name: {**entry, "signature_def_inputs": {key: [dtype, SERVED_SHAPE]
                                                     for key, (dtype, _) in entry["inputs"].items()}}
            for name, entry in signatures.items()}


def export_saved_model(model, base_dir="saved_models", name=None, version=None, quantize=None, onnx=False,
                       schema=None, serving_out_of_range="mod", sample_inputs=None, onnx_opset=DEFAULT_ONNX_OPSET,
                       config_base_path=None, tolerance=None, raw_preprocessing=None, chunk_reads=DEFAULT_CHUNK_READS,
                       unique_ids=False, jit_compile=False):
    """Write `model` as BASE_DIR/NAME/VERSION/ for TF Serving and register NAME in BASE_DIR/models.config.

    Example:

    >>> path = export_saved_model(model, base_dir="saved_models", name="criteo_robe")
    >>> # then, in a process that never imports tfcompress:  tfcompress verify saved_models/criteo_robe/1

    Args:
        model: a Keras model with inputs {"dense": f32[B, n_dense], "sparse": i64[B, n_sparse]} returning the click
            probability [B, 1] (what `tfcompress.models` builds), with any tfcompress embedding layers; or any other
            functional/Sequential Keras model of Keras and tfcompress layers, whose signature is derived from its
            inputs (string, several id, ragged and dense inputs of any names: `tfcompress.export.model_inputs`,
            docs/export_contract.md "Models with other inputs"; onnx, schema and raw_preprocessing do not apply).
        base_dir: the TF Serving model base directory.
        name: the served model's name (default: the Keras model's name).
        version: integer version; default the next free one. An existing version is never overwritten.
        quantize: None (float32 tables), "int8" or "fp16" (see the module doc); dense layers stay float32.
        onnx: also write model.onnx (tensor signature, opset `onnx_opset`), checked against the SavedModel.
        schema: the dataset's `tfcompress.data.schema.Schema`; checked against the model's inputs and used for
            the table sizes (else they are read from the model's embedding layer).
        serving_out_of_range: "mod" (fold every id into range; never raises) or "as_trained" (each layer's own
            rule). See the module doc.
        sample_inputs: {"dense", "sparse"} rows (in range) whose predictions are stored for `verify`; default
            `DEFAULT_SAMPLE_ROWS` random rows. For a model with other inputs: {input name: array or
            tf.RaggedTensor}, as the model takes them (needed when no layer tells the range of an integer input).
        onnx_opset: ONNX opset for `onnx=True`.
        config_base_path: base_path written to models.config (default: the absolute path of BASE_DIR/NAME).
        tolerance: allowed |exported - Keras| probability difference recorded for `verify`; default
            `KERAS_TOLERANCE[quantize]`.
        raw_preprocessing: a directory written by `tfcompress data convert` (criteo-tsv, criteo-csv, avazu-csv or
            csv): adds the `raw` and `raw_features` signatures on raw string fields, preprocessed in graph as the
            converter does (`tfcompress.export.raw_features`), checked before publishing against the converter's own
            parser on sample rows, which are stored for `verify`.
        chunk_reads, unique_ids, jit_compile: the serving layout of ROBE-Z lookups (`tfcompress.lookup.TableReader`,
            docs/export_contract.md "Serving layout"); the defaults are the measured fastest on CPU without XLA
            (BENCHMARKS.md "Serving (issue 20)"). jit_compile=True needs TF Serving started with
            `--xla_cpu_compilation_enabled=true`.

    Returns:
        The path of the new version directory.

    Raises:
        ValueError: a bad argument, a model input that cannot be served (named), an existing version.
    """
    layout = serving_layout(chunk_reads, unique_ids, jit_compile, onnx)  # checked before any work
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    if serving_out_of_range not in SERVING_OUT_OF_RANGE_CHOICES:
        raise ValueError(f"serving_out_of_range must be one of {SERVING_OUT_OF_RANGE_CHOICES}, "
                         f"got {serving_out_of_range!r}")
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
    name = check_model_name(name if name is not None else model.name)
    tolerance = KERAS_TOLERANCE[quantize] if tolerance is None else float(tolerance)
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}")
    if not takes_dense_sparse(model):
        return _export_model_inputs(model, base_dir, name, version, quantize, onnx, schema, serving_out_of_range,
                                    sample_inputs, config_base_path, tolerance, raw_preprocessing, layout)
    n_dense, n_sparse = feature_counts(model, schema)
    cardinalities = model_cardinalities(model, n_sparse, schema)
    if len(cardinalities) != n_sparse:
        raise ValueError(f"schema lists {len(cardinalities)} cardinalities for {n_sparse} sparse columns")

    model_dir, version, version_dir = _new_version(base_dir, name, version)

    samples = _check_inputs(sample_inputs, n_dense, n_sparse) if sample_inputs is not None else \
        sample_rows(n_dense, cardinalities)
    raw_spec = _raw_spec(raw_preprocessing, n_dense, cardinalities) if raw_preprocessing is not None else None
    keras_probability = np.asarray(model(samples, training=False), np.float32).reshape(-1, 1)

    folded = fold_for_serving(model)
    paths = variable_paths(folded)

    reader = _serving_reader(folded, serving_out_of_range, quantize, layout, paths,
                             lambda probe: serving_functions(probe, n_dense, n_sparse)[0])
    served = ServingModel(folded, serving_out_of_range, reader)
    # Vocabulary files of the raw signature live here until tf.saved_model.save copies them into assets/.
    asset_dir = tempfile.TemporaryDirectory(prefix="tfcompress-raw-") if raw_spec is not None else None
    preprocessor = None
    if raw_spec is not None:
        preprocessor = RawPreprocessor(raw_spec, asset_dir.name)
    serve_tensors, serve_examples = serving_functions(served, n_dense, n_sparse)
    concrete = {TENSOR_SIGNATURE: serve_tensors.get_concrete_function(),
                EXAMPLE_SIGNATURE: serve_examples.get_concrete_function()}
    if preprocessor is not None:
        serve_raw, serve_raw_features = raw_serving_functions(served, preprocessor)
        concrete[RAW_SIGNATURE] = serve_raw.get_concrete_function()
        concrete[RAW_FEATURES_SIGNATURE] = serve_raw_features.get_concrete_function()
    _check_stock_graph(concrete.values())
    raw_samples = _raw_samples(raw_spec, concrete) if raw_spec is not None else None

    named, sizes = _saved_variables(concrete, reader, paths, folded)
    warn_if_windows_are_large(sizes)

    serving_probability = _probability(concrete[TENSOR_SIGNATURE], samples)
    bad = out_of_range_rows(n_dense, cardinalities)
    try:
        _probability(concrete[TENSOR_SIGNATURE], bad)
        bad_ids_raise = False
    except tf.errors.InvalidArgumentError:
        bad_ids_raise = True

    # Write next to the final directory and rename at the end: TF Serving polls base_path and must never see a
    # half-written version (it ignores directories whose name is not an integer).
    os.makedirs(model_dir, exist_ok=True)
    staging = os.path.join(model_dir, f".staging-{version}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        module = tf.Module()
        module.weights_by_name = named  # tracks exactly the variables the signatures read
        if preprocessor is not None:
            module.raw_preprocessing = preprocessor  # tracks its vocabulary tables (saved as assets)
        tf.saved_model.save(module, staging, signatures=concrete)
        extra = os.path.join(staging, METADATA_DIR)
        os.makedirs(extra, exist_ok=True)
        np.savez(os.path.join(extra, SAMPLES_FILE), dense=samples["dense"], sparse=samples["sparse"],
                 keras_probability=keras_probability, serving_probability=serving_probability)
        if raw_samples is not None:
            np.savez(os.path.join(extra, RAW_SAMPLES_FILE), **raw_samples)
        write_warmup_requests(os.path.join(extra, WARMUP_FILE), name, samples)
        onnx_info = None
        if onnx:
            onnx_path = os.path.join(staging, ONNX_FILE)
            converter_version = export_onnx(staging, onnx_path, n_dense, n_sparse, onnx_opset)
            rows = {k: np.concatenate([samples[k], bad[k]]) if not bad_ids_raise else samples[k] for k in samples}
            reference = np.concatenate([serving_probability, _probability(concrete[TENSOR_SIGNATURE], bad)]) \
                if not bad_ids_raise else serving_probability
            difference = float(np.max(np.abs(onnx_predictions(onnx_path, rows) - reference)))
            if not difference <= PARITY_TOLERANCE:
                raise RuntimeError(f"ONNX predictions differ from the SavedModel's by {difference:.3g} "
                                   f"(> {PARITY_TOLERANCE}); the export was not published")
            onnx_info = {"file": ONNX_FILE, "opset": int(onnx_opset), "tf2onnx": converter_version,
                         "max_abs_difference": difference}
        metadata = {
            **_metadata_header(model, name, version),
            "n_dense": n_dense,
            "n_sparse": n_sparse,
            "cardinalities": cardinalities,
            "signatures": _signature_def_inputs({
                TENSOR_SIGNATURE: {"inputs": {"dense": ["float32", [None, n_dense]],
                                              "sparse": ["int64", [None, n_sparse]]},
                                   "outputs": {OUTPUT_KEY: ["float32", [None, 1]]}},
                EXAMPLE_SIGNATURE: {"inputs": {EXAMPLES_INPUT: ["string", [None]]},
                                    "outputs": {OUTPUT_KEY: ["float32", [None, 1]]},
                                    "example_keys": sorted(example_features(n_dense, n_sparse))},
                **(_raw_signature_metadata(raw_spec, n_dense, n_sparse) if raw_spec is not None else {}),
            }),
            **_export_metadata(quantize, layout, tolerance,
                               float(np.max(np.abs(serving_probability - keras_probability))),
                               serving_out_of_range, bad_ids_raise, onnx_info, sizes),
        }
        with open(os.path.join(extra, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
        os.rename(staging, version_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if asset_dir is not None:
            asset_dir.cleanup()
    if metadata["keras_max_abs_difference"] > tolerance:
        warnings.warn(f"the exported model's probabilities differ from the Keras model's by "
                      f"{metadata['keras_max_abs_difference']:.3g} (> tolerance {tolerance}); verify will fail",
                      RuntimeWarning, stacklevel=2)
    update_models_config(base_dir, name, config_base_path)
    return version_dir


def _export_metadata(quantize, layout, tolerance, difference, serving_out_of_range, bad_ids_raise, onnx_info, sizes):
    """The metadata keys every export ends with, after its contract-specific ones (both export paths)."""
    return {
        "quantize": quantize,
        "serving_layout": layout,
        "keras_tolerance": tolerance,
        "parity_tolerance": PARITY_TOLERANCE,
        "keras_max_abs_difference": difference,
        "serving_out_of_range": serving_out_of_range,
        "bad_ids_raise": bad_ids_raise,
        "warmup_requests": WARMUP_FILE,
        "onnx": onnx_info,
        **sizes,
    }


# ------------------------------------------------------------------------------------ models with other inputs
def _tracked_resources(model, concrete_functions, extra_variables=()):
    """The non-variable resources the signatures read (a StringLookup's hash table, ...), found among the model's
    layers so that the SavedModel saves them. `extra_variables`: variables the signatures read that are not in
    their `variables` (the ROBE window matrices, made in `tf.init_scope`).

    Raises:
        ValueError: a resource the signatures read that no layer of the model holds (export could not save it).
    """
    captured = {}
    for function in concrete_functions:
        for external, _ in function.graph.captures:
            if getattr(external, "dtype", None) == tf.resource:
                captured[id(external)] = external
    variables = {id(v.handle) for function in concrete_functions for v in function.variables}
    variables.update(id(v.handle) for v in extra_variables)
    wanted = {key for key in captured if key not in variables}
    found = {}
    for layer in [model, *nested_layers(model)]:
        for value in list(vars(layer).values()):
            for candidate in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(candidate, tf.saved_model.experimental.TrackableResource):
                    handle = getattr(candidate, "resource_handle", None)
                    if id(handle) in wanted:
                        found[id(handle)] = candidate
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"the serving graph reads {len(missing)} resource(s) (e.g. "
                         f"{getattr(captured[missing[0]], 'name', '?')}) that no layer of the model holds as an "
                         "attribute, so the SavedModel could not save them")
    return list(found.values())


def _numpy_outputs(function, inputs, tensors):
    """The outputs of serving_default's concrete function on {tensor name: array}, fed in signature order."""
    constants = model_inputs.to_constants(tensors)
    feeds = [constants[spec.name] for spec in model_inputs.signature_specs(inputs)]
    return {key: value.numpy() for key, value in function(*feeds).items()}


def _stored(prefix, arrays):
    """npz entries PREFIX.KEY; strings as fixed-width bytes (np.savez stores them without pickling)."""
    return {f"{prefix}.{key}": value.astype(bytes) if value.dtype == object else value
            for key, value in arrays.items()}


def _output_difference(got, expected):
    """max |got - expected| of one output; NaN on both sides is equal (a model may give NaN, e.g. a mean over no
    values), NaN on one side or another shape is inf; strings: 0 or inf."""
    if got.dtype.kind in "SO":
        return 0.0 if np.array_equal(got, expected) else float("inf")
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if got.shape != expected.shape or not np.array_equal(np.isnan(got), np.isnan(expected)):
        return float("inf")
    known = ~np.isnan(got)
    return float(np.max(np.abs(got[known] - expected[known]))) if np.any(known) else 0.0


def _output_metadata(outputs):
    return {key: [value.dtype.name if hasattr(value.dtype, "name") else str(value.dtype),
                  [None, *[int(d) for d in value.shape[1:]]]] for key, value in outputs.items()}


def _export_model_inputs(model, base_dir, name, version, quantize, onnx, schema, serving_out_of_range,
                         sample_inputs, config_base_path, tolerance, raw_preprocessing, layout):
    """`export_saved_model` for a model with other inputs (docs/export_contract.md, "Models with other inputs")."""
    where = f"model {model.name!r} takes {sorted(n for n, _ in model_inputs.named_inputs(model))}, not the " \
            "{'dense', 'sparse'} contract"
    for argument, value in (("onnx", onnx), ("schema", schema), ("raw_preprocessing", raw_preprocessing)):
        if value:
            raise ValueError(f"{argument}= is for models with the {{'dense', 'sparse'}} inputs only; {where}")
    inputs = model_inputs.served_inputs(model)
    model_dir, version, version_dir = _new_version(base_dir, name, version)
    if sample_inputs is not None:
        tensors = model_inputs.tensors_from_model_rows(inputs, sample_inputs)
    else:
        tensors = model_inputs.sample_tensors(inputs, DEFAULT_SAMPLE_ROWS)
    keras_outputs = model_inputs.keras_outputs(model, inputs, tensors)

    folded = fold_for_serving(model)
    paths = variable_paths(folded)
    reader = _serving_reader(folded, serving_out_of_range, quantize, layout, paths,
                             lambda probe: model_input_functions(probe, inputs)[0])
    served = ServingModel(folded, serving_out_of_range, reader)
    serve_tensors, serve_examples = model_input_functions(served, inputs)
    concrete = {TENSOR_SIGNATURE: serve_tensors.get_concrete_function(),
                EXAMPLE_SIGNATURE: serve_examples.get_concrete_function()}
    _check_stock_graph(concrete.values())
    resources = _tracked_resources(folded, concrete.values(), reader.window_matrices.values())
    named, sizes = _saved_variables(concrete, reader, paths, folded)
    warn_if_windows_are_large(sizes, stacklevel=4)  # the caller of export_saved_model, as on the other path
    serving_outputs = _numpy_outputs(concrete[TENSOR_SIGNATURE], inputs, tensors)
    if sorted(serving_outputs) != sorted(keras_outputs):
        raise RuntimeError(f"internal error: the serving graph returns {sorted(serving_outputs)}, the Keras model "
                           f"{sorted(keras_outputs)}")
    difference = max(_output_difference(serving_outputs[key], keras_outputs[key]) for key in serving_outputs)

    os.makedirs(model_dir, exist_ok=True)
    staging = os.path.join(model_dir, f".staging-{version}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        module = tf.Module()
        module.weights_by_name = named  # tracks exactly the variables the signatures read
        module.resources = resources  # and the lookup tables they read (saved with their contents)
        tf.saved_model.save(module, staging, signatures=concrete)
        extra = os.path.join(staging, METADATA_DIR)
        os.makedirs(extra, exist_ok=True)
        np.savez(os.path.join(extra, SAMPLES_FILE), **_stored("input", tensors), **_stored("keras", keras_outputs),
                 **_stored("serving", serving_outputs))
        write_model_input_warmup(os.path.join(extra, WARMUP_FILE), name, inputs, tensors)
        outputs = _output_metadata(serving_outputs)
        specs = model_inputs.signature_specs(inputs)
        metadata = {
            **_metadata_header(model, name, version),
            "contract": MODEL_INPUTS_CONTRACT,
            "inputs": [item.describe() for item in inputs],
            "signatures": _signature_def_inputs({
                TENSOR_SIGNATURE: {"inputs": {spec.name: [spec.dtype.name, spec.shape.as_list()] for spec in specs},
                                   "outputs": outputs},
                EXAMPLE_SIGNATURE: {"inputs": {EXAMPLES_INPUT: ["string", [None]]}, "outputs": outputs,
                                    "example_keys": sorted(item.name for item in inputs)},
            }),
            **_export_metadata(quantize, layout, tolerance, difference, serving_out_of_range, None, None, sizes),
        }
        with open(os.path.join(extra, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
        os.rename(staging, version_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if difference > tolerance:
        warnings.warn(f"the exported model's outputs differ from the Keras model's by {difference:.3g} (> tolerance "
                      f"{tolerance}); verify will fail", RuntimeWarning, stacklevel=3)
    update_models_config(base_dir, name, config_base_path)
    return version_dir
