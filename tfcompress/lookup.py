"""Lookups with the gradient forms the layers need, in pure TensorFlow.

`gather_with_gradient` is the one gather every tfcompress layer uses. It returns the same forward values as
`tf.gather`, with a gradient chosen by `gradient`:

- "sparse": `tf.IndexedSlices` whose indices are unique (duplicates coalesced by a segment sum). Keras 3 optimizers
  do not deduplicate IndexedSlices, and Adagrad/Adam square the gradient, so uncoalesced duplicates would update
  wrongly; coalescing makes every optimizer see the true gradient.
- "dense": one scatter-add into a tensor the size of the table (seed paper PSS, Algorithm 1). Faster when the table
  is small next to the batch's lookups: no unique/sort, and the optimizer update is a plain dense op.

The fused custom ops (custom_ops/) replace this path when they are built; results are identical.

`TableReader` is what serving lookups (every layer's `serving_lookup`) read tables through instead: one plain
gather, from the table or from a quantized copy of it.
"""

import numpy as np
import tensorflow as tf

from tfcompress import robe_hash

GRADIENT_MODES = ("auto", "sparse", "dense")

# "auto" picks the dense scatter for tables of at most this many floats (64 MiB of float32). Below it a dense
# gradient costs less than sorting the batch's indices; above it, writing a table-sized tensor every step dominates.
DENSE_GRADIENT_MAX_ELEMENTS = 16 * 1024 * 1024


def resolve_gradient_mode(gradient, table_elements):
    """Turn "auto" into "sparse" or "dense" for a table of `table_elements` floats."""
    if gradient not in GRADIENT_MODES:
        raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
    if gradient == "auto":
        return "dense" if table_elements <= DENSE_GRADIENT_MAX_ELEMENTS else "sparse"
    return gradient


def resource_variable(table):
    """The tf.Variable behind a Keras 3 variable (tf_keras hands the tf.Variable itself).

    Gathering from the tf.Variable runs ResourceGather on the variable's buffer. Gathering from the Keras 3 wrapper
    converts it to a tensor first: a read that aliases the whole table, which makes the optimizer's next scatter
    copy the entire table (copy-on-write) — measured 0.19 s vs 0.03 s per step on a 34M-row table.
    """
    return table if isinstance(table, tf.Variable) else getattr(table, "value", table)


def gather_with_gradient(table, indices, gradient):
    """`tf.gather(table, indices)` along axis 0 with a "sparse" or "dense" gradient (see module doc).

    Args:
        table: the trainable variable (Keras or tf.Variable), 1-D (ROBE array) or 2-D (rows x dim).
        indices: int64 tensor of any shape, already in range.
        gradient: "sparse" or "dense" (resolve "auto" first with `resolve_gradient_mode`).
    """
    if gradient == "sparse":
        # Gather each distinct row once, then expand: TensorFlow's own gradient of the first gather is then an
        # IndexedSlices over unique rows whose values are already summed over duplicates. (A tf.custom_gradient
        # over the variable would be simpler to write, but in graph mode it reads the whole variable every step.)
        unique_indices, position = tf.unique(tf.reshape(indices, [-1]))
        rows = tf.gather(resource_variable(table), unique_indices)
        values = tf.gather(rows, position)
        out_shape = tf.concat([tf.shape(indices), tf.shape(rows)[1:]], axis=0)
        return tf.reshape(values, out_shape)
    if gradient != "dense":
        raise ValueError(f"gradient must be 'sparse' or 'dense' here, got {gradient!r}")
    # Dense is only chosen for small tables, so reading the whole table is cheap next to the batch.
    return _gather_dense_gradient(tf.convert_to_tensor(table), indices)


@tf.custom_gradient
def _gather_dense_gradient(params, indices):
    def grad(upstream):
        flat_upstream = tf.reshape(upstream, tf.concat([[-1], tf.shape(params)[1:]], axis=0))
        scattered = tf.math.unsorted_segment_sum(flat_upstream, tf.reshape(indices, [-1]), tf.shape(params)[0])
        return scattered, None

    return tf.gather(params, indices), grad


