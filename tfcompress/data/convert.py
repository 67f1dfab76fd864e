"""Raw click logs -> sharded TFRecords + schema.json + report.json + per-id counts (the `data convert` command).

    from tfcompress.data.convert import convert
    report = convert(["day_0.gz", "day_1.gz"], "data/criteo_tb", format="criteo-tsv", workers=2,
                     split="criteo-days", test_day=1)
    report["rows_read"] == report["rows_written"] + report["rows_rejected"]     # always

Output directory:

    schema.json              column names, table sizes (cardinalities), encoding, dense transform, options
    report.json              rows_read / rows_written / rows_rejected, rejections by reason, per split and file
    <split>/part-PPPPP-KKKKK.tfrecord   shard KKKKK of input piece PPPPP (splits: train, eval, test)
    counts/<split>.npz       per table: `ids_<name>` and `counts_<name>` (accesses of each id, nonzero only)
    quarantine.tsv           every rejected line: source file, line number, reason, the raw line
    vocabulary.npz           (encoding "vocab") `keys_<name>`: the key of id i + 1 at position i
    _state/                  plan and per-piece results; what lets a rerun skip finished work

How the work is cut (and why the output does not depend on the number of workers): the inputs are cut into
*pieces*, each one converted by one worker into its own shards. A plain text file is cut into byte ranges of about
`shard_bytes` at line starts (a first pass counts the lines of each range, so every piece knows the line number of
its first line); a `.gz` file or a Parquet file is one piece. Pieces are numbered in input order, rows keep their
input order inside a piece, and nothing a piece writes depends on another piece, so any worker count gives the same
bytes. The random train/eval split is a hash of (seed, file name, line number), not a random stream.

Records: by default every record has the same length (`tfcompress.data.fixed_records`: ids as padded varints, still
ordinary tf.train.Examples), which `tfcompress.data.read` loads several times faster, and which the workers frame
and checksum in NumPy without importing TensorFlow; `record_layout="canonical"` writes protobuf's shortest encoding
through tf.io.TFRecordWriter instead. Workers are started with the spawn method: a script that calls `convert` with
workers > 1 must do so under `if __name__ == "__main__":`.

Crash safety: shards are written under a temporary name and renamed when complete (`ShardWriter`); a piece is done
when its `_state/piece-PPPPP.json` exists, written after its shards, counts and quarantine. A rerun with the same
inputs and options skips done pieces and redoes the others from scratch (removing their leftovers), which gives
byte-identical output. Memory is constant in the input size: text is read a block at a time; what is held are
counts (per distinct id, not per row).
"""

import dataclasses
import glob
import gzip
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
import zlib

import numpy as np

from tfcompress._files import write_atomically
from tfcompress.data import encoding as enc
from tfcompress.data import fixed_records, formats
from tfcompress.data.encoding import splitmix64
from tfcompress.data.schema import Schema
from tfcompress.data.tfrecord import ShardWriter, serialize_rows

CONVERTER_VERSION = 1
SPLITS = ("none", "random", "criteo-days", "criteo-days-halves")
RECORD_LAYOUTS = ("fixed", "canonical")
DENSE_TRANSFORMS = ("log1p", "none")
DEFAULT_MAX_IND_RANGE = 40_000_000
DEFAULT_HASH_BUCKETS = 1 << 22
DEFAULT_SHARD_BYTES = 256 << 20
DEFAULT_ROWS_PER_SHARD = 1 << 21
BLOCK_BYTES = 4 << 20
PARQUET_BATCH_ROWS = 65536
DENSE_COUNT_LIMIT = 1 << 20  # tables up to this size count ids in a dense array; larger ones sort distinct ids
STATE_DIR = "_state"
REPORT_FILENAME = "report.json"
QUARANTINE_FILENAME = "quarantine.tsv"
VOCABULARY_FILENAME = "vocabulary.npz"


