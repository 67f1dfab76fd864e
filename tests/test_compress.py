"""`tfcompress.compress(model)`: the rewrite of a user's own model (docs/compress.md).

`method="full"` proves the rewrite itself (predictions equal the original's exactly); the ROBE cases prove what
the user gets: one shared array, sizes as asked, a model that trains with the user's unchanged `compile`/`fit`.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import tfcompress
from tfcompress._keras import USING_LEGACY_KERAS, keras
from tfcompress.layers import CompressedEmbedding
from tfcompress.model_compress import plan_and_replacements

ROOT = Path(__file__).resolve().parents[1]
USERS, ITEMS, GENRES, HISTORY = 20_000, 30_000, 20, 6


def ranking_model():
    """A small MovieLens-shaped functional model: user [B], history [B, L] (mask_zero), a small genre table, dense."""
    user = keras.Input((), dtype="int64", name="user")
    history = keras.Input((HISTORY,), dtype="int64", name="history")
    genre = keras.Input((), dtype="int64", name="genre")
    dense = keras.Input((3,), dtype="float32", name="dense")
    user_vector = keras.layers.Embedding(USERS, 8, name="user_embedding")(user)
    history_vectors = keras.layers.Embedding(ITEMS, 8, mask_zero=True, name="history_embedding")(history)
    history_vector = keras.layers.GlobalAveragePooling1D(name="history_pool")(history_vectors)
    genre_vector = keras.layers.Embedding(GENRES, 4, name="genre_embedding")(genre)
    joined = keras.layers.Concatenate(name="joined")([user_vector, history_vector, genre_vector, dense])
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(joined)
    output = keras.layers.Dense(1, activation="sigmoid", name="click")(hidden)
    return keras.Model({"user": user, "history": history, "genre": genre, "dense": dense}, output, name="ranker")


def ranking_batch(rows=256, seed=0, active_users=USERS):
    """Rows of `ranking_model`'s inputs; users drawn from the first `active_users` ids, label = user id parity.

    With few active users each is seen often enough for its embedding to learn its label (even ids click).
    """
    rng = np.random.default_rng(seed)
    features = {
        "user": rng.integers(0, active_users, rows).astype(np.int64),
        "history": np.where(rng.random((rows, HISTORY)) < 0.3, 0, rng.integers(1, ITEMS, (rows, HISTORY))),
        "genre": rng.integers(0, GENRES, rows).astype(np.int64),
        "dense": rng.normal(size=(rows, 3)).astype(np.float32),
    }
    # At least one movie per history: GlobalAveragePooling1D of an all-masked row is 0/0 = NaN.
    features["history"][:, 0] = rng.integers(1, ITEMS, rows)
    features["history"] = features["history"].astype(np.int64)
    labels = (features["user"] % 2 == 0).astype(np.float32)
    return features, labels


def sequential_model():
    return keras.Sequential([
        keras.Input((4,), dtype="int64"),
        keras.layers.Embedding(USERS, 8, name="ids_embedding"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(1, name="score"),
    ], name="sequential")


def nested_model():
    """A functional model whose user tower is a nested functional model holding the large table."""
    user = keras.Input((), dtype="int64", name="user")
    tower_input = keras.Input((), dtype="int64", name="tower_user")
    tower_out = keras.layers.Dense(8, name="tower_dense")(
        keras.layers.Embedding(USERS, 8, name="user_embedding")(tower_input))
    tower = keras.Model(tower_input, tower_out, name="user_tower")
    item = keras.Input((), dtype="int64", name="item")
    item_vector = keras.layers.Embedding(ITEMS, 8, name="item_embedding")(item)
    score = keras.layers.Dot(axes=1, name="score")([tower(user), item_vector])
    return keras.Model({"user": user, "item": item}, score, name="two_tower")


def predict(model, features):
    return np.asarray(model(features, training=False))


def compressed_layers(model):
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, CompressedEmbedding)]


@pytest.mark.parametrize("build", [ranking_model, sequential_model, nested_model])
def test_full_method_predicts_exactly_what_the_original_does(build):
    model = build()
    rng = np.random.default_rng(1)
    if build is ranking_model:
        features, _ = ranking_batch(64)
    elif build is sequential_model:
        features = rng.integers(0, USERS, (64, 4)).astype(np.int64)
    else:
        features = {"user": rng.integers(0, USERS, 64), "item": rng.integers(0, ITEMS, 64)}
    compressed = tfcompress.compress(model, method="full", min_rows=1000, verbose=False)
    assert len(compressed_layers(compressed)) == (1 if build is sequential_model else 2)
    np.testing.assert_array_equal(predict(compressed, features), predict(model, features))


@pytest.mark.parametrize("method", ["full", "robe"])
def test_a_table_called_twice_stays_one_table(method):
    """One item table read by the candidate item [B] and the history [B, L], as MovieLens models often do."""
    item = keras.Input((), dtype="int64", name="item")
    history = keras.Input((HISTORY,), dtype="int64", name="history")
    table = keras.layers.Embedding(ITEMS, 8, name="item_embedding")
    item_vector = table(item)
    history_vector = keras.layers.GlobalAveragePooling1D(name="pool")(table(history))
    score = keras.layers.Dot(axes=1, name="score")([item_vector, history_vector])
    model = keras.Model({"item": item, "history": history}, score)
    rng = np.random.default_rng(2)
    features = {"item": rng.integers(0, ITEMS, 32), "history": rng.integers(0, ITEMS, (32, HISTORY))}
    kwargs = {"ratio": 10} if method == "robe" else {}
    compressed = tfcompress.compress(model, method=method, verbose=False, **kwargs)
    (layer,) = compressed_layers(compressed)
    assert len(layer._inbound_nodes) == 2
    if method == "full":
        np.testing.assert_array_equal(predict(compressed, features), predict(model, features))
    else:
        assert np.all(np.isfinite(predict(compressed, features)))
        # Both calls read the same rows: the history of one id equals that id's item vector.
        same = {"item": np.full(4, 7), "history": np.full((4, HISTORY), 7)}
        lookup = layer(np.array([7]))
        np.testing.assert_allclose(predict(compressed, same).ravel(),
                                   np.full(4, float(np.sum(np.asarray(lookup) ** 2))), rtol=1e-5)


def test_names_inputs_outputs_and_other_weights_are_kept():
    model = ranking_model()
    compressed = tfcompress.compress(model, ratio=100, verbose=False)
    assert compressed.name == model.name
    assert [layer.name for layer in compressed.layers] == [layer.name for layer in model.layers]
    assert [t.name for t in compressed.inputs] == [t.name for t in model.inputs]
    assert [tuple(t.shape) for t in compressed.outputs] == [tuple(t.shape) for t in model.outputs]
    for name in ("hidden", "click", "genre_embedding"):
        for old, new in zip(model.get_layer(name).get_weights(), compressed.get_layer(name).get_weights()):
            np.testing.assert_array_equal(old, new)
    for name in ("user_embedding", "history_embedding"):
        layer = compressed.get_layer(name)
        assert isinstance(layer, CompressedEmbedding)
        old = model.get_layer(name)
        assert (layer.input_dim, layer.output_dim, layer.mask_zero) == (old.input_dim, old.output_dim, old.mask_zero)


def test_min_rows_keeps_smaller_tables_as_they_are():
    model = ranking_model()
    compressed = tfcompress.compress(model, ratio=10, min_rows=ITEMS, verbose=False)
    assert isinstance(compressed.get_layer("history_embedding"), CompressedEmbedding)
    for name in ("user_embedding", "genre_embedding"):  # 20,000 and 20 rows < min_rows
        assert type(compressed.get_layer(name)) is keras.layers.Embedding
        np.testing.assert_array_equal(compressed.get_layer(name).get_weights()[0],
                                      model.get_layer(name).get_weights()[0])
    with pytest.raises(ValueError, match="min_rows=100,000"):
        tfcompress.compress(model, min_rows=100_000, verbose=False)


def _variables_by_size(model):
    return sorted(int(np.prod(v.shape)) for v in model.weights)


def test_shared_robe_memory_is_one_array_of_the_planned_size():
    model = ranking_model()
    compressed = tfcompress.compress(model, ratio=100, verbose=False)
    replaced_logical = (USERS + ITEMS) * 8
    memory_size = replaced_logical // 100
    embedding_variables = {id(v): v for layer in compressed_layers(compressed) for v in layer.weights}
    assert [int(np.prod(v.shape)) for v in embedding_variables.values()] == [memory_size]
    # The whole model: its other weights are the original's, plus that one array (no per-table copies).
    replaced = {id(v) for name in ("user_embedding", "history_embedding") for v in model.get_layer(name).weights}
    others = [int(np.prod(v.shape)) for v in model.weights if id(v) not in replaced]
    assert _variables_by_size(compressed) == sorted(others + [memory_size])
    assert len(compressed.trainable_weights) == len(model.trainable_weights) - 1


def test_unshared_robe_gives_one_array_per_table():
    compressed = tfcompress.compress(ranking_model(), ratio=100, share=False, verbose=False)
    sizes = sorted(int(np.prod(v.shape)) for layer in compressed_layers(compressed) for v in layer.weights)
    assert sizes == [USERS * 8 // 100, ITEMS * 8 // 100]


@pytest.mark.parametrize("method", ["robe", "hashing"])
def test_budget_counts_every_table_and_is_met(method):
    model = ranking_model()
    budget = 20_000  # bytes: the kept 20x4 genre table (320 B) + the two compressed ones
    plan, _ = plan_and_replacements(model, budget=budget, method=method)
    assert plan.physical_bytes <= budget
    assert plan.physical_bytes >= 0.9 * budget
    compressed = tfcompress.compress(model, budget=budget, method=method, verbose=False)
    embedding_bytes = 4 * sum(int(np.prod(v.shape)) for v in {
        id(v): v for layer in compressed._flatten_layers(include_self=False)
        if isinstance(layer, (CompressedEmbedding, keras.layers.Embedding)) for v in layer.weights}.values())
    assert embedding_bytes == plan.physical_bytes
    with pytest.raises(ValueError, match="used up by the tables kept"):  # the kept 20,000 x 8 user table: 640 kB
        tfcompress.compress(model, budget="100kB", min_rows=ITEMS, verbose=False)
    with pytest.raises(ValueError, match="holds every table uncompressed"):
        tfcompress.compress(model, budget="10MB", verbose=False)


@pytest.mark.parametrize("method", ["hashing", "qr", "mlet", "pruned"])
def test_every_method_compresses_and_trains_one_step(method):
    model = ranking_model()
    compressed = tfcompress.compress(model, ratio=10, method=method, verbose=False)
    plan, _ = plan_and_replacements(model, ratio=10, method=method)
    assert [t.action for t in plan.tables] == [method if t.rows >= 10_000 else "kept" for t in plan.tables]
    # Chunk pruning also stores its int address table and float utilities per chunk, counted in its bytes.
    assert plan.physical_bytes < plan.logical_bytes / (2 if method == "pruned" else 5)
    features, labels = ranking_batch(256)
    compressed.compile(optimizer="adam", loss="binary_crossentropy")
    loss = compressed.train_on_batch(features, labels)
    assert np.isfinite(loss)
    assert {layer.method for layer in compressed_layers(compressed)} == {method}


def test_plan_table_is_printed(capsys):
    tfcompress.compress(ranking_model(), ratio=100)
    printed = capsys.readouterr().out
    for text in ("user_embedding", "history_embedding", "genre_embedding", "kept", "shared ROBE memory", "total",
                 "2 of 3 embedding tables replaced"):
        assert text in printed, printed


def test_robe_model_fits_with_the_users_own_script_and_learns():
    model = ranking_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    compressed = tfcompress.compress(model, ratio=50, verbose=False)
    features, labels = ranking_batch(4096, active_users=200)
    # Compiled like the original (loss, a fresh optimizer): fit runs at once.
    assert np.isfinite(compressed.fit(features, labels, batch_size=1024, epochs=1, verbose=0).history["loss"][0])
    compressed = tfcompress.compress(model, ratio=50, verbose=False)
    # The user's script: compile and fit exactly as for the original.
    compressed.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    history = compressed.fit(features, labels, batch_size=256, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] - 0.2, losses  # from ~0.69: the users' labels are learned through ROBE


def test_keras_file_round_trip_of_the_compressed_model(tmp_path):
    model = tfcompress.compress(ranking_model(), ratio=100, verbose=False)
    features, _ = ranking_batch(64)
    path = str(tmp_path / "compressed.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(predict(loaded, features), predict(model, features))
    shared = {id(v) for layer in compressed_layers(loaded) for v in layer.weights}
    assert len(shared) == 1, "the loaded layers must read one shared memory again"


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.embedding = keras.layers.Embedding(USERS, 8)
        self.score = keras.layers.Dense(1)

    def call(self, ids):
        return self.score(self.embedding(ids))


def test_subclassed_model_is_refused_pointing_to_the_drop_in_layer():
    model = Subclassed()
    model(np.zeros((2,), np.int64))
    with pytest.raises(ValueError, match="subclassed model.*CompressedEmbedding"):
        tfcompress.compress(model, verbose=False)
    ids = keras.Input((), dtype="int64")
    outer = keras.Model(ids, Subclassed()(ids))
    with pytest.raises(ValueError, match="nested model .*subclassed.*CompressedEmbedding"):
        tfcompress.compress(outer, verbose=False)


def test_bad_arguments_are_named():
    model = ranking_model()
    for kwargs, message in [
        (dict(ratio=10, budget="1MB"), "ratio or budget, not both"),
        (dict(ratio=0.5), "ratio must be a number >= 1"),
        (dict(method="zip"), "method must be one of"),
        (dict(method="full", ratio=10), "method 'full'"),
        (dict(min_rows=0), "min_rows"),
        (dict(budget="ten"), "budget"),
    ]:
        with pytest.raises(ValueError, match=message):
            tfcompress.compress(model, verbose=False, **kwargs)
    with pytest.raises(TypeError, match="expected a Keras model"):
        tfcompress.compress(keras.layers.Dense(3), verbose=False)


def test_an_unshared_table_starts_from_the_users_initializer():
    ids = keras.Input((), dtype="int64")
    out = keras.layers.Embedding(USERS, 8, embeddings_initializer="ones", name="ones")(ids)
    compressed = tfcompress.compress(keras.Model(ids, out), ratio=10, method="hashing", verbose=False)
    (table,) = compressed.get_layer("ones").get_weights()
    assert table.shape == (USERS // 10, 8)
    np.testing.assert_array_equal(table, np.ones_like(table))


def test_embedding_settings_that_cannot_be_kept_are_refused():
    ids = keras.Input((), dtype="int64")
    out = keras.layers.Embedding(USERS, 4, embeddings_regularizer="l2", name="regularized")(ids)
    with pytest.raises(ValueError, match="'regularized' has embeddings_regularizer"):
        tfcompress.compress(keras.Model(ids, out), verbose=False)


# ---- keras-rs (Keras 3 only) -------------------------------------------------------------------------------------


@pytest.mark.skipif(USING_LEGACY_KERAS, reason="keras-rs is a Keras 3 library")
@pytest.mark.parametrize("kind", ["ragged", "sparse"])
@pytest.mark.parametrize("combiner", ["mean", "sum", "sqrtn"])
def test_keras_rs_embed_reduce_over_bags_is_replaced_with_its_combiner(combiner, kind):
    keras_rs = pytest.importorskip("keras_rs")
    bags = tf.ragged.constant([[1, 2, 3], [4], [], [19_999, 5, 5, 6]], dtype=tf.int64)  # an empty bag too
    if kind == "ragged":
        genres = keras.Input((None,), dtype="int64", ragged=True, name="genres")
        ids = bags
    else:
        genres = keras.Input((4,), dtype="int64", sparse=True, name="genres")
        ids = bags.to_sparse()
    bag = keras_rs.layers.EmbedReduce(USERS, 8, combiner=combiner, name="genre_bag")(genres)
    model = keras.Model(genres, keras.layers.Dense(1, name="score")(bag))
    compressed = tfcompress.compress(model, method="full", min_rows=1000, verbose=False)
    layer = compressed.get_layer("genre_bag")
    assert isinstance(layer, CompressedEmbedding) and layer.combiner == combiner
    np.testing.assert_allclose(predict(compressed, ids), predict(model, ids), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(USING_LEGACY_KERAS, reason="keras-rs is a Keras 3 library")
def test_keras_rs_embed_reduce_over_dense_ids_is_refused():
    keras_rs = pytest.importorskip("keras_rs")
    genres = keras.Input((3,), dtype="int64", name="genres")
    bag = keras_rs.layers.EmbedReduce(USERS, 8, name="dense_bag")(genres)
    model = keras.Model(genres, keras.layers.Dense(1)(bag))
    with pytest.raises(ValueError, match="'dense_bag'.*ragged"):
        tfcompress.compress(model, verbose=False)


def distributed_model(keras_rs):
    """A keras-rs DistributedEmbedding over a large user table and a small item table read by two features."""
    users = keras_rs.layers.TableConfig(name="users", vocabulary_size=USERS, embedding_dim=8, combiner="mean")
    items = keras_rs.layers.TableConfig(name="items", vocabulary_size=300, embedding_dim=8, combiner="mean")
    features = {
        "user": keras_rs.layers.FeatureConfig(name="user", table=users, input_shape=(16,), output_shape=(16, 8)),
        "item": keras_rs.layers.FeatureConfig(name="item", table=items, input_shape=(16,), output_shape=(16, 8)),
        "history": keras_rs.layers.FeatureConfig(name="history", table=items, input_shape=(16, 5),
                                                 output_shape=(16, 8)),
    }
    inputs = {"user": keras.Input((), dtype="int64", batch_size=16, name="user"),
              "item": keras.Input((), dtype="int64", batch_size=16, name="item"),
              "history": keras.Input((5,), dtype="int64", batch_size=16, name="history")}
    embedded = keras_rs.layers.DistributedEmbedding(features, name="distributed")(inputs)
    joined = keras.layers.Concatenate(name="joined")([embedded["user"], embedded["item"], embedded["history"]])
    genre = keras.Input((), dtype="int64", batch_size=16, name="genre")
    genre_vector = keras.layers.Embedding(ITEMS, 8, name="genre_embedding")(genre)
    joined = keras.layers.Concatenate(name="all")([joined, genre_vector])
    return keras.Model({**inputs, "genre": genre}, keras.layers.Dense(1, name="score")(joined), name="distributed")


def distributed_batch(batches=1, seed=0):
    rng = np.random.default_rng(seed)
    rows = 16 * batches
    users = rng.integers(0, 100, rows)
    features = {"user": users, "item": rng.integers(0, 300, rows), "history": rng.integers(0, 300, (rows, 5)),
                "genre": rng.integers(0, ITEMS, rows)}
    return features, (users % 2).astype(np.float32)


@pytest.mark.skipif(USING_LEGACY_KERAS, reason="keras-rs is a Keras 3 library")
def test_keras_rs_distributed_embedding_becomes_compressed_embeddings():
    keras_rs = pytest.importorskip("keras_rs")
    model = distributed_model(keras_rs)
    features, labels = distributed_batch()
    full = tfcompress.compress(model, method="full", verbose=False)
    assert isinstance(full.get_layer("distributed"), tfcompress.layers.CompressedEmbeddings)
    np.testing.assert_array_equal(predict(full, features), predict(model, features))

    plan, _ = plan_and_replacements(model, ratio=100)
    assert [(t.path, t.rows, t.action) for t in plan.tables] == [
        ("distributed/items", 300, "robe"), ("distributed/users", USERS, "robe"), ("genre_embedding", ITEMS, "robe")]
    # The DistributedEmbedding's tables share its own memory; the Embedding reads the compress memory.
    assert [m.label for m in plan.shared_memories] == ["shared ROBE memory", "distributed: shared ROBE memory"]
    assert plan.ratio == pytest.approx(100, rel=0.01)
    budget = 40_000
    plan, _ = plan_and_replacements(model, budget=budget)
    assert budget - 8 <= plan.physical_bytes <= budget

    compressed = tfcompress.compress(model, ratio=20, verbose=False)
    compressed.compile(optimizer=keras.optimizers.Adam(0.02), loss="binary_crossentropy")
    features, labels = distributed_batch(64)
    losses = compressed.fit(features, labels, batch_size=16, epochs=4, verbose=0).history["loss"]
    assert losses[-1] < losses[0] - 0.1, losses


# ---- legacy tf.keras ---------------------------------------------------------------------------------------------

LEGACY_SCRIPT = """
import numpy as np, tensorflow as tf, tfcompress, tf_keras
from tfcompress._keras import keras
assert keras is tf_keras
from tests.test_compress import ITEMS, USERS, nested_model, ranking_model, ranking_batch, predict, sequential_model
rng = np.random.default_rng(0)
for build, inputs in [(sequential_model, rng.integers(0, USERS, (64, 4))),
                      (nested_model, {"user": rng.integers(0, USERS, 64), "item": rng.integers(0, ITEMS, 64)})]:
    original = build()
    copy = tfcompress.compress(original, method="full", min_rows=1000, verbose=False)
    assert np.array_equal(predict(copy, inputs), predict(original, inputs)), build.__name__
model = ranking_model()
features, labels = ranking_batch(512)
full = tfcompress.compress(model, method="full", min_rows=1000, verbose=False)
assert np.array_equal(predict(full, features), predict(model, features))
model.compile(optimizer="adam", loss="binary_crossentropy")
small = tfcompress.compress(model, ratio=100)
small.compile(optimizer=tf_keras.optimizers.Adam(0.01), loss="binary_crossentropy")
losses = small.fit(features, labels, batch_size=128, epochs=3, verbose=0).history["loss"]
assert losses[-1] < losses[0], losses
memories = {id(v) for l in small.layers if type(l).__name__ == "CompressedEmbedding" for v in l.weights}
assert len(memories) == 1, memories
print("LEGACY-OK", [type(l).__name__ for l in small.layers])
"""


@pytest.mark.skipif(USING_LEGACY_KERAS, reason="runs the legacy stack in a child process itself")
def test_legacy_tf_keras_model_compresses_and_trains():
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", LEGACY_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "LEGACY-OK" in done.stdout and "shared ROBE memory" in done.stdout
