"""MLET over a grid of embedding widths d and inner widths k = m * d, against full tables of the same d.

MLET (multi-layer embedding training) trains each table as a k-wide table E times a k x d projection P and
deploys the folded d-wide table W = E . P, so the deployed model is exactly as large as a plain d-wide table; the
paper's claim is that the wider training factorization reaches a better model in the same training time. For
each d the grid trains one DLRM with full d-wide tables and one MLET DLRM per multiplier m (k = m * d, unhashed:
ratio 1), all for the same number of passes with the profile's optimizer and seed. Every MLET model is then
folded (`tfcompress.fold`) and evaluated again: the folded model is what would be served, and its AUC must equal
the trained one (the fold is exact up to float32 rounding).
"""

import numpy as np

from tfcompress._keras import keras
from tfcompress.data import read
from tfcompress.model_rewrite import fold
import tfcompress.models  # noqa: F401  (registers DLRM's layers for loading)
from tfcompress.plan import make_plan
from tfcompress.reproduce.report import markdown_table
from tfcompress.train import exact_metrics

NAME = "mlet_grid"
TITLE = "MLET: embedding width d x inner width k"
SETTINGS = {
    "full": {"dims": [4, 8, 16], "multipliers": [1, 2, 4], "passes": 1},
    "tiny": {"dims": [4], "multipliers": [1, 4], "passes": 1},
}
# The fold is an exact product rounded once to float32: the folded model's exact AUC may move in the last
# digits from prediction ties breaking differently, never by more than this.
FOLD_AUC_TOLERANCE = 1e-4


def compression_for(inner_dim):
    """The [compression] section: full tables (inner_dim None), or unhashed MLET with k = inner_dim (ratio 1: the
    folded tables are full size)."""
    return {"method": "full"} if inner_dim is None else {"method": "mlet", "ratio": 1.0, "inner_dim": inner_dim}


def folded_metrics(model_path, eval_dataset):
    """Fold the saved MLET model at `model_path` and evaluate it.

    Args:
        model_path: a `.keras` file written by `tfcompress.train.train` (save_model = true).
        eval_dataset: (features, labels) batches, one pass.

    Returns:
        (exact AUC, log loss) of the folded model on `eval_dataset`, and the largest |difference| between the
        trained and the folded model's predictions on its first batch.
    """

    model = keras.models.load_model(model_path, compile=False)  # the optimizer state is not needed to predict
    folded = fold(model)
    features, _ = next(iter(eval_dataset))
    difference = float(np.max(np.abs(np.asarray(model.predict_on_batch(features))
                                     - np.asarray(folded.predict_on_batch(features)))))
    auc, loss = exact_metrics(folded, eval_dataset)
    return auc, loss, difference


def run(context):
    settings = SETTINGS[context.profile.name]
    data = context.data()
    eval_dataset = read(data.eval_files, context.profile.eval_batch_size, schema=data.schema, shuffle=False,
                        repeat=False, deterministic=True)
    runs = []
    for d in settings["dims"]:
        for multiplier in [None] + list(settings["multipliers"]):
            inner_dim = None if multiplier is None else multiplier * d
            compression = compression_for(inner_dim)
            label = f"d{d}_full" if inner_dim is None else f"d{d}_mlet_k{inner_dim}"
            run_name = f"{NAME}_{label}"
            result = context.train(run_name, compression, model={"embedding_dim": d},
                                   train={"epochs": settings["passes"], "save_model": inner_dim is not None})
            plan = make_plan(data.schema.cardinalities, d, **compression)
            entry = {"d": d, "k": inner_dim, "multiplier": multiplier, "auc": result["auc"],
                     "log_loss": result["log_loss"], "training_parameters": plan.physical_parameters,
                     "deployed_parameters": plan.deployed_parameters,
                     "train_seconds": result["train_seconds"]}
            if inner_dim is not None:
                entry.update(context.saved_model_numbers(run_name, result, "folded.json", lambda path: dict(
                    zip(("folded_auc", "folded_log_loss", "fold_max_abs_diff"), folded_metrics(path, eval_dataset)))))
            runs.append(entry)
    return {"runs": runs, "dims": settings["dims"], "multipliers": settings["multipliers"],
            "passes": settings["passes"], "ceiling_auc": data.ceiling_auc}


