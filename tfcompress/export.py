"""Export a trained click model as a SavedModel that stock TensorFlow Serving loads (DESIGN.md, "Export").

    from tfcompress.export import export_saved_model

    path = export_saved_model(model, base_dir="saved_models", name="criteo_robe")          # saved_models/criteo_robe/1
    path = export_saved_model(model, name="criteo_robe", quantize="int8", onnx=True)      # .../2, plus model.onnx

What lands in `saved_models/NAME/VERSION/`:

- the SavedModel (`saved_model.pb`, `variables/`) with two signatures, both returning {"probability": f32[B, 1]}:
  `serving_default` on tensors (`dense` f32[B, n_dense], `sparse` i64[B, n_sparse]) and `examples` on a string
  vector of serialized `tf.train.Example` in the TFRecord layout (keys `dense` float[n_dense] and `sparse`
  int64[n_sparse]; `label` may be present and is ignored). The second is what a TF Serving Predict client sends
  when it has Examples (see `tfcompress.verify` for a PredictRequest round trip). With
  `raw_preprocessing=DATA_DIR` (a directory written by `tfcompress data convert`) also `raw` and `raw_features`
  on the raw fields of log rows as strings (`fields` string[B, F]: Criteo hex, Avazu strings), whose in-graph
  preprocessing equals the converter's (`tfcompress.raw_features`); `raw` returns the probability (NaN for a row
  the converter would have rejected) with `valid` and `reject_reason`.
- `assets.extra/`: `tfcompress_export.json` (signatures, size table, tolerances, out-of-range rule),
  `tfcompress_samples.npz` (sample rows with the Keras model's and the serving graph's predictions, which
  `tfcompress verify` compares against in a fresh process) and, when `tensorflow-serving-api` is installed,
  `tf_serving_warmup_requests` (TF Serving replays these PredictRequests when it loads the version). TF Serving
  ignores everything else in assets.extra.
- `model.onnx` with `onnx=True` (the tensor signature converted by tf2onnx at opset `DEFAULT_ONNX_OPSET`; its
  predictions are checked against the SavedModel's to 1e-5 before the export is published).

and `saved_models/models.config` (TF Serving's ModelServerConfig text format) gains or updates the entry NAME, so
`tensorflow_model_server --model_config_file=saved_models/models.config` serves the newest version.

What the serving graph contains (stock TensorFlow ops only: TF Serving's binary cannot load our custom ops):

- every layer runs its pure-TF path (`tfcompress.fused_ops.disabled()`), and lookups are plain gathers (the
  training-time gradient plumbing of `tfcompress.lookup.gather_with_gradient` is dropped: serving needs no gradient);
- ROBE-Z: the one shared array plus the chunk hash of `tfcompress.robe_hash.robe_chunk_hash_tf` (int64 per id, int32
  per chunk), each chunk read as one contiguous slice (`robe_serving_call`; bit-identical to the layer);
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
"""

import contextlib
import datetime
import json
import os
import re
import shutil
import tempfile
import warnings

import numpy as np
import tensorflow as tf

import tfcompress
from tfcompress import fused_ops
from tfcompress._files import write_atomically
from tfcompress.layers.base import nested_layers
from tfcompress.lookup import lookups_replaced_by, resource_variable
from tfcompress._keras import keras

TENSOR_SIGNATURE = "serving_default"
EXAMPLE_SIGNATURE = "examples"
EXAMPLES_INPUT = "examples"
OUTPUT_KEY = "probability"

QUANTIZE_CHOICES = (None, "int8", "fp16")
SERVING_OUT_OF_RANGE_CHOICES = ("mod", "as_trained")
# How far the exported model's probabilities may be from the float32 Keras model's. float32: the same arithmetic
# up to op fusion. fp16 tables: a relative rounding error of 2^-11 per element. int8: up to scale / 2 per element
# (about max|w| / 254), which moves a probability by well under 0.02 on the models tested.
KERAS_TOLERANCE = {None: 1e-5, "fp16": 1e-3, "int8": 2e-2}
# The SavedModel against the serving graph it was saved from (same ops, same values): float32 round-off only.
PARITY_TOLERANCE = 1e-5
# 18: the first opset with BitwiseAnd (the signed ROBE hash uses it), and the newest tf2onnx 1.17 targets.
DEFAULT_ONNX_OPSET = 18
DEFAULT_SAMPLE_ROWS = 64

METADATA_DIR = "assets.extra"
METADATA_FILE = "tfcompress_export.json"
SAMPLES_FILE = "tfcompress_samples.npz"
RAW_SAMPLES_FILE = "tfcompress_raw_samples.npz"
WARMUP_FILE = "tf_serving_warmup_requests"
ONNX_FILE = "model.onnx"
MODELS_CONFIG_FILE = "models.config"
METADATA_FORMAT = 1

# TF Serving model names end up in URLs (/v1/models/NAME) and directory names.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# ------------------------------------------------------------------------------------------------ the model
def _is_embedding(layer):
    return hasattr(layer, "cardinalities") and hasattr(layer, "logical_parameters")


