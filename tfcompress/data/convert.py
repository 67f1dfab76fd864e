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
    _convert.lock            while a run holds the directory: its pid, host, start time (`convert_plan.OutputLock`)

How the work is cut (and why the output does not depend on the number of workers): the inputs are cut into
*pieces*, each one converted by one worker into its own shards. A plain text file is cut into byte ranges of about
`shard_bytes` at line starts (a first pass counts the lines of each range, so every piece knows the line number of
its first line); a `.gz` file or a Parquet file is one piece. Pieces are numbered in input order, rows keep their
input order inside a piece, and nothing a piece writes depends on another piece, so any worker count gives the same
bytes. The random train/eval split is a hash of (seed, file name, line number), not a random stream.

Records: by default every record has the same length (`tfcompress.data.fixed_records`: ids as padded varints, still
ordinary tf.train.Examples), which `tfcompress.data.read` loads several times faster, and which the workers frame
and checksum in NumPy without importing TensorFlow; `record_layout="canonical"` writes protobuf's shortest encoding
through tf.io.TFRecordWriter instead. A schema with multi-valued columns (`genres = {type = "categorical", multi =
"|"}`) is written canonical by default, each such column one more variable-length int64 key
(docs/tfrecord_layout.md, "Multi-valued fields"); fixed-width records cannot hold it, and asking for them is an
error naming the columns. Workers are started with the spawn method: a script that calls `convert` with workers > 1
must do so under `if __name__ == "__main__":`.

One run at a time: the run holds OUT/_convert.lock (`convert_plan.OutputLock`); a second run into the same
directory stops with an error naming the holder (pid, host, start time). A full disk, a read-only file system or a
missing permission stops the run with one sentence naming the file (`convert_plan.write_error`); what was finished
is kept and a rerun resumes.

Rejections: every rejected row is counted and quarantined. `max_reject_fraction` (CLI `--max-reject-fraction`,
default 0.01 there) turns "too many rejected" into an error naming the top reasons with a hint, after the output
is complete.

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

import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from tfcompress._files import write_atomically
from tfcompress.data import encoding as enc
from tfcompress.data import fixed_records, formats
from tfcompress.data.convert_plan import (
    CONVERTER_VERSION,
    DEFAULT_HASH_BUCKETS,
    DEFAULT_ROWS_PER_SHARD,
    DEFAULT_SHARD_BYTES,
    DEFAULT_VOCAB_MAX_KEYS,
    PLAN_FILENAME,
    STATE_DIR,
    VOCABULARY_FILENAME,
    ConvertError,
    ConvertOptions,
    OutputLock,
    atomic_savez,
    column_split_threshold,
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
    write_error,
)
from tfcompress.data.convert_worker import (
    WorkerContext,
    convert_piece,
    count_piece_keys,
    count_piece_split_values,
    init_worker,
)
from tfcompress.data.schema import Schema
from tfcompress.data.tfio import tensorflow_io_status

__all__ = ["ConvertError", "ConvertOptions", "convert", "dense_count_array", "load_counts"]

REPORT_FILENAME = "report.json"
QUARANTINE_FILENAME = "quarantine.tsv"
COUNTS_DIR = "counts"
SPARSE_TABLE_FRACTION = 0.01  # a hash table whose train ids use less than this share of its buckets is warned about

