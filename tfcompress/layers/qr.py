"""Quotient-remainder embeddings: two small tables per feature, indexed by x // m and x mod m, then combined."""

import math

import tensorflow as tf

from tfcompress._keras import fresh_initializer, keras, register_serializable
from tfcompress.layers import base
from tfcompress.layers.hashing_trick import buckets_for
from tfcompress.lookup import gather_with_gradient, resolve_gradient_mode

QR_OPERATIONS = ("mult", "add", "concat")


def remainder_rows_for(cardinality, compression, operation):
    """Remainder-table rows m for one table so that (ceil(n/m) + m) rows hit n / compression rows.

    With concat each table is only D/2 wide, so the row budget doubles. n/m + m = S has real roots only when
    S >= 2 sqrt(n); below that the smallest QR pair (m = ceil(sqrt(n))) is used and the achieved ratio is lower
    (the plan reports the achieved ratio).
    """
    n = cardinality
    row_budget = n / compression * (2.0 if operation == "concat" else 1.0)
    discriminant = row_budget * row_budget - 4.0 * n
    if discriminant < 0:
        return max(1, math.ceil(math.sqrt(n)))
    return max(1, min(n, math.ceil((row_budget + math.sqrt(discriminant)) / 2.0)))


def table_shapes(cardinalities, output_dim, num_buckets=None, compression=None, operation="mult"):
    """(remainder rows m, quotient rows ceil(n/m), (quotient width, remainder width)) per the layer's arguments."""
    if operation not in QR_OPERATIONS:
        raise ValueError(f"operation must be one of {QR_OPERATIONS}, got {operation!r}")
    if (num_buckets is None) == (compression is None):
        raise ValueError("give exactly one of num_buckets or compression")
    if compression is not None:
        if not compression >= 1.0:
            raise ValueError(f"compression must be >= 1, got {compression!r}")
        num_buckets = [remainder_rows_for(n, compression, operation) for n in cardinalities]
    remainder_rows = buckets_for(cardinalities, num_buckets)
    quotient_rows = [-(-n // m) for n, m in zip(cardinalities, remainder_rows)]
    widths = (output_dim // 2, output_dim - output_dim // 2) if operation == "concat" else (output_dim, output_dim)
    return remainder_rows, quotient_rows, widths


def _parameters(quotient_rows, remainder_rows, widths):
    """Parameters per feature: its quotient table plus its remainder table."""
    q_width, r_width = widths
    return [q * q_width + m * r_width for q, m in zip(quotient_rows, remainder_rows)]


@register_serializable()
class QREmbedding(base.IdEmbeddingLayer):
    """Per feature a quotient table (ceil(n/m) rows) and a remainder table (m rows); id x reads row x // m of the
    first and x mod m of the second, combined by "mult" (element-wise product), "add" or "concat" (each table D/2
    wide). No two ids of one table share both rows, so every id keeps a distinct embedding.

    Example:

    >>> layer = QREmbedding(cardinalities=[10000, 50], output_dim=8, compression=10.0, operation="mult")
    >>> layer(tf.constant([[3, 7], [9999, 0]])).shape
    TensorShape([2, 2, 8])

    Args:
        cardinalities: ids of feature f lie in [0, cardinalities[f]).
        output_dim: embedding width D (even for "concat" is not required: the halves are D//2 and D - D//2).
        num_buckets: remainder rows m per table (int or list); or `compression` (m solved per table).
        operation: "mult", "add" or "concat".
        gradient, out_of_range, embeddings_initializer: as in `FullEmbedding`. With "mult" the quotient table starts
            near 1 so the product starts as the remainder embedding (two small uniforms multiplied start near 0
            and learn slowly).

    Input shape: integer [batch, F]. Output shape: float32 [batch, F, output_dim].
    """

    def __init__(self, cardinalities, output_dim, num_buckets=None, compression=None, operation="mult",
                 gradient="sparse", out_of_range="error", embeddings_initializer="uniform", **kwargs):
        super().__init__(cardinalities, output_dim, gradient=gradient, out_of_range=out_of_range,
                         embeddings_initializer=embeddings_initializer, **kwargs)
        self.num_buckets, self.quotient_rows, self._widths = table_shapes(
            self.cardinalities, self.output_dim, num_buckets, compression, operation)
        self.operation = operation
        q_width, r_width = self._widths
        self._gradient_modes = [
            (resolve_gradient_mode(gradient, q * q_width), resolve_gradient_mode(gradient, m * r_width))
            for q, m in zip(self.quotient_rows, self.num_buckets)
        ]

    @property
    def physical_parameters(self):
        return sum(_parameters(self.quotient_rows, self.num_buckets, self._widths))

    @classmethod
    def _parameter_counts(cls, cardinalities, output_dim, num_buckets=None, compression=None, operation="mult",
                          **options):
        remainder_rows, quotient_rows, widths = table_shapes(cardinalities, output_dim, num_buckets, compression,
                                                             operation)
        return _parameters(quotient_rows, remainder_rows, widths), None

    def build(self, input_shape):
        self.check_id_shape(input_shape)
        q_width, r_width = self._widths
        q_init = (keras.initializers.RandomUniform(0.95, 1.05) if self.operation == "mult"
                  else self.embeddings_initializer)
        self.quotient_tables, self.remainder_tables = [], []
        for f, (q, m) in enumerate(zip(self.quotient_rows, self.num_buckets)):
            self.quotient_tables.append(self.add_weight(name=f"quotient_{f}", shape=(q, q_width),
                                                       initializer=fresh_initializer(q_init)))
            self.remainder_tables.append(
                self.add_weight(name=f"remainder_{f}", shape=(m, r_width),
                                initializer=fresh_initializer(self.embeddings_initializer))
            )
        super().build(input_shape)

    def call(self, ids):
        ids = self.prepare_ids(ids)
        columns = []
        for f, (m, (q_mode, r_mode)) in enumerate(zip(self.num_buckets, self._gradient_modes)):
            x = ids[:, f]
            q = gather_with_gradient(self.quotient_tables[f], x // m, q_mode)
            r = gather_with_gradient(self.remainder_tables[f], tf.math.floormod(x, m), r_mode)
            columns.append(self._combine(q, r))
        return tf.stack(columns, axis=1)

    def serving_lookup(self, ids, out_of_range="mod", tables=None):
        """`call` for serving graphs: plain gathers of both tables (see `base.IdLayer.serving_lookup`)."""
        tables = base.table_reader(tables)
        ids = self.serving_ids(ids, out_of_range)
        columns = []
        for f, m in enumerate(self.num_buckets):
            x = ids[:, f]
            q = tables.gather(self.quotient_tables[f], x // m)
            r = tables.gather(self.remainder_tables[f], tf.math.floormod(x, m))
            columns.append(self._combine(q, r))
        return tf.stack(columns, axis=1)

    def _combine(self, quotient_rows, remainder_rows):
        if self.operation == "mult":
            return quotient_rows * remainder_rows
        if self.operation == "add":
            return quotient_rows + remainder_rows
        return tf.concat([quotient_rows, remainder_rows], axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(num_buckets=self.num_buckets, operation=self.operation)
        return config
