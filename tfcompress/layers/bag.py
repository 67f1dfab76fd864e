"""Bag (multi-hot) lookups: every row of a ragged or sparse id tensor pooled into one embedding.

One function, `bag_lookup`, does the pooling for every layer and for serving. It is the composite of stock ops
(a gather through `lookup_fn`, then `tf.math.unsorted_segment_sum`), so serving graphs can trace it as it is; a
fused bag op (hashed gather and per-row sum in one kernel) replaces the composite in training by taking the same
arguments. The contract is `tf.nn.safe_embedding_lookup_sparse`'s, so a model moved from it reads the same values.
"""

import tensorflow as tf

from tfcompress.lookup import BAG_COMBINERS

COMBINERS = BAG_COMBINERS  # one list for the composite, the reference and the fused op


def check_combiner(combiner, layer_name, allow_none=True):
    """`combiner` if it is one of COMBINERS (or None where allowed), else ValueError naming the layer."""
    if combiner is None and allow_none:
        return None
    if combiner not in COMBINERS:
        raise ValueError(f"{layer_name}: combiner must be one of {COMBINERS}{' or None' if allow_none else ''}, "
                         f"got {combiner!r}")
    return combiner


def bag_lookup(lookup_fn, ids_values, row_splits, weights, combiner):
    """Pooled embeddings of bags of ids: float32 [rows, D], with `tf.nn.safe_embedding_lookup_sparse`'s contract.

    - ids < 0 are pruned (with their weights);
    - with weights and a combiner other than "sum", ids of weight <= 0 are pruned too ("sum" keeps them, as
      safe_embedding_lookup_sparse does);
    - "sum": sum_i w_i e_i; "mean": sum_i w_i e_i / sum_i w_i; "sqrtn": sum_i w_i e_i / sqrt(sum_i w_i^2), with
      w_i = 1 without weights;
    - a row left empty (no ids, or all pruned) is zeros.

    Args:
        lookup_fn: maps int64 ids [V] (all >= 0) to float embeddings [V, D]; applies the layer's id rule.
        ids_values: integer [V], the ids of all bags, row after row (a RaggedTensor's `values`).
        row_splits: int64 [rows + 1], bag r holds ids_values[row_splits[r]:row_splits[r + 1]].
        weights: float [V] per-id weights, or None.
        combiner: "sum", "mean" or "sqrtn".

    Returns:
        [rows, D] in the dtype of `lookup_fn`'s embeddings (float32, or float16 under a mixed-precision policy).
    """
    if combiner not in COMBINERS:
        raise ValueError(f"bag_lookup: combiner must be one of {COMBINERS}, got {combiner!r}")
    num_rows = tf.shape(row_splits, out_type=tf.int64)[0] - 1
    ids_values, row_splits, weights = prune_bags(ids_values, row_splits, weights, combiner)
    row_ids = tf.ragged.row_splits_to_segment_ids(row_splits)

    embeddings = lookup_fn(ids_values)  # [V', D]
    if weights is not None:
        # In the embeddings' dtype: a layer under a mixed-precision policy looks rows up in float16.
        weights = tf.cast(weights, embeddings.dtype)
        embeddings = embeddings * weights[:, None]
    pooled = tf.math.unsorted_segment_sum(embeddings, row_ids, num_rows)
    if combiner == "sum":
        return pooled
    per_id = tf.ones_like(row_ids, embeddings.dtype) if weights is None else weights
    if combiner == "mean":
        scale = tf.math.unsorted_segment_sum(per_id, row_ids, num_rows)
    else:
        scale = tf.sqrt(tf.math.unsorted_segment_sum(per_id * per_id, row_ids, num_rows))
    # An empty row has scale 0 and a pooled sum of 0: divide_no_nan gives the zeros the contract asks for.
    return tf.math.divide_no_nan(pooled, scale[:, None])