# What to do about a rejection reason (the error of `max_reject_fraction`). {label}: the label column.
REJECT_HINTS = {
    "empty_line": "remove the empty lines",
    "wrong_column_count": "check the delimiter and that no field holds it (quoting is not interpreted)",
    "bad_label": "the label column {label!r} must be exactly 0 or 1; map it in the schema file, e.g. "
                 "`label = {{source = \"{label}\", threshold = 4}}` (1 when >= 4) or "
                 "`label = {{source = \"{label}\", positive = [\"click\", \"1\"]}}`",
    "non_numeric_dense": "a dense column holds text: move it to `sparse` in the schema file",
    "bad_hex": "a hex_sparse column holds other text: move it to `sparse`",
    "bad_categorical": "negative integer ids: cast the column to text",
    "bad_hour": "hour_column must be YYMMDDHH",
    "bad_split_value": "the --split-column must be a number in every row",
    "dense_overflow": "a dense value is beyond float32 (3.4e38): use --dense-transform log1p, or fix the values",
    "dense_log1p_domain": "log1p of a value <= -1: drop --keep-negative or use --dense-transform none",
}


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
    # spawn, not fork: the parent may have TensorFlow loaded, which is not fork-safe. concurrent.futures, not
    # multiprocessing.Pool: a Pool whose worker dies (the out-of-memory killer, a crash in native code) waits
    # forever for the lost task, while the executor fails the pending tasks with BrokenProcessPool. At most one
    # task per process is in flight, so the tasks named when one dies are the ones that were running.
    processes = min(workers, len(tasks))
    executor = concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=init_worker, initargs=(context,))
    queue = iter(tasks)
    running = {executor.submit(function, task): task for task in itertools.islice(queue, processes)}
    try:
        while running:
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise ConvertError(_worker_death_message(function, [task] + list(running.values()))) from None
                try:
                    for queued in itertools.islice(queue, 1):
                        running[executor.submit(function, queued)] = queued
                except BrokenProcessPool:
                    # Another worker died after `task` finished: the dead one's task is still in `running`.
                    raise ConvertError(_worker_death_message(function, list(running.values()))) from None
                if progress is not None:
                    progress.done += 1
                if on_done is not None:
                    on_done(result)
                yield result
    finally:
        if running:
            # Like Pool.terminate: an error or Ctrl-C in the caller does not wait for the tasks in flight (a rerun
            # redoes unfinished pieces from scratch). _processes is private; without it shutdown waits for them.
            for process in list((getattr(executor, "_processes", None) or {}).values()):
                process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)


def describe_task(task):
    """What a pool task works on, for messages: "piece 3 (input /data/day_0.gz)" or "the scan of input ..."."""
    if isinstance(task, dict) and "index" in task:
        where = f", bytes {task['start']}-{task['end']}" if task.get("kind") == "plain" else ""
        return f"piece {task['index']} (input {task['path']}{where})"
    if isinstance(task, tuple) and len(task) == 2 and isinstance(task[1], tuple):  # scan_file_at's (position, task)
        return f"the scan of input {task[1][0]}"
    return repr(task)  # pragma: no cover - every task of this module is one of the above


def _worker_death_message(function, in_flight):
    named = "; ".join(describe_task(task) for task in in_flight)
    which = "it was running" if len(in_flight) == 1 else "one of the tasks it was running is"
    return (f"a worker process of the conversion died (killed by a signal such as the out-of-memory killer's "
            f"SIGKILL, or crashed in native code) during {function.__name__}; {which}: {named}. Finished pieces "
            "are kept: rerun the same command to resume (with fewer --workers if memory ran out)")


# ---- the run -------------------------------------------------------------------------------------------------


