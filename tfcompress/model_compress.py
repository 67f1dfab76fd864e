"""`compress(model)`: the model a user already has, with its large embedding tables compressed, in one call.

    import tfcompress

    model = build_my_ranking_model()                       # functional or Sequential, keras.layers.Embedding inside
    model = tfcompress.compress(model, ratio=1000)         # or budget="100MB", method="robe" | "hashing" | ...
    model.compile(...); model.fit(...)                     # the user's own script, unchanged

Every `keras.layers.Embedding` (and keras-rs `EmbedReduce`) with at least `min_rows` rows becomes a
`tfcompress.layers.CompressedEmbedding` with the same `input_dim`, `output_dim`, `mask_zero`, name (and combiner),
and a keras-rs `DistributedEmbedding` a `tfcompress.layers.CompressedEmbeddings` over its feature configs;
with `method="robe"` and `share=True` all of them read one `RobeMemory` array, ROBE's point. Every other layer, its
weights, the layer names and the model's inputs and outputs stay as they are. The rewrite is
`tfcompress.model_rewrite.replace_layers` (through `get_config` / `from_config`), so functional and Sequential
models, nested ones included, work on Keras 3 and on legacy tf.keras; a subclassed model has no layer graph to
rewrite and gets an error that points to the drop-in layer.

Sizes (docs/compress.md):
- `ratio`: each replaced table's logical size / its physical size (the shared memory: the replaced tables'
  logical size / the memory's size). Tables below `min_rows` stay as they are and are not counted.
- `budget`: bytes of ALL the embedding tables of the returned model, the tables kept below `min_rows` included;
  what they leave is split among the replaced tables in proportion to their logical size (or is the one shared
  memory).
- `method="full"` copies every table as it is: the returned model predicts exactly what the original does.
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from tfcompress._keras import keras
from tfcompress.layers import CompressedEmbedding, CompressedEmbeddings, RobeMemory
from tfcompress.model_rewrite import replace_layers
from tfcompress.sizes import BYTES_PER_FLOAT, format_bytes, parse_bytes

DEFAULT_RATIO = 1000
METHODS = ("robe", "mlet", "hashing", "qr", "pruned", "full")
# Embedding settings the compressed layer has no counterpart for: compressing would drop them silently.
UNSUPPORTED_EMBEDDING_SETTINGS = ("embeddings_regularizer", "embeddings_constraint", "activity_regularizer")


@dataclasses.dataclass
class TablePlan:
    """One embedding table of the model: what `compress` does with it and its sizes in bytes."""

    path: str           # the layer's name, prefixed by the nested models that hold it ("tower/user_id")
    layer_class: str
    rows: int
    dim: int
    action: str         # the method, or "kept" (below min_rows)
    logical_bytes: int
    physical_bytes: object  # int, or None where the table reads the shared memory

    @property
    def ratio(self):
        return None if self.physical_bytes is None else self.logical_bytes / self.physical_bytes


@dataclasses.dataclass
class SharedMemoryPlan:
    """One ROBE array that several replaced tables read: the tables' logical bytes and the array's bytes."""

    label: str
    logical_bytes: int
    physical_bytes: int


@dataclasses.dataclass
class ModelCompressionPlan:
    """What `compress` did: per table logical vs physical bytes, the shared memories, totals."""

    method: str
    tables: list
    shared_memories: list = dataclasses.field(default_factory=list)

    @property
    def logical_bytes(self):
        return sum(t.logical_bytes for t in self.tables)

    @property
    def physical_bytes(self):
        return sum(t.physical_bytes or 0 for t in self.tables) + sum(m.physical_bytes for m in self.shared_memories)

    @property
    def ratio(self):
        return self.logical_bytes / self.physical_bytes

    @property
    def replaced(self):
        return [t for t in self.tables if t.action != "kept"]

    def summary(self):
        """The plan as a text table."""
        width = max([len("table")] + [len(t.path) for t in self.tables] + [len(m.label) for m in self.shared_memories])
        header = (f"{'table':<{width}} {'rows':>12} {'dim':>5} {'method':>8} {'logical':>12} {'physical':>12} "
                  f"{'ratio':>9}")
        lines = [header, "-" * len(header)]
        for t in self.tables:
            physical = "shared" if t.physical_bytes is None else format_bytes(t.physical_bytes)
            ratio = "" if t.ratio is None else f"{t.ratio:,.1f}x"
            lines.append(f"{t.path:<{width}} {t.rows:>12,} {t.dim:>5} {t.action:>8} "
                         f"{format_bytes(t.logical_bytes):>12} {physical:>12} {ratio:>9}")
        for m in self.shared_memories:
            lines.append(f"{m.label:<{width}} {'':>12} {'':>5} {'robe':>8} {format_bytes(m.logical_bytes):>12} "
                         f"{format_bytes(m.physical_bytes):>12} {m.logical_bytes / m.physical_bytes:>8,.1f}x")
        lines.append("-" * len(header))
        lines.append(f"{'total':<{width}} {sum(t.rows for t in self.tables):>12,} {'':>5} {self.method:>8} "
                     f"{format_bytes(self.logical_bytes):>12} {format_bytes(self.physical_bytes):>12} "
                     f"{self.ratio:>8,.1f}x")
        lines.append(f"{len(self.replaced)} of {len(self.tables)} embedding tables replaced ({self.method}); "
                     f"embeddings {format_bytes(self.logical_bytes)} -> {format_bytes(self.physical_bytes)}")
        return "\n".join(line.rstrip() for line in lines)


# ---- finding the tables ------------------------------------------------------------------------------------------


def _is_keras_rs(layer, class_name):
    return type(layer).__name__ == class_name and type(layer).__module__.startswith("keras_rs")


def _has_layer_graph(model):
    """True for functional and Sequential models (their config lists their layers); False for subclassed ones."""
    try:
        config = model.get_config()
    except NotImplementedError:  # a subclassed model without get_config
        return False
    return isinstance(config, dict) and "layers" in config


def _sublayers(layer):
    """Every layer inside `layer` (not `layer` itself), at any depth."""
    return list(layer._flatten_layers(include_self=False, recursive=True))


def _is_embedding(layer):
    return isinstance(layer, keras.layers.Embedding) or _is_keras_rs(layer, "DistributedEmbedding")


def _subclassed_error(model, where):
    return ValueError(
        f"compress: {where} {model.name!r} is a subclassed model ({type(model).__name__}): it has no layer graph that "
        "compress can rewrite. Use the drop-in layer instead: replace each keras.layers.Embedding(input_dim, "
        "output_dim, ...) in its code by tfcompress.layers.CompressedEmbedding(input_dim, output_dim, "
        "method='robe', compression=..., memory=tfcompress.layers.RobeMemory(...)) (docs/compress.md)")


def find_embeddings(model, prefix=""):
    """(path, layer) of every embedding layer `compress` can replace (a keras `Embedding`, keras-rs `EmbedReduce`
    or `DistributedEmbedding`), in the order of `model.layers`.

    Raises:
        ValueError: `model` (or a nested model holding an embedding) is subclassed; an embedding sits inside a
            custom layer, where a config rewrite cannot reach it.
    """
    found = []
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.layers.Embedding) or _is_keras_rs(layer, "DistributedEmbedding"):
            found.append((path, layer))
        elif isinstance(layer, keras.Model):
            if not _has_layer_graph(layer):
                if any(_is_embedding(inner) for inner in _sublayers(layer)):
                    raise _subclassed_error(layer, "nested model")
                continue
            found.extend(find_embeddings(layer, prefix=f"{path}/"))
        else:
            hidden = [inner.name for inner in _sublayers(layer) if _is_embedding(inner)]
            if hidden:
                raise ValueError(
                    f"compress: layer {path!r} ({type(layer).__name__}) holds embedding layers {hidden} inside its "
                    "own code, where compress cannot replace them; use tfcompress.layers.CompressedEmbedding in "
                    "that layer's code instead")
    return found


def _tables_of(layer):
    """(table name or None, rows, dim) of each table `layer` holds: one for an Embedding; a DistributedEmbedding's
    distinct TableConfigs (several features may read one table)."""
    if not _is_keras_rs(layer, "DistributedEmbedding"):
        return [(None, int(layer.input_dim), int(layer.output_dim))]
    tables = []
    for feature in tf.nest.flatten(layer._feature_configs):
        if not any(feature.table is table for table in tables):
            tables.append(feature.table)
    return [(table.name, int(table.vocabulary_size), int(table.embedding_dim)) for table in tables]


def _check_replaceable(path, layer):
    """The embedding's settings that `CompressedEmbedding` reproduces, or a ValueError naming the one it cannot."""
    if _is_keras_rs(layer, "DistributedEmbedding"):
        return  # its TableConfigs are what CompressedEmbeddings reads; nothing else to keep
    if type(layer) is not keras.layers.Embedding and not _is_keras_rs(layer, "EmbedReduce"):
        raise ValueError(
            f"compress: layer {path!r} is a {type(layer).__name__}, a subclass of keras.layers.Embedding that "
            "compress does not know; replace it with tfcompress.layers.CompressedEmbedding in the model's code")
    if _is_keras_rs(layer, "EmbedReduce"):
        for node_input in _call_inputs(layer):
            if not (getattr(node_input, "ragged", False) or getattr(node_input, "sparse", False)) \
                    and len(node_input.shape) >= 2:
                raise ValueError(
                    f"compress: layer {path!r} (keras_rs EmbedReduce) reduces dense ids of shape "
                    f"{tuple(node_input.shape)}, every entry counted, padding included; CompressedEmbedding pools "
                    "bags given as ragged (or sparse) ids. Feed the bag as a ragged input "
                    "(keras.Input((None,), ragged=True)) to compress this table, or raise min_rows to keep it")
    config = layer.get_config()
    for key in UNSUPPORTED_EMBEDDING_SETTINGS:
        if config.get(key) is not None:
            raise ValueError(f"compress: layer {path!r} has {key}={config[key]!r}, which the compressed layer "
                             "cannot apply; remove it or raise min_rows above this table's rows to keep it")
    if config.get("lora_rank"):
        raise ValueError(f"compress: layer {path!r} has lora_rank={config['lora_rank']}; compress a model "
                         "without LoRA enabled on its embeddings")
    if getattr(layer, "quantization_mode", None):
        raise ValueError(f"compress: layer {path!r} is quantized ({layer.quantization_mode}); compress the float "
                         "model")