def prune_bags(ids_values, row_splits, weights, combiner):
    """(ids int64 [V'], row_splits int64 [rows + 1], weights float32 [V'] or None) of the bags after
    `tf.nn.safe_embedding_lookup_sparse`'s pruning: ids < 0 go (with their weights), and with weights and a
    combiner other than "sum" so do ids of weight <= 0. Rows keep their number (a row may become empty).

    The one pruning rule of every bag path: `bag_lookup` (the composite) and the fused bag op's caller, which
    takes only ids in range.
    """
    ids_values = tf.cast(ids_values, tf.int64)
    row_splits = tf.cast(row_splits, tf.int64)
    num_rows = tf.shape(row_splits, out_type=tf.int64)[0] - 1
    keep = ids_values >= 0
    if weights is not None:
        weights = tf.cast(weights, tf.float32)
        if combiner != "sum":
            keep = tf.logical_and(keep, weights > 0)
        weights = tf.boolean_mask(weights, keep)
    kept_per_row = tf.math.unsorted_segment_sum(tf.cast(keep, tf.int64),
                                                tf.ragged.row_splits_to_segment_ids(row_splits), num_rows)
    row_splits = tf.concat([tf.zeros([1], tf.int64), tf.cumsum(kept_per_row)], axis=0)
    return tf.boolean_mask(ids_values, keep), row_splits, weights


def as_ragged_bags(ids, weights, layer_name):
    """(values, row_splits, weight values or None) of rank-2 ragged or sparse ids, checked.

    A SparseTensor is reordered first (its entries may come in any order, as tf.sparse.reorder sorts them) and
    only each entry's row index is used (columns need not be 0, 1, 2, ...); its weights must be a SparseTensor with
    the same indices, a ragged input's a RaggedTensor with the same row splits (or None).
    """
    if isinstance(ids, tf.SparseTensor):
        if ids.shape.rank is not None and ids.shape.rank != 2:
            raise ValueError(f"{layer_name}: sparse ids must have rank 2 ([batch, bag]), got shape {ids.shape}")
        if weights is not None and not isinstance(weights, tf.SparseTensor):
            raise TypeError(f"{layer_name}: weights of sparse ids must be a tf.SparseTensor with the same indices, "
                            f"got {type(weights).__name__}")
        if weights is not None:
            tf.debugging.assert_equal(weights.indices, ids.indices,
                                      message=f"{layer_name}: sparse weights must have the indices of the ids")
            # Reordered together: the weights ride along as the values of a copy of the id tensor.
            paired = tf.sparse.reorder(tf.SparseTensor(ids.indices, tf.range(tf.size(ids.values, tf.int64)),
                                                       ids.dense_shape))
            weights = tf.gather(weights.values, paired.values)
        # Only the row of each entry counts (indices[:, 0]), as in safe_embedding_lookup_sparse: columns may have
        # gaps or start anywhere ([[3, 0], [3, 2]] is a valid bag of row 3), which RaggedTensor.from_sparse refuses.
        ordered = tf.sparse.reorder(ids)
        ids = tf.RaggedTensor.from_value_rowids(ordered.values, ordered.indices[:, 0], nrows=ordered.dense_shape[0])
    elif weights is not None:
        if not isinstance(weights, tf.RaggedTensor):
            raise TypeError(f"{layer_name}: weights of ragged ids must be a tf.RaggedTensor with the same row "
                            f"lengths, got {type(weights).__name__}")
        tf.debugging.assert_equal(weights.row_splits, tf.cast(ids.row_splits, weights.row_splits.dtype),
                                  message=f"{layer_name}: ragged weights must have the row lengths of the ids")
        weights = weights.flat_values
    if ids.ragged_rank != 1 or ids.shape.rank != 2:
        raise ValueError(f"{layer_name}: ragged ids with a combiner must have shape [batch, None] (one bag per row), "
                         f"got shape {ids.shape}")
    return ids.values, ids.row_splits, weights
