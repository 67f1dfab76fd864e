"""The reader loses nothing and reads nothing silently wrong (issue 17).

- A damaged fixed-width record (any byte of its frame) is an error naming the file and the record's byte offset;
  so is a label other than 0 or 1, even under a valid CRC, on both read paths.
- A shard truncated at a record boundary, emptied, deleted, or a stray file added next to the shards is an error
  naming the split or shard with the expected and found counts (`check_counts=False` opts out).
- `shuffle=False` reads the rows in file order.

The expected values come from independent sources: TensorFlow's own TFRecordWriter / TFRecordDataset, the
converter's report.json and the generator's stats.json, and the rows as they were written.
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tfcompress.data import read
from tfcompress.data import fixed_records, tfrecord
from tfcompress.data.convert import convert
from tfcompress.data.schema import Schema
from tfcompress.data.synthetic import generate
from tfcompress.data.tfrecord import ShardWriter, serialize_rows

# ---- datasets -------------------------------------------------------------------------------------------------


def _criteo_tsv(path, n, seed):
    """A Criteo-TSV file: label, 13 counts (some empty), 26 8-digit hex ids (some empty)."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        dense = ["" if rng.random() < 0.2 else str(int(rng.integers(0, 50_000))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 2**32)):08x}" for _ in range(26)]
        lines.append("\t".join([str(int(rng.integers(0, 2)))] + dense + cats))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def converted_master(tmp_path_factory):
    """A converted (fixed-width) Criteo dataset with several train shards; tests damage copies of it."""
    root = tmp_path_factory.mktemp("converted")
    _criteo_tsv(root / "day_0", 1500, seed=17)
    convert([root / "day_0"], root / "out", "criteo-tsv", shard_bytes=40_000, max_ind_range=100_000)
    return root / "out"


@pytest.fixture
def converted(converted_master, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted_master, out)
    return out


@pytest.fixture(scope="module")
def synthetic_master(tmp_path_factory):
    """A generated dataset (canonical records, read by the generic path) with stats.json."""
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, dataset="criteo", rows=2500, eval_rows=300, seed=3, cardinality_scale=0.001, rows_per_shard=1000)
    return out


@pytest.fixture
def synthetic(synthetic_master, tmp_path):
    out = tmp_path / "synthetic"
    shutil.copytree(synthetic_master, out)
    return out


LAYOUT = fixed_records.FixedLayout(n_dense=2, n_sparse=2, id_width=2)


