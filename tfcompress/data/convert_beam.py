"""The conversion as an Apache Beam pipeline (`tfcompress data convert --runner beam`): the same output as
`tfcompress.data.convert`, on any Beam runner (DirectRunner, Dataflow, Flink, Spark).

    from tfcompress.data.convert_beam import convert_beam
    report = convert_beam(["day_0.gz", "day_1.gz"], "/shared/criteo_tb", "criteo-tsv", split="criteo-days",
                          test_day=1, beam_options=["--runner=DirectRunner"])

Why the output is the local converter's, byte for byte: the pipeline runs the local converter's own code for
planning and for each piece. The inputs are cut into the same pieces (plain text into line-aligned byte ranges whose
lines are counted, a .gz or Parquet file whole) with the same split rules, then:

    input files ─ Reshuffle ─ scan each file ─ ToList ─ number the pieces, save _state/plan.json (rules: side input)
    pieces ─ Reshuffle ─┬─ train key counts of each piece ─ CombinePerKey((column, key bucket), merge counts)
                        │    ─┬─ distinct keys per column (CombinePerKey(sum))
                        │     └─ count >= min_count ─ GroupByKey(column) ─ ToList ─ write vocabulary.npz (one file)
                        └─ Map(convert one piece; vocabulary.npz as a side input) ─ the piece's report

(the vocabulary branch only for encodings "vocab" and "auto"). Converting a piece is `convert_worker.convert_piece`:
parse, encode, assign splits, write the piece's shards `<split>/part-PPPPP-KKKKK.tfrecord` in the project's record
layout (fixed-width or canonical; docs/tfrecord_layout.md), its quarantine lines, id counts and report under
`_state/`. The sink is sharded by piece: a piece's shards are written under temporary names and renamed when
complete, and a retried piece first removes what an earlier attempt left, so a runner's retry of a failed bundle
gives the same bytes. The scan runs one task per input file on the runner's workers (it reads plain-text inputs once
to count lines; .gz inputs only for criteo-days-halves' held-out day). After the pipeline, the launching process
merges the pieces' results into report.json, counts/, quarantine.tsv and schema.json with the local converter's code.

The vocabulary is the local converter's: per column, the training keys (hex keys folded by max_ind_range) counted
over all pieces, those seen at least min_count times, most frequent first (ties: smaller key first); encoding "auto"
hashes a column with more than vocab_max_keys distinct training keys.

What the runner's workers need: tfcompress installed (e.g. `--extra_package dist/tfcompress-*.whl` or a container
image), and the inputs and the output directory at the same path on every worker and on the launching machine,
opened with ordinary file calls (a shared file system: NFS, Filestore, a GCS FUSE mount); gs:// URLs are not read.

Faults: a piece whose input breaks off (a truncated .gz) is reported as with the local converter (every other piece
converted, report.json written, a ConvertError naming the file and the rows kept). Any other failure of a piece is
raised as a ConvertError naming the piece and its input; the runner retries the bundle first where it does
(Dataflow: 4 times). A rerun of the same command resumes: finished pieces (their `_state/piece-PPPPP.json`) and a
finished vocabulary are skipped. A worker process that dies is the runner's to handle: Dataflow, Flink and Spark
restart its work elsewhere; Beam 2.77's DirectRunner in multi_processing mode does not notice and waits forever
(seen with a step that SIGKILLs its worker: no error after 180 s), so use it for tests, stop a hung run and rerun:
it resumes.

Not on Beam (refused with a ConvertError naming the option): split "by-column" (its threshold needs a pass
over all pieces before any shard is written; use the local converter) and multi-valued columns.
"""

import json
import os
import sys
import time

import numpy as np

from tfcompress._files import write_atomically
from tfcompress.data import convert as local
from tfcompress.data import encoding as enc
from tfcompress.data import formats
from tfcompress.data.convert_plan import (
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
    assign_splits,
    atomic_savez,
    expand_inputs,
    number_pieces,
    piece_done,
    plan_record,
    prepare_output,
    read_column_maps,
    save_plan,
    scan_file_at,
    scan_tasks,
    vocab_keys,
    write_error,
)
from tfcompress.data.convert_worker import (
    PieceReadError,
    WorkerContext,
    _iter_parsed,
    _strict_error,
    convert_piece,
    init_worker,
)

__all__ = ["BEAM_INSTALL_HINT", "convert_beam"]

# The vocabulary pass's CombinePerKey keys: (column, one of KEY_BUCKETS hash buckets of its keys), so a column's
# keys are merged on up to KEY_BUCKETS workers, each holding 1/KEY_BUCKETS of them.
KEY_BUCKETS = 64
BEAM_INSTALL_HINT = ("--runner beam needs Apache Beam: pip install 'tfcompress[beam]' (apache-beam 2.77 with "
                     "protobuf >=6.31.1,<7, a range TensorFlow 2.21 accepts too)")