class ConvertError(ValueError):
    """A conversion that cannot go on or did not complete; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """Everything that decides the output bytes (stored in _state/plan.json; a rerun must match it).

    Args:
        format: one of `formats.FORMATS`.
        encoding: "hex-mod", "vocab" or "hash" (default: the format's).
        max_ind_range: hex-mod table size (and, with vocab, the modulus applied to hex keys first when set).
        min_count: vocab: keys seen fewer times in the training split map to id 0.
        hash_buckets: hash table size.
        dense_transform: "log1p" or "none" (default: the format's; Criteo: log1p as MLPerf).
        clip_negative: negative dense values -> 0 (MLPerf), before the transform.
        split: "none" (all rows -> train), "random" (eval_fraction of rows -> eval), "criteo-days" (file
            day_<test_day> -> eval, others -> train), "criteo-days-halves" (day_<test_day>: first half of its lines
            -> eval, second half -> test).
        eval_fraction: random split: fraction of rows in eval, in (0, 1).
        seed: random split seed (DLRM's Criteo Kaggle split uses 2020).
        test_day: criteo-days splits: the day number held out (MLPerf: 23).
        shard_bytes: plain text files are cut into pieces of about this many bytes.
        rows_per_shard: a piece's output is split into shards of at most this many rows.
        schema_path: csv (required) / parquet (optional) schema TOML.
        record_layout: "fixed" (every record the same length: ids as padded varints, read fast by
            `tfcompress.data.read`, see `tfcompress.data.fixed_records`) or "canonical" (protobuf's shortest
            encoding, as `tfcompress.data.tfrecord.serialize_rows`).
    """

    format: str
    encoding: str = None
    max_ind_range: int = None
    min_count: int = 1
    hash_buckets: int = DEFAULT_HASH_BUCKETS
    dense_transform: str = None
    clip_negative: bool = True
    split: str = "none"
    eval_fraction: float = 0.1
    seed: int = 2020
    test_day: int = 23
    shard_bytes: int = DEFAULT_SHARD_BYTES
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    schema_path: str = None
    record_layout: str = "fixed"

    def resolved(self, layout):
        """A copy with the format defaults filled in and every value checked (ValueError names the bad one)."""
        encoding = self.encoding or layout.default_encoding
        if encoding not in enc.ENCODINGS:
            raise ValueError(f"encoding must be one of {list(enc.ENCODINGS)}, got {encoding!r}")
        if encoding == "hex-mod" and not any(c.kind == "hex" for c in layout.sparse):
            raise ValueError(f"encoding 'hex-mod' needs hex categorical columns; format {layout.format!r} has none "
                             "(use 'hash' or 'vocab')")
        max_ind_range = self.max_ind_range
        if encoding == "hex-mod" and max_ind_range is None:
            max_ind_range = DEFAULT_MAX_IND_RANGE
        dense_transform = self.dense_transform or layout.dense_transform
        checks = [
            ("dense_transform", dense_transform in DENSE_TRANSFORMS, f"one of {list(DENSE_TRANSFORMS)}"),
            ("split", self.split in SPLITS, f"one of {list(SPLITS)}"),
            ("record_layout", self.record_layout in RECORD_LAYOUTS, f"one of {list(RECORD_LAYOUTS)}"),
            ("max_ind_range", max_ind_range is None or _is_int(max_ind_range, 1), "an integer >= 1"),
            ("min_count", _is_int(self.min_count, 1), "an integer >= 1"),
            ("hash_buckets", _is_int(self.hash_buckets, 1), "an integer >= 1"),
            ("eval_fraction", isinstance(self.eval_fraction, (int, float)) and 0 < self.eval_fraction < 1,
             "a number in (0, 1)"),
            ("seed", _is_int(self.seed, 0), "an integer >= 0"),
            ("test_day", _is_int(self.test_day, 0), "an integer >= 0"),
            ("shard_bytes", _is_int(self.shard_bytes, 1), "an integer >= 1"),
            ("rows_per_shard", _is_int(self.rows_per_shard, 1), "an integer >= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name, None)!r}")
        schema_path = os.path.abspath(self.schema_path) if self.schema_path else None
        return dataclasses.replace(self, encoding=encoding, max_ind_range=max_ind_range,
                                   dense_transform=dense_transform, schema_path=schema_path)


def _is_int(value, minimum):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


# ---- inputs and pieces ---------------------------------------------------------------------------------------


def expand_inputs(inputs):
    """Input files named by paths, directories (their files, sorted) and glob patterns, in the order given.

    Raises:
        FileNotFoundError: a path or pattern matches nothing (named in the message).
        ConvertError: a file cannot be opened for reading ("0 rows were kept": nothing was converted yet).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for spec in inputs:
        spec = os.fspath(spec)
        if os.path.isdir(spec):
            matches = sorted(p for p in glob.glob(os.path.join(spec, "*")) if os.path.isfile(p))
        elif glob.has_magic(spec):
            matches = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
        else:
            matches = [spec] if os.path.exists(spec) else []
        if not matches:
            raise FileNotFoundError(f"input {spec} does not exist or matches no file")
        files.extend(os.path.abspath(p) for p in matches)
    files = list(dict.fromkeys(files))
    if not files:
        raise FileNotFoundError("no input files given")
    for path in files:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as error:
            raise ConvertError(f"cannot read input {path}: {error}; 0 rows were kept (nothing was converted)") from None
    return files


def _is_gzip(path):
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open_text(path):
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def _read_header(path, layout):
    """The header line of a file, split into names (None when the file is empty)."""
    try:
        with _open_text(path) as f:
            line = f.readline()
    except (OSError, EOFError, zlib.error) as error:
        raise ConvertError(f"cannot read the header of {path}: {error}; 0 rows were kept") from None
    if not line:
        return None
    return line.rstrip(b"\r\n").decode("utf-8", errors="replace").split(layout.delimiter.decode())


def _day_number(path):
    """N of a Criteo Terabyte file named day_N (or day_N.gz, day_N.txt, ...), else None."""
    name = os.path.basename(path).split(".")[0]
    if name.startswith("day_") and name[4:].isdigit():
        return int(name[4:])
    return None


def _scan_plain_file(path, shard_bytes, data_start):
    """Cut a plain text file into line-aligned byte ranges of about shard_bytes; count the lines of each.

    Returns:
        list of (start, end, n_lines); the ranges cover [data_start, file size) without gaps, and each starts at
        the beginning of a line.
    """
    size = os.path.getsize(path)
    if size <= data_start:
        return []
    pieces = []
    piece_start, lines, last_byte = data_start, 0, b"\n"
    target = data_start + shard_bytes  # the next cut goes at the first line start >= target
    with open(path, "rb") as f:
        f.seek(data_start)
        position = data_start  # file offset of block[0]
        while True:
            block = f.read(BLOCK_BYTES)
            if not block:
                break
            offset = 0  # newlines of block[:offset] are counted already
            while target < size and target - 1 < position + len(block):
                newline = block.find(b"\n", max(offset, target - 1 - position))
                if newline < 0:
                    break  # the cut lies in a later block
                lines += block.count(b"\n", offset, newline + 1)
                offset = newline + 1
                cut = position + offset
                if cut >= size:
                    target = size  # the rest of the file is the last piece
                    break
                pieces.append((piece_start, cut, lines))
                piece_start, lines, target = cut, 0, cut + shard_bytes
            lines += block.count(b"\n", offset)
            position += len(block)
            last_byte = block[-1:]
    lines += last_byte != b"\n"  # a last line without a newline still counts
    pieces.append((piece_start, size, lines))
    return pieces


def _count_lines(path, data_start_line):
    """Lines of a (possibly gzipped) file, header excluded when data_start_line is 2."""
    lines, last = 0, b"\n"
    chunks = _gunzip_chunks(path) if _is_gzip(path) else _plain_chunks(path, 0, os.path.getsize(path))
    try:
        for block in chunks:
            lines += block.count(b"\n")
            last = block[-1:]
    except (OSError, EOFError, zlib.error) as error:
        raise ConvertError(f"cannot count the lines of {path}: {type(error).__name__}: {error}; 0 rows were "
                           "kept (nothing was converted)") from None
    lines += last != b"\n"
    return lines - (data_start_line - 1)


def _scan_file(task):
    """Worker: the pieces of one input file (a pool task, so big inputs are scanned in parallel)."""
    path, file_index, layout, options, need_line_count = task
    if options.format == "parquet":
        import pyarrow.parquet as pq

        try:
            metadata = pq.ParquetFile(path).metadata
        except Exception as error:  # pyarrow raises ArrowInvalid / OSError for a damaged file
            raise ConvertError(f"cannot read Parquet file {path}: {error}; 0 rows were kept") from None
        return [dict(path=path, file_index=file_index, kind="parquet", start=0, end=None, first_line=1,
                     n_lines=int(metadata.num_rows))]
    header_bytes = 0
    if layout.header:
        with _open_text(path) as f:
            header_bytes = len(f.readline())
    first_line = 2 if layout.header else 1
    if _is_gzip(path):
        n_lines = _count_lines(path, first_line) if need_line_count else None
        return [dict(path=path, file_index=file_index, kind="gzip", start=0, end=None, first_line=first_line,
                     n_lines=n_lines)]
    pieces = []
    for start, end, n_lines in _scan_plain_file(path, options.shard_bytes, header_bytes):
        pieces.append(dict(path=path, file_index=file_index, kind="plain", start=start, end=end,
                           first_line=first_line, n_lines=n_lines))
        first_line += n_lines
    return pieces


def _split_rules(files, options, pieces_per_file):
    """Per file: how its rows are assigned to splits, as a JSON-able dict."""
    rules = []
    for path, pieces in zip(files, pieces_per_file):
        if options.split == "none":
            rules.append({"kind": "fixed", "split": "train"})
        elif options.split == "random":
            rules.append({"kind": "random", "file_key": str(enc.string_key(os.path.basename(path))),
                          "eval_fraction": float(options.eval_fraction), "seed": int(options.seed)})
        else:
            day = _day_number(path)
            if day is None:
                raise ConvertError(f"split {options.split!r} needs Criteo Terabyte files named day_N, got {path}")
            if day != options.test_day:
                rules.append({"kind": "fixed", "split": "train"})
            elif options.split == "criteo-days":
                rules.append({"kind": "fixed", "split": "eval"})
            else:
                total = sum(p["n_lines"] for p in pieces)
                # Like numpy.array_split into 2: the first half gets the odd line.
                rules.append({"kind": "halves", "last_eval_line": pieces[0]["first_line"] + (total + 1) // 2 - 1
                              if pieces else 0})
    return rules


def _assign_splits(rule, line):
    """Split names (array of str) of rows at these 1-based line numbers under a file's split rule."""
    if rule["kind"] == "fixed":
        return np.full(line.shape, rule["split"], dtype=object)
    if rule["kind"] == "halves":
        return np.where(line <= rule["last_eval_line"], "eval", "test").astype(object)
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point of a hash
        seed_mix = splitmix64(np.uint64(rule["seed"])) ^ np.uint64(int(rule["file_key"]))
        h = splitmix64(seed_mix + line.astype(np.uint64))
    uniform = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.where(uniform < rule["eval_fraction"], "eval", "train").astype(object)


def split_names(options):
    return {"none": ["train"], "random": ["train", "eval"], "criteo-days": ["train", "eval"],
            "criteo-days-halves": ["train", "eval", "test"]}[options.split]


# ---- reading pieces ------------------------------------------------------------------------------------------


class PieceReadError(Exception):
    """The input stopped being readable in the middle of a piece (truncated .gz, I/O error)."""

    def __init__(self, path, line, cause):
        super().__init__(f"{path}: {cause} (at line {line})")
        self.path, self.line, self.cause = path, line, cause


def _gunzip_chunks(path, read_bytes=1 << 20):
    """Decompressed bytes of a gzip file, chunk by chunk (multi-member files too).

    Unlike `gzip.GzipFile.read`, which drops what it decompressed in a call that hits a truncated stream, every byte
    before the damage is delivered; then EOFError (truncated) or zlib.error (corrupt) is raised.
    """
    decompressor = zlib.decompressobj(31)  # wbits 16 + 15: gzip framing
    with open(path, "rb") as f:
        while True:
            raw = f.read(read_bytes)
            if not raw:
                break
            while raw:
                if decompressor.eof:  # the previous member ended: the next one starts here
                    decompressor = zlib.decompressobj(31)
                out = decompressor.decompress(raw)
                raw = decompressor.unused_data if decompressor.eof else b""
                if out:
                    yield out
    if not decompressor.eof:
        raise EOFError("compressed file ended before the end-of-stream marker was reached")


def _plain_chunks(path, start, end):
    with open(path, "rb") as f:
        f.seek(start)
        remaining = end - start
        while remaining > 0:
            data = f.read(min(BLOCK_BYTES, remaining))
            if not data:
                raise OSError(f"file ended {remaining} bytes early (did it change during the conversion?)")
            remaining -= len(data)
            yield data


def _iter_text_blocks(piece, header):
    """Yields (first_line, bytes of complete lines) of a text piece, about BLOCK_BYTES at a time."""
    path, line = piece["path"], piece["first_line"]
    # A plain piece starts after the header already; a gzip piece is the whole file.
    skip_header = header and piece["kind"] == "gzip"
    carry = b""
    try:
        chunks = _gunzip_chunks(path) if piece["kind"] == "gzip" else _plain_chunks(path, piece["start"], piece["end"])
        for data in chunks:
            data = carry + data if carry else data
            if skip_header:
                newline = data.find(b"\n")
                if newline < 0:
                    carry = data
                    continue
                data, skip_header = data[newline + 1:], False
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                block = data[:cut]
                yield line, block
                line += block.count(b"\n")
    except (OSError, EOFError, zlib.error) as error:
        # Complete lines before the damage were yielded; the partial line in `carry` is not a row.
        raise PieceReadError(path, line, f"{type(error).__name__}: {error}") from None
    if carry and not skip_header:
        yield line, carry + b"\n"  # the last line of a file without a final newline


def _iter_parsed(piece, layout, column_map):
    """Parsed blocks of one piece (text or Parquet)."""
    if piece["kind"] == "parquet":
        import pyarrow.parquet as pq

        row = 1
        try:
            parquet = pq.ParquetFile(piece["path"])
            for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, columns=layout.required_columns()):
                yield formats.parse_record_batch(batch, layout, row)
                row += batch.num_rows
        except (OSError, EOFError) as error:
            raise PieceReadError(piece["path"], row, f"{type(error).__name__}: {error}") from None
        except Exception as error:  # ArrowInvalid for a damaged file
            if type(error).__module__.startswith("pyarrow"):
                raise PieceReadError(piece["path"], row, f"{type(error).__name__}: {error}") from None
            raise
        return
    for first_line, block in _iter_text_blocks(piece, layout.header):
        yield formats.parse_text_block(block, layout, column_map, first_line)


# ---- per-worker context --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Context:
    """What every piece task needs; sent once to each worker process."""

    output: str
    layout: object
    options: ConvertOptions
    column_maps: dict  # file path -> ColumnMap (text formats)
    rules: dict  # file path -> split rule
    strict: bool
    progress: object = None  # multiprocessing.Value('q'): rows read so far, shared by all workers
    encoders: list = None
    fixed: object = None  # FixedLayout when options.record_layout == "fixed" (set with the encoders)


_CONTEXT = None


def _init_worker(context):
    global _CONTEXT
    _CONTEXT = context


def _encoders(context):
    """One encoder per categorical column (built once per process; vocab loads vocabulary.npz)."""
    if context.encoders is None:
        options, encoders = context.options, []
        vocabulary = None
        if options.encoding == "vocab":
            with np.load(os.path.join(context.output, VOCABULARY_FILENAME)) as data:
                vocabulary = {name: data[f"keys_{name}"] for name in context.layout.sparse_names}
        for column in context.layout.sparse:
            if column.kind in formats.DERIVED_CARDINALITY:
                encoders.append(enc.DirectEncoder(formats.DERIVED_CARDINALITY[column.kind]))
            elif options.encoding == "hex-mod":
                encoders.append(enc.HexModEncoder(options.max_ind_range) if column.kind == "hex"
                                else enc.HashEncoder(options.max_ind_range))
            elif options.encoding == "hash":
                encoders.append(enc.HashEncoder(options.hash_buckets))
            else:
                modulus = options.max_ind_range if column.kind == "hex" else None
                encoders.append(enc.VocabularyEncoder(vocabulary[column.name], key_modulus=modulus))
        context.encoders = encoders
        if options.record_layout == "fixed":
            context.fixed = fixed_records.FixedLayout.for_ids_below(
                len(context.layout.dense), len(encoders), max([e.cardinality for e in encoders], default=1))
    return context.encoders


def _vocab_keys(keys, layout, options):
    """The keys the vocabulary is built on: hex keys folded by max_ind_range first when it is set (MLPerf).

    `_encoders` gives the same hex columns' VocabularyEncoder the same key_modulus, so encoding folds alike.
    """
    keys = keys.copy()
    for j, column in enumerate(layout.sparse):
        if column.kind == "hex":
            keys[:, j] = enc.fold_keys(keys[:, j], options.max_ind_range)
    return keys


def _strict_error(piece, rejected):
    line, reason, raw = rejected
    text = raw[:200].decode("utf-8", errors="replace")
    return ConvertError(f"--strict: bad row in {piece['path']} line {line} ({reason}): {text!r}")


class _IdCounts:
    """Access counts of the ids of one table: a dense array for small tables, sorted distinct ids otherwise."""

    def __init__(self, cardinality):
        self.dense = np.zeros(cardinality, np.int64) if cardinality <= DENSE_COUNT_LIMIT else None
        self.sparse = None if self.dense is not None else enc.KeyCounter(np.int64)

    def add(self, ids):
        if self.dense is not None:
            self.dense += np.bincount(ids, minlength=self.dense.size)
        else:
            self.sparse.add(ids)

    def result(self):
        if self.dense is not None:
            ids = np.flatnonzero(self.dense)
            return ids.astype(np.int64), self.dense[ids]
        return self.sparse.result()


def _atomic_savez(path, arrays):
    """np.savez, but byte-stable: fixed zip timestamps and sorted names, so equal arrays give equal files."""
    import zipfile

    tmp = f"{path}.tmp-{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[name]), allow_pickle=False)
    os.replace(tmp, path)


def _piece_state(output, index, suffix):
    return os.path.join(output, STATE_DIR, f"piece-{index:05d}{suffix}")


def _count_piece(piece):
    """Worker, vocab first pass: key counts per categorical column over the piece's training rows."""
    context = _CONTEXT
    layout, options = context.layout, context.options
    counters = [enc.KeyCounter() for _ in layout.sparse]
    rule = context.rules[piece["path"]]
    rows = 0
    try:
        for parsed in _iter_parsed(piece, layout, context.column_maps.get(piece["path"])):
            if context.strict and parsed.rejected:
                raise _strict_error(piece, parsed.rejected[0])
            train = _assign_splits(rule, parsed.line) == "train"
            keys = _vocab_keys(parsed.keys[train], layout, options)
            for j, counter in enumerate(counters):
                counter.add(keys[:, j])
            rows += parsed.n_read
            if context.progress is not None:
                with context.progress.get_lock():
                    context.progress.value += parsed.n_read
    except PieceReadError as error:
        return {"index": piece["index"], "error": str(error), "path": error.path, "line": error.line}
    arrays = {}
    for column, counter in zip(layout.sparse, counters):
        arrays[f"keys_{column.name}"], arrays[f"counts_{column.name}"] = counter.result()
    _atomic_savez(_piece_state(context.output, piece["index"], ".vocab.npz"), arrays)
    return {"index": piece["index"], "rows_read": rows}


def _remove_piece_outputs(output, index, splits):
    for split in splits:
        for path in glob.glob(os.path.join(output, split, f"part-{index:05d}-*")):
            os.remove(path)
    for path in glob.glob(_piece_state(output, index, ".*")):
        if not path.endswith(".vocab.npz"):
            os.remove(path)


def _convert_piece(piece):
    """Worker: parse, encode, split and write one piece; returns its report (also saved as its done marker)."""
    context = _CONTEXT
    layout, options, output = context.layout, context.options, context.output
    index = piece["index"]
    splits = split_names(options)
    _remove_piece_outputs(output, index, splits)
    encoders = _encoders(context)
    rule = context.rules[piece["path"]]
    counts = {split: [_IdCounts(e.cardinality) for e in encoders] for split in splits}
    rejected_by_reason = dict.fromkeys(formats.REJECT_REASONS, 0)
    rows_per_split = dict.fromkeys(splits, 0)
    rows_read = 0
    error = None
    quarantine_path = _piece_state(output, index, ".quarantine.tsv")
    if context.fixed is not None:  # NumPy framing: no TensorFlow in the worker processes
        writers = {split: fixed_records.FixedShardWriter(os.path.join(output, split), context.fixed,
                                                         options.rows_per_shard, prefix=f"part-{index:05d}")
                   for split in splits}
    else:
        writers = {split: ShardWriter(os.path.join(output, split), options.rows_per_shard,
                                      prefix=f"part-{index:05d}") for split in splits}
    source = piece["path"].encode("utf-8", errors="surrogateescape")
    try:
        with open(f"{quarantine_path}.tmp-{os.getpid()}", "wb") as quarantine:
            try:
                for parsed in _iter_parsed(piece, layout, context.column_maps.get(piece["path"])):
                    if context.strict and parsed.rejected:
                        raise _strict_error(piece, parsed.rejected[0])
                    for line, reason, raw in parsed.rejected:
                        rejected_by_reason[reason] += 1
                        quarantine.write(b"%s\t%d\t%s\t%s\n" % (source, line, reason.encode(), raw))
                    rows_read += parsed.n_read
                    _write_rows(parsed, rule, encoders, options, writers, counts, rows_per_split, context.fixed)
                    if context.progress is not None:
                        with context.progress.get_lock():
                            context.progress.value += parsed.n_read
            except PieceReadError as read_error:
                error = {"path": read_error.path, "line": read_error.line, "cause": read_error.cause}
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    os.replace(f"{quarantine_path}.tmp-{os.getpid()}", quarantine_path)
    arrays = {}
    for split in splits:
        for column, table_counts in zip(layout.sparse, counts[split]):
            arrays[f"{split}/ids_{column.name}"], arrays[f"{split}/counts_{column.name}"] = table_counts.result()
    _atomic_savez(_piece_state(output, index, ".counts.npz"), arrays)
    rows_rejected = sum(rejected_by_reason.values())
    report = {
        "index": index, "path": piece["path"], "rows_read": rows_read,
        "rows_written": sum(rows_per_split.values()), "rows_rejected": rows_rejected,
        "rejected_by_reason": rejected_by_reason, "rows_per_split": rows_per_split,
        "shards": {split: [os.path.relpath(p, output) for p in writers[split].paths] for split in splits},
        "error": error,
    }
    # The json is the done marker: written last, and not at all when the input broke off (a rerun redoes it).
    name = ".json" if error is None else ".error.json"
    write_atomically(_piece_state(output, index, name), json.dumps(report, sort_keys=True).encode())
    return report


def _write_rows(parsed, rule, encoders, options, writers, counts, rows_per_split, fixed):
    if parsed.n_good == 0:
        return
    dense = parsed.dense
    if options.clip_negative:
        dense = np.maximum(dense, 0.0)
    if options.dense_transform == "log1p":
        with np.errstate(invalid="ignore"):  # log1p(x < -1) is NaN; only reachable with clip_negative=False
            dense = np.log1p(dense)
    dense = dense.astype(np.float32)
    ids = np.empty(parsed.keys.shape, dtype=np.int64)
    for j, encoder in enumerate(encoders):
        ids[:, j] = encoder.encode(parsed.keys[:, j])
    assigned = _assign_splits(rule, parsed.line)
    for split, writer in writers.items():
        rows = np.flatnonzero(assigned == split)
        if not rows.size:
            continue
        if fixed is not None:
            writer.write_rows(fixed_records.fixed_rows(fixed, parsed.label[rows], dense[rows], ids[rows]))
        else:
            writer.write(serialize_rows(parsed.label[rows], dense[rows], ids[rows]))
        rows_per_split[split] += int(rows.size)
        for j, table_counts in enumerate(counts[split]):
            table_counts.add(ids[rows, j])


# ---- the driver ----------------------------------------------------------------------------------------------


class _Progress:
    """A progress line on stderr (rows read, rows/s, pieces done), redrawn twice a second on a terminal."""

    def __init__(self, counter, total_pieces, label, enabled):
        self.counter, self.total, self.label = counter, total_pieces, label
        self.done = 0
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = None
        self._last_line = 0.0

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def line(self):
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rows = self.counter.value
        return (f"{self.label}: {self.done}/{self.total} pieces, {rows:,} rows, {rows / elapsed:,.0f} rows/s, "
                f"{elapsed:.0f} s")

    def _run(self):
        while not self._stop.wait(0.5):
            now = time.perf_counter()
            if self.tty:
                print("\r" + self.line(), end="", file=sys.stderr, flush=True)
            elif now - self._last_line >= 30:
                self._last_line = now
                print(self.line(), file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            print(("\r" if self.tty else "") + self.line(), file=sys.stderr, flush=True)
        return False


def _run_tasks(function, tasks, context, workers, progress=None, on_done=None):
    """Run function(task) for every task, in this process (workers == 1) or a spawn pool; yields results."""
    if workers == 1 or len(tasks) <= 1:
        _init_worker(context)
        try:
            for task in tasks:
                result = function(task)
                if progress is not None:
                    progress.done += 1
                if on_done is not None:
                    on_done(result)
                yield result
        finally:
            _init_worker(None)
        return
    # spawn, not fork: the parent may have TensorFlow loaded, which is not fork-safe.
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)), initializer=_init_worker,
                                                     initargs=(context,))
    try:
        for result in pool.imap_unordered(function, tasks):
            if progress is not None:
                progress.done += 1
            if on_done is not None:
                on_done(result)
            yield result
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _options_dict(options):
    return {k: v for k, v in dataclasses.asdict(options).items()}


