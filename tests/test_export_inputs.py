"""Malformed requests to an export: refused with InvalidArgumentError naming the input, as TF Serving runs the graph.

TF Serving's Predict (predict_util.cc, RunPredict) turns each request input into a Tensor and calls
Session::Run(feeds by tensor name, fetches): nothing compares a feed's shape with the signature's placeholder, and
Grappler folds what a placeholder's static shape promises. Python's `Session.run(feed_dict=...)` checks feed shapes
itself (a ValueError), which would hide what the server sees. `ServedModel` emulates the server: the SavedModel
loaded into a v1 Graph and Session, the signature_def's tensor names, and the feeds handed to TF_SessionRun (the C
API under both) without Python's feed checks.
"""

import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2

from test_export_raw import build_model, criteo_rows

from tfcompress._keras import keras
from tfcompress.data.convert import convert
from tfcompress.data.schema import Schema
from tfcompress.export import signatures
from tfcompress.export.raw_features import RAW_FEATURES_SIGNATURE, RAW_INPUT, RAW_SIGNATURE
from tfcompress.export.saved_model import METADATA_DIR, METADATA_FILE, SAMPLES_FILE, export_saved_model
from tfcompress.export.serving_model import ServingModel
from tfcompress.layers import FullEmbedding, RobeEmbedding
from tfcompress.models import build_dcn, build_dlrm

CARDS = [100, 20, 7, 300]
N_DENSE = 3
RAW_COLUMNS = 39  # Criteo: I1..I13, C1..C26
RC = rewriter_config_pb2.RewriterConfig
# TF Serving may run Grappler with any session config; AGGRESSIVE constant folding assumes fed shapes are valid.
SESSION_CONFIGS = {
    "default": None,
    "aggressive_folding": config_pb2.ConfigProto(graph_options=config_pb2.GraphOptions(rewrite_options=RC(
        constant_folding=RC.AGGRESSIVE, arithmetic_optimization=RC.AGGRESSIVE,
        dependency_optimization=RC.AGGRESSIVE))),
}


class ServedModel:
    """A SavedModel run as TF Serving runs it (see the module doc)."""

    def __init__(self, path, config=None):
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.session = tf.compat.v1.Session(graph=self.graph, config=config)
            meta_graph = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], path)
        self.signature_defs = meta_graph.signature_def

    def tensor(self, name):
        return self.graph.get_tensor_by_name(name)

    def run(self, signature, **inputs):
        definition = self.signature_defs[signature]
        feeds = {self.tensor(definition.inputs[key].name)._as_tf_output(): np.asarray(value)
                 for key, value in inputs.items()}
        keys = sorted(definition.outputs)
        fetches = [self.tensor(definition.outputs[key].name)._as_tf_output() for key in keys]
        # TF_SessionRun, as Session::Run in the server: feeds go to the graph as they are.
        values = self.session._call_tf_sessionrun(None, feeds, fetches, [], None)
        return dict(zip(keys, values))

    def refusal(self, signature, **inputs):
        """The InvalidArgumentError message of a request that must fail (first line: TF appends the node)."""
        with pytest.raises(tf.errors.InvalidArgumentError) as caught:
            self.run(signature, **inputs)
        return caught.value.message


