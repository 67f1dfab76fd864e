"""Compression search with KerasTuner: which method and ratio give the best validation AUC for their bytes.

Each trial is one `tfcompress.train.train` run of the pipeline with the [compression] section replaced by the
trial's hyperparameters:

- method: one of robe, mlet, pruned, hashing, qr (those `tfcompress.plan.methods()` knows),
- ratio: log-uniform from 10 to 10,000 (capped by the largest ratio the data's tables allow),
- robe: chunk_size in {1, 2, 4, 8}; mlet: inner_dim in {1, 2, 4} x embedding_dim.

The objective is the exact eval AUC that `train` reports; with a byte budget a trial whose embedding tables take
more physical bytes is recorded but scores 0 so the tuner never prefers it. Every trial's (physical bytes, AUC,
samples/s) is written to trials.csv, the trials that no other trial beats on both bytes and AUC to pareto.csv (and
pareto.png when matplotlib is installed), and the best configuration to best.toml, a pipeline `tfcompress train`
runs.

KerasTuner 1.4.8 needs `tensorboard` installed: without it every trial fails on import inside the tuner and the
search ends with no results.

Example::

    from tfcompress.pipeline import load_pipeline
    from tfcompress.tune import tune

    summary = tune(load_pipeline("pipelines/synthetic_dlrm_robe.toml"), max_trials=20, budget="1MB")
"""

import csv
import os

from tfcompress.pipeline import pipeline_from_dict, pipeline_toml, raw_pipeline
from tfcompress.plan import methods as known_methods
from tfcompress.sizes import parse_bytes
from tfcompress.train import prepare_data, train

SEARCHED_METHODS = ("robe", "mlet", "pruned", "hashing", "qr")
MIN_RATIO, MAX_RATIO = 10.0, 10_000.0
ROBE_CHUNK_SIZES = (1, 2, 4, 8)
MLET_INNER_DIM_FACTORS = (1, 2, 4)
# method "pruned" needs the steps between pruning events; a pipeline that does not set one gets this.
DEFAULT_PRUNING_PERIOD = 100
TRIAL_COLUMNS = ("trial", "method", "ratio", "chunk_size", "inner_dim", "physical_bytes", "auc", "log_loss",
                 "samples_per_s", "within_budget", "error")


def search_space(hp, methods, embedding_dim, max_ratio=MAX_RATIO):
    """The trial's [compression] section, drawn from the KerasTuner HyperParameters `hp`.

    Args:
        hp: a `keras_tuner.HyperParameters`.
        methods: the method names to choose from.
        embedding_dim: the pipeline's embedding width (MLET's inner_dim is a multiple of it).
        max_ratio: the largest ratio to draw (>= MIN_RATIO).
    """
    method = hp.Choice("method", list(methods))
    ratio = hp.Float("ratio", MIN_RATIO, max(MIN_RATIO, max_ratio), sampling="log")
    compression = {"method": method, "ratio": ratio}
    # Conditional hyperparameters: only active (and only recorded) when their method is drawn.
    if "robe" in methods:
        with hp.conditional_scope("method", ["robe"]):
            chunk_size = hp.Choice("chunk_size", list(ROBE_CHUNK_SIZES))
        if method == "robe":
            compression["chunk_size"] = chunk_size
    if "mlet" in methods:
        with hp.conditional_scope("method", ["mlet"]):
            factor = hp.Choice("inner_dim_factor", list(MLET_INNER_DIM_FACTORS))
        if method == "mlet":
            compression["inner_dim"] = factor * embedding_dim
    return compression


def pareto_front(rows):
    """The rows that no other row beats: none has fewer or equal bytes and a higher or equal AUC (one strictly).

    Args:
        rows: dicts with "physical_bytes" and "auc" (rows with auc None are ignored).

    Returns:
        The front, sorted by bytes.
    """
    rows = [r for r in rows if r.get("auc") is not None]
    front = [r for r in rows
             if not any(o["physical_bytes"] <= r["physical_bytes"] and o["auc"] >= r["auc"]
                        and (o["physical_bytes"] < r["physical_bytes"] or o["auc"] > r["auc"]) for o in rows)]
    return sorted(front, key=lambda r: (r["physical_bytes"], -r["auc"]))


def _trial_raw(base, name, compression):
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    raw["name"] = name
    old = raw.get("compression", {})
    new = dict(compression, uncompressed_below=old.get("uncompressed_below", 0))
    if compression["method"] == "pruned":
        new["pruning_period"] = old.get("pruning_period", DEFAULT_PRUNING_PERIOD)
    raw["compression"] = new
    return raw


