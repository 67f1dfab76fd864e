"""One worker of a conversion (`tfcompress.data.convert`): read a piece, parse, encode, write its shards.

A worker process gets a `WorkerContext` once (`init_worker`, the pool initializer) and then runs piece tasks:

- `convert_piece`: parse the piece's rows, encode them, assign each to its split and write the split's shards
  (`fixed_records.FixedShardWriter`, framed in NumPy without TensorFlow, or `tfrecord.ShardWriter`); rejected rows
  go to the piece's quarantine file; per-id access counts and the piece's report go under `_state/`, the report
  last (it is the done marker).
- `count_piece_keys`: the first pass of encodings "vocab" and "auto": key counts of the piece's training rows.
- `count_piece_split_values`: the first pass of a by-column split: the piece's distinct split column values.

A write that fails for lack of space or permission becomes a one-sentence ConvertError (`convert_plan.write_error`).

Nothing a piece writes depends on another piece, which is what makes the output the same for any worker count.
"""

import dataclasses
import glob
import json
import os
import zlib

import numpy as np

from tfcompress._files import write_atomically
from tfcompress.data import encoding as enc
from tfcompress.data import fixed_records, formats
from tfcompress.data.convert_plan import (
    ConvertError,
    ConvertOptions,
    assign_splits,
    atomic_savez,
    fixed_layout,
    gunzip_chunks,
    make_encoders,
    ordered_keys,
    piece_state_path,
    plain_chunks,
    save_split_values,
    split_names,
    vocab_keys,
    write_error,
)
from tfcompress.data.tfrecord import ShardWriter, serialize_rows

PARQUET_BATCH_ROWS = 65536
DENSE_COUNT_LIMIT = 1 << 20  # tables up to this size count ids in a dense array; larger ones sort distinct ids


# ---- reading pieces ------------------------------------------------------------------------------------------


class PieceReadError(Exception):
    """The input stopped being readable in the middle of a piece (truncated .gz, I/O error)."""

    def __init__(self, path, line, cause):
        super().__init__(f"{path}: {cause} (at line {line})")
        self.path, self.line, self.cause = path, line, cause


def _iter_text_blocks(piece, header):
    """Yields (first_line, bytes of complete lines) of a text piece, about BLOCK_BYTES at a time."""
    path, line = piece["path"], piece["first_line"]
    # A plain piece starts after the header already; a gzip piece is the whole file.
    skip_header = header and piece["kind"] == "gzip"
    carry = b""
    try:
        chunks = gunzip_chunks(path) if piece["kind"] == "gzip" else plain_chunks(path, piece["start"], piece["end"])
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


def _iter_parquet_batches(piece, layout, dense_options):
    """Parsed record batches of a Parquet piece."""
    import pyarrow.parquet as pq  # optional package (the `data` extra): only Parquet conversions need it

    row = 1
    try:
        parquet = pq.ParquetFile(piece["path"])
        for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, columns=layout.required_columns()):
            yield formats.parse_record_batch(batch, layout, row, dense_options)
            row += batch.num_rows
    except (OSError, EOFError) as error:
        raise PieceReadError(piece["path"], row, f"{type(error).__name__}: {error}") from None
    except Exception as error:  # ArrowInvalid for a damaged file
        if type(error).__module__.startswith("pyarrow"):
            raise PieceReadError(piece["path"], row, f"{type(error).__name__}: {error}") from None
        raise


def _iter_parsed(piece, context):
    """Parsed blocks of one piece (text or Parquet), dense values transformed as written (every pass rejects the
    same rows)."""
    layout, options = context.layout, context.options
    dense_options = formats.DenseOptions(options.clip_negative, options.dense_transform)
    if piece["kind"] == "parquet":
        yield from _iter_parquet_batches(piece, layout, dense_options)
        return
    column_map = context.column_maps.get(piece["path"])
    for first_line, block in _iter_text_blocks(piece, layout.header):
        yield formats.parse_text_block(block, layout, column_map, first_line, dense_options)


# ---- per-worker context --------------------------------------------------------------------------------------


