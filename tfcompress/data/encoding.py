"""Categorical encodings of the converters: raw token -> 64-bit key -> table id, and per-id access counts.

Every categorical field of every format first becomes a uint64 *key*:

- Criteo hex tokens (`"68fd1e64"`): the hex value itself (1 to 16 hex digits).
- Any other token (Avazu, schema-driven CSV, Parquet strings): `string_key(token)`, a stable 64-bit hash
  (FNV-1a 64 over the bytes, then the splitmix64 finalizer). "Stable" means it depends on nothing but the bytes:
  not on Python's hash seed, the platform, the worker or the file, so two conversions give the same ids.
- An empty field: `MISSING_KEY` (2^64 - 1). Hex values and hashes never take that value (a hash that lands on it
  is moved to 2^64 - 2; a 16-digit hex token equal to it is rejected as bad hex).

Then an encoder turns keys into ids in [0, cardinality), chosen per conversion and recorded in schema.json:

- `HexModEncoder` (MLPerf DLRM on Criteo Terabyte): id = key mod max_ind_range; missing -> 0.
- `VocabularyEncoder` (DLRM's Criteo Kaggle preprocessing): keys seen at least `min_count` times in a first pass
  get ids 1..V in order of decreasing count (ties by key), everything else -> 0 (out of vocabulary).
- `HashEncoder` (Avazu): id = splitmix64(key) mod buckets.

`KeyCounter` counts keys (first pass) and ids (access counts saved next to the shards) in memory proportional to the
number of distinct values, never to the number of rows.

Example:
    >>> hex(string_key(b"1fbe01fe")) == hex(string_key(b"1fbe01fe"))
    True
    >>> HexModEncoder(40_000_000).encode(np.array([0x68FD1E64, MISSING_KEY], np.uint64)).tolist()
    [1418852, 0]
"""

import numpy as np

MISSING_KEY = np.uint64(2**64 - 1)
FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
MAX_HEX_DIGITS = 16
ENCODINGS = ("hex-mod", "vocab", "hash")

# ASCII byte -> hex digit value, 255 for anything that is not 0-9, a-f, A-F.
_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789"):
    _HEX_VALUE[_c] = _i
for _i, _c in enumerate(b"abcdef"):
    _HEX_VALUE[_c] = 10 + _i
    _HEX_VALUE[ord(chr(_c).upper())] = 10 + _i


# ---- the splitmix64 finalizer ----------------------------------------------------------------------------------


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x):
    """The splitmix64 finalizer on a uint64 array (wrapping arithmetic): a fast, well-mixed counter hash.

    The mixing step of string keys and of `HashEncoder`, and the counter hash of `tfcompress.data.synthetic`.
    """
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


# ---- scalar references (plain Python ints; the vectorized versions below must agree with these) ----------------


def fnv1a64(token):
    """FNV-1a 64-bit hash of a bytes object (plain Python, the reference for the vectorized version)."""
    h = int(FNV_OFFSET)
    for byte in bytes(token):
        h = ((h ^ byte) * int(FNV_PRIME)) & 0xFFFFFFFFFFFFFFFF
    return h


def string_key(token):
    """The stable uint64 key of one token (bytes or str, UTF-8); empty -> MISSING_KEY."""
    if isinstance(token, str):
        token = token.encode("utf-8")
    if not token:
        return int(MISSING_KEY)
    with np.errstate(over="ignore"):  # NumPy warns on wrapping scalar (not array) arithmetic
        key = int(splitmix64(np.uint64(fnv1a64(token))))
    return min(key, int(MISSING_KEY) - 1)


# ---- vectorized token -> key ---------------------------------------------------------------------------------


STRING_FAST_WIDTH = 64  # tokens up to this long are hashed in NumPy; longer ones one by one in Python


def gather_tokens(buf, starts, lengths, width, align="left"):
    """The bytes of many tokens as a matrix: (uint8 [K, width], in-token mask bool [K, width]).

    Args:
        buf: uint8 array holding the tokens.
        starts, lengths: int64 arrays of shape [K] (token offsets and lengths in `buf`); lengths <= width.
        width: columns of the matrix.
        align: "left" (byte 0 of a token in column 0) or "right" (its last byte in the last column, which puts
            digits of equal weight in one column).

    Rows are copied out of a strided window view of `buf` (one row copy per token instead of one fancy-index
    lookup per byte), padded so that windows near either end exist.
    """
    count = starts.shape[0]
    position = np.arange(width)
    if width == 0:
        return np.zeros((count, 0), np.uint8), np.zeros((count, 0), bool)
    padded = np.zeros(buf.size + 2 * width, dtype=np.uint8)
    padded[width: width + buf.size] = buf
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)
    if align == "left":
        rows = windows[starts + width]
        mask = position < lengths[:, None]
    else:
        rows = windows[starts + lengths]  # ends + width - width
        mask = position >= width - lengths[:, None]
    return rows, mask


