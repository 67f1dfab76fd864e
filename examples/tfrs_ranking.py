"""A TensorFlow Recommenders ranking model over tfcompress embeddings, on legacy tf.keras.

tensorflow-recommenders (TFRS) 0.7.7 runs only on legacy tf.keras: `TF_USE_LEGACY_KERAS=1` with the tf-keras
package, set before TensorFlow is imported (this script sets it first thing). tfcompress reads the same variable,
so its layers are then tf_keras layers and mix with TFRS's in one model.

What it does, on synthetic Criteo-shaped click logs (`tfcompress.data.synthetic`, tables scaled down):

1. a functional ranking network: 26 sparse features -> one `PlannedEmbedding` in which the large tables share one
   ROBE-Z array (`RobeEmbedding`) and the small ones are MLET tables (`MLETEmbedding`, trained k-wide, folded to
   d-wide); dense features -> a Dense layer; both -> two `tfrs.layers.dcn.Cross` layers -> MLP -> click probability;
2. wrapped in a `tfrs.models.Model` whose `compute_loss` is a `tfrs.tasks.Ranking` task, trained with `fit`;
3. exported with `tfcompress.export.export_saved_model` (MLET folded, stock TF ops only) and reloaded with
   `tf.saved_model.load`; the reloaded predictions must equal the trained network's.

Run:

    python examples/tfrs_ranking.py --work-dir /tmp/tfrs_ranking

It prints and writes WORK_DIR/results.json (AUC before and after training, sizes, the export path, the largest
difference of the reloaded model) and WORK_DIR/reload_check.npz (inputs and the trained network's predictions, to
compare against the SavedModel in a process that never imports tfcompress).
"""

import os

# Before TensorFlow is imported: makes tf.keras (and so TFRS) and tfcompress use tf_keras.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402

from tfcompress.data import read  # noqa: E402
from tfcompress.data.schema import Schema  # noqa: E402
from tfcompress.data.synthetic import generate  # noqa: E402
from tfcompress.export import export_saved_model  # noqa: E402
from tfcompress.layers import MLETEmbedding, PlannedEmbedding, RobeEmbedding  # noqa: E402

RELOAD_ROWS = 256


def compressed_embedding(cardinalities, embedding_dim, robe_min_rows, robe_compression, mlet_inner_dim,
                         chunk_size=4):
    """Tables with >= `robe_min_rows` rows share one ROBE-Z array; the rest are MLET tables.

    Args:
        cardinalities: rows of each sparse feature's table.
        embedding_dim: d, the width the model sees.
        robe_min_rows: tables at least this large go to ROBE-Z.
        robe_compression: logical / physical size of the ROBE-Z part (>= 1).
        mlet_inner_dim: k, the trained width of the MLET tables (>= d; folded to d at export).
        chunk_size: ROBE-Z chunk size Z.

    Returns:
        A `PlannedEmbedding`: ids [B, F] -> [B, F, embedding_dim].
    """
    large = [f for f, n in enumerate(cardinalities) if n >= robe_min_rows]
    small = [f for f, n in enumerate(cardinalities) if n < robe_min_rows]
    groups = []
    if large:
        groups.append({"features": large, "layer": RobeEmbedding(
            [cardinalities[f] for f in large], embedding_dim, compression=robe_compression, chunk_size=chunk_size,
            name="robe")})
    if small:
        groups.append({"features": small, "layer": MLETEmbedding(
            [cardinalities[f] for f in small], embedding_dim, inner_dim=mlet_inner_dim, name="mlet")})
    return PlannedEmbedding(len(cardinalities), embedding_dim, groups, name="embedding")


def build_ranker(schema, embedding, cross_projection_dim=32, hidden_units=64):
    """The ranking network: {"dense": f32[B, n_dense], "sparse": i64[B, n_sparse]} -> click probability [B, 1].

    A functional model, so that `export_saved_model` (and the MLET folding inside it) can rewrite it.
    """
    dense = tf.keras.Input((schema.n_dense,), dtype=tf.float32, name="dense")
    sparse = tf.keras.Input((schema.n_sparse,), dtype=tf.int64, name="sparse")
    embedded = tf.keras.layers.Flatten(name="flatten_embeddings")(embedding(sparse))
    dense_features = tf.keras.layers.Dense(embedding.output_dim, activation="relu", name="dense_features")(dense)
    x0 = tf.keras.layers.Concatenate(name="features")([dense_features, embedded])
    x = tfrs.layers.dcn.Cross(projection_dim=cross_projection_dim, name="cross_1")(x0)
    x = tfrs.layers.dcn.Cross(projection_dim=cross_projection_dim, name="cross_2")(x0, x)
    x = tf.keras.layers.Dense(hidden_units, activation="relu", name="hidden")(x)
    probability = tf.keras.layers.Dense(1, activation="sigmoid", name="probability")(x)
    return tf.keras.Model({"dense": dense, "sparse": sparse}, probability, name="tfrs_ranker")


