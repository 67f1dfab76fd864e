"""Learned hashing against the hashing trick at 10%, 20% and 30% of the rows, plus full tables.

Learned hashing (`tfcompress.learn_hash`): a narrow teacher (full tables of width `teacher_dim`) trains for one
pass; its per-id values and the ids' access counts cluster every table with >= `min_rows` ids into
round(target * n) rows (ids seen fewer than `min_count` times share one row: 3 measured better than the default 1
in bench/bench_learned_hash.py); the compressed model then trains with those id -> row mappings. The hashing trick
(method "hashing") gets the same ratio with the same `uncompressed_below`, so both keep the same float bytes, and
both train with the profile's model and the same seed(s), and (like the teacher) with SGD at lr 0.5, the setting
bench/bench_learned_hash.py measured. One teacher serves every target and training seed.

Files: the teacher's values and counts (`<out>/learned_hash/teacher.npz`) and each target's mappings and pipeline
(`<out>/learned_hash/target_<t>/`, what `tfcompress learn-hash` writes) are kept, so a rerun skips them; the
trained models are `context.train` runs (cached like every other experiment's).
"""

import json
import os
import statistics
import tomllib

import numpy as np

from tfcompress.learn_hash.teacher import id_counts, train_teacher
from tfcompress.learn_hash.workflow import learn_hash
from tfcompress.reproduce.report import markdown_table

NAME = "learned_hash_sweep"
TITLE = "Learned hashing vs the hashing trick"
# SGD at lr 0.5 for the teacher and every model, the setting bench/bench_learned_hash.py measured (BENCHMARKS.md).
# With the full profile's Adagrad (lr 0.2) learned hashing trailed badly at 10% (AUC 0.669 vs the hashing trick's
# 0.700, seed 0, 400k rows); with SGD on the full profile's 1M rows learned hashing leads (reproduce/REPORT.md).
OPTIMIZER = {"optimizer": "sgd", "learning_rate": 0.5}
SETTINGS = {
    "full": {"targets": [0.1, 0.2, 0.3], "seeds": 2, "passes": 2, "teacher_dim": 2, "teacher_steps": None,
             "min_rows": 1000, "min_count": 3},
    "tiny": {"targets": [0.2], "seeds": 1, "passes": 1, "teacher_dim": 2, "teacher_steps": 5,
             "min_rows": 1000, "min_count": 3},
}
METHODS = ("learned_hash", "hashing")


def work_dir(context):
    """Where the teacher and the mappings live (inside the reproduce output, so a rerun finds them)."""
    return os.path.join(context.out_dir, "learned_hash")


def teacher_and_counts(context, settings):
    """The teacher's per-table values and the per-table id counts: loaded from teacher.npz, else made and saved."""

    path = os.path.join(work_dir(context), "teacher.npz")
    data = context.data()
    n_tables = len(data.schema.cardinalities)
    if os.path.exists(path):
        with np.load(path) as saved:
            return ([saved[f"teacher_{t}"] for t in range(n_tables)],
                    [saved[f"counts_{t}"] for t in range(n_tables)])
    base = context.pipeline(f"{NAME}_teacher", {"method": "full"}, train=OPTIMIZER)
    counts = id_counts(data, base.data, verbose=context.verbose)
    teacher = train_teacher(base, data, teacher_dim=settings["teacher_dim"], epochs=1,
                            steps=settings["teacher_steps"], verbose=context.verbose)
    os.makedirs(work_dir(context), exist_ok=True)
    arrays = {f"teacher_{t}": v for t, v in enumerate(teacher)}
    arrays.update({f"counts_{t}": c for t, c in enumerate(counts)})
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)  # a half-written file must never look finished
    return teacher, counts


def learned_compression(context, settings, target, teacher):
    """The [compression] section of the learned-hash pipeline at `target`, and its summary (mapping bytes...).

    Built with `tfcompress.learn_hash.workflow.learn_hash` unless its files from an earlier run are there.
    """

    output_dir = os.path.join(work_dir(context), f"target_{target:g}")
    summary_path = os.path.join(output_dir, "learn_hash.json")
    if not os.path.exists(summary_path):
        teacher_tables, counts = teacher()
        learn_hash(context.pipeline(NAME, {"method": "full"}), target, output_dir=output_dir,
                   min_rows=settings["min_rows"], min_count=settings["min_count"], teacher_tables=teacher_tables,
                   counts=counts, verbose=context.verbose)
    with open(summary_path) as f:
        summary = json.load(f)
    with open(summary["pipeline_path"], "rb") as f:
        compression = tomllib.load(f)["compression"]
    return compression, summary