@dataclasses.dataclass
class WorkerContext:
    """What every piece task needs; sent once to each worker process."""

    output: str
    layout: object
    options: ConvertOptions
    column_maps: dict  # file path -> ColumnMap (text formats)
    rules: dict  # file path -> split rule
    strict: bool
    progress: object = None  # multiprocessing.Value('q'): rows read so far, shared by all workers
    encoders: list = None  # set by load_encoders
    fixed: object = None  # FixedLayout when options.record_layout == "fixed" (set by load_encoders)

    def load_encoders(self):
        """One encoder per categorical column (built once per process; vocab loads vocabulary.npz), and `fixed`."""
        if self.encoders is None:
            self.encoders = make_encoders(self.layout, self.options, self.output)
            if self.options.record_layout == "fixed":
                self.fixed = fixed_layout(self.layout, self.encoders)
        return self.encoders

    def add_progress(self, rows):
        if self.progress is not None:
            with self.progress.get_lock():
                self.progress.value += rows


_CONTEXT = None


def init_worker(context):
    """Pool initializer (and, with one worker, the caller's own setup): the context the piece tasks use."""
    global _CONTEXT
    _CONTEXT = context


def _strict_error(piece, rejected):
    line, reason, raw = rejected
    text = raw[:200].decode("utf-8", errors="replace")
    return ConvertError(f"--strict: bad row in {piece['path']} line {line} ({reason}): {text!r}")


def _translating_write_errors(task, piece):
    """task(piece), a full disk / read-only output / missing permission turned into a one-sentence ConvertError."""
    try:
        return task(piece)
    except OSError as error:
        translated = write_error(error, _CONTEXT.output, f"the output of piece {piece['index']} (input {piece['path']})")
        if translated is None:
            raise
        raise translated from None


# ---- the vocab pass --------------------------------------------------------------------------------------------


def _count_piece_keys(piece):
    """Worker, vocab / auto first pass: key counts per categorical column over the piece's training rows.

    Encoding "auto" stops counting a column once it holds more than 2 * vocab_max_keys distinct keys (memory stays
    bounded) and marks it `too_many_<name>`; `save_vocabulary` then leaves it to the hash encoder.
    """
    context = _CONTEXT
    layout, options = context.layout, context.options
    counters = [enc.KeyCounter() for _ in layout.tables]  # single-valued columns, then multi-valued ones
    too_many = [False] * len(layout.tables)
    limit = options.vocab_max_keys if options.encoding == "auto" else None
    rule = context.rules[piece["path"]]
    rows = 0
    try:
        for parsed in _iter_parsed(piece, context):
            if context.strict and parsed.rejected:
                raise _strict_error(piece, parsed.rejected[0])
            train = assign_splits(rule, parsed.line, parsed.split_value) == "train"
            keys = vocab_keys(parsed.keys[train], layout, options)
            # A multi-valued column counts every token of the training rows (min_count is per token).
            columns = [keys[:, j] for j in range(len(layout.sparse))]
            columns += [tokens[np.repeat(train, lengths)] for tokens, lengths in parsed.multi]
            for j, counter in enumerate(counters):
                if too_many[j]:
                    continue
                counter.add(columns[j])
                if limit is not None and counter.pending_upper_bound > 2 * limit + 1:
                    if counter.result()[0].size > limit:
                        too_many[j], counters[j] = True, enc.KeyCounter()
            rows += parsed.n_read
            context.add_progress(parsed.n_read)
    except PieceReadError as error:
        return {"index": piece["index"], "error": str(error), "path": error.path, "line": error.line}
    arrays = {}
    for column, counter, over in zip(layout.tables, counters, too_many):
        arrays[f"keys_{column.name}"], arrays[f"counts_{column.name}"] = counter.result()
        if limit is not None:
            arrays[f"too_many_{column.name}"] = np.array(over or arrays[f"keys_{column.name}"].size > limit)
    atomic_savez(piece_state_path(context.output, piece["index"], ".vocab.npz"), arrays)
    return {"index": piece["index"], "rows_read": rows}


