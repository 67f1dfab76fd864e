"""TFRecord shards -> tf.data.Dataset of ({"dense": f32[B, n_dense], "sparse": i64[B, n_sparse]}, label f32[B, 1]).

Pipeline (docs/tfrecord_layout.md): list files -> check row counts -> shard by input pipeline -> (shuffle file
order) -> interleave TFRecordDatasets in parallel, each cut into *blocks* of consecutive serialized records ->
shuffle blocks -> (repeat) -> rebatch blocks into batches -> parse_example on whole batches in parallel -> prefetch.

Why blocks: every element that passes through a tf.data stage costs a fixed overhead (interleave buffers, shuffle
buffer slots, batch copies), which at ~170-byte Criteo records is most of the work. Cutting each file into blocks of
`shuffle_block` records right after reading makes the interleave and the shuffle handle one element per block, and
`rebatch` joins blocks into batches with tensor slices, not per record. Parsing a batch at a time measured 4x faster
than per record on 2 cores; blocks measured 2-3x faster again than shuffling and batching single records (both side
by side in bench/bench_read.py). The price: records are shuffled in blocks of consecutive records (256 by default,
bounded by shuffle_buffer / 16) from up to 8 files at a time; rows that sit next to each other in a file tend to
land in the same batch, where their order does not matter to the loss. `shuffle_block=1` shuffles single records.

Fixed-width records (what `tfcompress data convert` writes; schema.json declares them under extra.fixed_record):
every record has the same length, so files are read with FixedLengthRecordDataset a block at a time and the fields
are sliced out of a byte matrix instead of parsed (`tfcompress.data.fixed_records`); that skips the per-record cost
of TFRecordDataset too. FixedLengthRecordDataset checks nothing, so every batch is checked here
(`fixed_records.FrameChecker`): framing and protobuf bytes, label 0 or 1, varint continuation bits, and the TFRecord
data CRCs (the batch's CRC-32C against the one its stored CRCs imply, then record by record where it fails).

Nothing lost, nothing silently wrong (docs/tfrecord_layout.md, "What the reader checks"): every row carries its file
and position through the pipeline, so a damaged record or a bad label is an InvalidArgumentError naming the file and
the record; before reading, the shards' rows are compared with the counts their writer recorded (`check_row_counts`).

The label comes out as float32 [B, 1] so that Keras' binary cross-entropy and AUC take it as is.

Example:
    >>> ds = read("data/synthetic/train", batch_size=1024, seed=0)
    >>> features, label = next(iter(ds))
    >>> features["dense"].shape, features["sparse"].shape, label.shape
    (TensorShape([1024, 13]), TensorShape([1024, 26]), TensorShape([1024, 1]))
"""

import fnmatch
import glob
import json
import os

import numpy as np
import tensorflow as tf

from tfcompress.data import fixed_records
from tfcompress.data.schema import SCHEMA_FILENAME, Schema, find_schema
from tfcompress.data.tfrecord import count_records

DEFAULT_SHUFFLE_BUFFER = 65536  # records (~150 bytes each serialized): ~10 MB, mixes rows across 8 interleaved files
DEFAULT_SHUFFLE_BLOCK = 256  # consecutive records that travel together through interleave and shuffle
MIN_BLOCKS_IN_SHUFFLE_BUFFER = 16
MAX_INTERLEAVE_FILES = 8


def list_files(files_or_pattern):
    """TFRecord paths named by a directory (its *.tfrecord, sorted), a glob pattern (sorted), a path, or a list.

    Raises:
        FileNotFoundError: nothing matches (the message names what was given).
    """
    if isinstance(files_or_pattern, (str, os.PathLike)):
        spec = os.fspath(files_or_pattern)
        if tf.io.gfile.isdir(spec):  # gfile, so gs:// and other TF filesystems work too
            files = sorted(tf.io.gfile.glob(os.path.join(spec, "*.tfrecord")))
            if not files:
                raise FileNotFoundError(f"no *.tfrecord files in directory {spec}")
            return files
        if glob.has_magic(spec):
            files = sorted(tf.io.gfile.glob(spec))
            if not files:
                raise FileNotFoundError(f"no files match the pattern {spec!r}")
            return files
        if not tf.io.gfile.exists(spec):
            raise FileNotFoundError(f"TFRecord file {spec} does not exist")
        return [spec]
    files = [os.fspath(f) for f in files_or_pattern]
    if not files:
        raise FileNotFoundError("the list of TFRecord files is empty")
    missing = [f for f in files if not tf.io.gfile.exists(f)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(files)} TFRecord files do not exist, e.g. {missing[0]}")
    return files