def outer_embedding_layers(model):
    """Embedding layers that are not members of another embedding layer (each counted once in size tables)."""
    embeddings = [layer for layer in nested_layers(model) if _is_embedding(layer)]
    inner = {id(sub) for layer in embeddings for sub in nested_layers(layer)}
    return [layer for layer in embeddings if id(layer) not in inner]


def feature_counts(model, schema=None):
    """(n_dense, n_sparse) of a model whose inputs are {"dense": f32[B, n_dense], "sparse": int[B, n_sparse]}.

    Raises:
        ValueError: the model takes other inputs, or `schema` disagrees with it.
    """
    inputs = getattr(model, "input", None)
    if not isinstance(inputs, dict) or set(inputs) != {"dense", "sparse"}:
        names = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
        raise ValueError(
            f"export needs a model with inputs {{'dense': float32 [B, n_dense], 'sparse': int64 [B, n_sparse]}} "
            f"(tfcompress.models builds these), got {names}"
        )
    n_dense, n_sparse = (inputs[key].shape[-1] for key in ("dense", "sparse"))
    if n_dense is None or n_sparse is None:
        raise ValueError(f"the model's inputs need a known width, got dense {inputs['dense'].shape}, "
                         f"sparse {inputs['sparse'].shape}")
    if schema is not None and (schema.n_dense, schema.n_sparse) != (n_dense, n_sparse):
        raise ValueError(f"schema {schema.name!r} has {schema.n_dense} dense and {schema.n_sparse} sparse columns, "
                         f"the model takes {n_dense} and {n_sparse}")
    return int(n_dense), int(n_sparse)


def model_cardinalities(model, n_sparse, schema=None):
    """Table sizes of the `sparse` columns: from the model's embedding layer, checked against the schema's.

    Raises:
        ValueError: the schema and the model disagree, or neither gives the sizes.
    """
    from_model = next((list(layer.cardinalities) for layer in outer_embedding_layers(model)
                       if len(layer.cardinalities) == n_sparse), None)
    if schema is not None:
        from_schema = [int(c) for c in schema.cardinalities]
        if from_model is not None and [int(c) for c in from_model] != from_schema:
            raise ValueError(f"schema {schema.name!r} has cardinalities {from_schema}, the model's embedding layer "
                             f"{[int(c) for c in from_model]}")
        return from_schema
    if from_model is not None:
        return [int(c) for c in from_model]
    raise ValueError(
        f"no embedding layer of the model covers all {n_sparse} sparse columns, so the table sizes are unknown; "
        "pass schema= (the dataset's schema.json) to export_saved_model"
    )


def load_keras_model(path):
    """A model saved by `tfcompress train` (model.keras), with every tfcompress layer class registered first."""
    import tfcompress.layers  # noqa: F401  (registers the layer classes for deserialization)
    import tfcompress.models  # noqa: F401

    return keras.models.load_model(path, compile=False)


def fold_for_serving(model):
    """The model with every MLET layer folded into plain tables (`tfcompress.fold`), or the model itself."""
    from tfcompress.layers import MLETEmbedding

    if any(isinstance(layer, MLETEmbedding) for layer in nested_layers(model)):
        from tfcompress.model_rewrite import fold

        return fold(model)
    return model


# -------------------------------------------------------------------------------------------- serving graph
class ServingLookup:
    """Stands in for `tfcompress.lookup.gather_with_gradient` while the serving graph is traced.

    Serving needs no gradient, so a lookup is one plain gather. Tables listed in `substitutes` (by tf.Variable id)
    are read from their quantized copy instead: (values variable, scale or None) gives
    cast(gather(values), float32) * scale. Every table looked up is recorded in `tables`.
    """

    def __init__(self, substitutes=None):
        self.substitutes = substitutes or {}
        self.tables = {}

    def stored(self, table):
        """(what to gather from, scale or None, quantized?) for a layer's float table."""
        variable = resource_variable(table)
        self.tables[id(variable)] = variable
        substitute = self.substitutes.get(id(variable))
        if substitute is None:
            return variable, None, False
        return substitute[0], substitute[1], True

    @staticmethod
    def dequantize(values, scale, quantized):
        if not quantized:
            return values
        values = tf.cast(values, tf.float32)
        return values if scale is None else values * tf.constant(scale, tf.float32)

    def __call__(self, table, indices, gradient=None):
        stored, scale, quantized = self.stored(table)
        return self.dequantize(tf.gather(stored, indices), scale, quantized)


