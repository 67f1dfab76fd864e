"""Fixed-width Example records: the same tf.train.Example layout with every record the same number of bytes.

Why: reading TFRecords one record at a time costs ~1 CPU-microsecond per record in tf.data (a tensor, a copy and
an iterator step per record), about three times what parsing costs once records are batched (measured with
bench/bench_read.py). When every record of a file has the same length, a file is an array of equal frames, so
`tf.data.FixedLengthRecordDataset` can hand out blocks of hundreds of records as one string, and the fields sit at
fixed offsets: the reader slices them out of a [B, frame] byte matrix with a handful of batched ops.

How the records get a fixed width without leaving the format: protobuf varints may carry redundant continuation
bytes, so every sparse id is written as exactly `id_width` varint bytes (enough for the largest id of the
dataset), and the label (0 or 1) as one byte. Dense floats are fixed width already. Every length prefix is then a
constant. The records stay valid `tf.train.Example`s (TFRecord files with correct CRCs) that `tf.io.parse_example`,
python-protobuf and any other reader parse as usual; only the bytes differ from protobuf's canonical (shortest)
encoding.

Reading checks what FixedLengthRecordDataset does not (`FrameChecker`, on every batch the reader decodes): the
framing and protobuf bytes, the label (0 or 1), the varint continuation bits and the TFRecord data CRCs; a damaged
record is an error naming its file and byte offset.

Layout of one record (keys sorted, as protobuf's deterministic serialization orders map keys):

    Example{ features{ "dense": float_list[n_dense], "label": int64_list[1], "sparse": int64_list[n_sparse] } }

Example:
    >>> layout = FixedLayout(n_dense=13, n_sparse=26, id_width=4)
    >>> records = serialize_fixed(layout, [1, 0], np.ones((2, 13)), np.arange(52).reshape(2, 26))
    >>> {len(r) for r in records} == {layout.record_bytes}
    True
"""

import atexit
import ctypes
import dataclasses
import importlib.util
import os
import struct
import sys
import threading
import time

import numpy as np

from tfcompress.data.tfrecord import ShardWriter, crc32c, masked_crc

SCHEMA_KEY = "fixed_record"  # schema.json `extra` key that declares a dataset's records fixed width
FRAME_OVERHEAD = 16  # TFRecord framing: uint64 length, uint32 masked CRC of it, data, uint32 masked CRC of data


def _varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _crc32c_tables():
    """Slicing-by-8 tables of CRC-32C: table[k][b] is the CRC contribution of byte b followed by k zero bytes."""
    table = np.zeros((8, 256), dtype=np.uint32)
    for b in range(256):
        crc = b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table[0, b] = crc
    for k in range(1, 8):
        table[k] = (table[k - 1] >> np.uint32(8)) ^ table[0][table[k - 1] & np.uint32(0xFF)]
    return table


_CRC_TABLES = _crc32c_tables()


def masked_crc32c_rows(rows):
    """TFRecord's masked CRC-32C of every row of a uint8 matrix [N, L] at once: uint32 [N].

    Eight bytes per step for all rows together (slicing-by-8), so a block of records costs a few dozen NumPy
    passes instead of one Python call per record.
    """
    rows = np.asarray(rows, dtype=np.uint8)
    n, length = rows.shape
    t = _CRC_TABLES
    crc = np.full(n, 0xFFFFFFFF, dtype=np.uint32)
    whole = length - length % 8
    words = np.ascontiguousarray(rows[:, :whole]).view("<u4")  # [N, whole / 4], little-endian as CRC-32C reads
    mask = np.uint32(0xFF)
    for j in range(0, whole // 4, 2):
        low = crc ^ words[:, j]
        high = words[:, j + 1]
        crc = (t[7][low & mask] ^ t[6][(low >> np.uint32(8)) & mask] ^ t[5][(low >> np.uint32(16)) & mask]
               ^ t[4][low >> np.uint32(24)] ^ t[3][high & mask] ^ t[2][(high >> np.uint32(8)) & mask]
               ^ t[1][(high >> np.uint32(16)) & mask] ^ t[0][high >> np.uint32(24)])
    for j in range(whole, length):
        crc = t[0][(crc ^ rows[:, j]) & mask] ^ (crc >> np.uint32(8))
    crc = crc ^ np.uint32(0xFFFFFFFF)
    return ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)  # wraps in uint32


