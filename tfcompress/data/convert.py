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

The code, imported in this direction only: this module is the run (`convert`: plan or resume, the worker pool,
progress, then merging the pieces' results into report.json, counts/, quarantine.tsv and schema.json) ->
`tfcompress.data.convert_worker` (one piece: parse, encode, write shards, quarantine) ->
`tfcompress.data.convert_plan` (options, inputs, pieces, splits, encoders, the `_state/` files).
"""

import json
import multiprocessing
import os
import shutil
import sys
import threading
import time

import numpy as np

from tfcompress._files import write_atomically
from tfcompress.data import encoding as enc
from tfcompress.data import fixed_records, formats
from tfcompress.data.convert_plan import (
    CONVERTER_VERSION,
    DEFAULT_HASH_BUCKETS,
    DEFAULT_ROWS_PER_SHARD,
    DEFAULT_SHARD_BYTES,
    VOCABULARY_FILENAME,
    ConvertError,
    ConvertOptions,
    atomic_savez,
    expand_inputs,
    is_int_at_least,
    number_pieces,
    piece_done,
    piece_state_path,
    plan_record,
    prepare_output,
    read_column_maps,
    save_plan,
    save_vocabulary,
    scan_file_at,
    scan_tasks,
    split_names,
)
from tfcompress.data.convert_worker import WorkerContext, convert_piece, count_piece_keys, init_worker
from tfcompress.data.schema import Schema
from tfcompress.data.tfio import tensorflow_io_status

__all__ = ["ConvertError", "ConvertOptions", "convert", "dense_count_array", "load_counts"]

REPORT_FILENAME = "report.json"
QUARANTINE_FILENAME = "quarantine.tsv"
COUNTS_DIR = "counts"


# ---- running tasks -------------------------------------------------------------------------------------------


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
        init_worker(context)
        try:
            for task in tasks:
                result = function(task)
                if progress is not None:
                    progress.done += 1
                if on_done is not None:
                    on_done(result)
                yield result
        finally:
            init_worker(None)
        return
    # spawn, not fork: the parent may have TensorFlow loaded, which is not fork-safe.
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)), initializer=init_worker,
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


# ---- the run -------------------------------------------------------------------------------------------------


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
    if not is_int_at_least(workers, 1):
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
    parquet_note = _tensorflow_io_note(format, progress)
    column_maps = read_column_maps(files, layout, format)
    pieces, rules = _plan_pieces(output, files, layout, options, column_maps, strict, workers, overwrite)

    counter = multiprocessing.get_context("spawn").Value("q", 0)
    context = WorkerContext(output, layout, options, column_maps, rules, strict, progress=counter)
    if options.encoding == "vocab":
        _build_vocabulary(pieces, context, workers, progress)
    errors, skipped = _convert_pieces(pieces, context, workers, progress, on_piece_done)
    report = _finish(output, files, pieces, context, errors, skipped, started, parquet_note)
    if errors:
        raise ConvertError(_error_message(report))
    return report


def _tensorflow_io_note(format, progress):
    """Parquet: one line on whether tensorflow-io's ops load (printed with `progress`); else None."""
    if format != "parquet":
        return None
    note = tensorflow_io_status().line()
    if progress:
        print(note, file=sys.stderr, flush=True)
    return note


def _plan_pieces(output, files, layout, options, column_maps, strict, workers, overwrite):
    """The pieces and split rules: those of _state/plan.json when resuming the same conversion, else scanned anew
    (in parallel, one task per input file) and saved there."""
    plan = plan_record(options, files)
    previous, resuming = prepare_output(output, plan, overwrite)
    if resuming:
        return previous["pieces"], previous["rules"]
    tasks = scan_tasks(files, layout, options, column_maps)
    scan_context = WorkerContext(output, layout, options, column_maps, {}, strict)
    pieces_per_task = list(_run_tasks(scan_file_at, list(enumerate(tasks)), scan_context, workers))
    pieces_per_task = [p for _, p in sorted(pieces_per_task, key=lambda item: item[0])]
    pieces, rules = number_pieces(files, options, tasks, pieces_per_task)
    save_plan(output, plan, pieces, rules)
    return pieces, rules


def _build_vocabulary(pieces, context, workers, progress):
    """First pass of encoding "vocab": count keys per table on the training rows, keep those seen min_count times."""
    output = context.output
    if os.path.isfile(os.path.join(output, VOCABULARY_FILENAME)):
        return
    todo = [p for p in pieces if not os.path.isfile(piece_state_path(output, p["index"], ".vocab.npz"))]
    errors = []
    with _Progress(context.progress, len(todo), "vocabulary pass", progress) as bar:
        for result in _run_tasks(count_piece_keys, todo, context, workers, bar):
            if result.get("error"):
                errors.append(result)
    if errors:
        raise ConvertError("the vocabulary pass could not read every input: " + "; ".join(
            f"{e['error']}" for e in errors) + "; no shards were written, fix the inputs and rerun")
    save_vocabulary(output, context.layout, context.options, pieces)


def _convert_pieces(pieces, context, workers, progress, on_piece_done):
    """Convert every piece not done in an earlier run.

    Returns:
        (the reports of pieces whose input broke off, the number of pieces skipped as done).
    """
    todo = [p for p in pieces if not piece_done(context.output, p["index"])]
    skipped = len(pieces) - len(todo)
    context.progress.value = 0
    errors = []
    with _Progress(context.progress, len(todo), "convert", progress) as bar:
        for result in _run_tasks(convert_piece, todo, context, workers, bar, on_piece_done):
            if result.get("error"):
                errors.append(result)
    return errors, skipped


# ---- finishing: merging the pieces' results --------------------------------------------------------------------


def _finish(output, files, pieces, context, errors, skipped, started, parquet_note):
    """Merge the piece results into report.json, counts/, quarantine.tsv and schema.json."""
    splits = split_names(context.options)
    piece_reports = _load_piece_reports(output, pieces)
    totals = _sum_piece_reports(piece_reports, files, splits)
    _merge_quarantine(output, piece_reports)
    _merge_id_counts(output, context.layout, splits, piece_reports)
    _save_schema(output, files, context, totals["rows_per_split"])
    report = _run_report(piece_reports, totals, len(pieces), skipped, errors, started, parquet_note)
    if report["rows_read"] != report["rows_written"] + report["rows_rejected"]:  # pragma: no cover - a bug
        raise AssertionError(f"rows_read {report['rows_read']} != written {report['rows_written']} + rejected "
                             f"{report['rows_rejected']}")
    write_atomically(os.path.join(output, REPORT_FILENAME),
                     (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    return report


def _load_piece_reports(output, pieces):
    """The reports of the pieces that ran (done, or broken off: `.error.json`), in piece order."""
    piece_reports = []
    for piece in pieces:
        for name in (".json", ".error.json"):
            path = piece_state_path(output, piece["index"], name)
            if os.path.isfile(path):
                with open(path) as f:
                    piece_reports.append(json.load(f))
                break
    return piece_reports


def _sum_piece_reports(piece_reports, files, splits):
    """The pieces' rejections by reason, rows per split, rows per input file and shards per split, added up."""
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
    return {"rejected_by_reason": rejected, "rows_per_split": per_split, "files": per_file, "shards": shards}


def _merge_quarantine(output, piece_reports):
    """quarantine.tsv: the pieces' files in piece order, so the file is the same for any worker count."""
    with open(os.path.join(output, f"{QUARANTINE_FILENAME}.tmp"), "wb") as out:
        for r in piece_reports:
            path = piece_state_path(output, r["index"], ".quarantine.tsv")
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, out)
    os.replace(os.path.join(output, f"{QUARANTINE_FILENAME}.tmp"), os.path.join(output, QUARANTINE_FILENAME))


def _merge_id_counts(output, layout, splits, piece_reports):
    """counts/<split>.npz: per table, `ids_<name>` and `counts_<name>` summed over the pieces."""
    os.makedirs(os.path.join(output, COUNTS_DIR), exist_ok=True)
    for split in splits:
        arrays = {}
        for column in layout.sparse:
            total = enc.KeyCounter(np.int64)
            for r in piece_reports:
                with np.load(piece_state_path(output, r["index"], ".counts.npz")) as data:
                    total.add(data[f"{split}/ids_{column.name}"], data[f"{split}/counts_{column.name}"])
            arrays[f"ids_{column.name}"], arrays[f"counts_{column.name}"] = total.result()
        atomic_savez(os.path.join(output, COUNTS_DIR, f"{split}.npz"), arrays)


def _save_schema(output, files, context, rows_per_split):
    """schema.json: columns, cardinalities, encoding, dense transform and (extra) the conversion's options."""
    layout, options = context.layout, context.options
    encoders = context.load_encoders()
    extra = {
        "converter": "tfcompress.data.convert", "converter_version": CONVERTER_VERSION, "format": options.format,
        "options": options.as_dict(), "inputs": files, "splits": rows_per_split,
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
           cardinalities=[e.cardinality for e in encoders], dense_transform=options.dense_transform,
           encoding=options.encoding, extra=extra).save(output)


def _run_report(piece_reports, totals, n_pieces, skipped, errors, started, parquet_note):
    """The report of the run (report.json): rows read / written / rejected, totals, errors, speed."""
    rows_read = sum(r["rows_read"] for r in piece_reports)
    seconds = time.perf_counter() - started
    return {
        "rows_read": rows_read,
        "rows_written": sum(r["rows_written"] for r in piece_reports),
        "rows_rejected": sum(r["rows_rejected"] for r in piece_reports),
        "rejected_by_reason": totals["rejected_by_reason"],
        "rows_per_split": totals["rows_per_split"],
        "files": totals["files"],
        "shards": totals["shards"],
        "pieces": n_pieces,
        "pieces_skipped": skipped,
        "errors": sorted((dict(e["error"]) for e in errors), key=lambda e: (e["path"], e["line"])),
        "seconds": seconds,
        "rows_per_s": rows_read / seconds if seconds > 0 else None,
        "quarantine": QUARANTINE_FILENAME,
        "tensorflow_io": parquet_note,
    }


def _error_message(report):
    parts = []
    for e in report["errors"]:
        kept = report["files"].get(e["path"], {})
        parts.append(f"input {e['path']} is truncated or unreadable ({e['cause']}) at line {e['line']}: "
                     f"{kept.get('rows_read', 0):,} rows were kept ({kept.get('rows_written', 0):,} written, "
                     f"{kept.get('rows_rejected', 0):,} rejected), the rest of the file is missing")
    return ("; ".join(parts) + ". Every other input was converted and report.json written; fix or remove the "
            "file and rerun (finished pieces are skipped)")


# ---- reading the counts of a conversion ------------------------------------------------------------------------


def load_counts(output, split="train"):
    """Per-id access counts of a conversion: {table name: (ids int64 sorted, counts int64)}."""
    schema = Schema.load(output)
    with np.load(os.path.join(os.fspath(output), COUNTS_DIR, f"{split}.npz")) as data:
        return {name: (data[f"ids_{name}"], data[f"counts_{name}"]) for name in schema.sparse_names}


def dense_count_array(ids, counts, cardinality):
    """Sparse (ids, counts) -> a dense int64 array of length `cardinality` (for small tables)."""
    dense = np.zeros(int(cardinality), np.int64)
    dense[np.asarray(ids, np.int64)] = counts
    return dense