def robe_serving_call(layer, lookup):
    """A `RobeEmbedding.call` for serving: the same values, gathered chunk by chunk instead of element by element.

    Each chunk of Z elements is the contiguous slice M[h : h + Z], so with the windows matrix
    W[j] = M[j : j + Z] ((|M| - Z + 1) x Z, built per call from M with Z slices) one row gather W[h] fetches a whole
    chunk: the hash runs once per chunk (as in the layer), and the per-element position tensor (B x F x D) and the
    scalar gather over it, which dominate the layer's pure-TF path on CPU, are gone. Building W costs |M| x Z
    copies per call, so a small batch (fewer lookups than W holds) takes the element path instead; both branches
    give bit-identical values (`tf.cond`, stock ops, converted to ONNX If).

    The hash is `robe_hash.robe_chunk_hash_tf` told that ids are in [0, total rows) (true after `prepare_ids`), so it
    runs one int64 division per id and int32 arithmetic per chunk; starts and element positions are int32.
    Only the saved variable M (or its quantized copy) is stored: W is rebuilt in graph on every call.
    """
    from tfcompress import robe_hash
    from tfcompress.layers import base

    size, width, chunk = layer.memory_size, layer.output_dim, layer.chunk_size
    chunks = robe_hash.num_chunks(width, chunk)
    num_features = len(layer.cardinalities)
    total_rows = int(sum(layer.cardinalities))  # prepare_ids puts every offset id in [0, total_rows)
    window_rows = min(size - chunk + 1, robe_hash.P)  # every chunk start h < min(|M| - Z + 1, P)
    position_dtype = tf.int32 if robe_hash.max_position(size, chunk) <= robe_hash.INT32_MAX else tf.int64

    def call(ids):
        ids = base.prepare_ids(ids, layer.cardinalities, layer.out_of_range)
        a = ids + tf.constant(layer._offsets)
        starts = robe_hash.robe_chunk_hash_tf(a, chunks, size, chunk, layer.seed, id_bound=total_rows)  # i32 [B,F,c]
        stored, scale, quantized = lookup.stored(layer.memory)

        def per_element():
            positions = robe_hash.chunk_positions_tf(tf.cast(starts, position_dtype), width, chunk)
            return tf.gather(stored, positions)

        def per_chunk():
            memory = tf.convert_to_tensor(stored)  # one read of the variable for the Z slices
            # Stacking the Z shifted slices as rows and transposing (two bulk copies) measured 1.5x faster than
            # stacking them as columns, which copies one element at a time.
            windows = tf.transpose(tf.stack([memory[o:window_rows + o] for o in range(chunk)], axis=0))
            rows = tf.gather(windows, starts)  # [B, F, chunks, Z]
            flat = tf.reshape(rows, [-1, num_features, chunks * chunk])
            return flat if chunks * chunk == width else flat[..., :width]  # a partial last chunk: drop its tail

        if chunk == 1:
            values = per_element()
        else:
            # Decided from the ids' shape, not from `starts`, so W can be built while the hash still runs.
            lookups = tf.size(ids, out_type=tf.int64) * (chunks * chunk)
            values = tf.cond(lookups >= window_rows * chunk, per_chunk, per_element)
        values = lookup.dequantize(values, scale, quantized)
        if layer.signed:
            values = values * robe_hash.robe_signs_tf(a, width, layer.seed, id_bound=total_rows)
        return values

    return call


@contextlib.contextmanager
def serving_mode(model, lookup, serving_out_of_range="mod"):
    """Trace serving graphs inside this block: stock ops only, plain (or de-quantizing) lookups, serving id rule.

    Every layer reads its tables through `ops.gather_with_gradient`, so `ops.lookups_replaced_by(lookup)` turns
    every lookup, in every layer type, into `lookup` without each layer needing a serving twin. ROBE layers get
    `robe_serving_call` (chunk gathers). Everything is restored on exit.
    """
    from tfcompress.layers import RobeEmbedding

    layers = [model, *nested_layers(model)]
    rules = []
    if serving_out_of_range == "mod":
        rules = [(layer, layer.out_of_range) for layer in layers if getattr(layer, "out_of_range", None) == "error"]
    robes = [layer for layer in layers if isinstance(layer, RobeEmbedding)]
    try:
        for layer, _ in rules:
            layer.out_of_range = "mod"
        for layer in robes:
            layer.call = robe_serving_call(layer, lookup)  # an instance attribute shadows the class's call
        with fused_ops.disabled(), lookups_replaced_by(lookup):
            yield
    finally:
        for layer, rule in rules:
            layer.out_of_range = rule
        for layer in robes:
            layer.__dict__.pop("call", None)


def input_signature(n_dense, n_sparse):
    return [tf.TensorSpec([None, n_dense], tf.float32, name="dense"),
            tf.TensorSpec([None, n_sparse], tf.int64, name="sparse")]


def example_features(n_dense, n_sparse):
    """parse_example spec of the TFRecord layout; `label` is not parsed (clients at serving have none)."""
    spec = {"sparse": tf.io.FixedLenFeature([n_sparse], tf.int64)}
    if n_dense > 0:
        spec["dense"] = tf.io.FixedLenFeature([n_dense], tf.float32)
    return spec


def serving_functions(model, n_dense, n_sparse):
    """The two signature functions (tf.function, not yet traced): tensors -> probability, Examples -> probability."""

    def forward(dense, sparse):
        probability = model({"dense": dense, "sparse": sparse}, training=False)
        return {OUTPUT_KEY: tf.cast(tf.reshape(probability, [-1, 1]), tf.float32)}

    @tf.function(input_signature=input_signature(n_dense, n_sparse))
    def serve_tensors(dense, sparse):
        return forward(dense, sparse)

    features = example_features(n_dense, n_sparse)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_examples(examples):
        parsed = tf.io.parse_example(examples, features)
        dense = parsed["dense"] if n_dense > 0 else tf.zeros([tf.shape(examples)[0], 0], tf.float32)
        return forward(dense, parsed["sparse"])

    return serve_tensors, serve_examples


