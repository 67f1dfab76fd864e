"""Serving export: SavedModels that load without tfcompress, models.config, tf.Example/PredictRequest, ONNX.

The fresh-process checks are batched: the module fixture exports every model once and runs ONE checker
subprocess over all of them (a TensorFlow import costs seconds); the tests then read its per-model report.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import model_pb2, predict_pb2
from tensorflow_serving.config import model_server_config_pb2

from tfcompress import fused_ops, lookup
from tfcompress._keras import keras
from tfcompress.data.schema import Schema
from tfcompress.data.synthetic import CRITEO_KAGGLE_CARDINALITIES
from tfcompress.export import raw_features, saved_model, serving_config, signatures
from tfcompress.export.onnx import DEFAULT_ONNX_OPSET
from tfcompress.export.saved_model import export_saved_model
from tfcompress.export.serving_model import ServingModel
from tfcompress.export.verify import STANDALONE_SCRIPT, verify
from tfcompress.layers import (FullEmbedding, HashingTrickEmbedding, MLETEmbedding, PlannedEmbedding, QREmbedding,
                               QuantizedEmbedding, RobeEmbedding)
from tfcompress.layers import base as layers_base
from tfcompress.layers.base import nested_layers
from tfcompress.models import build_dcn, build_dlrm
from tfcompress.plan import make_plan
from tfcompress.model_rewrite import quantize_model

MIXED_CARDS = [100, 20, 7, 300, 50, 1000, 33, 12]
AVAZU_LIKE_CARDS = [500, 40, 9, 1200]
N_DENSE = 3
FAKE_OP = "TfcompressNotAStockOp"
USER_ENTRY = """# a model someone else serves from the same base
model_config_list {
  config {
    name: 'other'
    base_path: "/srv/models/other"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 7 versions: 9 } }
  }
}
"""


def mixed_embedding():
    """One PlannedEmbedding holding every embedding layer type the package has (MLET is folded at export)."""
    groups = [
        {"features": [0, 1, 2], "layer": RobeEmbedding([100, 20, 7], 8, compression=4.0, chunk_size=4, signed=True,
                                                                 name="robe")},
        {"features": [3], "layer": FullEmbedding([300], 8, name="full")},
        {"features": [4], "layer": HashingTrickEmbedding([50], 8, num_buckets=13, name="hashed")},
        {"features": [5], "layer": QREmbedding([1000], 8, num_buckets=40, name="qr")},
        {"features": [6, 7], "layer": MLETEmbedding([33, 12], 8, inner_dim=16, name="mlet")},
    ]
    return PlannedEmbedding(len(MIXED_CARDS), 8, groups)


def rows(cards, n, n_dense, seed):
    rng = np.random.default_rng(seed)
    return {"dense": rng.normal(size=(n, n_dense)).astype(np.float32),
            "sparse": np.stack([rng.integers(0, c, n) for c in cards], axis=1).astype(np.int64)}


def keras_probability(model, inputs):
    return np.asarray(model({k: tf.constant(v) for k, v in inputs.items()}, training=False))


def signature_probability(loaded, inputs, name=signatures.TENSOR_SIGNATURE):
    fn = loaded.signatures[name]
    return fn(dense=tf.constant(inputs["dense"]), sparse=tf.constant(inputs["sparse"]))["probability"].numpy()


def unknown_op_copy(source, target):
    """A copy of an export whose graph references an op no TensorFlow registers (as a custom op would)."""
    shutil.copytree(source, target)
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(target, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    renamed = 0
    for function in proto.meta_graphs[0].graph_def.library.function:
        for node in function.node_def:
            if node.op == "FloorMod" and renamed == 0:
                node.op = FAKE_OP
                renamed += 1
    assert renamed == 1
    with open(os.path.join(target, "saved_model.pb"), "wb") as f:
        f.write(proto.SerializeToString())
    return target


def custom_op_saved_model(target):
    """A SavedModel whose graph calls the real ROBE custom op (only when its library loads here)."""
    memory = tf.Variable(tf.random.uniform([64]))

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.int64, name="sparse")])
    def lookup(sparse):
        return {"probability": tf.reduce_sum(fused_ops.robe_lookup(memory, sparse, [10, 5], 4, 2), axis=[1, 2])}

    module = tf.Module()
    module.memory = memory
    tf.saved_model.save(module, target, signatures={"serving_default": lookup.get_concrete_function()})
    return target


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("saved_models"))
    with open(os.path.join(base, serving_config.MODELS_CONFIG_FILE), "w") as f:
        f.write(USER_ENTRY)
    keras.utils.set_random_seed(7)
    mixed = build_dlrm((N_DENSE, len(MIXED_CARDS)), mixed_embedding(), (16,), (16,), name="mixed")
    plan_layer = make_plan(AVAZU_LIKE_CARDS, 8, "robe", ratio=10, chunk_size=4).build_layer()
    avazu = build_dcn((0, len(AVAZU_LIKE_CARDS)), plan_layer, cross_layers=2, deep_layers=(16,), name="avazu")
    int8_keras = quantize_model(mixed)  # QuantizedEmbedding members: int8 already in Keras

    paths = {
        "float": export_saved_model(mixed, base_dir=base, name="mixed", onnx=True),
        "int8": export_saved_model(mixed, base_dir=base, name="mixed", quantize="int8"),
        "fp16": export_saved_model(mixed, base_dir=base, name="mixed", quantize="fp16",
                                          serving_out_of_range="as_trained"),
        "avazu": export_saved_model(avazu, base_dir=base, onnx=True),
        "int8_keras": export_saved_model(int8_keras, base_dir=base, name="mixed_int8_keras"),
    }
    bad = str(tmp_path_factory.mktemp("bad"))
    paths["unknown_op"] = unknown_op_copy(paths["float"], os.path.join(bad, "unknown_op"))
    if fused_ops.is_available():
        paths["custom_op"] = custom_op_saved_model(os.path.join(bad, "custom_op"))
    result = verify(list(paths.values()), require_serving_api=True, require_onnx=True)
    return {"base": base, "paths": paths, "result": result, "models": {"mixed": mixed, "avazu": avazu,
                                                                       "int8_keras": int8_keras}}


def statuses(exported, key):
    report = exported["result"].report(exported["paths"][key])
    return {name: check["status"] for name, check in report["checks"].items()}


GOOD_EXPORTS = ("float", "int8", "fp16", "avazu", "int8_keras")


@pytest.mark.parametrize("key", GOOD_EXPORTS)
def test_every_export_passes_every_check_in_a_fresh_process(exported, key):
    checks = statuses(exported, key)
    report = exported["result"].report(exported["paths"][key])
    assert all(status == "PASS" for name, status in checks.items() if name not in ("onnx", "raw")), \
        exported["result"].output
    expected = {"isolation", "stock_ops", "load", "signatures", "keras_parity", "serving_parity", "examples",
                "predict_request", "warmup", "bad_ids", "bad_inputs", "onnx", "raw"}
    assert set(checks) == expected
    assert checks["onnx"] == ("PASS" if key in ("float", "avazu") else "SKIP")
    # These exports have no raw-string signature (tests/test_export_raw.py covers the ones that do).
    assert checks["raw"] == "SKIP"
    # The serving graph computes the ROBE hash itself, in stock ops; no custom op, nothing of tfcompress loaded.
    assert report["isolation"] == {"tfcompress_modules": [], "custom_libraries": []}
    assert report["non_stock_ops"] == [] and not any(op.startswith("Robe") for op in report["ops"])
    assert {"FloorMod", "ParseExampleV2"} <= set(report["ops"])
    # The in-graph input checks (tests/test_export_inputs.py): stock ops, seen by the stock-op check.
    assert {"Assert", "EnsureShape", "IgnoreErrorsDataset", "DatasetToSingleElement"} <= set(report["ops"])


def test_checker_fails_on_an_op_stock_tensorflow_does_not_have(exported):
    report = exported["result"].report(exported["paths"]["unknown_op"])
    assert report["ok"] is False and exported["result"].ok is False
    assert report["checks"]["stock_ops"]["status"] == "FAIL"
    assert report["non_stock_ops"] == [FAKE_OP]
    assert FAKE_OP in report["checks"]["stock_ops"]["message"]
    assert report["checks"]["load"]["status"] == "FAIL"
    if "custom_op" in exported["paths"]:  # the real fused op, saved by a process that had its library loaded
        report = exported["result"].report(exported["paths"]["custom_op"])
        assert report["checks"]["stock_ops"]["status"] == "FAIL"
        assert report["non_stock_ops"] and all(op.startswith("Robe") for op in report["non_stock_ops"])


def test_checker_fails_when_tfcompress_is_imported(tmp_path):
    """The isolation check itself can fail: run the checker in a process that imported tfcompress first."""
    code = ("import sys, runpy, tfcompress; sys.argv = [sys.argv[1], sys.argv[2], '--json', sys.argv[3]]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    out = tmp_path / "report.json"
    completed = subprocess.run([sys.executable, "-c", code, str(STANDALONE_SCRIPT), str(tmp_path / "none"),
                                str(out)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1, completed.stdout + completed.stderr
    report = json.loads(out.read_text())[0]
    assert report["checks"]["isolation"]["status"] == "FAIL"
    assert "tfcompress" in report["isolation"]["tfcompress_modules"]


def test_saved_model_matches_keras_on_new_rows_and_examples(exported):
    """In this process too, on rows the export never saw: tensors and tf.Example signatures vs Keras."""
    mixed = exported["models"]["mixed"]
    loaded = tf.saved_model.load(exported["paths"]["float"])
    inputs = rows(MIXED_CARDS, 50, N_DENSE, seed=11)
    expected = keras_probability(mixed, inputs)
    np.testing.assert_allclose(signature_probability(loaded, inputs), expected, atol=1e-5)
    records = [signatures.serialize_example(d, s, label=1) for d, s in zip(inputs["dense"], inputs["sparse"])]
    got = loaded.signatures["examples"](examples=tf.constant(records))["probability"].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_predict_request_for_the_example_signature_round_trips(exported):
    avazu = exported["models"]["avazu"]
    loaded = tf.saved_model.load(exported["paths"]["avazu"])
    inputs = rows(AVAZU_LIKE_CARDS, 9, 0, seed=3)
    examples = [tf.train.Example(features=tf.train.Features(feature={
        "sparse": tf.train.Feature(int64_list=tf.train.Int64List(value=list(s))),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
    })).SerializeToString() for s in inputs["sparse"]]
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="avazu", signature_name="examples"))
    request.inputs["examples"].CopyFrom(tf.make_tensor_proto(examples, dtype=tf.string))
    received = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    tensor = tf.make_ndarray(received.inputs["examples"])
    got = loaded.signatures[received.model_spec.signature_name](examples=tf.constant(tensor))["probability"]
    np.testing.assert_allclose(got.numpy(), keras_probability(avazu, inputs), atol=1e-5)


def test_out_of_range_ids_fold_by_default_and_raise_as_trained(exported):
    mixed = exported["models"]["mixed"]
    bad = {"dense": np.zeros((4, N_DENSE), np.float32),
           "sparse": np.array([[-1] * 8, MIXED_CARDS, [2**40] * 8, [-(2**33)] * 8], np.int64)}
    folded = {"dense": bad["dense"], "sparse": np.mod(bad["sparse"], np.array(MIXED_CARDS))}
    default = tf.saved_model.load(exported["paths"]["float"])
    np.testing.assert_allclose(signature_probability(default, bad), keras_probability(mixed, folded), atol=1e-5)
    as_trained = tf.saved_model.load(exported["paths"]["fp16"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="id out of range"):
        signature_probability(as_trained, bad)
    assert statuses(exported, "fp16")["bad_ids"] == "PASS"  # the checker saw it raise and then serve again


def test_onnx_export_matches_keras_with_int64_hashing_and_bad_ids(exported):
    import onnxruntime

    avazu = exported["models"]["avazu"]
    metadata = read_metadata(exported["paths"]["avazu"])
    assert metadata["onnx"]["opset"] == DEFAULT_ONNX_OPSET == 18
    session = onnxruntime.InferenceSession(os.path.join(exported["paths"]["avazu"], "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    # The default layout reads ROBE chunks as rows of the saved window matrix (GatherNd) at every batch size.
    for n in (400, 3):
        inputs = rows(AVAZU_LIKE_CARDS, n, 0, seed=5)
        inputs["sparse"][:3] = [[-1, -2, -3, -4], [500, 40, 9, 1200], [2**40, -(2**40), 1, 1]]
        folded = {"dense": inputs["dense"], "sparse": np.mod(inputs["sparse"], np.array(AVAZU_LIKE_CARDS))}
        got = session.run(["probability"], inputs)[0]
        np.testing.assert_allclose(got, keras_probability(avazu, folded), atol=1e-5)


@pytest.mark.parametrize("chunk_size, signed", [(4, False), (3, True), (1, False), (8, False)])
def test_robe_serving_lookup_equals_the_layer_for_small_and_large_batches(tmp_path, chunk_size, signed):
    """The exported ROBE lookup (the default layout: rows of the saved window matrix) equals the layer's at every
    batch size; tests/test_robe_serving.py covers the other layouts."""
    cards = [5000, 3000]
    robe = RobeEmbedding(cards, 8, memory_size=20000, chunk_size=chunk_size, signed=signed)
    model = build_dlrm((2, 2), robe, (8,), (8,))
    loaded = tf.saved_model.load(export_saved_model(model, base_dir=str(tmp_path), name="robe"))
    for n in (1, 7, 12000):  # (per_call would take the element branch for 1 and 7 rows, windows for 12000)
        inputs = rows(cards, n, 2, seed=n)
        np.testing.assert_allclose(signature_probability(loaded, inputs), keras_probability(model, inputs),
                                   atol=1e-6)


def _layer_state(model):
    """What export must not change: per layer its call, id rule, graph nodes and variables; the model's config."""
    layers = [model, *nested_layers(model)]
    return {
        "instance_call": [layer.__dict__.get("call") for layer in layers],
        "call": [type(layer).call for layer in layers],
        "out_of_range": [getattr(layer, "out_of_range", None) for layer in layers],
        "nodes": [(len(layer._inbound_nodes), len(layer._outbound_nodes)) for layer in layers],
        "variables": [id(weight) for weight in model.weights],
        "config": json.dumps(model.get_config(), sort_keys=True, default=str),
    }