# ---- sizing ------------------------------------------------------------------------------------------------------


def _check_arguments(ratio, budget, method, min_rows, share):
    if method not in METHODS:
        raise ValueError(f"compress: method must be one of {METHODS}, got {method!r}")
    if ratio is not None and budget is not None:
        raise ValueError(f"compress: give ratio or budget, not both (got ratio={ratio!r}, budget={budget!r})")
    if isinstance(min_rows, bool) or not isinstance(min_rows, (int, np.integer)) or min_rows < 1:
        raise ValueError(f"compress: min_rows must be an int >= 1, got {min_rows!r}")
    if not isinstance(share, bool):
        raise ValueError(f"compress: share must be True or False, got {share!r}")
    if method == "full":
        if budget is not None or ratio not in (None, 1):
            raise ValueError(f"compress: method 'full' copies the tables as they are; it takes no ratio or budget "
                             f"(got ratio={ratio!r}, budget={budget!r})")
        return None, None
    if budget is None and ratio is None:
        ratio = DEFAULT_RATIO
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1):
        raise ValueError(f"compress: ratio must be a number >= 1 (1000 = 1000x smaller), got {ratio!r}")
    return ratio, (None if budget is None else parse_bytes(budget))


def _target_parameters(ratio, budget_bytes, replaced_logical, kept_logical):
    """Floats the replaced tables may hold together."""
    if budget_bytes is None:
        return replaced_logical / ratio
    left = budget_bytes // BYTES_PER_FLOAT - kept_logical
    if left < 1:
        raise ValueError(
            f"compress: budget {format_bytes(budget_bytes)} is used up by the tables kept below min_rows "
            f"({format_bytes(kept_logical * BYTES_PER_FLOAT)}); raise the budget or lower min_rows")
    if left >= replaced_logical:
        raise ValueError(
            f"compress: budget {format_bytes(budget_bytes)} holds every table uncompressed "
            f"({format_bytes((replaced_logical + kept_logical) * BYTES_PER_FLOAT)}); use method='full' or a smaller "
            "budget")
    return left