def full_auc_by_dim(runs):
    return {r["d"]: r["auc"] for r in runs if r["k"] is None}


def report(results, context):
    import matplotlib  # lazily: only the report draws (after choosing the Agg backend)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazily: only the report draws (after choosing the Agg backend)

    runs, ceiling = results["runs"], results["ceiling_auc"]
    full = full_auc_by_dim(runs)
    rows = []
    for r in runs:
        mlet = r["k"] is not None
        rows.append([r["d"], f"{r['k']} ({r['multiplier']}d)" if mlet else "- (full)",
                     f"{r['training_parameters']:,}", f"{r['deployed_parameters']:,}", f"{r['auc']:.4f}",
                     f"{r['log_loss']:.4f}", f"{r['folded_auc']:.4f}" if mlet else "-",
                     f"{r['auc'] - full[r['d']]:+.4f}" if mlet else "-",
                     f"{r['fold_max_abs_diff']:.1e}" if mlet else "-"])
    mlet_runs = [r for r in runs if r["k"] is not None]
    largest_fold_gap = max((abs(r["folded_auc"] - r["auc"]) for r in mlet_runs), default=0.0)
    fold_verdict = (f"the folded models' AUC equals the trained AUC in every run (largest |difference| "
                    f"{largest_fold_gap:.1e})" if largest_fold_gap <= FOLD_AUC_TOLERANCE else
                    f"**the folded AUC differs from the trained AUC by up to {largest_fold_gap:.1e}** (more than "
                    f"{FOLD_AUC_TOLERANCE:g}: the fold is not exact)")
    best_gain = {d: max((r["auc"] - full[d] for r in mlet_runs if r["d"] == d), default=float("nan"))
                 for d in results["dims"]}

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    dims = results["dims"]
    axis.plot(dims, [full[d] for d in dims], marker="s", color="k", label="full d-wide tables")
    for i, m in enumerate(results["multipliers"]):
        points = sorted((r["d"], r["auc"]) for r in mlet_runs if r["multiplier"] == m)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{i}",
                  label=f"MLET k = {m}d (folded to d)")
    axis.set_xscale("log", base=2)
    axis.set_xticks(dims)
    axis.set_xticklabels([str(d) for d in dims])
    axis.set_xlabel("deployed embedding width d")
    axis.set_ylabel(f"eval AUC after {results['passes']:g} epoch(s)")
    axis.legend(fontsize=7)
    figure_md = context.figure(figure, NAME, "Eval AUC against the deployed width d: full d-wide tables and MLET "
                                             "trained at k = m*d, same deployed size per d.")
    gains = ", ".join(f"d={d}: {gain:+.4f}" for d, gain in best_gain.items())
    return "\n".join([
        f"## {TITLE}", "",
        f"For each deployed width d, one DLRM with full d-wide tables and one MLET DLRM per inner width "
        f"k = m*d (m in {results['multipliers']}, unhashed), each trained {results['passes']:g} epoch(s) with the "
        f"same data, optimizer and seed (one run per configuration: differences of a few 0.001 are within seed "
        f"noise). Training parameters count the k-wide tables and projections; deployed parameters the folded "
        f"n*d tables, the same as full's. Every MLET model was folded and evaluated again: {fold_verdict}. "
        f"Best MLET gain over full tables of the same d: {gains}. The MLET paper reports better AUC than the "
        "plain table of the same deployed size, growing with k."
        + ("" if ceiling is None else f" The planted model's AUC (the ceiling) is {ceiling:.4f}."), "",
        markdown_table(["d", "k", "training params", "deployed params", "AUC", "log loss", "folded AUC",
                        "AUC - full (same d)", "max abs prediction change after fold"], rows),
        figure_md])
