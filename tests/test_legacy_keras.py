"""Both Keras stacks: every layer, the plan and folding under Keras 3 and under legacy tf.keras (tf_keras).

`TF_USE_LEGACY_KERAS=1` must be set before TensorFlow is imported, so each stack runs in its own process:

- the layer and plan test files are re-run under tf_keras in a subprocess and must pass there;
- this file doubles as a worker script (`python tests/test_legacy_keras.py OUT_DIR [INIT_DIR]`): run once under
  Keras 3 and once under tf_keras, it builds the same layers from the same constructor arguments, loads the same
  initial weights (the Keras 3 run saves them as .npz, the tf_keras run loads them), and saves outputs,
  gradients, weights after three Adagrad steps, folded outputs and normalized configs. The tests compare the two
  runs with NumPy.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

CARDS = [1000, 50, 7, 3000]
DIM = 8

# name -> (layer class in tfcompress.layers, constructor kwargs): the same constructor call in both stacks.
LAYER_CASES = {
    "robe_dense": ("RobeEmbedding", dict(cardinalities=CARDS, output_dim=DIM, memory_size=256, chunk_size=4,
                                         gradient="dense")),
    "robe_sparse_signed": ("RobeEmbedding", dict(cardinalities=CARDS, output_dim=DIM, compression=20.0, chunk_size=3,
                                                 signed=True, gradient="sparse")),
    "full": ("FullEmbedding", dict(cardinalities=CARDS, output_dim=DIM)),
    "hashing_trick": ("HashingTrickEmbedding", dict(cardinalities=CARDS, output_dim=DIM, compression=10.0)),
    "qr_mult": ("QREmbedding", dict(cardinalities=CARDS, output_dim=DIM, compression=4.0, operation="mult")),
    "qr_concat": ("QREmbedding", dict(cardinalities=CARDS, output_dim=DIM, num_buckets=10, operation="concat")),
    "mlet": ("MLETEmbedding", dict(cardinalities=CARDS, output_dim=DIM, inner_dim=16)),
    "mlet_hashed": ("MLETEmbedding", dict(cardinalities=CARDS, output_dim=DIM, inner_dim=16, compression=10.0)),
}
# name -> make_plan keyword arguments; the layer is `plan.build_layer()`.
PLAN_CASES = {
    "plan_robe": dict(method="robe", ratio=20, uncompressed_below=100, chunk_size=2),
    "plan_qr": dict(method="qr", ratio=4, operation="add"),
    "plan_mlet": dict(method="mlet", ratio=4, uncompressed_below=10, inner_dim=16),
}
CASES = [*LAYER_CASES, *PLAN_CASES]
FOLDABLE_CASES = ["mlet", "mlet_hashed", "plan_mlet"]
TRAINING_STEPS = 3

# Keys Keras adds to every layer config, whose format differs between the stacks (e.g. dtype is a string in
# tf_keras and a DTypePolicy dict in Keras 3). What the tfcompress constructor received is everything else.
KERAS_OWN_KEYS = {"name", "trainable", "dtype", "batch_input_shape", "build_config", "module", "registered_name"}

# The legacy re-run skips the "loss goes down" fits with SGD and Adagrad (two thirds of its time); the Adam fits
# stay, and the worker below checks SGD-style gradients and Adagrad updates against Keras 3 number for number.
LEGACY_SUITE = ["tests/test_layers.py", "tests/test_plan.py", "tests/test_mlet.py"]
LEGACY_DESELECT = "not (test_short_fit_lowers_the_loss and (sgd or adagrad))"


def stack_env(legacy):
    """The environment of a child process on one stack (the variable is read when TensorFlow is imported)."""
    return dict(os.environ, TF_USE_LEGACY_KERAS="1" if legacy else "0", TF_CPP_MIN_LOG_LEVEL="2")


def run_child(args, legacy, timeout):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=stack_env(legacy), capture_output=True,
                          text=True, timeout=timeout)


# ---- the worker (runs in a child process, on one stack) ----------------------------------------------------------


def normalize_config(value):
    """A config with the stack-specific parts removed: Keras' own keys, keys set to None (Keras 3's GlorotUniform
    config has input_axes=None, tf_keras' has no such key), and serialized objects reduced to
    {"class_name": bare class name, "config": ...} (Keras 3 and tf_keras spell registered names differently)."""
    if isinstance(value, dict) and "class_name" in value and "config" in value:
        name = value.get("registered_name") or value["class_name"]
        return {"class_name": name.split(">")[-1], "config": normalize_config(value["config"])}
    if isinstance(value, dict):
        return {key: normalize_config(item) for key, item in value.items()
                if key not in KERAS_OWN_KEYS and item is not None}
    if isinstance(value, (list, tuple)):
        return [normalize_config(item) for item in value]
    return value


def build_case(name):
    from tfcompress import layers
    from tfcompress.plan import make_plan

    if name in LAYER_CASES:
        class_name, kwargs = LAYER_CASES[name]
        return getattr(layers, class_name)(**kwargs)
    return make_plan(CARDS, DIM, **PLAN_CASES[name]).build_layer()


def case_inputs():
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, n, 64) for n in CARDS], axis=1).astype(np.int64)
    upstream = rng.normal(size=(64, len(CARDS), DIM)).astype(np.float32)
    return ids, upstream


def run_case(name, out_dir, init_dir):
    import tensorflow as tf

    from tfcompress._keras import keras
    from tfcompress.model_rewrite import fold_layer

    ids, upstream = case_inputs()
    layer = build_case(name)
    layer(ids)  # builds the weights
    if init_dir is not None:
        with np.load(init_dir / f"{name}.npz") as stored:
            layer.set_weights([stored[f"init_{i}"] for i in range(len(layer.weights))])
    result = {f"init_{i}": w for i, w in enumerate(layer.get_weights())}
    result["output"] = layer(ids).numpy()
    result["graph_output"] = tf.function(layer)(tf.constant(ids)).numpy()

    def loss_and_gradients():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids) * upstream)
        return tape.gradient(loss, layer.trainable_weights)

    for i, gradient in enumerate(loss_and_gradients()):
        result[f"gradient_{i}"] = tf.convert_to_tensor(gradient).numpy()
    optimizer = keras.optimizers.Adagrad(learning_rate=0.1)
    for _ in range(TRAINING_STEPS):
        optimizer.apply_gradients(zip(loss_and_gradients(), layer.trainable_weights))
    result.update({f"trained_{i}": w for i, w in enumerate(layer.get_weights())})
    result["trained_output"] = layer(ids).numpy()
    if name in FOLDABLE_CASES:
        result["folded_output"] = fold_layer(layer)(ids).numpy()
    np.savez(out_dir / f"{name}.npz", **result)
    with open(out_dir / f"{name}.json", "w") as f:
        json.dump(normalize_config(layer.get_config()), f, indent=1, sort_keys=True)


def run_fold_model(out_dir, init_dir):
    """`fold` rewrites a whole functional model through its config (the stacks' config formats differ)."""
    from tfcompress._keras import keras
    from tfcompress.model_rewrite import fold
    from tfcompress.layers import MLETEmbedding

    ids, _ = case_inputs()
    inputs = keras.Input((len(CARDS),), dtype="int64")
    embedded = MLETEmbedding(CARDS, DIM, inner_dim=16, compression=4.0)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(embedded)))
    if init_dir is not None:
        with np.load(init_dir / "fold_model.npz") as stored:
            model.set_weights([stored[f"init_{i}"] for i in range(len(model.weights))])
    folded = fold(model)
    result = {f"init_{i}": w for i, w in enumerate(model.get_weights())}
    result["output"] = model.predict(ids, verbose=0)
    result["folded_output"] = folded.predict(ids, verbose=0)
    result["folded_layer_classes"] = np.array([type(layer).__name__ for layer in folded.layers])
    np.savez(out_dir / "fold_model.npz", **result)


