"""The `tfcompress` command line: one subcommand per stage of the data flow.

    tfcompress train --pipeline pipelines/synthetic_dlrm_robe.toml [--pipeline P2 ...] [--set section.key=value]
    tfcompress generate --dataset criteo --rows 1000000 --eval-rows 100000 --seed 0 --scale 1.0 --output DIR
    tfcompress plan --dataset criteo --dim 16 --method robe --ratio 1000
    tfcompress export --pipeline P --name NAME [--checkpoint C] [--quantize int8|fp16] [--onnx] [--verify]
                      [--chunk-reads auto|windows|elements|per_call] [--unique-ids] [--xla]
    tfcompress verify saved_models/NAME/VERSION [...]
    tfcompress data convert --format criteo-tsv --input day_* --output DIR [--workers N] [--split criteo-days]
    tfcompress learn-hash --pipeline P --target 0.1 [--teacher-dim 2] [--combiner sum|concat] [--output DIR]

Each subcommand is a pair of functions: `_add_<name>_arguments(parser)` and `_run_<name>(args) -> exit code`,
listed in COMMANDS. TensorFlow is imported inside the run functions so that `tfcompress --help` stays fast.
Bad input (a ValueError or a missing file) prints "error: ..." and exits with status 2, without a traceback.
"""

import argparse
import json
import os
import shlex
import sys

from tfcompress.reproduce import EXPERIMENTS
from tfcompress.reproduce.profiles import PROFILES

# TensorFlow's C++ INFO lines (oneDNN notices, tf.data buffer sizes) drown Keras' progress; warnings still show.
# Set before any subcommand imports TensorFlow; a user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


# ---------------------------------------------------------------------------------------------------- train
def _add_train_arguments(parser):
    parser.add_argument("--pipeline", action="append", required=True, metavar="TOML",
                        help="pipeline file; repeat to train several and compare them in one table")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE",
                        help="override a pipeline value before validation, e.g. train.epochs=2 (applies to every "
                             "pipeline; repeatable)")
    parser.add_argument("--runs-dir", default="runs", help="trained models go to RUNS_DIR/<pipeline name>/")
    parser.add_argument("--verbose", type=int, default=None, choices=(0, 1, 2),
                        help="Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch (default: 1 on a "
                             "terminal, 2 when the output goes to a file or pipe)")
    parser.add_argument("--strategy", choices=("default", "mirrored", "multiworker"),
                        help="tf.distribute strategy (overrides [train] strategy): mirrored = all local GPUs or the "
                             "--cpu-replicas logical CPUs, multiworker = MultiWorkerMirroredStrategy from TF_CONFIG; "
                             "[train] batch_size is per replica")
    parser.add_argument("--cpu-replicas", type=int, metavar="N",
                        help="split the CPU into N logical devices (for mirrored training without GPUs, e.g. tests)")