def raw_serving_functions(model, preprocessor):
    """The raw-string signature functions (not yet traced) of a `tfcompress.raw_features.RawPreprocessor`.

    `raw`: fields -> {probability (NaN where the row is rejected), valid, reject_reason}; `raw_features`: fields ->
    the converter's {dense, sparse, valid, reject_reason}. Rejected rows reach the model as zeros (always in
    range) and their probability is replaced, so one bad row never fails a batched request.
    """
    from tfcompress.raw_features import RAW_INPUT

    spec = [tf.TensorSpec([None, len(preprocessor.spec.columns)], tf.string, name=RAW_INPUT)]

    @tf.function(input_signature=spec)
    def serve_raw(fields):
        features = preprocessor(fields)
        probability = model({"dense": features["dense"], "sparse": features["sparse"]}, training=False)
        probability = tf.cast(tf.reshape(probability, [-1, 1]), tf.float32)
        probability = tf.where(features["valid"][:, None], probability, tf.constant(np.nan, tf.float32))
        return {OUTPUT_KEY: probability, "valid": features["valid"], "reject_reason": features["reject_reason"]}

    @tf.function(input_signature=spec)
    def serve_raw_features(fields):
        return preprocessor(fields)

    return serve_raw, serve_raw_features


def quantized_substitutes(tables, quantize, names):
    """int8 or float16 copies of every float32 table: {id(table): (values tf.Variable, scale or None)}."""
    substitutes = {}
    for key, variable in tables.items():
        if variable.dtype != tf.float32:
            continue  # already quantized (e.g. a QuantizedEmbedding's int8 tables)
        name = names.get(key, variable.name.split(":")[0])
        if quantize == "int8":
            from tfcompress.quantize import quantize_int8

            values, scale = quantize_int8(variable.numpy())
            substitutes[key] = (tf.Variable(values, trainable=False, name=f"{name}/int8"), float(scale))
        else:
            substitutes[key] = (tf.Variable(variable.numpy().astype(np.float16), trainable=False,
                                            name=f"{name}/fp16"), None)
    return substitutes


def variable_paths(model):
    """{id(tf.Variable): Keras path} for every weight of the model."""
    paths = {}
    for weight in model.weights:
        path = getattr(weight, "path", None) or weight.name.split(":")[0]
        paths[id(resource_variable(weight))] = path
    return paths


def _unique_names(variables, paths):
    named = {}
    for variable in sorted(variables, key=lambda v: paths.get(id(v), v.name)):
        base = paths.get(id(variable), variable.name.split(":")[0])
        name, k = base, 1
        while name in named:
            k += 1
            name = f"{base}_{k}"
        named[name] = variable
    return named


# ---------------------------------------------------------------------------------------------- size table
def size_table(named_variables, model):
    """One row per saved variable plus the totals; `uncompressed_bytes` is the model with full float32 tables.

    The uncompressed model keeps the non-embedding weights and replaces every embedding layer by full float32
    tables: sum over its features of cardinality x output_dim x 4 bytes.
    """
    embedding_layers = outer_embedding_layers(model)
    embedding_ids = {id(resource_variable(w)) for layer in embedding_layers for w in layer.weights}
    rows = []
    for name, variable in named_variables.items():
        nbytes = int(np.prod(variable.shape, dtype=np.int64)) * variable.dtype.size
        is_embedding = id(variable) in embedding_ids or name.endswith(("/int8", "/fp16"))
        rows.append({"name": name, "dtype": variable.dtype.name, "shape": [int(d) for d in variable.shape],
                     "bytes": nbytes, "embedding": bool(is_embedding)})
    dense_bytes = sum(row["bytes"] for row in rows if not row["embedding"])
    logical_bytes = sum(int(layer.logical_parameters) * 4 for layer in embedding_layers)
    return {
        "variables": rows,
        "exported_bytes": sum(row["bytes"] for row in rows),
        "uncompressed_bytes": dense_bytes + logical_bytes,
        "embedding_layers": [
            {"name": layer.name, "class": type(layer).__name__, "cardinalities": [int(c) for c in layer.cardinalities],
             "output_dim": int(layer.output_dim), "logical_parameters": int(layer.logical_parameters)}
            for layer in embedding_layers
        ],
    }


def format_size_table(table):
    """The size table as aligned text (also what `tfcompress verify` prints, computed there independently)."""
    lines = [f"{'variable':<48} {'dtype':<8} {'shape':<16} {'bytes':>14}"]
    for row in table["variables"]:
        lines.append(f"{row['name']:<48} {row['dtype']:<8} {str(tuple(row['shape'])):<16} {row['bytes']:>14,}")
    exported, uncompressed = table["exported_bytes"], table["uncompressed_bytes"]
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
    dense = np.asarray(inputs["dense"], np.float32)
    sparse = np.asarray(inputs["sparse"], np.int64)
    if dense.ndim != 2 or dense.shape[1] != n_dense or sparse.shape != (dense.shape[0], n_sparse):
        raise ValueError(f"sample_inputs must be dense [N, {n_dense}] and sparse [N, {n_sparse}] with the same N, "
                         f"got {dense.shape} and {sparse.shape}")
    return {"dense": dense, "sparse": sparse}


