"""Chunk-pruned embeddings (FIITED): every row is K chunks, only the useful chunks own storage.

Storage (the paper's VHPI design), all Keras weights so it checkpoints and saves with the model:

- `pool` [capacity, d/K] float32, trainable: the physical chunks, sized at the budget (never the full table);
- `addresses` [R*K] int32: pool address of chunk k of global row r at r*K + k, -1 = pruned (reads as zeros);
- `owners` [capacity] int64: the inverse map (chunk key of each address, -1 = free), so eviction touches only
  the pool's size, not the table's;
- `free_stack` [capacity] int32 + `free_top` int32: the free addresses are free_stack[:free_top]; eviction pushes,
  allocation pops from the top (LIFO);
- `utilities` [R*K] float32 + `utility_scale` float32: per-chunk utility u <- gamma*u + a*||g||_2, stored scaled
  (see `_record_utilities`) so one step costs O(batch), not O(table).

The decisions (which chunks live) are made by `tfcompress.chunk_pruning` (ChunkPruningCallback), outside the training
step; the layer only reads through the address table and records utilities from its output gradient.
"""

import math

import numpy as np
import tensorflow as tf

from tfcompress import robe_hash
from tfcompress._keras import USING_LEGACY_KERAS, fresh_initializer, keras, register_serializable
from tfcompress.layers import base
from tfcompress.lookup import gather_with_gradient, resolve_gradient_mode, resource_variable
from tfcompress.sizes import BYTES_PER_FLOAT, parse_bytes

UTILITY_KINDS = ("gradient", "frequency")
# Utilities are stored multiplied by gamma^-(steps since the last rescale); past this factor the whole array is
# rescaled once (float32 overflows near 3e38, and contributions are multiplied by the factor).
_MAX_UTILITY_SCALE = 1e20


