"""Loader and Python wrappers of the fused ROBE-Z custom ops (sources and build in custom_ops/).

The library is found, in this order:

1. `$TFCOMPRESS_ROBE_OPS_LIBRARY`: a path to a built library (a missing path means "unavailable", which is how
   tests simulate a machine without the library);
2. `tfcompress/_robe_ops-tf<TF version>-<source hash>.so`: what `python custom_ops/build.py` writes;
3. built on first use from custom_ops/ into that same file (g++ and TensorFlow's headers; about 20 s, once per
   TensorFlow version and source change). An installed package without the sources loads any prebuilt library for
   the running TensorFlow version.

When none of that works (no compiler, a failed build, a library that does not load) the reason is warned ONCE and
every caller falls back to the pure-TensorFlow path (tfcompress.robe_hash + tfcompress.lookup), which gives the same
results. `TFCOMPRESS_CUSTOM_OPS=0` turns the ops off without a warning.

Gradients are registered here: RobeLookup's attr `gradient` picks "dense" (RobeLookupGrad: one race-free
scatter-add into an |M| tensor) or "sparse" (RobeLookupSparseGrad: coalesced, sorted unique positions, returned as
tf.IndexedSlices), the same two forms tfcompress.lookup.gather_with_gradient gives. The pooled RobeBagLookup
(`robe_bag_lookup`) picks RobeBagLookupGrad or RobeBagLookupSparseGrad the same way, and its weights gradient is
RobeBagLookupWeightsGrad.

Serving exports must never reference these ops (TF Serving cannot load them): they trace each layer's
`serving_lookup`, which uses stock ops only, instead of its `call`.
"""

import functools
import importlib.util
import logging
import os
import threading
import warnings
from pathlib import Path

import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops

from tfcompress import robe_hash
from tfcompress.lookup import BAG_COMBINERS

LIBRARY_ENV = "TFCOMPRESS_ROBE_OPS_LIBRARY"
SWITCH_ENV = "TFCOMPRESS_CUSTOM_OPS"
USE_CUSTOM_OP_CHOICES = ("auto", True, False)

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR.parent / "custom_ops"

_logger = logging.getLogger(__name__)
_lock = threading.Lock()
_state = {"tried": False, "library": None, "reason": None, "warned": False}


class CustomOpUnavailableError(RuntimeError):
    """use_custom_op=True was asked for but the library cannot be loaded; the message says why."""