def import_beam():
    """apache_beam, or an ImportError that says how to install it."""
    try:
        import apache_beam as beam  # optional package (the `beam` extra): only --runner beam needs it
    except ImportError as error:
        raise ImportError(f"{BEAM_INSTALL_HINT} ({error})") from None
    return beam


def _describe(piece):
    return local.describe_task(piece)


# ---- pipeline steps (module level: every runner pickles them by reference) -----------------------------------


def piece_train_key_counts(piece, rules, context, buckets):
    """The vocabulary pass of one piece: ((column position, key bucket), (keys uint64 sorted, counts int64)) over
    its training rows, the keys of a column spread over `buckets` buckets by a hash (each a CombinePerKey key).

    Arrays rather than one element per key: a Beam element costs microseconds, and a piece holds millions of
    distinct keys.
    """
    layout, options = context.layout, context.options
    counters = [enc.KeyCounter() for _ in layout.sparse]
    rule = rules[piece["path"]]
    try:
        for parsed in _iter_parsed(piece, context):
            if context.strict and parsed.rejected:
                raise _strict_error(piece, parsed.rejected[0])
            train = assign_splits(rule, parsed.line, parsed.split_value) == "train"
            keys = vocab_keys(parsed.keys[train], layout, options)
            for j, counter in enumerate(counters):
                counter.add(keys[:, j])
    except PieceReadError as error:
        # As the local vocabulary pass: no shards are written from a vocabulary that misses rows.
        raise ConvertError(f"the vocabulary pass could not read {_describe(piece)}: {error}; no shards were "
                           "written, fix the inputs and rerun") from None
    for j, counter in enumerate(counters):
        keys, counts = counter.result()
        bucket = enc.splitmix64(keys) % np.uint64(buckets)
        for b in np.unique(bucket).tolist():
            chosen = bucket == b
            yield (j, b), (keys[chosen], counts[chosen])


def number_scanned_pieces(scanned, files, options, tasks, output, plan):
    """The plan step: every input's `scan_file_at` result -> (pieces, split rules), saved in _state/plan.json
    exactly as the local converter plans (`convert._plan_pieces`)."""
    pieces_per_task = [pieces for _, pieces in sorted(scanned, key=lambda item: item[0])]
    pieces, rules = number_pieces(files, options, tasks, pieces_per_task)
    save_plan(output, plan, pieces, rules)
    return pieces, rules


def merge_key_counts(parts):
    """The CombinePerKey function: (keys, counts) arrays -> the summed counts of their distinct keys (associative
    and commutative, as Beam requires; keys sorted)."""
    counter = enc.KeyCounter()
    for keys, counts in parts:
        counter.add(keys, counts)
    return counter.result()


def at_least(item, min_count):
    """((column, bucket), (keys, counts)) -> (column, (the keys seen at least min_count times, their counts))."""
    (j, _), (keys, counts) = item
    keep = counts >= min_count
    return j, (keys[keep], counts[keep])


def write_vocabulary(columns, distinct, output, layout, options):
    """vocabulary.npz from the combined counts, as `convert_plan.save_vocabulary` builds it from the pieces' files.

    Args:
        columns: [(column position, [(keys, counts), ...])]: the keys seen at least min_count times, in buckets
            (encoding "auto": only columns with at most vocab_max_keys distinct keys).
        distinct: {column position: distinct training keys, before min_count}.

    Returns:
        the path written (a side input of the conversion step, so no piece is converted before it exists).
    """
    by_column = dict(columns)
    arrays = {}
    for j, column in enumerate(layout.sparse):
        if options.encoding == "auto" and distinct.get(j, 0) > options.vocab_max_keys:
            continue  # hashed: `make_encoders` hashes a column without keys_<name>
        parts = by_column.get(j, [])
        keys = np.concatenate([np.empty(0, np.uint64)] + [keys for keys, _ in parts])
        counts = np.concatenate([np.empty(0, np.int64)] + [counts for _, counts in parts])
        arrays[f"keys_{column.name}"] = enc.VocabularyEncoder.from_counts(keys, counts, options.min_count).keys
    path = os.path.join(output, VOCABULARY_FILENAME)
    atomic_savez(path, arrays)
    return path


