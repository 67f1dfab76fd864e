"""The ROBE-Z index function (docs/robe_z.md), in NumPy and in TensorFlow.

All tables share one 1-D array M. For token id x of table t, element i of its D-dim embedding, chunk size Z::

    a      = x + offset_t                   # tables laid end to end
    c, o   = i // Z, i % Z
    h(a,c) = ((a*R3 + c*R2 + R1) mod P) mod (|M| - Z + 1)
    idx    = h(a,c) + o                     # a chunk never wraps past the end of M

`robe_indices` (NumPy in, NumPy out) is the public reference; `robe_indices_tf` is its TensorFlow twin used by the
layer and by exported serving graphs (stock ops only). The custom CPU/GPU kernels reproduce the same arithmetic.

Why the arithmetic is reduced mod P term by term: (a mod P)*R3 < 2^62, so every intermediate fits int64 for any
non-negative int64 `a`, and the result equals the exact-integer formula above bit for bit.

The optional sign is a second, independent universal hash over (a, i), one per element::

    sign(a, i) = +1 if ((a*S3 + i*S2 + S1) mod P) is even else -1

with (S1, S2, S3) the 4th-6th values of the same RandomState draw.
"""

import numpy as np

P = 2038074743
DEFAULT_SEED = 1024


def hash_constants(seed=DEFAULT_SEED):
    """The 50 universal-hash constants drawn as docs/robe_z.md fixes: RandomState(seed).randint(0, P, 50), int64."""
    return np.random.RandomState(seed).randint(0, P, 50).astype(np.int64)


def table_offsets(cardinalities):
    """offset_t = n_0 + ... + n_{t-1}: where each table starts when all are laid end to end (int64 [F])."""
    cards = np.asarray(cardinalities, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int64)


