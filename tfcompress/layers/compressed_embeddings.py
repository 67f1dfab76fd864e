"""CompressedEmbeddings: keras-rs `DistributedEmbedding`'s contract (feature configs in, the same structure of
embeddings out), every table compressed, and with ROBE all tables in ONE shared array.

keras-rs (`keras_rs.layers.TableConfig` / `FeatureConfig`) names the contract: several features may read one
table; each table has a width and a combiner. Here each table is one `CompressedEmbedding` (its combiner pools the
features' bags), and the features of one table call the same layer. keras-rs itself is only imported to read a
saved config back (its `FeatureConfig.from_config`); any objects with the same fields work as configs.
"""


import tensorflow as tf

from tfcompress._keras import keras, register_serializable
from tfcompress.layers.compressed_embedding import CompressedEmbedding
from tfcompress.layers.robe_memory import MAX_DEFAULT_CHUNK, RobeMemory
from tfcompress.sizes import BYTES_PER_FLOAT, parse_bytes


def _feature_config_dict(config_dict):
    """True for the dict of one serialized FeatureConfig (a "name" string and a "table"), not a nesting level."""
    return isinstance(config_dict, dict) and isinstance(config_dict.get("name"), str) and "table" in config_dict


def _map_serialized(function, structure):
    """`function` applied to every serialized FeatureConfig of a nested dict/list config, the nesting kept."""
    if _feature_config_dict(structure):
        return function(structure)
    if isinstance(structure, dict):
        return {key: _map_serialized(function, value) for key, value in structure.items()}
    if isinstance(structure, (list, tuple)):
        return type(structure)(_map_serialized(function, value) for value in structure)
    raise ValueError(f"feature_configs config holds {structure!r}, which is no FeatureConfig")