class ConvertPieceFn:
    """The conversion step: `convert_worker.convert_piece` of each piece, failures named by piece.

    A callable for beam.Map (this module imports without Beam installed); `rules` is the plan's side input.
    """

    def __init__(self, context):
        self.context = context

    def __call__(self, piece, rules, vocabulary_path=None):
        del vocabulary_path  # only an ordering: the vocabulary is written before any piece is converted
        if self.context.rules is None:
            self.context.rules = rules  # the plan step's split rules (once per worker: the encoders stay cached)
        init_worker(self.context)
        try:
            return convert_piece(piece)
        except ConvertError:
            raise
        except Exception as error:
            raise ConvertError(f"converting {_describe(piece)} failed: {type(error).__name__}: {error}") from error


def _build_pipeline(beam, pipeline, plan, context, need_vocabulary):
    """The pipeline's steps (see the module docstring); returns the PCollection of the pieces' reports.

    Args:
        plan: ("resume", pieces to do, rules) from an earlier run's plan.json, or ("scan", scan tasks, files,
            plan record): the inputs are scanned by the runner's workers, one task per input file.
    """
    options = context.options
    if plan[0] == "resume":
        planned = pipeline | "plan" >> beam.Create([(plan[1], plan[2])])
    else:
        _, tasks, files, record = plan
        planned = (pipeline
                   | "inputs" >> beam.Create(list(enumerate(tasks)))
                   | "spread inputs" >> beam.Reshuffle()
                   | "scan inputs" >> beam.Map(scan_file_at)
                   | "all scans" >> beam.combiners.ToList()
                   | "number pieces" >> beam.Map(number_scanned_pieces, files, options, tasks, context.output,
                                                 record))
    rules = beam.pvalue.AsSingleton(planned | "rules" >> beam.Map(lambda item: item[1]))
    pieces = (planned
              | "pieces" >> beam.FlatMap(lambda item: item[0])
              | "spread pieces" >> beam.Reshuffle())
    side = {}
    if need_vocabulary:
        counts = (pieces
                  | "train key counts" >> beam.FlatMap(piece_train_key_counts, rules, context, KEY_BUCKETS)
                  | "sum key counts" >> beam.CombinePerKey(merge_key_counts))
        distinct = (counts
                    | "distinct keys" >> beam.MapTuple(lambda key, merged: (key[0], int(merged[0].size)))
                    | "distinct keys per column" >> beam.CombinePerKey(sum))
        kept = counts | "min count" >> beam.Map(at_least, options.min_count)
        if options.encoding == "auto":
            kept = kept | "vocab max keys" >> beam.Filter(
                lambda item, n, limit: n.get(item[0], 0) <= limit, beam.pvalue.AsDict(distinct),
                options.vocab_max_keys)
        vocabulary = (kept
                      | "group by column" >> beam.GroupByKey()
                      | "as lists" >> beam.MapTuple(lambda j, parts: (j, list(parts)))
                      | "all columns" >> beam.combiners.ToList()
                      | "write vocabulary" >> beam.Map(write_vocabulary, beam.pvalue.AsDict(distinct),
                                                       context.output, context.layout, options))
        side["vocabulary_path"] = beam.pvalue.AsSingleton(vocabulary)
    return pieces | "convert pieces" >> beam.Map(ConvertPieceFn(context), rules, **side)


# ---- the run -------------------------------------------------------------------------------------------------


def _check_supported(layout, split):
    """Refuse what the pipeline does not do, before any option is resolved (their errors would be about other
    things)."""
    if split == "by-column":
        raise ConvertError("--runner beam does not do split 'by-column' (its threshold needs a pass over every "
                           "piece before any shard is written); convert with the local runner (--workers N)")
    multi = list(getattr(layout, "multi", ()) or ())
    if multi:
        names = [column.name for column in multi]
        raise ConvertError(f"--runner beam does not convert multi-valued columns yet ({names}); convert with the "
                           "local runner (--workers N)")