def num_chunks(output_dim, chunk_size):
    """Chunks per embedding row; the last one is partial when chunk_size does not divide output_dim."""
    return -(-output_dim // chunk_size)


def _check_ids(ids, cardinalities):
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != len(cardinalities):
        raise ValueError(
            f"ids must have shape [batch, {len(cardinalities)}] (one column per table), got {ids.shape}"
        )
    ids = ids.astype(np.int64)
    cards = np.asarray(cardinalities, dtype=np.int64)
    bad = (ids < 0) | (ids >= cards[None, :])
    if bad.any():
        row, feature = np.argwhere(bad)[0]
        raise ValueError(
            f"id {ids[row, feature]} of feature {feature} (row {row}) is outside [0, {cards[feature]})"
        )
    return ids


def robe_chunk_hash(a, chunk, memory_size, chunk_size, seed=DEFAULT_SEED):
    """h(a, c) for NumPy int64 arrays `a` and `chunk` (broadcast together)."""
    r1, r2, r3 = hash_constants(seed)[:3]
    a = np.asarray(a, dtype=np.int64)
    chunk = np.asarray(chunk, dtype=np.int64)
    mixed = ((a % P) * r3 % P + (chunk * r2) % P + r1) % P
    return mixed % np.int64(memory_size - chunk_size + 1)


def robe_indices(ids, cardinalities, output_dim, chunk_size, memory_size, seed=DEFAULT_SEED):
    """Positions in the shared ROBE-Z array: int64 ids [B, F] -> int64 [B, F, output_dim].

    Example:
        >>> robe_indices([[0, 1]], [3, 5], output_dim=4, chunk_size=2, memory_size=100).shape
        (1, 2, 4)

    Args:
        ids: integer array [B, F]; column f holds ids of table f, 0 <= id < cardinalities[f].
        cardinalities: rows of each of the F tables.
        output_dim: D, the embedding width.
        chunk_size: Z, 1 <= Z <= D; elements of one chunk are contiguous in the array.
        memory_size: |M|, at least Z.
        seed: draws the hash constants (docs/robe_z.md); 1024 is the default.

    Raises:
        ValueError: an id outside its table's range, or arguments outside their ranges.
    """
    if not 1 <= chunk_size <= output_dim:
        raise ValueError(f"chunk_size must be in [1, output_dim={output_dim}], got {chunk_size}")
    if memory_size < chunk_size:
        raise ValueError(f"memory_size must be >= chunk_size={chunk_size}, got {memory_size}")
    ids = _check_ids(ids, cardinalities)
    a = ids + table_offsets(cardinalities)[None, :]
    element = np.arange(output_dim, dtype=np.int64)
    h = robe_chunk_hash(a[:, :, None], element // chunk_size, memory_size, chunk_size, seed)
    return h + element % chunk_size


def robe_signs(ids, cardinalities, output_dim, seed=DEFAULT_SEED):
    """The optional +-1 per element: float32 [B, F, output_dim]."""
    s1, s2, s3 = hash_constants(seed)[3:6]
    ids = _check_ids(ids, cardinalities)
    a = (ids + table_offsets(cardinalities)[None, :])[:, :, None]
    element = np.arange(output_dim, dtype=np.int64)
    mixed = ((a % P) * s3 % P + (element * s2) % P + s1) % P
    return (1 - 2 * (mixed & 1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# TensorFlow twin. Stock ops only: these functions are what exported serving graphs contain.
#
# Speed (they run on every serving call): integer divisions are scalar hardware divisions per element, so only two
# are int64 and per *id* ((a mod P), then (.. * R mod P)); the per-chunk (or per-element) part is int32. a_term and
# every folded chunk constant c_k = (c*R2 + R1) mod P are < P < 2^31, and
#     u = a_term - (P - c_k)        lies in (-P, P): no int32 overflow (a_term + c_k could reach 2P > 2^31)
#     (a_term + c_k) mod P = floormod(u, P)
# then one int32 floormod by |M| - Z + 1. (floormod(u, P) measured as fast as a compare-and-select fix-up, which
# would also compute an overflowing u + P in the lanes it discards.) Chunk starts are int32 for every |M| (h < P);
# positions can be int32 too (`max_position`), which halves the index tensors the gathers read.

INT32_MAX = 2**31 - 1


def max_position(memory_size, chunk_size):
    """The largest position the index function can return: h < min(P, |M| - Z + 1), plus an offset < Z."""
    return min(memory_size - chunk_size, P - 1) + chunk_size - 1


def _a_term_tf(a, multiplier, id_bound, offsets=None, addend=0):
    """((a + offsets) * multiplier + addend) mod P per id, exactly: int64 a [..., F] -> int64 [..., F], in [0, P).

    Args:
        a: ids (int64, any shape); with `offsets`, the ids of each feature before its offset.
        multiplier, addend: integers in [0, P).
        id_bound: optional; the caller guarantees 0 <= a < id_bound. When id_bound <= P, a mod P = a and that
            division is skipped. None: any int64 a.
        offsets: optional int64 [F], one per feature along the last axis of `a`: folded with `multiplier` and
            `addend` into one constant per feature, (offset * multiplier + addend) mod P, computed here in exact
            Python integers, so the graph has no separate offset add (measured ~0.3 ms of ~10 at [16384, 26]).

    (a mod P) * multiplier + constant < P^2 + P < 2^62 fits int64 for any int64 a.
    """
    import tensorflow as tf  # lazily: the NumPy half loads without TensorFlow (GPU harness)

    a = tf.cast(a, tf.int64)
    if id_bound is None or not 0 < id_bound <= P:
        a = tf.math.floormod(a, P)
    if offsets is None:
        constant = tf.constant(int(addend) % P, tf.int64)
    else:
        constant = tf.constant([(int(o) * int(multiplier) + int(addend)) % P for o in np.asarray(offsets).ravel()],
                               tf.int64)
    return tf.math.floormod(a * int(multiplier) + constant, P)


def _add_mod_p_tf(a_term, constants):
    """(a_term + k) mod P for int32 a_term [...] and folded constants k in [0, P): -> int32 [..., len(constants)]."""
    import tensorflow as tf  # lazily: the NumPy half loads without TensorFlow (GPU harness)

    shifted = a_term[..., None] + tf.constant([int(k) - P for k in constants], dtype=tf.int32)  # in (-P, P)
    return tf.math.floormod(shifted, P)


def robe_chunk_hash_tf(a, num_chunk, memory_size, chunk_size, seed=DEFAULT_SEED, id_bound=None, offsets=None,
                       dtype=None):
    """h(a, c) for every chunk: int64 a [...] -> [..., num_chunk]. One hash per chunk, not per element.

    Args:
        a: already-offset ids (int64, any shape), or with `offsets` the ids of each feature before its offset.
        num_chunk: chunks per row (`num_chunks(output_dim, chunk_size)`).
        memory_size: |M|; chunk_size: Z; seed: the hash constants' seed.
        id_bound: optional; the caller guarantees 0 <= a < id_bound (e.g. the total rows, after `prepare_ids`;
            with `offsets`, the largest cardinality), which saves one division per id when id_bound <= P.
            None: any int64 a.
        offsets: optional int64 [F]: `a` is [..., F] and feature f's ids are offset by offsets[f]. Folded into the
            hash's constants (`_a_term_tf`), which is cheaper than adding them first.
        dtype: of the starts, tf.int32 (None, the default) or tf.int64. Every start fits int32 (h < P < 2^31);
            with one chunk per row, int64 skips a cast: the whole hash then runs in place in one int64 buffer
            (measured 1.1 ms faster than casting to int32 at [16384, 26], gather included).

    Returns:
        The chunk starts, equal to `robe_chunk_hash` bit for bit.
    """
    import tensorflow as tf  # lazily: the NumPy half loads without TensorFlow (GPU harness)

    dtype = tf.int32 if dtype is None else tf.as_dtype(dtype)
    r1, r2, r3 = (int(v) for v in hash_constants(seed)[:3])
    modulus = memory_size - chunk_size + 1
    if num_chunk == 1:
        # One chunk per id (Z = D): the chunk constant R1 folds into the per-id reduction, one division, not two.
        mixed = tf.cast(_a_term_tf(a, r3, id_bound, offsets, addend=r1)[..., None], dtype)
    else:
        a_term = tf.cast(_a_term_tf(a, r3, id_bound, offsets), tf.int32)
        mixed = tf.cast(_add_mod_p_tf(a_term, [(c * r2 + r1) % P for c in range(num_chunk)]), dtype)  # < P
    if modulus >= P:  # a huge array: mixed < P <= modulus already
        return mixed
    return tf.math.floormod(mixed, tf.constant(modulus, dtype))


def robe_indices_tf(a, output_dim, chunk_size, memory_size, seed=DEFAULT_SEED, dtype=None, id_bound=None):
    """Positions for already-offset ids `a` (int64 [...]) -> [..., output_dim], equal to `robe_indices`.

    Args:
        dtype: dtype of the positions; None: int64 (what `ops.gather_with_gradient` documents). tf.int32 is
            cheaper to build and to gather with, and holds every position unless Z > 10^8 (`max_position`).
        id_bound: as in `robe_chunk_hash_tf`.
    """
    import tensorflow as tf  # lazily: the NumPy half loads without TensorFlow (GPU harness)

    dtype = tf.int64 if dtype is None else tf.as_dtype(dtype)
    if dtype == tf.int32 and max_position(memory_size, chunk_size) > INT32_MAX:
        raise ValueError(f"int32 positions cannot reach {max_position(memory_size, chunk_size)} "
                         f"(memory_size={memory_size}, chunk_size={chunk_size}); use int64")
    chunks = num_chunks(output_dim, chunk_size)
    starts = robe_chunk_hash_tf(a, chunks, memory_size, chunk_size, seed, id_bound)
    # Widen the per-chunk starts (num_chunks per id), never the Z times larger per-element positions.
    return chunk_positions_tf(tf.cast(starts, dtype), output_dim, chunk_size)


def chunk_positions_tf(chunk_starts, output_dim, chunk_size):
    """Per-element positions from per-chunk starts: [..., num_chunks] -> [..., output_dim], same integer dtype.

    A broadcast add of the in-chunk offsets 0..Z-1 ([..., chunks, 1] + [Z]) and a free reshape; a partial last
    chunk is computed whole and its tail cut off.
    """
    import tensorflow as tf  # lazily: the NumPy half loads without TensorFlow (GPU harness)

    chunks = num_chunks(output_dim, chunk_size)
    offsets = tf.constant(np.arange(chunk_size), dtype=chunk_starts.dtype)
    positions = chunk_starts[..., None] + offsets  # [..., chunks, Z]
    shape = tf.concat([tf.shape(chunk_starts)[:-1], [chunks * chunk_size]], axis=0)
    positions = tf.reshape(positions, shape)
    return positions if chunks * chunk_size == output_dim else positions[..., :output_dim]


def robe_signs_tf(a, output_dim, seed=DEFAULT_SEED, id_bound=None, offsets=None):
    """The +-1 per element for already-offset ids `a` (int64 [...]) -> float32 [..., output_dim].

    Args:
        id_bound, offsets: as in `robe_chunk_hash_tf`.
    """
    import tensorflow as tf  # lazily: the NumPy half loads without TensorFlow (GPU harness)

    s1, s2, s3 = (int(v) for v in hash_constants(seed)[3:6])
    a_term = tf.cast(_a_term_tf(a, s3, id_bound, offsets), tf.int32)
    mixed = _add_mod_p_tf(a_term, [(i * s2 + s1) % P for i in range(output_dim)])
    return tf.cast(1 - 2 * tf.bitwise.bitwise_and(mixed, 1), tf.float32)
