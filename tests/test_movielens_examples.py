"""The MovieLens-shaped examples (issue 16 section 5): a ranking model written with plain Embedding layers,
compressed by one `tfcompress.compress` call, trains with `fit`, and its SavedModel serves the same predictions in
a fresh Keras 3 process that never imports tfcompress.

- examples/keras_rs_movielens.py: Keras 3 + keras-rs (FeatureCross);
- examples/tfrs_movielens.py: legacy tf.keras + TFRS (tfrs.models.Model + tfrs.tasks.Ranking); the script sets
  TF_USE_LEGACY_KERAS=1 itself, and its SavedModel is loaded on Keras 3.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
         "--rows", "12000", "--eval-rows", "4000", "--num-users", "300", "--num-items", "500", "--min-rows", "300",
         "--ratio", "10", "--epochs", "2", "--batch-size", "256"],
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


def test_saved_model_serves_the_same_predictions_without_tfcompress(example_run):
    work_dir, results, _ = example_run
    assert results["max_reload_difference"] < 1e-5
    script = (
        "import json, sys\n"
        "import numpy as np, tensorflow as tf\n"
        "check = np.load(sys.argv[2])\n"
        "serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "names = ['user_id', 'item_id', 'history', 'genres', 'age', 'hour_of_day']\n"
        "out = serve(**{n: tf.constant(check[n]) for n in names})['probability'].numpy()\n"
        "assert not any(name.startswith('tfcompress') for name in sys.modules), 'tfcompress was imported'\n"
        "json.dump(out.ravel().tolist(), sys.stdout)\n"
    )
    env = child_env()
    env.pop("PYTHONPATH")
    done = subprocess.run([sys.executable, "-c", script, results["export_dir"], str(work_dir / "serving_check.npz")],
                          cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(work_dir / "serving_check.npz") as check:
        expected = check["predictions"].ravel()
    assert len(expected) > 100
    np.testing.assert_allclose(json.loads(done.stdout), expected, rtol=0, atol=1e-5)