def convert_beam(inputs, output, format, *, beam_options=(), encoding=None, max_ind_range=None,
                 min_count=1, hash_buckets=DEFAULT_HASH_BUCKETS, dense_transform=None, clip_negative=True,
                 split="none", eval_fraction=0.1, seed=2020, test_day=23, shard_bytes=DEFAULT_SHARD_BYTES,
                 rows_per_shard=DEFAULT_ROWS_PER_SHARD, schema=None, record_layout="fixed", strict=False,
                 overwrite=False, progress=False, vocab_max_keys=DEFAULT_VOCAB_MAX_KEYS,
                 max_reject_fraction=None, split_column=None):
    """`tfcompress.data.convert.convert` as an Apache Beam pipeline (module docstring); the same output.

    Args:
        beam_options: Beam pipeline flags, e.g. ["--runner=DirectRunner"] (the default runner) or
            ["--runner=DataflowRunner", "--project=P", "--region=R", "--temp_location=gs://B/tmp"].
        The others: as `convert` (split "by-column", with split_column, is refused).

    Returns:
        the report dict (report.json), with "runner": "beam" and the pipeline's flags.

    Raises:
        ImportError: Apache Beam is not installed (the message says how).
        ConvertError / ValueError / FileNotFoundError: as `convert`; a piece that failed (named with its input).
    """
    started = time.perf_counter()
    beam = import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions  # the optional `beam` extra, as import_beam

    if max_reject_fraction is not None and not (isinstance(max_reject_fraction, (int, float))
                                                and 0 <= max_reject_fraction <= 1):
        raise ValueError(f"max_reject_fraction must be a number in [0, 1] (or None), got {max_reject_fraction!r}")
    beam_options = [str(flag) for flag in beam_options]
    layout = formats.layout_for_format(format, schema)
    _check_supported(layout, split)
    options = ConvertOptions(
        format=format, encoding=encoding, max_ind_range=max_ind_range, min_count=min_count,
        hash_buckets=hash_buckets, dense_transform=dense_transform, clip_negative=bool(clip_negative), split=split,
        eval_fraction=eval_fraction, seed=seed, test_day=test_day, shard_bytes=shard_bytes,
        rows_per_shard=rows_per_shard, schema_path=schema, record_layout=record_layout, split_column=split_column,
        vocab_max_keys=vocab_max_keys,
    ).resolved(layout)
    output = os.path.abspath(os.fspath(output))
    files = expand_inputs(inputs)
    parquet_note = local._tensorflow_io_note(format, progress)
    column_maps = read_column_maps(files, layout, format)
    warnings = []
    try:
        with OutputLock(output) as lock:
            warnings += local._warn(lock.warnings)
            record = plan_record(options, files)
            previous, resuming = prepare_output(output, record, overwrite)
            context = WorkerContext(output, layout, options, column_maps, None, strict)
            need_vocabulary = (options.encoding in ("vocab", "auto")
                               and not os.path.isfile(os.path.join(output, VOCABULARY_FILENAME)))
            if resuming:
                todo = [piece for piece in previous["pieces"] if not piece_done(output, piece["index"])]
                plan = ("resume", todo, previous["rules"])
                what = f"{len(todo)} of {len(previous['pieces'])} pieces to convert (resuming)"
            else:
                plan = ("scan", scan_tasks(files, layout, options, column_maps), files, record)
                what = f"{len(files)} inputs to scan and convert"
            if progress:
                print(f"beam: {what}{', vocabulary pass first' if need_vocabulary else ''} "
                      f"({' '.join(beam_options) or 'DirectRunner'})", file=sys.stderr, flush=True)
            if not resuming or todo or need_vocabulary:
                _run_pipeline(beam, PipelineOptions(beam_options), plan, context, need_vocabulary)
            with open(os.path.join(output, STATE_DIR, PLAN_FILENAME)) as f:
                saved = json.load(f)
            pieces, context.rules = saved["pieces"], saved["rules"]
            skipped = len(pieces) - len(todo) if resuming else 0
            errors = [r for r in local._load_piece_reports(output, pieces) if r.get("error")]
            report = local._finish(output, files, pieces, context, errors, skipped, started, parquet_note, None,
                                   warnings)
            report.update(runner="beam", beam_options=beam_options)
            write_atomically(os.path.join(output, local.REPORT_FILENAME),
                             (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    except OSError as error:
        translated = write_error(error, output)
        if translated is None:
            raise
        raise translated from None
    if report["errors"]:
        raise ConvertError(local._error_message(report))
    if max_reject_fraction is not None and report["rows_rejected"] > max_reject_fraction * report["rows_read"]:
        raise ConvertError(local._reject_message(report, layout, column_maps, output, max_reject_fraction))
    return report


def _run_pipeline(beam, pipeline_options, plan, context, need_vocabulary):
    """Build and run the pipeline to the end; a failure is a ConvertError with the runner's message."""
    try:
        with beam.Pipeline(options=pipeline_options) as pipeline:
            _build_pipeline(beam, pipeline, plan, context, need_vocabulary)
    except Exception as error:
        # Runners wrap a step's exception (with the ConvertError text that names the piece) in their own.
        cause = error
        while cause is not None and not isinstance(cause, ConvertError):
            cause = cause.__cause__ or cause.__context__
        message = str(cause) if cause is not None else f"{type(error).__name__}: {error}"
        raise ConvertError(f"the Beam pipeline failed: {message}; finished pieces are kept: fix the cause and rerun "
                           "the same command to resume") from error
