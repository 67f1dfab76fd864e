"""A Keras 3 + keras-rs ranking model over MovieLens-shaped data, compressed by one `tfcompress.compress` call.

The model is written the way a keras-rs user writes it, with plain `keras.layers.Embedding` tables and string ids
looked up inside the model:

    user_id  str [B]     -> StringLookup -> Embedding(users + 1, d)
    item_id  str [B]     -> StringLookup -> Embedding(items + 1, d)
    history  str [B, L]  -> StringLookup(mask_token="") -> Embedding(items + 2, d, mask_zero=True) -> masked mean
    genres   str [B, G]  -> StringLookup(mask_token="") -> Embedding(genres + 2, 8, mask_zero=True) -> masked mean
                            (the multi-hot genre bag, padded with "" to G genres: a mean combiner over the bag)
    age, hour_of_day f32 [B] -> rescaled dense features
    all of it -> two keras_rs.layers.FeatureCross (DCN) layers -> MLP -> P(like)

Then the one line this example is about::

    compressed = tfcompress.compress(model, ratio=RATIO)   # every table >= min_rows rows: one shared ROBE array

Both models, the original and the compressed one, are trained the same way (`compile` + `fit`, same data, same
seed) and scored by AUC on held-out rows of the same generated world (`tfcompress.data.synthetic_movielens`, nothing
downloaded). The compressed tables train on tfcompress's fused custom op (when its library loads). The compressed
model is then exported with the project's exporter and checked in a fresh process (`export_and_verify` in
examples/_movielens_common.py, which holds what the two MovieLens examples share):

    path = tfcompress.export.export_saved_model(model, base_dir=..., sample_inputs=held_out_rows)
    tfcompress.export.verify.verify(path)    # a process that never imports tfcompress

The exporter traces each compressed layer's stock-op `serving_lookup` in place of the fused op (TF Serving cannot
load custom ops), with a `serving_default` signature over the model's own inputs (the raw strings and floats) and an
`examples` signature over serialized tf.Examples (docs/export_contract.md, "Models with other inputs").

Run (the numbers in BENCHMARKS.md):

    python examples/keras_rs_movielens.py --work-dir /tmp/keras_rs_movielens

It prints the plan table and verify's report, and writes WORK_DIR/results.json (parameters and bytes before/after,
AUC of both models, the planted ceiling AUC, the layers that trained on the fused op, the export path and verify's
check statuses), the SavedModel under WORK_DIR/saved_models/movielens_ranker/1 and WORK_DIR/serving_check.npz
(held-out inputs and the compressed model's predictions).
"""

import os

import keras
import keras_rs

import tfcompress
from tfcompress.data.synthetic_movielens import GENRES, item_ids, user_ids
from tfcompress.metrics import exact_auc

# The data, the tf.data pipeline, export + verify, results.json and the command line, shared with
# examples/tfrs_movielens.py (this directory is on sys.path when the script runs).
from _movielens_common import (MAX_GENRES, dataset, embedding_bytes, export_and_save_results, main,  # noqa: E402
                               make_data, predict)


