"""TFRecord shards -> tf.data.Dataset of ({"dense": f32[B, n_dense], "sparse": i64[B, n_sparse]}, label f32[B, 1]).

Pipeline (docs/tfrecord_layout.md): list files -> shard by input pipeline -> (shuffle file order) -> interleave
TFRecordDatasets in parallel, each cut into *blocks* of consecutive serialized records -> shuffle blocks -> (repeat)
-> rebatch blocks into batches -> parse_example on whole batches in parallel -> prefetch.

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
of TFRecordDataset too. Every record's framing and protobuf tags are checked; its data CRC is not.

The label comes out as float32 [B, 1] so that Keras' binary cross-entropy and AUC take it as is.

Example:
    >>> ds = read("data/synthetic/train", batch_size=1024, seed=0)
    >>> features, label = next(iter(ds))
    >>> features["dense"].shape, features["sparse"].shape, label.shape
    (TensorShape([1024, 13]), TensorShape([1024, 26]), TensorShape([1024, 1]))
"""

import glob
import os

import tensorflow as tf

from tfcompress.data import fixed_records
from tfcompress.data.schema import Schema, find_schema

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
    return spec


def example_parser(schema):
    """A function: serialized Examples string[B] -> ({"dense": f32[B, n_dense], "sparse": i64[B, n_sparse]},
    label f32[B, 1])."""
    spec = feature_spec(schema)

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, spec)
        batch = tf.shape(serialized)[0]
        dense = parsed["dense"] if schema.n_dense else tf.zeros([batch, 0], tf.float32)
        sparse = parsed["sparse"] if schema.n_sparse else tf.zeros([batch, 0], tf.int64)
        return {"dense": dense, "sparse": sparse}, tf.cast(parsed["label"], tf.float32)

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
         fixed_width=None):
    """A batched, parsed tf.data.Dataset over TFRecord shards in the layout of docs/tfrecord_layout.md.

    Args:
        files_or_pattern: a directory (all *.tfrecord in it), a glob pattern, one file, or a list of files.
        batch_size: rows per batch, >= 1. Under tf.distribute pass the per-replica size
            (`input_context.get_per_replica_batch_size(global_batch_size)`).
        schema: a `Schema`, or a path to schema.json / its directory; None loads schema.json from next to the
            first shard (its directory or that directory's parent).
        shuffle: shuffle file order and records (buffer of `shuffle_buffer` records).
        repeat: repeat forever (set `steps_per_epoch` in `fit`); False gives one pass.
        seed: seed of both shuffles; with `deterministic=True` the same seed gives the same order on every run.
        input_context: a `tf.distribute.InputContext`; pipeline `input_pipeline_id` of `num_input_pipelines`
            reads every num_input_pipelines-th file, or every num_input_pipelines-th record when there are fewer
            files than pipelines, so the pipelines together see every row exactly once per pass.
        deterministic: keep element order fixed under parallel reading and parsing. With `shuffle=False` it also
            reads files one after another, so rows come in file order (row i of the concatenated files is row i).
        drop_remainder: drop the last partial batch (static batch dimension).
        shuffle_buffer: records held by the shuffle, >= 1.
        shuffle_block: records read, interleaved and shuffled together as one block, >= 1 (None:
            min(256, shuffle_buffer // 16), at least 1). Smaller mixes finer and reads slower.
        fixed_width: None reads fixed-width records with the fast path when the schema declares them
            (extra.fixed_record), True requires that, False always parses with tf.io.parse_example.

    Returns:
        tf.data.Dataset of ({"dense": float32 [B, n_dense], "sparse": int64 [B, n_sparse]}, float32 [B, 1]).

    Raises:
        FileNotFoundError: no file matches, or no schema.json is found.
        ValueError: bad arguments, or the first record disagrees with the schema.
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

    shard_records = None
    if input_context is not None and input_context.num_input_pipelines > 1:
        count, index = input_context.num_input_pipelines, input_context.input_pipeline_id
        if len(files) >= count:
            files = files[index::count]
        else:
            # Too few files to give each pipeline its own: every pipeline reads all, keeps every count-th record
            # of each file.
            shard_records = (count, index)

    layout = _fixed_layout(schema, fixed_width, schema_source)
    if layout is not None:
        sources = fixed_records.file_segments(files, layout, block)
        if not sources:
            layout = None  # nothing but empty files: the generic path handles that
    if layout is None:
        sources = files

    def file_blocks(path):
        records = tf.data.TFRecordDataset(path, buffer_size=1 << 20)
        if shard_records is not None:
            records = records.shard(*shard_records)
        return records.batch(block)

    def segment_blocks(path, record_bytes, header_bytes, footer_bytes):
        chunks = tf.data.FixedLengthRecordDataset(path, record_bytes, header_bytes=header_bytes,
                                                  footer_bytes=footer_bytes, buffer_size=1 << 20)
        if shard_records is not None:
            chunks = chunks.shard(*shard_records)
        return chunks.map(lambda chunk: tf.reshape(tf.io.decode_raw(chunk, tf.uint8), [-1, layout.frame_bytes]))

    if layout is None:
        ds = tf.data.Dataset.from_tensor_slices(sources)
    else:
        paths, record_bytes, header_bytes, footer_bytes = zip(*sources)
        ds = tf.data.Dataset.from_tensor_slices((list(paths), tf.constant(record_bytes, tf.int64),
                                                 tf.constant(header_bytes, tf.int64),
                                                 tf.constant(footer_bytes, tf.int64)))
    if shuffle and len(sources) > 1:
        ds = ds.shuffle(len(sources), seed=seed, reshuffle_each_iteration=True)
    sequential = deterministic and not shuffle
    ds = ds.interleave(
        file_blocks if layout is None else segment_blocks,
        cycle_length=1 if sequential else min(len(sources), MAX_INTERLEAVE_FILES),
        block_length=1,
        num_parallel_calls=None if sequential else tf.data.AUTOTUNE,
        deterministic=None if sequential else deterministic,  # a sequential interleave is ordered anyway
    )
    if shuffle:
        ds = ds.shuffle(max(1, int(shuffle_buffer) // block), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.rebatch(int(batch_size), drop_remainder=drop_remainder)
    parse = example_parser(schema) if layout is None else fixed_records.decoder(layout)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    return ds.prefetch(tf.data.AUTOTUNE)


def _fixed_layout(schema, fixed_width, schema_source):
    """The FixedLayout the schema declares (None when it declares none or fixed_width is False)."""
    declared = schema.extra.get(fixed_records.SCHEMA_KEY) if isinstance(schema.extra, dict) else None
    if fixed_width is False:
        return None
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