def _replica_local_weight(layer, name, shape, initializer):
    """A non-trainable float32 weight that each replica of a tf.distribute strategy updates locally.

    Written inside the training step (the gradient function) with values that are identical on every replica
    (all-reduced first), so no synchronization is needed there: ON_READ variables update the replica's own copy
    without the merge_call a mirrored variable makes (which TensorFlow forbids inside control flow, as in the
    rescale's tf.cond). ONLY_FIRST_REPLICA: a cross-replica read (the callback, a checkpoint) returns replica 0's
    copy, and a cross-replica assignment writes every copy.
    """
    initializer = keras.initializers.get(initializer)
    if USING_LEGACY_KERAS:
        return layer.add_weight(name=name, shape=shape, dtype="float32", initializer=initializer, trainable=False,
                                synchronization=tf.VariableSynchronization.ON_READ,
                                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    with keras.name_scope(layer.name, caller=layer):
        variable = keras.Variable(initializer=initializer, shape=shape, dtype="float32", trainable=False,
                                  aggregation="only_first_replica", synchronization="on_read", name=name)
    layer._track_variable(variable)  # what add_weight does (its signature has no `synchronization`)
    return variable


def pool_shape(num_rows, output_dim, num_chunks, budget):
    """(K, chunk width d/K, pool capacity in chunks) for `num_rows` rows of width `output_dim`, checked.

    `budget` is a fraction in (0, 1] of all R*K chunks, or a byte size ("64MB", a count > 1) of the float32 pool.
    """
    if int(num_chunks) != num_chunks or not 1 <= num_chunks <= output_dim or output_dim % num_chunks:
        raise ValueError(f"num_chunks must be a divisor of output_dim={output_dim} in [1, {output_dim}], "
                         f"got {num_chunks!r}")
    num_chunks = int(num_chunks)
    chunk_width = output_dim // num_chunks
    total_chunks = num_rows * num_chunks
    if isinstance(budget, (int, float)) and not isinstance(budget, bool) and 0 < budget <= 1:
        capacity = math.floor(budget * total_chunks)
    else:
        try:
            capacity = parse_bytes(budget) // (BYTES_PER_FLOAT * chunk_width)
        except ValueError:
            raise ValueError(f"budget must be a fraction in (0, 1] of the full table's chunks or a byte size "
                             f"such as '64MB', got {budget!r}") from None
    if capacity < 1:
        raise ValueError(f"budget {budget!r} leaves no room for one chunk of {chunk_width} floats")
    return num_chunks, chunk_width, min(capacity, total_chunks)


@register_serializable()
class ChunkPrunedEmbedding(base.IdEmbeddingLayer):
    """F tables of rows split into K chunks of d/K; pruned chunks read as zeros and own no storage.

    Live chunks sit in a pool of `capacity` chunks (the budget); which chunks are live is decided every T training
    steps by `tfcompress.ChunkPruningCallback` from per-chunk utilities that this layer records in every training
    step. Before the first pruning step every chunk is pruned (all rows read as zeros); the pool then fills with
    the chunks of highest utility. K = 1 is whole-row pruning (AdaEmbed).

    Example:

    >>> layer = ChunkPrunedEmbedding(cardinalities=[1000, 50], output_dim=8, num_chunks=2, budget=0.1)
    >>> layer(tf.constant([[3, 7], [999, 0]])).shape
    TensorShape([2, 2, 8])

    Args:
        cardinalities: rows of each of the F tables.
        output_dim: d, the embedding width (always the output width, pruned or not).
        num_chunks: K in [1, d], a divisor of d.
        budget: live chunks allowed: a fraction in (0, 1] of the full table's chunks (0.1 = 10x smaller pool), or
            a byte string such as "64MB" / a byte count for the float32 pool.
        utility: "gradient" (u <- decay*u + a*||g||_2, a = accesses of the row in the step, g the chunk's output
            gradient summed over those accesses) or "frequency" (u <- decay*u + a).
        decay: gamma in (0, 1], the utility's per-step decay.
        gradient: gradient of the pool, "sparse", "dense" or "auto" (see `tfcompress.lookup`).
        out_of_range: "error" or "mod" (see `RobeEmbedding`); ignored with `hash_ids`.
        hash_ids: ids are raw and unbounded (any int64): id x of feature f reads entry `hash_entry(x, n_f)` of an
            entry table of n_f = cardinalities[f] entries (a universal hash; colliding ids share an entry and its
            chunks). Without it ids must lie in [0, n_f).
        embeddings_initializer: initializer of (re)allocated chunks.

    Input shape: integer [batch, F]. Output shape: float32 [batch, F, output_dim].
    """

    def __init__(self, cardinalities, output_dim, num_chunks=1, budget=0.1, utility="gradient", decay=0.99,
                 gradient="auto", out_of_range="error", embeddings_initializer="uniform", hash_ids=False, **kwargs):
        super().__init__(cardinalities, output_dim, gradient=gradient, out_of_range=out_of_range,
                         embeddings_initializer=embeddings_initializer, **kwargs)
        self.num_rows = sum(self.cardinalities)
        self.num_chunks, self.chunk_width, self.capacity = pool_shape(self.num_rows, self.output_dim, num_chunks,
                                                                      budget)
        self.budget = budget
        if utility not in UTILITY_KINDS:
            raise ValueError(f"utility must be one of {UTILITY_KINDS}, got {utility!r}")
        self.utility = utility
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        self.decay = float(decay)
        self._gradient_mode = resolve_gradient_mode(gradient, self.capacity * self.chunk_width)
        self.hash_ids = bool(hash_ids)
        self._offsets = robe_hash.table_offsets(self.cardinalities)

    @property
    def physical_parameters(self):
        """Floats of the chunk pool (the budget); the int metadata is `metadata_bytes`."""
        return self.capacity * self.chunk_width

    @classmethod
    def _parameter_counts(cls, cardinalities, output_dim, num_chunks=1, budget=0.1, **options):
        _, chunk_width, capacity = pool_shape(sum(cardinalities), output_dim, num_chunks, budget)
        return capacity * chunk_width, None  # one pool for all features

    @property
    def metadata_bytes(self):
        """Bytes of the bookkeeping: address table and utilities (R*K each, 4 bytes), owners and free stack."""
        return self.num_rows * self.num_chunks * 8 + self.capacity * 12 + 12

    def build(self, input_shape):
        self.check_id_shape(input_shape)
        total, capacity = self.num_rows * self.num_chunks, self.capacity

        def state(name, shape, dtype, initializer):
            # Changed only outside the training step (the callback, in cross-replica context): mirrored as is.
            return self.add_weight(name=name, shape=shape, dtype=dtype, initializer=initializer, trainable=False)

        self.pool = self.add_weight(name="pool", shape=(capacity, self.chunk_width),
                                    initializer=fresh_initializer(self.embeddings_initializer))
        self.addresses = state("addresses", (total,), "int32", keras.initializers.Constant(-1))
        self.owners = state("owners", (capacity,), "int64", keras.initializers.Constant(-1))
        # Initially every address is free; reversed so that the first pops hand out 0, 1, 2, ...
        self.free_stack = state("free_stack", (capacity,), "int32",
                                lambda shape, dtype=None: tf.range(capacity - 1, -1, -1, dtype=tf.int32))
        self.free_top = state("free_top", (), "int32", keras.initializers.Constant(capacity))
        self.utilities = _replica_local_weight(self, "utilities", (total,), "zeros")
        self.utility_scale = _replica_local_weight(self, "utility_scale", (), "ones")
        super().build(input_shape)

    def call(self, ids, training=None):
        if self.hash_ids:
            ids = hash_entry_tf(self.check_ids(ids), self.cardinalities)
        else:
            ids = self.prepare_ids(ids)
        rows = ids + tf.constant(self._offsets)
        keys = rows[..., None] * self.num_chunks + tf.range(self.num_chunks, dtype=tf.int64)
        flat_addresses = tf.reshape(tf.gather(resource_variable(self.addresses), keys), [-1])
        live = tf.where(flat_addresses >= 0)  # [L, 1]
        # Only live chunks are gathered, so the pool's gradient holds live addresses only.
        live_values = gather_with_gradient(self.pool, tf.gather_nd(flat_addresses, live), self._gradient_mode)
        chunks = tf.scatter_nd(live, live_values, tf.stack([tf.size(flat_addresses, tf.int64),
                                                            tf.constant(self.chunk_width, tf.int64)]))
        values = tf.reshape(chunks, [-1, self.output_dim])  # one row of K chunks per lookup
        if training is not False:
            values = self._record_utilities(values, tf.reshape(rows, [-1]))
        return tf.reshape(values, tf.concat([tf.shape(ids), [self.output_dim]], axis=0))

    def serving_lookup(self, ids, out_of_range="mod", tables=None):
        """`call(ids, training=False)` for serving graphs: the address table as stored, a plain gather of the live
        chunks of the pool, no utilities (see `base.IdLayer.serving_lookup`; with `hash_ids` every id is hashed into
        range and `out_of_range` does not apply, as in `call`)."""
        tables = base.table_reader(tables)
        ids = (hash_entry_tf(self.check_ids(ids), self.cardinalities) if self.hash_ids
               else self.serving_ids(ids, out_of_range))
        rows = ids + tf.constant(self._offsets)
        keys = rows[..., None] * self.num_chunks + tf.range(self.num_chunks, dtype=tf.int64)
        flat_addresses = tf.reshape(tf.gather(resource_variable(self.addresses), keys), [-1])
        live = tf.where(flat_addresses >= 0)  # [L, 1]
        live_values = tables.gather(self.pool, tf.gather_nd(flat_addresses, live))
        chunks = tf.scatter_nd(live, live_values, tf.stack([tf.size(flat_addresses, tf.int64),
                                                            tf.constant(self.chunk_width, tf.int64)]))
        return tf.reshape(chunks, tf.concat([tf.shape(ids), [self.output_dim]], axis=0))

    def _record_utilities(self, values, rows):
        """Identity on values [N, d]; its gradient function adds this step's utility of every accessed chunk.

        Why here: the output gradient exists for pruned chunks too (their value is a constant zero, the loss still
        depends on it), which is what regrowth needs; the pool's gradient would only cover live chunks. Assignments
        in a gradient function run under tf.function / model.fit (automatic control dependencies keep stateful
        ops). Under a tf.distribute strategy the per-row gradient sums and counts are all-reduced first, so every
        replica adds the same values (the global batch's a*||g||).
        """

        @tf.custom_gradient
        def record(values):
            def grad(upstream):
                self.update_utilities(rows, upstream)
                return upstream

            return tf.identity(values), grad

        return record(values)

    def update_utilities(self, rows, row_gradients):
        """u <- decay*u + a*||g|| (or + a) for the chunks of global `rows` [N] with per-access gradients [N, d].

        Coalesced per row (not per chunk: K times fewer keys to sort); all K chunks of a row share its access count.
        """
        unique_rows, position = tf.unique(rows)
        summed = tf.math.unsorted_segment_sum(
            tf.concat([tf.cast(row_gradients, tf.float32), tf.ones_like(row_gradients[:, :1], tf.float32)], 1),
            position, tf.size(unique_rows))
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            gathered = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.IndexedSlices(summed, unique_rows))
            unique_rows, position = tf.unique(gathered.indices)
            summed = tf.math.unsorted_segment_sum(gathered.values, position, tf.size(unique_rows))
        accesses = summed[:, -1:]  # [U, 1]
        contribution = tf.tile(accesses, [1, self.num_chunks])  # [U, K]
        if self.utility == "gradient":
            chunk_sums = tf.reshape(summed[:, :-1], [-1, self.num_chunks, self.chunk_width])
            contribution = accesses * tf.norm(chunk_sums, axis=2)
        keys = tf.reshape(unique_rows[:, None] * self.num_chunks + tf.range(self.num_chunks, dtype=tf.int64), [-1])
        contribution = tf.reshape(contribution, [-1])
        # The replica's own copies (a plain variable's handle outside a strategy); ON_READ distributed variables
        # offer no scatter_add, so the update is written with the resource ops on the local handle.
        scale_handle = resource_variable(self.utility_scale).handle
        utilities_handle = resource_variable(self.utilities).handle
        scale = tf.raw_ops.ReadVariableOp(resource=scale_handle, dtype=tf.float32) / self.decay

        def rescaled():
            # Bring the stored values back to true utilities (a whole-table pass, about once per
            # log(1e20) / log(1 / decay) steps).
            stored = tf.raw_ops.ReadVariableOp(resource=utilities_handle, dtype=tf.float32)
            with tf.control_dependencies([tf.raw_ops.AssignVariableOp(resource=utilities_handle,
                                                                      value=stored / scale)]):
                return tf.constant(1.0, tf.float32)

        scale = tf.cond(scale > _MAX_UTILITY_SCALE, rescaled, lambda: scale)
        with tf.control_dependencies([tf.raw_ops.AssignVariableOp(resource=scale_handle, value=scale)]):
            return tf.raw_ops.ResourceScatterAdd(resource=utilities_handle, indices=keys,
                                                 updates=contribution * scale)

    def true_utilities(self, keys=None):
        """u (unscaled) of the chunk keys (int64 tensor), or of every chunk: float32."""
        stored = tf.convert_to_tensor(self.utilities) if keys is None else tf.gather(
            resource_variable(self.utilities), keys)
        return stored / tf.convert_to_tensor(self.utility_scale)

    def live_chunk_count(self):
        return int(self.capacity - int(tf.convert_to_tensor(self.free_top)))

    def get_config(self):
        config = super().get_config()
        config.update(
            num_chunks=self.num_chunks,
            budget=self.budget,
            utility=self.utility,
            decay=self.decay,
            hash_ids=self.hash_ids,
        )
        return config


