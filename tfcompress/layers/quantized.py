"""int8 tables: a trained table stored as int8 values and one float scale per table, de-quantized on lookup."""

import numpy as np
import tensorflow as tf

from tfcompress._keras import register_serializable
from tfcompress.layers import base
from tfcompress.layers.hashing_trick import buckets_for
from tfcompress.sizes import storage_bytes


@register_serializable()
class QuantizedEmbedding(base.IdLayer):
    """One int8 `rows_f x output_dim` table and one float32 scale per feature; lookups return values * scale.

    Made from a trained `FullEmbedding` or `HashingTrickEmbedding` (or a folded MLET) by
    `tfcompress.model_rewrite.quantize_model` / `tfcompress.model_rewrite.quantize_layer`; the weights are not trainable. With
    `num_buckets`, id x of feature f reads row x mod m_f, exactly as the hashed float table did.

    Example:

    >>> layer = QuantizedEmbedding(cardinalities=[1000, 50], output_dim=8)
    >>> layer(tf.constant([[3, 7], [999, 0]])).shape
    TensorShape([2, 2, 8])

    Args:
        cardinalities: ids of feature f lie in [0, cardinalities[f]).
        output_dim: embedding width d.
        num_buckets: rows per hashed table (int or list), or None for one row per id.
        out_of_range: "error" (default) or "mod" (see `RobeEmbedding`).

    Input shape: integer [batch, F]. Output shape: float32 [batch, F, output_dim].
    """

    def __init__(self, cardinalities, output_dim, num_buckets=None, out_of_range="error", **kwargs):
        super().__init__(cardinalities, output_dim, out_of_range=out_of_range, **kwargs)
        self.num_buckets = None if num_buckets is None else buckets_for(self.cardinalities, num_buckets)

    @property
    def hashed(self):
        return self.num_buckets is not None

    @property
    def table_rows(self):
        return list(self.num_buckets) if self.hashed else list(self.cardinalities)

    @property
    def physical_parameters(self):
        """Stored values (int8 entries) plus the F scales."""
        return sum(self.table_rows) * self.output_dim + len(self.cardinalities)

    @property
    def physical_bytes(self):
        """One byte per int8 entry, four per float32 scale."""
        return storage_bytes(sum(self.table_rows), self.output_dim, int8=True, tables=len(self.cardinalities))

    def build(self, input_shape):
        self.check_id_shape(input_shape)
        self.tables = [
            self.add_weight(name=f"table_{f}", shape=(m, self.output_dim), dtype="int8", initializer="zeros",
                            trainable=False)
            for f, m in enumerate(self.table_rows)
        ]
        self.scales = self.add_weight(name="scales", shape=(len(self.cardinalities),), initializer="ones",
                                      trainable=False)
        super().build(input_shape)

    def set_quantized(self, values, scales):
        """Load int8 tables and their scales (builds the layer if needed).

        Args:
            values: one int8 array [rows_f, output_dim] per feature.
            scales: one float per feature.
        """
        if not self.built:
            self.build((None, len(self.cardinalities)))
        if len(values) != len(self.tables) or len(scales) != len(self.tables):
            raise ValueError(f"expected {len(self.tables)} tables and scales, got {len(values)} and {len(scales)}")
        for f, (table, value) in enumerate(zip(self.tables, values)):
            value = np.asarray(value)
            if value.dtype != np.int8 or value.shape != tuple(table.shape):
                raise ValueError(
                    f"table {f} must be int8 of shape {tuple(table.shape)}, got {value.dtype} {value.shape}")
            table.assign(value)
        self.scales.assign(np.asarray(scales, np.float32))

    def call(self, ids):
        ids = self.prepare_ids(ids)
        columns = []
        for f, table in enumerate(self.tables):
            rows = ids[:, f] if not self.hashed else tf.math.floormod(ids[:, f], self.num_buckets[f])
            columns.append(tf.cast(tf.gather(table, rows), tf.float32) * self.scales[f])
        return tf.stack(columns, axis=1)

    def serving_lookup(self, ids, out_of_range="mod", tables=None):
        """`call` for serving graphs (see `base.IdLayer.serving_lookup`). The tables are int8 already, so they are
        read as stored: `tables` is not consulted."""
        ids = self.serving_ids(ids, out_of_range)
        columns = []
        for f, table in enumerate(self.tables):
            rows = ids[:, f] if not self.hashed else tf.math.floormod(ids[:, f], self.num_buckets[f])
            columns.append(tf.cast(tf.gather(table, rows), tf.float32) * self.scales[f])
        return tf.stack(columns, axis=1)

    def get_config(self):
        config = super().get_config()
        config.update(num_buckets=self.num_buckets)
        return config