def tune(pipeline, max_trials, budget=None, output_dir=None, methods=None, seed=0, verbose=1):
    """Search compression method and ratio with KerasTuner's random search; write the results.

    Args:
        pipeline: a validated `tfcompress.pipeline.Pipeline` (its [compression] section is replaced per trial).
        max_trials: trials to run, >= 1.
        budget: optional byte budget of the embedding tables ("100MB" or a number of bytes).
        output_dir: where trials.csv, pareto.csv, best.toml, the tuner state and the trials' runs go
            (default: runs/<pipeline name>_tune).
        methods: the methods to search (default: those of robe, mlet, pruned, hashing, qr that exist).
        seed: the tuner's seed (trials' training uses the pipeline's [train] seed).
        verbose: 0 silent, 1 one line per trial.

    Returns:
        dict with trials (one dict per trial, the TRIAL_COLUMNS), pareto (the front), best (the best trial's row
        or None) and the paths trials_csv, pareto_csv, pareto_png (None without matplotlib) and best_toml (None
        when no trial succeeded within the budget).

    Raises:
        ValueError: max_trials < 1, an unknown method, or a malformed budget.
        ImportError: keras-tuner is not installed.
    """
    import keras_tuner as kt  # optional: the [tune] extra

    if int(max_trials) != max_trials or max_trials < 1:
        raise ValueError(f"max_trials must be an integer >= 1, got {max_trials!r}")
    available = [m for m in SEARCHED_METHODS if m in known_methods()]
    methods = list(methods) if methods is not None else available
    unknown = [m for m in methods if m not in available]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {available}, got {methods!r}")
    budget_bytes = None if budget is None else parse_bytes(budget)
    output_dir = output_dir or os.path.join("runs", f"{pipeline.name}_tune")
    os.makedirs(output_dir, exist_ok=True)
    base = raw_pipeline(pipeline)
    embedding_dim = pipeline.model.embedding_dim
    # A ratio above the largest table's row count would leave less than one row.
    data = prepare_data(pipeline.data, pipeline.source, verbose=0)
    max_ratio = min(MAX_RATIO, float(max(data.schema.cardinalities)))
    rows = []

    class CompressionTuner(kt.engine.base_tuner.BaseTuner):
        """One trial = one `train` run; no Keras model is kept by the tuner (train saves its own)."""

        def run_trial(self, trial, *args, **kwargs):
            compression = search_space(trial.hyperparameters, methods, embedding_dim, max_ratio)
            name = f"{pipeline.name}_trial_{trial.trial_id}"
            row = dict.fromkeys(TRIAL_COLUMNS)
            row.update(trial=trial.trial_id, method=compression["method"], ratio=compression["ratio"],
                       chunk_size=compression.get("chunk_size"), inner_dim=compression.get("inner_dim"))
            try:
                trial_pipeline = pipeline_from_dict(_trial_raw(base, name, compression), source=pipeline.source)
                result = train(trial_pipeline, runs_dir=os.path.join(output_dir, "trials"), verbose=0)
            except ValueError as error:
                # An infeasible combination (e.g. a ratio a method cannot reach on these tables): recorded, and
                # scored below any real model so the search moves on instead of stopping.
                row.update(error=str(error), within_budget=False)
                rows.append(row)
                return {"auc": 0.0}
            within = budget_bytes is None or result["physical_bytes"] <= budget_bytes
            row.update(physical_bytes=result["physical_bytes"], auc=result["auc"], log_loss=result["log_loss"],
                       samples_per_s=result["train_samples_per_s"], within_budget=within)
            rows.append(row)
            if verbose:
                print(f"trial {trial.trial_id}: {row['method']} ratio {row['ratio']:,.1f} -> "
                      f"{result['physical_bytes']:,} bytes, AUC {result['auc']:.4f}"
                      + ("" if within else " (over the budget)"), flush=True)
            return {"auc": result["auc"] if within else 0.0}

        def save_model(self, trial_id, model, step=0):
            pass  # train() already saved the trial's model under output_dir/trials/

        def load_model(self, trial):
            raise NotImplementedError("trial models are under output_dir/trials/<name>/model.keras")

    oracle = kt.oracles.RandomSearchOracle(objective=kt.Objective("auc", direction="max"), max_trials=max_trials,
                                           seed=seed)
    tuner = CompressionTuner(oracle=oracle, directory=output_dir, project_name="tuner", overwrite=True)
    tuner.search(verbose=verbose)  # KerasTuner's own per-trial report

    trials_csv = os.path.join(output_dir, "trials.csv")
    _write_csv(trials_csv, rows)
    front = pareto_front([r for r in rows if r["within_budget"]])
    pareto_csv = os.path.join(output_dir, "pareto.csv")
    _write_csv(pareto_csv, front)
    pareto_png = _plot_pareto(os.path.join(output_dir, "pareto.png"), rows, front)
    feasible = [r for r in rows if r["within_budget"] and r["auc"] is not None]
    best = max(feasible, key=lambda r: r["auc"]) if feasible else None
    best_toml = None
    if best is not None:
        compression = {"method": best["method"], "ratio": best["ratio"]}
        for key in ("chunk_size", "inner_dim"):
            if best[key] is not None:
                compression[key] = best[key]
        best_toml = os.path.join(output_dir, "best.toml")
        with open(best_toml, "w") as f:
            f.write(f"# best of {len(rows)} trials of tfcompress tune: eval AUC {best['auc']:.4f}, "
                    f"{best['physical_bytes']:,} embedding bytes\n")
            f.write(pipeline_toml(_trial_raw(base, f"{pipeline.name}_best", compression)))
    if verbose:
        print(f"wrote {trials_csv}, {pareto_csv}" + (f", {pareto_png}" if pareto_png else "")
              + (f", {best_toml}" if best_toml else " (no trial succeeded within the budget)"), flush=True)
    return {"trials": rows, "pareto": front, "best": best, "trials_csv": trials_csv, "pareto_csv": pareto_csv,
            "pareto_png": pareto_png, "best_toml": best_toml}


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TRIAL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _plot_pareto(path, rows, front):
    """AUC against embedding bytes (log scale), the front as a line; None when matplotlib is not installed."""
    try:
        import matplotlib  # lazily: only the report draws (after choosing the Agg backend)

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt  # lazily: only the report draws (after choosing the Agg backend)
    except ImportError:
        return None
    done = [r for r in rows if r["auc"] is not None]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.scatter([r["physical_bytes"] for r in done], [r["auc"] for r in done], label="trials")
    axes.plot([r["physical_bytes"] for r in front], [r["auc"] for r in front], "r-o", label="Pareto front")
    axes.set_xscale("log")
    axes.set_xlabel("embedding bytes")
    axes.set_ylabel("eval AUC")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
