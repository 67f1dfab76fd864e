"""Learned hashing: clustering time at 10M ids, and AUC against the hashing trick at equal size.

Two parts (run either or both):

- `--scale`: a synthetic 10M-id table (teacher values drawn around 64 latent groups, Zipf access counts with most
  ids unseen or rare, like a Criteo table) clustered to 10% of its rows, one teacher dimension (`cluster_1d`) and a
  full two-dimensional mapping (`build_table_mapping`), with wall times. The issue's bar: under 5 minutes on 2 cores.
- `--quality`: planted-signal synthetic Criteo whose ids fall in latent groups (`num_groups`, `within_group_noise`);
  for each training seed one teacher (width --teacher-dim) is trained, then for each target fraction t a DLRM with
  learned hashing (tables of >= --min-rows ids get t * n rows, smaller stay full) and one with the hashing trick at
  the same total size (`make_plan` method "hashing", same ratio and uncompressed_below) are trained with the same
  data, model, optimizer and seed. Exact eval AUC, mean and spread over seeds.

Run (the numbers in BENCHMARKS.md; each --quality seed takes about 3 minutes on 2 cores):

    python bench/bench_learned_hash.py --scale
    python bench/bench_learned_hash.py --quality --seeds 0 1 2 3 --targets 0.1 0.2 0.3 --min-count 3

The byte counts compare the float tables only: learned hashing also stores its id -> row mappings (K per table, in
the smallest unsigned dtype; 2 x uint16 = 4 bytes per id here), which the hashing trick does not need.

Output: markdown tables on stdout (and --json for the raw numbers).
"""

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", action="store_true", help="time the clustering of a 10M-id table")
    parser.add_argument("--ids", type=int, default=10_000_000, help="--scale: ids in the table")
    parser.add_argument("--quality", action="store_true", help="AUC of learned hashing vs the hashing trick")
    parser.add_argument("--rows", type=int, default=300_000, help="training rows of the synthetic data")
    parser.add_argument("--eval-rows", type=int, default=50_000, help="evaluation rows")
    parser.add_argument("--cardinality-scale", type=float, default=0.005,
                        help="multiplies the Criteo Kaggle table sizes (0.005: 169k ids in all)")
    parser.add_argument("--num-groups", type=int, default=64, help="latent groups per table of the planted model")
    parser.add_argument("--within-group-noise", type=float, default=0.5,
                        help="per-id spread around the group centroid (planted model)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.1, 0.2, 0.3],
                        help="rows kept per compressed table, as fractions of its ids")
    parser.add_argument("--min-rows", type=int, default=1000, help="smaller tables stay full tables")
    parser.add_argument("--teacher-dim", type=int, default=2)
    parser.add_argument("--combiner", default="sum", choices=("sum", "concat"))
    parser.add_argument("--private-fraction", type=float, default=0.0)
    parser.add_argument("--min-count", type=int, default=1, help="rarer ids share one row (not clustered)")
    parser.add_argument("--epochs", type=int, default=2, help="training passes of every model (teacher: 1)")
    parser.add_argument("--dim", type=int, default=16, help="embedding width")
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--work-dir", default=None, help="data and runs (default: a fresh temp dir)")
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if not (args.scale or args.quality):
        parser.error("give --scale, --quality or both")
    return args