def _variable_bytes(variable):
    """Bytes `variable` stores: its size times its dtype's width (int bookkeeping, e.g. chunk pruning's address
    table, counts too, as it is stored and shipped with the model)."""
    return int(np.prod(variable.shape)) * tf.as_dtype(variable.dtype).size


# ---- the rewrite -------------------------------------------------------------------------------------------------


def _call_inputs(layer):
    """The symbolic ids of every call of `layer` in its model (a layer may be called more than once)."""
    inputs = []
    for node in getattr(layer, "_inbound_nodes", []):
        tensors = getattr(node, "input_tensors", None)
        if isinstance(tensors, (list, tuple)) and tensors:
            inputs.append(tensors[0])  # the ids; EmbedReduce's optional weights come after them
        elif tensors is not None:
            inputs.append(tensors)
    return inputs


def _input_shape(layer):
    """The shape `layer` was first called on ([B], [B, L], ...), for building its replacement alike."""
    try:
        return tuple(layer.input.shape)
    except (AttributeError, ValueError, RuntimeError):  # shared layers (several inputs) or never called
        return (None,)


def _replacement(path, layer, method, compression, memory, chunk_size):
    """A built `CompressedEmbedding` standing in for `layer` (weights copied for method 'full')."""
    config = layer.get_config()
    kwargs = dict(input_dim=int(config["input_dim"]), output_dim=int(config["output_dim"]), method=method,
                  mask_zero=bool(config.get("mask_zero", False)), name=layer.name,
                  trainable=bool(config.get("trainable", True)))
    if _is_keras_rs(layer, "EmbedReduce"):
        kwargs["combiner"] = layer.combiner
    if method == "robe" and memory is not None:
        kwargs["memory"] = memory  # size and chunk size are the memory's
    elif method == "robe":
        kwargs["compression"] = compression
        if chunk_size is not None:
            kwargs["chunk_size"] = chunk_size
    elif method != "full":
        kwargs["compression"] = compression
    if method != "full" and memory is None:
        # The table starts as the user asked; a shared memory starts from RobeMemory's initializer ("uniform",
        # Embedding's default) as its tables may have asked for different ones.
        kwargs["embeddings_initializer"] = config.get("embeddings_initializer")
    try:
        new = CompressedEmbedding(**kwargs)
    except (ValueError, TypeError) as error:
        raise ValueError(f"compress: cannot compress layer {path!r} with method {method!r}: {error}") from error
    new.build(_input_shape(layer))
    if method == "full":
        new.set_weights([np.asarray(layer.get_weights()[0])])
    return new


