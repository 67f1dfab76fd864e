"""ROBE-Z: random offset block embeddings (every table hashed in chunks into one small shared array)."""

import math

import tensorflow as tf

from tfcompress import fused_ops, robe_hash
from tfcompress._keras import keras, register_serializable
from tfcompress.layers import base
from tfcompress.layers.robe_memory import RobeMemory
from tfcompress.lookup import WINDOWS_MAX_FRACTION, gather_with_gradient, resolve_gradient_mode


def array_size(logical_parameters, output_dim, memory_size=None, compression=None, chunk_size=None):
    """(chunk_size, memory_size) of a ROBE-Z array from the layer's arguments, checked.

    The chunk size defaults to min(output_dim, 32); `compression` gives |M| = ceil(logical / compression), never
    less than one chunk.
    """
    chunk_size = min(output_dim, 32) if chunk_size is None else chunk_size
    if int(chunk_size) != chunk_size or not 1 <= chunk_size <= output_dim:
        raise ValueError(f"chunk_size must be an integer in [1, output_dim={output_dim}], got {chunk_size!r}")
    chunk_size = int(chunk_size)
    if (memory_size is None) == (compression is None):
        raise ValueError("give exactly one of memory_size or compression")
    if compression is not None:
        if not compression >= 1.0:
            raise ValueError(f"compression must be >= 1 (1000.0 = 1000x smaller), got {compression!r}")
        memory_size = max(chunk_size, math.ceil(logical_parameters / compression))
    if int(memory_size) != memory_size or memory_size < chunk_size:
        raise ValueError(
            f"memory_size must be an integer >= chunk_size={chunk_size} (one chunk), got {memory_size!r}"
        )
    return chunk_size, int(memory_size)