class CompressedRankingModel(tfrs.models.Model):
    """TFRS model: the ranking network plus a `tfrs.tasks.Ranking` task (binary cross-entropy, AUC, log loss)."""

    def __init__(self, ranker):
        super().__init__()
        self.ranker = ranker
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(),
            metrics=[tf.keras.metrics.AUC(name="auc"), tf.keras.metrics.BinaryCrossentropy(name="log_loss")],
        )

    def call(self, features, training=False):
        return self.ranker(features, training=training)

    def compute_loss(self, inputs, training=False):
        features, labels = inputs
        return self.task(labels=labels, predictions=self.ranker(features, training=training))


def first_rows(dataset, rows):
    """The first `rows` rows of a ({"dense", "sparse"}, label) dataset as NumPy arrays."""
    dense, sparse = [], []
    for features, _ in dataset:
        dense.append(features["dense"].numpy())
        sparse.append(features["sparse"].numpy())
        if sum(len(d) for d in dense) >= rows:
            break
    return {"dense": np.concatenate(dense)[:rows], "sparse": np.concatenate(sparse)[:rows]}


def run(work_dir, rows=40_000, eval_rows=8_192, epochs=2, batch_size=256, cardinality_scale=0.01,
        embedding_dim=16, robe_min_rows=1000, robe_compression=100.0, mlet_inner_dim=32, learning_rate=2e-3,
        seed=0):
    """Generate data, train, export and reload; returns the results dict (also written to work_dir/results.json).

    Args:
        work_dir: where the data (data/), the SavedModel (saved_models/) and the results go.
        rows, eval_rows: synthetic training and evaluation rows.
        epochs, batch_size, learning_rate: training (Adam).
        cardinality_scale: Criteo Kaggle table sizes are scaled by this (0.01: the largest has ~101k rows).
        embedding_dim, robe_min_rows, robe_compression, mlet_inner_dim: see `compressed_embedding`.
        seed: data and weight seed.
    """
    tf.keras.utils.set_random_seed(seed)
    data_dir = os.path.join(work_dir, "data")
    stats = generate(data_dir, dataset="criteo", rows=rows, eval_rows=eval_rows, seed=seed,
                     cardinality_scale=cardinality_scale)
    schema = Schema.load(data_dir)
    train = read(os.path.join(data_dir, "train"), batch_size, schema=schema, repeat=False, seed=seed)
    evaluation = read(os.path.join(data_dir, "eval"), batch_size, schema=schema, shuffle=False, repeat=False,
                      deterministic=True)

    embedding = compressed_embedding(schema.cardinalities, embedding_dim, robe_min_rows, robe_compression,
                                     mlet_inner_dim)
    model = CompressedRankingModel(build_ranker(schema, embedding))
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate))
    before = model.evaluate(evaluation, return_dict=True, verbose=0)
    history = model.fit(train, epochs=epochs, verbose=2)
    after = model.evaluate(evaluation, return_dict=True, verbose=0)

    check = first_rows(evaluation, RELOAD_ROWS)
    predictions = model.ranker.predict(check, verbose=0)
    export_dir = export_saved_model(model.ranker, base_dir=os.path.join(work_dir, "saved_models"),
                                    name="tfrs_ranking", schema=schema)
    reloaded = tf.saved_model.load(export_dir).signatures["serving_default"]
    served = reloaded(dense=tf.constant(check["dense"]), sparse=tf.constant(check["sparse"]))["probability"].numpy()
    np.savez(os.path.join(work_dir, "reload_check.npz"), predictions=predictions, **check)

    results = {
        "export_dir": export_dir,
        "eval_auc_before": float(before["auc"]),
        "eval_auc_after": float(after["auc"]),
        "eval_log_loss_before": float(before["log_loss"]),
        "eval_log_loss_after": float(after["log_loss"]),
        "ceiling_auc": float(stats["splits"]["eval"]["ceiling_auc"]),
        "train_epochs": len(history.history["loss"]),
        "robe_features": embedding.group_features[0],
        "embedding_logical_parameters": int(embedding.logical_parameters),
        "embedding_physical_parameters": int(embedding.physical_parameters),
        "max_reload_difference": float(np.max(np.abs(served - predictions))),
    }
    with open(os.path.join(work_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=None, help="output directory (default: a new temporary one)")
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--eval-rows", type=int, default=8_192)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cardinality-scale", type=float, default=0.01)
    parser.add_argument("--robe-compression", type=float, default=100.0)
    parser.add_argument("--mlet-inner-dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="tfrs_ranking_")
    results = run(work_dir, rows=args.rows, eval_rows=args.eval_rows, epochs=args.epochs,
                  batch_size=args.batch_size, cardinality_scale=args.cardinality_scale,
                  robe_compression=args.robe_compression, mlet_inner_dim=args.mlet_inner_dim, seed=args.seed)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