def record_initial_tables(out_dir):
    """Whether equal-width tables of one layer start from different draws (fresh_initializer), in this stack."""
    from tfcompress._keras import keras
    from tfcompress.layers import FullEmbedding, HashingTrickEmbedding, QREmbedding

    keras.utils.set_random_seed(1)
    full = FullEmbedding([100, 100, 30], 4)
    full.build((None, 3))
    hashed = HashingTrickEmbedding([500, 500], 4, num_buckets=50)
    hashed.build((None, 2))
    qr = QREmbedding([1000, 1000], 4, num_buckets=10, operation="add")
    qr.build((None, 2))
    pairs = {
        "full_equal_shapes": (full.tables[0], full.tables[1]),
        "full_prefix": (full.tables[0][:30], full.tables[2]),
        "hashing_equal_shapes": (hashed.tables[0], hashed.tables[1]),
        "qr_quotients": (qr.quotient_tables[0], qr.quotient_tables[1]),
        "qr_quotient_vs_remainder": (qr.quotient_tables[0][:10], qr.remainder_tables[0]),
    }
    identical = {name: bool(np.array_equal(np.asarray(a), np.asarray(b))) for name, (a, b) in pairs.items()}
    with open(out_dir / "initial_tables.json", "w") as f:
        json.dump(identical, f)


def worker_main(out_dir, init_dir=None):
    import tensorflow as tf

    from tfcompress._keras import USING_LEGACY_KERAS, keras

    out_dir = Path(out_dir)
    init_dir = None if init_dir is None else Path(init_dir)
    info = {
        "using_legacy_keras": USING_LEGACY_KERAS,
        "keras_module": keras.__name__,
        "keras_version": keras.__version__,
        # tensorflow-recommenders builds on tf.keras: it must be the same Keras as tfcompress's.
        "tf_keras_layer_module": tf.keras.layers.Layer.__module__,
    }
    with open(out_dir / "info.json", "w") as f:
        json.dump(info, f)
    for name in CASES:
        run_case(name, out_dir, init_dir)
    run_fold_model(out_dir, init_dir)
    record_initial_tables(out_dir)


