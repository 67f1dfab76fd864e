"""The fused ROBE-Z custom ops (custom_ops/, loaded by tfcompress.fused_ops) against independent references.

References: tfcompress.robe_hash.robe_indices / robe_signs (NumPy), np.add.at in float64 for scatters, and the
pure-TF layer path (use_custom_op=False). The library is built on first use if `make`/build.py has not built it;
a machine where it cannot load fails here (with the reason) rather than skipping.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tfcompress import fused_ops, robe_hash
from tfcompress._keras import keras
from tfcompress.layers.robe import RobeEmbedding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def lib():
    library = fused_ops.load_library()
    assert library is not None, f"custom ops did not load: {fused_ops.unavailable_reason()}"
    return library


def attrs(cards, output_dim, chunk_size, seed=robe_hash.DEFAULT_SEED, signed=False):
    return dict(cardinalities=list(cards), output_dim=output_dim, chunk_size=chunk_size,
                hash_constants=fused_ops.hash_constant_attr(seed), signed=signed)


def random_ids(rng, cards, batch):
    return np.stack([rng.integers(0, c, batch) for c in cards], axis=1).astype(np.int64)


class Scatter(np.ndarray):
    """A float64 reference scatter that also carries, per element, the sum of |terms| (`magnitude`)."""


def reference_scatter(grad, ids, cards, output_dim, chunk_size, memory_size, seed, signed):
    """float64 np.add.at of sign * grad at the NumPy positions (with the sum of |terms| as .magnitude)."""
    positions = robe_hash.robe_indices(ids, cards, output_dim, chunk_size, memory_size, seed).ravel()
    signs = robe_hash.robe_signs(ids, cards, output_dim, seed) if signed else 1.0
    terms = (np.asarray(grad, np.float64) * signs).ravel()
    out = np.zeros(memory_size, np.float64)
    np.add.at(out, positions, terms)
    magnitude = np.zeros(memory_size, np.float64)
    np.add.at(magnitude, positions, np.abs(terms))
    out = out.view(Scatter)
    out.magnitude = magnitude
    return out


def assert_relative_close(actual, expected, rtol=1e-6):
    """max |actual - expected| <= rtol * scale. The scale is the largest sum of |terms| when `expected` carries it
    (a float32 sum of n terms is only accurate relative to that), else the largest |expected|."""
    scale_source = getattr(expected, "magnitude", expected)
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(np.asarray(scale_source)).max(initial=0.0), 1e-30)
    assert np.abs(actual - expected).max(initial=0.0) <= rtol * scale


# ---------------------------------------------------------------------------------------------------------------
# Indices and forward values


def test_positions_bit_identical_to_robe_indices_for_every_chunk_size(lib):
    rng = np.random.default_rng(0)
    cards = [3, 1000, 2**32 + 5, 2**33]  # offsets past 2^33: a stays < 2^35, ids up to the top of 2^32
    for output_dim in (1, 2, 5, 8, 13, 16):
        for chunk_size in range(1, output_dim + 1):  # every Z from 1 to D, D a multiple of Z or not
            seed = int(rng.integers(0, 2**31))
            memory_size = int(rng.integers(chunk_size, 10**6))
            ids = random_ids(rng, cards, 8)
            ids[0] = [c - 1 for c in cards]  # the largest id of every table
            positions, signs = lib.robe_positions(ids, memory_size, **attrs(cards, output_dim, chunk_size, seed, True))
            np.testing.assert_array_equal(
                positions.numpy(), robe_hash.robe_indices(ids, cards, output_dim, chunk_size, memory_size, seed))
            np.testing.assert_array_equal(signs.numpy(), robe_hash.robe_signs(ids, cards, output_dim, seed))


@pytest.mark.parametrize("memory_size", [1, 7, 2**31 - 1, 2**31 + 11, 2**32 + 1, 2**40 + 3])
def test_positions_bit_identical_across_modulus_ranges(lib, memory_size):
    # |M| - Z + 1 below and above 2^32 takes the two branches of the kernels' fast modulo.
    rng = np.random.default_rng(memory_size % 1000)
    cards = [2**32 - 1, 17]
    chunk_size = 1
    ids = random_ids(rng, cards, 64)
    ids[:3, 0] = [0, 2**32 - 2, 2**31]
    for seed in (1024, 1, 99991):
        positions, _ = lib.robe_positions(ids, memory_size, **attrs(cards, 4, chunk_size, seed))
        np.testing.assert_array_equal(positions.numpy(), robe_hash.robe_indices(ids, cards, 4, chunk_size, memory_size,
                                                                              seed))


@pytest.mark.parametrize("signed", [False, True])
def test_forward_equals_numpy_gather_exactly(lib, signed):
    rng = np.random.default_rng(1)
    cards = [10, 777, 2**32 + 9]
    for output_dim, chunk_size, memory_size in [(16, 16, 4096), (16, 4, 100), (10, 3, 50), (7, 1, 8), (33, 32, 32),
                                                (64, 64, 10**5), (12, 5, 12)]:
        ids = random_ids(rng, cards, 300)
        memory = rng.standard_normal(memory_size).astype(np.float32)
        out = lib.robe_lookup(memory, ids, **attrs(cards, output_dim, chunk_size, 77, signed))
        expected = memory[robe_hash.robe_indices(ids, cards, output_dim, chunk_size, memory_size, 77)]
        if signed:
            expected = expected * robe_hash.robe_signs(ids, cards, output_dim, 77)
        np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize("output_dim, chunk_size", [(16, 16), (16, 4), (16, 2), (16, 1), (12, 4)])
def test_large_outputs_equal_numpy_gather_exactly(lib, output_dim, chunk_size):
    """Outputs of >= 8 MiB take the kernel's streaming-store path (unsigned, D % 4 == 0); check it value for value."""
    rng = np.random.default_rng(chunk_size)
    cards = [1000, 2**20, 7, 50000, 3, 10**6, 123, 9, 2**31]
    ids = random_ids(rng, cards, 40000)  # 40000 x 9 x 16 floats = 22 MiB
    memory = rng.standard_normal(4099).astype(np.float32)
    out = lib.robe_lookup(memory, ids, **attrs(cards, output_dim, chunk_size))
    expected = memory[robe_hash.robe_indices(ids, cards, output_dim, chunk_size, 4099)]
    np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 16])