def feature_spec(schema):
    """The tf.io.parse_example spec of `schema` (docs/tfrecord_layout.md; keys with zero width are left out)."""
    spec = {"label": tf.io.FixedLenFeature([1], tf.int64)}
    if schema.n_dense:
        spec["dense"] = tf.io.FixedLenFeature([schema.n_dense], tf.float32)
    if schema.n_sparse:
        spec["sparse"] = tf.io.FixedLenFeature([schema.n_sparse], tf.int64)
    for name in schema.multi_names:  # variable-length: a RaggedTensor [B, None] per multi-valued column
        spec[name] = tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64)
    return spec


def example_parser(schema, files=None):
    """A function: serialized Examples string[B] (and optionally their int64 [B] positions: file index in `files`
    << fixed_records.WHERE_FILE_SHIFT | record index) -> ({"dense": f32[B, n_dense], "sparse": i64[B, n_sparse],
    and per multi-valued column NAME: i64 RaggedTensor [B, None]}, label f32[B, 1]). A label other than 0 or 1 is
    an InvalidArgumentError naming the file and record."""
    spec = feature_spec(schema)
    files = None if files is None else [os.fspath(f) for f in files]

    def report_label(label, where=None):  # called only when a label is neither 0 nor 1
        row = int(np.flatnonzero((label != 0) & (label != 1))[0])
        if where is not None and files is not None:
            position = int(where[row])
            place = (f"{files[position >> fixed_records.WHERE_FILE_SHIFT]}: record "
                     f"{position & ((1 << fixed_records.WHERE_FILE_SHIFT) - 1)}")
        else:
            place = f"row {row} of a batch of {len(label)} records"
        raise ValueError(f"{place} has label {int(label[row, 0])}, not 0 or 1 (the label is a click)")

    def parse(serialized, where=None):
        parsed = tf.io.parse_example(serialized, spec)
        batch = tf.shape(serialized)[0]
        label = parsed["label"]
        valid = tf.reduce_all(tf.logical_or(tf.equal(label, 0), tf.equal(label, 1)))
        inputs = [label] if where is None else [label, where]
        # The label passes through the check (a data dependency: nothing can prune the check away).
        checked = tf.cond(valid, lambda: label, lambda: tf.numpy_function(report_label, inputs, tf.int64))
        label = tf.ensure_shape(tf.cast(checked, tf.float32), label.shape)
        dense = parsed["dense"] if schema.n_dense else tf.zeros([batch, 0], tf.float32)
        sparse = parsed["sparse"] if schema.n_sparse else tf.zeros([batch, 0], tf.int64)
        features = {"dense": dense, "sparse": sparse}
        for name in schema.multi_names:
            features[name] = parsed[name]
        return features, label

    return parse


def check_first_record(path, schema, schema_source="the given schema"):
    """Parse the first record of `path` and compare its widths with `schema`; raises ValueError naming both.

    Catching a layout mismatch here gives a clear message up front instead of a parse error deep in training.
    """
    record = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
    if record is None:
        return  # an empty shard has nothing to disagree with
    try:
        example = tf.train.Example.FromString(record.numpy())
    except Exception as e:  # a DecodeError from protobuf; its type depends on the protobuf backend
        raise ValueError(f"{path}: record 0 is not a tf.train.Example ({e})") from e
    features = example.features.feature
    expected = {"label": ("int64_list", 1), "dense": ("float_list", schema.n_dense),
                "sparse": ("int64_list", schema.n_sparse)}
    for name in schema.multi_names:
        if name not in features or features[name].WhichOneof("kind") not in ("int64_list", None):
            raise ValueError(f"schema mismatch: {path} record 0 has no int64_list {name!r} (keys: {sorted(features)}), "
                             f"but {schema_source} declares the multi-valued field {name!r}")
    for key, (kind, width) in expected.items():
        if width == 0 and key not in features:
            continue
        if key not in features:
            raise ValueError(f"{path}: record 0 has no key {key!r} (keys: {sorted(features)}); expected the "
                             f"label/dense/sparse layout described by {schema_source}")
        values = getattr(features[key], kind).value
        if len(values) != width or features[key].WhichOneof("kind") not in (kind, None):
            raise ValueError(
                f"schema mismatch: {path} record 0 has {len(values)} {key!r} values "
                f"({features[key].WhichOneof('kind')}), but {schema_source} says {width} ({kind}); "
                f"schema {schema.name!r} has n_dense={schema.n_dense}, n_sparse={schema.n_sparse}"
            )


