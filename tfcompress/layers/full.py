"""Full tables: one uncompressed table per feature (the baseline every compression is measured against)."""

import tensorflow as tf

from tfcompress._keras import fresh_initializer, register_serializable
from tfcompress.layers import base
from tfcompress.lookup import gather_with_gradient, resolve_gradient_mode


@register_serializable()
class FullEmbedding(base.IdEmbeddingLayer):
    """One `cardinalities[f] x output_dim` table per feature.

    Example:

    >>> layer = FullEmbedding(cardinalities=[1000, 50], output_dim=8)
    >>> layer(tf.constant([[3, 7], [999, 0]])).shape
    TensorShape([2, 2, 8])

    Args:
        cardinalities: rows of each of the F tables.
        output_dim: embedding width D.
        gradient: "sparse" (coalesced IndexedSlices, the default: only looked-up rows change), "dense" or "auto".
        out_of_range: "error" or "mod" (see `RobeEmbedding`).
        embeddings_initializer: initializer of every table.

    Input shape: integer [batch, F]. Output shape: float32 [batch, F, output_dim].
    """

    def __init__(self, cardinalities, output_dim, gradient="sparse", out_of_range="error",
                 embeddings_initializer="uniform", **kwargs):
        super().__init__(cardinalities, output_dim, gradient=gradient, out_of_range=out_of_range,
                         embeddings_initializer=embeddings_initializer, **kwargs)
        self._gradient_modes = [resolve_gradient_mode(gradient, n * self.output_dim) for n in self.cardinalities]

    @property
    def physical_parameters(self):
        return self.logical_parameters

    @classmethod
    def _parameter_counts(cls, cardinalities, output_dim, **options):
        return [n * output_dim for n in cardinalities], None

    def build(self, input_shape):
        self.check_id_shape(input_shape)
        self.tables = [
            self.add_weight(name=f"table_{f}", shape=(n, self.output_dim),
                            initializer=fresh_initializer(self.embeddings_initializer))
            for f, n in enumerate(self.cardinalities)
        ]
        super().build(input_shape)

    def call(self, ids):
        ids = self.prepare_ids(ids)
        columns = [
            gather_with_gradient(table, ids[:, f], mode)
            for f, (table, mode) in enumerate(zip(self.tables, self._gradient_modes))
        ]
        return tf.stack(columns, axis=1)

    def serving_lookup(self, ids, out_of_range="mod", tables=None):
        """`call` for serving graphs: one plain gather per table (see `base.IdLayer.serving_lookup`)."""
        tables = base.table_reader(tables)
        ids = self.serving_ids(ids, out_of_range)
        return tf.stack([tables.gather(table, ids[:, f]) for f, table in enumerate(self.tables)], axis=1)