def test_layer_forward_custom_op_equals_pure_tf_path(lib, signed, chunk_size):
    cards = [1460, 583, 10131227, 24]
    rng = np.random.default_rng(chunk_size)
    ids = random_ids(rng, cards, 200)
    outputs = []
    for use_custom_op in (True, False):
        layer = RobeEmbedding(cards, 16, compression=500.0, chunk_size=chunk_size, signed=signed, seed=31,
                              use_custom_op=use_custom_op)
        layer.build((None, len(cards)))
        layer.memory.assign(np.random.default_rng(7).standard_normal(layer.memory_size).astype(np.float32))
        outputs.append(layer(ids).numpy())
        outputs.append(tf.function(layer)(tf.constant(ids)).numpy())
    for other in outputs[1:]:
        np.testing.assert_array_equal(outputs[0], other)


def test_float16_memory_is_computed_in_float32_and_cast_back(lib):
    memory = np.linspace(-1, 1, 40).astype(np.float16)
    ids = np.array([[1, 2], [0, 4]])
    out = fused_ops.robe_lookup(tf.constant(memory), ids, [3, 5], 4, 2, seed=5)
    assert out.dtype == tf.float16
    np.testing.assert_array_equal(out.numpy(), memory[robe_hash.robe_indices(ids, [3, 5], 4, 2, 40, 5)])


# ---------------------------------------------------------------------------------------------------------------
# Gradients


SCATTER_ALGORITHMS = ["auto", "serial", "partial_sums", "destination_ranges"]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("memory_size", [40, 3000, 2_000_003])  # auto: serial-sized, partial sums, destination ranges
def test_dense_scatter_matches_float64_reference_for_every_algorithm(lib, signed, memory_size):
    rng = np.random.default_rng(memory_size)
    cards = [50, 10**6, 3]
    output_dim, chunk_size = 12, 5
    ids = random_ids(rng, cards, 3000)  # 108k elements: enough for two shards on a 2-thread pool
    grad = rng.standard_normal((3000, 3, output_dim)).astype(np.float32)
    expected = reference_scatter(grad, ids, cards, output_dim, chunk_size, memory_size, 9, signed)
    results = {}
    for algorithm in SCATTER_ALGORITHMS:
        out = lib.robe_lookup_grad(grad, ids, memory_size, scatter_algorithm=algorithm,
                                   **attrs(cards, output_dim, chunk_size, 9, signed)).numpy()
        assert_relative_close(out, expected)
        results[algorithm] = out
    # Destination ranges add each element's terms in the serial order: equal bit for bit, whatever the threads.
    np.testing.assert_array_equal(results["destination_ranges"], results["serial"])


