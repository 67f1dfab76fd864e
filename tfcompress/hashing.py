"""The ROBE-Z index function (DESIGN.md, "ROBE-Z index function"), in NumPy and in TensorFlow.

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
    """The 50 universal-hash constants drawn as DESIGN.md fixes: RandomState(seed).randint(0, P, 50), int64."""
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
        seed: draws the hash constants (DESIGN.md); 1024 is the default.

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


def robe_chunk_hash_tf(a, num_chunk, memory_size, chunk_size, seed=DEFAULT_SEED):
    """h(a, c) for every chunk: int64 a [...] -> int64 [..., num_chunk]. One hash per chunk, not per element."""
    import tensorflow as tf

    r1, r2, r3 = (int(v) for v in hash_constants(seed)[:3])
    a_term = tf.math.floormod(tf.math.floormod(a, P) * r3, P)[..., None]
    chunk_term = tf.constant([(c * r2) % P for c in range(num_chunk)], dtype=tf.int64)
    mixed = tf.math.floormod(a_term + chunk_term + r1, P)
    return tf.math.floormod(mixed, memory_size - chunk_size + 1)


def robe_indices_tf(a, output_dim, chunk_size, memory_size, seed=DEFAULT_SEED):
    """Positions for already-offset ids `a` (int64 [...]) -> int64 [..., output_dim]."""
    import tensorflow as tf

    chunks = num_chunks(output_dim, chunk_size)
    return chunk_positions_tf(robe_chunk_hash_tf(a, chunks, memory_size, chunk_size, seed), output_dim, chunk_size)


def chunk_positions_tf(chunk_starts, output_dim, chunk_size):
    """Per-element positions from per-chunk starts: int64 [..., num_chunks] -> int64 [..., output_dim].

    Spreads each chunk's start over its Z elements, then adds the in-chunk offset.
    """
    import tensorflow as tf

    element = np.arange(output_dim)
    h_per_element = tf.gather(chunk_starts, element // chunk_size, axis=-1)
    return h_per_element + tf.constant(element % chunk_size, dtype=tf.int64)


def robe_signs_tf(a, output_dim, seed=DEFAULT_SEED):
    """The +-1 per element for already-offset ids `a` (int64 [...]) -> float32 [..., output_dim]."""
    import tensorflow as tf

    s1, s2, s3 = (int(v) for v in hash_constants(seed)[3:6])
    a_term = tf.math.floormod(tf.math.floormod(a, P) * s3, P)[..., None]
    element_term = tf.constant([(i * s2) % P for i in range(output_dim)], dtype=tf.int64)
    mixed = tf.math.floormod(a_term + element_term + s1, P)
    return tf.cast(1 - 2 * tf.bitwise.bitwise_and(mixed, 1), tf.float32)
