"""Export of models with any inputs (docs/export_contract.md, "Models with other inputs").

String inputs through StringLookup, several id inputs with their own names and ranks, dense inputs of any names,
ragged bags pooled by a combiner, a mask_zero history: each model is exported once (module fixture) and ONE checker
subprocess, which never imports tfcompress, verifies them all; the tests read its report and load the SavedModels.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfcompress._keras import keras
from tfcompress.export import model_inputs
from tfcompress.export.saved_model import METADATA_DIR, METADATA_FILE, export_saved_model
from tfcompress.export.verify import verify
from tfcompress.layers import CompressedEmbedding, FullEmbedding, RobeEmbedding

GENRES = 20
USERS = ["alice", "bob", "carol", "dave"]


def strings_model():
    """A string user id through StringLookup into a ROBE CompressedEmbedding, with a dense input `age`."""
    user = keras.Input((1,), dtype="string", name="user")
    age = keras.Input((1,), name="age")
    ids = keras.layers.StringLookup(vocabulary=USERS, name="user_lookup")(user)
    embedded = CompressedEmbedding(len(USERS) + 1, 8, method="robe", compression=2.0, chunk_size=4,
                                   name="user_embedding")(ids)
    x = keras.layers.Concatenate()([keras.layers.Flatten()(embedded), age])
    return keras.Model({"user": user, "age": age}, keras.layers.Dense(1, activation="sigmoid")(x), name="strings")


def two_ids_model():
    """Id inputs of different ranks and tables (rank-1 hashed, [B, 2] multi-table ROBE, a plain Embedding, a padded
    [B, None] sequence under mask_zero) plus a dense input: a list-input model (the signature takes the Inputs'
    names)."""
    user_id = keras.Input((), dtype="int64", name="user_id")
    item_ids = keras.Input((2,), dtype="int32", name="item_ids")
    shop_id = keras.Input((1,), dtype="int64", name="shop_id")
    features = keras.Input((3,), name="features")
    recent = keras.Input((None,), dtype="int64", name="recent")  # padded with 0, any length per request
    user = CompressedEmbedding(100, 8, method="hashing", compression=4.0, name="user_embedding")(user_id)
    items = keras.layers.Flatten()(RobeEmbedding([50, 30], 8, compression=2.0, chunk_size=4, name="items")(item_ids))
    shop = keras.layers.Flatten()(keras.layers.Embedding(7, 8, name="shop_embedding")(shop_id))
    recent_vector = keras.layers.GlobalAveragePooling1D()(
        CompressedEmbedding(60, 8, method="full", mask_zero=True, name="recent_embedding")(recent))
    x = keras.layers.Concatenate()([user, items, shop, features, recent_vector])
    x = keras.layers.Dense(16, activation="relu")(x)
    return keras.Model([user_id, item_ids, shop_id, features, recent], keras.layers.Dense(1, activation="sigmoid")(x),
                       name="two_ids")


def bag_model():
    """A ragged genre bag with per-id weights pooled with combiner="mean", a mask_zero history averaged under its
    mask, and a FullEmbedding of a dense [B, 1] id; two outputs (a dict)."""
    genres = keras.Input((None,), dtype="int64", ragged=True, name="genres")
    weights = keras.Input((None,), dtype="float32", ragged=True, name="genre_weights")
    history = keras.Input((5,), dtype="int64", name="history")
    item = keras.Input((1,), dtype="int64", name="item")
    bag = CompressedEmbedding(GENRES, 8, method="robe", compression=2.0, chunk_size=4, combiner="mean",
                              name="genre_bag")(genres, weights=weights)
    seen = CompressedEmbedding(40, 8, method="full", mask_zero=True, name="history_embedding")(history)
    seen = keras.layers.GlobalAveragePooling1D()(seen)  # averages only the positions the mask keeps
    item_vector = keras.layers.Flatten()(FullEmbedding([40], 8, name="item_table")(item))
    x = keras.layers.Concatenate()([bag, seen, item_vector])
    score = keras.layers.Dense(1, name="score")(x)
    return keras.Model({"genres": genres, "genre_weights": weights, "history": history, "item": item},
                       {"score": score, "probability": keras.layers.Activation("sigmoid")(score)}, name="bags")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("saved_models"))
    keras.utils.set_random_seed(11)
    models = {"strings": strings_model(), "two_ids": two_ids_model(), "bags": bag_model()}
    paths = {key: export_saved_model(model, base_dir=base) for key, model in models.items()}
    paths["bags_int8"] = export_saved_model(models["bags"], base_dir=base, name="bags_int8", quantize="int8")
    result = verify(list(paths.values()), require_serving_api=True)
    return {"base": base, "models": models, "paths": paths, "result": result}


def metadata(path):
    with open(os.path.join(path, METADATA_DIR, METADATA_FILE)) as f:
        return json.load(f)


@pytest.mark.parametrize("key", ["strings", "two_ids", "bags", "bags_int8"])
def test_every_export_passes_every_check_in_a_fresh_process(exported, key):
    report = exported["result"].report(exported["paths"][key])
    statuses = {name: check["status"] for name, check in report["checks"].items()}
    assert report["ok"], exported["result"].output[-4000:]
    for check in ("isolation", "stock_ops", "load", "signatures", "keras_parity", "serving_parity", "examples",
                  "predict_request", "warmup", "bad_inputs"):
        assert statuses[check] == "PASS", (check, report["checks"][check])
    assert statuses["bad_ids"] == "SKIP" and statuses["onnx"] == "SKIP"
    # verify prints the serving layout for these exports too (an XLA-compiled one needs a TF Serving flag).
    assert "serving layout: chunk_reads=auto unique_ids=False jit_compile=False" in exported["result"].output


def test_the_signature_is_derived_from_the_model_inputs(exported):
    loaded = tf.saved_model.load(exported["paths"]["two_ids"])
    declared = loaded.signatures["serving_default"].structured_input_signature[1]
    assert {key: spec.dtype for key, spec in declared.items()} == {
        "user_id": tf.int64, "item_ids": tf.int32, "shop_id": tf.int64, "features": tf.float32, "recent": tf.int64}
    bags = metadata(exported["paths"]["bags"])
    assert bags["contract"] == "model_inputs"
    assert bags["signatures"]["serving_default"]["inputs"] == {
        "genres_values": ["int64", [None]], "genres_row_lengths": ["int64", [None]],
        "genre_weights_values": ["float32", [None]], "genre_weights_row_lengths": ["int64", [None]],
        "history": ["int64", [None, 5]], "item": ["int64", [None, 1]]}
    assert sorted(bags["signatures"]["serving_default"]["outputs"]) == ["probability", "score"]
    kinds = {item["name"]: item["example_kind"] for item in bags["inputs"]}
    assert kinds == {"genres": "ragged", "genre_weights": "ragged", "history": "fixed", "item": "fixed"}
    two_ids = metadata(exported["paths"]["two_ids"])
    ranges = {item["name"]: item["id_range"] for item in two_ids["inputs"]}
    assert ranges == {"user_id": [0, 100], "item_ids": [0, 30], "shop_id": [0, 7], "features": None,
                      "recent": [0, 60]}
    assert {item["name"]: item["example_kind"] for item in two_ids["inputs"]}["recent"] == "sequence"


def _keras_outputs(model, feeds):
    outputs = model(feeds, training=False)
    return {key: np.asarray(value) for key, value in outputs.items()} if isinstance(outputs, dict) else \
        {"output": np.asarray(outputs)}


def test_ragged_bags_and_strings_match_keras_on_new_rows_including_empty_bags_and_unseen_strings(exported):
    bags = tf.saved_model.load(exported["paths"]["bags"]).signatures["serving_default"]
    genres = tf.ragged.constant([[3, 7, 9], [], [5], [19, 0, 0, 1]], dtype=tf.int64)
    weights = tf.ragged.constant([[1.0, 0.5, 2.0], [], [3.0], [1.0, 1.0, 0.25, 1.0]], dtype=tf.float32)
    history = tf.constant([[1, 2, 0, 0, 0], [0, 0, 0, 0, 3], [39, 38, 37, 36, 35], [5, 0, 5, 0, 5]], tf.int64)
    item = tf.constant([[0], [39], [4], [17]], tf.int64)
    got = bags(genres_values=genres.flat_values, genres_row_lengths=genres.row_lengths(),
               genre_weights_values=weights.flat_values, genre_weights_row_lengths=weights.row_lengths(),
               history=history, item=item)
    expected = _keras_outputs(exported["models"]["bags"],
                              {"genres": genres, "genre_weights": weights, "history": history, "item": item})
    for key in ("score", "probability"):
        np.testing.assert_allclose(got[key].numpy(), expected[key], atol=1e-6)
    assert np.all(np.isfinite(got["score"].numpy()))  # the empty bag pools to zeros, not NaN

    strings = tf.saved_model.load(exported["paths"]["strings"]).signatures["serving_default"]
    user = tf.constant([["bob"], ["never-seen"], [""], ["alice"]])
    age = tf.constant([[0.5], [-1.0], [2.0], [0.0]])
    np.testing.assert_allclose(strings(user=user, age=age)["output"].numpy(),
                               _keras_outputs(exported["models"]["strings"], {"user": user, "age": age})["output"],
                               atol=1e-6)


def _example(**features):
    feature = {}
    for key, values in features.items():
        if isinstance(values, tf.train.Feature):
            feature[key] = values
        elif values and isinstance(values[0], bytes):
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
        elif values and isinstance(values[0], float):
            feature[key] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
        else:
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_the_example_signature_reads_ragged_inputs_as_variable_length_features(exported):
    loaded = tf.saved_model.load(exported["paths"]["bags"])
    records = [_example(genres=[3, 7, 9], genre_weights=[1.0, 2.0, 0.5], history=[1, 2, 0, 0, 0], item=[4]),
               _example(history=[0, 0, 0, 0, 2], item=[0]),  # no genres features at all: an empty bag
               _example(genres=[], genre_weights=tf.train.Feature(float_list=tf.train.FloatList()),  # empty lists
                        history=[3, 3, 3, 3, 3], item=[39], label=[1]),
               _example(genres=[5] * 12, genre_weights=[0.5] * 12, history=[9, 8, 7, 6, 5], item=[1])]  # long
    got = loaded.signatures["examples"](examples=tf.constant(records))
    genres = tf.ragged.constant([[3, 7, 9], [], [], [5] * 12], dtype=tf.int64)
    weights = tf.ragged.constant([[1.0, 2.0, 0.5], [], [], [0.5] * 12], dtype=tf.float32)
    history = tf.constant([[1, 2, 0, 0, 0], [0, 0, 0, 0, 2], [3] * 5, [9, 8, 7, 6, 5]], tf.int64)
    item = tf.constant([[4], [0], [39], [1]], tf.int64)
    expected = loaded.signatures["serving_default"](
        genres_values=genres.flat_values, genres_row_lengths=genres.row_lengths(),
        genre_weights_values=weights.flat_values, genre_weights_row_lengths=weights.row_lengths(), history=history,
        item=item)
    for key in ("score", "probability"):
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy())
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"record 1 of 2 is not a serialized tf.train.Example with float genre_weights\[var\], "
                             r"int64 genres\[var\], int64 history\[5\] and int64 item\[1\]: its feature history has "
                             r"4 values, expected 5"):
        loaded.signatures["examples"](examples=tf.constant([records[0],
                                                            _example(history=[1, 2, 3, 4], item=[1])]))
    strings = tf.saved_model.load(exported["paths"]["strings"])
    got = strings.signatures["examples"](examples=tf.constant([_example(user=[b"carol"], age=[1.5])]))
    expected = strings.signatures["serving_default"](user=tf.constant([["carol"]]), age=tf.constant([[1.5]]))
    np.testing.assert_array_equal(got["output"].numpy(), expected["output"].numpy())


def test_malformed_ragged_and_dense_requests_are_refused_naming_the_input(exported):
    bags = tf.saved_model.load(exported["paths"]["bags"]).signatures["serving_default"]
    good = dict(genres_values=tf.constant([1, 2, 3], tf.int64), genres_row_lengths=tf.constant([2, 1], tf.int64),
                genre_weights_values=tf.constant([1.0, 1.0, 2.0]),
                genre_weights_row_lengths=tf.constant([2, 1], tf.int64),
                history=tf.ones([2, 5], tf.int64), item=tf.zeros([2, 1], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="input genres: genres_row_lengths must be >= 0 and add up to the number of "
                             "genres_values, received a sum of 4 for 3 values"):
        bags(**{**good, "genres_row_lengths": tf.constant([2, 2], tf.int64)})
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="inputs genre_weights_row_lengths and genres_row_lengths and history and item: expected "
                             "the same number of rows"):
        bags(**{**good, "genres_row_lengths": tf.constant([3], tf.int64)})
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"input history: expected int64 \[batch, 5\], received shape \[2, 4\]"):
        bags(**{**good, "history": tf.zeros([2, 4], tf.int64)})
    assert np.all(np.isfinite(bags(**good)["score"].numpy()))


def test_a_model_input_that_cannot_be_served_is_refused_naming_it(tmp_path):
    ids = keras.Input((4,), dtype="int64", sparse=True, name="clicked")
    dense = keras.layers.Dense(1)(keras.layers.Lambda(lambda x: tf.cast(tf.sparse.to_dense(x), tf.float32),
                                                      output_shape=(4,))(ids))
    with pytest.raises(ValueError, match=r"model input 'clicked' \(int64, shape \(None, 4\)\) is a SparseTensor"):
        export_saved_model(keras.Model(ids, dense), base_dir=str(tmp_path))

    counts = keras.Input((3,), dtype="int64", name="counts")
    plain = keras.Model(counts, keras.layers.Dense(1)(keras.layers.Lambda(lambda x: tf.cast(x, tf.float32),
                                                                           output_shape=(3,))(counts)))
    with pytest.raises(ValueError, match=r"model input 'counts' \(int64\): no Embedding, tfcompress or lookup layer "
                                         r"reads it.*pass sample_inputs="):
        export_saved_model(plain, base_dir=str(tmp_path))
    # The same model exports once the rows are given.
    path = export_saved_model(plain, base_dir=str(tmp_path), sample_inputs={"counts": np.arange(6).reshape(2, 3)})
    assert os.path.isdir(path)

    genres = keras.Input((None,), dtype="int64", ragged=True, name="genres")
    passthrough = CompressedEmbedding(10, 4, method="full", name="no_combiner")(genres)  # ragged out
    with pytest.raises(ValueError, match="model output 'output' is a RaggedTensor"):
        export_saved_model(keras.Model(genres, passthrough), base_dir=str(tmp_path / "ragged_out"))
    with pytest.raises(ValueError, match=r"onnx= is for models with the \{'dense', 'sparse'\} inputs only; model "
                                         r"'strings' takes \['age', 'user'\]"):
        export_saved_model(strings_model(), base_dir=str(tmp_path / "onnx"), onnx=True)
    assert not os.path.exists(tmp_path / "ragged_out" / "functional") and not os.path.exists(tmp_path / "onnx")


def test_served_inputs_refuse_names_and_ragged_shapes_export_cannot_carry():
    values = keras.Input((None, None), dtype="int64", ragged=True, name="nested")
    model = keras.Model(values, keras.layers.Lambda(lambda x: tf.reduce_sum(tf.cast(x, tf.float32), axis=[1, 2]),
                                                    output_shape=())(values))
    with pytest.raises(ValueError, match=r"model input 'nested' .* is ragged with shape \(None, None, None\)"):
        model_inputs.served_inputs(model)
    a = keras.Input((None,), dtype="int64", ragged=True, name="tags")
    b = keras.Input((1,), dtype="float32", name="tags_values")
    pooled = keras.layers.Lambda(lambda x: tf.cast(tf.reduce_sum(x, axis=1, keepdims=True), tf.float32),
                                 output_shape=(1,))(a)
    clash = keras.Model([a, b], keras.layers.Add()([pooled, b]))
    with pytest.raises(ValueError, match=r"served tensor name\(s\) \['tags_values'\] twice"):
        model_inputs.served_inputs(clash)


@pytest.mark.slow
def test_cli_exports_and_verifies_a_saved_model_with_ragged_and_string_inputs(tmp_path, capsys):
    from tfcompress.cli import main

    checkpoint = str(tmp_path / "bags.keras")
    bag_model().save(checkpoint)
    base = str(tmp_path / "saved_models")
    assert main(["export", "--checkpoint", checkpoint, "--name", "cli_bags", "--base-dir", base, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "exported " + os.path.join(base, "cli_bags", "1") in out
    assert "PASS  examples" in out and "OK: " in out and "FAIL" not in out


LEGACY_SCRIPT = """
import sys
import tensorflow as tf
from tfcompress._keras import keras
assert keras.__name__ == "tf_keras", keras.__name__
from tfcompress.export.saved_model import export_saved_model
from tfcompress.layers import CompressedEmbedding

