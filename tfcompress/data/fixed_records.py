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

Layout of one record (keys sorted, as protobuf's deterministic serialization orders map keys):

    Example{ features{ "dense": float_list[n_dense], "label": int64_list[1], "sparse": int64_list[n_sparse] } }

Example:
    >>> layout = FixedLayout(n_dense=13, n_sparse=26, id_width=4)
    >>> records = serialize_fixed(layout, [1, 0], np.ones((2, 13)), np.arange(52).reshape(2, 26))
    >>> {len(r) for r in records} == {layout.record_bytes}
    True
"""

import dataclasses
import struct
import sys

import numpy as np

from tfcompress.data.tfrecord import ShardWriter

SCHEMA_KEY = "fixed_record"  # schema.json `extra` key that declares a dataset's records fixed width
FRAME_OVERHEAD = 16  # TFRecord framing: uint64 length, uint32 masked CRC of it, data, uint32 masked CRC of data


def _varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _crc32c(data):
    """CRC-32C (Castagnoli), bit by bit; only used on the 8 bytes of a frame's length field."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data):
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


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
        return length + struct.pack("<I", _masked_crc(length))

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


def decoder(layout):
    """A function: uint8 frames [B, frame_bytes] -> ({"dense": f32 [B, n_dense], "sparse": i64 [B, n_sparse]},
    label f32 [B, 1]), checking every frame's constant bytes (framing, tags, lengths) but not its data CRC."""
    import tensorflow as tf  # lazily: the converter's workers use this module without TensorFlow

    if sys.byteorder != "little":  # pragma: no cover - tf.bitcast reads floats in the machine's byte order
        raise ValueError("fixed-width decoding needs a little-endian machine")
    # Contiguous slices, not a gather: a uint8 gather along axis 1 costs more than the whole decode.
    runs = [(start, end, tf.constant(np.frombuffer(data, np.uint8))) for start, end, data in layout.constant_runs()]
    base = 12  # frame header before the record
    dense_at, label_at, sparse_at = (base + layout.offsets[k] for k in ("dense", "label", "sparse"))
    shifts = tf.constant(7 * np.arange(layout.id_width), tf.int64)
    word = {1: tf.uint8, 2: tf.uint16, 4: tf.uint32, 8: tf.uint64}.get(layout.id_width)  # bitcast-able widths

    def decode(frames):
        batch = tf.shape(frames)[0]
        matches = tf.stack([tf.reduce_all(tf.equal(frames[:, start:end], expected)) for start, end, expected in runs])
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


def file_segments(files, layout, block):
    """Per file, the (path, record_bytes, header_bytes, footer_bytes) of FixedLengthRecordDatasets that read it in
    blocks of `block` frames: full blocks, then one shorter block for the rest.

    Raises:
        ValueError: a file whose size is not a whole number of frames (truncated, or not this layout).
    """
    import tensorflow as tf  # lazily: the converter's workers use this module without TensorFlow

    frame = layout.frame_bytes
    segments = []
    for path in files:
        size = tf.io.gfile.stat(path).length
        if size % frame:
            raise ValueError(f"{path} is {size} bytes, not a whole number of {frame}-byte fixed-width records "
                             "(truncated, or not written with the layout in schema.json)")
        frames = size // frame
        full, rest = divmod(frames, block)
        if full:
            segments.append((path, block * frame, 0, rest * frame))
        if rest:
            segments.append((path, rest * frame, full * block * frame, 0))
    return segments