def read(files_or_pattern, batch_size, schema=None, shuffle=True, repeat=True, seed=None, input_context=None,
         deterministic=False, drop_remainder=False, shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, shuffle_block=None,
         fixed_width=None, check_counts=True):
    """A batched, parsed tf.data.Dataset over TFRecord shards in the layout of docs/tfrecord_layout.md.

    Args:
        files_or_pattern: a directory (all *.tfrecord in it), a glob pattern, one file, or a list of files.
        batch_size: rows per batch, >= 1. Under tf.distribute pass the per-replica size
            (`input_context.get_per_replica_batch_size(global_batch_size)`).
        schema: a `Schema`, or a path to schema.json / its directory; None loads schema.json from next to the
            first shard (its directory or that directory's parent).
        shuffle: shuffle file order and records (buffer of `shuffle_buffer` records). False reads the files one
            after another in the order listed (sorted for a directory or a pattern) and keeps every row in file
            order: row i of the concatenated files is row i of the dataset, whatever `deterministic` says.
        repeat: repeat forever (set `steps_per_epoch` in `fit`); False gives one pass.
        seed: seed of both shuffles; with `deterministic=True` the same seed gives the same order on every run.
        input_context: a `tf.distribute.InputContext`; pipeline `input_pipeline_id` of `num_input_pipelines`
            reads every num_input_pipelines-th file, or every num_input_pipelines-th record when there are fewer
            files than pipelines, so the pipelines together see every row exactly once per pass.
        deterministic: with `shuffle=True`, keep the order fixed under parallel reading and parsing, so the same
            seed gives the same order on every run (slower). `shuffle=False` is always in order.
        drop_remainder: drop the last partial batch (static batch dimension).
        shuffle_buffer: records held by the shuffle, >= 1.
        shuffle_block: records read, interleaved and shuffled together as one block, >= 1 (None:
            min(256, shuffle_buffer // 16), at least 1). Smaller mixes finer and reads slower.
        fixed_width: None reads fixed-width records with the fast path when the schema declares them
            (extra.fixed_record), True requires that, False always parses with tf.io.parse_example.
        check_counts: compare the rows in the shards with the counts their writer recorded (`check_row_counts`:
            report.json of `tfcompress data convert`, stats.json of the generator), before reading. False reads
            whatever rows are there (partial or trimmed data on purpose).

    Returns:
        tf.data.Dataset of ({"dense": float32 [B, n_dense], "sparse": int64 [B, n_sparse]}, float32 [B, 1]); a
        schema with multi-valued fields (`schema.multi_fields`) adds `features[name]`, an int64 RaggedTensor
        [B, None] of each one's ids (an empty row for an empty field).
        Iterating it raises InvalidArgumentError, naming the file and the record, on a damaged record (fixed-width
        records: any byte of the frame, by its data CRC and layout; other records: TensorFlow's TFRecord CRC
        checks) and on a label other than 0 or 1.

    Raises:
        FileNotFoundError: no file matches, or no schema.json is found.
        ValueError: bad arguments, the first record disagrees with the schema, or (check_counts) the shards hold
            other row counts than their writer recorded, or a recorded shard is missing, empty, or joined by a
            file the writer did not write.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if int(shuffle_buffer) != shuffle_buffer or shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be an integer >= 1, got {shuffle_buffer!r}")
    files = list_files(files_or_pattern)
    if schema is None:
        schema_source = find_schema(os.path.dirname(os.path.abspath(files[0])))
        schema = Schema.load(schema_source)
    elif not isinstance(schema, Schema):
        schema_source = find_schema(schema)
        schema = Schema.load(schema_source)
    else:
        schema_source = "the given schema"
    if tf.executing_eagerly():  # reading a record needs eager mode; inside a graph the parse errors still name it
        check_first_record(files[0], schema, schema_source)

    if shuffle_block is None:
        shuffle_block = max(1, min(DEFAULT_SHUFFLE_BLOCK, int(shuffle_buffer) // MIN_BLOCKS_IN_SHUFFLE_BUFFER))
    if int(shuffle_block) != shuffle_block or shuffle_block < 1:
        raise ValueError(f"shuffle_block must be an integer >= 1, got {shuffle_block!r}")
    block = int(shuffle_block)

    layout = _fixed_layout(schema, fixed_width, schema_source)
    if check_counts:
        declared = layout or _fixed_layout(schema, None, schema_source)  # counting by size is exact either way
        check_row_counts(files, files_or_pattern, declared)

    shard_records = None
    if input_context is not None and input_context.num_input_pipelines > 1:
        count, index = input_context.num_input_pipelines, input_context.input_pipeline_id
        if len(files) >= count:
            files = files[index::count]
        else:
            # Too few files to give each pipeline its own: every pipeline reads all, keeps every count-th record
            # (generic path) or block (fixed-width path) of each file.
            shard_records = (count, index)

    if layout is not None:
        sources = fixed_records.file_segments(files, layout, block)
        if not sources:
            layout = None  # nothing but empty files: the generic path handles that
    if layout is None:
        sources = list(enumerate(files))

    # Every row travels with its position, `where` = file index << WHERE_FILE_SHIFT | byte offset of the frame
    # (fixed-width) or record index (generic), so that a damaged record is reported with its file and place.
    file_base = 1 << fixed_records.WHERE_FILE_SHIFT

    def file_blocks(index, path):
        records = tf.data.TFRecordDataset(path, buffer_size=1 << 20)
        if shard_records is not None:
            records = records.shard(*shard_records)

        def with_where(block_index, serialized):
            k = block_index * block + tf.range(tf.shape(serialized, out_type=tf.int64)[0])
            record = k if shard_records is None else k * shard_records[0] + shard_records[1]
            return serialized, index * file_base + record

        return records.batch(block).enumerate().map(with_where)

    def segment_blocks(index, path, record_bytes, header_bytes, footer_bytes):
        chunks = tf.data.FixedLengthRecordDataset(path, record_bytes, header_bytes=header_bytes,
                                                  footer_bytes=footer_bytes, buffer_size=1 << 20).enumerate()
        if shard_records is not None:
            chunks = chunks.shard(*shard_records)

        def with_where(chunk_index, chunk):
            frames = tf.reshape(tf.io.decode_raw(chunk, tf.uint8), [-1, layout.frame_bytes])
            first = index * file_base + header_bytes + chunk_index * record_bytes
            return frames, first + tf.range(tf.shape(frames, out_type=tf.int64)[0]) * layout.frame_bytes

        return chunks.map(with_where)

    columns = list(zip(*sources))
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(columns[0], tf.int64), list(columns[1]),
                                             *(tf.constant(c, tf.int64) for c in columns[2:])))
    if shuffle and len(sources) > 1:
        ds = ds.shuffle(len(sources), seed=seed, reshuffle_each_iteration=True)
    blocks = file_blocks if layout is None else segment_blocks
    if shuffle:
        ds = ds.interleave(blocks, cycle_length=min(len(sources), MAX_INTERLEAVE_FILES), block_length=1,
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        ds = ds.shuffle(max(1, int(shuffle_buffer) // block), seed=seed, reshuffle_each_iteration=True)
    else:  # in file order: one file after another (parsing, after the rebatch, runs in parallel and in order)
        ds = ds.interleave(blocks, cycle_length=1)
    if repeat:
        ds = ds.repeat()
    ds = ds.rebatch(int(batch_size), drop_remainder=drop_remainder)
    if layout is None:
        parse = example_parser(schema, files)
    else:
        parse = fixed_records.decoder(layout, check_data=True, files=files)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic or not shuffle)
    return ds.prefetch(tf.data.AUTOTUNE)


def _fixed_layout(schema, fixed_width, schema_source):
    """The FixedLayout the schema declares (None when it declares none or fixed_width is False)."""
    declared = schema.extra.get(fixed_records.SCHEMA_KEY) if isinstance(schema.extra, dict) else None
    if fixed_width is False:
        return None
    if fixed_width or declared is not None:
        # Fixed-width records have no room for a variable-length feature: never read such a dataset without them.
        schema.require_no_multi_fields(f"the fixed-width reader (read(fixed_width={fixed_width}), {schema_source})")
    if declared is None:
        if fixed_width:
            raise ValueError(f"fixed_width=True, but {schema_source} declares no fixed-width records "
                             f"(extra.{fixed_records.SCHEMA_KEY})")
        return None
    layout = fixed_records.FixedLayout.from_dict(declared)
    if (layout.n_dense, layout.n_sparse) != (schema.n_dense, schema.n_sparse):
        raise ValueError(f"{schema_source}: extra.{fixed_records.SCHEMA_KEY} has {layout.n_dense} dense and "
                         f"{layout.n_sparse} sparse values, the schema {schema.n_dense} and {schema.n_sparse}")
    return layout


# ---- row counts ---------------------------------------------------------------------------------------------------

REPORT_FILENAME = "report.json"  # tfcompress.data.convert
STATS_FILENAME = "stats.json"  # tfcompress.data.synthetic
_COUNT_CACHE = {}  # (path, size, mtime_ns) -> records: counting canonical shards walks them


def check_row_counts(files, files_or_pattern=None, layout=None):
    """Compare the shards `files` with what their writer recorded; raises ValueError on any difference.

    A shard path DIR/SPLIT/NAME belongs to split SPLIT of the dataset DIR, whose writer recorded (first found):
    - DIR/report.json (`tfcompress data convert`): the shards of each split (`shards`) and its rows
      (`rows_per_split`);
    - DIR/stats.json (the synthetic generator): `splits.SPLIT.shards` and `splits.SPLIT.rows`;
    - DIR/schema.json `extra.splits` (the converter's rows per split, without the shard list): the split's shards
      are then the *.tfrecord files in DIR/SPLIT.
    Shards outside such a dataset are not checked. For each split touched:
    - a file the record does not list is an error (a stray or replaced file);
    - a listed shard that `files_or_pattern` asks for (the split's directory, or a pattern that matches it) and
      that does not exist is an error (a deleted shard);
    - an empty listed shard is an error (the writers never write an empty shard), and so is one with more rows
      than `rows_per_shard`;
    - when every shard of the split is read, their rows must add up to the recorded rows (a shard truncated at a
      record boundary or emptied shows here). A subset of a split is not added up: it has no recorded total.
    Rows are counted from the file size for fixed-width records (`layout`) and by walking the TFRecord headers
    otherwise (`tfcompress.data.tfrecord.count_records`, ~0.5 microseconds per record, cached per process).
    """
    by_split = {}
    for path in files:
        split_dir = os.path.dirname(_absolute(path))
        by_split.setdefault((os.path.dirname(split_dir), os.path.basename(split_dir)), []).append(path)
    for (root, split), paths in by_split.items():
        record = _split_record(root, split)
        if record is not None:
            _check_split(root, split, paths, record, files_or_pattern, layout)


def _split_record(root, split):
    """What the writer of dataset `root` recorded about `split`: {source, rows, shards (absolute paths, or None),
    rows_per_shard (or None)}, or None when nothing is recorded."""
    def load(name):
        path = os.path.join(root, name)
        if not tf.io.gfile.exists(path):
            return None
        try:
            with tf.io.gfile.GFile(path) as f:
                return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); it records the shards' row counts. Restore it, or "
                             "pass check_counts=False to read without checking them") from e

    schema = load(SCHEMA_FILENAME) or {}
    extra = schema.get("extra") if isinstance(schema.get("extra"), dict) else {}
    options = extra.get("options") if isinstance(extra.get("options"), dict) else {}
    report = load(REPORT_FILENAME)
    if report is not None and split in report.get("rows_per_split", {}):
        return {"source": os.path.join(root, REPORT_FILENAME), "rows": int(report["rows_per_split"][split]),
                "shards": [_absolute(os.path.join(root, p)) for p in report.get("shards", {}).get(split, [])],
                "rows_per_shard": options.get("rows_per_shard")}
    stats = load(STATS_FILENAME)
    if stats is not None and split in stats.get("splits", {}):
        entry = stats["splits"][split]
        return {"source": os.path.join(root, STATS_FILENAME), "rows": int(entry["rows"]),
                "shards": [_absolute(os.path.join(root, split, name)) for name in entry.get("shards", [])],
                "rows_per_shard": stats.get("options", {}).get("rows_per_shard")}
    if isinstance(extra.get("splits"), dict) and split in extra["splits"]:
        return {"source": os.path.join(root, SCHEMA_FILENAME) + " (extra.splits)",
                "rows": int(extra["splits"][split]), "shards": None, "rows_per_shard": options.get("rows_per_shard")}
    return None


def _check_split(root, split, paths, record, files_or_pattern, layout):
    source, listed = record["source"], record["shards"]
    opt_out = "; pass check_counts=False to read the files as they are"
    absolute = {_absolute(p): p for p in paths}
    if listed is not None:
        known = set(listed)
        stray = [p for a, p in absolute.items() if a not in known]
        if stray:
            raise ValueError(f"{stray[0]} is not one of the {len(listed)} shards {source} lists for split {split!r}"
                             f"{f' (and {len(stray) - 1} more such files)' if len(stray) > 1 else ''}: a stray or "
                             f"replaced file. Move it away{opt_out}")
        missing = [s for s in _asked_for(listed, files_or_pattern) if not tf.io.gfile.exists(s)]
        if missing:
            names = ", ".join(os.path.basename(s) for s in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ValueError(f"{names} of split {split!r} in {os.path.join(root, split)} "
                             f"{'is' if len(missing) == 1 else 'are'} missing: {source} lists {len(listed)} shards "
                             f"with {record['rows']} rows, {len(missing)} of them are gone{opt_out}")
    else:
        listed = [_absolute(p) for p in tf.io.gfile.glob(os.path.join(root, split, "*.tfrecord"))]
    counts = {p: _count_rows(p, layout) for p in paths}
    if record["shards"] is not None:
        for path, rows in counts.items():
            if rows == 0:
                raise ValueError(f"{path} is empty, but {source} lists it as a shard of split {split!r} (its writer "
                                 f"never leaves a shard empty): the file was emptied or replaced{opt_out}")
    limit = record["rows_per_shard"]
    for path, rows in counts.items():
        if isinstance(limit, int) and rows > limit:
            raise ValueError(f"{path} holds {rows} rows, more than the {limit} rows per shard its writer "
                             f"({source}) puts in a shard: a replaced file?{opt_out}")
    if set(listed) <= set(absolute):  # every shard of the split is read: the rows must add up
        found = sum(counts.values())
        if found != record["rows"]:
            shown = sorted(counts.items())
            detail = ", ".join(f"{os.path.basename(p)}: {n}" for p, n in shown[:12])
            raise ValueError(f"split {split!r} of {root}: expected {record['rows']} rows ({source}), found {found} in "
                             f"its {len(paths)} shards ({detail}{', ...' if len(shown) > 12 else ''}); a shard was "
                             f"truncated, emptied or replaced{opt_out}")


def _asked_for(listed, files_or_pattern):
    """The listed shards that `files_or_pattern` asks for: all of the split for its directory, those a glob pattern
    matches, none for explicit files (a missing one is already a FileNotFoundError)."""
    if not isinstance(files_or_pattern, (str, os.PathLike)):
        return []
    spec = _absolute(files_or_pattern)
    if tf.io.gfile.isdir(spec):
        return [s for s in listed if os.path.dirname(s) == spec]
    if glob.has_magic(spec):
        return [s for s in listed if fnmatch.fnmatchcase(s, spec)]
    return []


def _absolute(path):
    """An absolute local path; URLs of TensorFlow's file systems (gs://...) as they are."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


def _count_rows(path, layout):
    if layout is not None:
        return fixed_records.count_frames(path, layout)
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    except OSError:  # not a local file (gs://...): no cache
        return count_records(path)
    if key not in _COUNT_CACHE:
        _COUNT_CACHE[key] = count_records(path)
    return _COUNT_CACHE[key]