def _distributed_replacement(path, layer, method, compression, share, chunk_size, memory_floats=None):
    """A built `CompressedEmbeddings` over the feature configs of keras-rs DistributedEmbedding `layer`."""
    kwargs = dict(method=method, share_memory=share, chunk_size=chunk_size, name=layer.name,
                  trainable=layer.trainable)
    if method != "full":
        kwargs["ratio"] = compression
    if memory_floats is not None:
        # Its RobeMemory rounds |M| = ceil(logical / ratio) up; this ratio makes it exactly `memory_floats`.
        logical = sum(rows * dim for _, rows, dim in _tables_of(layer))
        kwargs["ratio"] = logical / (memory_floats - 0.5)
    try:
        new = CompressedEmbeddings(layer._feature_configs, **kwargs)
    except (ValueError, TypeError) as error:
        raise ValueError(f"compress: cannot compress layer {path!r} with method {method!r}: {error}") from error
    new.build(None)
    if method == "full":
        old_tables = layer.get_embedding_tables()
        for table_layer in new.table_layers:
            table_layer.set_weights([np.asarray(old_tables[table_layer.name])])
    return new


def plan_and_replacements(model, ratio=None, budget=None, method="robe", min_rows=10_000, share=True,
                          chunk_size=None):
    """The plan and the replacement layers of `compress` (by id of the layer they replace), without the rewrite.

    Arguments as `compress`. Returns (ModelCompressionPlan, {id(old layer): new layer}).
    """
    ratio, budget_bytes = _check_arguments(ratio, budget, method, min_rows, share)
    if not isinstance(model, keras.Model):
        raise TypeError(f"compress: expected a Keras model (functional or Sequential), got {type(model).__name__}")
    if not _has_layer_graph(model):
        raise _subclassed_error(model, "model")
    layers = find_embeddings(model)
    if not layers:
        raise ValueError(f"compress: model {model.name!r} has no keras.layers.Embedding to compress")

    def logical(layer):
        return sum(rows * dim for _, rows, dim in _tables_of(layer))

    # A DistributedEmbedding is replaced as a whole (all its tables) when its largest table has min_rows rows.
    replaced = [(path, layer) for path, layer in layers
                if max(rows for _, rows, _ in _tables_of(layer)) >= min_rows]
    if not replaced:
        largest = max(rows for _, layer in layers for _, rows, _ in _tables_of(layer))
        raise ValueError(f"compress: no embedding of model {model.name!r} has min_rows={min_rows:,} rows or more "
                         f"(the largest has {largest:,}); lower min_rows")
    for path, layer in replaced:
        _check_replaceable(path, layer)
    replaced_logical = sum(logical(layer) for _, layer in replaced)
    kept_logical = sum(logical(layer) for _, layer in layers) - replaced_logical

    memory, compression, target = None, None, None
    if method != "full":
        target = _target_parameters(ratio, budget_bytes, replaced_logical, kept_logical)
        compression = replaced_logical / target
    distributed = [(path, layer) for path, layer in replaced if _is_keras_rs(layer, "DistributedEmbedding")]
    embeddings = [(path, layer) for path, layer in replaced if not _is_keras_rs(layer, "DistributedEmbedding")]
    new_layers = {}
    shares_memory = method == "robe" and share
    for path, layer in distributed:
        # With shared ROBE, each DistributedEmbedding's tables share its own memory (CompressedEmbeddings makes it);
        # under a budget it gets exactly its part of the floats, the Embeddings' memory the rest.
        floats = math.floor(target * logical(layer) / replaced_logical) if shares_memory and budget_bytes else None
        new_layers[id(layer)] = _distributed_replacement(path, layer, method, compression, share, chunk_size, floats)
    if embeddings and shares_memory:
        taken = sum(new_layers[id(layer)].memory.size for _, layer in distributed)
        size = math.floor(target) - taken if budget_bytes else math.floor(
            target * sum(logical(layer) for _, layer in embeddings) / replaced_logical)
        memory_kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
        memory = RobeMemory(size=max(1, size), name="robe_memory", **memory_kwargs)
    for path, layer in embeddings:
        new_layers[id(layer)] = _replacement(path, layer, method, compression, memory, chunk_size)
    return _plan(method, layers, new_layers, memory, budget_bytes), new_layers


