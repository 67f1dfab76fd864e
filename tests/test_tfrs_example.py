"""examples/tfrs_ranking.py: a TFRS ranking model over ROBE-Z and MLET embeddings on legacy tf.keras trains,
exports, and its SavedModel serves the same predictions in a process that never imports tfcompress (on Keras 3)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EMBEDDING_DIM = 16  # the example's default d
MLET_INNER_DIM = 24  # no other layer of the example is 24 wide, so a 24-wide variable would be an unfolded table
ROBE_MIN_ROWS = 1000  # the example's default split between ROBE-Z and MLET tables


def child_env(legacy):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)
    if legacy:
        env["TF_USE_LEGACY_KERAS"] = "1"
    return env


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("tfrs_ranking")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tfrs_ranking.py"), "--work-dir", str(work_dir), "--rows", "16384",
         "--eval-rows", "4096", "--epochs", "2", "--mlet-inner-dim", str(MLET_INNER_DIM)],
        cwd=ROOT, env=child_env(legacy=False), capture_output=True, text=True, timeout=400,
    )  # legacy=False: the example itself must switch to tf_keras before importing TensorFlow
    assert done.returncode == 0, f"example failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results = json.loads((work_dir / "results.json").read_text())
    schema = json.loads((work_dir / "data" / "schema.json").read_text())
    return work_dir, results, schema


def test_training_with_fit_learns(example_run):
    _, results, _ = example_run
    assert results["train_epochs"] == 2
    assert results["eval_auc_after"] > results["eval_auc_before"] + 0.05, results
    assert results["eval_auc_after"] > 0.6, results
    assert results["eval_log_loss_after"] < results["eval_log_loss_before"], results
    # The data's planted click probabilities bound what any model can reach on the same rows.
    assert results["eval_auc_after"] < results["ceiling_auc"] + 0.01, results


def test_embedding_is_robe_for_large_tables_and_compressed(example_run):
    _, results, schema = example_run
    cards = schema["cardinalities"]
    assert len(cards) == 26
    assert results["robe_features"] == [f for f, n in enumerate(cards) if n >= ROBE_MIN_ROWS]
    assert results["embedding_logical_parameters"] == sum(cards) * EMBEDDING_DIM
    assert results["embedding_physical_parameters"] < results["embedding_logical_parameters"] / 20


def test_saved_model_serves_the_same_predictions_without_tfcompress(example_run):
    work_dir, results, schema = example_run
    assert results["max_reload_difference"] < 1e-5
    # A fresh process on Keras 3 (no TF_USE_LEGACY_KERAS) that never imports tfcompress: the export is
    # independent of the Keras stack it was trained on.
    script = (
        "import json, sys\n"
        "import numpy as np, tensorflow as tf\n"
        "export_dir, check = sys.argv[1], np.load(sys.argv[2])\n"
        "loaded = tf.saved_model.load(export_dir)\n"
        "out = loaded.signatures['serving_default'](dense=tf.constant(check['dense']),"
        " sparse=tf.constant(check['sparse']))['probability'].numpy()\n"
        "shapes = [shape for _, shape in tf.train.list_variables(export_dir + '/variables/variables')]\n"
        "assert not any(name.startswith('tfcompress') for name in sys.modules), 'tfcompress was imported'\n"
        "json.dump({'predictions': out.ravel().tolist(), 'shapes': shapes}, sys.stdout)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, results["export_dir"], str(work_dir / "reload_check.npz")],
        cwd="/", env=child_env(legacy=False), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    served = json.loads(done.stdout)
    with np.load(work_dir / "reload_check.npz") as check:
        expected = check["predictions"].ravel()
        assert len(check["sparse"]) == len(expected) > 100
    np.testing.assert_allclose(served["predictions"], expected, rtol=0, atol=1e-5)
    # MLET tables were folded: d-wide tables of the small features, no k-wide table left.
    shapes = served["shapes"]
    assert not any(MLET_INNER_DIM in shape for shape in shapes), shapes
    small = [n for n in schema["cardinalities"] if n < ROBE_MIN_ROWS]
    for n in small:
        assert [n, EMBEDDING_DIM] in shapes, (n, shapes)
