"""The model side of an export: what the Keras model takes (inputs, table sizes), MLET folding, the serving graph
(stock ops, plain or de-quantizing lookups, the serving id rule), quantized table copies and variable names.
"""

import inspect

import numpy as np
import tensorflow as tf

from tfcompress._keras import keras
import tfcompress.layers  # noqa: F401  (registers the layer classes for deserialization)
from tfcompress.layers import MLETEmbedding
from tfcompress.layers.base import nested_layers
from tfcompress.lookup import TableReader, resource_variable
from tfcompress.model_rewrite import fold
import tfcompress.models  # noqa: F401
from tfcompress.quantize import quantize_int8


def _is_embedding(layer):
    return hasattr(layer, "cardinalities") and hasattr(layer, "logical_parameters")


def outer_embedding_layers(model):
    """Embedding layers that are not members of another embedding layer (each counted once in size tables)."""
    embeddings = [layer for layer in nested_layers(model) if _is_embedding(layer)]
    inner = {id(sub) for layer in embeddings for sub in nested_layers(layer)}
    return [layer for layer in embeddings if id(layer) not in inner]


def takes_dense_sparse(model):
    """Whether `model` takes exactly {"dense", "sparse"} (the dense/sparse contract); other models are exported with
    a signature derived from their inputs (`tfcompress.export.model_inputs`)."""
    inputs = getattr(model, "input", None)
    return isinstance(inputs, dict) and set(inputs) == {"dense", "sparse"}


def size_embedding_layers(model):
    """The layers the size table counts as embeddings: tfcompress embedding layers and `keras.layers.Embedding`
    (and any id layer with `input_dim` and `output_dim`), each once (not the members of another)."""
    found = [layer for layer in nested_layers(model)
             if _is_embedding(layer) or isinstance(layer, keras.layers.Embedding)
             or (is_id_layer(layer) and hasattr(layer, "input_dim") and hasattr(layer, "output_dim"))]
    inner = {id(sub) for layer in found for sub in nested_layers(layer)}
    return [layer for layer in found if id(layer) not in inner]


def embedding_layer_sizes(layer):
    """(cardinalities, output_dim, logical parameters) of a layer of `size_embedding_layers`."""
    if hasattr(layer, "cardinalities") and hasattr(layer, "logical_parameters"):
        return [int(c) for c in layer.cardinalities], int(layer.output_dim), int(layer.logical_parameters)
    cardinalities = [int(layer.input_dim)]
    return cardinalities, int(layer.output_dim), cardinalities[0] * int(layer.output_dim)


def feature_counts(model, schema=None):
    """(n_dense, n_sparse) of a model whose inputs are {"dense": f32[B, n_dense], "sparse": int[B, n_sparse]}.

    Raises:
        ValueError: the model takes other inputs, `schema` disagrees with it, or `schema` has multi-valued fields
            (named), which these inputs cannot take.
    """
    inputs = getattr(model, "input", None)
    if not takes_dense_sparse(model):
        names = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
        raise ValueError(
            f"export needs a model with inputs {{'dense': float32 [B, n_dense], 'sparse': int64 [B, n_sparse]}} "
            f"(tfcompress.models builds these), got {names}"
        )
    n_dense, n_sparse = (inputs[key].shape[-1] for key in ("dense", "sparse"))
    if n_dense is None or n_sparse is None:
        raise ValueError(f"the model's inputs need a known width, got dense {inputs['dense'].shape}, "
                         f"sparse {inputs['sparse'].shape}")
    if schema is not None and getattr(schema, "multi_fields", None):
        # The {"dense", "sparse"} serving signature has no place for them: refuse rather than serve without them.
        schema.require_no_multi_fields('export of a model with {"dense", "sparse"} inputs')
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

    return keras.models.load_model(path, compile=False)


def fold_for_serving(model):
    """The model with every MLET layer folded into plain tables (`tfcompress.fold`), or the model itself."""

    if any(isinstance(layer, MLETEmbedding) for layer in nested_layers(model)):
        return fold(model)
    return model


# -------------------------------------------------------------------------------------------- serving graph
def is_id_layer(layer):
    """Whether `layer` maps ids to embeddings with a `serving_lookup` (every tfcompress id layer does)."""
    return callable(getattr(layer, "serving_lookup", None))