def count_piece_keys(piece):
    """Worker (pool task): `_count_piece_keys`, write errors translated."""
    return _translating_write_errors(_count_piece_keys, piece)


# ---- the by-column split pass ------------------------------------------------------------------------------------


def _count_piece_split_values(piece):
    """Worker, by-column split first pass: the piece's distinct split column values and their counts, over the rows
    that will be written, saved sorted (`convert_plan.save_split_values`)."""
    context = _CONTEXT
    counter = enc.KeyCounter()
    rows = 0
    try:
        for parsed in _iter_parsed(piece, context):
            if context.strict and parsed.rejected:
                raise _strict_error(piece, parsed.rejected[0])
            counter.add(ordered_keys(parsed.split_value))
            rows += parsed.n_read
            context.add_progress(parsed.n_read)
    except PieceReadError as error:
        return {"index": piece["index"], "error": str(error), "path": error.path, "line": error.line}
    save_split_values(context.output, piece["index"], *counter.result())
    return {"index": piece["index"], "rows_read": rows}


def count_piece_split_values(piece):
    """Worker (pool task): `_count_piece_split_values`, write errors translated."""
    return _translating_write_errors(_count_piece_split_values, piece)


# ---- converting a piece ----------------------------------------------------------------------------------------


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


class _PieceTally:
    """What a piece has converted so far: rows read, rows written per split, rejections by reason, id counts."""

    def __init__(self, splits, encoders):
        self.id_counts = {split: [_IdCounts(e.cardinality) for e in encoders] for split in splits}
        self.rejected_by_reason = dict.fromkeys(formats.REJECT_REASONS, 0)
        self.rows_per_split = dict.fromkeys(splits, 0)
        self.rows_read = 0


def _remove_piece_outputs(output, index, splits):
    """What an interrupted earlier run of the piece left: its shards and state files (not its vocab counts)."""
    for split in splits:
        for path in glob.glob(os.path.join(output, split, f"part-{index:05d}-*")):
            os.remove(path)
    for path in glob.glob(piece_state_path(output, index, ".*")):
        if not path.endswith((".vocab.npz", ".split-keys.npy", ".split-cumulative.npy")):  # first-pass results
            os.remove(path)


def _open_writers(context, index, splits):
    """One shard writer per split, naming its shards part-PPPPP-KKKKK."""
    options, output = context.options, context.output
    if context.fixed is not None:  # NumPy framing: no TensorFlow in the worker processes
        return {split: fixed_records.FixedShardWriter(os.path.join(output, split), context.fixed,
                                                      options.rows_per_shard, prefix=f"part-{index:05d}")
                for split in splits}
    return {split: ShardWriter(os.path.join(output, split), options.rows_per_shard, prefix=f"part-{index:05d}")
            for split in splits}


def _encode_ids(keys, encoders):
    ids = np.empty(keys.shape, dtype=np.int64)
    for j in range(keys.shape[1]):
        ids[:, j] = encoders[j].encode(keys[:, j])
    return ids


def _select_ragged(ids, lengths, rows):
    """(values, row lengths) of the rows `rows` (sorted indices) of a ragged column."""
    take = np.zeros(lengths.size, bool)
    take[rows] = True
    return ids[np.repeat(take, lengths)], lengths[rows]


def _write_rows(parsed, rule, encoders, writers, fixed, tally, layout):
    """Encode the good rows of a parsed block and write each to the shards of its split."""
    if parsed.n_good == 0:
        return
    dense = parsed.dense  # transformed by the parser (float32), overflowing rows rejected there
    n_sparse = len(layout.sparse)
    ids = _encode_ids(parsed.keys, encoders)
    # Multi-valued columns: the encoders after the single-valued ones encode their tokens.
    multi = [(encoder.encode(tokens), lengths)
             for encoder, (tokens, lengths) in zip(encoders[n_sparse:], parsed.multi)]
    assigned = assign_splits(rule, parsed.line, parsed.split_value)
    for split, writer in writers.items():
        rows = np.flatnonzero(assigned == split)
        if not rows.size:
            continue
        selected = [_select_ragged(values, lengths, rows) for values, lengths in multi]
        if fixed is not None:
            writer.write_rows(fixed_records.fixed_rows(fixed, parsed.label[rows], dense[rows], ids[rows]))
        else:
            ragged = {column.name: column_rows for column, column_rows in zip(layout.multi, selected)}
            writer.write(serialize_rows(parsed.label[rows], dense[rows], ids[rows], ragged=ragged))
        tally.rows_per_split[split] += int(rows.size)
        for j, table_counts in enumerate(tally.id_counts[split]):
            table_counts.add(ids[rows, j] if j < n_sparse else selected[j - n_sparse][0])