def _plan(method, layers, new_layers, memory, budget_bytes):
    """The plan table of `layers` (path, old layer) with `new_layers` (by id of the old layer) built."""
    memories = []  # (label, RobeMemory, logical floats of its tables)
    if memory is not None:
        memories.append(["shared ROBE memory", memory, 0])
    for path, layer in layers:
        new = new_layers.get(id(layer))
        if getattr(new, "memory", None) is not None and new.memory is not memory:
            memories.append([f"{path}: shared ROBE memory", new.memory, 0])
    shared = {id(v): entry for entry in memories for v in entry[1].weights}
    rows = []
    for path, layer in layers:
        new = new_layers.get(id(layer))
        tables = _tables_of(layer)
        parts = new.table_layers if isinstance(new, CompressedEmbeddings) else [new] * len(tables)
        for (table, rows_, dim), part in zip(tables, parts):
            table_path = path if table is None else f"{path}/{table}"
            logical_bytes = rows_ * dim * BYTES_PER_FLOAT
            if new is None:
                rows.append(TablePlan(table_path, type(layer).__name__, rows_, dim, "kept", logical_bytes,
                                      logical_bytes))
                continue
            owners = [shared[id(v)] for v in part.weights if id(v) in shared]
            for entry in owners[:1]:
                entry[2] += rows_ * dim
            physical = sum(_variable_bytes(v) for v in part.weights if id(v) not in shared)
            rows.append(TablePlan(table_path, type(layer).__name__, rows_, dim, method, logical_bytes,
                                  None if owners and not physical else physical))
    shared_plans = [SharedMemoryPlan(label, floats * BYTES_PER_FLOAT, sum(_variable_bytes(v) for v in m.weights))
                    for label, m, floats in memories]
    plan = ModelCompressionPlan(method, rows, shared_plans)
    if budget_bytes is not None and plan.physical_bytes > budget_bytes:
        raise ValueError(f"compress: method {method!r} cannot fit these tables in {format_bytes(budget_bytes)}: its "
                         f"layers need {format_bytes(plan.physical_bytes)} (e.g. QR's floor of 2*sqrt(rows) rows)")
    return plan