def test_dense_scatter_is_deterministic_and_the_adjoint_of_the_lookup(lib):
    rng = np.random.default_rng(5)
    cards = [100, 9000]
    a = attrs(cards, 16, 4, 3, True)
    ids = random_ids(rng, cards, 5000)
    grad = rng.standard_normal((5000, 2, 16)).astype(np.float32)
    memory = rng.standard_normal(700).astype(np.float32)
    for algorithm in SCATTER_ALGORITHMS:
        first = lib.robe_lookup_grad(grad, ids, 700, scatter_algorithm=algorithm, **a).numpy()
        for _ in range(3):
            np.testing.assert_array_equal(lib.robe_lookup_grad(grad, ids, 700, scatter_algorithm=algorithm,
                                                               **a).numpy(), first)
        # <lookup(m), g> == <m, scatter(g)>: the scatter is the transpose of the gather.
        lhs = np.vdot(lib.robe_lookup(memory, ids, **a).numpy().astype(np.float64), grad.astype(np.float64))
        rhs = np.vdot(memory.astype(np.float64), first.astype(np.float64))
        assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("memory_size", [16, 5000, 10**7])
def test_sparse_gradient_is_coalesced_sorted_and_equal_to_the_dense_one(lib, signed, memory_size):
    rng = np.random.default_rng(memory_size + signed)
    cards = [30, 400, 10**8]
    output_dim, chunk_size = 10, 4  # a partial last chunk of 2
    ids = random_ids(rng, cards, 4000)
    grad = rng.standard_normal((4000, 3, output_dim)).astype(np.float32)
    indices, values = lib.robe_lookup_sparse_grad(grad, ids, memory_size,
                                                  **attrs(cards, output_dim, chunk_size, 4, signed))
    positions = robe_hash.robe_indices(ids, cards, output_dim, chunk_size, memory_size, 4)
    np.testing.assert_array_equal(indices.numpy(), np.unique(positions))  # sorted, unique, every touched element
    expected = reference_scatter(grad, ids, cards, output_dim, chunk_size, memory_size, 4, signed)
    assert_relative_close(values.numpy(), expected[indices.numpy()], rtol=1e-6 * expected.magnitude.max()
                          / max(np.abs(expected).max(), 1e-30))


def test_gradient_of_the_scatter_is_the_lookup(lib):
    # Second derivatives: RobeLookupGrad's registered gradient must be its adjoint, the lookup.
    rng = np.random.default_rng(8)
    cards, a = [20, 30], attrs([20, 30], 6, 3, 2, True)
    ids = random_ids(rng, cards, 50)
    grad = tf.constant(rng.standard_normal((50, 2, 6)).astype(np.float32))
    weights = tf.constant(rng.standard_normal(90).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(grad)
        loss = tf.reduce_sum(lib.robe_lookup_grad(grad, ids, 90, **a) * weights)
    np.testing.assert_allclose(tape.gradient(loss, grad).numpy(), lib.robe_lookup(weights, ids, **a).numpy(),
                               rtol=1e-6)


def layer_gradient(layer, ids, upstream, compiled):
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids) * upstream)
        return tape.gradient(loss, layer.trainable_variables)[0]

    grad = tf.function(step)() if compiled else step()
    return grad, tf.convert_to_tensor(grad).numpy()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("gradient", ["dense", "sparse"])
def test_layer_gradient_custom_op_equals_pure_tf(lib, gradient, signed, compiled):
    cards = [13, 5000, 70000]
    rng = np.random.default_rng(3)
    ids = random_ids(rng, cards, 512)
    upstream = rng.standard_normal((512, 3, 16)).astype(np.float32)
    grads = {}
    for use_custom_op in (True, False):
        layer = RobeEmbedding(cards, 16, memory_size=3001, chunk_size=5, signed=signed, gradient=gradient,
                              use_custom_op=use_custom_op, embeddings_initializer=keras.initializers.Constant(0.5))
        raw, grads[use_custom_op] = layer_gradient(layer, ids, upstream, compiled)
        assert isinstance(raw, tf.IndexedSlices) == (gradient == "sparse")
    expected = reference_scatter(upstream, ids, cards, 16, 5, 3001, robe_hash.DEFAULT_SEED, signed)
    assert_relative_close(grads[True], expected)
    assert_relative_close(grads[True], grads[False])