def _prepare_output(output, plan, overwrite):
    """Check what `output` already holds: the same conversion (resume), nothing, or something else (error).

    With `overwrite` everything in it is removed and the conversion starts afresh.
    """
    plan_path = os.path.join(output, STATE_DIR, "plan.json")
    if os.path.isfile(plan_path) and not overwrite:
        with open(plan_path) as f:
            previous = json.load(f)
        same = {k: previous.get(k) for k in ("version", "options", "inputs")} == {
            k: plan[k] for k in ("version", "options", "inputs")}
        if same:
            return previous, True
        raise ConvertError(f"{output} holds a conversion of other inputs or options; pass overwrite=True "
                           "(--overwrite) to replace it, or choose another output directory")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ConvertError(f"output directory {output} is not empty and holds no conversion; pass overwrite=True "
                           "(--overwrite) to replace its contents, or choose another directory")
    if os.path.isdir(output):
        for name in os.listdir(output):
            path = os.path.join(output, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(os.path.join(output, STATE_DIR), exist_ok=True)
    return None, False


def _inputs_fingerprint(files):
    return [{"path": p, "size": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns} for p in files]


def convert(inputs, output, format, *, workers=1, encoding=None, max_ind_range=None, min_count=1,
            hash_buckets=DEFAULT_HASH_BUCKETS, dense_transform=None, clip_negative=True, split="none",
            eval_fraction=0.1, seed=2020, test_day=23, shard_bytes=DEFAULT_SHARD_BYTES,
            rows_per_shard=DEFAULT_ROWS_PER_SHARD, schema=None, record_layout="fixed", strict=False, overwrite=False,
            progress=False, on_piece_done=None):
    """Convert raw click logs into the TFRecord layout of docs/tfrecord_layout.md (module docstring: the output).

    Args:
        inputs: file paths, directories or glob patterns (a `.gz` file is read as gzip whatever its name).
        output: output directory.
        format: "criteo-tsv", "criteo-csv", "avazu-csv", "csv" (needs `schema`) or "parquet".
        workers: worker processes, >= 1 (the output is the same for any number).
        encoding, max_ind_range, min_count, hash_buckets, dense_transform, clip_negative, split, eval_fraction,
            seed, test_day, shard_bytes, rows_per_shard, record_layout: see `ConvertOptions`.
        schema: schema TOML path (format "csv"; optional for "parquet").
        strict: stop at the first bad row with a ConvertError naming its file and line.
        overwrite: empty the output directory first (otherwise a directory holding the same conversion is
            resumed, and one holding anything else is an error).
        progress: print a progress line (rows, rows/s) to stderr.
        on_piece_done: called with each finished piece's report (in the calling process).

    Returns:
        the report dict (also written to report.json).

    Raises:
        FileNotFoundError: an input matches nothing.
        ValueError / ConvertError: bad options; an unreadable input, a bad header, a bad row under `strict`; an
            input that broke off mid-way (e.g. a truncated .gz): then every other piece is still converted,
            report.json is written, and the message names the file and how many of its rows were kept.
    """
    started = time.perf_counter()
    if not _is_int(workers, 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    layout = formats.layout_for_format(format, schema)
    options = ConvertOptions(
        format=format, encoding=encoding, max_ind_range=max_ind_range, min_count=min_count,
        hash_buckets=hash_buckets, dense_transform=dense_transform, clip_negative=bool(clip_negative), split=split,
        eval_fraction=eval_fraction, seed=seed, test_day=test_day, shard_bytes=shard_bytes,
        rows_per_shard=rows_per_shard, schema_path=schema, record_layout=record_layout,
    ).resolved(layout)
    output = os.path.abspath(os.fspath(output))
    files = expand_inputs(inputs)
    parquet_note = None
    if format == "parquet":
        from tfcompress.data.tfio import tensorflow_io_status

        parquet_note = tensorflow_io_status().line()
        if progress:
            print(parquet_note, file=sys.stderr, flush=True)

    column_maps = {}
    if format == "parquet":
        import pyarrow.parquet as pq

        for path in files:
            try:
                arrow_schema = pq.read_schema(path)
            except Exception as error:
                raise ConvertError(f"cannot read Parquet file {path}: {error}; 0 rows were kept") from None
            formats.check_parquet_types(arrow_schema, layout, path)
    else:
        for path in files:
            header = _read_header(path, layout) if layout.header else None
            if layout.header and header is None:
                column_maps[path] = None  # an empty file: no header, no rows
                continue
            column_maps[path] = layout.column_map(header, source=path)

    plan = {"version": CONVERTER_VERSION, "options": _options_dict(options), "inputs": _inputs_fingerprint(files)}
    previous, resuming = _prepare_output(output, plan, overwrite)
    if resuming:
        pieces, rules = previous["pieces"], previous["rules"]
    else:
        need_counts = options.split == "criteo-days-halves"
        scan_tasks = [(path, i, layout, options, need_counts and _day_number(path) == options.test_day)
                      for i, path in enumerate(files) if column_maps.get(path, True) is not None]
        scan_context = _Context(output, layout, options, column_maps, {}, strict)
        pieces_per_task = list(_run_tasks(_scan_file_ordered, list(enumerate(scan_tasks)), scan_context, workers))
        pieces_per_task = [p for _, p in sorted(pieces_per_task, key=lambda item: item[0])]
        scanned = {task[0]: p for task, p in zip(scan_tasks, pieces_per_task)}
        pieces_per_file = [scanned.get(path, []) for path in files]
        rules = dict(zip(files, _split_rules(files, options, pieces_per_file)))
        pieces = [dict(piece, index=i) for i, piece in enumerate(p for per_file in pieces_per_file for p in per_file)]
        plan.update(pieces=pieces, rules=rules)
        write_atomically(os.path.join(output, STATE_DIR, "plan.json"), json.dumps(plan, indent=1).encode())

    counter = multiprocessing.get_context("spawn").Value("q", 0)
    context = _Context(output, layout, options, column_maps, rules, strict, progress=counter)
    errors = []
    if options.encoding == "vocab":
        _build_vocabulary(pieces, context, workers, progress, errors)

    todo = [p for p in pieces if not os.path.isfile(_piece_state(output, p["index"], ".json"))]
    skipped = len(pieces) - len(todo)
    counter.value = 0
    with _Progress(counter, len(todo), "convert", progress) as bar:
        for result in _run_tasks(_convert_piece, todo, context, workers, bar, on_piece_done):
            if result.get("error"):
                errors.append(result)
    report = _finish(output, files, pieces, layout, options, context, errors, skipped, started, parquet_note)
    if errors:
        raise ConvertError(_error_message(errors, report))
    return report


def _scan_file_ordered(item):
    position, task = item
    return position, _scan_file(task)


def _build_vocabulary(pieces, context, workers, progress, errors):
    """First pass of encoding "vocab": count keys per table on the training rows, keep those seen min_count times."""
    output, layout, options = context.output, context.layout, context.options
    vocabulary_path = os.path.join(output, VOCABULARY_FILENAME)
    if os.path.isfile(vocabulary_path):
        return
    todo = [p for p in pieces if not os.path.isfile(_piece_state(output, p["index"], ".vocab.npz"))]
    with _Progress(context.progress, len(todo), "vocabulary pass", progress) as bar:
        for result in _run_tasks(_count_piece, todo, context, workers, bar):
            if result.get("error"):
                errors.append(result)
    if errors:
        raise ConvertError("the vocabulary pass could not read every input: " + "; ".join(
            f"{e['error']}" for e in errors) + "; no shards were written, fix the inputs and rerun")
    arrays = {}
    for column in layout.sparse:
        counter = enc.KeyCounter()
        for piece in pieces:
            with np.load(_piece_state(output, piece["index"], ".vocab.npz")) as data:
                counter.add(data[f"keys_{column.name}"], data[f"counts_{column.name}"])
        keys, counts = counter.result()
        vocabulary = enc.VocabularyEncoder.from_counts(keys, counts, options.min_count)
        arrays[f"keys_{column.name}"] = vocabulary.keys
    _atomic_savez(vocabulary_path, arrays)


def _finish(output, files, pieces, layout, options, context, errors, skipped, started, parquet_note):
    """Merge the piece results into report.json, counts/, quarantine.tsv and schema.json."""
    splits = split_names(options)
    piece_reports = []
    for piece in pieces:
        for name in (".json", ".error.json"):
            path = _piece_state(output, piece["index"], name)
            if os.path.isfile(path):
                with open(path) as f:
                    piece_reports.append(json.load(f))
                break
    rejected = dict.fromkeys(formats.REJECT_REASONS, 0)
    per_split = dict.fromkeys(splits, 0)
    per_file = {path: {"rows_read": 0, "rows_written": 0, "rows_rejected": 0} for path in files}
    shards = {split: [] for split in splits}
    for r in piece_reports:
        for reason, count in r["rejected_by_reason"].items():
            rejected[reason] += count
        for split, count in r["rows_per_split"].items():
            per_split[split] += count
        for key in ("rows_read", "rows_written", "rows_rejected"):
            per_file[r["path"]][key] += r[key]
        for split, paths in r["shards"].items():
            shards[split].extend(paths)

    # Quarantine: the pieces' files in piece order, so the file is the same for any worker count.
    with open(os.path.join(output, f"{QUARANTINE_FILENAME}.tmp"), "wb") as out:
        for r in piece_reports:
            path = _piece_state(output, r["index"], ".quarantine.tsv")
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, out)
    os.replace(os.path.join(output, f"{QUARANTINE_FILENAME}.tmp"), os.path.join(output, QUARANTINE_FILENAME))

    encoders = _encoders(context)
    os.makedirs(os.path.join(output, "counts"), exist_ok=True)
    for split in splits:
        arrays = {}
        for column, encoder in zip(layout.sparse, encoders):
            total = enc.KeyCounter(np.int64)
            for r in piece_reports:
                with np.load(_piece_state(output, r["index"], ".counts.npz")) as data:
                    total.add(data[f"{split}/ids_{column.name}"], data[f"{split}/counts_{column.name}"])
            arrays[f"ids_{column.name}"], arrays[f"counts_{column.name}"] = total.result()
        _atomic_savez(os.path.join(output, "counts", f"{split}.npz"), arrays)

    cardinalities = [e.cardinality for e in encoders]
    extra = {
        "converter": "tfcompress.data.convert", "converter_version": CONVERTER_VERSION, "format": options.format,
        "options": _options_dict(options), "inputs": files, "splits": per_split,
        "clip_negative": options.clip_negative,
        "key": "hex value (hex columns) or splitmix64(fnv1a64(bytes)) (text columns); empty -> 2^64-1",
    }
    if context.fixed is not None:
        extra[fixed_records.SCHEMA_KEY] = context.fixed.to_dict()
    if options.encoding == "hex-mod":
        extra["max_ind_range"] = options.max_ind_range
    elif options.encoding == "hash":
        extra["hash_buckets"] = options.hash_buckets
    else:
        extra["min_count"] = options.min_count
    Schema(name=layout.name, label=layout.label, dense_names=list(layout.dense), sparse_names=layout.sparse_names,
           cardinalities=cardinalities, dense_transform=options.dense_transform, encoding=options.encoding,
           extra=extra).save(output)

    rows_read = sum(r["rows_read"] for r in piece_reports)
    seconds = time.perf_counter() - started
    report = {
        "rows_read": rows_read,
        "rows_written": sum(r["rows_written"] for r in piece_reports),
        "rows_rejected": sum(r["rows_rejected"] for r in piece_reports),
        "rejected_by_reason": rejected,
        "rows_per_split": per_split,
        "files": per_file,
        "shards": shards,
        "pieces": len(pieces),
        "pieces_skipped": skipped,
        "errors": sorted((dict(e["error"]) for e in errors), key=lambda e: (e["path"], e["line"])),
        "seconds": seconds,
        "rows_per_s": rows_read / seconds if seconds > 0 else None,
        "quarantine": QUARANTINE_FILENAME,
        "tensorflow_io": parquet_note,
    }
    if report["rows_read"] != report["rows_written"] + report["rows_rejected"]:  # pragma: no cover - a bug
        raise AssertionError(f"rows_read {report['rows_read']} != written {report['rows_written']} + rejected "
                             f"{report['rows_rejected']}")
    write_atomically(os.path.join(output, REPORT_FILENAME),
                        (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    return report


def _error_message(errors, report):
    parts = []
    for e in report["errors"]:
        kept = report["files"].get(e["path"], {})
        parts.append(f"input {e['path']} is truncated or unreadable ({e['cause']}) at line {e['line']}: "
                     f"{kept.get('rows_read', 0):,} rows were kept ({kept.get('rows_written', 0):,} written, "
                     f"{kept.get('rows_rejected', 0):,} rejected), the rest of the file is missing")
    return ("; ".join(parts) + ". Every other input was converted and report.json written; fix or remove the "
            "file and rerun (finished pieces are skipped)")


def load_counts(output, split="train"):
    """Per-id access counts of a conversion: {table name: (ids int64 sorted, counts int64)}."""
    schema = Schema.load(output)
    with np.load(os.path.join(os.fspath(output), "counts", f"{split}.npz")) as data:
        return {name: (data[f"ids_{name}"], data[f"counts_{name}"]) for name in schema.sparse_names}


def dense_count_array(ids, counts, cardinality):
    """Sparse (ids, counts) -> a dense int64 array of length `cardinality` (for small tables)."""
    dense = np.zeros(int(cardinality), np.int64)
    dense[np.asarray(ids, np.int64)] = counts
    return dense