def _write_fixed(directory, n, shards, label=None):
    """Fixed-width shards (TensorFlow-free writer) of rows whose sparse[:, 0] is the row index."""
    index = np.arange(n)
    label = index % 2 if label is None else label
    rows = fixed_records.fixed_rows(LAYOUT, label, np.stack([index, -index], 1), np.stack([index, 7 * index], 1))
    writer = fixed_records.FixedShardWriter(directory, LAYOUT, rows_per_shard=-(-n // shards))
    writer.write_rows(rows)
    paths = writer.close()
    Schema(name="toy", dense_names=["a", "b"], sparse_names=["x", "y"], cardinalities=[1 << 14] * 2,
           extra={fixed_records.SCHEMA_KEY: LAYOUT.to_dict()}).save(directory)
    return paths


def _write_canonical(directory, n, shards, label=None):
    index = np.arange(n)
    label = index % 2 if label is None else label
    with ShardWriter(directory, -(-n // shards)) as writer:
        writer.write(serialize_rows(label, np.stack([index, -index], 1), np.stack([index, 7 * index], 1)))
    Schema(name="toy", dense_names=["a", "b"], sparse_names=["x", "y"], cardinalities=[1 << 14] * 2).save(directory)
    return writer.paths


def _rows(ds):
    sparse, label = [], []
    for features, y in ds:
        sparse.append(features["sparse"].numpy())
        label.append(y.numpy()[:, 0])
    return np.concatenate(sparse), np.concatenate(label)


def _count_records(path):
    return sum(1 for _ in tf.data.TFRecordDataset(str(path)))


def _frame_bytes(directory):
    return Schema.load(directory).extra[fixed_records.SCHEMA_KEY]["record_bytes"] + 16


def _shards(split_dir):
    return sorted(str(p) for p in split_dir.glob("*.tfrecord"))


# ---- damaged fixed-width records ------------------------------------------------------------------------------


def _flip(path, offset, mask):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= mask
    open(path, "wb").write(bytes(data))


# (where in the frame, relative to its start; the xor mask). The protobuf payload offsets come from the layout the
# schema declares; the framing is TFRecord's (8-byte length, its 4-byte CRC, data, 4-byte data CRC).
DAMAGE = {
    "label": lambda layout: (12 + layout.offsets["label"], 0x80),  # label 0/1 -> 128/129
    "dense": lambda layout: (12 + layout.offsets["dense"] + 5, 0x01),  # low mantissa bit of dense[1]
    "id": lambda layout: (12 + layout.offsets["sparse"] + 3 * layout.id_width, 0x01),  # lowest bit of sparse[3]
    "data_crc": lambda layout: (12 + layout.record_bytes + 2, 0x10),
    "length_crc": lambda layout: (9, 0x01),
    "protobuf_tag": lambda layout: (12 + 2, 0x01),  # the "dense" map entry's tag
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_fixed_width_record_names_file_and_byte_offset(converted, kind):
    train = converted / "train"
    before = _rows(read(train, 64, shuffle=False, repeat=False, deterministic=True))
    generic = _rows(read(train, 64, shuffle=False, repeat=False, deterministic=True, fixed_width=False))
    for a, b in zip(before, generic):  # undamaged: the fast path reads what parse_example reads
        np.testing.assert_array_equal(a, b)
    layout = fixed_records.FixedLayout.from_dict(Schema.load(converted).extra[fixed_records.SCHEMA_KEY])
    shard = _shards(train)[1]
    record = 7
    start = record * layout.frame_bytes
    where, mask = DAMAGE[kind](layout)
    _flip(shard, start + where, mask)
    # TensorFlow's own TFRecord reader agrees that the file is damaged (its CRCs no longer match).
    with pytest.raises(tf.errors.DataLossError):
        _count_records(shard)
    expected = re.escape(shard) + rf".*byte offset {start}\b.*record {record}\b"
    for shuffle in (True, False):
        with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
            _rows(read(train, 64, shuffle=shuffle, repeat=False, seed=0))


def test_damage_in_a_later_block_and_under_input_pipelines_names_the_right_record(converted):
    train = converted / "train"
    layout = fixed_records.FixedLayout.from_dict(Schema.load(converted).extra[fixed_records.SCHEMA_KEY])
    shard = _shards(train)[2]
    record = _count_records(shard) - 2  # in the file's last, shorter block
    start = record * layout.frame_bytes
    _flip(shard, start + 12 + layout.offsets["sparse"], 0x02)
    expected = re.escape(shard) + rf".*byte offset {start}\b.*record {record}\b"
    with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
        _rows(read(train, 50, repeat=False, seed=1, shuffle_block=16))
    # More pipelines than files: every pipeline reads every file, blocks are split between them; the one that
    # reads the damaged block names it.
    failures = 0
    for pipeline in range(8):
        context = tf.distribute.InputContext(num_input_pipelines=8, input_pipeline_id=pipeline)
        try:
            _rows(read(train, 50, repeat=False, seed=1, shuffle_block=16, input_context=context))
        except tf.errors.InvalidArgumentError as e:
            assert re.search(expected, str(e)), str(e)
            failures += 1
    assert failures == 1


def test_crc_of_the_fast_path_is_the_tfrecord_crc():
    rng = np.random.default_rng(5)
    for n_dense, n_sparse, bound in ((13, 26, 40_000_000), (0, 3, 2), (1, 1, 2**62), (3, 2, 2**40)):
        layout = fixed_records.FixedLayout.for_ids_below(n_dense, n_sparse, bound)
        label = rng.integers(0, 2, 300)
        dense = rng.normal(0, 1e4, (300, n_dense))
        ids = rng.integers(0, bound, (300, n_sparse), dtype=np.int64)
        records = fixed_records.serialize_fixed(layout, label, dense, ids)
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"crc_{os.getpid()}_{n_sparse}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:  # TensorFlow computes the CRCs
            for r in records:
                writer.write(r)
        frames = np.fromfile(path, np.uint8).reshape(300, layout.frame_bytes)
        os.remove(path)
        stored = frames[:, -4:].copy().view("<u4")[:, 0]
        checker = fixed_records.FrameChecker(layout)
        np.testing.assert_array_equal(checker.masked_crc(frames), stored)
        assert checker.first_damaged(frames) is None
        for n in (1, 2, 3, 77, 300):  # the whole-batch CRC (tree of power-of-two levels) for any batch size
            assert checker.batch_crc_ok(frames[:n]) is True
        for row, byte in ((0, 12), (299, layout.frame_bytes - 1), (150, 12 + layout.offsets["label"])):
            bad = frames.copy()
            bad[row, byte] ^= 0x04
            assert checker.first_damaged(bad)[0] == row
            assert checker.batch_crc_ok(bad) is False
            bad[(row + 101) % 300, byte] ^= 0x04  # the same damage in a second record does not cancel out
            assert checker.batch_crc_ok(bad) is False
            with pytest.raises(ValueError, match=f"row {min(row, (row + 101) % 300)} of a batch of 300"):
                checker.check(bad)


def test_native_crc32c_is_found_and_agrees():
    """The whole-batch check uses TensorFlow's own CRC-32C; on Linux with this TensorFlow it must be there (else
    the reader falls back to the 2-3x slower NumPy CRC per record, still correct: see the next test)."""
    native = fixed_records.native_crc32c()
    if not sys.platform.startswith("linux"):
        return
    assert native is not None
    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8)
    assert native(data) == tfrecord.crc32c(data.tobytes())
    assert native(data[:0]) == 0


def test_damage_is_found_without_the_native_crc(converted, monkeypatch):
    monkeypatch.setitem(fixed_records._NATIVE_CRC, "function", None)
    assert fixed_records.native_crc32c() is None
    train = converted / "train"
    layout = fixed_records.FixedLayout.from_dict(Schema.load(converted).extra[fixed_records.SCHEMA_KEY])
    shard = _shards(train)[0]
    _rows(read(train, 64, repeat=False))  # undamaged: reads
    _flip(shard, 3 * layout.frame_bytes + 12 + layout.offsets["dense"], 0x20)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=re.escape(shard) + rf".*byte offset {3 * layout.frame_bytes}\b.*CRC"):
        _rows(read(train, 64, repeat=False))


EXIT_SCRIPT = """
import sys
from tfcompress.data import read
iterator = iter(read(sys.argv[1], 64, seed=0))  # alive at exit, its pipeline busy checking batches
for _ in range(5):
    next(iterator)
print("done", flush=True)
"""


def test_process_exits_with_a_reader_still_running(converted):
    # The check runs as a tf.numpy_function on tf.data threads; without fixed_records._ExitGuard about half of
    # these processes hung at exit (an iterator destroyed during interpreter finalization waits for a call that
    # Python will never run).
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(converted / "train")], capture_output=True,
                                text=True, timeout=180, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert result.returncode == 0 and "done" in result.stdout, result.stderr[-2000:]


def test_label_outside_0_1_is_an_error_even_with_a_valid_crc(tmp_path):
    label = np.arange(40) % 2
    fast = tmp_path / "fast"
    paths = _write_fixed(fast, 40, 2)
    # Rewrite record 5 of the second shard with label byte 2 and a correct CRC, as a foreign writer could.
    frames = np.fromfile(paths[1], np.uint8).reshape(-1, LAYOUT.frame_bytes)
    rows = frames[:, 12:12 + LAYOUT.record_bytes].copy()
    rows[5, LAYOUT.offsets["label"]] = 2
    fixed_records.tfrecord_frames(LAYOUT, rows).tofile(paths[1])
    assert [r.numpy() for r in tf.data.TFRecordDataset(paths[1])]  # valid TFRecords: TensorFlow reads them
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=re.escape(paths[1]) + rf".*byte offset {5 * LAYOUT.frame_bytes}\b.*label"):
        _rows(read(fast, 8, repeat=False, seed=0))
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(paths[1]) + r".*record 5\b.*label.*2"):
        _rows(read(fast, 8, repeat=False, seed=0, fixed_width=False))
    # Canonical records: the generic path.
    label[33] = 3
    canonical = tmp_path / "canonical"
    paths = _write_canonical(canonical, 40, 2, label=label)
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(paths[1]) + r".*record 13\b.*label.*3"):
        _rows(read(canonical, 8, repeat=False, seed=0))