def test_empty_batch(lib):
    cards, a = [5, 6], attrs([5, 6], 8, 3, 1, True)
    ids = np.zeros((0, 2), np.int64)
    memory = np.ones(20, np.float32)
    assert lib.robe_lookup(memory, ids, **a).shape == (0, 2, 8)
    grad = np.zeros((0, 2, 8), np.float32)
    for algorithm in SCATTER_ALGORITHMS:
        np.testing.assert_array_equal(lib.robe_lookup_grad(grad, ids, 20, scatter_algorithm=algorithm, **a).numpy(),
                                      np.zeros(20, np.float32))
    indices, values = lib.robe_lookup_sparse_grad(grad, ids, 20, **a)
    assert indices.shape == (0,) and values.shape == (0,)
    for gradient in ("dense", "sparse"):
        layer = RobeEmbedding(cards, 8, memory_size=20, chunk_size=3, gradient=gradient, use_custom_op=True)
        _, dense = layer_gradient(layer, ids, np.zeros((0, 2, 8), np.float32), compiled=False)
        np.testing.assert_array_equal(dense, np.zeros(20, np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("op", ["lookup", "resource_lookup", "grad", "sparse_grad", "positions"])
@pytest.mark.parametrize("bad, value", [(-1, "-1"), (6, "6"), (2**62, str(2**62))])
def test_out_of_range_ids_raise_naming_feature_and_value(lib, op, bad, value):
    cards, a = [4, 6, 8], attrs([4, 6, 8], 4, 2)
    ids = np.array([[0, 1, 2], [3, bad, 7]], np.int64)
    grad = np.zeros((2, 3, 4), np.float32)
    calls = {
        "lookup": lambda: lib.robe_lookup(np.zeros(10, np.float32), ids, **a),
        "resource_lookup": lambda: lib.robe_resource_lookup(tf.Variable(np.zeros(10, np.float32)).handle, ids, **a),
        "grad": lambda: lib.robe_lookup_grad(grad, ids, 10, **a),
        "sparse_grad": lambda: lib.robe_lookup_sparse_grad(grad, ids, 10, **a),
        "positions": lambda: lib.robe_positions(ids, 10, **a),
    }
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"feature 1, value {value} \(row 1\), allowed \[0, 6\)"):
        calls[op]()


def test_shape_and_argument_errors_are_invalid_argument(lib):
    a = attrs([4, 6], 4, 2)
    ids = np.array([[0, 1]], np.int64)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="at least one chunk"):
        lib.robe_lookup(np.zeros(1, np.float32), ids, **a)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="shape"):
        lib.robe_lookup(np.zeros(10, np.float32), np.zeros((1, 3), np.int64), **a)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="chunk_size"):
        lib.robe_lookup(np.zeros(10, np.float32), ids, **{**a, "chunk_size": 5})
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="hash_constants"):
        lib.robe_lookup(np.zeros(10, np.float32), ids, **{**a, "hash_constants": [1, 2, 3, 4, 5, robe_hash.P]})
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="memory_size"):
        lib.robe_lookup_grad(np.zeros((1, 2, 4), np.float32), ids, 1, **a)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="grad must have shape|Dimensions"):
        lib.robe_lookup_grad(np.zeros((1, 2, 5), np.float32), ids, 10, **a)


def test_layer_errors_and_mod_rule_with_the_op(lib):
    layer = RobeEmbedding([10, 20], 4, memory_size=50, chunk_size=2, use_custom_op=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"feature 1, value 20"):
        layer(np.array([[3, 20]]))
    folded = RobeEmbedding([10, 20], 4, memory_size=50, chunk_size=2, out_of_range="mod", use_custom_op=True)
    np.testing.assert_array_equal(folded(np.array([[13, -1]])).numpy(), folded(np.array([[3, 19]])).numpy())


