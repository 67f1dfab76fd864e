"""Example serialization (tfcompress.data.tfrecord), schema.json (tfcompress.data.schema) and the tf.data reader."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfcompress.data import read
from tfcompress.data.schema import Schema
from tfcompress.data.synthetic import PlantedModel, generate
from tfcompress.data.tfrecord import ShardWriter, serialize_rows

SCALE = 0.001


def _reference_example(label, dense, sparse):
    """The same row through python-protobuf, deterministic (sorted map keys)."""
    return tf.train.Example(features=tf.train.Features(feature={
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "dense": tf.train.Feature(float_list=tf.train.FloatList(value=dense)),
        "sparse": tf.train.Feature(int64_list=tf.train.Int64List(value=sparse)),
    })).SerializeToString(deterministic=True)


def _random_rows(rng, n, n_dense, n_sparse):
    label = rng.integers(0, 2, n)
    dense = (rng.standard_normal((n, n_dense)) * 10.0 ** rng.integers(-3, 6, (n, n_dense))).astype(np.float32)
    # Ids of every varint width (1 to 10 bytes), negatives included.
    sparse = rng.integers(0, 2**63 - 1, (n, n_sparse), dtype=np.int64) >> rng.integers(0, 63, (n, n_sparse))
    sparse[rng.random((n, n_sparse)) < 0.05] *= -1
    return label, dense, sparse


def _schema(n_dense, n_sparse, name="toy"):
    return Schema(name=name, dense_names=[f"d{i}" for i in range(n_dense)],
                  sparse_names=[f"s{i}" for i in range(n_sparse)], cardinalities=[2**62] * n_sparse)


def _collect(ds):
    dense, sparse, label = [], [], []
    for features, y in ds:
        dense.append(features["dense"].numpy())
        sparse.append(features["sparse"].numpy())
        label.append(y.numpy())
    return np.concatenate(dense), np.concatenate(sparse), np.concatenate(label)


def _write_indexed(directory, n, shards, n_dense=2):
    """Rows whose sparse[:, 0] is the row index, so each row can be recognised after any reordering."""
    rows_per_shard = -(-n // shards)
    with ShardWriter(directory, rows_per_shard) as writer:
        writer.write(serialize_rows(np.arange(n) % 2, np.ones((n, n_dense)) * np.arange(n)[:, None],
                                    np.stack([np.arange(n), np.arange(n) * 7], axis=1)))
    _schema(n_dense, 2).save(directory)
    return writer.paths


# ---- serialization --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_dense,n_sparse", [(13, 26), (0, 23), (3, 1), (1, 0)])
def test_serialize_rows_matches_protobuf_and_parses_back(n_dense, n_sparse):
    rng = np.random.default_rng(n_dense * 100 + n_sparse)
    label, dense, sparse = _random_rows(rng, 300, n_dense, n_sparse)
    records = serialize_rows(label, dense, sparse)
    assert len(records) == 300
    for i in range(0, 300, 7):
        assert records[i] == _reference_example(label[i], dense[i], sparse[i])
        example = tf.train.Example.FromString(records[i])
        assert list(example.features.feature["sparse"].int64_list.value) == sparse[i].tolist()
        np.testing.assert_array_equal(np.array(example.features.feature["dense"].float_list.value, np.float32),
                                      dense[i])
    spec = {"label": tf.io.FixedLenFeature([1], tf.int64),
            "dense": tf.io.FixedLenFeature([n_dense], tf.float32),
            "sparse": tf.io.FixedLenFeature([n_sparse], tf.int64)}
    parsed = tf.io.parse_example(tf.constant(records), spec)
    np.testing.assert_array_equal(parsed["label"].numpy()[:, 0], label)
    np.testing.assert_array_equal(parsed["dense"].numpy(), dense)  # float32 bit-exact
    np.testing.assert_array_equal(parsed["sparse"].numpy(), sparse)


def test_serialize_rows_rejects_bad_shapes():
    with pytest.raises(ValueError, match="dense must have shape"):
        serialize_rows([0, 1], np.zeros((3, 2)), np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="integer"):
        serialize_rows([0, 1], np.zeros((2, 2)), np.zeros((2, 2)))
    assert serialize_rows(np.zeros(0, np.int64), np.zeros((0, 2)), np.zeros((0, 3), np.int64)) == []


def test_shard_writer_splits_and_cleans_up(tmp_path):
    records = serialize_rows(np.zeros(25, np.int64), np.zeros((25, 1)), np.arange(25)[:, None])
    with ShardWriter(tmp_path / "ok", rows_per_shard=10) as writer:
        writer.write(records)
    assert [os.path.basename(p) for p in writer.paths] == [
        "part-00000.tfrecord", "part-00001.tfrecord", "part-00002.tfrecord"]
    assert [sum(1 for _ in tf.data.TFRecordDataset(p)) for p in writer.paths] == [10, 10, 5]
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "failed", rows_per_shard=10) as writer:
            writer.write(records[:15])
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path / "failed")) == ["part-00000.tfrecord"]  # no half-written shard left
    with pytest.raises(ValueError, match="rows_per_shard"):
        ShardWriter(tmp_path, rows_per_shard=0)


# ---- schema --------------------------------------------------------------------------------------------------


def test_schema_round_trip_and_lookup(tmp_path):
    schema = Schema(name="criteo", dense_names=["I1", "I2"], sparse_names=["C1"], cardinalities=[7],
                    dense_transform="log1p", encoding="synthetic", extra={"seed": 3})
    path = schema.save(tmp_path)
    assert path == str(tmp_path / "schema.json")
    assert Schema.load(tmp_path) == schema
    assert Schema.load(path) == schema
    os.makedirs(tmp_path / "train")
    assert Schema.load(tmp_path / "train") == schema  # found in the parent
    with open(path) as f:
        text = f.read()
    data = json.loads(text)
    assert list(data) == sorted(data) and data["cardinalities"] == [7]
    assert schema.n_dense == 2 and schema.n_sparse == 1
    schema.save(tmp_path / "again.json")
    with open(tmp_path / "again.json") as f:
        assert f.read() == text  # stable bytes


def test_schema_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        Schema.load(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "schema.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad/schema.json"):
        Schema.load(tmp_path / "bad")
    (tmp_path / "bad" / "schema.json").write_text('{"name": "x", "colour": 1}')
    with pytest.raises(ValueError, match="colour"):
        Schema.load(tmp_path / "bad")
    with pytest.raises(ValueError, match="one entry per sparse column"):
        Schema(name="x", sparse_names=["a", "b"], cardinalities=[3])


# ---- reader --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, dataset="criteo", rows=2500, eval_rows=700, seed=4, cardinality_scale=SCALE, rows_per_shard=1000)
    return out


def test_reader_returns_exactly_the_generated_rows(synthetic_dir):
    expected = PlantedModel("criteo", seed=4, cardinality_scale=SCALE).rows("train", 2500)
    ds = read(synthetic_dir / "train", batch_size=256, shuffle=False, repeat=False, deterministic=True)
    features, label = next(iter(ds))
    assert features["dense"].dtype == tf.float32 and features["sparse"].dtype == tf.int64
    assert label.dtype == tf.float32 and label.shape == (256, 1)
    dense, sparse, label = _collect(ds)
    np.testing.assert_array_equal(dense, expected["dense"])
    np.testing.assert_array_equal(sparse, expected["sparse"])
    np.testing.assert_array_equal(label[:, 0], expected["label"])


def test_reader_shuffle_is_seeded_and_complete(synthetic_dir):
    pattern = str(synthetic_dir / "train" / "part-*.tfrecord")
    runs = [_collect(read(pattern, 100, seed=7, repeat=False, deterministic=True, shuffle_buffer=500))[1]
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    in_order = _collect(read(pattern, 100, shuffle=False, repeat=False, deterministic=True))[1]
    assert not np.array_equal(runs[0], in_order)
    assert sorted(map(tuple, runs[0])) == sorted(map(tuple, in_order))


@pytest.mark.parametrize("shards", [4, 1])  # 4 files: file sharding; 1 file: record sharding
def test_two_input_pipelines_cover_each_row_once(tmp_path, shards):
    _write_indexed(tmp_path, 103, shards)
    seen = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline)
        _, sparse, _ = _collect(read(tmp_path, 8, seed=1, repeat=False, input_context=context))
        seen.append(sparse[:, 0])
    assert len(seen[0]) > 0 and len(seen[1]) > 0
    assert sorted(np.concatenate(seen).tolist()) == list(range(103))


def test_reader_list_of_files_repeat_and_drop_remainder(tmp_path):
    paths = _write_indexed(tmp_path, 30, 3)
    ds = read(list(reversed(paths)), 7, repeat=True, shuffle=False, deterministic=True, drop_remainder=True)
    assert ds.element_spec[1].shape == (7, 1)
    batches = list(ds.take(9))  # 63 rows > 30: the data repeats
    index = np.concatenate([b[0]["sparse"].numpy()[:, 0] for b in batches])
    np.testing.assert_array_equal(index[:30], np.r_[20:30, 10:20, 0:10])  # files in the order given
    np.testing.assert_array_equal(index[30:60], index[:30])
    dense = batches[0][0]["dense"].numpy()
    np.testing.assert_array_equal(dense, np.stack([np.r_[20:27]] * 2, axis=1))


def test_reader_avazu_has_empty_dense(tmp_path):
    generate(tmp_path, dataset="avazu", rows=300, eval_rows=0, cardinality_scale=SCALE)
    features, label = next(iter(read(tmp_path / "train", 64, seed=0)))
    assert features["dense"].shape == (64, 0) and features["sparse"].shape == (64, 23)


def test_reader_errors(tmp_path, synthetic_dir):
    with pytest.raises(FileNotFoundError, match="no-such-"):
        read(str(tmp_path / "no-such-*.tfrecord"), 8)
    with pytest.raises(FileNotFoundError, match="no \\*.tfrecord files"):
        read(tmp_path, 8)
    # Shards without a schema.json next to them or above.
    (tmp_path / "deep" / "er").mkdir(parents=True)
    with ShardWriter(tmp_path / "deep" / "er", 10) as writer:
        writer.write(serialize_rows([1], [[0.0]], [[1]]))
    with pytest.raises(FileNotFoundError, match="schema.json"):
        read(tmp_path / "deep" / "er", 8)
    # A schema that disagrees with the records.
    with pytest.raises(ValueError, match="schema mismatch.*26 'sparse'"):
        read(synthetic_dir / "train", 8, schema=_schema(13, 5))
    with pytest.raises(ValueError, match="batch_size"):
        read(synthetic_dir / "train", 0)