def _load_builder():
    """custom_ops/build.py as a module (it is not part of the installed package)."""
    spec = importlib.util.spec_from_file_location("_tfcompress_robe_ops_build", SOURCE_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _find_or_build():
    """Path of the library to load; raises RuntimeError (or the builder's BuildError) saying why there is none."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        if not Path(override).is_file():
            raise RuntimeError(f"{LIBRARY_ENV}={override} does not exist")
        return Path(override)
    if (SOURCE_DIR / "build.py").is_file():
        builder = _load_builder()
        path = builder.library_path(PACKAGE_DIR)
        if path.is_file():
            return path
        _logger.warning("tfcompress: building the ROBE-Z custom ops into %s (once per TF version/source change)", path)
        return builder.build(PACKAGE_DIR)
    prebuilt = sorted(PACKAGE_DIR.glob(f"_robe_ops-tf{tf.__version__}-*.so"))
    if prebuilt:
        return prebuilt[-1]
    raise RuntimeError(f"no library built for TensorFlow {tf.__version__} and no custom_ops/ sources to build one")


def load_library():
    """The loaded op module, or None (the reason is then in `unavailable_reason()`). Tried once per process."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            if os.environ.get(SWITCH_ENV, "1").lower() in ("0", "false", "no", "off"):
                _state["reason"] = f"disabled by {SWITCH_ENV}={os.environ[SWITCH_ENV]}"
                _state["warned"] = True  # asked for explicitly: nothing to warn about
            else:
                try:
                    _state["library"] = tf.load_op_library(str(_find_or_build()))
                except Exception as error:  # noqa: BLE001 - any failure means "fall back", with its reason
                    _state["reason"] = f"{type(error).__name__}: {error}".strip()
        if _state["library"] is None and not _state["warned"]:
            _state["warned"] = True
            warnings.warn(
                "tfcompress: the fused ROBE-Z custom ops are unavailable, using the pure-TensorFlow path instead "
                f"(same results, slower). Reason: {_state['reason']}",
                RuntimeWarning,
                stacklevel=3,
            )
        return _state["library"]


def is_available():
    return load_library() is not None


def unavailable_reason():
    """Why the library did not load (None when it did)."""
    load_library()
    return _state["reason"]


def check_use_custom_op(use_custom_op):
    """Validate a layer's use_custom_op argument; True must be satisfiable right away."""
    if not (use_custom_op is True or use_custom_op is False or use_custom_op == "auto"):
        raise ValueError(f"use_custom_op must be one of {USE_CUSTOM_OP_CHOICES}, got {use_custom_op!r}")
    if use_custom_op is True:
        _require("use_custom_op=True but ")
    return use_custom_op


def should_use(use_custom_op):
    """Whether a layer with this use_custom_op setting calls the fused op now."""
    if use_custom_op is False:
        return False
    if use_custom_op is True:
        _require("use_custom_op=True but ")
        return True
    return load_library() is not None


def _require(context=""):
    """The loaded library, or CustomOpUnavailableError saying why there is none (after `context`)."""
    library = load_library()
    if library is None:
        raise CustomOpUnavailableError(f"{context}the ROBE-Z custom ops cannot be loaded: {_state['reason']}")
    return library


@functools.lru_cache(maxsize=None)
def hash_constant_attr(seed):
    """[R1, R2, R3, S1, S2, S3] as Python ints: the ops' `hash_constants` attr for a seed."""
    return [int(v) for v in robe_hash.hash_constants(seed)[:6]]


def _attrs(cardinalities, output_dim, chunk_size, seed, signed):
    return dict(
        cardinalities=[int(c) for c in cardinalities],
        output_dim=int(output_dim),
        chunk_size=int(chunk_size),
        hash_constants=hash_constant_attr(int(seed)),
        signed=bool(signed),
    )


def robe_lookup(memory, ids, cardinalities, output_dim, chunk_size, seed=robe_hash.DEFAULT_SEED, signed=False,
                gradient="dense"):
    """Fused ROBE-Z lookup: f32[M] memory, raw ids i64[B, F] -> [B, F, output_dim].

    Equals `memory[robe_hash.robe_indices(ids, ...)]` (times `robe_signs` when signed) bit for bit.

    Args:
        memory: the shared array (a Keras/TF variable or tensor, 1-D); other float dtypes are computed in float32
            and cast back.
        ids: integer [B, F]; column f in [0, cardinalities[f]) (out-of-range ids raise InvalidArgumentError naming
            the feature and the value).
        cardinalities, output_dim, chunk_size, seed, signed: as RobeEmbedding.
        gradient: "dense" or "sparse" (resolve "auto" with tfcompress.lookup.resolve_gradient_mode first).
    """
    if gradient not in ("dense", "sparse"):
        raise ValueError(f"gradient must be 'dense' or 'sparse', got {gradient!r}")
    library = _require()
    attrs = _attrs(cardinalities, output_dim, chunk_size, seed, signed)
    ids = tf.cast(ids, tf.int64)
    variable = _float32_variable(memory)
    if variable is not None:
        # Tell the tape (and an enclosing tf.function) that the variable is read, as ResourceGather's caller does:
        # the op consumes the handle, so nothing else would record the access.
        resource_variable_ops.variable_accessed(variable)
        return library.robe_resource_lookup(variable.handle, ids, gradient=gradient, **attrs)
    memory = tf.convert_to_tensor(memory)
    dtype = memory.dtype
    if dtype != tf.float32:
        memory = tf.cast(memory, tf.float32)
    values = library.robe_lookup(memory, ids, gradient=gradient, **attrs)
    return values if dtype == tf.float32 else tf.cast(values, dtype)


def _float32_variable(memory):
    """The float32 tf.Variable behind `memory` when the op can read it in place, else None (then its value is read).

    None for tensors, for Keras variables autocast to another dtype (mixed precision) and for distributed variables
    outside a replica context (their per-replica handle is undefined there).
    """
    variable = memory if isinstance(memory, tf.Variable) else getattr(memory, "value", None)
    if not isinstance(variable, tf.Variable) or variable.dtype != tf.float32:
        return None
    if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():
        return None
    return variable


def robe_lookup_grad(grad, ids, memory_size, cardinalities, output_dim, chunk_size, seed=robe_hash.DEFAULT_SEED,
                     signed=False, scatter_algorithm="auto"):
    """Dense gradient of `robe_lookup`: f32[B, F, D] -> f32[memory_size] (scatter_algorithm: "auto", "serial",
    "partial_sums" or "destination_ranges"; all give the same sums, "serial" and "destination_ranges" bit for bit)."""
    return _require().robe_lookup_grad(
        grad, tf.cast(ids, tf.int64), tf.cast(memory_size, tf.int64), scatter_algorithm=scatter_algorithm,
        **_attrs(cardinalities, output_dim, chunk_size, seed, signed),
    )


def robe_lookup_sparse_grad(grad, ids, memory_size, cardinalities, output_dim, chunk_size,
                            seed=robe_hash.DEFAULT_SEED, signed=False):
    """Coalesced sparse gradient of `robe_lookup`: tf.IndexedSlices with sorted unique indices into [memory_size]."""
    memory_size = tf.cast(memory_size, tf.int64)
    indices, values = _require().robe_lookup_sparse_grad(
        grad, tf.cast(ids, tf.int64), memory_size, **_attrs(cardinalities, output_dim, chunk_size, seed, signed)
    )
    return tf.IndexedSlices(values, indices, tf.reshape(memory_size, [1]))


def robe_positions(ids, cardinalities, output_dim, chunk_size, memory_size, seed=robe_hash.DEFAULT_SEED, signed=False):
    """(positions i64[B, F, D], signs f32[B, F, D]) as the kernels compute them (for checks against robe_hash.py)."""
    return _require().robe_positions(
        tf.cast(ids, tf.int64), tf.cast(memory_size, tf.int64),
        **_attrs(cardinalities, output_dim, chunk_size, seed, signed),
    )


def _bag_attrs(offset, cardinality, output_dim, chunk_size, seed, signed, combiner, weighted):
    return dict(
        table_offset=int(offset),
        cardinality=int(cardinality),
        output_dim=int(output_dim),
        chunk_size=int(chunk_size),
        hash_constants=hash_constant_attr(int(seed)),
        signed=bool(signed),
        combiner=combiner,
        weighted=bool(weighted),
    )


def _bag_inputs(ids, row_splits, weights):
    """(ids i64[N], row_splits i64[B + 1], weights f32[N] or f32[0], weighted) with dtypes checked by name."""
    ids = tf.convert_to_tensor(ids)
    if not ids.dtype.is_integer:
        raise TypeError(f"robe_bag_lookup: ids must be an integer tensor, got dtype {ids.dtype.name}")
    row_splits = tf.convert_to_tensor(row_splits)
    if not row_splits.dtype.is_integer:
        raise TypeError(f"robe_bag_lookup: row_splits must be an integer tensor, got dtype {row_splits.dtype.name}")
    # Static shapes are checked here so that a graph fails naming the argument (the op's shape function would only
    # say which dimensions differ); values (row_splits' order, id ranges) are checked by the kernel.
    for name, tensor in (("ids", ids), ("row_splits", row_splits)):
        if tensor.shape.rank is not None and tensor.shape.rank != 1:
            raise ValueError(f"robe_bag_lookup: {name} must be 1-D, got shape {tensor.shape}")
    if weights is None:
        return tf.cast(ids, tf.int64), tf.cast(row_splits, tf.int64), tf.zeros([0], tf.float32), False
    weights = tf.convert_to_tensor(weights)
    if not weights.dtype.is_floating:
        raise TypeError(f"robe_bag_lookup: weights must be a float tensor, got dtype {weights.dtype.name}")
    if not weights.shape.is_compatible_with(ids.shape):
        raise ValueError(f"robe_bag_lookup: weights must have the shape of ids {ids.shape} (one per id), got "
                         f"{weights.shape}")
    return tf.cast(ids, tf.int64), tf.cast(row_splits, tf.int64), tf.cast(weights, tf.float32), True


def robe_bag_lookup(memory, ids, row_splits, weights=None, offset=0, cardinality=None, output_dim=None,
                    chunk_size=None, seed=robe_hash.DEFAULT_SEED, signed=False, combiner="sum", gradient="dense"):
    """Fused pooled ROBE-Z lookup: f32[M] memory, a ragged bag of ids -> f32[B, output_dim].

    Row b is `combine_{k in row b} w_k * e_k` with e_k the ROBE-Z embedding of id ids[k] of a table that starts at
    `offset` in the shared array (the `robe_lookup` row of a = ids[k] + offset). The contract of
    `tf.nn.safe_embedding_lookup_sparse` once ids < 0 and weights <= 0 are dropped: "sum" adds, "mean" divides by
    the row's sum of weights, "sqrtn" by the square root of its sum of squared weights; empty rows are zeros. The
    kernel sums in id order and divides last; `tfcompress.lookup.robe_bag_lookup_reference` is the pure-TF twin.

    Args:
        memory: the shared array (a Keras/TF variable or tensor, 1-D).
        ids: integer [N], each in [0, cardinality) (an id outside raises InvalidArgumentError naming it).
        row_splits: integer [B + 1]: row b is ids[row_splits[b]:row_splits[b + 1]] (a RaggedTensor's row_splits).
        weights: None (all ones) or float [N].
        offset: where this table starts in the shared array's index space (the multi-table layer's offset_t).
        cardinality, output_dim, chunk_size, seed, signed: as RobeEmbedding (for one table).
        combiner: "sum", "mean" or "sqrtn".
        gradient: "dense" or "sparse" (the memory gradient's form, as `robe_lookup`).
    """
    if combiner not in BAG_COMBINERS:
        raise ValueError(f"robe_bag_lookup: combiner must be one of {BAG_COMBINERS}, got {combiner!r}")
    if gradient not in ("dense", "sparse"):
        raise ValueError(f"robe_bag_lookup: gradient must be 'dense' or 'sparse', got {gradient!r}")
    if cardinality is None or output_dim is None or chunk_size is None:
        raise ValueError("robe_bag_lookup: cardinality, output_dim and chunk_size are required")
    library = _require()
    ids, row_splits, weights, weighted = _bag_inputs(ids, row_splits, weights)
    attrs = _bag_attrs(offset, cardinality, output_dim, chunk_size, seed, signed, combiner, weighted)
    variable = _float32_variable(memory)
    if variable is not None:
        resource_variable_ops.variable_accessed(variable)  # as in robe_lookup: the op reads the handle
        return library.robe_resource_bag_lookup(variable.handle, ids, row_splits, weights, gradient=gradient, **attrs)
    memory = tf.convert_to_tensor(memory)
    dtype = memory.dtype
    if dtype != tf.float32:
        memory = tf.cast(memory, tf.float32)
    values = library.robe_bag_lookup(memory, ids, row_splits, weights, gradient=gradient, **attrs)
    return values if dtype == tf.float32 else tf.cast(values, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Gradients. Registered by op type name, so they hold for the library whenever it is loaded.


def _op_attrs(op):
    return {name: op.get_attr(name) for name in ("cardinalities", "output_dim", "chunk_size", "hash_constants",
                                                 "signed")}


def _memory_size(memory):
    """A Python int when the array's length is static (the gradient's shape then is too), else a tensor."""
    static = memory.shape[0] if memory.shape.rank == 1 else None
    return int(static) if static is not None else tf.size(memory, out_type=tf.int64)


def _memory_gradient(op, upstream, memory_size):
    """Gradient of RobeLookup / RobeResourceLookup w.r.t. memory, in the form the op's `gradient` attr names."""
    _, ids = op.inputs
    library = _require()
    mode = op.get_attr("gradient")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "sparse":
        indices, values = library.robe_lookup_sparse_grad(upstream, ids, memory_size, **_op_attrs(op))
        dense_shape = tf.reshape(tf.cast(memory_size, tf.int64), [1])
        return [tf.IndexedSlices(values, indices, dense_shape), None]
    return [library.robe_lookup_grad(upstream, ids, memory_size, **_op_attrs(op)), None]


@tf.RegisterGradient("RobeLookup")
def _robe_lookup_gradient(op, upstream):
    return _memory_gradient(op, upstream, _memory_size(op.inputs[0]))


@tf.RegisterGradient("RobeResourceLookup")
def _robe_resource_lookup_gradient(op, upstream):
    # The gradient w.r.t. the handle is the variable's gradient (as for ResourceGather).
    memory_size = tf.raw_ops.VariableShape(input=op.inputs[0], out_type=tf.int64)[0]
    return _memory_gradient(op, upstream, memory_size)


@tf.RegisterGradient("RobeLookupGrad")
def _robe_lookup_grad_gradient(op, upstream):
    # The scatter is linear in its upstream input and its adjoint is the lookup itself (second derivatives).
    _, ids, _ = op.inputs
    return [_require().robe_lookup(upstream, ids, **_op_attrs(op)), None, None]


_BAG_ATTR_NAMES = ("table_offset", "cardinality", "output_dim", "chunk_size", "hash_constants", "signed", "combiner",
                   "weighted")


def _bag_op_attrs(op):
    return {name: op.get_attr(name) for name in _BAG_ATTR_NAMES}


def _bag_gradients(op, upstream, memory_size, read_memory):
    """[memory grad, None, None, weights grad] of RobeBagLookup / RobeResourceBagLookup.

    The weights gradient needs the array's values: `read_memory()` gives them (the tensor input, or a read of the
    variable). It is skipped when the op is unweighted or the tape says nobody asked for it (`skip_input_indices`).
    """
    _, ids, row_splits, weights = op.inputs
    library = _require()
    attrs = _bag_op_attrs(op)
    mode = op.get_attr("gradient")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "sparse":
        indices, values = library.robe_bag_lookup_sparse_grad(upstream, ids, row_splits, weights, memory_size, **attrs)
        memory_grad = tf.IndexedSlices(values, indices, tf.reshape(tf.cast(memory_size, tf.int64), [1]))
    else:
        memory_grad = library.robe_bag_lookup_grad(upstream, ids, row_splits, weights, memory_size, **attrs)
    weights_grad = None
    skipped = getattr(op, "skip_input_indices", None) or ()
    if op.get_attr("weighted") and 3 not in skipped:
        weights_grad = library.robe_bag_lookup_weights_grad(upstream, read_memory(), ids, row_splits, weights,
                                                            op.outputs[0], **attrs)
    return [memory_grad, None, None, weights_grad]


@tf.RegisterGradient("RobeBagLookup")
def _robe_bag_lookup_gradient(op, upstream):
    return _bag_gradients(op, upstream, _memory_size(op.inputs[0]), lambda: op.inputs[0])


@tf.RegisterGradient("RobeResourceBagLookup")
def _robe_resource_bag_lookup_gradient(op, upstream):
    memory_size = tf.raw_ops.VariableShape(input=op.inputs[0], out_type=tf.int64)[0]
    return _bag_gradients(op, upstream, memory_size,
                          lambda: tf.raw_ops.ReadVariableOp(resource=op.inputs[0], dtype=tf.float32))


tf.no_gradient("RobeLookupSparseGrad")
tf.no_gradient("RobePositions")