@keras.saving.register_keras_serializable(package="keras_rs_movielens")
class MaskedMean(keras.layers.Layer):
    """Mean of the unmasked steps of [B, L, D] -> [B, D]; zeros for a row with none (an empty history or bag).

    `keras.layers.GlobalAveragePooling1D` divides by the mask's sum, which is 0/0 = NaN for such a row.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, values, mask=None):
        if mask is None:
            return keras.ops.mean(values, axis=1)
        weights = keras.ops.expand_dims(keras.ops.cast(mask, values.dtype), -1)
        return keras.ops.divide_no_nan(keras.ops.sum(values * weights, axis=1), keras.ops.sum(weights, axis=1))

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


def build_ranking_model(num_users, num_items, history_length, embedding_dim=32, cross_layers=2, hidden_units=64):
    """The keras-rs ranking model with plain `keras.layers.Embedding` tables (module docstring)."""
    inputs = {
        "user_id": keras.Input((), dtype="string", name="user_id"),
        "item_id": keras.Input((), dtype="string", name="item_id"),
        "history": keras.Input((history_length,), dtype="string", name="history"),
        "genres": keras.Input((MAX_GENRES,), dtype="string", name="genres"),
        "age": keras.Input((), dtype="float32", name="age"),
        "hour_of_day": keras.Input((), dtype="float32", name="hour_of_day"),
    }
    items = item_ids(num_items)
    user_index = keras.layers.StringLookup(vocabulary=user_ids(num_users), name="user_lookup")(inputs["user_id"])
    item_index = keras.layers.StringLookup(vocabulary=items, name="item_lookup")(inputs["item_id"])
    # mask_token="" maps the padding to 0, which Embedding(mask_zero=True) masks (unknown ids -> 1).
    history_index = keras.layers.StringLookup(vocabulary=items, mask_token="", name="history_lookup")(
        inputs["history"])
    genre_index = keras.layers.StringLookup(vocabulary=list(GENRES), mask_token="", name="genre_lookup")(
        inputs["genres"])

    user = keras.layers.Embedding(num_users + 1, embedding_dim, name="user_embedding")(user_index)
    item = keras.layers.Embedding(num_items + 1, embedding_dim, name="item_embedding")(item_index)
    history = keras.layers.Embedding(num_items + 2, embedding_dim, mask_zero=True, name="history_embedding")(
        history_index)
    history = MaskedMean(name="history_mean")(history)  # mean over the unmasked movies
    genres = keras.layers.Embedding(len(GENRES) + 2, 8, mask_zero=True, name="genre_embedding")(genre_index)
    genres = MaskedMean(name="genre_bag")(genres)  # the bag's mean combiner
    age = keras.layers.Reshape((1,), name="age_column")(keras.layers.Rescaling(1 / 70, name="age_scale")(
        inputs["age"]))
    hour = keras.layers.Reshape((1,), name="hour_column")(keras.layers.Rescaling(1 / 24, name="hour_scale")(
        inputs["hour_of_day"]))

    x0 = keras.layers.Concatenate(name="features")([user, item, history, genres, age, hour])
    x = x0
    for k in range(cross_layers):
        x = keras_rs.layers.FeatureCross(projection_dim=embedding_dim, name=f"cross_{k}")(x0, x)
    x = keras.layers.Dense(hidden_units, activation="relu", name="hidden")(x)
    probability = keras.layers.Dense(1, activation="sigmoid", name="probability")(x)
    return keras.Model(inputs, probability, name="movielens_ranker")


def compile_and_fit(model, train, labels, epochs, batch_size, learning_rate, seed=0):
    """The user's own training script: the same for the original and the compressed model."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")])
    return model.fit(dataset(train, labels, batch_size, shuffle_seed=seed), epochs=epochs, verbose=2)


def run(work_dir, rows=100_000, eval_rows=20_000, num_users=20_000, num_items=12_000, history_length=10,
        embedding_dim=32, ratio=100, min_rows=10_000, epochs=3, batch_size=512, learning_rate=2e-3, seed=0):
    """Generate, build, compress, train both, evaluate, export; returns the results (also WORK_DIR/results.json)."""
    os.makedirs(work_dir, exist_ok=True)
    train, held_out, labels, ceiling_auc = make_data(rows, eval_rows, num_users, num_items, history_length, seed)
    results = {"rows": rows, "eval_rows": eval_rows, "num_users": num_users, "num_items": num_items,
               "ratio": ratio, "min_rows": min_rows, "epochs": epochs, "ceiling_auc": ceiling_auc}
    for variant in ("full", "compressed"):
        keras.utils.set_random_seed(seed)
        model = build_ranking_model(num_users, num_items, history_length, embedding_dim)
        if variant == "compressed":
            results["full_parameters"] = int(model.count_params())
            results["full_embedding_bytes"] = embedding_bytes(model, keras.layers.Embedding)
            model = tfcompress.compress(model, ratio=ratio, min_rows=min_rows)  # the one line
            results["compressed_parameters"] = int(model.count_params())
            results["compressed_embedding_bytes"] = embedding_bytes(model, keras.layers.Embedding)
        compile_and_fit(model, train, labels[:rows], epochs, batch_size, learning_rate, seed)
        predictions = predict(model, held_out)
        results[f"{variant}_auc"] = float(exact_auc(labels[rows:], predictions))

    return export_and_save_results(model, "movielens_ranker", held_out, work_dir, results)


if __name__ == "__main__":
    main(run, __doc__.split("\n\n")[0], "keras_rs_movielens_")
