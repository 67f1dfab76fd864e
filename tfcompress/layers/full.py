"""Full tables: one uncompressed table per feature (the baseline every compression is measured against)."""

import tensorflow as tf

from tfcompress._keras import fresh_initializer, keras, register_serializable
from tfcompress.layers import _common
from tfcompress.ops import gather_with_gradient, resolve_gradient_mode


@register_serializable()
class FullEmbedding(keras.layers.Layer):
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
        super().__init__(**kwargs)
        self.cardinalities = _common.check_cardinalities(cardinalities)
        self.output_dim = _common.check_positive_int("output_dim", output_dim)
        self.gradient = gradient
        self._gradient_modes = [resolve_gradient_mode(gradient, n * self.output_dim) for n in self.cardinalities]
        self.out_of_range = _common.check_out_of_range(out_of_range)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    @property
    def logical_parameters(self):
        return sum(self.cardinalities) * self.output_dim

    @property
    def physical_parameters(self):
        return self.logical_parameters

    def build(self, input_shape):
        _common.check_id_shape(input_shape, len(self.cardinalities), type(self).__name__)
        self.tables = [
            self.add_weight(name=f"table_{f}", shape=(n, self.output_dim),
                            initializer=fresh_initializer(self.embeddings_initializer))
            for f, n in enumerate(self.cardinalities)
        ]
        super().build(input_shape)

    def call(self, ids):
        ids = _common.prepare_ids(ids, self.cardinalities, self.out_of_range)
        columns = [
            gather_with_gradient(table, ids[:, f], mode)
            for f, (table, mode) in enumerate(zip(self.tables, self._gradient_modes))
        ]
        return tf.stack(columns, axis=1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            cardinalities=self.cardinalities,
            output_dim=self.output_dim,
            gradient=self.gradient,
            out_of_range=self.out_of_range,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
        )
        return config