def run(context):
    settings = SETTINGS[context.profile.name]
    cached = {}

    def teacher():  # made only when some target's mappings are missing
        if "tables" not in cached:
            cached["tables"] = teacher_and_counts(context, settings)
        return cached["tables"]

    seeds = [context.seed + i for i in range(settings["seeds"])]
    train = dict(OPTIMIZER, epochs=settings["passes"])
    runs = []

    def record(label, target, method, compression, seed, mapping_bytes=0):
        result = context.train(f"{NAME}_{label}_s{seed}", compression, train=dict(train, seed=seed))
        runs.append({"target": target, "method": method, "seed": seed, "auc": result["auc"],
                     "log_loss": result["log_loss"], "physical_bytes": result["physical_bytes"],
                     "ratio": result["ratio"], "mapping_bytes": mapping_bytes})

    for seed in seeds:
        record("full", None, "full", {"method": "full"}, seed)
    for target in settings["targets"]:
        learned, summary = learned_compression(context, settings, target, teacher)
        hashing = {"method": "hashing", "ratio": learned["ratio"], "uncompressed_below": settings["min_rows"]}
        mapping_bytes = sum(table["mapping_bytes"] for table in summary["tables"])
        for seed in seeds:
            record(f"learned_t{target:g}", target, "learned_hash", learned, seed, mapping_bytes)
            record(f"hashing_t{target:g}", target, "hashing", hashing, seed)
    return {"runs": runs, "targets": settings["targets"], "seeds": seeds, "passes": settings["passes"],
            "teacher_dim": settings["teacher_dim"], "teacher_steps": settings["teacher_steps"],
            "optimizer": OPTIMIZER, "min_rows": settings["min_rows"],
            "min_count": settings["min_count"], "ceiling_auc": context.data().ceiling_auc}


def summarize(runs, target, method):
    """Mean and spread (population sd; 0 for one seed) of AUC and log loss over seeds, and the bytes."""
    chosen = [r for r in runs if r["target"] == target and r["method"] == method]
    aucs = [r["auc"] for r in chosen]
    return {"auc": statistics.fmean(aucs), "auc_sd": statistics.pstdev(aucs),
            "log_loss": statistics.fmean(r["log_loss"] for r in chosen),
            "physical_bytes": chosen[0]["physical_bytes"], "mapping_bytes": chosen[0]["mapping_bytes"],
            "ratio": chosen[0]["ratio"]}


def report(results, context):
    import matplotlib  # lazily: only the report draws (after choosing the Agg backend)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazily: only the report draws (after choosing the Agg backend)

    runs, targets, ceiling = results["runs"], results["targets"], results["ceiling_auc"]
    several = len(results["seeds"]) > 1
    full = summarize(runs, None, "full")

    def auc_cell(s):
        return f"{s['auc']:.4f} ± {s['auc_sd']:.4f}" if several else f"{s['auc']:.4f}"

    rows = [["100%", "full", auc_cell(full), f"{full['log_loss']:.4f}", f"{full['physical_bytes']:,}", "-", "-"]]
    for target in targets:
        hashing = summarize(runs, target, "hashing")
        for method in METHODS:
            s = summarize(runs, target, method)
            rows.append([f"{target:.0%}", method, auc_cell(s), f"{s['log_loss']:.4f}", f"{s['physical_bytes']:,}",
                         f"{s['mapping_bytes']:,}" if method == "learned_hash" else "-",
                         f"{s['auc'] - hashing['auc']:+.4f}" if method == "learned_hash" else "-"])

    figure, axis = plt.subplots(figsize=(6.5, 4))
    percents = [100 * t for t in targets]
    for method, label in (("learned_hash", "learned hashing"), ("hashing", "hashing trick")):
        stats = [summarize(runs, t, method) for t in targets]
        axis.errorbar(percents, [s["auc"] for s in stats], yerr=[s["auc_sd"] for s in stats] if several else None,
                      marker="o", capsize=3, label=label)
    axis.axhline(full["auc"], color="C2", linestyle="-.", label="full tables")
    if ceiling is not None:
        axis.axhline(ceiling, color="k", linestyle="--", label="ceiling (planted model)")
    axis.set_xlabel("rows kept per compressed table (% of its ids)")
    axis.set_ylabel("eval AUC" + (f" (mean ± sd over {len(results['seeds'])} seeds)" if several else ""))
    axis.set_xticks(percents)
    axis.legend(fontsize=7)
    figure_md = context.figure(figure, NAME, "Eval AUC of learned hashing and the hashing trick at the same "
                                             "size, against the rows kept.")
    seeds = ", ".join(str(s) for s in results["seeds"])
    teacher = (f"{results['teacher_steps']} steps" if results["teacher_steps"] is not None else "one pass")
    optimizer = f"{results['optimizer']['optimizer']} lr {results['optimizer']['learning_rate']:g}"
    return "\n".join([
        f"## {TITLE}", "",
        f"Tables with >= {results['min_rows']:,} ids keep the given share of their rows; smaller tables stay full. "
        f"Learned hashing: a width-{results['teacher_dim']} teacher (full tables, {teacher}) is clustered into "
        f"that many rows (ids seen < {results['min_count']} times share one row); the hashing trick gets the "
        f"same ratio. The teacher and every model train with {optimizer} (not the profile's optimizer: see "
        f"`tfcompress.reproduce.{NAME}`), the profile's model, {results['passes']} pass(es), training seed(s) "
        f"{seeds}"
        + (" (AUC: mean ± sd over seeds)" if several else "") + ". \"embedding bytes\" counts float tables only; "
        "learned hashing also stores its id -> row mappings (\"mapping bytes\"), which the hashing trick does not "
        "need.", "",
        markdown_table(["rows kept", "method", "eval AUC", "log loss", "embedding bytes", "mapping bytes",
                        "AUC - hashing trick"], rows),
        figure_md])