# ---------------------------------------------------------------------------------------------- the layout
def check_model_name(name):
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ValueError(f"name must be letters, digits, '_', '.' or '-' (starting with a letter or digit), "
                         f"got {name!r}")
    return name


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


# ----------------------------------------------------------------------------------- models.config (text)
# A small reader and writer for protobuf text format, enough to edit TF Serving's ModelServerConfig while keeping
# every field it does not touch (version policies, labels, logging config) exactly as the user wrote it.
# tensorflow-serving-api is not a dependency (it requires the full `tensorflow` package, which conflicts with
# tensorflow-cpu); when it is importable, `update_models_config` also parses the result with its real proto.
_TOKEN = re.compile(r"""\s+|\#[^\n]*|(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|(?P<punct>[{}<>:,;\[\]])|"""
                    r"""(?P<word>[A-Za-z0-9_.+\-]+)""")


def _tokenize(text):
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            line = text.count("\n", 0, position) + 1
            raise ValueError(f"models.config line {line}: cannot read {text[position:position + 20]!r}")
        if match.lastgroup is not None:
            line = text.count("\n", 0, position) + 1
            tokens.append((match.group(match.lastgroup), line))
        position = match.end()
    return tokens


def parse_text_proto(text):
    """Protobuf text format -> [(field, value)], value a raw scalar token (strings keep their quotes) or a list.

    Raises:
        ValueError: the text is not well-formed text format (naming the line).
    """
    tokens = _tokenize(text)
    position = 0

    def expect_value(field, line):
        nonlocal position
        if position >= len(tokens):
            raise ValueError(f"models.config line {line}: field {field!r} has no value")
        token, token_line = tokens[position]
        if token in ("{", "<"):
            position += 1
            return parse_message("}" if token == "{" else ">", token_line)
        if token in "}>:,;[]" and len(token) == 1:
            raise ValueError(f"models.config line {token_line}: unexpected {token!r} after {field!r}")
        position += 1
        while position < len(tokens) and tokens[position][0][0] in "\"'" and token[0] in "\"'":
            token = token[:-1] + tokens[position][0][1:]  # adjacent string literals concatenate
            position += 1
        return token

    def parse_message(closing, open_line):
        nonlocal position
        fields = []
        while True:
            if position >= len(tokens):
                if closing is None:
                    return fields
                raise ValueError(f"models.config: the message opened on line {open_line} is never closed")
            token, line = tokens[position]
            if token == closing:
                position += 1
                return fields
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token):
                raise ValueError(f"models.config line {line}: expected a field name, got {token!r}")
            position += 1
            has_colon = position < len(tokens) and tokens[position][0] == ":"
            if has_colon:
                position += 1
            if position < len(tokens) and tokens[position][0] == "[":
                position += 1
                while position < len(tokens) and tokens[position][0] != "]":
                    fields.append((token, expect_value(token, line)))
                    if position < len(tokens) and tokens[position][0] == ",":
                        position += 1
                if position >= len(tokens):
                    raise ValueError(f"models.config line {line}: list of {token!r} is never closed")
                position += 1
            else:
                if not has_colon and (position >= len(tokens) or tokens[position][0] not in ("{", "<")):
                    raise ValueError(f"models.config line {line}: expected ':' or '{{' after {token!r}")
                fields.append((token, expect_value(token, line)))
            if position < len(tokens) and tokens[position][0] in (",", ";"):
                position += 1

    return parse_message(None, 1)


def format_text_proto(fields, indent=0):
    """[(field, value)] -> protobuf text format (two-space indentation, one field per line)."""
    lines = []
    pad = "  " * indent
    for name, value in fields:
        if isinstance(value, list):
            lines.append(f"{pad}{name} {{")
            body = format_text_proto(value, indent + 1)
            if body:
                lines.append(body.rstrip("\n"))
            lines.append(f"{pad}}}")
        else:
            lines.append(f"{pad}{name}: {value}")
    return "\n".join(lines) + ("\n" if lines else "")


def quote_text_proto(value):
    """A Python string as a text-format string literal (C escapes, double quotes)."""
    escaped = value.encode("utf-8").decode("latin-1")
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + "".join(c if 32 <= ord(c) < 127 else f"\\{ord(c):03o}" for c in escaped) + '"'


