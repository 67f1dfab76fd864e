"""Model inputs shared by every architecture: the {"dense", "sparse"} feature dict the data readers produce."""

from tfcompress._keras import keras


def feature_counts(schema_or_dims):
    """(n_dense, n_sparse) from a Schema-like object, a mapping, or a (n_dense, n_sparse) pair.

    Raises ValueError when the counts are missing or out of range (n_dense >= 0, n_sparse >= 1), or when the
    schema has multi-valued fields (schema.multi_fields), which these inputs cannot take (the error names them).
    """
    if hasattr(schema_or_dims, "n_dense") and hasattr(schema_or_dims, "n_sparse"):
        if getattr(schema_or_dims, "multi_fields", None):
            # These models take {"dense", "sparse"} only: a multi-valued field would be read and never used.
            schema_or_dims.require_no_multi_fields('the {"dense", "sparse"} inputs of the tfcompress.models '
                                                   "architectures")
        counts = (schema_or_dims.n_dense, schema_or_dims.n_sparse)
    elif isinstance(schema_or_dims, dict):
        if "n_dense" not in schema_or_dims or "n_sparse" not in schema_or_dims:
            raise ValueError(f"schema mapping needs keys 'n_dense' and 'n_sparse', got {sorted(schema_or_dims)}")
        counts = (schema_or_dims["n_dense"], schema_or_dims["n_sparse"])
    elif isinstance(schema_or_dims, (tuple, list)) and len(schema_or_dims) == 2:
        counts = tuple(schema_or_dims)
    else:
        raise ValueError(
            "schema_or_dims must be a Schema, a mapping with n_dense/n_sparse or a (n_dense, n_sparse) pair, "
            f"got {schema_or_dims!r}"
        )
    n_dense, n_sparse = counts
    if isinstance(n_dense, bool) or int(n_dense) != n_dense or n_dense < 0:
        raise ValueError(f"n_dense must be an integer >= 0, got {n_dense!r}")
    if isinstance(n_sparse, bool) or int(n_sparse) != n_sparse or n_sparse < 1:
        raise ValueError(f"n_sparse must be an integer >= 1 (at least one categorical feature), got {n_sparse!r}")
    return int(n_dense), int(n_sparse)


def feature_inputs(n_dense, n_sparse):
    """The two Keras inputs, named like the dataset keys so `model.fit` matches them by name.

    "dense" exists even when n_dense == 0 (Avazu): every model then takes the same dict the reader yields.
    """
    return {
        "dense": keras.Input(shape=(n_dense,), dtype="float32", name="dense"),
        "sparse": keras.Input(shape=(n_sparse,), dtype="int64", name="sparse"),
    }


def embed(embedding_layer, sparse_ids):
    """Apply the embedding layer and check it returned [batch, n_sparse, D]."""
    embedded = embedding_layer(sparse_ids)
    n_sparse = sparse_ids.shape[1]
    if len(embedded.shape) != 3 or embedded.shape[1] != n_sparse or embedded.shape[2] is None:
        raise ValueError(
            f"embedding_layer must map ids [batch, {n_sparse}] to [batch, {n_sparse}, D], "
            f"got output shape {tuple(embedded.shape)}"
        )
    return embedded
