"""Model rewriting: a new Keras model with some embedding layers replaced, every other layer and weight kept.

`replace_layers(model, convert)` is the one mechanism; `fold` and `quantize_model` are its uses.

Folding turns a model trained with MLET embeddings into the same model with one plain table per feature.

An `MLETEmbedding` computes E_f[x] . P_f, so the table W_f = E_f . P_f (n_f x d) gives the same embeddings with
one lookup and no projection. `fold(model)` returns a new model, identical elsewhere (same architecture, copies of
the same weights), in which every MLET layer, also one inside a `PlannedEmbedding`, is such a table:
a `FullEmbedding`, or a `HashingTrickEmbedding` when the MLET tables were hashed.

Example::

    import tfcompress

    folded = tfcompress.fold(trained_model)                    # float32 d-wide tables
    small = tfcompress.fold(trained_model, quantize="int8")    # ... stored as int8 (see `quantize_model`)

The rewrite goes through the model's config (`get_config` / `from_config`), so it works on functional and
Sequential models, nested ones included; a subclassed model must swap its layers itself with `fold_layer`.
"""

import warnings

import numpy as np

from tfcompress._keras import keras, object_sharing_scope
from tfcompress.layers import FullEmbedding, HashingTrickEmbedding, MLETEmbedding, PlannedEmbedding, QuantizedEmbedding
from tfcompress.quantize import DEFAULT_GRID_SIZE, check_grid_size, quantize_int8

QUANTIZE_CHOICES = (None, "int8")


def folded_tables(layer):
    """W_f = E_f . P_f for every feature of a built `MLETEmbedding`, as float32 NumPy arrays [rows_f, d].

    The product is taken in float64 so the folded table is the exact product rounded once to float32.
    """
    if not layer.built:
        raise ValueError(f"MLETEmbedding {layer.name!r} is not built (it has no weights yet); call it on ids first")
    projections = np.asarray(layer.projections.numpy(), np.float64)
    return [
        (np.asarray(table.numpy(), np.float64) @ projections[f]).astype(np.float32)
        for f, table in enumerate(layer.tables)
    ]


def copy_layer(layer):
    """A new embedding layer from `layer`'s config, built, holding copies of its weights."""
    copy = type(layer).from_config(layer.get_config())
    copy.build((None, len(layer.cardinalities)))
    copy.set_weights(layer.get_weights())
    return copy


def rebuild_planned(layer, convert):
    """A new `PlannedEmbedding` whose members are `convert(member)`, or copies where `convert` returns None.

    Returns None when `convert` changes no member (the caller then keeps the layer as it is).
    """
    converted = [convert(member) for member in layer.members]
    if all(new is None for new in converted):
        return None
    groups = [
        {"features": features, "layer": new if new is not None else copy_layer(member)}
        for features, member, new in zip(layer.group_features, layer.members, converted)
    ]
    planned = PlannedEmbedding(layer.num_features, layer.output_dim, groups, layer.out_of_range, name=layer.name)
    planned.build((None, layer.num_features))
    return planned


def fold_layer(layer):
    """The folded replacement of one layer, or None when `layer` holds no MLET table.

    Args:
        layer: an `MLETEmbedding` (built) -> a `FullEmbedding` (or `HashingTrickEmbedding` with the same buckets
            when hashed) named like it, with W_f = E_f . P_f; a `PlannedEmbedding` -> a new one with its MLET
            members folded and copies of the other members; any other layer -> None.
    """
    if isinstance(layer, MLETEmbedding):
        common = dict(cardinalities=layer.cardinalities, output_dim=layer.output_dim, gradient=layer.gradient,
                      out_of_range=layer.out_of_range, name=layer.name)
        if layer.hashed:
            folded = HashingTrickEmbedding(num_buckets=layer.num_buckets, **common)
        else:
            folded = FullEmbedding(**common)
        folded.build((None, len(layer.cardinalities)))
        folded.set_weights(folded_tables(layer))
        return folded
    if isinstance(layer, PlannedEmbedding):
        return rebuild_planned(layer, fold_layer)
    return None


def _rewrite_config(model, config, convert, replaced):
    """Replace, in `config` (the config of `model`), the entry of every layer that `convert` replaces.

    Layer names are unique within one model but not across nested models, so each nested model's entries are
    matched against that nested model's own layers.
    """
    by_name = {layer.name: layer for layer in model.layers}
    for entry in config["layers"]:
        name = entry.get("name") or entry.get("config", {}).get("name")
        layer = by_name.get(name)
        if layer is None:  # e.g. a Sequential's InputLayer, which is not in model.layers
            continue
        new = convert(layer)
        if new is not None:
            replaced[id(layer)] = new
            # Keep the functional graph keys ("name", "inbound_nodes"); swap what describes the layer itself.
            entry.update(keras.layers.serialize(new))
        elif isinstance(layer, keras.Model):
            _rewrite_config(layer, entry["config"], convert, replaced)