# The combiners of every pooled (bag) lookup: this reference, `fused_ops.robe_bag_lookup` and `layers.bag`.
BAG_COMBINERS = ("sum", "mean", "sqrtn")


def robe_bag_lookup_reference(memory, ids, row_splits, weights=None, offset=0, cardinality=None, output_dim=None,
                              chunk_size=None, seed=robe_hash.DEFAULT_SEED, signed=False, combiner="sum",
                              gradient="dense"):
    """The pooled ROBE-Z lookup in stock TensorFlow ops: the twin of `fused_ops.robe_bag_lookup`.

    The per-element ROBE-Z lookup of RobeEmbedding's pure-TF path (positions of a = ids + offset, a gather with the
    chosen gradient form, the signs), times the weights, then one segment sum per row and the combiner's division
    (tf.math.divide_no_nan, as tf.nn.embedding_lookup_sparse does). `unsorted_segment_sum` with an explicit row
    count instead of `segment_sum`, which would drop trailing empty rows. Ids are not range-checked here: the
    caller passes ids in [0, cardinality) (`cardinality` is accepted for the fused op's signature).

    Args: as `fused_ops.robe_bag_lookup`. Returns f32[B, output_dim], B = len(row_splits) - 1.
    """
    if combiner not in BAG_COMBINERS:
        raise ValueError(f"robe_bag_lookup_reference: combiner must be one of {BAG_COMBINERS}, got {combiner!r}")
    del cardinality
    memory_size = int(memory.shape[0])
    row_splits = tf.cast(row_splits, tf.int64)
    a = tf.cast(ids, tf.int64) + int(offset)
    positions = robe_hash.robe_indices_tf(a, output_dim, chunk_size, memory_size, seed)
    values = gather_with_gradient(memory, positions, gradient)  # [N, D]
    if signed:
        values = values * robe_hash.robe_signs_tf(a, output_dim, seed)
    num_rows = tf.shape(row_splits, out_type=tf.int64)[0] - 1
    segments = tf.ragged.row_splits_to_segment_ids(row_splits)
    if weights is not None:
        weights = tf.cast(weights, tf.float32)
        values = values * weights[:, None]
    else:
        weights = tf.ones(tf.shape(a), tf.float32)
    summed = tf.math.unsorted_segment_sum(values, segments, num_rows)
    if combiner == "sum":
        return summed
    if combiner == "mean":
        denominator = tf.math.unsorted_segment_sum(weights, segments, num_rows)
    else:
        denominator = tf.sqrt(tf.math.unsorted_segment_sum(tf.square(weights), segments, num_rows))
    return tf.math.divide_no_nan(summed, denominator[:, None])


# How a ROBE-Z serving lookup reads its chunks (`TableReader.chunk_reads`, docs/export_contract.md "Serving layout"):
# "windows": one row gather per chunk from the window matrix W[j] = M[j : j + Z], materialized once when the serving
# graph is traced (a variable saved with the export, Z times |M|); "elements": one scalar gather per element from M;
# "per_call": W rebuilt from M inside the graph on every call (chunk rows for large batches, elements for small);
# "auto": "windows" where W holds at most WINDOWS_MAX_FRACTION of the floats of the full tables stored in M, else
# "per_call". W is Z times |M|, i.e. Z / compression of the full tables: at 1000x and Z = 16 it is 1.6% of them and
# the fastest layout (BENCHMARKS.md "Serving (issue 20)"), but at 100x and Z = 32 it is 32%, and an export only ~3x
# smaller than full tables defeats the compression; the bound keeps every "auto" export >= 10x smaller.
CHUNK_READS = ("auto", "windows", "elements", "per_call")
WINDOWS_MAX_FRACTION = 0.1


