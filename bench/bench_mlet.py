"""MLET vs a plain embedding of the same width on planted-signal synthetic Criteo, and the folded models' AUC.

For each embedding width d: one DLRM with full d-wide tables (the baseline), and one MLET DLRM per inner width
k = m * d (m in --multipliers) trained with the same data, model, optimizer and seeds. Each MLET model is then folded
(`tfcompress.fold`: W = E . P per table) and evaluated again: the folded model is what would be deployed, and
its AUC must equal the trained one. Every configuration runs once per training seed (same data); the table shows
the mean and standard deviation of the exact eval AUC over seeds.

Run (the numbers in BENCHMARKS.md):

    python bench/bench_mlet.py --rows 200000 --eval-rows 50000 --seeds 0 1 2

Output: a markdown table on stdout (and --json for the raw numbers).
"""

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Shared with `tfcompress reproduce` (its MLET grid), so both configure and fold MLET the same way.
from tfcompress.reproduce.mlet_grid import compression_for, folded_metrics  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="training rows of the synthetic data")
    parser.add_argument("--eval-rows", type=int, default=50_000, help="evaluation rows")
    parser.add_argument("--cardinality-scale", type=float, default=0.01,
                        help="multiplies the Criteo Kaggle table sizes (0.01: 338k ids in all)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data (one dataset for all)")
    parser.add_argument("--data-dir", default=None, help="where the synthetic data is generated (default: a name "
                        "under the system temp dir that spells out the options; reused when present)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--dims", type=int, nargs="+", default=[4, 8, 16], help="embedding widths d")
    parser.add_argument("--multipliers", type=int, nargs="+", default=[1, 2, 4, 8], help="k = multiplier * d")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adagrad", "adam"])
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--bottom-mlp", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--top-mlp", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--json", default=None, help="also write every run's numbers to this file")
    return parser.parse_args(argv)


def pipeline_for(args, d, inner_dim, seed, data_dir):
    """The pipeline of one run: full d-wide tables (inner_dim None) or MLET with k = inner_dim."""
    from tfcompress.pipeline import pipeline_from_dict

    compression = compression_for(inner_dim)
    name = f"d{d}_full_seed{seed}" if inner_dim is None else f"d{d}_mlet_k{inner_dim}_seed{seed}"
    raw = {
        "name": name,
        "data": {"source": "synthetic", "dataset": "criteo", "rows": args.rows, "eval_rows": args.eval_rows,
                 "seed": args.data_seed, "cardinality_scale": args.cardinality_scale, "path": data_dir},
        "model": {"arch": "dlrm", "embedding_dim": d, "bottom_mlp": args.bottom_mlp, "top_mlp": args.top_mlp},
        "compression": compression,
        "train": {"optimizer": args.optimizer, "learning_rate": args.learning_rate, "batch_size": args.batch_size,
                  "epochs": args.epochs, "seed": seed, "save_model": inner_dim is not None},
    }
    return pipeline_from_dict(raw, source="bench_mlet")


def run_grid(args):
    from tfcompress.data import read
    from tfcompress.plan import make_plan
    from tfcompress.train import prepare_data, train

    data_dir = args.data_dir or os.path.join(
        tempfile.gettempdir(),
        f"tfcompress_bench_mlet_rows{args.rows}_eval{args.eval_rows}_seed{args.data_seed}"
        f"_scale{args.cardinality_scale:g}")
    runs_dir = tempfile.mkdtemp(prefix="bench_mlet_runs_")
    first = pipeline_for(args, args.dims[0], None, args.seeds[0], data_dir)
    data = prepare_data(first.data, first.source, verbose=1)
    eval_dataset = read(data.eval_files, 16384, schema=data.schema, shuffle=False, repeat=False, deterministic=True)
    runs = []
    try:
        for d in args.dims:
            for inner_dim in [None] + [m * d for m in args.multipliers]:
                plan = make_plan(data.schema.cardinalities, d, **compression_for(inner_dim))
                for seed in args.seeds:
                    pipeline = pipeline_for(args, d, inner_dim, seed, data_dir)
                    started = time.perf_counter()
                    run = {"d": d, "k": inner_dim, "seed": seed, "training_parameters": plan.physical_parameters,
                           "deployed_parameters": plan.deployed_parameters}
                    try:
                        result = train(pipeline, runs_dir=runs_dir, verbose=0)
                    except ValueError as error:
                        if "must be finite" not in str(error):
                            raise
                        # Training diverged (NaN predictions): a result of this learning rate, kept in the table.
                        result = {"auc": float("nan"), "log_loss": float("nan"), "ceiling_auc": data.ceiling_auc}
                        diverged = True
                    else:
                        diverged = False
                    run.update(auc=result["auc"], log_loss=result["log_loss"], ceiling_auc=result["ceiling_auc"])
                    if diverged:
                        run.update(folded_auc=float("nan"), folded_log_loss=float("nan"),
                                   fold_max_abs_diff=float("nan"))
                    elif inner_dim is not None:
                        run["folded_auc"], run["folded_log_loss"], run["fold_max_abs_diff"] = folded_metrics(
                            result["model_path"], eval_dataset)
                    run["seconds"] = time.perf_counter() - started
                    shutil.rmtree(os.path.join(runs_dir, pipeline.name), ignore_errors=True)
                    runs.append(run)
                    print(json.dumps(run), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    return runs, data


def format_table(runs):
    """One row per (d, k): mean ± sd of AUC over seeds, folded AUC, and the gain over full tables of the same d."""
    groups = {}
    for run in runs:
        groups.setdefault((run["d"], run["k"]), []).append(run)
    lines = ["| d | k | model | training params | deployed params | AUC (mean ± sd) | folded AUC | "
             "Δ AUC vs full d | max abs Δ prediction after fold |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (d, k), group in groups.items():
        aucs = np.array([r["auc"] for r in group])
        baseline = np.mean([r["auc"] for r in groups.get((d, None), [])]) if (d, None) in groups else float("nan")
        folded = "-" if k is None else f"{np.mean([r['folded_auc'] for r in group]):.4f}"
        diff = "-" if k is None else f"{max(r['fold_max_abs_diff'] for r in group):.1e}"
        delta = "-" if k is None else f"{aucs.mean() - baseline:+.4f}"
        lines.append(f"| {d} | {'-' if k is None else k} | {'full' if k is None else f'MLET k={k // d}d'} | "
                     f"{group[0]['training_parameters']:,} | {group[0]['deployed_parameters']:,} | "
                     f"{aucs.mean():.4f} ± {aucs.std(ddof=1) if len(aucs) > 1 else 0:.4f} | {folded} | {delta} | "
                     f"{diff} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import tensorflow as tf

    # Each run builds new models, so Keras' predict function is traced per model; its retracing warning is noise.
    tf.get_logger().setLevel("ERROR")
    started = time.perf_counter()
    runs, data = run_grid(args)
    command = "python bench/bench_mlet.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"\nMLET vs full tables, DLRM on synthetic Criteo ({args.rows:,} train / {args.eval_rows:,} eval rows, "
          f"cardinality scale {args.cardinality_scale:g}: {sum(data.schema.cardinalities):,} ids), "
          f"{args.optimizer} lr {args.learning_rate}, batch {args.batch_size}, {args.epochs} epoch(s), "
          f"seeds {args.seeds}; planted-model ceiling AUC {data.ceiling_auc:.4f}\n")
    print(format_table(runs))
    if any(np.isnan(run["auc"]) for run in runs):
        print("\nnan: training diverged (NaN predictions) for at least one seed")
    print(f"\ncommand: {command}\nwall time: {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
