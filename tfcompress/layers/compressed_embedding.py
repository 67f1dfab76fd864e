"""CompressedEmbedding: a drop-in for `keras.layers.Embedding` whose one table is compressed by any method.

The lookup itself is not written here: the layer holds one inner single-feature layer of the chosen method
(`RobeEmbedding`, `HashingTrickEmbedding`, ... with `cardinalities=[input_dim]`) and reshapes ids of any shape to
the inner layer's `[N, 1]` and back, so every method's math, fused op and serving lookup are reused as they are.
Bags (ragged or sparse ids with a `combiner`) are pooled by `tfcompress.layers.bag.bag_lookup`, or in training
with method "robe" by the fused bag op (`RobeEmbedding.fused_bag_lookup`) when the inner layer runs its fused op.
"""

import tensorflow as tf

from tfcompress._keras import keras, register_serializable
from tfcompress.layers import bag, base
from tfcompress.layers.chunk_pruned import ChunkPrunedEmbedding
from tfcompress.layers.full import FullEmbedding
from tfcompress.layers.hashing_trick import HashingTrickEmbedding
from tfcompress.layers.mlet import MLETEmbedding
from tfcompress.layers.qr import QREmbedding
from tfcompress.layers.robe import RobeEmbedding
from tfcompress.layers.robe_memory import RobeMemory

METHODS = {
    "robe": RobeEmbedding,
    "mlet": MLETEmbedding,
    "hashing": HashingTrickEmbedding,
    "qr": QREmbedding,
    "pruned": ChunkPrunedEmbedding,
    "full": FullEmbedding,
}
# The methods whose size is set by `compression` and that cannot be made without it (or a RobeMemory).
NEEDS_COMPRESSION = ("hashing", "qr")