def _run_train(args):
    from tfcompress.pipeline import load_pipeline  # per command: --help stays light

    if args.cpu_replicas is not None:
        from tfcompress.train import configure_cpu_replicas  # per command: --help stays light

        configure_cpu_replicas(args.cpu_replicas)  # before anything initializes TensorFlow's devices
    overrides = list(args.overrides) + ([f"train.strategy={args.strategy}"] if args.strategy else [])
    # Validate every pipeline before training any: a typo in the second file should not cost the first run.
    pipelines = [load_pipeline(path, overrides) for path in args.pipeline]
    names = [p.name for p in pipelines]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"pipelines must have distinct names (they name runs/<name>/), got {duplicates} twice")

    from tfcompress.train import format_results_table, train  # per command: --help stays light

    # A progress bar redrawn per step floods logs that are not a terminal.
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)
    results = []
    for pipeline in pipelines:
        print(f"\n=== {pipeline.name} ({pipeline.source}) ===", flush=True)
        results.append(train(pipeline, runs_dir=args.runs_dir, verbose=verbose))
    print("\n" + format_results_table(results), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------- generate
def _add_generate_arguments(parser):
    parser.add_argument("--dataset", choices=("criteo", "avazu"), default="criteo")
    parser.add_argument("--rows", type=int, default=1_000_000, help="training rows")
    parser.add_argument("--eval-rows", type=int, default=100_000, help="evaluation rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="cardinality scale (multiplies table sizes)")
    parser.add_argument("--output", required=True, help="output directory (schema.json, stats.json, train/, eval/)")


def _run_generate(args):
    from tfcompress.data import synthetic  # per command: --help stays light

    stats = synthetic.generate(args.output, dataset=args.dataset, rows=args.rows, eval_rows=args.eval_rows,
                               seed=args.seed, cardinality_scale=args.scale)
    print(json.dumps(stats, indent=2, sort_keys=True, default=str))
    return 0


# ----------------------------------------------------------------------------------------------------- plan
def _add_plan_arguments(parser):
    tables = parser.add_mutually_exclusive_group(required=True)
    tables.add_argument("--dataset", choices=("criteo", "avazu"),
                        help="use the default table sizes of this dataset (Criteo Kaggle, Avazu)")
    tables.add_argument("--cardinalities", help="comma-separated table sizes, e.g. 1000,50,20000")
    parser.add_argument("--scale", type=float, default=1.0, help="with --dataset: cardinality scale")
    parser.add_argument("--dim", type=int, required=True, help="embedding width")
    parser.add_argument("--method", required=True, help="full, robe, hashing, qr, ...")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=float, help="compression ratio, e.g. 1000")
    target.add_argument("--budget", help="byte budget for all embeddings, e.g. 100MB")
    parser.add_argument("--uncompressed-below", type=int, default=0, metavar="N",
                        help="tables with fewer than N rows stay full tables")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option passed to the layer, e.g. chunk_size=4 (repeatable)")


def _parse_cardinalities(text):
    try:
        cards = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--cardinalities must be comma-separated integers, got {text!r}") from None
    if not cards:
        raise ValueError("--cardinalities must list at least one table size")
    return cards


def _parse_options(options):
    """["chunk_size=4", "signed=true"] -> {"chunk_size": 4, "signed": True} (values read as in --set)."""
    from tfcompress.pipeline import parse_override  # per command: --help stays light

    parsed = {}
    for option in options:
        if "=" not in option or not option.split("=", 1)[0].strip():
            raise ValueError(f"--option must look like key=value, got {option!r}")
        _, key, value = parse_override(f"option.{option}")
        parsed[key] = value
    return parsed


def _run_plan(args):
    from tfcompress.plan import make_plan  # per command: --help stays light

    if args.cardinalities is not None:
        cardinalities = _parse_cardinalities(args.cardinalities)
    else:
        from tfcompress.data import synthetic  # per command: --help stays light

        cardinalities = synthetic.scale_cardinalities(synthetic.dataset_columns(args.dataset)[2], args.scale)
    plan = make_plan(cardinalities, args.dim, args.method, ratio=args.ratio, budget=args.budget,
                     uncompressed_below=args.uncompressed_below, **_parse_options(args.option))
    print(plan.summary())
    return 0


# --------------------------------------------------------------------------------------------------- export
def _add_export_arguments(parser):
    parser.add_argument("--pipeline", metavar="TOML",
                        help="the trained pipeline: its model is RUNS_DIR/<pipeline name>/model.keras and its name "
                             "is the default --name")
    parser.add_argument("--checkpoint", metavar="MODEL.keras",
                        help="a saved Keras model (instead of --pipeline's): {dense, sparse} inputs, or any inputs "
                             "(string, several id, ragged, dense; docs/export_contract.md 'Models with other inputs')")
    parser.add_argument("--runs-dir", default="runs", help="where `tfcompress train` saved the models")
    parser.add_argument("--name", help="served model name (default: the pipeline's or the Keras model's name)")
    parser.add_argument("--base-dir", default="saved_models", help="TF Serving model base (holds models.config)")
    parser.add_argument("--version", type=int, help="version number (default: the next free one)")
    parser.add_argument("--quantize", choices=("int8", "fp16"), help="store embedding tables quantized")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (checked against the SavedModel)")
    parser.add_argument("--serving-out-of-range", choices=("mod", "as_trained"), default="mod",
                        help="ids outside a table at serving: fold with a floor modulo (default, never fails) or "
                             "keep each layer's training rule")
    parser.add_argument("--config-base-path",
                        help="base_path written to models.config (default: the absolute path of BASE_DIR/NAME)")
    parser.add_argument("--raw-signature", metavar="DATA_DIR",
                        help="also export the `raw` and `raw_features` signatures on raw string fields (Criteo hex, "
                             "Avazu strings), preprocessed in graph exactly as `tfcompress data convert` did for "
                             "DATA_DIR (the converted data directory the model was trained on)")
    # The serving layout of ROBE-Z lookups (docs/export_contract.md "Serving layout"); choices as in
    # tfcompress.lookup.CHUNK_READS, written out here so --help does not import TensorFlow.
    parser.add_argument("--chunk-reads", choices=("auto", "windows", "elements", "per_call"), default="auto",
                        help="ROBE-Z: read each chunk as one row of the window matrix saved with the export "
                             "(windows: fastest), element by element from the array, or from windows rebuilt on "
                             "every call (per_call: smallest export); auto (default): windows where the window "
                             "matrix is at most a tenth of the full tables' size, else per_call")
    parser.add_argument("--unique-ids", action="store_true",
                        help="ROBE-Z: hash and read each distinct id of a batch once (tf.unique)")
    parser.add_argument("--xla", action="store_true",
                        help="ROBE-Z: XLA-compile the lookups (jit_compile); TF Serving then needs "
                             "--xla_cpu_compilation_enabled=true")
    parser.add_argument("--verify", action="store_true",
                        help="then run `tfcompress verify` on the new version (fresh process)")


def _run_export(args):

    name, checkpoint = args.name, args.checkpoint
    if args.pipeline is not None:
        from tfcompress.pipeline import load_pipeline  # per command: --help stays light

        pipeline = load_pipeline(args.pipeline)
        name = name or pipeline.name
        checkpoint = checkpoint or os.path.join(args.runs_dir, pipeline.name, "model.keras")
    if checkpoint is None:
        raise ValueError("give --pipeline (a trained pipeline) or --checkpoint (a saved .keras model)")
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"no saved model at {checkpoint} (train the pipeline first: tfcompress train)")

    from tfcompress.export import export_saved_model, load_keras_model  # per command: --help stays light

    path = export_saved_model(load_keras_model(checkpoint), base_dir=args.base_dir, name=name,
                              version=args.version, quantize=args.quantize, onnx=args.onnx,
                              serving_out_of_range=args.serving_out_of_range,
                              config_base_path=args.config_base_path, raw_preprocessing=args.raw_signature,
                              chunk_reads=args.chunk_reads, unique_ids=args.unique_ids, jit_compile=args.xla)
    print(f"exported {path} (registered in {os.path.join(args.base_dir, 'models.config')})", flush=True)
    if args.verify:
        return _verify_paths([path])
    return 0


