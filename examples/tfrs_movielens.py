"""A TensorFlow Recommenders ranking model over MovieLens-shaped data on legacy tf.keras, compressed by one
`tfcompress.compress` call.

tensorflow-recommenders (TFRS) 0.7.7 runs only on legacy tf.keras: `TF_USE_LEGACY_KERAS=1` with the tf-keras
package, set before TensorFlow is imported (this script sets it first thing); tfcompress reads the same variable.

The TFRS pattern: a functional ranking network (string ids looked up inside it with `StringLookup` -> plain
`tf.keras.layers.Embedding`, a user-history sequence with `mask_zero=True`, the genre bag padded with "" and
averaged over its unmasked entries, two dense features, two `tfrs.layers.dcn.Cross` layers, an MLP) held by a
`tfrs.models.Model` whose loss is a `tfrs.tasks.Ranking` task. `compress` rewrites the functional network (a
`tfrs.models.Model` is a subclassed model, which `compress` refuses, pointing to the drop-in layer):

    ranker = tfcompress.compress(build_ranker(...), ratio=RATIO)   # the one line
    model = RankingModel(ranker)                                   # TFRS as before
    model.compile(optimizer); model.fit(dataset)

The full and the compressed network are trained the same way (the compressed tables on tfcompress's fused custom
op when its library loads) and scored by AUC on held-out generated rows. The compressed functional network (not the
`tfrs.models.Model`, which only adds the loss) is exported by `tfcompress.export.export_saved_model` (each layer's
stock-op `serving_lookup`; signatures over the network's raw string and float inputs) and checked by
`tfcompress.export.verify.verify` in a fresh process that never imports tfcompress.

Run:

    python examples/tfrs_movielens.py --work-dir /tmp/tfrs_movielens

It prints verify's report and writes WORK_DIR/results.json, WORK_DIR/saved_models/tfrs_movielens_ranker/1 and
WORK_DIR/serving_check.npz, as examples/keras_rs_movielens.py does.
"""

import os

# Before TensorFlow is imported: tf.keras (and so TFRS) and tfcompress use tf_keras.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402

import tfcompress  # noqa: E402
from tfcompress.data.synthetic_movielens import GENRES, item_ids, user_ids  # noqa: E402
from tfcompress.metrics import exact_auc  # noqa: E402

# The data, the tf.data pipeline, export + verify, results.json and the command line, shared with
# examples/keras_rs_movielens.py (this directory is on sys.path when the script runs).
from _movielens_common import (MAX_GENRES, dataset, embedding_bytes, export_and_save_results, main,  # noqa: E402
                               make_data, predict)


