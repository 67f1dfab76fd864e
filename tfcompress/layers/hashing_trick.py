"""The hashing trick: table t keeps m_t rows and id x reads row x mod m_t."""

import math
import warnings

import tensorflow as tf

from tfcompress._keras import fresh_initializer, register_serializable
from tfcompress.layers import base
from tfcompress.lookup import gather_with_gradient, resolve_gradient_mode

# A hashed table with fewer rows than this maps all its ids to one vector.
MIN_USEFUL_ROWS = 2


def buckets_for(cardinalities, num_buckets=None, compression=None):
    """Rows per table: `num_buckets` (an int for all tables or one per table) or ceil(n_t / compression).

    A table never gets more rows than it has ids (that would waste memory without separating anything).
    """
    if (num_buckets is None) == (compression is None):
        raise ValueError("give exactly one of num_buckets or compression")
    if compression is not None:
        if not compression >= 1.0:
            raise ValueError(f"compression must be >= 1, got {compression!r}")
        rows = [max(1, math.ceil(n / compression)) for n in cardinalities]
        collapsed = [f for f, (m, n) in enumerate(zip(rows, cardinalities)) if m < MIN_USEFUL_ROWS <= n]
        if collapsed:
            warnings.warn(f"hashing at compression {compression:g} leaves table(s) {collapsed} with fewer than "
                          f"{MIN_USEFUL_ROWS} rows: every id of such a table reads the same vector, so the feature "
                          "carries no information; keep small tables uncompressed (uncompressed_below) or lower "
                          "the ratio", UserWarning, stacklevel=3)
        return rows
    if isinstance(num_buckets, int):
        num_buckets = [num_buckets] * len(cardinalities)
    if len(num_buckets) != len(cardinalities):
        raise ValueError(f"num_buckets has {len(num_buckets)} entries for {len(cardinalities)} tables")
    for f, m in enumerate(num_buckets):
        base.check_positive_int(f"num_buckets[{f}]", m)
    return [min(int(m), n) for m, n in zip(num_buckets, cardinalities)]


@register_serializable()
class HashingTrickEmbedding(base.IdEmbeddingLayer):
    """One `m_t x output_dim` table per feature; id x of table t reads row x mod m_t.

    Example:

    >>> layer = HashingTrickEmbedding(cardinalities=[1000, 50], output_dim=8, compression=10.0)
    >>> layer.num_buckets
    [100, 5]

    Args:
        cardinalities: ids of feature f lie in [0, cardinalities[f]).
        output_dim: embedding width D.
        num_buckets: rows per table (int for all, or a list); or give `compression` instead.
        compression: n_t / m_t, >= 1.
        gradient, out_of_range, embeddings_initializer: as in `FullEmbedding`.

    Input shape: integer [batch, F]. Output shape: float32 [batch, F, output_dim].
    """

    def __init__(self, cardinalities, output_dim, num_buckets=None, compression=None, gradient="sparse",
                 out_of_range="error", embeddings_initializer="uniform", **kwargs):
        super().__init__(cardinalities, output_dim, gradient=gradient, out_of_range=out_of_range,
                         embeddings_initializer=embeddings_initializer, **kwargs)
        self.num_buckets = buckets_for(self.cardinalities, num_buckets, compression)
        self._gradient_modes = [resolve_gradient_mode(gradient, m * self.output_dim) for m in self.num_buckets]

    @property
    def physical_parameters(self):
        return sum(self.num_buckets) * self.output_dim

    @classmethod
    def _parameter_counts(cls, cardinalities, output_dim, num_buckets=None, compression=None, **options):
        return [m * output_dim for m in buckets_for(cardinalities, num_buckets, compression)], None

    def build(self, input_shape):
        self.check_id_shape(input_shape)
        self.tables = [
            self.add_weight(name=f"table_{f}", shape=(m, self.output_dim),
                            initializer=fresh_initializer(self.embeddings_initializer))
            for f, m in enumerate(self.num_buckets)
        ]
        super().build(input_shape)

    def call(self, ids):
        ids = self.prepare_ids(ids)
        columns = [
            gather_with_gradient(table, tf.math.floormod(ids[:, f], m), mode)
            for f, (table, m, mode) in enumerate(zip(self.tables, self.num_buckets, self._gradient_modes))
        ]
        return tf.stack(columns, axis=1)

    def serving_lookup(self, ids, out_of_range="mod", tables=None):
        """`call` for serving graphs: one plain gather per table (see `base.IdLayer.serving_lookup`)."""
        tables = base.table_reader(tables)
        ids = self.serving_ids(ids, out_of_range)
        columns = [tables.gather(table, tf.math.floormod(ids[:, f], m))
                   for f, (table, m) in enumerate(zip(self.tables, self.num_buckets))]
        return tf.stack(columns, axis=1)

    def get_config(self):
        config = super().get_config()
        config.update(num_buckets=self.num_buckets)
        return config
