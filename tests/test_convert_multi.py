"""Multi-valued fields in `csv + schema` conversion (issue 16, section 4): "Action|Comedy" -> a variable-length
feature -> `read()` gives a RaggedTensor.

Expected ids come from the Python values the CSV was written from (the plain-Python key hash of test_convert.py),
never from the converter's own code.
"""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from test_convert import MISSING, check_report, py_hash_id, py_string_key, quarantine

from tfcompress.data import read
from tfcompress.data.convert import ConvertError, convert, load_counts
from tfcompress.data.formats import FormatError, layout_for_format
from tfcompress.data.schema import Schema
from tfcompress.data.synthetic_movielens import MOVIELENS_LIKE_SCHEMA_TOML, write_movielens_like_csv
from tfcompress.data.tfrecord import serialize_rows

BUCKETS = 1009


def read_rows(directory, names, **kwargs):
    """Every row of a converted split in file order: label [N], sparse [N, s], {name: list of id lists}."""
    ds = read(directory, batch_size=53, shuffle=False, repeat=False, deterministic=True, **kwargs)
    labels, sparse, multi = [], [], {name: [] for name in names}
    for features, label in ds:
        labels.append(label.numpy()[:, 0])
        sparse.append(features["sparse"].numpy())
        for name in names:
            assert isinstance(features[name], tf.RaggedTensor)
            multi[name] += features[name].to_list()
    return np.concatenate(labels).astype(np.int64), np.concatenate(sparse), multi


def hashed(tokens):
    return [py_hash_id(py_string_key(t), BUCKETS) for t in tokens]


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    """The generated MovieLens-like CSV, converted with hashing (so the expected ids are plain Python)."""
    root = tmp_path_factory.mktemp("movielens")
    data = write_movielens_like_csv(root / "ml.csv", 1500, num_users=40, num_items=70, seed=5, history_length=6)
    (root / "ml.toml").write_text(MOVIELENS_LIKE_SCHEMA_TOML)
    out = root / "out"
    report = convert([root / "ml.csv"], out, "csv", schema=root / "ml.toml", encoding="hash", hash_buckets=BUCKETS,
                     rows_per_shard=400, shard_bytes=20_000)
    return root, data, out, report


def test_movielens_csv_round_trip(movielens):
    root, data, out, report = movielens
    check_report(report, out)
    assert report["rows_read"] == report["rows_written"] == 1500 and report["rows_rejected"] == 0
    assert report["pieces"] > 1  # several pieces: the ragged rows must join up in order across them
    schema = Schema.load(out)
    assert schema.sparse_names == ["user_id", "item_id"] and schema.multi_names == ["genres", "history"]
    assert schema.multi_fields[0] == {"name": "genres", "cardinality": BUCKETS, "delimiter": "|"}
    assert schema.extra["options"]["record_layout"] == "canonical"
    assert [t["name"] for t in report["tables"]] == ["user_id", "item_id", "genres", "history"]

    label, sparse, multi = read_rows(out / "train", ["genres", "history"])
    np.testing.assert_array_equal(label, data["label"])
    np.testing.assert_array_equal(sparse[:, 0], hashed(data["user_id"]))
    assert multi["genres"] == [hashed(g) for g in data["genres"]]
    assert multi["history"] == [hashed([h for h in row if h]) for row in data["history"]]
    assert any(not g for g in data["genres"])  # empty fields were there and came back as empty rows

    # Access counts count every token: the total of a multi-valued table is its number of tokens.
    counts = load_counts(out)
    assert int(counts["genres"][1].sum()) == sum(len(g) for g in data["genres"])
    assert int(counts["user_id"][1].sum()) == 1500


def test_resume_and_worker_count_give_identical_bytes(movielens, tmp_path):
    root, _, out, report = movielens

    def shard_bytes(directory):
        return {os.path.relpath(p, directory): open(p, "rb").read()
                for p in sorted(glob.glob(os.path.join(directory, "train", "*.tfrecord")))}

    kwargs = dict(schema=root / "ml.toml", encoding="hash", hash_buckets=BUCKETS, rows_per_shard=400,
                  shard_bytes=20_000)
    two = convert([root / "ml.csv"], tmp_path / "two", "csv", workers=2, **kwargs)
    assert shard_bytes(tmp_path / "two") == shard_bytes(out)
    # An interrupted run: one piece's done marker and shards are gone; the rerun redoes that piece only.
    piece = tmp_path / "two" / "_state" / "piece-00001.json"
    os.remove(piece)
    for path in glob.glob(str(tmp_path / "two" / "train" / "part-00001-*")):
        os.remove(path)
    again = convert([root / "ml.csv"], tmp_path / "two", "csv", **kwargs)
    assert again["pieces_skipped"] == two["pieces"] - 1
    assert shard_bytes(tmp_path / "two") == shard_bytes(out)
    check_report(again, tmp_path / "two")