def test_id_varint_without_its_continuation_bits_is_an_error(tmp_path):
    paths = _write_fixed(tmp_path, 20, 1)
    frames = np.fromfile(paths[0], np.uint8).reshape(-1, LAYOUT.frame_bytes)
    rows = frames[:, 12:12 + LAYOUT.record_bytes].copy()
    rows[3, LAYOUT.offsets["sparse"]] &= 0x7F  # a 1-byte varint, then a stray byte: not this layout
    fixed_records.tfrecord_frames(LAYOUT, rows).tofile(paths[0])  # with a valid CRC
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=re.escape(paths[0]) + rf".*byte offset {3 * LAYOUT.frame_bytes}\b.*varint"):
        _rows(read(tmp_path, 8, repeat=False))


# ---- lost rows ------------------------------------------------------------------------------------------------


def _truncate_records(path, keep):
    """Keep the first `keep` records of a TFRecord file (cut at a record boundary), through TensorFlow."""
    records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    with tf.io.TFRecordWriter(path) as writer:
        for r in records[:keep]:
            writer.write(r)
    return len(records)


@pytest.mark.parametrize("dataset", ["converted", "synthetic"])
def test_shard_truncated_at_a_record_boundary_is_an_error(dataset, request):
    root = request.getfixturevalue(dataset)
    train = root / "train"
    expected = sum(_count_records(p) for p in _shards(train))
    shard = _shards(train)[1]
    had = _truncate_records(shard, _count_records(shard) - 3)
    assert os.path.getsize(shard) > 0 and had > 3
    found = expected - 3
    message = rf"'train'.*expected {expected} rows.*found {found}"
    for kwargs in ({}, {"shuffle": False}, {"fixed_width": False}):
        with pytest.raises(ValueError, match=message):
            read(train, 32, **kwargs)
    with pytest.raises(ValueError, match=message):
        read(str(train / "*.tfrecord"), 32)
    with pytest.raises(ValueError, match=message):
        read(_shards(train), 32)
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1)
    with pytest.raises(ValueError, match=message):
        read(train, 32, input_context=context)
    # Opting out reads what is there.
    sparse, _ = _rows(read(train, 32, repeat=False, shuffle=False, check_counts=False))
    assert len(sparse) == found