def string_keys(buf, starts, ends):
    """`string_key` of every token buf[starts:ends] at once: uint64 array with the shape of `starts`."""
    shape = np.shape(starts)
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    lengths = np.asarray(ends, dtype=np.int64).reshape(-1) - starts
    width = int(min(lengths.max(initial=0), STRING_FAST_WIDTH))
    data, mask = gather_tokens(buf, starts, lengths, width)
    h = np.full(starts.shape, FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(width):  # FNV is sequential in the bytes: one pass per byte position, all tokens at once
            h = np.where(mask[:, j], (h ^ data[:, j].astype(np.uint64)) * FNV_PRIME, h)
        keys = splitmix64(h)
    for i in np.flatnonzero(lengths > STRING_FAST_WIDTH):
        keys[i] = string_key(buf[starts[i]:starts[i] + lengths[i]].tobytes())
    keys = np.minimum(keys, MISSING_KEY - np.uint64(1))
    keys[lengths == 0] = MISSING_KEY
    return keys.reshape(shape)


def hex_keys(buf, starts, ends):
    """Hex tokens buf[starts:ends] -> (uint64 keys, bad bool); empty -> MISSING_KEY.

    A token is bad when it has a non-hex character, more than 16 digits, or equals the reserved 2^64 - 1.
    """
    shape = np.shape(starts)
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    lengths = np.asarray(ends, dtype=np.int64).reshape(-1) - starts
    too_long = lengths > MAX_HEX_DIGITS
    lengths_used = np.where(too_long, 0, lengths)
    width = int(lengths_used.max(initial=0))
    width += width % 2  # whole bytes: two hex digits each
    data, mask = gather_tokens(buf, starts, lengths_used, width, align="right")
    digits = np.where(mask, _HEX_VALUE[data], np.uint8(0))
    bad = too_long | (digits == 255).any(axis=1)
    # Right-aligned digits pair up into the bytes of a big-endian integer: no per-digit arithmetic in uint64.
    packed = np.zeros((starts.shape[0], 8), dtype=np.uint8)
    packed[:, 8 - width // 2:] = (digits[:, 0::2] << 4) | (digits[:, 1::2] & 15)
    keys = packed.view(">u8")[:, 0].astype(np.uint64)
    bad |= (keys == MISSING_KEY) & (lengths > 0)
    keys[lengths == 0] = MISSING_KEY
    return keys.reshape(shape), bad.reshape(shape)


def parse_hex_token(token):
    """One hex token (bytes or str) -> its key, MISSING_KEY when empty; ValueError when it is bad hex."""
    if isinstance(token, bytes):
        token = token.decode("ascii", errors="replace")
    if token == "":
        return int(MISSING_KEY)
    if len(token) > MAX_HEX_DIGITS or any(c not in "0123456789abcdefABCDEF" for c in token):
        raise ValueError(f"not a hex token of 1..{MAX_HEX_DIGITS} digits: {token!r}")
    value = int(token, 16)
    if value == int(MISSING_KEY):
        raise ValueError(f"hex token {token!r} is the reserved value 2^64 - 1")
    return value


# ---- key counting --------------------------------------------------------------------------------------------


class KeyCounter:
    """Counts of uint64 keys (or int64 ids), in memory proportional to the number of distinct keys.

    Example:
        >>> counter = KeyCounter()
        >>> counter.add(np.array([5, 3, 5], np.uint64))
        >>> keys, counts = counter.result()
        >>> keys.tolist(), counts.tolist()
        ([3, 5], [1, 2])

    Args:
        dtype: key dtype, np.uint64 (keys) or np.int64 (ids).
        compact_every: pending (key, count) pairs held (at least) before they are merged into the sorted totals.
    """

    def __init__(self, dtype=np.uint64, compact_every=1 << 22):
        self.dtype = np.dtype(dtype)
        self.compact_every = int(compact_every)
        self._keys = np.zeros(0, self.dtype)
        self._counts = np.zeros(0, np.int64)
        self._pending = []
        self._pending_size = 0

    def add(self, keys, counts=None):
        """Count `keys` once each, or `counts[i]` times for keys[i]."""
        keys = np.asarray(keys, dtype=self.dtype).reshape(-1)
        if counts is None:
            keys, counts = np.unique(keys, return_counts=True)
        self._pending.append((keys, np.asarray(counts, dtype=np.int64).reshape(-1)))
        self._pending_size += keys.size
        # Merge once the pending pairs are as many as the totals (or compact_every): each merge sorts at most
        # twice what it adds, so counting costs O(log) per key however many distinct keys pile up, and memory
        # stays within about twice the distinct keys.
        if self._pending_size >= max(self.compact_every, self._keys.size):
            self._compact()

    def merge(self, other):
        """Add all counts of another KeyCounter (or a (keys, counts) pair)."""
        keys, counts = other.result() if isinstance(other, KeyCounter) else other
        self.add(keys, counts)

    def _compact(self):
        if not self._pending:
            return
        keys = np.concatenate([self._keys] + [k for k, _ in self._pending])
        counts = np.concatenate([self._counts] + [c for _, c in self._pending])
        self._keys, inverse = np.unique(keys, return_inverse=True)
        self._counts = np.bincount(inverse.reshape(-1), weights=counts, minlength=self._keys.size).astype(np.int64)
        self._pending, self._pending_size = [], 0

    def result(self):
        """(keys sorted ascending, counts int64), distinct keys only."""
        self._compact()
        return self._keys, self._counts

    @property
    def total(self):
        return int(self.result()[1].sum())

    @property
    def pending_upper_bound(self):
        """An upper bound of the distinct keys counted so far, without merging (merged + pending pairs)."""
        return int(self._keys.size) + self._pending_size


# ---- encoders ------------------------------------------------------------------------------------------------


class HexModEncoder:
    """MLPerf DLRM: id = key mod max_ind_range, missing -> 0.

    Args:
        max_ind_range: table size, >= 1 (MLPerf uses 40,000,000 for Criteo Terabyte).
    """

    kind = "hex-mod"

    def __init__(self, max_ind_range):
        if int(max_ind_range) != max_ind_range or max_ind_range < 1:
            raise ValueError(f"max_ind_range must be an integer >= 1, got {max_ind_range!r}")
        self.max_ind_range = int(max_ind_range)

    @property
    def cardinality(self):
        return self.max_ind_range

    def encode(self, keys):
        keys = np.asarray(keys, dtype=np.uint64)
        ids = (keys % np.uint64(self.max_ind_range)).astype(np.int64)
        ids[keys == MISSING_KEY] = 0
        return ids


class HashEncoder:
    """Stable hashing into a fixed range: id = splitmix64(key) mod buckets (missing hashes like any key).

    Args:
        buckets: table size, >= 1.
    """

    kind = "hash"

    def __init__(self, buckets):
        if int(buckets) != buckets or buckets < 1:
            raise ValueError(f"hash buckets must be an integer >= 1, got {buckets!r}")
        self.buckets = int(buckets)

    @property
    def cardinality(self):
        return self.buckets

    def encode(self, keys):
        return (splitmix64(np.asarray(keys, dtype=np.uint64)) % np.uint64(self.buckets)).astype(np.int64)


def fold_keys(keys, modulus):
    """keys mod `modulus` (uint64), the missing key left as it is; None: keys unchanged."""
    keys = np.asarray(keys, dtype=np.uint64)
    if modulus is None:
        return keys
    return np.where(keys == MISSING_KEY, MISSING_KEY, keys % np.uint64(modulus))


class VocabularyEncoder:
    """Keys with a count >= min_count get ids 1..V by decreasing count (ties: smaller key first); others -> 0.

    Args:
        keys: the vocabulary keys in id order (keys[i] has id i + 1), uint64, distinct.
        key_modulus: fold keys by this modulus before the lookup (MLPerf: hex keys mod max_ind_range); the
            missing key stays itself. The vocabulary must have been built on keys folded the same way
            (`fold_keys`).
    """

    kind = "vocab"

    def __init__(self, keys, key_modulus=None):
        self.key_modulus = key_modulus
        self.keys = np.asarray(keys, dtype=np.uint64)
        self._order = np.argsort(self.keys, kind="stable")
        self._sorted = self.keys[self._order]
        if self._sorted.size > 1 and np.any(self._sorted[1:] == self._sorted[:-1]):
            raise ValueError("vocabulary keys must be distinct")

    @classmethod
    def from_counts(cls, keys, counts, min_count):
        """Build from counted keys (`KeyCounter.result()`): keep count >= min_count, most frequent first."""
        if int(min_count) != min_count or min_count < 1:
            raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
        keys = np.asarray(keys, dtype=np.uint64)
        counts = np.asarray(counts, dtype=np.int64)
        keep = counts >= min_count
        keys, counts = keys[keep], counts[keep]
        order = np.lexsort((keys, -counts))  # last key sorts first: count descending, then key ascending
        return cls(keys[order])

    @property
    def cardinality(self):
        return int(self.keys.size) + 1

    def encode(self, keys):
        keys = fold_keys(keys, self.key_modulus)
        if self._sorted.size == 0:
            return np.zeros(keys.shape, np.int64)
        position = np.minimum(np.searchsorted(self._sorted, keys), self._sorted.size - 1)
        found = self._sorted[position] == keys
        return np.where(found, self._order[position].astype(np.int64) + 1, 0)


class DirectEncoder:
    """Ids that already are small integers (Avazu hour-of-day, weekday): id = key, checked against the range."""

    kind = "direct"

    def __init__(self, cardinality):
        self._cardinality = int(cardinality)

    @property
    def cardinality(self):
        return self._cardinality

    def encode(self, keys):
        ids = np.asarray(keys).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self._cardinality):
            raise AssertionError(f"direct ids outside [0, {self._cardinality})")  # the parser validates them
        return ids