user = keras.Input((1,), dtype="string", name="user")
genres = keras.Input((None,), dtype="int64", ragged=True, name="genres")
ids = keras.layers.StringLookup(vocabulary=["a", "b", "c"])(user)
embedded = keras.layers.Flatten()(CompressedEmbedding(4, 4, method="full", name="user_embedding")(ids))
bag = CompressedEmbedding(10, 4, method="robe", compression=2.0, chunk_size=2, combiner="sqrtn", name="bag")(genres)
out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Concatenate()([embedded, bag]))
model = keras.Model({"user": user, "genres": genres}, out, name="legacy")
print(export_saved_model(model, base_dir=sys.argv[1]))
"""


@pytest.mark.slow
def test_a_tf_keras_model_with_ragged_and_string_inputs_exports_and_verifies(tmp_path):
    """tf.keras (TF_USE_LEGACY_KERAS=1) models: ragged Inputs are RaggedTensorSpec KerasTensors there."""
    import subprocess
    import sys

    script = tmp_path / "legacy.py"
    script.write_text(LEGACY_SCRIPT)
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "saved_models")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    path = done.stdout.strip().splitlines()[-1]
    result = verify(path, require_serving_api=True)
    assert result.ok, result.output[-3000:]
    assert result.status("examples") == "PASS" and result.status("keras_parity") == "PASS"


@pytest.mark.slow
def test_a_keras_rs_configured_compressed_embeddings_model_exports_and_verifies(tmp_path):
    """CompressedEmbeddings (keras-rs FeatureConfigs, DistributedEmbedding's dict call) over dict inputs: the
    sample ids come from each feature's table size, one ROBE memory holds both tables."""
    keras_rs = pytest.importorskip("keras_rs")  # the [recommenders] extra
    if keras.__name__ != "keras":
        pytest.skip("keras-rs is a Keras 3 library")
    from tfcompress.layers import CompressedEmbeddings

    genres_table = keras_rs.layers.TableConfig("genres", vocabulary_size=50, embedding_dim=8, combiner="mean")
    items_table = keras_rs.layers.TableConfig("items", vocabulary_size=1000, embedding_dim=8)
    features = {"item": keras_rs.layers.FeatureConfig("item", items_table, (None,), (None, 8)),
                "genres": keras_rs.layers.FeatureConfig("genres", genres_table, (None, None), (None, 8))}
    inputs = {"item": keras.Input((), dtype="int64", name="item"),
              "genres": keras.Input((None,), dtype="int64", ragged=True, name="genres")}
    embedded = CompressedEmbeddings(features, method="robe", ratio=10)(inputs)
    x = keras.layers.Concatenate()([embedded["item"], embedded["genres"]])
    model = keras.Model(inputs, keras.layers.Dense(1)(x), name="keras_rs_tables")
    path = export_saved_model(model, base_dir=str(tmp_path))
    ranges = {item["name"]: item["id_range"] for item in metadata(path)["inputs"]}
    assert ranges == {"item": [0, 1000], "genres": [0, 50]}
    result = verify(path, require_serving_api=True)
    assert result.ok, result.output[-3000:]


def test_a_sequential_model_is_served_by_its_input_and_one_without_inputs_is_refused():
    sequential = keras.Sequential([keras.Input((4,), dtype="int32", name="ids"),
                                   CompressedEmbedding(100, 8, method="qr", compression=4.0), keras.layers.Flatten(),
                                   keras.layers.Dense(1)], name="sequential_ids")
    (served,) = model_inputs.served_inputs(sequential)
    assert (served.name, served.dtype, served.shape, served.id_range) == ("ids", tf.int32, (4,), (0, 100))
    unbuilt = keras.Sequential([keras.layers.Dense(1)], name="unbuilt")
    with pytest.raises(ValueError, match="model 'unbuilt' has no defined inputs"):
        model_inputs.served_inputs(unbuilt)


def test_a_padded_sequence_input_is_read_from_examples_of_any_length(exported):
    loaded = tf.saved_model.load(exported["paths"]["two_ids"])
    common = dict(user_id=[7], item_ids=[3, 29], shop_id=[6], features=[0.5, -1.0, 2.0])
    records = [_example(recent=[12], **common), _example(recent=[5, 59, 1], **common)]
    got = loaded.signatures["examples"](examples=tf.constant(records))["output"].numpy()
    feeds = dict(user_id=tf.constant([7, 7], tf.int64), item_ids=tf.constant([[3, 29]] * 2, tf.int32),
                 shop_id=tf.constant([[6]] * 2, tf.int64), features=tf.constant([[0.5, -1.0, 2.0]] * 2),
                 recent=tf.constant([[12, 0, 0], [5, 59, 1]], tf.int64))  # padded with 0, which the mask drops
    np.testing.assert_array_equal(got, loaded.signatures["serving_default"](**feeds)["output"].numpy())
    keras_model = exported["models"]["two_ids"]
    expected = np.asarray(keras_model([feeds[k] for k in ("user_id", "item_ids", "shop_id", "features", "recent")],
                                      training=False))
    np.testing.assert_allclose(got, expected, atol=1e-6)