# ---------------------------------------------------------------------------------------------------------------
# Layer integration: config, export scope, Keras training, fallback, distribution


def test_use_custom_op_round_trips_get_config_and_is_validated():
    for value in ("auto", True, False):
        layer = RobeEmbedding([10], 4, memory_size=20, use_custom_op=value)
        restored = RobeEmbedding.from_config(layer.get_config()).use_custom_op
        assert restored == value and type(restored) is type(value)
        assert json.loads(json.dumps(layer.get_config()))["use_custom_op"] == value
    with pytest.raises(ValueError, match="use_custom_op"):
        RobeEmbedding([10], 4, memory_size=20, use_custom_op="yes")


def graph_op_types(layer, ids):
    concrete = tf.function(layer).get_concrete_function(tf.TensorSpec([None, ids.shape[1]], tf.int64))
    return {op.type for op in concrete.graph.get_operations()}


def test_serving_lookup_and_pure_tf_path_trace_stock_ops_only(lib):
    layer = RobeEmbedding([10, 20], 4, memory_size=50, chunk_size=2, use_custom_op=True)
    ids = np.array([[1, 2]])
    assert "RobeResourceLookup" in graph_op_types(layer, ids)
    with_op = layer(ids).numpy()
    pure = RobeEmbedding([10, 20], 4, memory_size=50, chunk_size=2, use_custom_op=False)
    pure(ids)
    pure.set_weights(layer.get_weights())
    for stock in (pure, layer.serving_lookup):  # what exports trace: serving_lookup, whatever use_custom_op says
        types = graph_op_types(stock, ids)
        assert not any(t.startswith("Robe") for t in types)
        np.testing.assert_array_equal(tf.function(stock)(ids).numpy(), with_op)


def make_model(cards, gradient, use_custom_op, signed=False):
    ids = keras.Input(shape=(len(cards),), dtype="int64")
    embedded = RobeEmbedding(cards, 8, memory_size=997, chunk_size=4, signed=signed, gradient=gradient,
                             use_custom_op=use_custom_op)(ids)
    out = keras.layers.Dense(1)(keras.layers.Flatten()(embedded))
    return keras.Model(ids, out)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_model_fit_trains_and_dense_sparse_custom_pure_agree(lib, optimizer):
    cards = [40, 3000, 7]
    rng = np.random.default_rng(11)
    x = random_ids(rng, cards, 256)
    y = (x[:, 0] % 2).astype(np.float32)[:, None]
    reference = make_model(cards, "dense", True)
    initial = [w.copy() for w in reference.get_weights()]
    trained = {}
    for gradient in ("dense", "sparse"):
        for use_custom_op in (True, False):
            model = make_model(cards, gradient, use_custom_op)
            model.set_weights(initial)
            model.compile(optimizer=keras.optimizers.get({"class_name": optimizer,
                                                          "config": {"learning_rate": 0.05}}), loss="mse")
            history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
            assert history.history["loss"][-1] < history.history["loss"][0]
            trained[gradient, use_custom_op] = model.get_weights()
    base = trained["dense", True]
    assert not np.allclose(base[0], initial[0])  # the array itself trained
    for key, weights in trained.items():
        for got, want in zip(weights, base):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=str(key))


def run_python(code, env=None, timeout=300):
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


LAYER_RUN = """
    import warnings
    import numpy as np, tensorflow as tf
    from tfcompress import fused_ops
    from tfcompress._keras import keras
    from tfcompress.layers.robe import RobeEmbedding
    cards = [40, 3000, 7]
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, c, 128) for c in cards], axis=1)
    upstream = rng.standard_normal((128, 3, 8)).astype(np.float32)
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for gradient in ("dense", "sparse"):
            layer = RobeEmbedding(cards, 8, memory_size=501, chunk_size=3, signed=True, gradient=gradient,
                                  embeddings_initializer=keras.initializers.RandomNormal(seed=4))
            with tf.GradientTape() as tape:
                y = layer(ids)
                loss = tf.reduce_sum(y * upstream)
            out[gradient + "_y"] = y.numpy()
            out[gradient + "_g"] = tf.convert_to_tensor(tape.gradient(loss, layer.trainable_variables)[0]).numpy()
            out[gradient + "_memory"] = layer.memory.numpy()
    out["warnings"] = np.array([str(w.message) for w in caught if "custom ops" in str(w.message)])
    out["available"] = np.array(fused_ops.is_available())
    try:
        RobeEmbedding(cards, 8, memory_size=501, use_custom_op=True)
        out["strict_error"] = np.array("")
    except fused_ops.CustomOpUnavailableError as error:
        out["strict_error"] = np.array(str(error))
    np.savez(OUT, **out)
"""