# --------------------------------------------------------------------------------------------------- verify
def _add_verify_arguments(parser):
    parser.add_argument("paths", nargs="+", metavar="SAVED_MODEL_DIR", help="e.g. saved_models/NAME/VERSION")
    parser.add_argument("--require-serving-api", action="store_true",
                        help="fail (not skip) the PredictRequest check when tensorflow-serving-api is missing")
    parser.add_argument("--require-onnx", action="store_true",
                        help="fail (not skip) the ONNX check when onnxruntime is missing")


def _verify_paths(paths, require_serving_api=False, require_onnx=False):
    from tfcompress.export.verify import verify  # per command: --help stays light

    result = verify(paths, require_serving_api=require_serving_api, require_onnx=require_onnx, echo=True)
    return 0 if result.ok else 1


def _run_verify(args):
    return _verify_paths(args.paths, args.require_serving_api, args.require_onnx)


# ----------------------------------------------------------------------------------------------------- data
_DATA_FORMATS = ("criteo-tsv", "criteo-csv", "avazu-csv", "csv", "parquet")  # tfcompress.data.formats.FORMATS


def _add_data_arguments(parser):
    from tfcompress.data.formats import SCHEMA_FILE_HELP  # no TensorFlow, no NumPy work: --help stays fast

    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", title="actions")
    actions.required = True
    convert = actions.add_parser(
        "convert", help="convert raw click logs (Criteo, Avazu, CSV, Parquet) into sharded TFRecords",
        description="Convert raw click logs into sharded TFRecords + schema.json + report.json (+ quarantine.tsv "
                    "of rejected lines, counts/ of per-id accesses). Rerunning into the same directory resumes.",
        epilog=SCHEMA_FILE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_argument("--format", required=True, choices=_DATA_FORMATS)
    convert.add_argument("--input", required=True, nargs="+", metavar="PATH",
                         help="input files, directories or glob patterns (.gz is read as gzip)")
    convert.add_argument("--output", required=True, help="output directory (one conversion at a time: locked)")
    convert.add_argument("--workers", type=int, default=1,
                         help="worker processes (same output for any number; --runner local)")
    convert.add_argument("--runner", choices=("local", "beam"), default="local",
                         help="local: a process pool on this machine; beam: an Apache Beam pipeline (pip install "
                              "'tfcompress[beam]'), the same output, on the runner --beam-option names")
    convert.add_argument("--beam-option", action="append", default=[], dest="beam_options", metavar="FLAG",
                         help="--runner beam: a Beam pipeline flag, written with '=' and repeatable, e.g. "
                              "--beam-option=--runner=DirectRunner (the default) or "
                              "--beam-option=--runner=DataflowRunner --beam-option=--project=P (README)")
    convert.add_argument("--schema", help="schema TOML: required for --format csv, optional for parquet (below)")
    convert.add_argument("--encoding", choices=("auto", "hex-mod", "vocab", "hash"),
                         help="categorical encoding (default: hex-mod for Criteo, hash for Avazu, the schema's "
                              "`encoding` (default auto) for csv/parquet with a schema)")
    convert.add_argument("--max-ind-range", type=int,
                         help="hex-mod: ids are hex value mod this (default 40000000); vocab: fold hex first")
    convert.add_argument("--min-count", type=int, default=1, help="vocab/auto: rarer values map to id 0")
    convert.add_argument("--hash-buckets", type=int, help="hash/auto: table size (default 4194304)")
    convert.add_argument("--vocab-max-keys", type=int,
                         help="auto: columns with at most this many distinct training keys get a vocabulary, larger "
                              "ones are hashed (default 1000000)")
    convert.add_argument("--dense-transform", choices=("log1p", "none"),
                         help="after negative -> 0 (default: log1p for Criteo, none otherwise); a value beyond "
                              "float32 rejects its row (dense_overflow)")
    convert.add_argument("--keep-negative", action="store_true", help="do not clip negative dense values to 0")
    convert.add_argument("--split", choices=("none", "random", "criteo-days", "criteo-days-halves", "by-column"),
                         default="none",
                         help="none: all rows in train/; random: --eval-fraction to eval/; criteo-days: file "
                              "day_<test-day> to eval/; criteo-days-halves: its first half to eval/, second to test/; "
                              "by-column: the rows with the largest --split-column values to eval/ (a time split: "
                              "k = floor(N * eval-fraction) of the N written rows are wanted; the threshold T is the "
                              "(N-k)-th smallest value, eval = value > T, so ties stay together in train; exact for "
                              "any --workers)")
    convert.add_argument("--split-column", metavar="COLUMN",
                         help="by-column split: a numeric column (e.g. timestamp; it need not be a feature)")
    convert.add_argument("--eval-fraction", type=float, default=0.1,
                         help="random and by-column splits: fraction in eval/")
    convert.add_argument("--seed", type=int, default=2020, help="random split seed (DLRM's Kaggle split: 2020)")
    convert.add_argument("--test-day", type=int, default=23, help="criteo-days splits: held-out day (MLPerf: 23)")
    convert.add_argument("--shard-size", default="256MiB",
                         help="plain text inputs are cut into pieces of about this size, e.g. 256MiB")
    convert.add_argument("--rows-per-shard", type=int, help="most rows in one output shard (default 2097152)")
    convert.add_argument("--record-layout", choices=("fixed", "canonical"), default=None,
                         help="fixed: equal-length records that `read` loads fast (default); canonical: protobuf's "
                              "shortest encoding (the default, and the only choice, for a schema with multi-valued "
                              "columns)")
    convert.add_argument("--max-reject-fraction", type=float, default=0.01, metavar="F",
                         help="exit with an error (status 2, naming the top rejection reasons) when more than this "
                              "share of the rows is rejected; the output is still written (default 0.01)")
    convert.add_argument("--strict", action="store_true", help="stop at the first bad row (error names file:line)")
    convert.add_argument("--overwrite", action="store_true", help="empty OUTPUT first instead of resuming")
    convert.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def _run_data(args):
    from tfcompress.data import convert as data_convert  # per command: --help stays light
    from tfcompress.sizes import parse_bytes  # per command: --help stays light

    options = {}
    if args.hash_buckets is not None:
        options["hash_buckets"] = args.hash_buckets
    if args.rows_per_shard is not None:
        options["rows_per_shard"] = args.rows_per_shard
    if args.vocab_max_keys is not None:
        options["vocab_max_keys"] = args.vocab_max_keys
    if args.beam_options and args.runner != "beam":
        raise SystemExit("--beam-option needs --runner beam")
    if args.runner == "beam":
        from tfcompress.data.convert_beam import convert_beam, import_beam  # per command: Beam is an optional extra

        try:
            import_beam()
        except ImportError as error:  # one line saying what to install, not a traceback
            print(f"error: {error}", file=sys.stderr)
            return 2
        if args.workers != 1:
            raise SystemExit("--workers is for --runner local; on Beam the runner's flags set the parallelism, e.g. "
                             "--beam-option=--max_num_workers=100 (Dataflow)")
        run, options = convert_beam, dict(options, beam_options=args.beam_options)
    else:
        run, options = data_convert.convert, dict(options, workers=args.workers)
    report = run(
        args.input, args.output, args.format, schema=args.schema, encoding=args.encoding,
        max_ind_range=args.max_ind_range, min_count=args.min_count, dense_transform=args.dense_transform,
        clip_negative=not args.keep_negative, split=args.split, eval_fraction=args.eval_fraction, seed=args.seed,
        test_day=args.test_day, shard_bytes=parse_bytes(args.shard_size), record_layout=args.record_layout,
        strict=args.strict, split_column=args.split_column, max_reject_fraction=args.max_reject_fraction,
        overwrite=args.overwrite, progress=not args.no_progress, **options)
    summary = {key: report[key] for key in ("rows_read", "rows_written", "rows_rejected", "rejected_by_reason",
                                            "rows_per_split", "pieces", "pieces_skipped")}
    print(json.dumps(summary, indent=2, sort_keys=True))
    if report.get("split"):
        split = report["split"]
        print(f"split by {split['column']}: eval = value > {split['threshold']!r} ({split['eval_rows']:,} rows; "
              f"{split['target_eval_rows']:,} wanted), train = value <= it ({split['train_rows']:,} rows)")
    print("tables (the sizes 'full' and compression ratios are measured against):")
    width = max([len(t["name"]) for t in report["tables"]], default=0)
    for table in report["tables"]:
        print(f"  {table['name']:<{width}}  {table['encoding']:<7} cardinality {table['cardinality']:>13,}  "
              f"train ids used {table['train_ids_used']:>13,}")
    print(f"wrote {args.output} (schema.json, report.json, quarantine.tsv, counts/)", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- learn-hash
def _add_learn_hash_arguments(parser):
    parser.add_argument("--pipeline", required=True, metavar="TOML", help="the pipeline to compress")
    parser.add_argument("--target", type=float, required=True,
                        help="rows kept per compressed table as a fraction of its ids, e.g. 0.1")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE",
                        help="override a pipeline value first (repeatable)")
    parser.add_argument("--output", help="output directory (default: runs/<pipeline name>_learned_hash)")
    parser.add_argument("--teacher-dim", type=int, default=2, help="teacher width = mappings per table (1-4)")
    parser.add_argument("--teacher-steps", type=int, help="teacher training batches (default: --teacher-epochs)")
    parser.add_argument("--teacher-epochs", type=int, default=1, help="teacher passes over the training data")
    parser.add_argument("--combiner", choices=("sum", "concat"), default="sum",
                        help="how the per-dimension internal tables are combined")
    parser.add_argument("--min-rows", type=int, default=100_000, help="smaller tables stay full tables")
    parser.add_argument("--private-fraction", type=float, default=0.0,
                        help="this fraction of each table's most frequent ids keep private rows")
    parser.add_argument("--max-cluster-size", type=int, help="most ids per cluster (default: no cap)")
    parser.add_argument("--unweighted", action="store_true", help="plain (not frequency-weighted) cluster means")
    parser.add_argument("--min-count", type=int, default=1,
                        help="ids accessed fewer times share one row instead of being clustered")


def _run_learn_hash(args):
    from tfcompress.learn_hash.workflow import learn_hash  # per command: --help stays light
    from tfcompress.pipeline import load_pipeline  # per command: --help stays light

    learn_hash(load_pipeline(args.pipeline, args.overrides), args.target, output_dir=args.output,
               teacher_dim=args.teacher_dim, combiner=args.combiner, min_rows=args.min_rows,
               private_fraction=args.private_fraction, max_cluster_size=args.max_cluster_size,
               weighted=not args.unweighted, min_count=args.min_count, teacher_steps=args.teacher_steps,
               teacher_epochs=args.teacher_epochs)
    return 0


# ----------------------------------------------------------------------------------------------------- tune
def _add_tune_arguments(parser):
    parser.add_argument("--pipeline", required=True, metavar="TOML", help="the pipeline whose compression to search")
    parser.add_argument("--max-trials", type=int, required=True, help="training runs to try")
    parser.add_argument("--budget", help="byte budget of the embedding tables, e.g. 100MB (over it scores 0)")
    parser.add_argument("--methods", help="comma-separated methods to search (default: robe,mlet,pruned,hashing,qr)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE",
                        help="override a pipeline value first (repeatable)")
    parser.add_argument("--output", help="output directory (default: runs/<pipeline name>_tune)")
    parser.add_argument("--seed", type=int, default=0, help="the tuner's seed")


def _run_tune(args):
    from tfcompress.pipeline import load_pipeline  # per command: --help stays light
    from tfcompress.tune import tune  # per command: --help stays light

    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    tune(load_pipeline(args.pipeline, args.overrides), args.max_trials, budget=args.budget,
         output_dir=args.output, methods=methods, seed=args.seed)
    return 0


# ------------------------------------------------------------------------------------------------ reproduce
def _add_reproduce_arguments(parser):
    parser.add_argument("--profile", default="full", choices=list(PROFILES),
                        help="full: <= 60 minutes on 2 CPU cores; tiny: a smoke test of every experiment")
    parser.add_argument("--seed", type=int, default=0, help="seeds the synthetic data and every training run")
    parser.add_argument("--data", metavar="DIR",
                        help="converted TFRecords (`tfcompress data convert` output) instead of synthetic data")
    parser.add_argument("--out", default="reproduce", help="output directory; rerunning resumes there")
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), metavar="EXPERIMENT",
                        help=f"run only these experiments ({', '.join(EXPERIMENTS)})")
    parser.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2), help="Keras training output")