def example(dense=None, sparse=None, label=None, sparse_floats=None):
    feature = {}
    if sparse is not None:
        feature["sparse"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in sparse]))
    if sparse_floats is not None:
        feature["sparse"] = tf.train.Feature(float_list=tf.train.FloatList(value=sparse_floats))
    if dense is not None:
        feature["dense"] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in dense]))
    if label is not None:
        feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def rows(cards, n, n_dense, seed):
    rng = np.random.default_rng(seed)
    return {"dense": rng.normal(size=(n, n_dense)).astype(np.float32),
            "sparse": np.stack([rng.integers(0, c, n) for c in cards], axis=1).astype(np.int64)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A ROBE DLRM (3 dense, 4 sparse), a DCN without dense columns, and a Criteo export with the raw signature."""
    base = tmp_path_factory.mktemp("saved_models")
    keras.utils.set_random_seed(3)
    dlrm = build_dlrm((N_DENSE, len(CARDS)), RobeEmbedding(CARDS, 8, compression=4.0, chunk_size=4), (8,), (8,),
                      name="dlrm")
    dcn = build_dcn((0, len(CARDS)), FullEmbedding(CARDS, 4), cross_layers=1, deep_layers=(8,), name="dcn")
    fields, lines = criteo_rows(np.random.default_rng(0), 12)
    source = tmp_path_factory.mktemp("raw") / "day.tsv"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data_dir = source.parent / "converted"
    convert([source], data_dir, "criteo-tsv", max_ind_range=97)
    criteo = build_model(Schema.load(data_dir), seed=0)
    return {
        "models": {"dlrm": dlrm, "dcn": dcn},
        "dlrm": export_saved_model(dlrm, base_dir=base),
        "dcn": export_saved_model(dcn, base_dir=base),
        "raw": export_saved_model(criteo, base_dir=base, name="criteo", raw_preprocessing=data_dir),
        "raw_fields": fields,
    }


@pytest.fixture(scope="module", params=list(SESSION_CONFIGS))
def served(request, exported):
    config = SESSION_CONFIGS[request.param]
    return {key: ServedModel(exported[key], config) for key in ("dlrm", "dcn", "raw")}


def good(n=2, n_dense=N_DENSE):
    return rows(CARDS, n, n_dense, seed=n)


# ---------------------------------------------------------------------------------------- serving_default
@pytest.mark.parametrize("sparse_shape, received", [
    ((2, 5), "[2, 5]"),        # one column too many
    ((2, 3), "[2, 3]"),        # one too few
    ((2, 4, 1), "[2, 4, 1]"),  # rank 3
    ((4,), "[4]"),             # rank 1: one row without its batch axis
    ((), "[]"),                # a scalar
])
def test_sparse_of_the_wrong_shape_is_refused_naming_input_and_shapes(served, sparse_shape, received):
    sparse = np.zeros(sparse_shape, np.int64)
    message = served["dlrm"].refusal("serving_default", dense=good()["dense"], sparse=sparse)
    assert f"input sparse: expected int64 [batch, 4], received shape {received}" in message


@pytest.mark.parametrize("dense_shape, received", [((2, 4), "[2, 4]"), ((2, 2), "[2, 2]"), ((2, 3, 1), "[2, 3, 1]"),
                                                   ((3,), "[3]")])
def test_float_dense_of_the_wrong_shape_is_refused(served, dense_shape, received):
    dense = np.ones(dense_shape, np.float32)
    message = served["dlrm"].refusal("serving_default", dense=dense, sparse=good()["sparse"])
    assert f"input dense: expected float32 [batch, 3], received shape {received}" in message


def test_dense_and_sparse_of_different_batches_are_refused(served):
    message = served["dlrm"].refusal("serving_default", dense=good(3)["dense"], sparse=good(2)["sparse"])
    assert ("inputs dense and sparse: expected the same number of rows (one per example), received dense 3, "
            "sparse 2") in message


def test_a_model_without_dense_columns_wants_dense_of_width_zero(served, exported):
    n0 = good(2, n_dense=0)
    message = served["dcn"].refusal("serving_default", dense=np.ones((2, 1), np.float32), sparse=n0["sparse"])
    assert "input dense: expected float32 [batch, 0], received shape [2, 1]" in message
    got = served["dcn"].run("serving_default", **n0)["probability"]
    expected = np.asarray(exported["models"]["dcn"]({k: tf.constant(v) for k, v in n0.items()}, training=False))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    records = [example(sparse=s) for s in n0["sparse"]]
    np.testing.assert_allclose(served["dcn"].run("examples", examples=np.array(records, object))["probability"],
                               expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ examples
def test_a_garbage_record_is_refused_naming_its_index_without_quoting_it(served):
    batch = good(3)
    records = [example(d, s) for d, s in zip(batch["dense"], batch["sparse"])]
    records[1] = b"\xff\xfe not a protobuf \x80"
    message = served["dlrm"].refusal("examples", examples=np.array(records, object))
    assert ("input examples: record 1 of 3 is not a serialized tf.train.Example with int64 sparse[4] and float "
            "dense[3]: its bytes do not parse as a tf.train.Example") in message
    assert "not a protobuf" not in message  # TF's own message quotes the raw bytes (and failed to decode in Python)


@pytest.mark.parametrize("bad_record, why", [
    pytest.param(example(dense=[0.0] * 3), "it has no feature sparse (or an empty one)", id="no_sparse"),
    pytest.param(example(dense=[0.0] * 3, sparse=[1, 2, 3]), "its feature sparse has 3 values, expected 4",
                 id="short_sparse"),
    pytest.param(example(dense=[0.0] * 3, sparse_floats=[1.0] * 4), "its feature sparse is not a valid int64_list",
                 id="float_sparse"),
    pytest.param(example(dense=[0.0] * 2, sparse=[1, 2, 3, 4]), "its feature dense has 2 values, expected 3",
                 id="short_dense"),
    pytest.param(example(sparse=[1, 2, 3, 4]), "it has no feature dense (or an empty one)", id="no_dense"),
])
def test_a_record_without_the_layout_is_refused_saying_why(served, bad_record, why):
    batch = good(4)
    records = [example(d, s, label=1) for d, s in zip(batch["dense"], batch["sparse"])]
    records[2] = bad_record
    message = served["dlrm"].refusal("examples", examples=np.array(records, object))
    assert f"input examples: record 2 of 4 is not a serialized tf.train.Example with int64 sparse[4] and float " \
           f"dense[3]: {why}" in message


@pytest.mark.parametrize("shape, received", [((2, 1), "[2, 1]"), ((), "[]")])
def test_examples_of_the_wrong_rank_are_refused(served, shape, received):
    record = example([0.0] * 3, [0, 0, 0, 0])
    examples = np.full(shape, record, dtype=object)
    message = served["dlrm"].refusal("examples", examples=examples)
    assert f"input examples: expected string [batch], received shape {received}" in message


# --------------------------------------------------------------------------------------------- raw strings
@pytest.mark.parametrize("signature", [RAW_SIGNATURE, RAW_FEATURES_SIGNATURE])
@pytest.mark.parametrize("shape, received", [((2, RAW_COLUMNS - 1), f"[2, {RAW_COLUMNS - 1}]"),
                                             ((2, RAW_COLUMNS + 1), f"[2, {RAW_COLUMNS + 1}]"),
                                             ((RAW_COLUMNS,), f"[{RAW_COLUMNS}]")])
def test_raw_fields_of_the_wrong_width_are_refused(served, signature, shape, received):
    fields = np.full(shape, b"1", dtype=object)
    message = served["raw"].refusal(signature, **{RAW_INPUT: fields})
    assert f"input fields: expected string [batch, {RAW_COLUMNS}], received shape {received}" in message


# ----------------------------------------------------------------------------------------------- good inputs
def test_good_inputs_give_the_export_time_probabilities_and_the_server_keeps_serving(served, exported):
    """The checks change no result: the stored export-time predictions, the Keras model, all three paths."""
    model = served["dlrm"]
    with np.load(os.path.join(exported["dlrm"], METADATA_DIR, SAMPLES_FILE)) as samples:
        dense, sparse, stored = samples["dense"], samples["sparse"], samples["serving_probability"]
    tensors = model.run("serving_default", dense=dense, sparse=sparse)["probability"]
    np.testing.assert_array_equal(tensors, stored)  # the graph traced before the export was written
    # The signature as it was before the checks: the model as served, traced at the documented input shapes.
    before = tf.function(lambda d, s: ServingModel(exported["models"]["dlrm"])({"dense": d, "sparse": s}),
                         input_signature=signatures.input_signature(N_DENSE, len(CARDS)))
    np.testing.assert_allclose(tensors, np.reshape(before(dense, sparse), (-1, 1)), rtol=0, atol=1e-7)
    keras_probability = exported["models"]["dlrm"]({"dense": tf.constant(dense), "sparse": tf.constant(sparse)},
                                                   training=False)
    np.testing.assert_allclose(tensors, np.asarray(keras_probability), atol=1e-5)
    records = np.array([example(d, s, label=i % 2) for i, (d, s) in enumerate(zip(dense, sparse))], object)
    np.testing.assert_allclose(model.run("examples", examples=records)["probability"], stored, atol=1e-6)
    loaded = tf.saved_model.load(exported["dlrm"])
    python = loaded.signatures["serving_default"](dense=tf.constant(dense), sparse=tf.constant(sparse))
    np.testing.assert_array_equal(python["probability"].numpy(), stored)
    # An empty request is well formed.
    empty = model.run("serving_default", dense=np.zeros((0, 3), np.float32), sparse=np.zeros((0, 4), np.int64))
    assert empty["probability"].shape == (0, 1)
    assert model.run("examples", examples=np.zeros([0], object))["probability"].shape == (0, 1)
    # After refusing requests the same session serves again.
    model.refusal("serving_default", dense=dense[:2], sparse=sparse[:2, :3])
    model.refusal("examples", examples=np.array([b"\x01garbage"], object))
    np.testing.assert_array_equal(model.run("serving_default", dense=dense, sparse=sparse)["probability"], stored)


def test_good_raw_fields_still_serve(served, exported):
    fields = np.array([[v.encode() for v in row] for row in exported["raw_fields"]], dtype=object)
    features = served["raw"].run(RAW_FEATURES_SIGNATURE, **{RAW_INPUT: fields})
    raw = served["raw"].run(RAW_SIGNATURE, **{RAW_INPUT: fields})
    valid = features["valid"]
    assert valid.sum() >= 10 and (~valid).sum() >= 4
    tensors = served["raw"].run("serving_default", dense=features["dense"][valid], sparse=features["sparse"][valid])
    np.testing.assert_allclose(raw["probability"][valid], tensors["probability"], atol=1e-6)
    assert np.all(np.isnan(raw["probability"][~valid]))


# ---------------------------------------------------------------------------------------- the declared shapes
def test_signature_defs_declare_any_shape_and_the_metadata_the_documented_one(exported):
    """Why the checks are not folded away: no input has a static shape for Grappler to trust."""
    import json

    served = ServedModel(exported["raw"])
    for name in ("serving_default", "examples", RAW_SIGNATURE, RAW_FEATURES_SIGNATURE):
        for key, info in served.signature_defs[name].inputs.items():
            assert info.tensor_shape.unknown_rank, (name, key)
            assert served.tensor(info.name).shape.rank is None
    with open(os.path.join(exported["raw"], METADATA_DIR, METADATA_FILE)) as f:
        metadata = json.load(f)["signatures"]
    assert metadata["serving_default"]["inputs"] == {"dense": ["float32", [None, 13]], "sparse": ["int64", [None, 26]]}
    assert metadata["serving_default"]["signature_def_inputs"] == {"dense": ["float32", None],
                                                                   "sparse": ["int64", None]}
    assert metadata["examples"]["signature_def_inputs"] == {"examples": ["string", None]}
    assert metadata[RAW_SIGNATURE]["inputs"][RAW_INPUT] == ["string", [None, RAW_COLUMNS]]
    assert metadata[RAW_SIGNATURE]["signature_def_inputs"][RAW_INPUT] == ["string", None]
    # ONNX keeps the documented shapes (tf2onnx converts the tensor signature at them).
    assert [spec.shape.as_list() for spec in signatures.input_signature(13, 26)] == [[None, 13], [None, 26]]


def test_a_loaded_signature_refuses_the_same_way(exported):
    """tf.saved_model.load's functions accept any shape too, so Python users get the server's error."""
    loaded = tf.saved_model.load(exported["dlrm"])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"input sparse: expected int64 \[batch, 4\], "
                                                             r"received shape \[2, 4, 1\]"):
        loaded.signatures["serving_default"](dense=tf.zeros([2, 3]), sparse=tf.zeros([2, 4, 1], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="input examples: record 0 of 1 is not a serialized"):
        loaded.signatures["examples"](examples=tf.constant([b"\xff"]))