class ServingModel:
    """A Keras model as its serving graph computes it: `ServingModel(model, rule, tables)(inputs)`.

    Runs the model's functional graph node by node, as `model(inputs, training=False)` does, except that every id
    layer computes `layer.serving_lookup(ids, out_of_range, tables)` (stock ops only, plain or de-quantizing
    lookups, the serving id rule) instead of its `call`. Nested functional and Sequential models are run the same
    way; every other layer is called as it is, with training=False. Nothing of the model or its layers is changed
    (no attribute is replaced, no node is added), so the user's model keeps training and serving as before.

    Args:
        model: a functional (or Sequential) Keras model, Keras 3 or tf_keras.
        out_of_range: the serving id rule of every id layer: "mod" or "as_trained" (`tfcompress.layers.base`).
        tables: the `tfcompress.lookup.TableReader` every lookup reads its tables through (default: the stored
            variables).

    Raises:
        ValueError: an id layer sits inside a layer that is neither a functional/Sequential model nor an id layer
            (a subclassed layer calls it in its own `call`, which export cannot trace with `serving_lookup`).
    """

    def __init__(self, model, out_of_range="mod", tables=None):
        self.model = model
        self.out_of_range = out_of_range
        self.tables = TableReader() if tables is None else tables
        self._check_reachable(model)

    def __call__(self, inputs):
        return self._run(self.model, inputs)

    # -- which layers the walk reaches
    @staticmethod
    def _is_graph_model(layer):
        if isinstance(layer, keras.Sequential):
            return True
        return hasattr(layer, "_run_through_graph") or getattr(layer, "_is_graph_network", False)

    def _check_reachable(self, model):
        for layer in _graph_layers(model):
            if is_id_layer(layer):
                continue
            if self._is_graph_model(layer):
                self._check_reachable(layer)
                continue
            hidden = [sub.name for sub in nested_layers(layer) if is_id_layer(sub)]
            if hidden:
                raise ValueError(
                    f"export cannot serve the embedding layer(s) {hidden} inside {type(layer).__name__} "
                    f"{layer.name!r}: id layers must be called by a functional or Sequential model (or be members of "
                    "a PlannedEmbedding), so that export can trace their serving_lookup")

    # -- one layer
    def _serving_call(self, layer):
        """What runs in place of `layer(*args, **kwargs)` in the serving graph."""
        if is_id_layer(layer):
            return self._id_call(layer)
        if self._is_graph_model(layer):
            return lambda inputs, *args, **kwargs: self._run(layer, inputs)
        takes_training = ("training" in getattr(layer, "_call_context_args", ())  # Keras 3
                          or getattr(layer, "_expects_training_arg", False))  # tf_keras

        def call(*args, **kwargs):
            if takes_training:
                kwargs["training"] = False
            return layer(*args, **kwargs)

        return call

    def _id_call(self, layer):
        """`layer.serving_lookup` with the serving rule, the table reader and the call's own arguments (a bag
        layer's per-id `weights`), and the mask `call` would give (mask_zero) set on its output."""
        parameters = inspect.signature(layer.serving_lookup).parameters

        def call(ids, *args, **kwargs):
            options = {"out_of_range": self.out_of_range}
            if "tables" in parameters:
                options["tables"] = self.tables
            given = dict(kwargs)
            given.pop("training", None)
            given.pop("mask", None)
            if args:  # the second positional argument of a bag layer's call: the per-id weights
                given.setdefault("weights", args[0])
            unknown = sorted(key for key in given if key not in parameters)
            if unknown:
                raise ValueError(f"export cannot pass {unknown} to {type(layer).__name__} {layer.name!r}."
                                 f"serving_lookup (it takes {sorted(parameters)})")
            outputs = layer.serving_lookup(ids, **options, **given)
            if getattr(layer, "mask_zero", False):
                _set_mask(outputs, layer.compute_mask(ids))
            return outputs

        return call

    # -- one model
    def _run(self, model, inputs):
        if isinstance(model, keras.Sequential):
            functional = getattr(model, "_functional", None)  # Keras 3: the graph of a Sequential with an Input
            if functional is not None:
                return self._run(functional, inputs)
            if not getattr(model, "_is_graph_network", False):  # no Input given: its layers one after another
                for layer in model.layers:
                    inputs = self._serving_call(layer)(inputs)
                return inputs
        if hasattr(model, "_run_through_graph"):
            return self._run_keras3(model, inputs)
        return self._run_tf_keras(model, inputs)

    def _run_keras3(self, model, inputs):
        """Keras 3's `Functional.call`, with `_serving_call` as the function applied at every node."""
        outputs = model._run_through_graph(model._standardize_inputs(inputs), operation_fn=self._serving_call)
        return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs

    def _run_tf_keras(self, model, inputs):
        """tf_keras' `Functional._run_internal_graph`, calling `_serving_call(node.layer)` at every node."""
        inputs = model._flatten_to_reference_inputs(inputs)
        usage = model._tensor_usage_count
        computed = {}
        for reference, value in zip(model.inputs, inputs):
            key = str(id(reference))
            computed[key] = [model._conform_to_reference_input(value, ref_input=reference)] * usage[key]
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if node.is_input or any(key not in computed for key in node.flat_input_ids):
                    continue
                args, kwargs = node.map_arguments(computed)
                outputs = self._serving_call(node.layer)(*args, **kwargs)
                for key, value in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                    computed[key] = [value] * usage[key]
        return tf.nest.pack_sequence_as(model._nested_outputs,
                                        [computed[str(id(output))].pop() for output in model.outputs])


def _set_mask(tensor, mask):
    """Attach a Keras mask to `tensor`, where the next layers' `__call__` look for it (both Keras stacks)."""
    if hasattr(keras, "ops"):  # Keras 3: its own setter (a table for tensors that take no attribute)
        keras.src.backend.common.masking.set_keras_mask(tensor, mask)
    else:  # tf_keras reads `_keras_mask` of its inputs
        tensor._keras_mask = mask


def _graph_layers(model):
    """The layers a functional or Sequential model calls (its own, not those nested in them)."""
    functional = getattr(model, "_functional", None)
    return list((functional or model).layers)


def quantized_substitutes(tables, quantize, names):
    """int8 or float16 copies of every float32 table: {id(table): (values tf.Variable, scale or None)}."""
    substitutes = {}
    for key, variable in tables.items():
        if variable.dtype != tf.float32:
            continue  # already quantized (e.g. a QuantizedEmbedding's int8 tables)
        name = names.get(key, variable.name.split(":")[0])
        if quantize == "int8":
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


def unique_names(variables, paths):
    """{name: variable} for the saved variables: each named by its Keras path, made unique with _2, _3, ..."""
    named = {}
    for variable in sorted(variables, key=lambda v: paths.get(id(v), v.name)):
        base = paths.get(id(variable), variable.name.split(":")[0])
        name, k = base, 1
        while name in named:
            k += 1
            name = f"{base}_{k}"
        named[name] = variable
    return named