def compress(model, ratio=None, budget=None, method="robe", min_rows=10_000, share=True, chunk_size=None,
             verbose=True):
    """A new model like `model` with every embedding of at least `min_rows` rows compressed.

    Args:
        model: a functional or Sequential Keras model (Keras 3 or legacy tf.keras), nested models included. It is
            left untouched.
        ratio: logical / physical size of the replaced tables (default 1000 when no budget is given).
        budget: bytes ("100MB", "64MiB", or a number) for ALL embedding tables of the returned model, the kept
            small ones included; instead of `ratio`.
        method: "robe" (default), "mlet", "hashing", "qr", "pruned", or "full" (an exact copy: the rewrite alone).
        min_rows: tables with fewer rows (`input_dim`) are kept as they are.
        share: with method "robe", all replaced tables read ONE `RobeMemory` array (False: one array each).
        chunk_size: ROBE-Z chunk size Z (None: the layer's default).
        verbose: print the plan table.

    Returns:
        The new model; compiled like `model` (a fresh optimizer) when `model` was compiled. Its plan is
        `tfcompress.model_compress.plan_and_replacements(...)[0]` for the same arguments.

    Raises:
        ValueError: a subclassed model (use `tfcompress.layers.CompressedEmbedding` in its code), no table with
            `min_rows` rows, bad arguments, an embedding setting the compressed layer cannot keep, a budget the kept
            tables already exceed.
    """
    plan, new_layers = plan_and_replacements(model, ratio, budget, method, min_rows, share, chunk_size)
    compressed = replace_layers(model, lambda layer: new_layers.get(id(layer)))
    if verbose:
        print(plan.summary())
    return compressed