@dataclasses.dataclass(frozen=True)
class FixedLayout:
    """Byte layout of fixed-width records with n_dense floats, one 0/1 label and n_sparse ids of id_width bytes.

    Args:
        n_dense: dense floats per row, >= 0.
        n_sparse: ids per row, >= 0.
        id_width: varint bytes per id, 1..9 (ids below 2^(7 * id_width)).
    """

    n_dense: int
    n_sparse: int
    id_width: int

    def __post_init__(self):
        for name, value, low, high in (("n_dense", self.n_dense, 0, 1 << 20), ("n_sparse", self.n_sparse, 0, 1 << 20),
                                       ("id_width", self.id_width, 1, 9)):
            if int(value) != value or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        pieces, offsets = self._pieces()
        object.__setattr__(self, "_template", pieces)
        object.__setattr__(self, "offsets", offsets)

    @classmethod
    def for_ids_below(cls, n_dense, n_sparse, id_bound):
        """The narrowest layout whose ids hold every value in [0, id_bound), with 1, 2, 4, 8 or 9 bytes per id.

        Widths of a machine word decode with one bitcast per id (3 bytes would take 4 byte-sized lanes anyway).
        """
        bits = max(1, (max(int(id_bound), 1) - 1).bit_length())
        needed = -(-bits // 7)
        return cls(n_dense, n_sparse, next(w for w in (1, 2, 4, 8, 9) if w >= needed))

    def _pieces(self):
        """(template bytes with zeros where values go, {"dense"|"label"|"sparse": byte offset of the payload})."""
        payloads = {"dense": 4 * self.n_dense, "label": 1, "sparse": self.id_width * self.n_sparse}
        tags = {"dense": 0x12, "label": 0x1A, "sparse": 0x1A}  # Feature.float_list / Feature.int64_list
        entries = []
        for key in ("dense", "label", "sparse"):
            size = payloads[key]
            list_head = b"\x0a" + _varint(size) if size else b""  # a packed field of 0 values is not written
            feature_head = bytes([tags[key]]) + _varint(len(list_head) + size) + list_head
            feature_len = len(feature_head) + size
            entry_head = b"\x0a" + bytes([len(key)]) + key.encode() + b"\x12" + _varint(feature_len) + feature_head
            entry_len = len(entry_head) + size
            entries.append((key, b"\x0a" + _varint(entry_len) + entry_head, size))
        features_len = sum(len(head) + size for _, head, size in entries)
        template = bytearray(b"\x0a" + _varint(features_len))
        offsets = {}
        for key, head, size in entries:
            template += head
            offsets[key] = len(template)
            template += bytes(size)
        return bytes(template), offsets

    @property
    def record_bytes(self):
        return len(self._template)

    @property
    def frame_bytes(self):
        return self.record_bytes + FRAME_OVERHEAD

    @property
    def template(self):
        return self._template

    def frame_header(self):
        """The 12 bytes that start every frame: the record length and its masked CRC."""
        length = struct.pack("<Q", self.record_bytes)
        return length + struct.pack("<I", masked_crc(length))

    def constant_positions(self):
        """Frame byte positions whose value is the same in every record (framing and protobuf tags/lengths)."""
        variable = np.zeros(self.record_bytes, dtype=bool)
        for key, size in (("dense", 4 * self.n_dense), ("label", 1), ("sparse", self.id_width * self.n_sparse)):
            variable[self.offsets[key]: self.offsets[key] + size] = True
        return np.concatenate([np.arange(12), 12 + np.flatnonzero(~variable)])

    def constant_bytes(self):
        return np.frombuffer(self.frame_header() + self._template, np.uint8)[self.constant_positions()]

    def constant_runs(self):
        """The constant frame bytes as contiguous runs: [(start, end, bytes)], in frame order."""
        positions = self.constant_positions()
        frame = np.frombuffer(self.frame_header() + self._template, np.uint8)
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        return [(int(run[0]), int(run[-1]) + 1, frame[run[0]: run[-1] + 1].tobytes())
                for run in np.split(positions, breaks)]

    def to_dict(self):
        return {"n_dense": self.n_dense, "n_sparse": self.n_sparse, "id_width": self.id_width,
                "record_bytes": self.record_bytes}

    @classmethod
    def from_dict(cls, data):
        layout = cls(int(data["n_dense"]), int(data["n_sparse"]), int(data["id_width"]))
        if int(data.get("record_bytes", layout.record_bytes)) != layout.record_bytes:
            raise ValueError(f"fixed record layout {data} does not add up: its record is {layout.record_bytes} bytes")
        return layout


def serialize_fixed(layout, label, dense, ids):
    """Serialized fixed-width tf.train.Example bytes, one per row (see `fixed_rows` for the arguments)."""
    rows = fixed_rows(layout, label, dense, ids)
    flat, size = rows.tobytes(), layout.record_bytes
    return [flat[i * size: (i + 1) * size] for i in range(rows.shape[0])]


def fixed_rows(layout, label, dense, ids):
    """Fixed-width tf.train.Example records as a uint8 matrix [N, record_bytes], one record per row.

    Args:
        layout: the FixedLayout.
        label: int [N] of 0/1.
        dense: float [N, n_dense], stored as float32.
        ids: int [N, n_sparse], each in [0, 2^(7 * id_width)).

    Raises:
        ValueError: shapes that do not match the layout, a label other than 0/1, an id out of range.
    """
    label = np.asarray(label).reshape(-1)
    n = label.shape[0]
    dense = np.asarray(dense, dtype=np.float32).reshape(n, -1) if n else np.zeros((0, layout.n_dense), np.float32)
    ids = np.asarray(ids).reshape(n, -1) if n else np.zeros((0, layout.n_sparse), np.int64)
    if dense.shape != (n, layout.n_dense) or ids.shape != (n, layout.n_sparse):
        raise ValueError(f"expected dense [N, {layout.n_dense}] and ids [N, {layout.n_sparse}], got {dense.shape} and "
                         f"{ids.shape}")
    if n and not np.isin(label, (0, 1)).all():
        raise ValueError("fixed-width records hold labels 0 or 1 only")
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << (7 * layout.id_width)):
        raise ValueError(f"ids must lie in [0, 2^{7 * layout.id_width}) for id_width {layout.id_width}, got "
                         f"[{ids.min()}, {ids.max()}]")
    rows = np.empty((n, layout.record_bytes), dtype=np.uint8)
    rows[:] = np.frombuffer(layout.template, np.uint8)
    offsets = layout.offsets
    rows[:, offsets["label"]] = label
    if layout.n_dense:
        rows[:, offsets["dense"]: offsets["dense"] + 4 * layout.n_dense] = dense.astype("<f4").view(np.uint8)
    if layout.n_sparse:
        values = ids.astype(np.uint64)
        shifts = (7 * np.arange(layout.id_width)).astype(np.uint64)
        groups = ((values[..., None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)
        groups[..., :-1] |= 0x80  # continuation bit on every byte but the last: a padded varint
        rows[:, offsets["sparse"]: offsets["sparse"] + layout.id_width * layout.n_sparse] = groups.reshape(n, -1)
    return rows


def tfrecord_frames(layout, rows):
    """TFRecord frames of fixed-width records [N, record_bytes]: [N, frame_bytes] uint8, exactly the bytes
    `tf.io.TFRecordWriter` writes for them (length, masked CRC of the length, data, masked CRC of the data)."""
    n = rows.shape[0]
    frames = np.empty((n, layout.frame_bytes), dtype=np.uint8)
    frames[:, :12] = np.frombuffer(layout.frame_header(), np.uint8)
    frames[:, 12:12 + layout.record_bytes] = rows
    frames[:, 12 + layout.record_bytes:] = masked_crc32c_rows(rows).astype("<u4").view(np.uint8).reshape(n, 4)
    return frames


class FixedShardWriter(ShardWriter):
    """Writes fixed-width records into numbered TFRecord shards of at most `rows_per_shard` records, without
    TensorFlow (frames and CRCs are computed in NumPy, a block at a time).

    `tfcompress.data.tfrecord.ShardWriter`'s shards (names, temporary files renamed when full or closed, `abort`),
    written with `write_rows` a block at a time into plain files.

    Args:
        directory: where the shards go (created if missing).
        layout: the FixedLayout of the records.
        rows_per_shard: records per shard, >= 1.
        prefix: shard file prefix.
    """

    def __init__(self, directory, layout, rows_per_shard, prefix="part"):
        super().__init__(directory, rows_per_shard, prefix)
        self.layout = layout

    def _open_file(self, path):
        return open(path, "wb")  # the frames carry their own TFRecord length and CRC fields

    def write_rows(self, rows):
        """Append records given as a uint8 matrix [N, record_bytes] (`fixed_rows`)."""
        frames = tfrecord_frames(self.layout, rows)
        start = 0
        while start < frames.shape[0]:
            take = min(frames.shape[0] - start, self._room())
            self._writer.write(frames[start:start + take].tobytes())
            start += take
            self._wrote(take)


# Where a frame came from, packed into one int64 per row as the reader carries it through shuffle and rebatch:
# file index (into the reader's file list) << WHERE_FILE_SHIFT | byte offset of the frame in that file.
WHERE_FILE_SHIFT = 40
_CHECK_CHUNK_ELEMENTS = 1 << 17  # table lookups per NumPy call when checking CRCs (buffers stay in L2)
_GROUP_ROWS = 128  # rows per group of the whole-batch CRC's first level of lookups
_INNER_OFFSETS = np.arange(_GROUP_ROWS * 8, dtype=np.intp) * 256


def _position_tables(length):
    """[length, 256] uint32: entry [j, b] is the CRC-32C contribution of byte value b at position j of a message of
    `length` bytes (the linear part: no initial value, no final xor). CRC-32C is affine in the message bits, so
    crc32c(x) = crc32c(y) ^ XOR_j tables[j, x_j ^ y_j] for any two messages x, y of that length."""
    t0 = _CRC_TABLES[0]
    tables = np.empty((length, 256), dtype=np.uint32)
    current = t0.copy()  # byte b at the last position
    for j in range(length - 1, -1, -1):
        tables[j] = current
        current = t0[current & np.uint32(0xFF)] ^ (current >> np.uint32(8))  # one more zero byte after it
    return tables


# ---- CRC-32C algebra: what the stored per-record CRCs imply for the CRC of a whole batch ------------------------
#
# With raw(c, M) the CRC register after message M from register c, CRC-32C is crc(M) = raw(~0, M) ^ ~0, and
# raw(c, M) = Z_|M|(c) ^ raw(0, M) with Z_n the linear map "n zero bytes". Hence crc(A + B) = Z_|B|(crc(A)) ^ crc(B)
# (zlib's crc32_combine), and the CRC of N frames laid end to end is XOR_r Z_{F (N-1-r)}(crc(frame_r)): the stored
# CRCs fix it. Linear maps of 32 bits are applied with four 256-entry tables (one per byte of the argument).


def _zero_bytes_images(count):
    """Images of the 32 unit vectors under Z_count (uint32 [32]), by square and multiply."""
    t0 = _CRC_TABLES[0]
    step = np.uint32(1) << np.arange(32, dtype=np.uint32)
    step = t0[step & np.uint32(0xFF)] ^ (step >> np.uint32(8))  # Z_1
    result = np.uint32(1) << np.arange(32, dtype=np.uint32)  # identity
    while count:
        if count & 1:
            result = _apply_linear(_linear_tables(step), result)
        step = _apply_linear(_linear_tables(step), step)
        count >>= 1
    return result


def _linear_tables(images):
    """[4, 256] uint32 tables of the linear map with these unit-vector images: map(v) = XOR_k T[k][byte k of v]."""
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # [256, 8]
    tables = np.zeros((4, 256), dtype=np.uint32)
    for k in range(4):
        for bit in range(8):
            tables[k] ^= np.where(bits[:, bit] == 1, images[8 * k + bit], 0).astype(np.uint32)
    return tables


def _apply_linear(tables, values):
    values = np.asarray(values, dtype=np.uint32)
    mask = np.uint32(0xFF)
    return (tables[0].take(values & mask) ^ tables[1].take((values >> np.uint32(8)) & mask)
            ^ tables[2].take((values >> np.uint32(16)) & mask) ^ tables[3].take(values >> np.uint32(24)))


def _unmask(masked):
    value = masked - np.uint32(0xA282EAD8)  # wraps in uint32
    return (value << np.uint32(15)) | (value >> np.uint32(17))


_NATIVE_CRC = {}  # "function": the native CRC-32C of a buffer, or None when unavailable


def native_crc32c():
    """TensorFlow's own hardware CRC-32C (absl's, inside libtensorflow_framework), as f(uint8 array) -> int, or
    None where it cannot be found or gives a wrong answer on test data (then the NumPy per-record CRC is used).

    TensorFlow has no CRC op, but its framework library exports absl's CRC-32C; it is reached through ctypes,
    which releases the GIL while it runs. The symbol is versioned (absl's inline namespace), so another
    TensorFlow build may not have it: the function is found by name and checked against `crc32c` before use.
    Set TFCOMPRESS_NATIVE_CRC32C=0 to never use it.
    """
    if "function" in _NATIVE_CRC:
        return _NATIVE_CRC["function"]
    function = None
    if os.environ.get("TFCOMPRESS_NATIVE_CRC32C", "1") != "0" and sys.platform.startswith("linux"):
        try:
            spec = importlib.util.find_spec("tensorflow")
            library = ctypes.CDLL(os.path.join(os.path.dirname(spec.origin), "libtensorflow_framework.so.2"))
            names = [line for line in _ABSL_CRC_SYMBOLS if hasattr(library, line)]
            if names:
                extend = getattr(library, names[0])  # (crc32c_t, std::string_view) -> crc32c_t
                extend.restype = ctypes.c_uint32
                extend.argtypes = [ctypes.c_uint32, ctypes.c_size_t, ctypes.c_void_p]

                def function(buffer):
                    buffer = np.ascontiguousarray(buffer, dtype=np.uint8)
                    return extend(0, buffer.size, buffer.ctypes.data)

                rng = np.random.default_rng(0)
                for size in (0, 1, 7, 8, 9, 63, 64, 65, 1000, 4099):
                    sample = rng.integers(0, 256, size, dtype=np.uint8)
                    if function(sample) != crc32c(sample.tobytes()):
                        function = None
                        break
        except Exception:  # noqa: BLE001 - any failure means: use the NumPy CRC
            function = None
    _NATIVE_CRC["function"] = function
    return function


# absl::crc_internal::ExtendCrc32cInternal(absl::crc32c_t, std::string_view), as TensorFlow 2.21's absl names it.
_ABSL_CRC_SYMBOLS = (
    "_ZN4absl12lts_2025081412crc_internal20ExtendCrc32cInternalENS0_8crc32c_tESt17basic_string_viewIcSt11char_"
    "traitsIcEE",
)


class FrameChecker:
    """Checks fixed-width TFRecord frames [N, frame_bytes] (uint8, one frame per row) in NumPy, a batch at a time.

    A frame passes when
    - its framing and protobuf bytes are those of the layout (the length, the length's masked CRC, every tag and
      length prefix: `FixedLayout.constant_runs`);
    - the masked CRC-32C of its data equals the stored one (TFRecord's data CRC);
    - its label byte is 0 or 1;
    - every id is a padded varint of `id_width` bytes (continuation bit set on all bytes but the last), so that the
      record means to protobuf what the fast decoder reads.

    `check` (what the reader runs on every batch) tests the batch as a whole, cheaply: the fixed bits of all frames
    in one pass of 64-bit words (`_structure_ok`), and the CRCs with `batch_crc_ok`: one hardware CRC-32C over the
    batch (TensorFlow's own, `native_crc32c`) against the value the stored CRCs imply. Only a batch that fails is
    checked record by record (`first_damaged`, exact) to name the damaged record.

    The exact per-record CRC (`masked_crc`; also the fallback without the native CRC) is vectorized over records:
    they have one length, the constant bytes contribute a constant, and CRC-32C is affine in the message bits, so a
    record's CRC is `base ^ XOR_j T_j[byte_j]` over its variable bytes (dense, label, ids) with one 256-entry table
    T_j per position: one table lookup per variable byte, for all rows of a chunk at once.

    Args:
        layout: the FixedLayout of the frames.
    """

    def __init__(self, layout):
        if sys.byteorder != "little":  # pragma: no cover - the index and word tricks below assume it
            raise ValueError("checking fixed-width records needs a little-endian machine")
        self.layout = layout
        size = {"dense": 4 * layout.n_dense, "label": 1, "sparse": layout.id_width * layout.n_sparse}
        self._regions = [(12 + layout.offsets[key], size[key]) for key in ("dense", "label", "sparse") if size[key]]
        variable = np.concatenate([np.arange(at - 12, at - 12 + n) for at, n in self._regions])
        self._table = np.ascontiguousarray(_position_tables(layout.record_bytes)[variable]).reshape(-1)
        self._lookups = variable.size
        self._chunk_rows = max(1, _CHECK_CHUNK_ELEMENTS // self._lookups)
        self._workspace = threading.local()  # per-thread buffers: tf.data calls the check from several threads
        self._base = np.uint32(crc32c(layout.template))  # the template holds zeros at the variable bytes
        self._runs = [(start, end, np.frombuffer(data, np.uint8)) for start, end, data in layout.constant_runs()]
        self._label_at = 12 + layout.offsets["label"]
        self._ids = (12 + layout.offsets["sparse"], layout.id_width * layout.n_sparse)
        continuation = np.array([0x80] * (layout.id_width - 1) + [0], np.uint8)
        self._continuation = np.tile(continuation, layout.n_sparse)
        # One pass checks the framing, label and varint bits of a frame: (frame ^ expected) & fixed_bits == 0,
        # with fixed_bits 0xFF at constant bytes, 0xFE at the label (0 or 1), 0x80 at id bytes (continuation bits)
        # and 0 at dense values and the data CRC. On 64-bit words over whole chunks of rows when they tile evenly.
        expected = np.zeros(layout.frame_bytes, np.uint8)
        fixed_bits = np.zeros(layout.frame_bytes, np.uint8)
        for start, end, data in self._runs:
            expected[start:end], fixed_bits[start:end] = data, 0xFF
        fixed_bits[self._label_at] = 0xFE
        ids_at, ids_size = self._ids
        expected[ids_at: ids_at + ids_size], fixed_bits[ids_at: ids_at + ids_size] = self._continuation, 0x80
        self._expected, self._fixed_bits = expected, fixed_bits
        self._tile_rows = 8 * max(1, (1 << 20) // (8 * layout.frame_bytes))  # rows * frame_bytes: a multiple of 8
        # The CRC of one frame when its data CRC is the stored s: base ^ Z_4(unmask(s)) ^ L_4(s), with L_4 the
        # linear part of the CRC of the 4 bytes of s (`_check_batch_crc`).
        header = layout.frame_header()
        self._frame_base = np.uint32(_apply_linear(_linear_tables(_zero_bytes_images(layout.record_bytes + 4)),
                                                   np.uint32(crc32c(header))) ^ crc32c(bytes(4)))
        # XOR_r Z_{F (N-1-r)}(that) in two levels of table lookups: within groups of _GROUP_ROWS rows, one table
        # per (row in the group, byte of unmask(s) or of s) holds the composite map, so a group is one lookup per
        # byte; then one table per group. Only the constant part depends on N (cached per N).
        stored_linear = _position_tables(4)  # the linear part of the CRC of the 4 bytes of s
        l4_images = np.array([stored_linear[bit // 8][1 << (bit % 8)] for bit in range(32)], dtype=np.uint32)
        z4_images = _zero_bytes_images(4)
        z_frame = _linear_tables(_zero_bytes_images(layout.frame_bytes))
        inner = np.empty((_GROUP_ROWS, 8, 256), dtype=np.uint32)
        shift = np.uint32(1) << np.arange(32, dtype=np.uint32)  # Z_{F d}, d = frames to the end of the group
        for row in range(_GROUP_ROWS - 1, -1, -1):
            inner[row, :4] = _linear_tables(_apply_linear(_linear_tables(shift), z4_images))
            inner[row, 4:] = _linear_tables(_apply_linear(_linear_tables(shift), l4_images))
            shift = _apply_linear(z_frame, shift)
        self._inner = inner.reshape(-1)
        self._group_shift = _linear_tables(shift)  # Z_{F * _GROUP_ROWS}
        self._outer_images = [np.uint32(1) << np.arange(32, dtype=np.uint32)]  # Z_{F G d}, d = 0, 1, ...
        self._outer = {}  # groups -> flat tables, group i shifted by (groups - 1 - i) groups
        self._constants = {}  # N -> XOR_r Z_{F (N-1-r)}(frame_base)
        self._z_frame = z_frame
        self._lock = threading.Lock()
        self._expected_words = np.tile(expected, self._tile_rows).view(np.uint64)
        self._fixed_words = np.tile(fixed_bits, self._tile_rows).view(np.uint64)

    def masked_crc(self, frames):
        """TFRecord's masked CRC-32C of the data of every frame: uint32 [N] (of the data as it is, whatever its
        framing bytes hold; `first_damaged` checks those separately)."""
        frames = np.asarray(frames, dtype=np.uint8)
        n, _ = self._batch_shape(frames)
        out = np.empty(n, dtype=np.uint32)
        index, index_bytes, parts = self._crc_buffers()
        for start in range(0, n, self._chunk_rows):
            stop = min(n, start + self._chunk_rows)
            rows = stop - start
            column = 0
            for at, size in self._regions:
                # Only the low byte of each index changes: the position bytes above it are preset once.
                index_bytes[:rows, column: column + size, 0] = frames[start:stop, at: at + size]
                column += size
            self._table.take(index[:rows], out=parts[:rows], mode="wrap")  # in range by construction
            np.bitwise_xor.reduce(parts[:rows], axis=1, out=out[start:stop])
        crc = out ^ self._base
        return ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)  # wraps in uint32

    def _crc_buffers(self):
        """This thread's (index intp [rows, lookups], its bytes [rows, lookups, 8], parts uint32 [rows, lookups]):
        index j of a row is byte_j + 256 * j, a position in the flat table, so its upper bytes never change."""
        buffers = getattr(self._workspace, "crc", None)
        if buffers is None:
            index = np.zeros((self._chunk_rows, self._lookups), dtype=np.intp)
            index_bytes = index.view(np.uint8).reshape(self._chunk_rows, self._lookups, index.itemsize)
            position = np.arange(self._lookups, dtype=np.int64) * 256  # little-endian, like the machine
            index[:] = position
            buffers = self._workspace.crc = (index, index_bytes, np.empty(index.shape, dtype=np.uint32))
        return buffers

    def stored_crc(self, frames):
        """The data CRC field of every frame (its last 4 bytes, little-endian): uint32 [N]."""
        frames = np.asarray(frames, dtype=np.uint8)
        n, width = self._batch_shape(frames)
        return np.ascontiguousarray(frames[:, width - 4:]).view("<u4").reshape(n)

    def first_damaged(self, frames):
        """None when every frame passes, else (row, reasons): the first failing row and what is wrong with it."""
        frames = np.asarray(frames, dtype=np.uint8)
        n, _ = self._batch_shape(frames)
        if n == 0:
            return None
        ids_at, ids_size = self._ids
        ids = frames[:, ids_at: ids_at + ids_size]
        computed = self.masked_crc(frames)
        stored = self.stored_crc(frames)
        if np.array_equal(computed, stored) and self._structure_ok(frames):
            return None
        layout_bad = np.zeros(n, dtype=bool)
        for start, end, expected in self._runs:
            layout_bad |= (frames[:, start:end] != expected).any(axis=1)
        label_bad = frames[:, self._label_at] > 1
        crc_bad = computed != stored
        varint_bad = ((ids & np.uint8(0x80)) != self._continuation).any(axis=1) if ids_size else np.zeros(n, bool)
        row = int(np.argmax(layout_bad | label_bad | crc_bad | varint_bad))
        reasons = []
        if layout_bad[row]:
            position = next(start + int(np.argmax(frames[row, start:end] != expected))
                            for start, end, expected in self._runs if (frames[row, start:end] != expected).any())
            part = ("its length field" if position < 8 else "the CRC of its length" if position < 12
                    else "its protobuf framing (tags and length prefixes)")
            reasons.append(f"{part} differs from the fixed-width layout declared in schema.json (frame byte "
                           f"{position} is 0x{frames[row, position]:02x})")
        if crc_bad[row]:
            reasons.append(f"its data CRC does not match (stored 0x{stored[row]:08x}, computed 0x{computed[row]:08x})")
        if label_bad[row]:
            reasons.append(f"its label byte is {frames[row, self._label_at]}, not 0 or 1")
        if varint_bad[row]:
            reasons.append(f"an id is not a {self.layout.id_width}-byte padded varint (continuation bits)")
        return row, reasons

    def batch_crc_ok(self, frames):
        """Whether the CRC-32C of all frames laid end to end equals the one their stored data CRCs imply (None
        without the native CRC-32C). One pass of hardware CRC over the batch instead of a CRC per record.

        CRC-32C is linear, so the difference between the two is XOR_r Z_{F (N-1-r)}(e_r) with e_r the error of
        record r's CRC: damage in one record always shows (Z is invertible). Damage in several records of a batch
        escapes only when the errors cancel: about 1 in 2^32 for random damage; the same damage in two records or
        in all of them only for one error value in 2^32 (the polynomial is (x+1) times a primitive one of period
        2^31 - 1 bits, longer than any batch). A batch that fails is then checked record by record.
        """
        native = native_crc32c()
        if native is None:
            return None
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        n, _ = self._batch_shape(frames)
        if n == 0:
            return True
        return self._implied_crc(self.stored_crc(frames)) == native(frames.reshape(-1))

    def _implied_crc(self, stored):
        """The CRC-32C of N frames end to end whose data CRCs are `stored` (uint32 [N]): XOR_r Z_{F (N-1-r)}(e_r),
        e_r = frame_base ^ Z_4(unmask(s_r)) ^ L_4(s_r), as (the constant part for N) ^ two levels of lookups."""
        n = stored.size
        groups = -(-n // _GROUP_ROWS)
        pad = groups * _GROUP_ROWS - n  # zero rows in front contribute nothing to the linear part
        values = np.zeros((groups * _GROUP_ROWS, 2), dtype=np.uint32)
        values[pad:, 0] = _unmask(stored)
        values[pad:, 1] = stored
        index = values.view(np.uint8).reshape(groups, _GROUP_ROWS * 8).astype(np.intp)
        index += _INNER_OFFSETS  # column (row, byte) looks up its own 256-entry table
        inner = np.bitwise_xor.reduce(self._inner.take(index, mode="wrap"), axis=1)  # [groups]
        outer_tables, outer_offsets = self._outer_tables(groups)
        outer_index = inner.view(np.uint8).reshape(-1).astype(np.intp) + outer_offsets
        return int(np.bitwise_xor.reduce(outer_tables.take(outer_index, mode="wrap"))) ^ self._constant(n)

    def _outer_tables(self, groups):
        """Flat tables of Z_{F G (groups-1-i)} for i = 0 .. groups-1 and the offsets of their 4 byte tables."""
        cached = self._outer.get(groups)
        if cached is None:
            with self._lock:  # tf.data checks batches on several threads
                while len(self._outer_images) < groups:
                    self._outer_images.append(_apply_linear(self._group_shift, self._outer_images[-1]))
                tables = np.stack([_linear_tables(self._outer_images[groups - 1 - i]) for i in range(groups)])
                cached = self._outer[groups] = (tables.reshape(-1), np.arange(groups * 4, dtype=np.intp) * 256)
        return cached

    def _constant(self, n):
        """XOR_r Z_{F (n-1-r)}(frame_base) for r < n (the part of `_implied_crc` that does not depend on s)."""
        constant = self._constants.get(n)
        if constant is None:
            value, step, count = np.uint32(0), np.uint32(self._frame_base), n  # binary: value of `count` frames
            z = self._z_frame  # Z_{F 2^k}
            while count:
                if count & 1:  # append 2^k more frames after the ones in value
                    value = _apply_linear(z, value) ^ step
                step = _apply_linear(z, step) ^ step
                z = _linear_tables(_apply_linear(z, _apply_linear(z, np.uint32(1) << np.arange(32, dtype=np.uint32))))
                count >>= 1
            constant = self._constants[n] = int(value)
        return constant

    def check(self, frames, where=None, files=None):
        """Raise ValueError naming the first damaged frame: its file and byte offset when `where` (int64 [N],
        file index << WHERE_FILE_SHIFT | byte offset) and `files` are given, else its row in the batch.

        The batch is checked as a whole first (`_structure_ok`, `batch_crc_ok`, or the per-record CRCs without the
        native CRC); only a batch that fails is checked record by record (`first_damaged`) to name the record.
        """
        frames = np.asarray(frames, dtype=np.uint8)
        if self._structure_ok(frames):
            crc_ok = self.batch_crc_ok(frames)
            if crc_ok is None:
                crc_ok = np.array_equal(self.masked_crc(frames), self.stored_crc(frames))
            if crc_ok:
                return
        damaged = self.first_damaged(frames)
        if damaged is None:  # pragma: no cover - the whole-batch CRC and the per-record CRCs disagree: a bug
            raise ValueError(f"a batch of {len(frames)} fixed-width records fails its CRC check as a whole, but no "
                             "single record does; read with fixed_width=False and report this")
        row, reasons = damaged
        if where is not None and files is not None:
            position = int(where[row])
            path, offset = files[position >> WHERE_FILE_SHIFT], position & ((1 << WHERE_FILE_SHIFT) - 1)
            place = f"{path} at byte offset {offset} (record {offset // self.layout.frame_bytes})"
        else:
            place = f"row {row} of a batch of {len(frames)} frames"
        raise ValueError(f"damaged fixed-width record in {place}: {'; '.join(reasons)}. The file is damaged or was "
                         "not written with the layout in schema.json; rewrite it (rerun the conversion)")

    def _structure_ok(self, frames):
        """Whether every frame's fixed bits (framing, tags, label 0/1, varint continuation bits) are right."""
        n, tile = frames.shape[0], self._tile_rows
        whole = n - n % tile if frames.flags.c_contiguous else 0
        scratch = getattr(self._workspace, "words", None)
        if scratch is None:
            scratch = self._workspace.words = np.empty(self._expected_words.size, np.uint64)
        for start in range(0, whole, tile):
            words = frames[start:start + tile].reshape(-1).view(np.uint64)
            np.bitwise_xor(words, self._expected_words, out=scratch)
            np.bitwise_and(scratch, self._fixed_words, out=scratch)
            if scratch.any():
                return False
        return not ((frames[whole:] ^ self._expected) & self._fixed_bits).any()

    def _batch_shape(self, frames):
        if frames.ndim != 2 or frames.shape[1] != self.layout.frame_bytes:
            raise ValueError(f"expected frames [N, {self.layout.frame_bytes}], got {frames.shape}")
        return frames.shape


class _ExitGuard:
    """Keeps the check's NumPy calls out of interpreter shutdown.

    tf.data runs the check (a `tf.numpy_function`) on its own threads. A thread that wants the GIL after Python has
    begun finalizing is stopped for good, so an iterator destroyed during finalization (one still referenced by a
    module global at exit) would wait forever for that call. At exit (atexit runs before finalization), new calls
    fail at once and the guard waits, up to `limit` seconds, until no call has run for `quiet` seconds: by then the
    pipeline's buffers are full or failed, nothing calls into Python any more, and the process exits.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._calls, self._last, self._closing, self._registered = 0, 0.0, False, False

    def register(self):
        with self._lock:
            if not self._registered:
                atexit.register(self.quiesce)
                self._registered = True

    def __enter__(self):
        with self._lock:
            if self._closing:
                raise RuntimeError("the Python interpreter is exiting")
            self._calls += 1

    def __exit__(self, *exc):
        with self._lock:
            self._calls -= 1
            self._last = time.monotonic()
        return False

    def quiesce(self, quiet=0.2, limit=5.0):
        with self._lock:
            self._closing = True
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self._lock:
                if self._calls == 0 and time.monotonic() - self._last >= quiet:
                    return
            time.sleep(0.01)


_EXIT_GUARD = _ExitGuard()


def decoder(layout, check_data=False, files=None):
    """A function: uint8 frames [B, frame_bytes] (and optionally their int64 [B] positions, `WHERE_FILE_SHIFT`)
    -> ({"dense": f32 [B, n_dense], "sparse": i64 [B, n_sparse]}, label f32 [B, 1]).

    Without `check_data` it checks every frame's constant bytes (framing, tags, lengths) in graph. With it (what
    `read` uses) it runs `FrameChecker.check` on every batch instead, as a tf.numpy_function: the constant bytes,
    the data CRCs, the label (0 or 1) and the varint continuation bits; a damaged frame is an InvalidArgumentError
    naming the file in `files` and the frame's byte offset (`_ExitGuard` keeps these calls out of interpreter
    shutdown).
    """
    import tensorflow as tf  # lazily: the converter's workers use this module without TensorFlow

    if sys.byteorder != "little":  # pragma: no cover - tf.bitcast reads floats in the machine's byte order
        raise ValueError("fixed-width decoding needs a little-endian machine")
    # Contiguous slices, not a gather: a uint8 gather along axis 1 costs more than the whole decode.
    runs = [(start, end, tf.constant(np.frombuffer(data, np.uint8))) for start, end, data in layout.constant_runs()]
    base = 12  # frame header before the record
    dense_at, label_at, sparse_at = (base + layout.offsets[k] for k in ("dense", "label", "sparse"))
    shifts = tf.constant(7 * np.arange(layout.id_width), tf.int64)
    word = {1: tf.uint8, 2: tf.uint16, 4: tf.uint32, 8: tf.uint64}.get(layout.id_width)  # bitcast-able widths

    checker = FrameChecker(layout) if check_data else None
    files = None if files is None else [os.fspath(f) for f in files]

    def verified_labels(frames, where=None):
        with _EXIT_GUARD:
            checker.check(frames, where, files)
            return frames[:, label_at: label_at + 1].astype(np.float32)

    if checker is not None:
        _EXIT_GUARD.register()

    def decode(frames, where=None):
        batch = tf.shape(frames)[0]
        if checker is not None:
            # The label comes out of the check, so nothing can prune it away. NumPy releases the GIL in its loops:
            # parallel map calls check batches side by side.
            label = tf.numpy_function(verified_labels, [frames] if where is None else [frames, where], tf.float32,
                                      stateful=False, name="check_fixed_records")
            label.set_shape([frames.shape[0], 1])
        else:
            matches = tf.stack([tf.reduce_all(tf.equal(frames[:, start:end], expected))
                                for start, end, expected in runs])
            check = tf.debugging.Assert(
                tf.reduce_all(matches),
                ["a record does not have the fixed-width layout declared in schema.json (damaged file?)"])
            with tf.control_dependencies([check]):
                label = tf.cast(frames[:, label_at: label_at + 1], tf.float32)
        if layout.n_dense:
            dense = tf.bitcast(tf.reshape(frames[:, dense_at: dense_at + 4 * layout.n_dense], [-1, layout.n_dense, 4]),
                               tf.float32)
        else:
            dense = tf.zeros([batch, 0], tf.float32)
        if layout.n_sparse:
            groups = tf.reshape(frames[:, sparse_at: sparse_at + layout.id_width * layout.n_sparse],
                                [-1, layout.n_sparse, layout.id_width])
            if word is not None:
                # One machine word per id: the 7-bit group k sits at bits [8k, 8k + 7); x >> k moves it to
                # [7k, 7k + 7). W - 1 shifts, masks and ORs per id instead of W byte-sized int64 lanes.
                x = groups[..., 0] if layout.id_width == 1 else tf.bitcast(groups, word)
                value = tf.bitwise.bitwise_and(x, tf.constant(0x7F, word))
                for k in range(1, layout.id_width):
                    value = tf.bitwise.bitwise_or(value, tf.bitwise.bitwise_and(
                        tf.bitwise.right_shift(x, tf.constant(k, word)), tf.constant(0x7F << (7 * k), word)))
                sparse = tf.cast(value, tf.int64)
            else:
                groups = tf.bitwise.bitwise_and(tf.cast(groups, tf.int64), 0x7F)
                sparse = tf.reduce_sum(tf.bitwise.left_shift(groups, shifts), axis=-1)
        else:
            sparse = tf.zeros([batch, 0], tf.int64)
        return {"dense": dense, "sparse": sparse}, label

    return decode


def count_frames(path, layout):
    """The number of fixed-width records in a file, from its size.

    Raises:
        ValueError: a file whose size is not a whole number of frames (truncated, or not this layout).
    """
    import tensorflow as tf  # lazily: the converter's workers use this module without TensorFlow

    size = tf.io.gfile.stat(os.fspath(path)).length
    if size % layout.frame_bytes:
        raise ValueError(f"{path} is {size} bytes, not a whole number of {layout.frame_bytes}-byte fixed-width "
                         "records (truncated, or not written with the layout in schema.json)")
    return size // layout.frame_bytes


def file_segments(files, layout, block):
    """Per file, the (file index, path, record_bytes, header_bytes, footer_bytes) of FixedLengthRecordDatasets that
    read it, in order, in blocks of `block` frames: first one shorter block for the rest (frames % block), then the
    full blocks (nothing for an empty file).

    The short block comes first because FixedLengthRecordDataset skips `header_bytes` by reading them: a short block
    at the end would read the whole file once more to get there.

    Raises:
        ValueError: a file whose size is not a whole number of frames (truncated, or not this layout).
    """
    frame = layout.frame_bytes
    segments = []
    for index, path in enumerate(files):
        full, rest = divmod(count_frames(path, layout), block)
        if rest:
            segments.append((index, path, rest * frame, 0, full * block * frame))
        if full:
            segments.append((index, path, block * frame, rest * frame, 0))
    return segments