@pytest.mark.parametrize("dataset", ["converted", "synthetic"])
def test_emptied_shard_is_an_error_naming_it(dataset, request):
    train = request.getfixturevalue(dataset) / "train"
    shard = _shards(train)[-1]
    open(shard, "wb").close()
    with pytest.raises(ValueError, match=re.escape(shard) + r".*empty"):
        read(train, 32)
    with pytest.raises(ValueError, match=re.escape(shard) + r".*empty"):
        read([shard, _shards(train)[0]], 32)  # named on its own, without the rest of the split


def test_deleted_shard_is_an_error_naming_it(converted, synthetic):
    for root in (converted, synthetic):
        train = root / "train"
        shard = _shards(train)[0]
        os.remove(shard)
        with pytest.raises(ValueError, match=re.escape(os.path.basename(shard)) + r".*missing"):
            read(train, 32)
        with pytest.raises(ValueError, match=re.escape(os.path.basename(shard)) + r".*missing"):
            read(str(train / "part-*.tfrecord"), 32)
        # A pattern that does not ask for the deleted shard is fine.
        rest = [os.path.basename(p) for p in _shards(train)]
        read(str(train / rest[0]), 32)


def test_stray_file_among_the_shards_is_an_error(converted):
    train = converted / "train"
    stray = train / "part-99999-00000.tfrecord"
    shutil.copy(_shards(train)[0], stray)
    with pytest.raises(ValueError, match=re.escape(str(stray)) + r".*not one of the.*report.json"):
        read(train, 32)
    read(train, 32, check_counts=False)


def test_whole_splits_and_subsets_read_without_complaint(converted, synthetic):
    for root in (converted, synthetic):
        for split in ("train", "eval"):
            if not (root / split).is_dir():
                continue
            shards = _shards(root / split)
            rows = sum(_count_records(p) for p in shards)
            sparse, _ = _rows(read(root / split, 64, repeat=False, shuffle=False))
            assert len(sparse) == rows
            if len(shards) > 1:  # a subset of a split cannot be counted against it, so it reads as it is
                sparse, _ = _rows(read(shards[:1], 64, repeat=False))
                assert len(sparse) == _count_records(shards[0])


# ---- order ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", [_write_fixed, _write_canonical])
def test_shuffle_false_reads_rows_in_file_order(tmp_path, writer):
    paths = writer(tmp_path, 400, 4)
    for kwargs in ({}, {"shuffle_block": 8}, {"deterministic": False, "shuffle_block": 1}):
        sparse, label = _rows(read(tmp_path, 24, shuffle=False, repeat=False, **kwargs))
        np.testing.assert_array_equal(sparse[:, 0], np.arange(400))
        np.testing.assert_array_equal(label, np.arange(400) % 2)
    sparse, _ = _rows(read(list(reversed(paths)), 24, shuffle=False, repeat=False, shuffle_block=8))
    np.testing.assert_array_equal(sparse[:, 0], np.r_[300:400, 200:300, 100:200, 0:100])