class TableReader:
    """How a layer's `serving_lookup` reads its float tables: one plain gather, from the table or from a copy of it.

    Serving graphs need no gradient, so a lookup is `tf.gather` on the table's variable (what `gather_with_gradient`
    returns, without its gradient plumbing). `substitutes` maps a table, by the id of its tf.Variable, to a copy read
    instead: (values tf.Variable, scale or None), read as cast(gather(values), float32) * scale; the exporter's int8
    and float16 tables are such copies. Every table read through the reader is recorded in `tables`
    ({id: tf.Variable}), which is how the exporter finds the tables to quantize.

    The other arguments are the serving layout an export fixes once (every choice gives bit-identical values).

    Args:
        substitutes: {id(tf.Variable): (values tf.Variable, scale float or None)}, default none.
        chunk_reads: how ROBE-Z lookups read chunks, one of `CHUNK_READS`. "windows" snapshots the table into a
            window matrix when the graph is traced (`windows`), so it suits exports, not a model still training;
            the default "per_call" always reads the variable as it is now; "auto" (the export default) is
            "windows" where W is small beside the full tables (`WINDOWS_MAX_FRACTION`), else "per_call".
        unique_ids: ROBE-Z lookups hash and gather each distinct id of the batch once (`tf.unique`) and expand
            after; pays only when batches repeat ids heavily and the per-id work is large.
        jit_compile: ROBE-Z lookups run XLA-compiled (`tf.function(jit_compile=True)`): the hash alone under
            "windows", the hash and the reads otherwise; TF Serving then needs `--xla_cpu_compilation_enabled=true`.
    """

    def __init__(self, substitutes=None, chunk_reads="per_call", unique_ids=False, jit_compile=False):
        if chunk_reads not in CHUNK_READS:
            raise ValueError(f"chunk_reads must be one of {CHUNK_READS}, got {chunk_reads!r}")
        for name, value in (("unique_ids", unique_ids), ("jit_compile", jit_compile)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.substitutes = dict(substitutes or {})
        self.chunk_reads = chunk_reads
        self.unique_ids = unique_ids
        self.jit_compile = jit_compile
        self.tables = {}
        self.window_matrices = {}  # (id(variable read), Z) -> tf.Variable W

    def windows(self, table, chunk_size):
        """(W, scale or None, quantized?) for a 1-D table M: W[j] = M[j : j + Z], (|M| - Z + 1) x Z, a variable
        made from the values `stored(table)` reads now (its int8/float16 copy where it has one), once per table and
        Z. Made outside any graph being traced (`tf.init_scope`), so a SavedModel saves it as a variable."""
        stored, scale, quantized = self.stored(table)
        key = (id(stored), int(chunk_size))
        if key not in self.window_matrices:
            with tf.init_scope():
                values = tf.convert_to_tensor(stored).numpy()
                matrix = np.lib.stride_tricks.sliding_window_view(values, int(chunk_size)).copy()
                name = f"{stored.name.split(':')[0]}/windows{int(chunk_size)}"
                self.window_matrices[key] = tf.Variable(matrix, trainable=False, name=name)
        return self.window_matrices[key], scale, quantized

    def stored(self, table):
        """(what to gather from, scale or None, quantized?) for a layer's float table (a Keras or tf.Variable)."""
        variable = resource_variable(table)
        self.tables[id(variable)] = variable
        substitute = self.substitutes.get(id(variable))
        if substitute is None:
            return variable, None, False
        return substitute[0], substitute[1], True

    @staticmethod
    def dequantize(values, scale, quantized):
        """Values gathered from `stored(...)`'s first element as float32 (`scale` and `quantized` from the same)."""
        if not quantized:
            return values
        values = tf.cast(values, tf.float32)
        return values if scale is None else values * tf.constant(scale, tf.float32)

    def gather(self, table, indices):
        """`tf.gather(table, indices)` along axis 0, read from the table's substitute when it has one."""
        stored, scale, quantized = self.stored(table)
        return self.dequantize(tf.gather(stored, indices), scale, quantized)