def test_fallback_when_the_library_is_missing_gives_identical_results(lib, tmp_path):
    runs = {}
    for name, env in (("op", {}), ("fallback", {fused_ops.LIBRARY_ENV: str(tmp_path / "missing.so")})):
        path = tmp_path / f"{name}.npz"
        result = run_python(f"OUT = {str(path)!r}\n" + textwrap.dedent(LAYER_RUN), env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = np.load(path)
    op, fallback = runs["op"], runs["fallback"]
    assert bool(op["available"]) and not bool(fallback["available"])
    assert len(op["warnings"]) == 0
    assert len(fallback["warnings"]) == 1 and "missing.so does not exist" in str(fallback["warnings"][0])
    assert "cannot be loaded" in str(fallback["strict_error"]) and str(op["strict_error"]) == ""
    for gradient in ("dense", "sparse"):
        np.testing.assert_array_equal(op[gradient + "_memory"], fallback[gradient + "_memory"])
        np.testing.assert_array_equal(op[gradient + "_y"], fallback[gradient + "_y"])
        assert_relative_close(op[gradient + "_g"], fallback[gradient + "_g"])


MIRRORED_RUN = """
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tfcompress._keras import keras
    from tfcompress.layers.robe import RobeEmbedding
    cards = [40, 3000, 7]
    rng = np.random.default_rng(0)
    x = np.stack([rng.integers(0, c, 256) for c in cards], axis=1)
    y = (x[:, 1] % 3).astype(np.float32)[:, None]

    def build(gradient, use_custom_op):
        ids = keras.Input(shape=(3,), dtype="int64")
        layer = RobeEmbedding(cards, 8, memory_size=997, chunk_size=4, gradient=gradient, use_custom_op=use_custom_op)
        out = keras.layers.Dense(1)(keras.layers.Flatten()(layer(ids)))
        model = keras.Model(ids, out)
        # SGD: linear in the gradient, so all-reduced IndexedSlices (duplicates across replicas) update exactly.
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        return model

    out = {}
    # One strategy for every model: collectives of two MirroredStrategy objects in one process can collide.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    initial = None
    for gradient, use_custom_op, distributed in [("dense", True, True), ("dense", True, False),
                                                 ("sparse", True, True), ("sparse", True, False),
                                                 ("sparse", False, True)]:
        if distributed:
            with strategy.scope():
                model = build(gradient, use_custom_op)
        else:
            model = build(gradient, use_custom_op)
        initial = model.get_weights() if initial is None else initial
        model.set_weights(initial)
        model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
        out[f"{gradient}_{use_custom_op}_{distributed}"] = model.get_weights()[0]
    out["initial"] = initial[0]
    out["replicas"] = np.array(strategy.num_replicas_in_sync)
    np.savez(OUT, **out)
"""


def test_mirrored_strategy_on_two_logical_cpus(lib, tmp_path):
    path = tmp_path / "mirrored.npz"
    result = run_python(f"OUT = {str(path)!r}\n" + textwrap.dedent(MIRRORED_RUN))
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(path)
    assert int(out["replicas"]) == 2
    for gradient in ("dense", "sparse"):
        mirrored = out[f"{gradient}_True_True"]
        assert not np.allclose(mirrored, out["initial"])
        # Two replicas of half a batch each, gradients all-reduced: the same training as one device.
        np.testing.assert_allclose(mirrored, out[f"{gradient}_True_False"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["sparse_True_True"], out["sparse_False_True"], rtol=1e-5, atol=1e-7)


def test_library_name_tracks_tensorflow_version_and_sources():
    builder = fused_ops._load_builder()
    name = builder.library_name()
    assert name.startswith(f"_robe_ops-tf{tf.__version__}-") and name.endswith(".so")
    assert builder.library_name(tf_version="0.0.1") != name
    assert builder.library_name(digest="0" * 16) != name
    assert (fused_ops.PACKAGE_DIR / name).is_file() or fused_ops.unavailable_reason() is not None
