"""Lookups with the gradient forms the layers need, in pure TensorFlow.

`gather_with_gradient` is the one gather every tfcompress layer uses. It returns the same forward values as
`tf.gather`, with a gradient chosen by `gradient`:

- "sparse": `tf.IndexedSlices` whose indices are unique (duplicates coalesced by a segment sum). Keras 3 optimizers
  do not deduplicate IndexedSlices, and Adagrad/Adam square the gradient, so uncoalesced duplicates would update
  wrongly; coalescing makes every optimizer see the true gradient.
- "dense": one scatter-add into a tensor the size of the table (seed paper PSS, Algorithm 1). Faster when the table
  is small next to the batch's lookups: no unique/sort, and the optimizer update is a plain dense op.

The fused custom ops (custom_ops/) replace this path when they are built; results are identical.
"""

import tensorflow as tf

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


def _variable_handle(table):
    """The tf.Variable behind a Keras 3 variable (tf_keras and plain TF hand the tf.Variable itself)."""
    return getattr(table, "value", table) if not isinstance(table, tf.Variable) else table


def gather_with_gradient(table, indices, gradient):
    """`tf.gather(table, indices)` along axis 0 with a "sparse" or "dense" gradient (see module doc).

    Args:
        table: the trainable variable (Keras or tf.Variable), 1-D (ROBE array) or 2-D (rows x dim).
        indices: int64 tensor of any shape, already in range.
        gradient: "sparse" or "dense" (resolve "auto" first with `resolve_gradient_mode`).
    """
    variable = _variable_handle(table)

    @tf.custom_gradient
    def _gather(idx):
        values = tf.gather(variable, idx)

        def grad(upstream, variables=None):
            row_shape = tf.shape(variable, out_type=tf.int64)
            flat_idx = tf.reshape(idx, [-1])
            flat_upstream = tf.reshape(upstream, tf.concat([[-1], row_shape[1:]], axis=0))
            if gradient == "dense":
                table_grad = tf.math.unsorted_segment_sum(flat_upstream, flat_idx, row_shape[0])
            else:
                unique_idx, position = tf.unique(flat_idx)
                summed = tf.math.unsorted_segment_sum(flat_upstream, position, tf.size(unique_idx))
                table_grad = tf.IndexedSlices(summed, unique_idx, row_shape)
            return None, [table_grad]

        return values, grad

    return _gather(indices)
