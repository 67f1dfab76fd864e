"""Serving throughput of exported SavedModels: ROBE-Z 1000x vs full tables at Criteo Kaggle table sizes.

    .venv/bin/python bench/bench_serving.py                       # export both, then time them side by side
    .venv/bin/python bench/bench_serving.py --repeats 20 --batch 16384 --chunk-size 4

Both models are the same DLRM (embedding dim 16, bottom MLP 512-256-64-16, top MLP 512-256-1, the Kaggle
configuration of the DLRM reference) on the 26 Criteo Kaggle cardinalities (33.8M rows): one with full float32
tables (2.16 GB), one with one ROBE-Z array 1000x smaller. Each is exported with
`tfcompress.export.export_saved_model` (stock ops only), the Keras models are dropped, and both SavedModels are
loaded into this one process and called through their `serving_default` signature, alternating model by model
on the same batches, so machine load hits both alike. Reported: the median batch time of each, rows/s, the
ratio, and the export size against the uncompressed model. The embedding lookups alone (the same serving graph
of the embedding layer, before export) are timed the same way, to show where the time goes.

Two id distributions are timed: uniform ids (every lookup of a full table is a cache miss: the worst case for
full tables) and Zipf-distributed ids (a few hot ids per table, closer to real click logs, where the full tables'
hot rows stay in cache).

Memory: the full model needs about 2.2 GB for its Keras tables, as much again while it is saved, and 2.2 GB
once loaded (the Keras model is freed first); the exports go to a temporary directory unless --base-dir is given.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from tfcompress._keras import keras  # noqa: E402
from tfcompress.data.synthetic import CRITEO_KAGGLE_CARDINALITIES  # noqa: E402
from tfcompress.export import saved_model, serving_model  # noqa: E402
from tfcompress.layers import FullEmbedding, RobeEmbedding  # noqa: E402
from tfcompress.models import build_dlrm  # noqa: E402
from tfcompress.reproduce.systems import directory_bytes, make_batches, time_side_by_side  # noqa: E402

N_DENSE = 13
DIM = 16
BOTTOM_MLP = (512, 256, 64)  # build_dlrm appends the embedding width: 13-512-256-64-16
TOP_MLP = (512, 256)  # ... and the 1-unit logit: 512-256-1
DISTRIBUTIONS = ("uniform", "zipf")  # the id distributions of `tfcompress.reproduce.systems.make_batches`


def build_model(kind, compression, chunk_size):
    cards = CRITEO_KAGGLE_CARDINALITIES
    if kind == "full":
        # A small uniform init keeps the 2.2 GB table cheap to make; the values do not change the timing.
        embedding = FullEmbedding(cards, DIM, embeddings_initializer=keras.initializers.RandomUniform(-0.05, 0.05))
    else:
        embedding = RobeEmbedding(cards, DIM, compression=compression, chunk_size=chunk_size, out_of_range="mod")
    return build_dlrm((N_DENSE, len(cards)), embedding, BOTTOM_MLP, TOP_MLP, name=f"bench_{kind}")


def embedding_function(model):
    """The serving graph of the model's embedding layer alone, traced as the export traces it: its
    `serving_lookup` (stock ops, plain gathers, ids folded into range)."""
    layer = serving_model.outer_embedding_layers(model)[0]
    function = tf.function(lambda sparse: layer.serving_lookup(sparse, "mod"))
    function = function.get_concrete_function(tf.TensorSpec([None, len(CRITEO_KAGGLE_CARDINALITIES)], tf.int64))
    return lambda dense, sparse: {"probability": function(sparse)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per model and id distribution")
    parser.add_argument("--compression", type=float, default=1000.0, help="ROBE compression ratio")
    parser.add_argument("--chunk-size", type=int, default=4, help="ROBE chunk size Z")
    parser.add_argument("--base-dir", help="keep the exports here (default: a temporary directory)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    results = {"batch": args.batch, "repeats": args.repeats, "compression": args.compression,
               "chunk_size": args.chunk_size, "threads": os.cpu_count(), "timings": {}, "sizes": {}}
    batches = {distribution: make_batches(CRITEO_KAGGLE_CARDINALITIES, args.batch, 4, distribution, seed=0)
               for distribution in DISTRIBUTIONS}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        base_dir = args.base_dir or tmp
        models = {kind: build_model(kind, args.compression, args.chunk_size) for kind in ("robe", "full")}
        # Where the time goes: the embedding lookups alone, as the exported graphs compute them.
        lookups = {kind: embedding_function(model) for kind, model in models.items()}
        for distribution in DISTRIBUTIONS:
            results["timings"][f"{distribution}, lookups only"] = time_side_by_side(
                lookups, batches[distribution], args.repeats)
        paths = {}
        for kind in ("robe", "full"):
            started = time.perf_counter()
            paths[kind] = saved_model.export_saved_model(models.pop(kind), base_dir=base_dir, name=f"bench_{kind}")
            print(f"exported {paths[kind]} in {time.perf_counter() - started:.0f} s", flush=True)
        del lookups
        gc.collect()
        keras.backend.clear_session()
        signatures = {kind: tf.saved_model.load(path).signatures["serving_default"] for kind, path in paths.items()}
        for distribution in DISTRIBUTIONS:
            results["timings"][f"{distribution}, whole model"] = time_side_by_side(
                signatures, batches[distribution], args.repeats)
        for kind, path in paths.items():
            with open(os.path.join(path, saved_model.METADATA_DIR, saved_model.METADATA_FILE)) as f:
                metadata = json.load(f)
            results["sizes"][kind] = {"variables": metadata["exported_bytes"], "directory": directory_bytes(path),
                                      "uncompressed": metadata["uncompressed_bytes"]}

    print(f"\nserving_default, batch {args.batch}, median of {args.repeats} calls, {os.cpu_count()} CPU threads, "
          f"ROBE {args.compression:g}x with Z={args.chunk_size}")
    print(f"{'ids, graph':<24} {'full ms':>10} {'ROBE ms':>10} {'full rows/s':>14} {'ROBE rows/s':>14} "
          f"{'ROBE/full':>10}")
    for label, medians in results["timings"].items():
        full, robe = medians["full"], medians["robe"]
        print(f"{label:<24} {full * 1e3:>10.1f} {robe * 1e3:>10.1f} {args.batch / full:>14,.0f} "
              f"{args.batch / robe:>14,.0f} {full / robe:>9.2f}x")
    print(f"\n{'export':<8} {'variables bytes':>16} {'directory bytes':>16} {'uncompressed':>16} {'ratio':>8}")
    for kind, size in results["sizes"].items():
        print(f"{kind:<8} {size['variables']:>16,} {size['directory']:>16,} {size['uncompressed']:>16,} "
              f"{size['uncompressed'] / size['directory']:>7.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