def _write(tmp_path, text, toml):
    (tmp_path / "in.csv").write_text(text)
    (tmp_path / "s.toml").write_text(toml)
    return tmp_path / "in.csv", tmp_path / "s.toml"


SMALL_TOML = """\
label = "y"
sparse = ["user"]
tags = {type = "categorical", multi = ";"}
"""


def test_empty_fields_empty_tokens_and_bad_rows(tmp_path):
    text = ("y,user,tags\n"
            "1,a,x;y\n"
            "0,b,\n"              # empty field -> empty row
            "2,c,x\n"             # bad label: rejected, the tokens of later rows stay aligned
            "1,d,x;;z\n"          # an empty token is the missing key, as an empty single field is
            "0,e,x;y,extra\n"     # wrong column count
            "1,f,z\n")
    csv_path, toml = _write(tmp_path, text, SMALL_TOML)
    out = tmp_path / "out"
    report = convert([csv_path], out, "csv", schema=toml, encoding="hash", hash_buckets=BUCKETS)
    check_report(report, out)
    assert (report["rows_read"], report["rows_written"], report["rows_rejected"]) == (6, 4, 2)
    assert report["rejected_by_reason"]["bad_label"] == 1 and report["rejected_by_reason"]["wrong_column_count"] == 1
    assert [(line, reason) for path, line, reason, _ in quarantine(out)] == [(4, "bad_label"),
                                                                              (6, "wrong_column_count")]
    assert all(path == str(csv_path) for path, *_ in quarantine(out))
    label, sparse, multi = read_rows(out / "train", ["tags"])
    assert label.tolist() == [1, 0, 1, 1]
    np.testing.assert_array_equal(sparse[:, 0], hashed(["a", "b", "d", "f"]))
    missing = py_hash_id(MISSING, BUCKETS)
    assert multi["tags"] == [hashed(["x", "y"]), [], hashed(["x"]) + [missing] + hashed(["z"]), hashed(["z"])]

    with pytest.raises(ConvertError, match=r"in\.csv line 4 \(bad_label\)"):
        convert([csv_path], tmp_path / "strict", "csv", schema=toml, encoding="hash", strict=True)


def test_vocabulary_counts_tokens_for_min_count(tmp_path):
    # "a" is in three rows, but as a whole field ("a;b", "a;c", "a") only once each: min_count=3 keeps it only if
    # tokens are counted.
    text = "y,user,tags\n1,u,a;b\n0,u,a;c\n1,u,a\n0,u,c\n"
    csv_path, toml = _write(tmp_path, text, SMALL_TOML)
    out = tmp_path / "out"
    convert([csv_path], out, "csv", schema=toml, encoding="vocab", min_count=2)
    with np.load(out / "vocabulary.npz") as vocabulary:
        keys = vocabulary["keys_tags"].tolist()
    assert keys == [py_string_key("a"), py_string_key("c")]  # a: 3 tokens, c: 2; b (1) is below min_count
    _, _, multi = read_rows(out / "train", ["tags"])
    assert multi["tags"] == [[1, 0], [1, 2], [1], [2]]  # ids 1..V by frequency, rare -> 0
    assert Schema.load(out).multi_fields == [{"name": "tags", "cardinality": 3, "delimiter": ";"}]


def test_both_schema_forms_give_the_same_conversion(tmp_path):
    text = "y,user,tags\n1,a,x;y\n0,b,\n"
    csv_path, toml = _write(tmp_path, text, SMALL_TOML)
    natural = tmp_path / "natural.toml"
    natural.write_text('label = "y"\nsparse = ["user"]\nmulti_sparse = {tags = ";"}\n')
    assert layout_for_format("csv", toml) == layout_for_format("csv", natural)
    declared_single = tmp_path / "single.toml"
    declared_single.write_text('label = "y"\nuser = {type = "categorical"}\n'
                               'tags = {type = "categorical", multi = ";"}\n')
    assert layout_for_format("csv", declared_single) == layout_for_format("csv", toml)


