"""MLET: multi-layer embedding training (each table trained as a k-wide table times a k x d projection).

Seed paper: "Enhancing cross-category learning in recommendation systems with multi-layer embedding training".
The factorization only changes training: after training, `tfcompress.fold` multiplies each pair into one
n x d table, so the deployed model is an ordinary embedding of width d.
"""

import warnings

import tensorflow as tf

from tfcompress._keras import fresh_initializer, keras, register_serializable
from tfcompress.layers import base
from tfcompress.layers.hashing_trick import buckets_for
from tfcompress.lookup import gather_with_gradient, resolve_gradient_mode

DEFAULT_PROJECTION_STDDEV = 0.25  # the paper's value for DLRM


def hashed_rows(cardinalities, num_buckets=None, compression=None):
    """Rows of each hashed table (see `buckets_for`), or None when the tables are not hashed."""
    if num_buckets is None and compression is None:
        return None
    return buckets_for(cardinalities, num_buckets, compression)


def _trained_parameters(table_rows, inner_dim, output_dim):
    """Parameters per feature while training: its m x k table and its k x d projection."""
    return [m * inner_dim + inner_dim * output_dim for m in table_rows]


@register_serializable()
class MLETEmbedding(base.IdEmbeddingLayer):
    """Per feature f a `rows_f x inner_dim` table E_f and an `inner_dim x output_dim` projection P_f.

    The embedding of id x of feature f is E_f[x] . P_f (no bias, no activation), so the layer computes exactly
    what the single table W_f = E_f . P_f would; `tfcompress.model_rewrite.fold_layer` builds that table. What differs is
    training: every gradient step also moves P_f, which changes the embedding of EVERY id of the feature (a dense
    update), so rare ids keep learning from the frequent ones (the paper's cross-category learning).

    Each feature has its own projection, as in the paper (one two-layer embedding per table): features of
    different meaning do not share a linear map, and folding stays per table.

    With `num_buckets` or `compression` the tables are hashed first (id x of feature f reads row x mod m_f, as in
    `HashingTrickEmbedding`); folding then gives a hashed d-wide table.

    Example:

    >>> layer = MLETEmbedding(cardinalities=[1000, 50], output_dim=8, inner_dim=32)
    >>> layer(tf.constant([[3, 7], [999, 0]])).shape
    TensorShape([2, 2, 8])
    >>> layer.physical_parameters, layer.folded_parameters
    (34112, 8400)

    Args:
        cardinalities: ids of feature f lie in [0, cardinalities[f]).
        output_dim: d, the width of the embedding the rest of the model sees (and of the folded table).
        inner_dim: k, the width of the trained tables. The paper advises k >= d (a smaller k caps the folded
            table's rank below d); k < d is allowed but warns.
        num_buckets: rows per hashed table (an int for all, or a list); default: no hashing.
        compression: or hash table f to ceil(n_f / compression) rows, >= 1.
        projection_stddev: standard deviation of the Gaussian initialization of the projections (> 0).
        gradient: gradient of the tables: "sparse" (the default: coalesced IndexedSlices), "dense" or "auto". The
            projections always get a dense gradient (they are small and every lookup touches them).
        out_of_range: "error" (default) or "mod" (see `RobeEmbedding`).
        embeddings_initializer: initializer of the k-wide tables; the paper's Glorot (Xavier) uniform by default.

    Input shape: integer [batch, F]. Output shape: float32 [batch, F, output_dim].
    """

    def __init__(self, cardinalities, output_dim, inner_dim, num_buckets=None, compression=None,
                 projection_stddev=DEFAULT_PROJECTION_STDDEV, gradient="sparse", out_of_range="error",
                 embeddings_initializer="glorot_uniform", **kwargs):
        super().__init__(cardinalities, output_dim, gradient=gradient, out_of_range=out_of_range,
                         embeddings_initializer=embeddings_initializer, **kwargs)
        self.inner_dim = base.check_positive_int("inner_dim", inner_dim)
        if self.inner_dim < self.output_dim:
            warnings.warn(
                f"MLETEmbedding inner_dim={self.inner_dim} < output_dim={self.output_dim}: the folded tables have "
                "rank at most inner_dim; the MLET paper advises inner_dim >= output_dim",
                UserWarning, stacklevel=2,
            )
        self.num_buckets = hashed_rows(self.cardinalities, num_buckets, compression)
        if not (isinstance(projection_stddev, (int, float)) and projection_stddev > 0):
            raise ValueError(f"projection_stddev must be a number > 0, got {projection_stddev!r}")
        self.projection_stddev = float(projection_stddev)
        self._gradient_modes = [resolve_gradient_mode(gradient, m * self.inner_dim) for m in self.table_rows]

    @property
    def hashed(self):
        return self.num_buckets is not None

    @property
    def table_rows(self):
        """Rows of each trained (and folded) table: the hashed row counts, or the cardinalities."""
        return list(self.num_buckets) if self.hashed else list(self.cardinalities)

    @property
    def physical_parameters(self):
        """Size while training: sum m_f * k + F * k * d."""
        return sum(_trained_parameters(self.table_rows, self.inner_dim, self.output_dim))

    @property
    def folded_parameters(self):
        """Size after `fold`: sum m_f * d."""
        return sum(self.table_rows) * self.output_dim

    @classmethod
    def _parameter_counts(cls, cardinalities, output_dim, inner_dim=None, num_buckets=None, compression=None,
                          **options):
        inner_dim = base.check_positive_int("inner_dim", inner_dim if inner_dim is not None else 0)
        rows = hashed_rows(cardinalities, num_buckets, compression) or cardinalities
        return _trained_parameters(rows, inner_dim, output_dim), [m * output_dim for m in rows]

    def build(self, input_shape):
        self.check_id_shape(input_shape)
        self.tables = [
            self.add_weight(name=f"table_{f}", shape=(m, self.inner_dim),
                            initializer=fresh_initializer(self.embeddings_initializer))
            for f, m in enumerate(self.table_rows)
        ]
        # One [F, k, d] variable holds every P_f: a single einsum projects all features at once.
        self.projections = self.add_weight(
            name="projections",
            shape=(len(self.cardinalities), self.inner_dim, self.output_dim),
            initializer=keras.initializers.RandomNormal(stddev=self.projection_stddev),
        )
        super().build(input_shape)

    def call(self, ids):
        ids = self.prepare_ids(ids)
        rows = [ids[:, f] for f in range(len(self.cardinalities))]
        if self.hashed:
            rows = [tf.math.floormod(r, m) for r, m in zip(rows, self.num_buckets)]
        inner = tf.stack(
            [gather_with_gradient(table, r, mode) for table, r, mode in zip(self.tables, rows, self._gradient_modes)],
            axis=1,
        )  # [B, F, k]
        return tf.einsum("bfk,fkd->bfd", inner, self.projections)

    def serving_lookup(self, ids, out_of_range="mod", tables=None):
        """`call` for serving graphs: plain gathers of the k-wide tables, then the projections (see
        `base.IdLayer.serving_lookup`; exports fold the layer first, `tfcompress.fold`)."""
        tables = base.table_reader(tables)
        ids = self.serving_ids(ids, out_of_range)
        rows = [ids[:, f] for f in range(len(self.cardinalities))]
        if self.hashed:
            rows = [tf.math.floormod(r, m) for r, m in zip(rows, self.num_buckets)]
        inner = tf.stack([tables.gather(table, r) for table, r in zip(self.tables, rows)], axis=1)  # [B, F, k]
        return tf.einsum("bfk,fkd->bfd", inner, self.projections)

    def get_config(self):
        config = super().get_config()
        config.update(
            inner_dim=self.inner_dim,
            num_buckets=self.num_buckets,
            projection_stddev=self.projection_stddev,
        )
        return config
