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

`gunzip_chunks` and `plain_chunks` read the raw bytes, for the scan here and for the workers
(`tfcompress.data.convert_worker`).
"""

import dataclasses
import glob
import gzip
import json
import os
import shutil
import zipfile
import zlib

import numpy as np

from tfcompress._files import write_atomically
from tfcompress.data import encoding as enc
from tfcompress.data import fixed_records, formats
from tfcompress.data.encoding import splitmix64

CONVERTER_VERSION = 1
SPLITS = ("none", "random", "criteo-days", "criteo-days-halves")
RECORD_LAYOUTS = ("fixed", "canonical")
DENSE_TRANSFORMS = ("log1p", "none")
DEFAULT_MAX_IND_RANGE = 40_000_000
DEFAULT_HASH_BUCKETS = 1 << 22
DEFAULT_SHARD_BYTES = 256 << 20
DEFAULT_ROWS_PER_SHARD = 1 << 21
BLOCK_BYTES = 4 << 20
STATE_DIR = "_state"
PLAN_FILENAME = "plan.json"
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
            ("max_ind_range", max_ind_range is None or is_int_at_least(max_ind_range, 1), "an integer >= 1"),
            ("min_count", is_int_at_least(self.min_count, 1), "an integer >= 1"),
            ("hash_buckets", is_int_at_least(self.hash_buckets, 1), "an integer >= 1"),
            ("eval_fraction", isinstance(self.eval_fraction, (int, float)) and 0 < self.eval_fraction < 1,
             "a number in (0, 1)"),
            ("seed", is_int_at_least(self.seed, 0), "an integer >= 0"),
            ("test_day", is_int_at_least(self.test_day, 0), "an integer >= 0"),
            ("shard_bytes", is_int_at_least(self.shard_bytes, 1), "an integer >= 1"),
            ("rows_per_shard", is_int_at_least(self.rows_per_shard, 1), "an integer >= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name, None)!r}")
        schema_path = os.path.abspath(self.schema_path) if self.schema_path else None
        return dataclasses.replace(self, encoding=encoding, max_ind_range=max_ind_range,
                                   dense_transform=dense_transform, schema_path=schema_path)

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


def assign_splits(rule, line):
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
    """The splits a conversion writes, in order."""
    return {"none": ["train"], "random": ["train", "eval"], "criteo-days": ["train", "eval"],
            "criteo-days-halves": ["train", "eval", "test"]}[options.split]


# ---- encoders --------------------------------------------------------------------------------------------------


def make_encoders(layout, options, output):
    """The converter's encoder of each categorical column of `layout`, in order.

    Args:
        layout: the format's `formats.Layout`.
        options: resolved `ConvertOptions` (`ConvertOptions.resolved`).
        output: the conversion's output directory; encoding "vocab" loads its vocabulary.npz.
    """
    vocabulary = None
    if options.encoding == "vocab":
        with np.load(os.path.join(output, VOCABULARY_FILENAME)) as data:
            vocabulary = {name: data[f"keys_{name}"] for name in layout.sparse_names}
    encoders = []
    for column in layout.sparse:
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
    return encoders


def fixed_layout(layout, encoders):
    """The FixedLayout of record_layout "fixed": ids as varints padded to the width of the largest cardinality."""
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
    min_count times in the training split, most frequent first."""
    arrays = {}
    for column in layout.sparse:
        counter = enc.KeyCounter()
        for piece in pieces:
            with np.load(piece_state_path(output, piece["index"], ".vocab.npz")) as data:
                counter.add(data[f"keys_{column.name}"], data[f"counts_{column.name}"])
        keys, counts = counter.result()
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

    With `overwrite` everything in it is removed and the conversion starts afresh.

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
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ConvertError(f"output directory {output} is not empty and holds no conversion; pass overwrite=True "
                           "(--overwrite) to replace its contents, or choose another directory")
    if os.path.isdir(output):
        for name in os.listdir(output):
            path = os.path.join(output, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(os.path.join(output, STATE_DIR), exist_ok=True)
    return None, False