@pytest.mark.parametrize("toml, match", [
    ('label = "y"\nsparse = ["user"]\ntags = {type = "categorical", multi = ","}\n', "tags.*multi must be one"),
    ('label = "y"\nsparse = ["user"]\ntags = {type = "dense", multi = ";"}\n', "tags.*type must be one of"),
    ('label = "y"\nsparse = ["user"]\ntags = {type = "categorical", mult = ";"}\n', r"tags.*unknown keys \['mult'\]"),
    ('label = "y"\nsparse = ["user"]\nmulti_sparse = {user = ";"}\n', "must be distinct"),
    ('label = "y"\nsparse = ["user"]\nmulti_sparse = {sparse = ";"}\n', "collide with the record keys"),
    ('label = "y"\nsparse = ["user"]\ntags = "x"\n', r"unknown keys \['tags'\]"),
])
def test_schema_file_errors_name_the_column(tmp_path, toml, match):
    path = tmp_path / "s.toml"
    path.write_text(toml)
    with pytest.raises(FormatError, match=match):
        layout_for_format("csv", path)


def test_what_cannot_take_multi_valued_fields_says_so(movielens, tmp_path):
    root, _, out, _ = movielens
    with pytest.raises(ValueError, match=r"record_layout 'fixed' cannot hold the multi-valued columns \['genres', "
                                         r"'history'\]"):
        convert([root / "ml.csv"], tmp_path / "fixed", "csv", schema=root / "ml.toml", record_layout="fixed")
    with pytest.raises(ValueError, match=r"fixed-width reader .* multi-valued fields \['genres', 'history'\]"):
        read(out / "train", batch_size=8, fixed_width=True)
    with pytest.raises(ValueError, match=r"format 'parquet' does not read multi-valued columns .*genres"):
        layout_for_format("parquet", root / "ml.toml")

    from tfcompress.export.raw_features import load_raw_spec
    from tfcompress.models.features import feature_counts

    with pytest.raises(ValueError, match=r"raw-string serving signature .* \['genres', 'history'\]"):
        load_raw_spec(out)
    with pytest.raises(ValueError, match=r"tfcompress.models architectures .* \['genres', 'history'\]"):
        feature_counts(Schema.load(out))

    from tfcompress._keras import keras
    from tfcompress.export import serving_model

    inputs = {"dense": keras.Input(shape=(2,), name="dense"), "sparse": keras.Input(shape=(2,), dtype="int64",
                                                                                  name="sparse")}
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(inputs["dense"]))
    with pytest.raises(ValueError, match=r"export of a model .* \['genres', 'history'\]"):
        serving_model.feature_counts(model, Schema.load(out))


def test_schema_json_of_datasets_without_multi_fields_is_unchanged(tmp_path):
    schema = Schema(name="toy", dense_names=["I1"], sparse_names=["C1"], cardinalities=[10])
    schema.save(tmp_path)
    assert "multi_fields" not in json.loads((tmp_path / "schema.json").read_text())
    with_multi = Schema(name="toy", sparse_names=["C1"], cardinalities=[10],
                        multi_fields=[{"name": "genres", "cardinality": 20, "delimiter": "|"}])
    assert Schema.load(with_multi.save(tmp_path / "m")) == with_multi
    with pytest.raises(ValueError, match="cardinality of 'genres'"):
        Schema(name="toy", multi_fields=[{"name": "genres", "cardinality": 0, "delimiter": "|"}])


def test_ragged_records_are_deterministic_protobuf_and_parse_back():
    values = {"genres": (np.array([5, 300, 7, 2**40]), np.array([2, 0, 2])), "a": (np.array([1]), np.array([0, 1, 0]))}
    rows = serialize_rows([1, 0, 1], [[0.5], [1.0], [2.0]], [[3, 7], [0, 2], [1, 1]], ragged=values)
    for row, genres, a in zip(rows, [[5, 300], [], [7, 2**40]], [[], [1], []]):
        example = tf.train.Example.FromString(row)
        assert example.SerializeToString(deterministic=True) == row
        assert list(example.features.feature["genres"].int64_list.value) == genres
        assert list(example.features.feature["a"].int64_list.value) == a
    parsed = tf.io.parse_example(tf.constant(rows), {"genres": tf.io.RaggedFeature(tf.int64)})
    assert parsed["genres"].to_list() == [[5, 300], [], [7, 2**40]]
    with pytest.raises(ValueError, match="collide"):
        serialize_rows([1], [[0.0]], [[1]], ragged={"label": (np.array([1]), np.array([1]))})
    with pytest.raises(ValueError, match="row lengths"):
        serialize_rows([1], [[0.0]], [[1]], ragged={"g": (np.array([1, 2]), np.array([1]))})