# ---- the tests (run in the pytest process) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the worker under Keras 3, then under tf_keras starting from the Keras 3 run's initial weights."""
    dirs = {"keras3": tmp_path_factory.mktemp("keras3"), "legacy": tmp_path_factory.mktemp("legacy")}
    for mode, init in (("keras3", None), ("legacy", dirs["keras3"])):
        args = [str(Path(__file__)), str(dirs[mode])] + ([str(init)] if init is not None else [])
        done = run_child(args, legacy=mode == "legacy", timeout=300)
        assert done.returncode == 0, f"{mode} worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return dirs


def load(runs, mode, name):
    with np.load(runs[mode] / f"{name}.npz") as stored:
        return dict(stored)


def test_each_run_used_its_keras(runs):
    keras3 = json.loads((runs["keras3"] / "info.json").read_text())
    legacy = json.loads((runs["legacy"] / "info.json").read_text())
    assert not keras3["using_legacy_keras"] and keras3["keras_module"] == "keras"
    assert keras3["keras_version"].startswith("3.")
    assert legacy["using_legacy_keras"] and legacy["keras_module"].startswith("tf_keras")
    assert legacy["keras_version"].startswith("2.")
    # tf.keras is tf_keras there too, so tfcompress layers mix with tensorflow-recommenders layers.
    assert legacy["tf_keras_layer_module"].startswith("tf_keras")
    assert not keras3["tf_keras_layer_module"].startswith("tf_keras")


@pytest.mark.parametrize("name", CASES)
def test_same_constructor_gives_the_same_config(runs, name):
    keras3 = json.loads((runs["keras3"] / f"{name}.json").read_text())
    legacy = json.loads((runs["legacy"] / f"{name}.json").read_text())
    assert legacy == keras3


@pytest.mark.parametrize("name", CASES)
def test_same_weights_give_the_same_outputs_and_gradients(runs, name):
    keras3, legacy = load(runs, "keras3", name), load(runs, "legacy", name)
    weights = sorted(key for key in keras3 if key.startswith("init_"))
    assert weights, "the layer has no weights"
    for key in weights:  # the legacy run loaded these; equal shapes mean the same weight layout
        np.testing.assert_array_equal(legacy[key], keras3[key])
    for run in (keras3, legacy):
        np.testing.assert_array_equal(run["graph_output"], run["output"])
    np.testing.assert_allclose(legacy["output"], keras3["output"], rtol=1e-6, atol=1e-7)
    gradients = sorted(key for key in keras3 if key.startswith("gradient_"))
    assert gradients and sorted(key for key in legacy if key.startswith("gradient_")) == gradients
    for key in gradients:
        np.testing.assert_allclose(legacy[key], keras3[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", CASES)
def test_same_training_steps_give_the_same_weights(runs, name):
    keras3, legacy = load(runs, "keras3", name), load(runs, "legacy", name)
    trained = sorted(key for key in keras3 if key.startswith("trained_") and key != "trained_output")
    moved = 0
    for key in trained:
        # Same Adagrad formula in both stacks; the tolerance is for float32 rounding in differently fused ops.
        np.testing.assert_allclose(legacy[key], keras3[key], rtol=1e-5, atol=1e-6, err_msg=key)
        moved += not np.array_equal(keras3[key], keras3[key.replace("trained_", "init_")])
    assert moved > 0, "training moved no weight: the comparison would be vacuous"
    np.testing.assert_allclose(legacy["trained_output"], keras3["trained_output"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FOLDABLE_CASES)
def test_folding_gives_the_same_outputs_in_both_stacks(runs, name):
    for mode in ("keras3", "legacy"):
        run = load(runs, mode, name)
        np.testing.assert_allclose(run["folded_output"], run["trained_output"], rtol=1e-5, atol=1e-6, err_msg=mode)
    np.testing.assert_allclose(load(runs, "legacy", name)["folded_output"],
                               load(runs, "keras3", name)["folded_output"], rtol=1e-5, atol=1e-6)


def test_folding_a_functional_model_works_in_both_stacks(runs):
    keras3, legacy = load(runs, "keras3", "fold_model"), load(runs, "legacy", "fold_model")
    for mode, run in (("keras3", keras3), ("legacy", legacy)):
        assert "MLETEmbedding" not in list(run["folded_layer_classes"]), mode
        assert "HashingTrickEmbedding" in list(run["folded_layer_classes"]), mode
        np.testing.assert_allclose(run["folded_output"], run["output"], rtol=1e-5, atol=1e-6, err_msg=mode)
    np.testing.assert_allclose(legacy["output"], keras3["output"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["keras3", "legacy"])
def test_tables_of_one_layer_start_from_different_draws(runs, mode):
    identical = json.loads((runs[mode] / "initial_tables.json").read_text())
    assert not any(identical.values()), identical


def test_layer_and_plan_tests_pass_under_legacy_keras():
    args = ["-m", "pytest", *LEGACY_SUITE, "-q", "-p", "no:cacheprovider", "-k", LEGACY_DESELECT]
    done = run_child(args, legacy=True, timeout=600)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, f"legacy tf.keras run failed: {summary}\n{done.stdout[-8000:]}\n{done.stderr[-2000:]}"
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


if __name__ == "__main__":
    worker_main(*sys.argv[1:])