def unquote_text_proto(token):
    """A text-format string literal -> Python string (the inverse of `quote_text_proto`)."""
    if len(token) < 2 or token[0] not in "\"'" or token[-1] != token[0]:
        return token
    raw = token[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
    return raw.encode("latin-1").decode("utf-8", "replace")


def set_model_entry(fields, name, base_path, platform="tensorflow"):
    """Add or update the `config { name: NAME ... }` entry of a parsed ModelServerConfig (in place).

    An existing entry keeps its other fields (version policy, labels, ...); only base_path and model_platform are
    set. Raises ValueError for a config that lists models another way (custom_model_config).
    """
    if any(field == "custom_model_config" for field, _ in fields):
        raise ValueError("models.config uses custom_model_config; tfcompress only edits model_config_list")
    lists = [value for field, value in fields if field == "model_config_list"]
    if not lists:
        fields.append(("model_config_list", []))
        lists = [fields[-1][1]]
    configs = lists[0]
    for field, entry in configs:
        if field == "config" and any(f == "name" and unquote_text_proto(v) == name for f, v in entry):
            kept = [(f, v) for f, v in entry if f not in ("base_path", "model_platform")]
            after_name = next(i for i, (f, _) in enumerate(kept) if f == "name") + 1
            entry[:] = [*kept[:after_name], ("base_path", quote_text_proto(base_path)),
                        ("model_platform", quote_text_proto(platform)), *kept[after_name:]]
            return fields
    configs.append(("config", [("name", quote_text_proto(name)), ("base_path", quote_text_proto(base_path)),
                               ("model_platform", quote_text_proto(platform))]))
    return fields


def validate_with_serving_api(text):
    """Parse `text` with tensorflow-serving-api's ModelServerConfig when it is installed; returns True if it did."""
    try:
        from google.protobuf import text_format
        from tensorflow_serving.config import model_server_config_pb2
    except ImportError:
        return False
    text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    return True


def update_models_config(base_dir, name, base_path=None):
    """Add or update NAME in BASE_DIR/models.config (created when missing); returns the file's path.

    Args:
        base_dir: the TF Serving model base (saved_models/).
        name: the model name.
        base_path: the directory TF Serving reads versions from. TF Serving requires an absolute path (or URI),
            so the default is the absolute path of BASE_DIR/NAME on this machine; pass e.g. "/models/NAME" when
            the server sees the directory elsewhere (a container mount).

    Other models' entries and fields are kept as written; comments are not (the file is rewritten).
    """
    check_model_name(name)
    path = os.path.join(base_dir, MODELS_CONFIG_FILE)
    base_path = base_path or os.path.abspath(os.path.join(base_dir, name))
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    try:
        fields = parse_text_proto(text)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    new_text = format_text_proto(set_model_entry(fields, name, base_path))
    # A written file must parse back to the same structure, and with the real proto when available.
    if parse_text_proto(new_text) != fields:
        raise RuntimeError(f"internal error: {path} would not read back as written")
    try:
        validate_with_serving_api(new_text)
    except Exception as error:  # text_format.ParseError: a field ModelServerConfig does not have
        raise ValueError(f"{path} is not a valid ModelServerConfig: {error}") from None
    os.makedirs(base_dir, exist_ok=True)
    write_atomically(path, new_text)
    return path


# ------------------------------------------------------------------------------------------------ warmup
def write_warmup_requests(path, model_name, samples, rows=8):
    """TF Serving's warmup file (a TFRecord of PredictionLog): one PredictRequest per signature.

    Returns False (writing nothing) when tensorflow-serving-api is not installed.
    """
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
    except ImportError:
        return False
    dense, sparse = samples["dense"][:rows], samples["sparse"][:rows]
    tensor_request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=TENSOR_SIGNATURE))
    tensor_request.inputs["dense"].CopyFrom(tf.make_tensor_proto(dense))
    tensor_request.inputs["sparse"].CopyFrom(tf.make_tensor_proto(sparse))
    example_request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=EXAMPLE_SIGNATURE))
    examples = [serialize_example(d, s) for d, s in zip(dense, sparse)]
    example_request.inputs[EXAMPLES_INPUT].CopyFrom(tf.make_tensor_proto(examples, dtype=tf.string))
    with tf.io.TFRecordWriter(path) as writer:
        for request in (tensor_request, example_request):
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return True


def serialize_example(dense, sparse, label=None):
    """One row as a serialized tf.train.Example in the TFRecord layout (label optional)."""
    feature = {"sparse": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in sparse]))}
    if len(dense):
        feature["dense"] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in dense]))
    if label is not None:
        feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


# -------------------------------------------------------------------------------------------------- ONNX
def export_onnx(saved_model_dir, output_path, n_dense, n_sparse, opset=DEFAULT_ONNX_OPSET):
    """Convert the SavedModel's tensor signature (what is served, not the Keras model) to ONNX with tf2onnx.

    Returns the tf2onnx version. Requires the [export] extra (tf2onnx, onnx).
    """
    try:
        import tf2onnx
    except ImportError:
        raise ValueError("onnx=True needs tf2onnx and onnxruntime: pip install 'tfcompress[export]'") from None
    loaded = tf.saved_model.load(saved_model_dir)
    signature = loaded.signatures[TENSOR_SIGNATURE]
    spec = input_signature(n_dense, n_sparse)

    @tf.function(input_signature=spec)
    def tensors(dense, sparse):
        return signature(dense=dense, sparse=sparse)

    if opset < 18:
        raise ValueError(f"onnx_opset must be >= 18 (BitwiseAnd, used by signed ROBE hashing), got {opset}")
    handlers = {"BitwiseAnd": (_onnx_bitwise_and, []), "FloorMod": (_onnx_floor_mod, []),
                "FloorDiv": (_onnx_floor_div, [])}
    tf2onnx.convert.from_function(tensors, input_signature=spec, opset=opset, output_path=output_path,
                                  custom_op_handlers=handlers)
    return tf2onnx.__version__


