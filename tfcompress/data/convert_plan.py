"""Planning a conversion (`tfcompress.data.convert`): options, inputs, pieces, splits, encoders and the state files.

Everything here is decided before (or besides) the workers convert rows:

- `ConvertOptions`: what decides the output bytes, checked and with the format's defaults filled in.
- Inputs: `expand_inputs` (paths, directories, globs -> files), `read_column_maps` (headers -> columns).
- Pieces: `scan_file` cuts one input into pieces (a plain text file into line-aligned byte ranges of about
  `shard_bytes`, whose lines it counts; a `.gz` or Parquet file is one piece); `number_pieces` numbers them in input
  order and fixes each file's split rule (`split_rules`), which `assign_splits` applies to line numbers.
- Encoders: `make_encoders` is the converter's choice of encoder per categorical column (also what the raw-string
  serving signature rebuilds); `save_vocabulary` merges the vocab pass's per-piece key counts into vocabulary.npz.
- State: `_state/plan.json` (`plan_record`, `save_plan`, `prepare_output`: resume the same conversion, refuse
  another) and the per-piece files `piece_state_path` names.
- The output directory: `OutputLock` (one conversion at a time per directory) and `write_error` (a full disk, a
  read-only file system, a missing permission -> one sentence naming the file).

`gunzip_chunks` and `plain_chunks` read the raw bytes, for the scan here and for the workers
(`tfcompress.data.convert_worker`).
"""

import dataclasses
import datetime
import errno
import fcntl
import glob
import gzip
import json
import math
import os
import shutil
import socket
import sys
import zipfile
import zlib
from fractions import Fraction

import numpy as np

from tfcompress._files import write_atomically
from tfcompress.data import encoding as enc
from tfcompress.data import fixed_records, formats
from tfcompress.data.encoding import splitmix64

CONVERTER_VERSION = 1
SPLITS = ("none", "random", "criteo-days", "criteo-days-halves", "by-column")
ENCODINGS = enc.ENCODINGS + ("auto",)  # auto: vocab for columns with few distinct keys, hash for the others
RECORD_LAYOUTS = ("fixed", "canonical")
DENSE_TRANSFORMS = ("log1p", "none")
DEFAULT_MAX_IND_RANGE = 40_000_000
DEFAULT_HASH_BUCKETS = 1 << 22
DEFAULT_SHARD_BYTES = 256 << 20
DEFAULT_ROWS_PER_SHARD = 1 << 21
DEFAULT_VOCAB_MAX_KEYS = 1_000_000
BLOCK_BYTES = 4 << 20
STATE_DIR = "_state"
PLAN_FILENAME = "plan.json"
VOCABULARY_FILENAME = "vocabulary.npz"
LOCK_FILENAME = "_convert.lock"