def _write_piece(piece, context, encoders, writers, tally):
    """Parse, encode and write all rows of the piece; rejected rows go to its quarantine file.

    Returns:
        None, or {"path", "line", "cause"} when the input broke off mid-way (the rows before it are written).
        The writers are closed (or aborted, when anything else goes wrong).
    """
    rule = context.rules[piece["path"]]
    quarantine_path = piece_state_path(context.output, piece["index"], ".quarantine.tsv")
    source = piece["path"].encode("utf-8", errors="surrogateescape")
    error = None
    try:
        with open(f"{quarantine_path}.tmp-{os.getpid()}", "wb") as quarantine:
            try:
                for parsed in _iter_parsed(piece, context):
                    if context.strict and parsed.rejected:
                        raise _strict_error(piece, parsed.rejected[0])
                    for line, reason, raw in parsed.rejected:
                        tally.rejected_by_reason[reason] += 1
                        quarantine.write(b"%s\t%d\t%s\t%s\n" % (source, line, reason.encode(), raw))
                    tally.rows_read += parsed.n_read
                    _write_rows(parsed, rule, encoders, writers, context.fixed, tally, context.layout)
                    context.add_progress(parsed.n_read)
            except PieceReadError as read_error:
                error = {"path": read_error.path, "line": read_error.line, "cause": read_error.cause}
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    os.replace(f"{quarantine_path}.tmp-{os.getpid()}", quarantine_path)
    return error


def _save_id_counts(output, index, layout, tally):
    """_state/piece-PPPPP.counts.npz: `<split>/ids_<name>` and `<split>/counts_<name>` of every split and table."""
    arrays = {}
    for split, split_counts in tally.id_counts.items():
        for column, table_counts in zip(layout.tables, split_counts):
            arrays[f"{split}/ids_{column.name}"], arrays[f"{split}/counts_{column.name}"] = table_counts.result()
    atomic_savez(piece_state_path(output, index, ".counts.npz"), arrays)


def _convert_piece(piece):
    """Worker: parse, encode, split and write one piece; returns its report (also saved as its done marker)."""
    context = _CONTEXT
    output, index = context.output, piece["index"]
    splits = split_names(context.options)
    _remove_piece_outputs(output, index, splits)
    encoders = context.load_encoders()
    tally = _PieceTally(splits, encoders)
    writers = _open_writers(context, index, splits)
    error = _write_piece(piece, context, encoders, writers, tally)
    _save_id_counts(output, index, context.layout, tally)
    report = {
        "index": index, "path": piece["path"], "rows_read": tally.rows_read,
        "rows_written": sum(tally.rows_per_split.values()), "rows_rejected": sum(tally.rejected_by_reason.values()),
        "rejected_by_reason": tally.rejected_by_reason, "rows_per_split": tally.rows_per_split,
        "shards": {split: [os.path.relpath(p, output) for p in writers[split].paths] for split in splits},
        "error": error,
    }
    # The json is the done marker: written last, and not at all when the input broke off (a rerun redoes it).
    name = ".json" if error is None else ".error.json"
    write_atomically(piece_state_path(output, index, name), json.dumps(report, sort_keys=True).encode())
    return report


def convert_piece(piece):
    """Worker (pool task): `_convert_piece`, write errors translated."""
    return _translating_write_errors(_convert_piece, piece)