@tf.keras.utils.register_keras_serializable(package="tfrs_movielens")
class MaskedMean(tf.keras.layers.Layer):
    """Mean of the unmasked steps of [B, L, D] -> [B, D]; zeros for a row with none (GlobalAveragePooling1D: NaN)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, values, mask=None):
        if mask is None:
            return tf.reduce_mean(values, axis=1)
        weights = tf.cast(mask, values.dtype)[..., None]
        return tf.math.divide_no_nan(tf.reduce_sum(values * weights, axis=1), tf.reduce_sum(weights, axis=1))

    def compute_mask(self, inputs, mask=None):
        return None


def build_ranker(num_users, num_items, history_length, embedding_dim=32, hidden_units=64):
    """The functional ranking network with plain `tf.keras.layers.Embedding` tables."""
    layers = tf.keras.layers
    inputs = {
        "user_id": tf.keras.Input((), dtype=tf.string, name="user_id"),
        "item_id": tf.keras.Input((), dtype=tf.string, name="item_id"),
        "history": tf.keras.Input((history_length,), dtype=tf.string, name="history"),
        "genres": tf.keras.Input((MAX_GENRES,), dtype=tf.string, name="genres"),
        "age": tf.keras.Input((), dtype=tf.float32, name="age"),
        "hour_of_day": tf.keras.Input((), dtype=tf.float32, name="hour_of_day"),
    }
    items = item_ids(num_items)
    user = layers.Embedding(num_users + 1, embedding_dim, name="user_embedding")(
        layers.StringLookup(vocabulary=user_ids(num_users), name="user_lookup")(inputs["user_id"]))
    item = layers.Embedding(num_items + 1, embedding_dim, name="item_embedding")(
        layers.StringLookup(vocabulary=items, name="item_lookup")(inputs["item_id"]))
    # mask_token="" maps the padding to 0, which Embedding(mask_zero=True) masks.
    history = layers.Embedding(num_items + 2, embedding_dim, mask_zero=True, name="history_embedding")(
        layers.StringLookup(vocabulary=items, mask_token="", name="history_lookup")(inputs["history"]))
    genres = layers.Embedding(len(GENRES) + 2, 8, mask_zero=True, name="genre_embedding")(
        layers.StringLookup(vocabulary=list(GENRES), mask_token="", name="genre_lookup")(inputs["genres"]))
    dense = layers.Concatenate(name="dense_features")([
        layers.Reshape((1,), name="age_column")(layers.Rescaling(1 / 70, name="age_scale")(inputs["age"])),
        layers.Reshape((1,), name="hour_column")(layers.Rescaling(1 / 24, name="hour_scale")(inputs["hour_of_day"])),
    ])
    x0 = layers.Concatenate(name="features")(
        [user, item, MaskedMean(name="history_mean")(history), MaskedMean(name="genre_bag")(genres), dense])
    x = tfrs.layers.dcn.Cross(projection_dim=embedding_dim, name="cross_1")(x0)
    x = tfrs.layers.dcn.Cross(projection_dim=embedding_dim, name="cross_2")(x0, x)
    x = layers.Dense(hidden_units, activation="relu", name="hidden")(x)
    probability = layers.Dense(1, activation="sigmoid", name="probability")(x)
    return tf.keras.Model(inputs, probability, name="tfrs_movielens_ranker")


class RankingModel(tfrs.models.Model):
    """TFRS model: the ranking network plus a `tfrs.tasks.Ranking` task."""

    def __init__(self, ranker):
        super().__init__()
        self.ranker = ranker
        self.task = tfrs.tasks.Ranking(loss=tf.keras.losses.BinaryCrossentropy(),
                                       metrics=[tf.keras.metrics.AUC(name="auc")])

    def call(self, features, training=False):
        return self.ranker(features, training=training)

    def compute_loss(self, inputs, training=False):
        features, labels = inputs
        return self.task(labels=labels, predictions=self.ranker(features, training=training))


def run(work_dir, rows=100_000, eval_rows=20_000, num_users=20_000, num_items=12_000, history_length=10,
        embedding_dim=32, ratio=100, min_rows=10_000, epochs=3, batch_size=512, learning_rate=2e-3, seed=0):
    """Generate, build, compress, train both, evaluate, export; returns the results (also WORK_DIR/results.json)."""
    os.makedirs(work_dir, exist_ok=True)
    train, held_out, labels, ceiling_auc = make_data(rows, eval_rows, num_users, num_items, history_length, seed)
    results = {"rows": rows, "eval_rows": eval_rows, "num_users": num_users, "num_items": num_items,
               "ratio": ratio, "min_rows": min_rows, "epochs": epochs, "ceiling_auc": ceiling_auc}
    for variant in ("full", "compressed"):
        tf.keras.utils.set_random_seed(seed)
        ranker = build_ranker(num_users, num_items, history_length, embedding_dim)
        if variant == "compressed":
            results["full_parameters"] = int(ranker.count_params())
            results["full_embedding_bytes"] = embedding_bytes(ranker, tf.keras.layers.Embedding)
            ranker = tfcompress.compress(ranker, ratio=ratio, min_rows=min_rows)  # the one line
            results["compressed_parameters"] = int(ranker.count_params())
            results["compressed_embedding_bytes"] = embedding_bytes(ranker, tf.keras.layers.Embedding)
        model = RankingModel(ranker)
        model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate))
        model.fit(dataset(train, labels[:rows], batch_size, shuffle_seed=seed), epochs=epochs, verbose=2)
        results[f"{variant}_auc"] = float(exact_auc(labels[rows:], predict(ranker, held_out)))

    # The functional network is exported: the tfrs.models.Model wrapper only adds the loss.
    return export_and_save_results(ranker, "tfrs_movielens_ranker", held_out, work_dir, results)


if __name__ == "__main__":
    main(run, __doc__.split("\n\n")[0], "tfrs_movielens_")