def _copy_weights(old_model, new_model, replaced):
    old_by_name = {layer.name: layer for layer in old_model.layers}
    for new_layer in new_model.layers:
        old = old_by_name[new_layer.name]
        if id(old) in replaced:
            new_layer.set_weights(replaced[id(old)].get_weights())
        elif isinstance(old, keras.Model):
            _copy_weights(old, new_layer, replaced)
        else:
            new_layer.set_weights(old.get_weights())


def _compile_like(old_model, new_model):
    """Compile the new model as the old one was (loss, metrics, a fresh optimizer), so `evaluate` works."""
    get_compile_config = getattr(old_model, "get_compile_config", None)
    compile_config = get_compile_config() if get_compile_config is not None else None
    if not compile_config:
        return
    try:
        new_model.compile_from_config(compile_config)
    except Exception as error:  # custom losses/metrics that do not deserialize: the model itself is still fine
        warnings.warn(f"the rewritten model is not compiled ({error}); call compile() before evaluate()",
                      stacklevel=3)


def replace_layers(model, convert):
    """A new model like `model` in which each layer L with `convert(L)` not None is replaced by that layer.

    Args:
        model: a functional or Sequential Keras model (nested models are searched too).
        convert: layer -> a built replacement layer with the same name (its weights are copied into the new
            model), or None to keep the layer (its weights are copied as they are).

    Returns:
        A new model, compiled like `model` (with a fresh optimizer) when `model` was compiled.

    Raises:
        ValueError: `model` is not a Keras model, or is a subclassed model (it has no layer graph in its config).
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"expected a keras.Model, got {type(model).__name__}; use fold_layer for a single layer")
    replaced = {}
    # One scope around writing the configs and rebuilding the model from them: an object that several layers hold
    # (one shared RobeMemory, in the model or in the replacements) is written once and comes back as one object,
    # not one copy per layer.
    with object_sharing_scope():
        config = model.get_config()
        if not isinstance(config, dict) or "layers" not in config:
            raise ValueError(
                f"model {model.name!r} ({type(model).__name__}) has no layer graph in its config (a subclassed "
                "model?); only functional and Sequential models can be rewritten. Replace the layers yourself with "
                "fold_layer."
            )
        _rewrite_config(model, config, convert, replaced)
        new_model = type(model).from_config(config)
    _copy_weights(model, new_model, replaced)
    _compile_like(model, new_model)
    return new_model


def fold(model, quantize=None, grid_size=None):
    """A new model with every MLET layer folded to one d-wide table per feature (predictions unchanged).

    Args:
        model: a trained functional or Sequential model (e.g. `tfcompress.models.build_dlrm(...)`).
        quantize: None (float32 tables) or "int8": also store every full or hashed table (folded or not) as int8
            with one grid-searched scale per table (`quantize_model`).
        grid_size: scales tried per table when quantizing (default `tfcompress.quantize.DEFAULT_GRID_SIZE`).

    Returns:
        A new Keras model; the original is left untouched.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    if quantize == "int8":
        return quantize_model(model, grid_size=DEFAULT_GRID_SIZE if grid_size is None else grid_size)
    return replace_layers(model, fold_layer)


def quantize_layer(layer, grid_size=DEFAULT_GRID_SIZE):
    """The int8 replacement of one layer, or None when it has no float table to quantize.

    Args:
        layer: a built `FullEmbedding` or `HashingTrickEmbedding` -> a `QuantizedEmbedding` with the same rows and
            name; an `MLETEmbedding` -> folded first, then quantized; a `PlannedEmbedding` -> a new one with those
            members quantized and copies of the others (ROBE, QR, ... stay as they are); any other layer -> None.
        grid_size: scales tried per table (see `tfcompress.quantize.quantize_int8`).
    """
    if isinstance(layer, MLETEmbedding):
        layer = fold_layer(layer)
    if isinstance(layer, (FullEmbedding, HashingTrickEmbedding)):
        if not layer.built:
            raise ValueError(
                f"{type(layer).__name__} {layer.name!r} is not built (no weights yet); call it on ids first")
        num_buckets = layer.num_buckets if isinstance(layer, HashingTrickEmbedding) else None
        quantized = QuantizedEmbedding(layer.cardinalities, layer.output_dim, num_buckets=num_buckets,
                                       out_of_range=layer.out_of_range, name=layer.name)
        pairs = [quantize_int8(table.numpy(), grid_size) for table in layer.tables]
        quantized.set_quantized([values for values, _ in pairs], [scale for _, scale in pairs])
        return quantized
    if isinstance(layer, PlannedEmbedding):
        return rebuild_planned(layer, lambda member: quantize_layer(member, grid_size))
    return None


def quantize_model(model, grid_size=DEFAULT_GRID_SIZE):
    """A new model with every full, hashed or MLET (folded first) table stored as int8 (see `quantize_layer`)."""
    grid_size = check_grid_size(grid_size)
    return replace_layers(model, lambda layer: quantize_layer(layer, grid_size))
