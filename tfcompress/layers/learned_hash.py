"""Learned hashing ("Learning to Collide"): id -> row through a learned mapping, then the row's vector."""

import numpy as np
import tensorflow as tf

from tfcompress._keras import fresh_initializer, register_serializable
from tfcompress.layers import base
from tfcompress.learn_hash.mapping import TableMapping, load_mappings, smallest_row_dtype
from tfcompress.lookup import gather_with_gradient, resolve_gradient_mode, resource_variable

COMBINERS = ("sum", "concat")


def _split_width(output_dim, parts):
    """Widths of `parts` concatenated tables adding up to output_dim (the first ones one wider when uneven)."""
    return [output_dim // parts + (k < output_dim % parts) for k in range(parts)]


def _as_row_arrays(mappings):
    """Normalize `mappings` to (list per feature of [K, n] integer arrays, list of num_rows, combiner or None)."""
    if isinstance(mappings, (str, bytes)) or hasattr(mappings, "__fspath__"):
        mappings = load_mappings(mappings)
    if len(mappings) == 0:
        raise ValueError("mappings must hold one mapping per table, got none")
    arrays, num_rows, combiners = [], [], set()
    for f, mapping in enumerate(mappings):
        if not isinstance(mapping, TableMapping):
            rows = np.asarray(mapping)
            if rows.ndim == 1:
                rows = rows[None, :]
            if rows.ndim != 2 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
                raise ValueError(f"mappings[{f}] must be an integer array [K, n] or [n], got {rows.dtype} "
                                 f"{rows.shape}")
            if rows.min() < 0:
                raise ValueError(f"mappings[{f}] holds a negative row {int(rows.min())}")
            mapping = TableMapping(rows=rows, num_rows=[int(r.max()) + 1 for r in rows], name=f"table {f}")
        else:
            combiners.add(mapping.combiner)
        arrays.append(mapping.rows)
        num_rows.append(list(mapping.num_rows))
    if len(combiners) > 1:
        raise ValueError(f"all mappings of one layer must share a combiner, got {sorted(combiners)}")
    return arrays, num_rows, (combiners.pop() if combiners else None)


def resolve_tables(output_dim, mappings=None, cardinalities=None, num_rows=None, combiner=None):
    """The tables a layer with these arguments holds, checked against each other.

    Returns:
        (initial rows per feature or None, cardinalities, num_rows [per feature, K ints], combiner, widths [per
        feature, K ints]).
    """
    initial_rows = None
    mapping_combiner = None
    if mappings is not None:
        initial_rows, mapped_rows, mapping_combiner = _as_row_arrays(mappings)
        mapped_cards = [int(rows.shape[1]) for rows in initial_rows]
        if cardinalities is not None and base.check_cardinalities(cardinalities) != mapped_cards:
            raise ValueError(f"cardinalities {list(cardinalities)} do not match the mappings' table sizes "
                             f"{mapped_cards} (were the mappings built for these tables, in this order?)")
        if num_rows is not None and [list(map(int, r)) for r in num_rows] != mapped_rows:
            raise ValueError(f"num_rows {num_rows} do not match the mappings' {mapped_rows}")
        cardinalities, num_rows = mapped_cards, mapped_rows
    elif cardinalities is None or num_rows is None:
        raise ValueError("give mappings (a .npz path or arrays), or both cardinalities and num_rows")
    cardinalities = base.check_cardinalities(cardinalities)
    if len(num_rows) != len(cardinalities):
        raise ValueError(f"num_rows has {len(num_rows)} entries for {len(cardinalities)} tables")
    num_rows = [[base.check_positive_int(f"num_rows[{f}]", m) for m in rows] for f, rows in enumerate(num_rows)]
    combiner = combiner or mapping_combiner or "sum"
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    if mapping_combiner is not None and combiner != mapping_combiner:
        raise ValueError(f"combiner {combiner!r} differs from the {mapping_combiner!r} the mappings were sized for")
    widths = []
    for f, rows in enumerate(num_rows):
        if combiner == "concat" and len(rows) > output_dim:
            raise ValueError(f"combiner 'concat' splits output_dim={output_dim} over {len(rows)} internal "
                             f"tables of feature {f}; output_dim must be >= {len(rows)}")
        widths.append(_split_width(output_dim, len(rows)) if combiner == "concat" else [output_dim] * len(rows))
    return initial_rows, cardinalities, num_rows, combiner, widths


def _parameters(num_rows, widths):
    """Parameters per feature: its K internal tables."""
    return [sum(m * w for m, w in zip(rows, row_widths)) for rows, row_widths in zip(num_rows, widths)]


@register_serializable()
class LearnedHashEmbedding(base.IdEmbeddingLayer):
    """Per feature: id -> row through learned mappings (one per teacher dimension), then K small tables combined.

    Ids that the clustering put together share one row, so they share one vector and their gradients add up in
    it. With K mappings per table (a K-dimensional teacher) the layer holds K internal tables per feature: "sum"
    adds K vectors of width d, "concat" joins K vectors of width about d/K. Build the mappings with
    `tfcompress.learn_hash` (or `tfcompress learn-hash`); the frequency-based double-hashing variant, where the
    most frequent ids keep rows of their own, is a mapping option (`private_fraction`).

    Example:

    >>> rows = np.array([[0, 0, 1, 2, 2]])                 # 5 ids, 3 rows: ids 0-1 and 3-4 collide
    >>> layer = LearnedHashEmbedding(mappings=[rows], output_dim=4)
    >>> layer(tf.constant([[0], [1], [4]])).shape
    TensorShape([3, 1, 4])

    Where the mappings live: in non-trainable integer weights of the layer (one `mapping_<f>_<k>` per internal
    table, in the smallest unsigned dtype that holds its rows), so a `.keras` file or checkpoint is
    self-contained and `keras.models.load_model` needs no side file. The config keeps only their shapes
    (`cardinalities`, `num_rows`), never the arrays (10M ids would make a config of tens of MB).

    Args:
        mappings: a .npz path written by `tfcompress.learn_hash.save_mappings`, a list of `TableMapping`, or a
            list of integer arrays [K, n] (or [n]) per feature. None only when restoring from a config, where the
            weights are loaded afterwards.
        output_dim: embedding width d.
        cardinalities: ids per table; checked against the mappings when both are given (a plan passes both).
        num_rows: rows of each internal table, a list of K ints per feature (from the mappings when given).
        combiner: "sum" or "concat" (default: the mappings' own, else "sum").
        gradient, out_of_range, embeddings_initializer: as in `FullEmbedding`.

    Input shape: integer [batch, F]. Output shape: float32 [batch, F, output_dim].
    """

    def __init__(self, mappings=None, output_dim=None, cardinalities=None, num_rows=None, combiner=None,
                 gradient="sparse", out_of_range="error", embeddings_initializer="uniform", **kwargs):
        # output_dim is checked before the (possibly large) mappings are read; the base class checks it again.
        output_dim = base.check_positive_int("output_dim", output_dim if output_dim is not None else 0)
        self._initial_rows, cardinalities, self.num_rows, self.combiner, self.widths = resolve_tables(
            output_dim, mappings, cardinalities, num_rows, combiner)
        super().__init__(cardinalities, output_dim, gradient=gradient, out_of_range=out_of_range,
                         embeddings_initializer=embeddings_initializer, **kwargs)
        self._gradient_modes = [[resolve_gradient_mode(gradient, m * w) for m, w in zip(rows, widths)]
                                for rows, widths in zip(self.num_rows, self.widths)]

    @property
    def physical_parameters(self):
        """Trainable floats (the mappings are integers, counted in `mapping_bytes`)."""
        return sum(_parameters(self.num_rows, self.widths))

    @classmethod
    def _parameter_counts(cls, cardinalities, output_dim, mappings=None, num_rows=None, combiner=None, **options):
        _, _, num_rows, _, widths = resolve_tables(output_dim, mappings, cardinalities, num_rows, combiner)
        return _parameters(num_rows, widths), None

    @property
    def mapping_bytes(self):
        return sum(n * len(rows) * smallest_row_dtype(max(rows) - 1).itemsize
                   for n, rows in zip(self.cardinalities, self.num_rows))

    def build(self, input_shape):
        self.check_id_shape(input_shape)
        self.mappings, self.tables = [], []
        for f, (n, rows, widths) in enumerate(zip(self.cardinalities, self.num_rows, self.widths)):
            dtype = smallest_row_dtype(max(rows) - 1)
            feature_maps, feature_tables = [], []
            for k, (m, w) in enumerate(zip(rows, widths)):
                if self._initial_rows is not None:
                    values = self._initial_rows[f][k].astype(dtype, copy=False)
                    initializer = _ConstantArray(values)
                else:
                    initializer = "zeros"  # restored from a config: the saved weights are loaded next
                feature_maps.append(self.add_weight(name=f"mapping_{f}_{k}", shape=(n,), dtype=dtype.name,
                                                    initializer=initializer, trainable=False))
                feature_tables.append(self.add_weight(name=f"table_{f}_{k}", shape=(m, w),
                                                      initializer=fresh_initializer(self.embeddings_initializer)))
            self.mappings.append(feature_maps)
            self.tables.append(feature_tables)
        self._initial_rows = None  # the weights hold them now
        super().build(input_shape)

    def call(self, ids):
        ids = self.prepare_ids(ids)
        columns = []
        for f in range(len(self.cardinalities)):
            parts = []
            for mapping, table, mode in zip(self.mappings[f], self.tables[f], self._gradient_modes[f]):
                rows = tf.cast(tf.gather(resource_variable(mapping), ids[:, f]), tf.int64)
                parts.append(gather_with_gradient(table, rows, mode))
            columns.append(self._combine(parts))
        return tf.stack(columns, axis=1)

    def serving_lookup(self, ids, out_of_range="mod", tables=None):
        """`call` for serving graphs: the mappings as stored, plain gathers of the tables (see
        `base.IdLayer.serving_lookup`)."""
        tables = base.table_reader(tables)
        ids = self.serving_ids(ids, out_of_range)
        columns = []
        for f in range(len(self.cardinalities)):
            parts = [tables.gather(table, tf.cast(tf.gather(resource_variable(mapping), ids[:, f]), tf.int64))
                     for mapping, table in zip(self.mappings[f], self.tables[f])]
            columns.append(self._combine(parts))
        return tf.stack(columns, axis=1)

    def _combine(self, parts):
        """One feature's vectors from its K internal tables: summed, or joined ("concat")."""
        if len(parts) == 1:
            return parts[0]
        return tf.add_n(parts) if self.combiner == "sum" else tf.concat(parts, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(
            mappings=None,  # the arrays are weights (see the class doc); shapes in the base config and below
            num_rows=self.num_rows,
            combiner=self.combiner,
        )
        return config


class _ConstantArray:
    """An initializer that returns one fixed array (the mapping), whatever stack calls it."""

    def __init__(self, values):
        self.values = values

    def __call__(self, shape, dtype=None, **kwargs):
        if tuple(shape) != self.values.shape:
            raise ValueError(f"mapping of shape {self.values.shape} cannot fill a weight of shape {tuple(shape)}")
        return tf.constant(self.values)