class ConvertError(ValueError):
    """A conversion that cannot go on or did not complete; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """Everything that decides the output bytes (stored in _state/plan.json; a rerun must match it).

    Args:
        format: one of `formats.FORMATS`.
        encoding: "hex-mod", "vocab", "hash" or "auto" (default: the format's; a schema's: "auto"). auto: the
            vocab pass counts each categorical column's distinct keys in the training rows; a column with at most
            `vocab_max_keys` of them is encoded "vocab" (with min_count), a larger one "hash" (hash_buckets).
        max_ind_range: hex-mod table size (and, with vocab, the modulus applied to hex keys first when set).
        min_count: vocab: keys seen fewer times in the training split map to id 0.
        hash_buckets: hash table size.
        dense_transform: "log1p" or "none" (default: the format's; Criteo: log1p as MLPerf).
        clip_negative: negative dense values -> 0 (MLPerf), before the transform.
        split: "none" (all rows -> train), "random" (eval_fraction of rows -> eval), "criteo-days" (file
            day_<test_day> -> eval, others -> train), "criteo-days-halves" (day_<test_day>: first half of its lines
            -> eval, second half -> test), "by-column" (the rows with the largest values of `split_column` -> eval:
            `column_split_threshold` says exactly which).
        eval_fraction: random and by-column splits: fraction of rows in eval, in (0, 1).
        seed: random split seed (DLRM's Criteo Kaggle split uses 2020).
        test_day: criteo-days splits: the day number held out (MLPerf: 23).
        shard_bytes: plain text files are cut into pieces of about this many bytes.
        rows_per_shard: a piece's output is split into shards of at most this many rows.
        schema_path: csv (required) / parquet (optional) schema TOML.
        record_layout: "fixed" (every record the same length: ids as padded varints, read fast by
            `tfcompress.data.read`, see `tfcompress.data.fixed_records`) or "canonical" (protobuf's shortest
            encoding, as `tfcompress.data.tfrecord.serialize_rows`). None (the default): "fixed", or "canonical"
            when the layout has multi-valued columns (a variable-length feature has no fixed width; asking for
            "fixed" then is an error naming them).
        split_column: by-column split: the numeric column whose largest values go to eval (any column of the
            input, feature or not).
        vocab_max_keys: encoding "auto": the most distinct training keys a column may have to get a vocabulary.
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
    record_layout: str = None
    split_column: str = None
    vocab_max_keys: int = DEFAULT_VOCAB_MAX_KEYS

    def resolved(self, layout):
        """A copy with the format defaults filled in and every value checked (ValueError names the bad one)."""
        encoding = self.encoding or layout.default_encoding
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
        if encoding == "hex-mod" and not any(c.kind == "hex" for c in layout.sparse):
            raise ValueError(f"encoding 'hex-mod' needs hex categorical columns; format {layout.format!r} has none "
                             "(use 'hash' or 'vocab')")
        max_ind_range = self.max_ind_range
        if encoding == "hex-mod" and max_ind_range is None:
            max_ind_range = DEFAULT_MAX_IND_RANGE
        dense_transform = self.dense_transform or layout.dense_transform
        record_layout = self.record_layout
        if record_layout is None:
            record_layout = "canonical" if layout.multi else "fixed"
        if record_layout == "fixed" and layout.multi:
            raise ValueError(f"record_layout 'fixed' cannot hold the multi-valued columns {layout.multi_names} "
                             "(every fixed-width record has the same length); use record_layout 'canonical' "
                             "(--record-layout canonical, the default for such a schema)")
        checks = [
            ("dense_transform", dense_transform in DENSE_TRANSFORMS, f"one of {list(DENSE_TRANSFORMS)}"),
            ("split", self.split in SPLITS, f"one of {list(SPLITS)}"),
            ("record_layout", record_layout in RECORD_LAYOUTS, f"one of {list(RECORD_LAYOUTS)}"),
            ("max_ind_range", max_ind_range is None or is_int_at_least(max_ind_range, 1), "an integer >= 1"),
            ("min_count", is_int_at_least(self.min_count, 1), "an integer >= 1"),
            ("hash_buckets", is_int_at_least(self.hash_buckets, 1), "an integer >= 1"),
            ("eval_fraction", isinstance(self.eval_fraction, (int, float)) and 0 < self.eval_fraction < 1,
             "a number in (0, 1)"),
            ("seed", is_int_at_least(self.seed, 0), "an integer >= 0"),
            ("test_day", is_int_at_least(self.test_day, 0), "an integer >= 0"),
            ("shard_bytes", is_int_at_least(self.shard_bytes, 1), "an integer >= 1"),
            ("rows_per_shard", is_int_at_least(self.rows_per_shard, 1), "an integer >= 1"),
            ("vocab_max_keys", is_int_at_least(self.vocab_max_keys, 0), "an integer >= 0"),
            ("split_column", self.split_column is None or (isinstance(self.split_column, str) and self.split_column),
             "a column name"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name, None)!r}")
        if (self.split == "by-column") != (self.split_column is not None):
            raise ValueError("split 'by-column' needs split_column (--split-column NAME), and split_column is only "
                             f"used by it; got split {self.split!r} with split_column {self.split_column!r}")
        schema_path = os.path.abspath(self.schema_path) if self.schema_path else None
        return dataclasses.replace(self, encoding=encoding, max_ind_range=max_ind_range,
                                   dense_transform=dense_transform, schema_path=schema_path,
                                   record_layout=record_layout)

    def as_dict(self):
        """The options as a JSON-able dict (plan.json, schema.json `extra.options`; `ConvertOptions(**d)` reads it)."""
        return dataclasses.asdict(self)


def is_int_at_least(value, minimum):
    """An int (Python or NumPy, not bool) >= minimum."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


# ---- inputs ----------------------------------------------------------------------------------------------------


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


def is_gzip(path):
    """Whether the file starts with the gzip magic bytes (a `.gz` file is read as gzip whatever its name)."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_text(path):
    """The file opened for reading bytes, through gzip when it is gzipped."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def _read_header(path, layout):
    """The header line of a file, split into names (None when the file is empty)."""
    try:
        with open_text(path) as f:
            line = f.readline()
    except (OSError, EOFError, zlib.error) as error:
        raise ConvertError(f"cannot read the header of {path}: {error}; 0 rows were kept") from None
    if not line:
        return None
    return line.rstrip(b"\r\n").decode("utf-8", errors="replace").split(layout.delimiter.decode())


def read_column_maps(files, layout, format):
    """Per text input file: the ColumnMap of its header (None for an empty file). Parquet: {} (no column maps),
    after checking that every file has the columns the layout needs, with usable types.

    Raises:
        ConvertError / formats.FormatError: an unreadable file, a header or Parquet schema that does not fit.
    """
    column_maps = {}
    if format == "parquet":
        import pyarrow.parquet as pq  # optional package (the `data` extra): only Parquet conversions need it

        for path in files:
            try:
                arrow_schema = pq.read_schema(path)
            except Exception as error:
                raise ConvertError(f"cannot read Parquet file {path}: {error}; 0 rows were kept") from None
            formats.check_parquet_types(arrow_schema, layout, path)
        return column_maps
    for path in files:
        header = _read_header(path, layout) if layout.header else None
        if layout.header and header is None:
            column_maps[path] = None  # an empty file: no header, no rows
            continue
        column_maps[path] = layout.column_map(header, source=path)
    return column_maps


# ---- reading raw bytes -----------------------------------------------------------------------------------------


def gunzip_chunks(path, read_bytes=1 << 20):
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


def plain_chunks(path, start, end):
    """The bytes [start, end) of a file, BLOCK_BYTES at a time (OSError when the file is shorter)."""
    with open(path, "rb") as f:
        f.seek(start)
        remaining = end - start
        while remaining > 0:
            data = f.read(min(BLOCK_BYTES, remaining))
            if not data:
                raise OSError(f"file ended {remaining} bytes early (did it change during the conversion?)")
            remaining -= len(data)
            yield data


# ---- pieces ----------------------------------------------------------------------------------------------------


def day_number(path):
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
    chunks = gunzip_chunks(path) if is_gzip(path) else plain_chunks(path, 0, os.path.getsize(path))
    try:
        for block in chunks:
            lines += block.count(b"\n")
            last = block[-1:]
    except (OSError, EOFError, zlib.error) as error:
        raise ConvertError(f"cannot count the lines of {path}: {type(error).__name__}: {error}; 0 rows were "
                           "kept (nothing was converted)") from None
    lines += last != b"\n"
    return lines - (data_start_line - 1)


def scan_tasks(files, layout, options, column_maps):
    """The `scan_file` tasks of the input files that hold rows (empty text files have none)."""
    need_counts = options.split == "criteo-days-halves"
    return [(path, i, layout, options, need_counts and day_number(path) == options.test_day)
            for i, path in enumerate(files) if column_maps.get(path, True) is not None]


def scan_file(task):
    """Worker: the pieces of one input file (a pool task, so big inputs are scanned in parallel)."""
    path, file_index, layout, options, need_line_count = task
    if options.format == "parquet":
        import pyarrow.parquet as pq  # optional package (the `data` extra): only Parquet conversions need it

        try:
            metadata = pq.ParquetFile(path).metadata
        except Exception as error:  # pyarrow raises ArrowInvalid / OSError for a damaged file
            raise ConvertError(f"cannot read Parquet file {path}: {error}; 0 rows were kept") from None
        return [dict(path=path, file_index=file_index, kind="parquet", start=0, end=None, first_line=1,
                     n_lines=int(metadata.num_rows))]
    header_bytes = 0
    if layout.header:
        with open_text(path) as f:
            header_bytes = len(f.readline())
    first_line = 2 if layout.header else 1
    if is_gzip(path):
        n_lines = _count_lines(path, first_line) if need_line_count else None
        return [dict(path=path, file_index=file_index, kind="gzip", start=0, end=None, first_line=first_line,
                     n_lines=n_lines)]
    pieces = []
    for start, end, n_lines in _scan_plain_file(path, options.shard_bytes, header_bytes):
        pieces.append(dict(path=path, file_index=file_index, kind="plain", start=start, end=end,
                           first_line=first_line, n_lines=n_lines))
        first_line += n_lines
    return pieces


def scan_file_at(item):
    """Worker: (position, task) -> (position, `scan_file(task)`), so results that arrive in any order can be sorted."""
    position, task = item
    return position, scan_file(task)


def number_pieces(files, options, tasks, pieces_per_task):
    """The pieces of all inputs numbered in input order (`index`), and each file's split rule.

    Args:
        tasks, pieces_per_task: the `scan_tasks` and, in the same order, what `scan_file` returned for each.

    Returns:
        (pieces: list of dicts, rules: {file path: split rule}).
    """
    scanned = {task[0]: p for task, p in zip(tasks, pieces_per_task)}
    pieces_per_file = [scanned.get(path, []) for path in files]
    rules = dict(zip(files, split_rules(files, options, pieces_per_file)))
    pieces = [dict(piece, index=i) for i, piece in enumerate(p for per_file in pieces_per_file for p in per_file)]
    return pieces, rules


# ---- splits ----------------------------------------------------------------------------------------------------


def split_rules(files, options, pieces_per_file):
    """Per file: how its rows are assigned to splits, as a JSON-able dict."""
    rules = []
    for path, pieces in zip(files, pieces_per_file):
        if options.split == "none":
            rules.append({"kind": "fixed", "split": "train"})
        elif options.split == "by-column":
            # The threshold needs a pass over the data (`column_split_threshold`); the run fills it in.
            rules.append({"kind": "by-column", "column": options.split_column, "threshold": None})
        elif options.split == "random":
            rules.append({"kind": "random", "file_key": str(enc.string_key(os.path.basename(path))),
                          "eval_fraction": float(options.eval_fraction), "seed": int(options.seed)})
        else:
            day = day_number(path)
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


def assign_splits(rule, line, split_value=None):
    """Split names (array of str) of rows at these 1-based line numbers under a file's split rule.

    Args:
        split_value: by-column split: the rows' split column values (`formats.Parsed.split_value`).
    """
    if rule["kind"] == "fixed":
        return np.full(line.shape, rule["split"], dtype=object)
    if rule["kind"] == "by-column":
        if rule["threshold"] is None:
            raise AssertionError("by-column split used before its threshold was computed")  # pragma: no cover
        return np.where(split_value > rule["threshold"], "eval", "train").astype(object)
    if rule["kind"] == "halves":
        return np.where(line <= rule["last_eval_line"], "eval", "test").astype(object)
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point of a hash
        seed_mix = splitmix64(np.uint64(rule["seed"])) ^ np.uint64(int(rule["file_key"]))
        h = splitmix64(seed_mix + line.astype(np.uint64))
    uniform = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.where(uniform < rule["eval_fraction"], "eval", "train").astype(object)


def split_names(options):
    """The splits a conversion writes, in order."""
    return {"none": ["train"], "random": ["train", "eval"], "criteo-days": ["train", "eval"],
            "criteo-days-halves": ["train", "eval", "test"], "by-column": ["train", "eval"]}[options.split]


# ---- the by-column split ---------------------------------------------------------------------------------------
#
# Exactly which rows go to eval: let N be the number of rows that are written (every row that no rejection reason
# applies to), v their split column values (float64, as Python's float() reads them), and
# k = floor(N * eval_fraction), with eval_fraction taken as the decimal number it is written as (0.2 is 1/5, not
# the nearest double). Sort v ascending: v_(1) <= ... <= v_(N). The threshold is T = v_(N-k), the largest value
# that must stay in train, and a row goes to eval when v > T, to train when v <= T. So every eval row is later
# (larger) than every train row, and rows with equal values always share a split: when values tie across the cut,
# the tied rows stay in train and eval holds fewer than k rows (the report says how many). k = 0 gives an empty
# eval split.
#
# How, for any number of workers: pass 1 (`count_piece_split_values`, one task per piece) counts each piece's
# distinct values exactly and saves them sorted with cumulative counts (`_state/piece-PPPPP.split-*.npy`, memory
# per piece: its distinct values). Then `column_split_threshold` finds T by bisection over the 2^64 order-preserving
# integer images of doubles: the smallest key K with #{v <= K} >= N - k, each count a sum of binary searches in the
# memory-mapped piece files. Pieces do not depend on the worker count, counting is exact, so T is the same for any
# worker count and on every rerun. Pass 2 is the ordinary conversion, with v > T deciding the split.


def ordered_keys(values):
    """float64 values -> uint64 keys in the same order (negative: all bits flipped; else the sign bit set)."""
    bits = np.asarray(values, dtype=np.float64).view(np.uint64)
    sign = np.uint64(1 << 63)
    return np.where(bits & sign, ~bits, bits | sign)


def key_value(key):
    """The float64 whose `ordered_keys` image is `key` (an int)."""
    sign = 1 << 63
    bits = key ^ sign if key & sign else ~key & (2**64 - 1)
    return float(np.array([bits], np.uint64).view(np.float64)[0])


def save_split_values(output, index, keys, counts):
    """_state/piece-PPPPP.split-keys.npy (sorted distinct keys) and .split-cumulative.npy (rows with key <= each)."""
    for suffix, array in ((".split-keys.npy", np.asarray(keys, np.uint64)),
                          (".split-cumulative.npy", np.cumsum(counts, dtype=np.int64))):
        path = piece_state_path(output, index, suffix)
        tmp = f"{path}.tmp-{os.getpid()}.npy"
        np.save(tmp, array)
        os.replace(tmp, path)


def column_split_threshold(output, pieces, eval_fraction):
    """The threshold of a by-column split from the pieces' saved split values (see the comment above).

    Returns:
        {"threshold": T as float (None when no rows), "threshold_key": str of its uint64 key, "rows": N,
         "target_eval_rows": k, "train_rows": #{v <= T}, "eval_rows": #{v > T}}.
    """
    arrays = [(np.load(piece_state_path(output, p["index"], ".split-keys.npy"), mmap_mode="r"),
               np.load(piece_state_path(output, p["index"], ".split-cumulative.npy"), mmap_mode="r"))
              for p in pieces]

    def at_most(key):  # rows with a key <= `key`
        total = 0
        for keys, cumulative in arrays:
            position = int(np.searchsorted(keys, np.uint64(key), side="right"))
            total += int(cumulative[position - 1]) if position else 0
        return total

    rows = sum(int(c[-1]) for _, c in arrays if c.size)
    target_eval = math.floor(rows * Fraction(repr(float(eval_fraction))))
    if rows == 0:
        return {"threshold": None, "threshold_key": None, "rows": 0, "target_eval_rows": 0, "train_rows": 0,
                "eval_rows": 0}
    need = rows - target_eval  # >= 1: eval_fraction < 1
    low, high = 0, 2**64 - 1  # invariant: at_most(high) >= need
    while low < high:
        middle = (low + high) // 2
        if at_most(middle) >= need:
            high = middle
        else:
            low = middle + 1
    train_rows = at_most(low)
    return {"threshold": key_value(low), "threshold_key": str(low), "rows": rows, "target_eval_rows": target_eval,
            "train_rows": train_rows, "eval_rows": rows - train_rows}


# ---- encoders --------------------------------------------------------------------------------------------------


def make_encoders(layout, options, output):
    """The converter's encoder of each categorical column of `layout`, in order.

    Args:
        layout: the format's `formats.Layout`.
        options: resolved `ConvertOptions` (`ConvertOptions.resolved`).
        output: the conversion's output directory; encoding "vocab" loads its vocabulary.npz.
    """
    vocabulary = None
    if options.encoding in ("vocab", "auto"):
        with np.load(os.path.join(output, VOCABULARY_FILENAME)) as data:
            vocabulary = {column.name: data[f"keys_{column.name}"] for column in layout.tables
                          if f"keys_{column.name}" in data}
    encoders = []
    for column in layout.tables:  # single-valued columns, then multi-valued ones (their tokens)
        if column.kind in formats.DERIVED_CARDINALITY:
            encoders.append(enc.DirectEncoder(formats.DERIVED_CARDINALITY[column.kind]))
        elif options.encoding == "auto" and column.name not in vocabulary:  # too many distinct keys: hashed
            encoders.append(enc.HashEncoder(options.hash_buckets))
        elif options.encoding == "hex-mod":
            encoders.append(enc.HexModEncoder(options.max_ind_range) if column.kind == "hex"
                            else enc.HashEncoder(options.max_ind_range))
        elif options.encoding == "hash":
            encoders.append(enc.HashEncoder(options.hash_buckets))
        else:
            modulus = options.max_ind_range if column.kind == "hex" else None
            encoders.append(enc.VocabularyEncoder(vocabulary[column.name], key_modulus=modulus))
    return encoders


def fixed_layout(layout, encoders):
    """The FixedLayout of record_layout "fixed": ids as varints padded to the width of the largest cardinality."""
    if layout.multi:  # ConvertOptions.resolved refuses this combination first; a second guard costs nothing
        raise ValueError(f"a fixed-width layout cannot hold the multi-valued columns {layout.multi_names}")
    return fixed_records.FixedLayout.for_ids_below(
        len(layout.dense), len(encoders), max([e.cardinality for e in encoders], default=1))


def vocab_keys(keys, layout, options):
    """The keys the vocabulary is built on: hex keys folded by max_ind_range first when it is set (MLPerf).

    `make_encoders` gives the same hex columns' VocabularyEncoder the same key_modulus, so encoding folds alike.
    """
    keys = keys.copy()
    for j, column in enumerate(layout.sparse):
        if column.kind == "hex":
            keys[:, j] = enc.fold_keys(keys[:, j], options.max_ind_range)
    return keys


def save_vocabulary(output, layout, options, pieces):
    """Merge the pieces' key counts (`piece-PPPPP.vocab.npz`) into vocabulary.npz: per table, the keys seen at least
    min_count times in the training split, most frequent first.

    Encoding "auto": a column whose distinct training keys number more than `vocab_max_keys` (a piece saw more, or
    all pieces together) gets no `keys_<name>` entry, which makes `make_encoders` hash it.
    """
    arrays = {}
    for column in layout.tables:  # a multi-valued column counts its tokens
        counter, too_many = enc.KeyCounter(), False
        for piece in pieces:
            with np.load(piece_state_path(output, piece["index"], ".vocab.npz")) as data:
                too_many |= bool(data[f"too_many_{column.name}"]) if f"too_many_{column.name}" in data else False
                if not too_many:
                    counter.add(data[f"keys_{column.name}"], data[f"counts_{column.name}"])
            if options.encoding == "auto" and not too_many and counter.pending_upper_bound > 2 * options.vocab_max_keys:
                too_many = counter.result()[0].size > options.vocab_max_keys  # memory: stop merging early
            if too_many:
                break
        if too_many:
            continue
        keys, counts = counter.result()
        if options.encoding == "auto" and keys.size > options.vocab_max_keys:
            continue
        vocabulary = enc.VocabularyEncoder.from_counts(keys, counts, options.min_count)
        arrays[f"keys_{column.name}"] = vocabulary.keys
    atomic_savez(os.path.join(output, VOCABULARY_FILENAME), arrays)


# ---- state files -----------------------------------------------------------------------------------------------


def piece_state_path(output, index, suffix):
    """_state/piece-PPPPP<suffix>: `.json` (the done marker), `.error.json`, `.counts.npz`, `.quarantine.tsv`,
    `.vocab.npz`."""
    return os.path.join(output, STATE_DIR, f"piece-{index:05d}{suffix}")


def piece_done(output, index):
    """Whether the piece finished in an earlier run (its done marker exists)."""
    return os.path.isfile(piece_state_path(output, index, ".json"))


def atomic_savez(path, arrays):
    """np.savez, but byte-stable: fixed zip timestamps and sorted names, so equal arrays give equal files."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[name]), allow_pickle=False)
    os.replace(tmp, path)


def _inputs_fingerprint(files):
    return [{"path": p, "size": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns} for p in files]


def plan_record(options, files):
    """What identifies a conversion in plan.json: converter version, options and the inputs' sizes and times."""
    return {"version": CONVERTER_VERSION, "options": options.as_dict(), "inputs": _inputs_fingerprint(files)}


def save_plan(output, plan, pieces, rules):
    """Write _state/plan.json: the `plan_record` with the pieces and split rules (what a resumed run reuses)."""
    plan = dict(plan, pieces=pieces, rules=rules)
    write_atomically(os.path.join(output, STATE_DIR, PLAN_FILENAME), json.dumps(plan, indent=1).encode())


def prepare_output(output, plan, overwrite):
    """Check what `output` already holds: the same conversion (resume), nothing, or something else (error).

    With `overwrite` everything in it is removed and the conversion starts afresh. The lock file (`OutputLock`) is
    neither content nor removed.

    Returns:
        (the previous plan.json dict, True) when resuming, else (None, False) with an empty output and _state/.
    """
    plan_path = os.path.join(output, STATE_DIR, PLAN_FILENAME)
    if os.path.isfile(plan_path) and not overwrite:
        with open(plan_path) as f:
            previous = json.load(f)
        same = {k: previous.get(k) for k in ("version", "options", "inputs")} == {
            k: plan[k] for k in ("version", "options", "inputs")}
        if same:
            return previous, True
        raise ConvertError(f"{output} holds a conversion of other inputs or options; pass overwrite=True "
                           "(--overwrite) to replace it, or choose another output directory")
    contents = [name for name in os.listdir(output) if name != LOCK_FILENAME] if os.path.isdir(output) else []
    if contents and not overwrite:
        raise ConvertError(f"output directory {output} is not empty and holds no conversion; pass overwrite=True "
                           "(--overwrite) to replace its contents, or choose another directory")
    if os.path.isdir(output):
        for name in contents:
            path = os.path.join(output, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(os.path.join(output, STATE_DIR), exist_ok=True)
    return None, False


# ---- the output directory: one conversion at a time, and write errors ------------------------------------------

WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full (ENOSPC)",
    errno.EDQUOT: "the disk quota is exceeded (EDQUOT)",
    errno.EROFS: "the file system is read-only (EROFS)",
    errno.EACCES: "permission denied (EACCES)",
    errno.EPERM: "operation not permitted (EPERM)",
}


def write_error(error, output, writing=None):
    """A ConvertError (one sentence) for an OSError of a write into `output`; None for another error.

    Args:
        error: the OSError.
        output: the output directory.
        writing: what was being written when the error has no file name (a write() or close() failing), e.g.
            "the shards of piece 3 (input /data/day_0)".
    """
    reason = WRITE_ERRNOS.get(getattr(error, "errno", None))
    if reason is None:
        return None
    target = error.filename or writing or f"a file in {output}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free some space (or choose another --output) and rerun: finished pieces are skipped"
    else:
        advice = "choose another --output, or make the directory writable, and rerun"
    return ConvertError(f"cannot write {target} in output directory {output}: {reason}; {advice}")


def _process_start_time(pid):
    """The start time of a process in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _process_alive(pid, start_time):
    """Whether process `pid` runs and (when both are known) is the one that started at `start_time`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    now = _process_start_time(pid)
    return start_time is None or now is None or now == start_time


class OutputLock:
    """One conversion at a time per output directory: OUT/_convert.lock, held with flock while the run lasts.

    The file names its holder (pid, host, start time, command). A second conversion into the directory gets a
    ConvertError naming them. The kernel releases the flock when its process dies, so a lock file left by a killed
    run is free, and is taken over with a warning (naming the dead pid) when it was written on this host; a free
    lock file written on another host is an error (flock may not reach across hosts on a network file system):
    delete it once that run is known to be gone.

    Use as a context manager; `warnings` lists what the taker should print.
    """

    def __init__(self, output):
        self.output = output
        self.path = os.path.join(output, LOCK_FILENAME)
        self.fd = None
        self.warnings = []

    def _holder_text(self, holder):
        if not isinstance(holder, dict):
            return "an unknown process (the lock file is unreadable)"
        return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
                f" ({' '.join(holder.get('command') or [])})")

    def _read(self, fd):
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
            return json.loads(data) if data else None
        except (OSError, ValueError):
            return None

    def acquire(self):
        os.makedirs(self.output, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise ConvertError(f"output directory {self.output} is in use by another conversion: "
                                   f"{self._holder_text(holder)} holds {self.path}; wait for it to finish or choose "
                                   "another --output") from None
            except OSError as error:
                os.close(fd)
                if write_error(error, self.output) is not None:
                    raise
                raise ConvertError(f"cannot lock {self.path} ({os.strerror(error.errno)}): the file system of "
                                   f"output directory {self.output} does not support flock; choose a local "
                                   "--output directory") from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder removed it between our open and flock: try the new file
                os.close(fd)
                continue
            self.fd = fd
            try:
                self._take_over(self._read(fd))
                self._write_holder()
            except BaseException:
                self.release()
                raise
            return self
        raise ConvertError(f"could not take the lock {self.path}: it was replaced 100 times in a row")

    def _take_over(self, previous):
        """Check a lock file that nobody holds (a run that died, or an empty new file)."""
        if previous is None:
            return
        host, pid = previous.get("host"), previous.get("pid")
        if host != socket.gethostname():
            raise ConvertError(f"output directory {self.output} has the lock file {self.path} of a conversion on "
                               f"another host ({self._holder_text(previous)}); if that run is gone, delete the lock "
                               "file and rerun")
        if pid == os.getpid():
            return  # an earlier conversion of this process that did not release it
        if isinstance(pid, int) and _process_alive(pid, previous.get("process_start")):
            self.warnings.append(f"took over the lock {self.path} of {self._holder_text(previous)}: that process "
                                 "runs but no longer holds the lock")
        else:
            self.warnings.append(f"took over the stale lock {self.path} of {self._holder_text(previous)}, which is "
                                 "no longer running; its finished pieces are reused")

    def _write_holder(self):
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "process_start": _process_start_time(os.getpid()), "command": sys.argv}
        data = json.dumps(holder, indent=1).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self):
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # while still holding the flock: a waiting opener retries on the new file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