def synthetic_table(n, seed=0, groups=64):
    """Teacher-like values (group centroid + small noise) and Zipf counts with most ids unseen, for n ids."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, groups, n)
    values = (rng.standard_normal(groups)[group] + 0.1 * rng.standard_normal(n)).astype(np.float32)
    ranks = np.floor(np.power(n + 1.0, rng.random(n))).astype(np.int64) - 1  # ~ Zipf(1) popularity per id
    counts = rng.poisson(3e7 / (ranks + 1.0) / np.log(n))  # ~30M accesses in all; a long tail of zeros
    return np.stack([values, values[rng.permutation(n)]], axis=1), counts


def run_scale(args):
    from tfcompress.learn_hash import build_table_mapping, cluster_1d

    started = time.perf_counter()
    teacher, counts = synthetic_table(args.ids)
    made = time.perf_counter() - started
    seen = counts > 0
    target = args.ids // 10
    started = time.perf_counter()
    result = cluster_1d(teacher[seen, 0], counts[seen], min(target, int(seen.sum())))
    one_dim = time.perf_counter() - started
    started = time.perf_counter()
    mapping = build_table_mapping(teacher, counts, target, combiner="sum")
    two_dim = time.perf_counter() - started
    rows = [
        ("cluster_1d, 1 teacher dim, seen ids", f"{int(seen.sum()):,}", f"{result.sizes.size:,}", result.rounds,
         f"{one_dim:.1f}"),
        ("build_table_mapping, 2 dims (sum)", f"{args.ids:,}", str(list(mapping.num_rows)), "-", f"{two_dim:.1f}"),
    ]
    print(f"\n{args.ids:,}-id table ({int(seen.sum()):,} seen, made in {made:.1f} s), target 10% of rows, "
          f"{os.cpu_count()} CPU(s):\n")
    print("| stage | ids clustered | clusters / rows | rounds | seconds |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    return {"ids": args.ids, "seen": int(seen.sum()), "cluster_1d_seconds": one_dim, "rounds": result.rounds,
            "mapping_2d_seconds": two_dim, "num_rows": list(mapping.num_rows)}


def _pipeline(args, data_dir, name, seed, compression):
    from tfcompress.pipeline import pipeline_from_dict

    raw = {
        "name": name,
        "data": {"source": "tfrecord", "train": os.path.join(data_dir, "train"),
                 "eval": os.path.join(data_dir, "eval"), "schema": data_dir},
        "model": {"arch": "dlrm", "embedding_dim": args.dim, "bottom_mlp": [32], "top_mlp": [64, 32]},
        "compression": compression,
        "train": {"optimizer": "sgd", "learning_rate": args.learning_rate, "batch_size": 1024,
                  "epochs": args.epochs, "seed": seed, "save_model": False},
    }
    return pipeline_from_dict(raw, source=f"<bench {name}>")


def run_quality(args, work_dir):
    from tfcompress.data import synthetic
    from tfcompress.learn_hash.teacher import id_counts, train_teacher
    from tfcompress.learn_hash.workflow import learn_hash
    from tfcompress.pipeline import load_pipeline
    from tfcompress.train import prepare_data, train

    data_dir = os.path.join(work_dir, "data")
    stats = synthetic.generate(data_dir, rows=args.rows, eval_rows=args.eval_rows, seed=args.data_seed,
                               cardinality_scale=args.cardinality_scale, num_groups=args.num_groups,
                               within_group_noise=args.within_group_noise)
    results = []
    for seed in args.seeds:
        base = _pipeline(args, data_dir, f"teacher_s{seed}", seed, {"method": "full"})
        data = prepare_data(base.data, base.source, verbose=0)
        counts = id_counts(data, base.data, verbose=0)
        started = time.perf_counter()
        teacher = train_teacher(base, data, teacher_dim=args.teacher_dim, epochs=1, verbose=0)
        teacher_seconds = time.perf_counter() - started
        for target in args.targets:
            summary = learn_hash(base, target, output_dir=os.path.join(work_dir, f"lh_s{seed}_t{target:g}"),
                                 combiner=args.combiner, min_rows=args.min_rows,
                                 private_fraction=args.private_fraction, min_count=args.min_count,
                                 teacher_tables=teacher, counts=counts,
                                 verbose=0)
            learned = load_pipeline(summary["pipeline_path"])
            hashing = _pipeline(args, data_dir, f"hashing_s{seed}_t{target:g}", seed,
                                {"method": "hashing", "ratio": learned.compression.ratio,
                                 "uncompressed_below": args.min_rows})
            for method, pipeline in (("learned_hash", learned), ("hashing", hashing)):
                result = train(pipeline, runs_dir=os.path.join(work_dir, "runs"), verbose=0)
                results.append(dict(seed=seed, target=target, method=method, auc=result["auc"],
                                    log_loss=result["log_loss"], physical_bytes=result["physical_bytes"],
                                    ratio=result["ratio"], teacher_seconds=teacher_seconds,
                                    cluster_seconds=summary["cluster_seconds"]))
                print(f"seed {seed} target {target:g} {method:>12}: AUC {result['auc']:.4f} "
                      f"({result['physical_bytes']:,} bytes)", flush=True)
    ceiling = stats["splits"]["eval"]["ceiling_auc"]
    print(f"\nplanted synthetic Criteo, {args.rows:,} train / {args.eval_rows:,} eval rows, cardinality scale "
          f"{args.cardinality_scale:g}, num_groups {args.num_groups}, within_group_noise {args.within_group_noise}"
          f"; DLRM d={args.dim}, SGD lr {args.learning_rate}, {args.epochs} epoch(s); teacher width "
          f"{args.teacher_dim} ({args.combiner}), min_count {args.min_count}, private fraction "
          f"{args.private_fraction:g}; tables >= {args.min_rows} ids compressed; seeds {args.seeds}; "
          f"ceiling AUC {ceiling:.4f}\n")
    print("| rows kept | learned hash AUC (mean ± sd) | hashing trick AUC (mean ± sd) | difference |")
    print("|---|---|---|---|")
    for target in args.targets:
        cells = []
        means = []
        for method in ("learned_hash", "hashing"):
            aucs = np.array([r["auc"] for r in results if r["target"] == target and r["method"] == method])
            means.append(aucs.mean())
            cells.append(f"{aucs.mean():.4f} ± {aucs.std():.4f}")
        print(f"| {target:.0%} | {cells[0]} | {cells[1]} | {means[0] - means[1]:+.4f} |")
    return {"results": results, "ceiling_auc": ceiling}


def main(argv=None):
    args = parse_args(argv)
    print("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv or sys.argv[1:])))
    out = {"args": vars(args)}
    if args.scale:
        out["scale"] = run_scale(args)
    if args.quality:
        work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench_learned_hash_")
        out["quality"] = run_quality(args, work_dir)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
