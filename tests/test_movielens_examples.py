"""The MovieLens-shaped examples (issue 16 section 5): a ranking model written with plain Embedding layers,
compressed by one `tfcompress.compress` call, trains with `fit` on the fused custom op, is exported by
`tfcompress.export.export_saved_model` (stock ops: each layer's `serving_lookup`) and passes `verify` in a fresh
process that never imports tfcompress.

- examples/keras_rs_movielens.py: Keras 3 + keras-rs (FeatureCross);
- examples/tfrs_movielens.py: legacy tf.keras + TFRS (tfrs.models.Model + tfrs.tasks.Ranking); the script sets
  TF_USE_LEGACY_KERAS=1 itself (so it runs in a subprocess), and the functional network inside the TFRS model is
  what is exported.

Each example runs once, small (4,000 rows, one epoch): the default-size numbers are in BENCHMARKS.md.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tfcompress import fused_ops

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["keras_rs_movielens", "tfrs_movielens"]


def child_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)  # the TFRS example sets it itself; the serving check runs on Keras 3
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module", params=EXAMPLES)
def example_run(request, tmp_path_factory):
    # find_spec, not importorskip: importing TFRS in this Keras 3 process raises (it needs legacy tf.keras).
    package = "keras_rs" if request.param == "keras_rs_movielens" else "tensorflow_recommenders"
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (make install installs it)")
    work_dir = tmp_path_factory.mktemp(request.param)
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{request.param}.py"), "--work-dir", str(work_dir),
         "--rows", "4000", "--eval-rows", "1000", "--num-users", "300", "--num-items", "500", "--min-rows", "300",
         "--ratio", "10", "--epochs", "1", "--batch-size", "32"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, f"example failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return work_dir, json.loads((work_dir / "results.json").read_text()), done.stdout


def test_one_compress_call_replaces_the_large_tables_and_prints_the_plan(example_run):
    _, results, stdout = example_run
    # user (301 rows), item (501) and history (502) tables >= min_rows=300 are replaced; the genre bag (20) kept.
    assert "3 of 4 embedding tables replaced (robe)" in stdout, stdout[-3000:]
    assert "shared ROBE memory" in stdout
    replaced_logical = 4 * 32 * (301 + 501 + 502)
    kept = 4 * 8 * 20
    assert results["full_embedding_bytes"] == replaced_logical + kept
    # One shared array of replaced_logical / 10 bytes, plus the kept genre table.
    assert results["compressed_embedding_bytes"] == 4 * ((replaced_logical // 4) // 10) + kept
    assert results["compressed_parameters"] < results["full_parameters"]


def test_both_models_learn_the_planted_signal(example_run):
    _, results, _ = example_run
    for variant in ("full", "compressed"):
        assert results[f"{variant}_auc"] > 0.6, results
        assert results[f"{variant}_auc"] < results["ceiling_auc"] + 0.02, results


def test_training_runs_the_fused_custom_op(example_run):
    _, results, _ = example_run
    # The example no longer turns the custom ops off to get a stock-op SavedModel: the exporter traces the stock-op
    # serving_lookup instead, so the replaced tables train on the fused op whenever the library loads.
    expected = ["history_embedding_robe", "item_embedding_robe", "user_embedding_robe"]
    assert results["fused_op_layers"] == (expected if fused_ops.is_available() else []), \
        (results["fused_op_layers"], fused_ops.unavailable_reason())


def test_the_export_passes_verify_in_a_fresh_process_without_tfcompress(example_run):
    _, results, stdout = example_run
    assert results["verify_ok"], stdout[-4000:]
    checks = results["verify_checks"]
    # isolation: the checker never imported tfcompress nor loaded the custom-op library; stock_ops: the graph holds
    # no Robe* op; keras_parity: its predictions equal the trained Keras model's on the stored held-out rows.
    for check in ("isolation", "stock_ops", "load", "signatures", "keras_parity", "serving_parity", "examples",
                  "warmup", "bad_inputs"):
        assert checks[check] == "PASS", (check, stdout[-4000:])
    assert os.path.isfile(os.path.join(results["export_dir"], "saved_model.pb"))