def _process_state():
    """Module-level state of the modules export used to switch (custom ops, lookups, id rules)."""
    return {module.__name__: dict(vars(module)) for module in (fused_ops, lookup, layers_base)}


def test_export_leaves_the_users_model_and_the_process_untouched(tmp_path):
    keras.utils.set_random_seed(5)
    model = build_dlrm((N_DENSE, len(MIXED_CARDS)), mixed_embedding(), (16,), (16,), name="untouched")
    inputs = rows(MIXED_CARDS, 20, N_DENSE, seed=2)
    before = keras_probability(model, inputs)
    state, process = _layer_state(model), _process_state()
    weights = [w.copy() for w in model.get_weights()]
    assert "error" in state["out_of_range"]  # the serving rule "mod" differs from the layers' own
    export_saved_model(model, base_dir=str(tmp_path), name="untouched", quantize="int8")
    assert _layer_state(model) == state
    assert _process_state() == process
    for got, expected in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(keras_probability(model, inputs), before)
    with pytest.raises(tf.errors.InvalidArgumentError, match="id out of range"):  # still the trained rule
        keras_probability(model, {"dense": inputs["dense"][:1], "sparse": -np.ones((1, 8), np.int64)})


class _HoldsAnEmbedding(keras.layers.Layer):
    """A subclassed layer that calls an id layer in its own call: export cannot reach it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = FullEmbedding([50, 30], 4)

    def call(self, ids):
        return self.inner(ids)


def test_serving_model_runs_nested_models_with_serving_lookups():
    keras.utils.set_random_seed(9)
    sparse = keras.Input((2,), dtype="int64", name="sparse")
    dense = keras.Input((3,), name="dense")
    inner_ids = keras.Input((2,), dtype="int64")
    inner = keras.Model(inner_ids, keras.layers.Flatten()(
        RobeEmbedding([50, 30], 4, memory_size=40, chunk_size=2)(inner_ids)), name="inner_functional")
    sequential = keras.Sequential([keras.Input((2,), dtype="int64"), FullEmbedding([50, 30], 4),
                                   keras.layers.Flatten(), keras.layers.Dropout(0.5)], name="inner_sequential")
    x = keras.layers.Concatenate()([inner(sparse), sequential(sparse), dense])
    model = keras.Model({"dense": dense, "sparse": sparse}, keras.layers.Dense(1, activation="sigmoid", name="click")(x))
    good = rows([50, 30], 16, 3, seed=4)
    bad = {"dense": good["dense"][:5], "sparse": np.array([[-1, 30], [50, -31], [2**40, 1], [0, 29], [49, 0]])}
    folded = {"dense": bad["dense"], "sparse": np.mod(bad["sparse"], [50, 30])}
    served = ServingModel(model, "mod")
    np.testing.assert_array_equal(np.asarray(served(good)), keras_probability(model, good))
    # Traced, the dense layers may fuse differently (float round-off); the lookups are bit-identical either way.
    np.testing.assert_allclose(np.asarray(tf.function(served)(good)), keras_probability(model, good), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(served(bad)), keras_probability(model, folded))
    with pytest.raises(tf.errors.InvalidArgumentError, match="id out of range"):
        ServingModel(model, "as_trained")(bad)

    holder = keras.Model(sparse, keras.layers.Flatten()(_HoldsAnEmbedding(name="holder")(sparse)))
    with pytest.raises(ValueError, match=r"inside _HoldsAnEmbedding 'holder'.*serving_lookup"):
        ServingModel(holder)


def read_metadata(path):
    with open(os.path.join(path, saved_model.METADATA_DIR, saved_model.METADATA_FILE)) as f:
        return json.load(f)


def test_quantized_exports_store_small_tables_and_stay_within_tolerance(exported):
    sizes = {key: {v["name"]: v for v in read_metadata(exported["paths"][key])["variables"]}
             for key in ("float", "int8", "fp16")}
    float_tables = {n: v for n, v in sizes["float"].items() if v["embedding"]}
    # MLET was folded: the k=16-wide tables and the projections are gone, 8-wide tables remain.
    assert sizes["float"]["mlet/table_0"]["shape"] == [33, 8]
    assert not any("projections" in n for n in sizes["float"])
    for key, dtype, width in (("int8", "int8", 1), ("fp16", "float16", 2)):
        tables = {n: v for n, v in sizes[key].items() if v["embedding"]}
        assert sorted(tables) == sorted(f"{n}/{key}" for n in float_tables)
        for name, row in float_tables.items():
            assert tables[f"{name}/{key}"]["dtype"] == dtype
            assert tables[f"{name}/{key}"]["bytes"] * 4 == row["bytes"] * width
        dense = {n: v for n, v in sizes[key].items() if not v["embedding"]}
        assert dense == {n: v for n, v in sizes["float"].items() if not v["embedding"]}
    metadata = read_metadata(exported["paths"]["int8"])
    assert metadata["keras_tolerance"] == saved_model.KERAS_TOLERANCE["int8"]
    assert 0 < metadata["keras_max_abs_difference"] < metadata["keras_tolerance"]


def test_size_table_counts_the_compressed_state_against_full_tables(exported):
    report = exported["result"].report(exported["paths"]["float"])
    metadata = read_metadata(exported["paths"]["float"])
    by_name = {v["name"]: v for v in report["sizes"]["variables"]}
    # ROBE is exported as its one shared array: |M| = ceil((100 + 20 + 7) * 8 / 4) = 254 floats. The default
    # serving layout "auto" saves no window matrix here: W (251 x 4 floats) would be as large as the full tables
    # (127 x 8), far above the tenth "auto" allows (tests/test_robe_serving.py exports one).
    assert by_name["robe/memory"]["shape"] == [254]
    assert by_name["robe/memory"]["bytes"] == 254 * 4
    assert metadata["window_matrix_bytes"] == 0 and not any("/windows" in name for name in by_name)
    assert report["sizes"]["total_bytes"] == sum(v["bytes"] for v in metadata["variables"])
    dense_bytes = sum(v["bytes"] for v in metadata["variables"] if not v["embedding"])
    assert metadata["uncompressed_bytes"] == dense_bytes + sum(MIXED_CARDS) * 8 * 4


def test_versions_increment_and_models_config_stays_valid(exported):
    base = exported["base"]
    assert saved_model.existing_versions(os.path.join(base, "mixed")) == [1, 2, 3]
    assert exported["paths"]["fp16"] == os.path.join(base, "mixed", "3")
    assert not any(name.startswith(".staging") for name in os.listdir(os.path.join(base, "mixed")))
    with open(os.path.join(base, "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    entries = {c.name: c for c in config.model_config_list.config}
    assert sorted(entries) == ["avazu", "mixed", "mixed_int8_keras", "other"]
    assert list(entries["other"].model_version_policy.specific.versions) == [7, 9]  # kept as the user wrote it
    assert entries["mixed"].base_path == os.path.abspath(os.path.join(base, "mixed"))
    assert all(c.model_platform == "tensorflow" for c in entries.values())
    with pytest.raises(ValueError, match="never overwritten"):
        export_saved_model(exported["models"]["avazu"], base_dir=base, version=1)


CONFIG_SYNTAXES = [
    USER_ENTRY,
    "",
    'model_config_list: { config: { name: "a", base_path: "/m/a", model_platform: "tensorflow" }, '
    "config < name: 'b' base_path: '/m/b' model_platform: 'tensorflow' > }",
    'model_config_list { config { name: "q\\"uote\\\\d" base_path: "/m/x y" model_platform: "tensorflow" '
    "model_version_policy { specific { versions: [1, 2, 3] } } version_labels { key: 'stable' value: 2 }\n"
    "logging_config { sampling_config { sampling_rate: 0.5 } } } }",
]


@pytest.mark.parametrize("text", CONFIG_SYNTAXES)
def test_models_config_update_adds_the_entry_and_keeps_everything_else(tmp_path, text):
    original = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    (tmp_path / "models.config").write_text(text)
    serving_config.update_models_config(str(tmp_path), "new-model", "/srv/new model")
    serving_config.update_models_config(str(tmp_path), "new-model", "/srv/moved")  # updates in place, no duplicate
    updated = text_format.Parse((tmp_path / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    expected = model_server_config_pb2.ModelServerConfig()
    expected.CopyFrom(original)
    entry = expected.model_config_list.config.add()
    entry.name, entry.base_path, entry.model_platform = "new-model", "/srv/moved", "tensorflow"
    assert updated == expected
    assert os.listdir(tmp_path) == ["models.config"]  # written through a temporary file, renamed over it


def test_models_config_update_keeps_the_users_version_policy_labels_and_logging(tmp_path):
    """Re-exporting a model someone configured by hand changes only where it lives."""
    (tmp_path / "models.config").write_text("""
        model_config_list {
          config { name: "first" base_path: "/m/first" model_platform: "tensorflow" }
          config {
            name: "served"
            base_path: "/old/place"
            model_platform: "tensorflow"
            model_version_policy { specific { versions: 3 versions: 4 } }
            version_labels { key: "stable" value: 3 }
            version_labels { key: "canary" value: 4 }
            logging_config { sampling_config { sampling_rate: 0.25 } }
          }
        }
    """)
    path = serving_config.update_models_config(str(tmp_path), "served", "/new/place")
    assert path == str(tmp_path / "models.config")
    config = text_format.Parse((tmp_path / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    entries = config.model_config_list.config
    assert [entry.name for entry in entries] == ["first", "served"]
    served = entries[1]
    assert served.base_path == "/new/place" and served.model_platform == "tensorflow"
    assert list(served.model_version_policy.specific.versions) == [3, 4]
    assert dict(served.version_labels) == {"stable": 3, "canary": 4}
    assert served.logging_config.sampling_config.sampling_rate == 0.25
    assert entries[0].base_path == "/m/first"


@pytest.mark.parametrize("text, message", [
    ("model_config_list { config { name: 'a' }", r"1:40"),                  # never closed
    ("model_config_list { config { name 'a' } }", r"1:35"),                 # no ':' before a scalar
    ("model_config_list {\n  config { name: 'a' } }\n}", r"3:1"),          # one '}' too many
    ("model_config_list { config { nmae: 'a' } }", r"nmae"),                # no such field
])
def test_an_unreadable_models_config_raises_naming_the_file_and_is_left_alone(tmp_path, text, message):
    path = tmp_path / "models.config"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{path} is not a valid ModelServerConfig .*{message}"):
        serving_config.update_models_config(str(tmp_path), "m")
    assert path.read_text() == text


def test_a_models_config_with_custom_model_config_is_refused(tmp_path):
    path = tmp_path / "models.config"
    path.write_text("custom_model_config { }\n")
    with pytest.raises(ValueError, match=rf"{path}: models.config uses custom_model_config"):
        serving_config.update_models_config(str(tmp_path), "m")
    assert path.read_text() == "custom_model_config { }\n"


def test_export_without_tensorflow_serving_api_says_how_to_install_it():
    code = ("import sys\n"
            "sys.modules['tensorflow_serving'] = None  # what an environment without the package sees\n"
            "try:\n"
            "    import tfcompress.export.saved_model\n"
            "except ImportError as error:\n"
            "    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensorflow-serving-api" in done.stdout
    assert "pip install --no-deps tensorflow-serving-api==2.21.0" in done.stdout


def test_bad_arguments_raise_naming_the_value(exported, tmp_path):
    avazu = exported["models"]["avazu"]
    with pytest.raises(ValueError, match="quantize must be one of"):
        export_saved_model(avazu, base_dir=str(tmp_path), quantize="int4")
    with pytest.raises(ValueError, match="serving_out_of_range must be one of"):
        export_saved_model(avazu, base_dir=str(tmp_path), serving_out_of_range="clip")
    with pytest.raises(ValueError, match="name must be"):
        export_saved_model(avazu, base_dir=str(tmp_path), name="../escape")
    with pytest.raises(ValueError, match="version must be an integer >= 1"):
        export_saved_model(avazu, base_dir=str(tmp_path), version=0)
    with pytest.raises(ValueError, match=r"sample_inputs must be a dict with 'dense' \[N, 0\] and 'sparse' "
                                         r"\[N, 4\], got \['sparse'\]"):
        export_saved_model(avazu, base_dir=str(tmp_path), sample_inputs={"sparse": np.zeros((2, 4), np.int64)})
    wrong_sizes = Schema(name="toy", sparse_names=["a", "b", "c", "d"], cardinalities=[1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"schema 'toy' has cardinalities \[1, 2, 3, 4\]"):
        export_saved_model(avazu, base_dir=str(tmp_path), schema=wrong_sizes)
    wrong_columns = Schema(name="toy", dense_names=["x"], sparse_names=["a"], cardinalities=[5])
    with pytest.raises(ValueError, match="has 1 dense and 1 sparse columns, the model takes 0 and 4"):
        export_saved_model(avazu, base_dir=str(tmp_path), schema=wrong_columns)
    # Other inputs are exported with a signature derived from them (tests/test_export_signatures_any.py); one
    # that cannot be served is refused by name before anything is written.
    features = keras.Input((4,), sparse=True, name="features")
    plain = keras.Model(features, keras.layers.Dense(1)(features))
    with pytest.raises(ValueError, match="model input 'features' .* is a SparseTensor"):
        export_saved_model(plain, base_dir=str(tmp_path))
    assert not os.listdir(tmp_path)


def test_checker_constants_mirror_the_exporter():
    spec = importlib.util.spec_from_file_location("verify_standalone_for_test", STANDALONE_SCRIPT)
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    for module, names in ((saved_model, ("METADATA_DIR", "METADATA_FILE", "SAMPLES_FILE", "RAW_SAMPLES_FILE",
                                         "WARMUP_FILE")),
                          (signatures, ("TENSOR_SIGNATURE", "EXAMPLE_SIGNATURE", "EXAMPLES_INPUT", "OUTPUT_KEY")),
                          (raw_features, ("RAW_SIGNATURE", "RAW_FEATURES_SIGNATURE", "RAW_INPUT"))):
        for name in names:
            assert getattr(checker, name) == getattr(module, name), name
    cards = [5, 9, 1]
    np.testing.assert_array_equal(checker.out_of_range_rows(2, cards)[1], saved_model.out_of_range_rows(2, cards)["sparse"])


def test_cli_export_and_verify(exported, tmp_path, capsys):
    from tfcompress.cli import main

    checkpoint = str(tmp_path / "model.keras")
    exported["models"]["avazu"].save(checkpoint)
    base = str(tmp_path / "saved_models")
    assert main(["export", "--checkpoint", checkpoint, "--name", "cli_model", "--base-dir", base,
                 "--quantize", "int8", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "exported " + os.path.join(base, "cli_model", "1") in out
    assert "keras_parity" in out and "OK: " in out and "FAIL" not in out
    assert main(["export", "--checkpoint", str(tmp_path / "missing.keras"), "--base-dir", base]) == 2


@pytest.mark.slow
def test_criteo_kaggle_size_robe_export_verifies_with_onnx(tmp_path):
    """ROBE-1000x over the 26 Criteo Kaggle tables (33.8M ids, offsets up to 2^25): export, ONNX, fresh process."""
    robe = RobeEmbedding(CRITEO_KAGGLE_CARDINALITIES, 16, compression=1000.0, chunk_size=4, name="robe")
    model = build_dlrm((13, 26), robe, (64,), (64,), name="kaggle_robe")
    path = export_saved_model(model, base_dir=str(tmp_path), onnx=True)
    result = verify(path, require_serving_api=True, require_onnx=True)
    assert result.ok, result.output
    sizes = {v["name"]: v for v in result.report()["sizes"]["variables"]}
    memory = -(-sum(CRITEO_KAGGLE_CARDINALITIES) * 16 // 1000)
    # "auto" saves the window matrix: at 1000x with Z = 4 it is 0.4% of the full tables.
    assert sizes["robe/memory/windows4"]["shape"] == [memory - 3, 4]
    metadata = read_metadata(path)
    dense_bytes = sum(v["bytes"] for v in metadata["variables"] if not v["embedding"])
    assert metadata["uncompressed_bytes"] == dense_bytes + sum(CRITEO_KAGGLE_CARDINALITIES) * 16 * 4