# Converters for the integer ops of the id handling and the ROBE hash, where tf2onnx 1.17 is missing or wrong.
def _onnx_bitwise_and(ctx, node, name, args):
    """tf2onnx 1.17 has no converter for TF's BitwiseAnd; ONNX's (opset 18) has the same semantics."""
    node.type = "BitwiseAnd"
    return node


def _is_float(ctx, tensor_name):
    from onnx import TensorProto

    return ctx.get_dtype(tensor_name) in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


def _onnx_floor_mod(ctx, node, name, args):
    """Integer FloorMod as ONNX Mod(fmod=0), whose result takes the divisor's sign: a floor modulo.

    tf2onnx 1.17 writes a - (a / b) * b with ONNX's truncating integer Div, which differs for negative a: the
    "mod" rule would send -1 to row -1 instead of n - 1, and an exported ROBE would hash it elsewhere.
    """
    if _is_float(ctx, node.input[0]):
        from tf2onnx.onnx_opset.math import FloorMod

        return FloorMod.version_7(ctx, node)
    node.type = "Mod"
    node.set_attr("fmod", 0)
    return node


def _onnx_floor_div(ctx, node, name, args):
    """Integer FloorDiv as (a - floormod(a, b)) / b: exact, so ONNX's truncating Div gives the floor."""
    if _is_float(ctx, node.input[0]):
        from tf2onnx.onnx_opset.math import FloorDiv

        return FloorDiv.version_6(ctx, node)
    a, b = node.input[0], node.input[1]
    remainder = ctx.make_node("Mod", [a, b], attr={"fmod": 0})
    exact = ctx.make_node("Sub", [a, remainder.output[0]])
    node.type = "Div"
    ctx.replace_inputs(node, [exact.output[0], b])
    return node


def onnx_predictions(onnx_path, inputs):
    """onnxruntime's probabilities for {"dense", "sparse"} rows."""
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("onnx=True needs onnxruntime: pip install 'tfcompress[export]'") from None
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feeds = {"dense": np.asarray(inputs["dense"], np.float32), "sparse": np.asarray(inputs["sparse"], np.int64)}
    return session.run([OUTPUT_KEY], feeds)[0]


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
    from tfcompress.raw_features import load_raw_spec

    spec = load_raw_spec(data_dir)
    if spec.n_dense != n_dense or list(spec.cardinalities) != [int(c) for c in cardinalities]:
        raise ValueError(f"raw_preprocessing {data_dir}: the conversion gives {spec.n_dense} dense columns and "
                         f"tables {list(spec.cardinalities)}, the model takes {n_dense} dense columns and tables "
                         f"{[int(c) for c in cardinalities]}; give the data directory the model was trained on")
    return spec


def _raw_samples(spec, concrete):
    """Sample raw rows with the converter's features for them; refuses an export whose graph disagrees."""
    from tfcompress.raw_features import (RAW_FEATURES_SIGNATURE, RAW_INPUT, pack_fields, raw_sample_rows,
                                         reference_features)

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
    from tfcompress.raw_features import RAW_FEATURES_SIGNATURE, RAW_INPUT, RAW_SIGNATURE

    inputs = {RAW_INPUT: ["string", [None, len(spec.columns)]]}
    flags = {"valid": ["bool", [None]], "reject_reason": ["string", [None]]}
    return {
        RAW_SIGNATURE: {"inputs": inputs, "outputs": {OUTPUT_KEY: ["float32", [None, 1]], **flags},
                        "raw_preprocessing": spec.describe()},
        RAW_FEATURES_SIGNATURE: {"inputs": inputs, "outputs": {"dense": ["float32", [None, n_dense]],
                                                                "sparse": ["int64", [None, n_sparse]], **flags}},
    }