def _run_reproduce(args):
    from tfcompress.reproduce.runner import run_reproduce  # per command: --help stays light

    # The report and every figure name the command that made them, as typed.
    command = " ".join(["tfcompress", *map(shlex.quote, args.argv)])
    run_reproduce(out_dir=args.out, profile=args.profile, seed=args.seed, data_dir=args.data, only=args.only,
                  command=command, verbose=args.verbose)
    return 0


# --------------------------------------------------------------------------------------------------- main
# (name, help, add_arguments, run). A new subcommand is one more pair of functions and one more line here.
COMMANDS = [
    ("train", "train pipelines and print a side-by-side table of their results", _add_train_arguments, _run_train),
    ("generate", "generate planted-signal synthetic Criteo/Avazu TFRecords", _add_generate_arguments, _run_generate),
    ("plan", "print a compression plan (logical vs physical sizes per table)", _add_plan_arguments, _run_plan),
    ("export", "export a trained model for TF Serving (SavedModel, models.config, optional ONNX)",
     _add_export_arguments, _run_export),
    ("verify", "check exported SavedModels in a fresh process without tfcompress (ops, parity, sizes)",
     _add_verify_arguments, _run_verify),
    ("data", "data tools: `data convert` turns raw click logs into TFRecords", _add_data_arguments, _run_data),
    ("learn-hash", "learned hashing: teacher, clustering, mappings and a pipeline that trains with them",
     _add_learn_hash_arguments, _run_learn_hash),
    ("tune", "KerasTuner search over compression method and ratio: trials.csv, pareto.csv, best.toml",
     _add_tune_arguments, _run_tune),
    ("reproduce", "rerun the seed papers' claims (compressed vs full) and write REPORT.md with PNG plots",
     _add_reproduce_arguments, _run_reproduce),
]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="tfcompress",
        description="Compressed embedding tables for TensorFlow/Keras recommendation models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    subparsers.required = True
    for name, help_text, add_arguments, run in COMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv=None):
    """Entry point of the `tfcompress` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
