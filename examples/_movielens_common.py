"""What examples/keras_rs_movielens.py and examples/tfrs_movielens.py share: the data, the input pipeline, the
export + verify step, the results file and the command line. Each example keeps its own model, `compress` call
and training, which are what it shows; this module holds the plumbing around them.

It imports TensorFlow and tfcompress but not Keras: the TFRS example sets TF_USE_LEGACY_KERAS=1 before importing
it, and tfcompress then uses legacy tf.keras there and Keras 3 in the keras-rs example.
"""

import argparse
import json
import os
import tempfile

import numpy as np
import tensorflow as tf

import tfcompress
from tfcompress.data.synthetic_movielens import movielens_like
from tfcompress.export import export_saved_model
from tfcompress.export.verify import verify
from tfcompress.metrics import exact_auc

MAX_GENRES = 3  # the generator gives 0..3 genres per movie
SERVING_CHECK_ROWS = 256


def model_inputs(data):
    """The generator's columns as the model's input dict: genres padded with "" to MAX_GENRES."""
    genres = np.array([row + [""] * (MAX_GENRES - len(row)) for row in data["genres"]], dtype=str)
    return {
        "user_id": np.asarray(data["user_id"], dtype=str),
        "item_id": np.asarray(data["item_id"], dtype=str),
        "history": np.asarray(data["history"], dtype=str),
        "genres": genres,
        "age": np.asarray(data["age"], np.float32),
        "hour_of_day": np.asarray(data["hour_of_day"], np.float32),
    }


def make_data(rows, eval_rows, num_users, num_items, history_length, seed):
    """(train features, held-out features, labels float32 [rows + eval_rows], planted ceiling AUC on held out)."""
    data = movielens_like(rows + eval_rows, num_users=num_users, num_items=num_items, seed=seed,
                          history_length=history_length, return_probability=True)
    features = model_inputs(data)
    labels = data["label"].astype(np.float32)
    train = {k: v[:rows] for k, v in features.items()}
    held_out = {k: v[rows:] for k, v in features.items()}
    return train, held_out, labels, float(exact_auc(labels[rows:], data["planted_probability"][rows:]))


def dataset(features, labels=None, batch_size=512, shuffle_seed=None):
    """A tf.data pipeline over the feature dict (Keras' fit takes no NumPy string arrays)."""
    tensors = {k: tf.constant(v) for k, v in features.items()}
    data = tf.data.Dataset.from_tensor_slices(tensors if labels is None else (tensors, tf.constant(labels)))
    if shuffle_seed is not None:
        data = data.shuffle(len(next(iter(features.values()))), seed=shuffle_seed)
    return data.batch(batch_size)


def predict(model, features):
    return model.predict(dataset(features, batch_size=4096), verbose=0).ravel()


def embedding_bytes(model, embedding_class):
    """Float32 bytes of the model's `embedding_class` (the stack's keras.layers.Embedding) and CompressedEmbedding
    variables, a shared variable counted once."""
    variables = {}
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, (embedding_class, tfcompress.layers.CompressedEmbedding)):
            variables.update((id(v), v) for v in layer.weights)
    return 4 * sum(int(np.prod(v.shape)) for v in variables.values())


def fused_op_layers(model):
    """Names of the ROBE lookups that run tfcompress's fused custom op in training (empty: the pure-TF path)."""
    return sorted(layer.name for layer in model._flatten_layers(include_self=False)
                  if isinstance(layer, tfcompress.layers.RobeEmbedding)
                  and tfcompress.fused_ops.should_use(layer.use_custom_op))


def export_and_verify(model, base_dir, name, sample_inputs):
    """`tfcompress.export.export_saved_model`, then `verify` in a fresh process that never imports tfcompress.

    Training ran the fused custom op; the exported graph is traced with each compressed layer's stock-op
    `serving_lookup` (TF Serving cannot load custom ops). The signature takes the model's own inputs (the raw
    strings and floats); `sample_inputs` are the rows whose predictions `verify` compares against.
    """
    path = export_saved_model(model, base_dir=base_dir, name=name, sample_inputs=sample_inputs)
    result = verify(path)
    checks = {check_name: check["status"] for check_name, check in result.report()["checks"].items()}
    return path, result, checks


def export_and_save_results(model, name, held_out, work_dir, results):
    """Export + verify the trained compressed `model`, then write WORK_DIR/serving_check.npz (held-out inputs and
    the model's predictions) and WORK_DIR/results.json; returns `results` with the export's entries added."""
    results["fused_op_layers"] = fused_op_layers(model)
    check = {k: v[:SERVING_CHECK_ROWS] for k, v in held_out.items()}
    export_dir, verified, checks = export_and_verify(model, os.path.join(work_dir, "saved_models"), name, check)
    print(verified.output)
    expected = predict(model, check)
    results["export_dir"] = export_dir
    results["verify_ok"] = bool(verified.ok)
    results["verify_checks"] = checks
    np.savez(os.path.join(work_dir, "serving_check.npz"), predictions=expected, **check)
    with open(os.path.join(work_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def main(run, description, work_dir_prefix, argv=None):
    """The examples' command line: parses the flags, calls `run(work_dir, ...)`, prints its results and exits
    non-zero when verify failed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work-dir", default=None, help="output directory (default: a new temporary one)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--eval-rows", type=int, default=20_000)
    parser.add_argument("--num-users", type=int, default=20_000)
    parser.add_argument("--num-items", type=int, default=12_000)
    parser.add_argument("--embedding-dim", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=100)
    parser.add_argument("--min-rows", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix=work_dir_prefix)
    results = run(work_dir, rows=args.rows, eval_rows=args.eval_rows, num_users=args.num_users,
                  num_items=args.num_items, embedding_dim=args.embedding_dim, ratio=args.ratio,
                  min_rows=args.min_rows, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    print(json.dumps(results, indent=2))
    if not results["verify_ok"]:
        raise SystemExit(f"verify failed for {results['export_dir']} (its report is printed above)")