def export_saved_model(model, base_dir="saved_models", name=None, version=None, quantize=None, onnx=False,
                       schema=None, serving_out_of_range="mod", sample_inputs=None, onnx_opset=DEFAULT_ONNX_OPSET,
                       config_base_path=None, tolerance=None, raw_preprocessing=None):
    """Write `model` as BASE_DIR/NAME/VERSION/ for TF Serving and register NAME in BASE_DIR/models.config.

    Example:

    >>> path = export_saved_model(model, base_dir="saved_models", name="criteo_robe")
    >>> # then, in a process that never imports tfcompress:  tfcompress verify saved_models/criteo_robe/1

    Args:
        model: a Keras model with inputs {"dense": f32[B, n_dense], "sparse": i64[B, n_sparse]} returning the click
            probability [B, 1] (what `tfcompress.models` builds), with any tfcompress embedding layers.
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
            `DEFAULT_SAMPLE_ROWS` random rows.
        onnx_opset: ONNX opset for `onnx=True`.
        config_base_path: base_path written to models.config (default: the absolute path of BASE_DIR/NAME).
        tolerance: allowed |exported - Keras| probability difference recorded for `verify`; default
            `KERAS_TOLERANCE[quantize]`.
        raw_preprocessing: a directory written by `tfcompress data convert` (criteo-tsv, criteo-csv, avazu-csv or
            csv): adds the `raw` and `raw_features` signatures on raw string fields, preprocessed in graph as the
            converter does (`tfcompress.raw_features`), checked before publishing against the converter's own
            parser on sample rows, which are stored for `verify`.

    Returns:
        The path of the new version directory.

    Raises:
        ValueError: a bad argument, a model without the {"dense", "sparse"} inputs, an existing version.
    """
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
    n_dense, n_sparse = feature_counts(model, schema)
    cardinalities = model_cardinalities(model, n_sparse, schema)
    if len(cardinalities) != n_sparse:
        raise ValueError(f"schema lists {len(cardinalities)} cardinalities for {n_sparse} sparse columns")

    model_dir = os.path.join(base_dir, name)
    if version is None:
        version = next_version(model_dir)
    elif isinstance(version, bool) or int(version) != version or version < 1:
        raise ValueError(f"version must be an integer >= 1, got {version!r}")
    version = int(version)
    version_dir = os.path.join(model_dir, str(version))
    if os.path.exists(version_dir):
        raise ValueError(f"{version_dir} exists; versions are never overwritten (omit version= for the next one)")

    samples = _check_inputs(sample_inputs, n_dense, n_sparse) if sample_inputs is not None else \
        sample_rows(n_dense, cardinalities)
    raw_spec = _raw_spec(raw_preprocessing, n_dense, cardinalities) if raw_preprocessing is not None else None
    # The pure-TF path gives the same values as the custom ops (their contract) and needs no op library here.
    with fused_ops.disabled():
        keras_probability = np.asarray(model(samples, training=False), np.float32).reshape(-1, 1)

    serving_model = fold_for_serving(model)
    paths = variable_paths(serving_model)

    # First trace: find the tables every lookup reads (to quantize exactly those), then the real trace.
    substitutes = {}
    if quantize is not None:
        probe = ServingLookup()
        with serving_mode(serving_model, probe, serving_out_of_range):
            serving_functions(serving_model, n_dense, n_sparse)[0].get_concrete_function()
        substitutes = quantized_substitutes(probe.tables, quantize, paths)
        for key, (values, _) in substitutes.items():
            paths[id(values)] = values.name.split(":")[0]
    lookup = ServingLookup(substitutes)
    # Vocabulary files of the raw signature live here until tf.saved_model.save copies them into assets/.
    asset_dir = tempfile.TemporaryDirectory(prefix="tfcompress-raw-") if raw_spec is not None else None
    preprocessor = None
    if raw_spec is not None:
        from tfcompress.raw_features import RawPreprocessor

        preprocessor = RawPreprocessor(raw_spec, asset_dir.name)
    with serving_mode(serving_model, lookup, serving_out_of_range):
        serve_tensors, serve_examples = serving_functions(serving_model, n_dense, n_sparse)
        concrete = {TENSOR_SIGNATURE: serve_tensors.get_concrete_function(),
                    EXAMPLE_SIGNATURE: serve_examples.get_concrete_function()}
        if preprocessor is not None:
            from tfcompress.raw_features import RAW_FEATURES_SIGNATURE, RAW_SIGNATURE

            serve_raw, serve_raw_features = raw_serving_functions(serving_model, preprocessor)
            concrete[RAW_SIGNATURE] = serve_raw.get_concrete_function()
            concrete[RAW_FEATURES_SIGNATURE] = serve_raw_features.get_concrete_function()
    _check_stock_graph(concrete.values())
    raw_samples = _raw_samples(raw_spec, concrete) if raw_spec is not None else None

    captured = {id(v): v for function in concrete.values() for v in function.variables}
    named = _unique_names(captured.values(), paths)
    sizes = size_table(named, serving_model)

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
        warmup = write_warmup_requests(os.path.join(extra, WARMUP_FILE), name, samples)
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
            "format": METADATA_FORMAT,
            "name": name,
            "version": version,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tfcompress": tfcompress.__version__,
            "tensorflow": tf.__version__,
            "keras_model": model.name,
            "n_dense": n_dense,
            "n_sparse": n_sparse,
            "cardinalities": cardinalities,
            "signatures": {
                TENSOR_SIGNATURE: {"inputs": {"dense": ["float32", [None, n_dense]],
                                              "sparse": ["int64", [None, n_sparse]]},
                                   "outputs": {OUTPUT_KEY: ["float32", [None, 1]]}},
                EXAMPLE_SIGNATURE: {"inputs": {EXAMPLES_INPUT: ["string", [None]]},
                                    "outputs": {OUTPUT_KEY: ["float32", [None, 1]]},
                                    "example_keys": sorted(example_features(n_dense, n_sparse))},
                **(_raw_signature_metadata(raw_spec, n_dense, n_sparse) if raw_spec is not None else {}),
            },
            "quantize": quantize,
            "keras_tolerance": tolerance,
            "parity_tolerance": PARITY_TOLERANCE,
            "keras_max_abs_difference": float(np.max(np.abs(serving_probability - keras_probability))),
            "serving_out_of_range": serving_out_of_range,
            "bad_ids_raise": bad_ids_raise,
            "warmup_requests": WARMUP_FILE if warmup else None,
            "onnx": onnx_info,
            **sizes,
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
