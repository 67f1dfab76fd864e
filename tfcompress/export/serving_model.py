"""The model side of an export: what the Keras model takes (inputs, table sizes), MLET folding, the serving graph
(stock ops, plain or de-quantizing lookups, the serving id rule), quantized table copies and variable names.
"""

import contextlib

import numpy as np
import tensorflow as tf

from tfcompress import fused_ops
from tfcompress._keras import keras
from tfcompress.layers.base import nested_layers
from tfcompress.lookup import lookups_replaced_by, resource_variable


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
        from tfcompress.folding import fold

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
