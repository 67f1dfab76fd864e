"""`tfcompress tune`: KerasTuner random search over compression method and ratio, Pareto CSV, best pipeline."""

import csv
import os

import pytest

from tfcompress.pipeline import load_pipeline, pipeline_toml
from tfcompress.tune import MAX_RATIO, MIN_RATIO, TRIAL_COLUMNS, pareto_front

from test_train_cli import write_pipeline


def test_pareto_front_hand_made():
    rows = [
        {"name": "a", "physical_bytes": 100, "auc": 0.70},
        {"name": "b", "physical_bytes": 200, "auc": 0.75},
        {"name": "c", "physical_bytes": 300, "auc": 0.74},  # bigger and worse than b
        {"name": "d", "physical_bytes": 100, "auc": 0.65},  # same bytes as a, worse
        {"name": "e", "physical_bytes": 400, "auc": 0.80},
        {"name": "f", "physical_bytes": 50, "auc": None},  # failed trial: not on the front
    ]
    assert [r["name"] for r in pareto_front(rows)] == ["a", "b", "e"]


def test_pipeline_toml_round_trips_through_the_loader(tmp_path):
    raw = {"name": "x", "data": {"source": "synthetic", "rows": 10, "cardinality_scale": 0.5},
           "model": {"bottom_mlp": [4, 2]}, "compression": {"method": "robe", "ratio": 12.5, "chunk_size": 2},
           "train": {"save_model": False, "steps_per_epoch": None}}
    path = tmp_path / "x.toml"
    path.write_text(pipeline_toml(raw))
    pipeline = load_pipeline(str(path))
    assert (pipeline.data.rows, pipeline.data.cardinality_scale, pipeline.model.bottom_mlp) == (10, 0.5, (4, 2))
    assert (pipeline.compression.ratio, pipeline.compression.options) == (12.5, {"chunk_size": 2})
    assert pipeline.train.save_model is False and pipeline.train.steps_per_epoch is None


def test_three_tiny_trials_write_the_pareto_csv_and_a_trainable_best_pipeline(tmp_path):
    from tfcompress.train import train
    from tfcompress.tune import tune

    budget = 100_000
    pipeline = load_pipeline(write_pipeline(str(tmp_path), "tiny"), ["train.epochs=1", "train.save_model=false"])
    summary = tune(pipeline, max_trials=3, budget=budget, output_dir=str(tmp_path / "tune"), seed=3, verbose=0)

    with open(summary["trials_csv"]) as f:
        trials = list(csv.DictReader(f))
    # The plot of AUC against bytes (matplotlib comes with the [tune] extra).
    with open(summary["pareto_png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(summary["pareto_csv"]) as f:
        front = list(csv.DictReader(f))
    assert len(trials) == 3 and tuple(trials[0]) == TRIAL_COLUMNS
    for row in trials:
        assert row["method"] in ("robe", "mlet", "pruned", "hashing", "qr")
        assert MIN_RATIO <= float(row["ratio"]) <= MAX_RATIO
        if not row["error"]:
            assert 0.5 < float(row["auc"]) < 1.0 and float(row["samples_per_s"]) > 0
            assert (row["within_budget"] == "True") == (int(row["physical_bytes"]) <= budget)
    # The front: trials within the budget that no other such trial beats on both bytes and AUC.
    feasible = [r for r in trials if r["within_budget"] == "True"]
    for row in front:
        assert row["trial"] in {r["trial"] for r in feasible}
        assert not any(int(o["physical_bytes"]) <= int(row["physical_bytes"]) and float(o["auc"]) > float(row["auc"])
                       for o in feasible)
    assert front, "some trial fits 100 kB"

    best = max(feasible, key=lambda r: float(r["auc"]))
    best_pipeline = load_pipeline(summary["best_toml"])
    assert best_pipeline.compression.method == best["method"]
    assert best_pipeline.compression.ratio == pytest.approx(float(best["ratio"]))
    # `tfcompress train` runs it, with the tables of the trial it came from.
    result = train(best_pipeline, runs_dir=str(tmp_path / "runs"), verbose=0)
    assert result["physical_bytes"] == int(best["physical_bytes"])
    assert os.path.exists(tmp_path / "runs" / best_pipeline.name / "results.json")