def hash_entry_tf(ids, cardinalities, seed=robe_hash.DEFAULT_SEED):
    """Entry of raw int64 ids [B, F] in tables of `cardinalities` entries: int64 in [0, n_f), stock ops only.

    The 64-bit id is split into its high (floor x / 2^32) and low (x mod 2^32) words and hashed as a polynomial
    modulo the prime P of docs/robe_z.md with its constants R1, R2, R3:
    h = (((hi mod P) * R3 mod P + lo mod P) * R2 + R1) mod P, then h mod n_f. Every intermediate stays below
    2P * P + P < 2^63, so int64 arithmetic is exact (no wrap-around; the same in NumPy and ONNX).
    """
    prime = robe_hash.P
    r1, r2, r3 = (int(c) for c in robe_hash.hash_constants(seed)[:3])
    ids = tf.cast(ids, tf.int64)
    word = tf.constant(2**32, tf.int64)
    high = tf.math.floormod(tf.math.floordiv(ids, word), prime)  # floor division: the arithmetic shift by 32
    low = tf.math.floormod(tf.math.floormod(ids, word), prime)
    h = tf.math.floormod((tf.math.floormod(high * r3, prime) + low) * r2 + r1, prime)
    return tf.math.floormod(h, tf.constant(np.asarray(cardinalities, np.int64)))


def hash_entry(ids, cardinalities, seed=robe_hash.DEFAULT_SEED):
    """NumPy reference of `hash_entry_tf` with Python integers (arbitrary precision)."""
    prime = robe_hash.P
    r1, r2, r3 = (int(c) for c in robe_hash.hash_constants(seed)[:3])
    ids = np.asarray(ids, np.int64)
    out = np.empty(ids.shape, np.int64)
    for index, x in np.ndenumerate(ids):
        high, low = int(x) // 2**32, int(x) % 2**32
        h = (((high % prime) * r3 % prime + low % prime) * r2 + r1) % prime
        out[index] = h % cardinalities[index[-1]]
    return out


def dense_table(layer):
    """The logical [R, d] table the layer currently represents (pruned chunks zero): numpy, for tests and export."""
    addresses = np.asarray(layer.addresses).reshape(layer.num_rows, layer.num_chunks)
    pool = np.asarray(layer.pool)
    chunks = np.where(addresses[..., None] >= 0, pool[np.maximum(addresses, 0)], 0.0)
    return chunks.reshape(layer.num_rows, layer.output_dim).astype(np.float32)