@register_serializable()
class CompressedEmbedding(keras.layers.Layer):
    """`keras.layers.Embedding(input_dim, output_dim)` with a compressed table: the same call contract.

    Example:

    >>> layer = CompressedEmbedding(100_000, 16, method="robe", compression=100.0, mask_zero=True)
    >>> layer(tf.constant([[3, 0], [99_999, 7]])).shape          # any id shape -> shape + [16]
    TensorShape([2, 2, 16])
    >>> bags = tf.ragged.constant([[3, 7, 9], [], [5]])
    >>> CompressedEmbedding(1000, 8, method="full", combiner="mean")(bags).shape
    TensorShape([3, 8])

    Args:
        input_dim: rows of the logical table (ids lie in [0, input_dim)).
        output_dim: embedding width D.
        method: "robe", "mlet", "hashing", "qr", "pruned" or "full" (the inner layer: `RobeEmbedding`,
            `MLETEmbedding`, `HashingTrickEmbedding`, `QREmbedding`, `ChunkPrunedEmbedding`, `FullEmbedding`).
        compression: logical size / stored size (>= 1). Required for "hashing" and "qr" and for "robe" without a
            `memory`; for "mlet" it hashes the tables first (optional); for "pruned" the pool budget is
            1 / compression of the chunks (default: the layer's own budget). "full" takes none (or 1).
        memory: a `RobeMemory` (method "robe" only): the table is stored in that one shared array, at its own
            table offset, together with every other layer given the same memory.
        mask_zero: as in `keras.layers.Embedding`: `compute_mask` returns `ids != 0` (dense ids only). Id 0 is
            still a row of the table.
        combiner: None, or "sum", "mean" or "sqrtn": each row of ids is then one bag pooled into one embedding
            (the `tf.nn.safe_embedding_lookup_sparse` contract, `bag.bag_lookup`): ragged [B, None] or sparse
            [B, N] ids -> [B, D]; dense ids [..., L] -> [..., D] (as `keras_rs.layers.EmbedReduce`; [B] -> [B, D]).
            Without a combiner a ragged input gives a ragged output and a sparse input is refused.
        chunk_size: ROBE-Z chunk Z ("robe" only; default min(D, 32), or the memory's).
        seed: ROBE-Z hash seed ("robe" only; default `robe_hash.DEFAULT_SEED`, or the memory's).
        embeddings_initializer: initializer of the stored tables (default: the inner layer's default; for a
            shared memory the memory's initializer decides and this must stay None).
        gradient: "sparse", "dense" or "auto" (see docs/layers.md).
        out_of_range: "error" (default: an id outside [0, input_dim) raises naming the layer and the value) or
            "mod" (ids are folded into range). Ids < 0 inside bags are pruned before this rule, as
            safe_embedding_lookup_sparse prunes them.
        table_offset: "robe" with a memory only: where this table starts in the memory's id space (default: after
            the tables registered before it). Saved in the config so a reloaded model reads the same rows.
        options: other arguments of the inner layer by name, e.g. {"inner_dim": 32} (mlet), {"operation": "add"}
            (qr), {"num_chunks": 4} (pruned), {"signed": True} (robe without a memory).
        **kwargs: `keras.layers.Layer` arguments (name, trainable, dtype).

    Input: integer ids of any shape [...] -> float32 [..., D]; with a combiner, ragged [B, None], sparse [B, N] or
    dense [..., L] ids (and optional per-id `weights` of the same structure) -> [B, D] / [..., D].
    """

    def __init__(self, input_dim, output_dim, method="robe", compression=None, memory=None, mask_zero=False,
                 combiner=None, chunk_size=None, seed=None, embeddings_initializer=None, gradient="auto",
                 out_of_range="error", table_offset=None, options=None, **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"{self.described}: method must be one of {sorted(METHODS)}, got {method!r}")
        for argument, value in (("input_dim", input_dim), ("output_dim", output_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
                raise ValueError(f"{self.described}: {argument} must be an integer >= 1, got {value!r}")
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.method = method
        self.compression = None if compression is None else float(compression)
        self.mask_zero = bool(mask_zero)
        self.combiner = bag.check_combiner(combiner, self.described)
        self.options = dict(options or {})
        if isinstance(memory, dict):  # a serialized RobeMemory, as from_config passes it
            memory = keras.saving.deserialize_keras_object(memory)
        if memory is not None and not isinstance(memory, RobeMemory):
            raise TypeError(f"{self.described}: memory must be a tfcompress.layers.RobeMemory, got "
                            f"{type(memory).__name__}")
        if memory is not None and method != "robe":
            raise ValueError(f"{self.described}: memory= is a shared ROBE array, so it needs method='robe', got "
                             f"method={method!r}")
        for argument, value in (("chunk_size", chunk_size), ("seed", seed), ("table_offset", table_offset)):
            if value is not None and method != "robe":
                raise ValueError(f"{self.described}: {argument}={value!r} applies to method='robe' only, got "
                                 f"method={method!r}")
        self.inner = self._make_inner(memory, chunk_size, seed, embeddings_initializer, gradient, out_of_range,
                                      table_offset)
        self.supports_masking = self.mask_zero

    @property
    def described(self):
        """How errors name this layer: its class and name."""
        return f"{type(self).__name__} {self.name!r}"

    def _make_inner(self, memory, chunk_size, seed, embeddings_initializer, gradient, out_of_range, table_offset):
        """The single-feature layer of `self.method` that stores this table (cardinalities=[input_dim])."""
        method, compression = self.method, self.compression
        # What this layer sets itself may not come in again through options (it would be a duplicate argument).
        own = {"cardinalities", "output_dim", "name", "gradient", "out_of_range", "embeddings_initializer",
               "compression", "memory_size", "num_buckets", "budget", "memory", "table_offset", "chunk_size", "seed"}
        clashing = sorted(own & set(self.options))
        if clashing:
            raise ValueError(f"{self.described}: options may not set {clashing[0]!r}; it is an argument of "
                             f"CompressedEmbedding itself (or derived from compression=)")
        base.check_option_names(METHODS[method], self.options)
        arguments = dict(gradient=gradient, out_of_range=out_of_range, **self.options)
        if embeddings_initializer is not None:
            arguments["embeddings_initializer"] = embeddings_initializer
        if method == "full":
            if compression not in (None, 1.0):
                raise ValueError(f"{self.described}: method='full' stores the whole table, so compression must be "
                                 f"None or 1, got {compression!r}")
        elif method in NEEDS_COMPRESSION:
            if compression is None:
                raise ValueError(f"{self.described}: method={method!r} needs compression= (logical size / stored "
                                 "size, >= 1)")
            arguments["compression"] = compression
        elif method == "mlet":
            arguments.setdefault("inner_dim", self.output_dim)
            if compression is not None:
                arguments["compression"] = compression
        elif method == "pruned":
            if compression is not None:
                if not compression >= 1.0:
                    raise ValueError(f"{self.described}: compression must be >= 1, got {compression!r}")
                arguments["budget"] = 1.0 / compression
        else:  # robe
            arguments.update(chunk_size=chunk_size, seed=seed)
            if memory is not None:
                if compression is not None:
                    raise ValueError(f"{self.described}: give compression= or memory=, not both (the memory's size "
                                     "is set where the RobeMemory is made)")
                if embeddings_initializer is not None:
                    raise ValueError(f"{self.described}: a shared memory is initialized by its RobeMemory "
                                     "(embeddings_initializer= there); leave embeddings_initializer unset here")
                arguments.update(memory=memory, table_offset=table_offset)
            elif compression is None:
                raise ValueError(f"{self.described}: method='robe' needs compression= (logical size / |M|, >= 1) "
                                 "or memory= (a shared RobeMemory)")
            else:
                arguments["compression"] = compression
        return METHODS[method](cardinalities=[self.input_dim], output_dim=self.output_dim,
                               name=f"{self.name}_{method}", **arguments)

    @property
    def memory(self):
        """The shared `RobeMemory` of a "robe" layer made with `memory=`, else None."""
        return getattr(self.inner, "shared_memory", None)

    @property
    def logical_parameters(self):
        return self.input_dim * self.output_dim

    @property
    def physical_parameters(self):
        """Floats this layer stores; for a shared memory, the whole memory (shared with the other layers)."""
        return self.inner.physical_parameters

    def build(self, input_shape=None):
        # Built here, not on first call, so a loaded model has every weight before its values are read.
        if not self.inner.built:
            self.inner.build((None, 1))
        super().build(input_shape)

    # ---- training lookup --------------------------------------------------------------------------------------

    def call(self, ids, weights=None, training=None):
        return self._lookup(ids, weights, lambda flat: self._lookup_flat(flat, training), fused_bags=True)

    def _lookup(self, ids, weights, lookup_flat, fused_bags=False):
        """`call`'s contract for every input kind, with `lookup_flat` ([N] ids -> [N, D]) doing the lookups and
        bags pooled by the fused bag op where `fused_bags` allows it (`_pool_bags`)."""
        if isinstance(ids, (tf.RaggedTensor, tf.SparseTensor)):
            return self._lookup_composite(ids, weights, lookup_flat, fused_bags)
        ids = self.check_ids(ids)
        if self.combiner is not None:
            return self._lookup_dense_bags(ids, weights, lookup_flat, fused_bags)
        if weights is not None:
            raise ValueError(f"{self.described}: weights= apply to bags (a layer with a combiner), and this layer "
                             "was made with combiner=None")
        return self._lookup_dense(ids, lookup_flat)

    def _lookup_flat(self, flat_ids, training=None):
        """Embeddings [N, D] of ids [N]: the inner layer on a one-column [N, 1] id matrix."""
        column = tf.reshape(flat_ids, [-1, 1])
        if isinstance(self.inner, ChunkPrunedEmbedding):  # the only method whose training step differs
            values = self.inner(column, training=training)
        else:
            values = self.inner(column)
        return tf.reshape(values, [-1, self.output_dim])

    def check_ids(self, ids):
        """`ids` as a tensor; TypeError naming the layer for a non-integer dtype (floats would truncate)."""
        ids = tf.convert_to_tensor(ids) if not isinstance(ids, (tf.RaggedTensor, tf.SparseTensor)) else ids
        if not ids.dtype.is_integer:
            raise TypeError(f"{self.described}: ids must be integers, got {ids.dtype.name}; float ids would be "
                            "truncated silently (cast them yourself once you know they are whole numbers)")
        return ids

    def _lookup_dense(self, ids, lookup_flat):
        """Ids of any shape [...] -> [..., D] through `lookup_flat` ([N] -> [N, D])."""
        values = lookup_flat(tf.reshape(ids, [-1]))
        out = tf.reshape(values, tf.concat([tf.shape(ids), [self.output_dim]], axis=0))
        out.set_shape(ids.shape.concatenate([self.output_dim]))
        return out

    def uses_fused_bag_op(self):
        """Whether `call` pools bags with the fused ROBE bag op: method "robe", and the inner `RobeEmbedding` runs
        its fused op (its `use_custom_op`, the library loaded, `TFCOMPRESS_CUSTOM_OPS` not 0)."""
        return isinstance(self.inner, RobeEmbedding) and self.inner.uses_fused_op

    def _pool_bags(self, lookup_flat, values, row_splits, weights, fused_bags=False):
        """The one place bags are pooled (ragged, sparse and dense bags alike).

        Training (`fused_bags`, from `call`) with `uses_fused_bag_op()`: the pruned bags (`bag.prune_bags`, the
        safe_embedding_lookup_sparse rule) go to `RobeEmbedding.fused_bag_lookup`, one kernel for the hashed
        gather and the per-row pooling. Otherwise, and always in `serving_lookup` (stock ops only), the
        composite `bag.bag_lookup` over `lookup_flat`. Both sum each row in id order and divide last."""
        if fused_bags and self.uses_fused_bag_op():
            values, row_splits, weights = bag.prune_bags(values, row_splits, weights, self.combiner)
            return self.inner.fused_bag_lookup(values, row_splits, weights, self.combiner)
        return bag.bag_lookup(lookup_flat, values, row_splits, weights, self.combiner)

    def _lookup_dense_bags(self, ids, weights, lookup_flat, fused_bags=False):
        """Dense ids [..., L] with a combiner: each last-axis row is one bag -> [..., D], as
        `keras_rs.layers.EmbedReduce` pools; ids [B] are bags of one id -> [B, D]."""
        if ids.shape.rank == 0:
            raise ValueError(f"{self.described}: a layer with a combiner pools rows of ids; got a scalar id")
        if ids.shape.rank == 1:
            ids = ids[:, None]
            weights = None if weights is None else tf.reshape(weights, [-1, 1])
        bags = tf.RaggedTensor.from_tensor(tf.reshape(ids, [-1, tf.shape(ids)[-1]]))
        weight_values = None
        if weights is not None:
            weights = tf.convert_to_tensor(weights)
            tf.debugging.assert_equal(tf.shape(weights), tf.shape(ids),
                                      message=f"{self.described}: weights must have the shape of the ids")
            weight_values = tf.reshape(weights, [-1])
        pooled = self._pool_bags(lookup_flat, bags.values, bags.row_splits, weight_values, fused_bags)
        out = tf.reshape(pooled, tf.concat([tf.shape(ids)[:-1], [self.output_dim]], axis=0))
        out.set_shape(ids.shape[:-1].concatenate([self.output_dim]))
        return out

    def _lookup_composite(self, ids, weights, lookup_flat, fused_bags=False):
        """Ragged or sparse ids: pooled bags with a combiner, a ragged passthrough without one."""
        ids = self.check_ids(ids)
        if self.combiner is None:
            if isinstance(ids, tf.SparseTensor):
                raise ValueError(f"{self.described}: sparse ids need a combiner ('sum', 'mean' or 'sqrtn') to pool "
                                 "each row; this layer was made with combiner=None")
            if weights is not None:
                raise ValueError(f"{self.described}: weights= need a combiner; this layer was made with "
                                 "combiner=None (a ragged input then gives a ragged output)")
            return tf.ragged.map_flat_values(lambda flat: self._lookup_dense(flat, lookup_flat), ids)
        values, row_splits, weight_values = bag.as_ragged_bags(ids, weights, self.described)
        return self._pool_bags(lookup_flat, values, row_splits, weight_values, fused_bags)

    def compute_mask(self, inputs, mask=None):
        # Pooled bags have no per-id axis left to mask; ragged and sparse inputs carry their own lengths.
        if not self.mask_zero or self.combiner is not None or isinstance(inputs, (tf.RaggedTensor, tf.SparseTensor)):
            return None
        if hasattr(keras, "ops"):  # Keras 3 builds functional models on KerasTensors, which only keras.ops take
            return keras.ops.not_equal(inputs, 0)
        return tf.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        if self.combiner is not None:  # the last axis is pooled (a rank-1 input is bags of one id)
            return (shape[:-1] if len(shape) > 1 else shape) + (self.output_dim,)
        return shape + (self.output_dim,)

    def compute_output_spec(self, ids, weights=None, training=None):
        """Keras 3's symbolic output, without tracing `call`: the shape of `compute_output_shape`, ragged exactly
        when a ragged input passes through without a combiner (Keras would otherwise mark it dense, and a
        dense-only layer after it would fail on the RaggedTensor at run time with an unrelated message)."""
        if self.combiner is None and getattr(ids, "sparse", False):
            raise ValueError(f"{self.described}: sparse ids need a combiner ('sum', 'mean' or 'sqrtn') to pool "
                             "each row; this layer was made with combiner=None")
        if not ids.dtype or not tf.as_dtype(ids.dtype).is_integer:
            raise TypeError(f"{self.described}: ids must be integers, got {ids.dtype}")
        ragged = bool(getattr(ids, "ragged", False)) and self.combiner is None
        return keras.KerasTensor(self.compute_output_shape(ids.shape), dtype="float32", ragged=ragged)

    # ---- serving lookup ---------------------------------------------------------------------------------------

    def serving_lookup(self, ids, out_of_range="mod", weights=None, tables=None):
        """What `call(ids, weights)` returns, in stock TensorFlow ops only (see `base.IdLayer.serving_lookup`).

        Dense ids of any shape, ragged ids (pooled with the combiner, or ragged out without one) and sparse ids
        with a combiner, as in `call`; the inner layer's `serving_lookup` does the lookups.

        Args:
            ids: integer ids as `call` takes them.
            out_of_range: the serving id rule, "mod", "error" or "as_trained" (see `base.serving_rule`).
            weights: per-id weights of a bag input, as in `call`.
            tables: a `tfcompress.lookup.TableReader` (default: the stored variables).
        """
        def lookup_flat(flat_ids):
            column = tf.reshape(flat_ids, [-1, 1])
            values = self.inner.serving_lookup(column, out_of_range=out_of_range, tables=tables)
            return tf.reshape(values, [-1, self.output_dim])

        return self._lookup(ids, weights, lookup_flat)

    # ---- config -----------------------------------------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        inner = self.inner.get_config()
        config.update(
            input_dim=self.input_dim,
            output_dim=self.output_dim,
            method=self.method,
            compression=self.compression,
            mask_zero=self.mask_zero,
            combiner=self.combiner,
            chunk_size=inner.get("chunk_size"),
            seed=inner.get("seed"),
            embeddings_initializer=inner["embeddings_initializer"] if self.memory is None else None,
            gradient=inner["gradient"],
            out_of_range=inner["out_of_range"],
            table_offset=None,
            options=self.options,
            memory=None,
        )
        if self.memory is not None:
            config.update(memory=keras.saving.serialize_keras_object(self.memory),
                          table_offset=self.inner.table_offset, chunk_size=None, seed=None)
        return config