@register_serializable()
class RobeEmbedding(base.IdEmbeddingLayer):
    """F embedding tables stored in ONE trainable 1-D array, addressed by the ROBE-Z hash (docs/robe_z.md).

    Element i of the embedding of id x in table t reads M[h(a, i // Z) + i % Z] with a = x + offset_t: each chunk
    of Z consecutive elements is one contiguous slice of M, and the hash is computed once per chunk. Z = 1 is
    HashedNet (element-wise hashing); Z = output_dim hashes whole rows.

    Example:

    >>> layer = RobeEmbedding(cardinalities=[1000, 50], output_dim=8, compression=100.0, chunk_size=4)
    >>> layer(tf.constant([[3, 7], [999, 0]])).shape
    TensorShape([2, 2, 8])

    Args:
        cardinalities: rows of each of the F tables (ids of feature f lie in [0, cardinalities[f])).
        output_dim: D, the embedding width.
        memory_size: |M|, floats in the shared array. Give this or `compression`.
        compression: logical size / |M| (1000.0 = 1000x smaller than full tables), >= 1.
        chunk_size: Z in [1, output_dim]; default min(output_dim, 32).
        seed: draws the hash constants (docs/robe_z.md); another seed gives another independent hash. None: the
            default seed `robe_hash.DEFAULT_SEED` (or, with `memory`, the memory's).
        signed: multiply each element by an independent +-1 hash (reduces collision bias). None: False (or, with
            `memory`, the memory's).
        gradient: "sparse" (coalesced IndexedSlices), "dense" (one scatter-add into an |M|-sized tensor) or
            "auto" (dense when |M| <= 16M floats). Both give the same update.
        out_of_range: "error" (default) raises naming feature and value for an id outside [0, cardinality);
            "mod" folds ids into range with a floor modulo.
        embeddings_initializer: initializer of M.
        memory: a `RobeMemory` to store the tables in, shared with the other layers given it (instead of
            `memory_size`/`compression`; the memory's chunk size, seed and signs apply, and a different one asked
            here is a ValueError naming both). The tables are laid end to end from `table_offset`.
        table_offset: with `memory`, where table 0 starts in the memory's id space; default: after the tables
            registered with it before (creation order). Kept in `get_config`.
        use_custom_op: "auto" (default) runs the fused C++/CUDA op (custom_ops/) when its library loads and the
            pure-TF path otherwise (warned once); True requires the op (CustomOpUnavailableError if it cannot
            load); False always takes the pure-TF path. Results are identical. Serving exports trace
            `serving_lookup`, which never uses the op, whatever this says.

    Input shape: integer [batch, F]. Output shape: float32 [batch, F, output_dim].
    """

    def __init__(
        self,
        cardinalities,
        output_dim,
        memory_size=None,
        compression=None,
        chunk_size=None,
        seed=None,
        signed=None,
        gradient="auto",
        out_of_range="error",
        embeddings_initializer="uniform",
        use_custom_op="auto",
        memory=None,
        table_offset=None,
        **kwargs,
    ):
        super().__init__(cardinalities, output_dim, gradient=gradient, out_of_range=out_of_range,
                         embeddings_initializer=embeddings_initializer, **kwargs)
        self.compression = None if compression is None else float(compression)
        self.use_custom_op = fused_ops.check_use_custom_op(use_custom_op)
        if isinstance(memory, dict):  # a serialized RobeMemory, as from_config passes it
            memory = keras.saving.deserialize_keras_object(memory)
        if memory is None:
            if table_offset is not None:
                raise ValueError(f"{self.described}: table_offset={table_offset!r} places tables in a shared "
                                 "memory; give memory= too")
            self.shared_memory = None
            self.table_offset = 0
            self.chunk_size, self.memory_size = array_size(self.logical_parameters, self.output_dim, memory_size,
                                                           compression, chunk_size)
            self.seed = robe_hash.DEFAULT_SEED if seed is None else int(seed)
            self.signed = bool(signed)
            self._gradient_mode = resolve_gradient_mode(gradient, self.memory_size)
        else:
            if not isinstance(memory, RobeMemory):
                raise TypeError(f"{self.described}: memory must be a tfcompress.layers.RobeMemory, got "
                                f"{type(memory).__name__}")
            if memory_size is not None or compression is not None:
                raise ValueError(f"{self.described}: the size of a shared memory is set on the RobeMemory; give "
                                 f"memory= without memory_size/compression (got memory_size={memory_size!r}, "
                                 f"compression={compression!r})")
            self.shared_memory = memory
            # One table of width D per feature, laid end to end from the registered offset (docs/robe_z.md).
            self.table_offset = memory.register(self.described, sum(self.cardinalities), self.output_dim,
                                                chunk_size=chunk_size, seed=seed, signed=signed,
                                                table_offset=table_offset)
            self.chunk_size, self.seed, self.signed = memory.chunk_size, memory.seed, memory.signed
            self.memory_size = None  # the memory's size, known once its array is made (build)
        self._offsets = robe_hash.table_offsets(self.cardinalities) + self.table_offset

    @property
    def physical_parameters(self):
        """|M|; with a shared memory, the whole shared array (counted once per sharer here)."""
        return self.memory_size if self.shared_memory is None else self.shared_memory.size

    @classmethod
    def _parameter_counts(cls, cardinalities, output_dim, memory_size=None, compression=None, chunk_size=None,
                          **options):
        _, size = array_size(sum(cardinalities) * output_dim, output_dim, memory_size, compression, chunk_size)
        return size, None  # one array for all features

    def build(self, input_shape):
        self.check_id_shape(input_shape)
        if self.shared_memory is None:
            self.memory = self.add_weight(
                name="memory", shape=(self.memory_size,), initializer=self.embeddings_initializer, trainable=True
            )
        else:
            self.shared_memory.build()
            self.memory_size = self.shared_memory.size
            # "auto" weighs what a dense gradient costs here: every sharer makes its own |M|-sized tensor and
            # the tape holds them until it sums them, so the bound is |M| times the number of sharers.
            self._gradient_mode = resolve_gradient_mode(self.gradient,
                                                        self.memory_size * len(self.shared_memory.tables))
            # Set past Keras' attribute tracking: the variable belongs to the RobeMemory (a tracked sub-layer of
            # every sharer), so it is saved and counted once, not once per sharer.
            object.__setattr__(self, "memory", self.shared_memory.array)
        super().build(input_shape)

    def call(self, ids):
        if fused_ops.should_use(self.use_custom_op):
            # The op checks every id value itself (naming feature and value), so only "mod" needs the TF-side pass;
            # dtype and shape are checked here as on the pure-TF path, with the same message.
            ids = self.check_ids(ids)
            cardinalities = self.cardinalities
            if self.out_of_range == "mod" or self.table_offset:
                ids = self.prepare_ids(ids)
            if self.table_offset:
                # The op lays tables end to end from 0; a table at offset O is the op's first table grown by O rows
                # with its ids shifted by O (in range after prepare_ids): the same a = x + O, the same hash.
                ids = ids + tf.one_hot(0, len(cardinalities), on_value=self.table_offset, off_value=0,
                                       dtype=tf.int64)
                cardinalities = [cardinalities[0] + self.table_offset, *cardinalities[1:]]
            return fused_ops.robe_lookup(
                self.memory, ids, cardinalities, self.output_dim, self.chunk_size, self.seed, self.signed,
                self._gradient_mode,
            )
        ids = self.prepare_ids(ids)
        a = ids + tf.constant(self._offsets)
        positions = robe_hash.robe_indices_tf(a, self.output_dim, self.chunk_size, self.memory_size, self.seed)
        values = gather_with_gradient(self.memory, positions, self._gradient_mode)
        if self.signed:
            values = values * robe_hash.robe_signs_tf(a, self.output_dim, self.seed)
        return values

    @property
    def uses_fused_op(self):
        """Whether `call` (and `fused_bag_lookup`) run the fused custom op now (`use_custom_op`, the library,
        `TFCOMPRESS_CUSTOM_OPS`)."""
        return fused_ops.should_use(self.use_custom_op)

    def fused_bag_lookup(self, ids_values, row_splits, weights, combiner):
        """Pooled bags of a one-table layer in one fused op (`fused_ops.robe_bag_lookup`): float32 [rows, D].

        The training lookup of bags for `CompressedEmbedding`: equal to `bag.bag_lookup` over `call` (rows summed
        in id order, then divided). The caller prunes first (`bag.prune_bags`): every id here is >= 0.

        Args:
            ids_values: integer [V] ids of this layer's one table, row after row.
            row_splits: integer [rows + 1].
            weights: float [V], or None (all ones).
            combiner: "sum", "mean" or "sqrtn".
        """
        if len(self.cardinalities) != 1:
            raise ValueError(f"{self.described}: fused_bag_lookup pools the ids of one table; this layer has "
                             f"{len(self.cardinalities)} tables")
        ids_values = tf.cast(ids_values, tf.int64)
        if self.out_of_range == "mod":
            ids_values = tf.math.floormod(ids_values, self.cardinalities[0])
        # For "error" the op checks every id against [0, cardinality) itself, naming the value, as `call` leaves
        # it to the per-element op. The op hashes a = id + table_offset, the a of `call` for a table at that
        # offset of a shared memory (which `call` gets by growing the op's first table by the offset).
        return fused_ops.robe_bag_lookup(
            self.memory, ids_values, row_splits, weights, offset=self.table_offset,
            cardinality=self.cardinalities[0], output_dim=self.output_dim, chunk_size=self.chunk_size,
            seed=self.seed, signed=self.signed, combiner=combiner, gradient=self._gradient_mode,
        )

    def serving_lookup(self, ids, out_of_range="mod", tables=None):
        """`call` for serving graphs: the same values in stock ops, read chunk by chunk as `tables` says (see
        `base.IdLayer.serving_lookup` and `tfcompress.lookup.TableReader`; docs/export_contract.md "Serving layout").

        Each chunk of Z elements is the contiguous slice M[h : h + Z]. How the chunks are read
        (`tables.chunk_reads`; every way gives bit-identical values):

        - "windows": W[j] = M[j : j + Z] ((|M| - Z + 1) x Z) is materialized once at export
          (`TableReader.windows`, a variable of the SavedModel, Z times |M|), and one row gather per chunk
          (`tf.gather_nd`, which measured 1.2x faster than `tf.gather` for 64-byte rows) reads it. Z = 1 reads M
          itself (W would be a copy of it).
        - "elements": per-element positions h + (0..Z-1) and one scalar gather per element from M.
        - "per_call": W rebuilt from M in graph on every call (|M| x Z copies), row-gathered for batches with more
          lookups than W holds and element-gathered otherwise (`tf.cond`); nothing is stored beyond M.
        - "auto" (the export default): "windows" where W holds at most `WINDOWS_MAX_FRACTION` of the floats of the
          full tables stored in M (all sharers' tables for a shared memory), else "per_call".

        `tables.unique_ids` hashes and reads each distinct id once and expands after; `tables.jit_compile` runs the
        hash as one XLA-compiled function, under "windows" alone (the row gather stays TensorFlow's GatherNd,
        faster than XLA's), otherwise with the reads (XLA's element gather is the faster one). The hash is
        `robe_hash.robe_chunk_hash_tf` with the table offsets folded into its constants and told that ids are in
        range (true after the id rule), so it runs one int64 division per id (and int32 arithmetic per chunk);
        with one chunk per id it stays in int64 to the gather, which saves a cast.
        """
        tables = base.table_reader(tables)
        ids = self.serving_ids(ids, out_of_range)
        read = self._chunk_reader(tables)
        if tables.unique_ids:
            distinct, where = tf.unique(tf.reshape(ids + tf.constant(self._offsets), [-1]))
            values = tf.gather(read(distinct, None), where)  # [B * F, D]
            return tf.reshape(values, [-1, len(self.cardinalities), self.output_dim])
        return read(ids, self._offsets)

    def _chunk_reader(self, tables):
        """The function (ids [..., F] and their offsets [F], or offset ids [...] and None) -> float32 [..., F, D]
        or [..., D] that `serving_lookup` runs (see there)."""
        size, width, chunk = self.memory_size, self.output_dim, self.chunk_size
        chunks = robe_hash.num_chunks(width, chunk)
        # The id rule puts every id of table t in [0, n_t), so every offset id is in [0, total_rows), a shared
        # memory's earlier tables included.
        total_rows = self.table_offset + int(sum(self.cardinalities))
        window_rows = min(size - chunk + 1, robe_hash.P)  # every chunk start h < min(|M| - Z + 1, P)
        position_dtype = tf.int32 if robe_hash.max_position(size, chunk) <= robe_hash.INT32_MAX else tf.int64
        layout = "elements" if chunk == 1 else tables.chunk_reads
        if layout == "auto":
            # W's floats against the full tables stored in M (all sharers' tables for a shared memory).
            stored_logical = (self.shared_memory.logical_parameters if self.shared_memory is not None
                              else self.logical_parameters)
            small = window_rows * chunk <= WINDOWS_MAX_FRACTION * stored_logical
            layout = "windows" if small else "per_call"
        if layout == "windows":
            windows, scale, quantized = tables.windows(self.memory, chunk)
        else:
            stored, scale, quantized = tables.stored(self.memory)
        # int64 starts for the one-chunk row gather (the hash's buffer is reused to the end, no cast).
        start_dtype = tf.int64 if layout == "windows" and chunks == 1 else tf.int32

        def with_width(shape, rows):  # [..., chunks, Z] -> [..., D]: a partial last chunk loses its tail
            flat = tf.reshape(rows, tf.concat([shape, [chunks * chunk]], axis=0))
            return flat if chunks * chunk == width else flat[..., :width]

        def per_element(starts):
            return tf.gather(stored, robe_hash.chunk_positions_tf(tf.cast(starts, position_dtype), width, chunk))

        def per_call_windows(starts):
            memory = tf.convert_to_tensor(stored)  # one read of the variable for the Z slices
            # Stacking the Z shifted slices as rows and transposing (two bulk copies) measured 1.5x faster than
            # stacking them as columns, which copies one element at a time.
            built = tf.transpose(tf.stack([memory[o:window_rows + o] for o in range(chunk)], axis=0))
            return with_width(tf.shape(starts)[:-1], tf.gather(built, starts))

        # jit_compile: XLA's row gather measured slower than TensorFlow's GatherNd from W, its element gather 3-4x
        # faster than TensorFlow's (Z = 1): "windows" compiles only the hash, the other layouts the whole read.
        compile_hash_only = tables.jit_compile and layout == "windows"

        def chunk_hash(offsets):  # ids -> starts; offsets None: the ids are offset already
            def starts(ids):
                return robe_hash.robe_chunk_hash_tf(ids, chunks, size, chunk, self.seed, id_bound=id_bound(offsets),
                                                    offsets=offsets, dtype=start_dtype)

            return tf.function(starts, jit_compile=True, autograph=False) if compile_hash_only else starts

        def id_bound(offsets):
            return total_rows if offsets is None else max(self.cardinalities)

        def read(ids, offsets):
            starts = chunk_hash(offsets)(ids)
            if layout == "windows":
                values = with_width(tf.shape(ids), tf.gather_nd(windows, starts[..., None]))
            elif layout == "elements":
                values = per_element(starts)
            else:  # "per_call", decided from the ids' size so W can be built while the hash still runs
                lookups = tf.size(ids, out_type=tf.int64) * (chunks * chunk)
                values = tf.cond(lookups >= window_rows * chunk, lambda: per_call_windows(starts),
                                 lambda: per_element(starts))
            values = tables.dequantize(values, scale, quantized)
            if self.signed:
                values = values * robe_hash.robe_signs_tf(ids, width, self.seed, id_bound=id_bound(offsets),
                                                          offsets=offsets)
            return values

        if tables.jit_compile and not compile_hash_only:
            return lambda ids, offsets: tf.function(lambda x: read(x, offsets), jit_compile=True, autograph=False)(ids)
        return read

    def get_config(self):
        config = super().get_config()
        config.update(
            # memory_size alone fixes the array; compression is kept for display but not passed back twice.
            memory_size=self.memory_size,
            chunk_size=self.chunk_size,
            seed=self.seed,
            signed=self.signed,
            use_custom_op=self.use_custom_op,
        )
        if self.shared_memory is not None:
            # The memory holds the size and the hash settings; the offset keeps this layer's rows where they were.
            config.update(memory=keras.saving.serialize_keras_object(self.shared_memory),
                          table_offset=self.table_offset, memory_size=None, chunk_size=None, seed=None,
                          signed=None)
        return config