@register_serializable()
class CompressedEmbeddings(keras.layers.Layer):
    """Compressed embedding tables configured by keras-rs `FeatureConfig`s, with `DistributedEmbedding`'s call.

    Example:

    >>> genres = keras_rs.layers.TableConfig("genres", vocabulary_size=50, embedding_dim=16, combiner="mean")
    >>> items = keras_rs.layers.TableConfig("items", vocabulary_size=1_000_000, embedding_dim=16)
    >>> features = {"item": keras_rs.layers.FeatureConfig("item", items, (None,), (None, 16)),
    ...             "history": keras_rs.layers.FeatureConfig("history", items, (None, 20), (None, 16)),
    ...             "genres": keras_rs.layers.FeatureConfig("genres", genres, (None, None), (None, 16))}
    >>> layer = CompressedEmbeddings(features, method="robe", ratio=100)
    >>> out = layer({"item": item_ids, "history": history_ids, "genres": ragged_genre_ids})  # same dict structure

    Args:
        feature_configs: a nested structure (dict, list, tuple) of `keras_rs.layers.FeatureConfig`. Features
            whose `table` is the same `TableConfig` object read one table.
        method: the compression method of every table ("robe", "mlet", "hashing", "qr", "pruned", "full").
        ratio: logical size / stored size (>= 1) of all tables together. Give this or `budget` (not for "full").
        budget: bytes of float32 storage for all tables ("100MB", or an int), or give `ratio`.
        share_memory: "robe" only: all tables in ONE `RobeMemory` (default True); False gives each table its own
            array of the same ratio.
        chunk_size: ROBE-Z chunk Z (default min(32, the narrowest table)).
        seed: ROBE-Z hash seed.
        gradient, out_of_range, options: as in `CompressedEmbedding`, for every table.
        **kwargs: `keras.layers.Layer` arguments.

    What a TableConfig says and what is used: `vocabulary_size`, `embedding_dim`, `combiner` (pools every bag of
    the table's features) and `initializer` (except for a shared memory, whose initializer is the memory's). Its
    `optimizer`, `placement` and `max_*ids_per_partition` are SparseCore settings: not used, the model's optimizer
    trains every table.

    Call: `layer(inputs, weights=None)`, `inputs` of the feature configs' structure, each feature dense [B] or
    [B, L], ragged [B, None] or sparse [B, N] ids (with optional per-id weights of the same structure); returns
    the same structure of float32 [B, D_table] (bags pooled by the table's combiner).
    """

    def __init__(self, feature_configs, method="robe", ratio=None, budget=None, share_memory=True,
                 chunk_size=None, seed=None, gradient="auto", out_of_range="error", options=None, **kwargs):
        super().__init__(**kwargs)
        self._feature_configs = feature_configs
        features = tf.nest.flatten(feature_configs)
        if not features:
            raise ValueError(f"{self.described}: feature_configs is empty")
        for feature in features:
            if not (hasattr(feature, "table") and hasattr(feature.table, "vocabulary_size")):
                raise TypeError(f"{self.described}: feature_configs must hold keras_rs.layers.FeatureConfig "
                                f"objects, got {type(feature).__name__}")
        tables = []  # distinct TableConfigs in the order features first name them
        for feature in features:
            if not any(feature.table is table for table in tables):
                tables.append(feature.table)
        names = [table.name for table in tables]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"{self.described}: table names must be unique, {duplicates[0]!r} names several "
                             "TableConfig objects")
        self.method, self.share_memory = method, bool(share_memory)
        self.ratio = None if ratio is None else float(ratio)
        self.budget = budget
        self.chunk_size, self.seed = chunk_size, seed
        self.gradient, self.out_of_range, self.options = gradient, out_of_range, dict(options or {})
        for table in tables:
            if table.combiner is None:
                raise ValueError(f"{self.described}: table {table.name!r} has combiner=None, but a "
                                 "DistributedEmbedding-style layer returns one dense [batch, dim] embedding per "
                                 "feature, which pools bags and ragged ids with the table's combiner")
        compression = self._compression(tables)
        self.memory = None
        if method == "robe" and self.share_memory:
            chunk = chunk_size if chunk_size is not None else min(MAX_DEFAULT_CHUNK,
                                                                  min(t.embedding_dim for t in tables))
            self.memory = RobeMemory(compression=compression, chunk_size=chunk, seed=seed,
                                     name=f"{self.name}_memory")
        self.table_layers = [self._table_layer(table, compression) for table in tables]
        self._layer_of_feature = [next(layer for layer, table in zip(self.table_layers, tables)
                                       if feature.table is table) for feature in features]

    @property
    def described(self):
        return f"{type(self).__name__} {self.name!r}"

    @property
    def feature_configs(self):
        return self._feature_configs

    def _compression(self, tables):
        """The compression every table gets: `ratio`, or all tables' float32 bytes / `budget`."""
        if self.method == "full":
            if self.ratio not in (None, 1.0) or self.budget is not None:
                raise ValueError(f"{self.described}: method='full' stores every table whole; give neither ratio "
                                 f"nor budget (got ratio={self.ratio!r}, budget={self.budget!r})")
            return None
        if (self.ratio is None) == (self.budget is None):
            raise ValueError(f"{self.described}: give exactly one of ratio= (e.g. 100) or budget= (e.g. '100MB'), "
                             f"got ratio={self.ratio!r}, budget={self.budget!r}")
        if self.ratio is not None:
            return self.ratio
        logical_bytes = sum(t.vocabulary_size * t.embedding_dim for t in tables) * BYTES_PER_FLOAT
        return max(1.0, logical_bytes / parse_bytes(self.budget))

    def _table_layer(self, table, compression):
        arguments = dict(method=self.method, combiner=table.combiner, gradient=self.gradient,
                         out_of_range=self.out_of_range, options=self.options, name=table.name)
        if self.memory is not None:
            arguments["memory"] = self.memory
        else:
            arguments.update(compression=compression, embeddings_initializer=table.initializer)
            if self.method == "robe":
                arguments.update(chunk_size=self.chunk_size, seed=self.seed)
        return CompressedEmbedding(table.vocabulary_size, table.embedding_dim, **arguments)

    @property
    def logical_parameters(self):
        return sum(layer.logical_parameters for layer in self.table_layers)

    @property
    def physical_parameters(self):
        """Floats stored for all tables (the shared memory counted once)."""
        if self.memory is not None:
            return self.memory.size
        return sum(layer.physical_parameters for layer in self.table_layers)

    def build(self, input_shapes=None):
        for layer in self.table_layers:
            if not layer.built:
                layer.build(None)
        super().build(input_shapes)

    def call(self, inputs, weights=None, training=None):
        flat_inputs = self._flatten_like_features(inputs, "inputs")
        flat_weights = ([None] * len(flat_inputs) if weights is None
                        else self._flatten_like_features(weights, "weights"))
        outputs = [layer(ids, weights=w, training=training)
                   for layer, ids, w in zip(self._layer_of_feature, flat_inputs, flat_weights)]
        return tf.nest.pack_sequence_as(self._feature_configs, outputs)

    def _flatten_like_features(self, structure, argument):
        try:
            tf.nest.assert_same_structure(self._feature_configs, structure, check_types=False)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{self.described}: {argument} must have the structure of feature_configs: "
                             f"{error}") from None
        return tf.nest.flatten(structure)

    def serving_lookup(self, inputs, out_of_range="mod", weights=None, tables=None):
        """`call` in stock TensorFlow ops (each table's `CompressedEmbedding.serving_lookup`)."""
        flat_inputs = self._flatten_like_features(inputs, "inputs")
        flat_weights = ([None] * len(flat_inputs) if weights is None
                        else self._flatten_like_features(weights, "weights"))
        outputs = [layer.serving_lookup(ids, out_of_range=out_of_range, weights=w, tables=tables)
                   for layer, ids, w in zip(self._layer_of_feature, flat_inputs, flat_weights)]
        return tf.nest.pack_sequence_as(self._feature_configs, outputs)

    def compute_output_shape(self, input_shapes):
        flat = [(None, feature.table.embedding_dim) for feature in tf.nest.flatten(self._feature_configs)]
        return tf.nest.pack_sequence_as(self._feature_configs, flat)

    def get_config(self):
        # As DistributedEmbedding does: tables once in a list, each feature naming its table by index, so features
        # that share a table share it again after from_config.
        tables, index_of = [], {}

        def serialize(feature):
            config = feature.get_config()
            if id(feature.table) not in index_of:
                index_of[id(feature.table)] = len(tables)
                tables.append(config["table"])
            config["table"] = index_of[id(feature.table)]
            return config

        config = super().get_config()
        config.update(
            feature_configs=tf.nest.map_structure(serialize, self._feature_configs),
            tables=tables,
            method=self.method,
            ratio=self.ratio,
            budget=self.budget,
            share_memory=self.share_memory,
            chunk_size=self.chunk_size,
            seed=self.seed,
            gradient=self.gradient,
            out_of_range=self.out_of_range,
            options=self.options,
        )
        return config

    @classmethod
    def from_config(cls, config):
        # keras-rs is needed only here, to rebuild its config objects (it is a Keras 3 extra, see setup.cfg).
        import keras_rs

        config = dict(config)
        table_dicts = config.pop("tables")
        tables = [keras_rs.layers.TableConfig.from_config(table) for table in table_dicts]

        def deserialize(feature_dict):
            feature = keras_rs.layers.FeatureConfig.from_config({**feature_dict, "table": table_dicts[0]})
            feature.table = tables[feature_dict["table"]]
            feature.input_shape, feature.output_shape = tuple(feature.input_shape), tuple(feature.output_shape)
            return feature

        config["feature_configs"] = _map_serialized(deserialize, config["feature_configs"])
        return cls(**config)