def convert(inputs, output, format, *, workers=1, encoding=None, max_ind_range=None, min_count=1,
            hash_buckets=DEFAULT_HASH_BUCKETS, dense_transform=None, clip_negative=True, split="none",
            eval_fraction=0.1, seed=2020, test_day=23, shard_bytes=DEFAULT_SHARD_BYTES,
            rows_per_shard=DEFAULT_ROWS_PER_SHARD, schema=None, record_layout=None, strict=False, overwrite=False,
            progress=False, on_piece_done=None, split_column=None, vocab_max_keys=DEFAULT_VOCAB_MAX_KEYS,
            max_reject_fraction=None):
    """Convert raw click logs into the TFRecord layout of docs/tfrecord_layout.md (module docstring: the output).

    Args:
        inputs: file paths, directories or glob patterns (a `.gz` file is read as gzip whatever its name).
        output: output directory.
        format: "criteo-tsv", "criteo-csv", "avazu-csv", "csv" (needs `schema`) or "parquet".
        workers: worker processes, >= 1 (the output is the same for any number).
        encoding, max_ind_range, min_count, hash_buckets, dense_transform, clip_negative, split, eval_fraction,
            seed, test_day, shard_bytes, rows_per_shard, record_layout, split_column, vocab_max_keys: see
            `ConvertOptions`.
        schema: schema TOML path (format "csv"; optional for "parquet").
        strict: stop at the first bad row with a ConvertError naming its file and line.
        overwrite: empty the output directory first (otherwise a directory holding the same conversion is
            resumed, and one holding anything else is an error).
        progress: print a progress line (rows, rows/s) to stderr.
        on_piece_done: called with each finished piece's report (in the calling process).
        max_reject_fraction: None (no limit: the caller reads the report), or the largest share of rows_read that
            may be rejected; above it a ConvertError names the top reasons (the output is complete, report.json
            written; a rerun with a larger limit resumes without redoing anything).

    Returns:
        the report dict (also written to report.json). Its `warnings` (also printed to stderr) say what may be
        wrong without being an error: a stale lock taken over, a by-column split whose ties moved rows, a hash
        table that is mostly empty.

    Raises:
        FileNotFoundError: an input matches nothing.
        ValueError / ConvertError: bad options; an unreadable input, a bad header, a bad row under `strict`; an
            input that broke off mid-way (e.g. a truncated .gz): then every other piece is still converted,
            report.json is written, and the message names the file and how many of its rows were kept;
            another conversion holds the output directory; a write failed (full disk, read-only file system, no
            permission: the message names the file); more rows rejected than max_reject_fraction.
    """
    started = time.perf_counter()
    if not is_int_at_least(workers, 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if max_reject_fraction is not None and not (isinstance(max_reject_fraction, (int, float))
                                                and 0 <= max_reject_fraction <= 1):
        raise ValueError(f"max_reject_fraction must be a number in [0, 1] (or None), got {max_reject_fraction!r}")
    layout = formats.layout_for_format(format, schema)
    options = ConvertOptions(
        format=format, encoding=encoding, max_ind_range=max_ind_range, min_count=min_count,
        hash_buckets=hash_buckets, dense_transform=dense_transform, clip_negative=bool(clip_negative), split=split,
        eval_fraction=eval_fraction, seed=seed, test_day=test_day, shard_bytes=shard_bytes,
        rows_per_shard=rows_per_shard, schema_path=schema, record_layout=record_layout, split_column=split_column,
        vocab_max_keys=vocab_max_keys,
    ).resolved(layout)
    if options.split_column is not None:
        layout = dataclasses.replace(layout, split_column=options.split_column)
    output = os.path.abspath(os.fspath(output))
    files = expand_inputs(inputs)
    parquet_note = _tensorflow_io_note(format, progress)
    column_maps = read_column_maps(files, layout, format)
    warnings = []
    try:
        with OutputLock(output) as lock:
            warnings += _warn(lock.warnings)
            report = _run(output, files, layout, options, column_maps, strict, workers, overwrite, progress,
                          on_piece_done, started, parquet_note, warnings)
    except OSError as error:
        translated = write_error(error, output)
        if translated is None:
            raise
        raise translated from None
    if report["errors"]:
        raise ConvertError(_error_message(report))
    if max_reject_fraction is not None and report["rows_rejected"] > max_reject_fraction * report["rows_read"]:
        raise ConvertError(_reject_message(report, layout, column_maps, output, max_reject_fraction))
    return report


def _warn(messages):
    """Print each message to stderr as a warning; returns them (for report.json)."""
    for message in messages:
        print(f"warning: {message}", file=sys.stderr, flush=True)
    return list(messages)


def _run(output, files, layout, options, column_maps, strict, workers, overwrite, progress, on_piece_done, started,
         parquet_note, warnings):
    """The conversion proper, under the output lock: plan, first passes, pieces, report."""
    pieces, rules = _plan_pieces(output, files, layout, options, column_maps, strict, workers, overwrite)
    warnings += _warn(gzip_warnings(pieces, workers))
    counter = multiprocessing.get_context("spawn").Value("q", 0)
    split_info = None
    if options.split == "by-column":
        rules, split_info = _column_split(output, pieces, rules, layout, options, column_maps, strict, workers,
                                          progress, counter)
        warnings += _warn(_split_warnings(split_info, options))
    context = WorkerContext(output, layout, options, column_maps, rules, strict, progress=counter)
    if options.encoding in ("vocab", "auto"):
        _build_vocabulary(pieces, context, workers, progress)
    errors, skipped = _convert_pieces(pieces, context, workers, progress, on_piece_done)
    return _finish(output, files, pieces, context, errors, skipped, started, parquet_note, split_info, warnings)


def gzip_warnings(pieces, workers):
    """A warning when workers would idle because .gz inputs are single pieces (one worker reads a .gz whole).

    Why a .gz file is not split: DEFLATE has no points to start decoding mid-way (a block's back-references reach
    32 KiB into the text before it, and block boundaries are bit offsets found only by decoding), so a worker
    converting the k-th of n parts would first decompress the k-1 parts before it; the plan would also decompress
    the whole file once to number its lines. Decompressing first (`gunzip --keep`) makes it a plain text file, which
    is cut into byte ranges for any number of workers, with the same rows in the same splits
    (tests/test_convert_safety.py checks this, criteo-days-halves included).
    """
    gzipped = [p["path"] for p in pieces if p["kind"] == "gzip"]
    if workers <= 1 or len(pieces) >= workers or not gzipped:
        return []
    return [f"{len(pieces)} pieces for {workers} workers: a .gz input is converted whole by one worker (a gzip "
            f"stream cannot be entered mid-way); to spread it over the workers, decompress it first and convert "
            f"the plain file, which is cut into byte ranges (same rows, same splits): gunzip --keep "
            f"{' '.join(gzipped[:3])}{' ...' if len(gzipped) > 3 else ''}"]


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


def _column_split(output, pieces, rules, layout, options, column_maps, strict, workers, progress, counter):
    """A by-column split's threshold (`convert_plan.column_split_threshold`): from plan.json when a run computed it
    already, else by a first pass over the pieces; the rules with the threshold, saved in plan.json."""
    plan_path = os.path.join(output, STATE_DIR, PLAN_FILENAME)
    with open(plan_path) as f:
        plan = json.load(f)
    if plan.get("split_info") is not None:
        return plan["rules"], plan["split_info"]
    todo = [p for p in pieces if not os.path.isfile(piece_state_path(output, p["index"], ".split-cumulative.npy"))]
    context = WorkerContext(output, layout, options, column_maps, rules, strict, progress=counter)
    errors = []
    with _Progress(counter, len(todo), "split pass", progress) as bar:
        for result in _run_tasks(count_piece_split_values, todo, context, workers, bar):
            if result.get("error"):
                errors.append(result)
    if errors:
        raise ConvertError("the split pass could not read every input: " + "; ".join(
            f"{e['error']}" for e in errors) + "; no shards were written, fix the inputs and rerun")
    split_info = dict(column_split_threshold(output, pieces, options.eval_fraction), column=options.split_column,
                      eval_fraction=float(options.eval_fraction))
    rules = {path: dict(rule, threshold=split_info["threshold"], threshold_key=split_info["threshold_key"])
             for path, rule in rules.items()}
    plan = {k: v for k, v in plan.items() if k not in ("pieces", "rules")}
    save_plan(output, dict(plan, split_info=split_info), pieces, rules)
    return rules, split_info


def _split_warnings(info, options):
    """Warnings about a by-column split whose eval part came out empty or short (ties at the threshold)."""
    if info["rows"] == 0:
        return []
    if info["eval_rows"] == 0:
        return [f"split by-column {options.split_column!r}: eval is empty: {info['rows']:,} rows, "
                f"{info['target_eval_rows']:,} wanted in eval, but no row has a value above the threshold "
                f"{info['threshold']!r} (ties: rows with equal values stay together, in train)"]
    if info["eval_rows"] < info["target_eval_rows"]:
        return [f"split by-column {options.split_column!r}: eval has {info['eval_rows']:,} rows instead of "
                f"{info['target_eval_rows']:,}: {info['target_eval_rows'] - info['eval_rows']:,} rows share the "
                f"threshold value {info['threshold']!r} with earlier rows and stay in train"]
    return []


def _build_vocabulary(pieces, context, workers, progress):
    """First pass of encodings "vocab" and "auto": count keys per table on the training rows, keep those seen
    min_count times (auto: only for tables with at most vocab_max_keys distinct keys)."""
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


def _finish(output, files, pieces, context, errors, skipped, started, parquet_note, split_info, warnings):
    """Merge the piece results into report.json, counts/, quarantine.tsv and schema.json."""
    splits = split_names(context.options)
    piece_reports = _load_piece_reports(output, pieces)
    totals = _sum_piece_reports(piece_reports, files, splits)
    _merge_quarantine(output, piece_reports)
    ids_used = _merge_id_counts(output, context.layout, splits, piece_reports)
    _save_schema(output, files, context, totals["rows_per_split"], split_info)
    tables = _tables(context, ids_used)
    warnings += _warn(_table_warnings(tables, context.options))
    report = _run_report(piece_reports, totals, len(pieces), skipped, errors, started, parquet_note)
    report.update(tables=tables, split=split_info, warnings=warnings)
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
    """counts/<split>.npz: per table, `ids_<name>` and `counts_<name>` summed over the pieces.

    Returns:
        {table name: distinct ids in the train split}.
    """
    os.makedirs(os.path.join(output, COUNTS_DIR), exist_ok=True)
    used = {}
    for split in splits:
        arrays = {}
        for column in layout.tables:  # a multi-valued table counts every token
            total = enc.KeyCounter(np.int64)
            for r in piece_reports:
                with np.load(piece_state_path(output, r["index"], ".counts.npz")) as data:
                    total.add(data[f"{split}/ids_{column.name}"], data[f"{split}/counts_{column.name}"])
            arrays[f"ids_{column.name}"], arrays[f"counts_{column.name}"] = total.result()
            if split == "train":
                used[column.name] = int(arrays[f"ids_{column.name}"].size)
        atomic_savez(os.path.join(output, COUNTS_DIR, f"{split}.npz"), arrays)
    return used


def _tables(context, ids_used):
    """Per categorical column: its encoder, table size (cardinality) and the distinct ids the train split uses."""
    return [{"name": column.name, "encoding": encoder.kind, "cardinality": int(encoder.cardinality),
             "train_ids_used": ids_used.get(column.name, 0)}
            for column, encoder in zip(context.layout.tables, context.load_encoders())]


def _table_warnings(tables, options):
    """A hash table of which the training data uses under 1% of the rows: "full" would be mostly empty, and a
    compression ratio measured against it means little. (hex-mod, MLPerf's fixed range, is not warned about.)"""
    warnings = []
    for table in tables:
        if table["encoding"] == "hash" and table["train_ids_used"] < SPARSE_TABLE_FRACTION * table["cardinality"]:
            better = ("--encoding auto (or vocab)" if options.encoding != "auto" else
                      "a larger --vocab-max-keys (a vocabulary) or a smaller --hash-buckets")
            warnings.append(f"column {table['name']!r}: the training rows use {table['train_ids_used']:,} of its "
                            f"{table['cardinality']:,} {table['encoding']} ids; the table size (what 'full' and "
                            f"compression ratios are measured against) is mostly empty: use {better}")
    return warnings


def _save_schema(output, files, context, rows_per_split, split_info):
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
    if options.encoding == "auto":
        extra["hash_buckets"] = options.hash_buckets
        extra["vocab_max_keys"] = options.vocab_max_keys
        extra["column_encodings"] = {column.name: e.kind for column, e in zip(layout.tables, encoders)}
    if layout.label_rule is not None:
        extra["label_rule"] = dict(layout.label_rule.describe(), source=layout.label)
    if split_info is not None:
        extra["split"] = split_info
    n_sparse = len(layout.sparse)
    multi_fields = [{"name": column.name, "cardinality": int(encoder.cardinality),
                     "delimiter": column.multi.decode("utf-8")}
                    for column, encoder in zip(layout.multi, encoders[n_sparse:])]
    Schema(name=layout.name, label=layout.label, dense_names=list(layout.dense), sparse_names=layout.sparse_names,
           cardinalities=[e.cardinality for e in encoders[:n_sparse]], dense_transform=options.dense_transform,
           encoding=options.encoding, extra=extra, multi_fields=multi_fields).save(output)


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


def _rejected_label_values(output, layout, column_maps, limit=100_000):
    """The most common label fields of the first `limit` bad_label rows of quarantine.tsv: [(value, count)]."""
    values = {}
    with open(os.path.join(output, QUARANTINE_FILENAME), "rb") as f:
        for n, entry in enumerate(f):
            if n >= limit:
                break
            path, _, reason, raw = entry.rstrip(b"\n").split(b"\t", 3)
            if reason != b"bad_label":
                continue
            column_map = column_maps.get(path.decode("utf-8", errors="surrogateescape"))
            if column_map is not None:
                fields = raw.split(layout.delimiter)
                value = fields[column_map.label].decode("utf-8", errors="replace") if len(fields) == \
                    column_map.n_columns else None
            else:  # Parquet: the row as JSON
                try:
                    value = str(json.loads(raw).get(layout.label))
                except (ValueError, AttributeError):
                    value = None
            if value is not None:
                values[value] = values.get(value, 0) + 1
    return sorted(values.items(), key=lambda item: (-item[1], item[0]))


def _reject_message(report, layout, column_maps, output, max_reject_fraction):
    """The error of too many rejected rows: the share, the top reasons with counts and what to do about each."""
    read, rejected = report["rows_read"], report["rows_rejected"]
    reasons = sorted(((count, reason) for reason, count in report["rejected_by_reason"].items() if count),
                     key=lambda item: (-item[0], item[1]))[:3]
    label = layout.label
    hints = []
    for count, reason in reasons:
        hint = REJECT_HINTS[reason].format(label=label)
        if reason == "bad_label":
            seen = _rejected_label_values(output, layout, column_maps)[:5]
            seen = ", ".join(f"{value!r} x{n:,}" for value, n in seen)
            if layout.label_rule is not None:
                hint = f"the label column {label!r} is empty or does not fit the schema's label rule"
            elif layout.format not in ("csv", "parquet"):
                hint = f"the label column {label!r} must be exactly 0 or 1: is --format {layout.format} right?"
            hint += f"; rejected label values include {seen}" if seen else ""
        hints.append(f"{reason} {count:,} ({hint})")
    return (f"{rejected:,} of {read:,} rows ({rejected / read:.1%}) were rejected, more than --max-reject-fraction "
            f"{max_reject_fraction:g}; top reasons: {'; '.join(hints)}; the rejected lines are in "
            f"{os.path.join(output, QUARANTINE_FILENAME)} (the rest was written), rerun with a larger "
            "--max-reject-fraction to accept them as they are")


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
        return {name: (data[f"ids_{name}"], data[f"counts_{name}"]) for name in schema.table_names}


def dense_count_array(ids, counts, cardinality):
    """Sparse (ids, counts) -> a dense int64 array of length `cardinality` (for small tables)."""
    dense = np.zeros(int(cardinality), np.int64)
    dense[np.asarray(ids, np.int64)] = counts
    return dense
