"""Serving throughput of exported SavedModels at Criteo Kaggle table sizes: ROBE-Z 1000x (each serving layout),
int8 ROBE and MLET-folded tables against full float32 tables, lookups alone and whole models (issue 20).

    .venv/bin/python bench/bench_serving.py                                 # everything, both id distributions
    .venv/bin/python bench/bench_serving.py --repeats 30 --chunk-sizes 16 4 1 --base-dir /tmp/exports
    .venv/bin/python bench/bench_serving.py --skip-models                   # lookups only

Three parts, each timed side by side (calls interleaved model by model on the same batches, median of --repeats
calls, so a shared machine's load drifts hit every column alike; compare ratios within one table):

1. Lookups only: the embedding layer's serving graph (`serving_lookup`, as the export traces it) of full tables
   against ROBE-Z 1000x at each chunk size Z in --chunk-sizes (16 = output_dim, the layer's default, then 4 and 1)
   in each serving layout (`tfcompress.lookup.TableReader`): "windows" (the window matrix W[j] = M[j : j+Z] saved
   with the export, one row gather per chunk; what the export default chunk_reads="auto" picks where W is at most a
   tenth of the full tables: W is Z / compression of them, 1.6% at 1000x and Z = 16), "per_call" (W rebuilt from M
   on every call, the layout before issue 20), "elements" (one scalar gather per element), "windows+unique"
   (tf.unique of the ids first) and "windows+xla" (the lookup XLA-compiled, jit_compile=True).
2. Lookup-bound model: a DLRM with a tiny head (bottom MLP 13-16, top MLP 16-1), exported, full vs ROBE, so the
   lookups' ratio is not hidden behind the MLPs.
3. Whole reference DLRM (embedding dim 16, bottom MLP 13-512-256-64-16, top MLP 512-256-1, the Kaggle configuration
   of the DLRM reference), exported: full tables, ROBE-Z (Z = 16) in the default layout, per_call and XLA, int8
   ROBE, and MLET (inner dim 32, 1000x fewer trained rows) folded to full-size tables for serving.

Two id distributions: uniform (every lookup of a full table misses the cache: its worst case) and Zipf(1.1) (a few
hot ids per table, as in click logs). Memory: each full-size model needs 2.2 GB for its Keras tables, as much again
while it is saved, and 2.2 GB once loaded (three are loaded together: full, MLET-folded, tiny-head full); exports go
to a temporary directory unless --base-dir is given (bench/bench_latency.py reads them from there).
"""

import argparse
import functools
import gc
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from tfcompress._keras import keras  # noqa: E402
from tfcompress.data.synthetic import CRITEO_KAGGLE_CARDINALITIES, scale_cardinalities  # noqa: E402
from tfcompress.export import saved_model  # noqa: E402
from tfcompress.layers import FullEmbedding, MLETEmbedding, RobeEmbedding  # noqa: E402
from tfcompress.lookup import TableReader  # noqa: E402
from tfcompress.models import build_dlrm  # noqa: E402
from tfcompress.reproduce.systems import directory_bytes, make_batches, time_side_by_side  # noqa: E402

N_DENSE = 13
DIM = 16
BOTTOM_MLP = (512, 256, 64)  # build_dlrm appends the embedding width: 13-512-256-64-16
TOP_MLP = (512, 256)  # ... and the 1-unit logit: 512-256-1
TINY_BOTTOM, TINY_TOP = (), (16,)  # the lookup-bound model: 13-16 and 16-1
MLET_INNER_DIM = 32
CARDS = list(CRITEO_KAGGLE_CARDINALITIES)  # --scale (a smoke test) shrinks them
DISTRIBUTIONS = ("uniform", "zipf")  # the id distributions of `tfcompress.reproduce.systems.make_batches`
# Lookups-only layouts: (column name, TableReader options).
LOOKUP_LAYOUTS = (("windows", {"chunk_reads": "windows"}), ("per_call", {"chunk_reads": "per_call"}),
                  ("elements", {"chunk_reads": "elements"}),
                  ("windows+unique", {"chunk_reads": "windows", "unique_ids": True}),
                  ("windows+xla", {"chunk_reads": "windows", "jit_compile": True}))


def full_embedding():
    # A small uniform init keeps the 2.2 GB table cheap to make; the values do not change the timing.
    return FullEmbedding(CARDS, DIM,
                         embeddings_initializer=keras.initializers.RandomUniform(-0.05, 0.05))


def robe_embedding(compression, chunk_size):
    return RobeEmbedding(CARDS, DIM, compression=compression, chunk_size=chunk_size,
                         out_of_range="mod")


def lookup_function(layer, reader):
    """The serving graph of one embedding layer alone, traced as the export traces it."""
    function = tf.function(functools.partial(layer.serving_lookup, out_of_range="mod", tables=reader))
    function = function.get_concrete_function(tf.TensorSpec([None, len(CARDS)], tf.int64))
    return lambda dense, sparse: {"probability": function(sparse)}


def time_lookups(args, batches, results):
    full = full_embedding()
    full.build((None, len(CARDS)))
    for chunk_size in args.chunk_sizes:
        robe = robe_embedding(args.compression, chunk_size)
        robe.build((None, len(CARDS)))
        functions = {"full": lookup_function(full, TableReader())}
        for name, options in LOOKUP_LAYOUTS:
            if name not in args.layouts:
                continue
            if chunk_size == 1 and name in ("per_call", "elements"):
                continue  # Z = 1: every layout is the element gather from M
            functions[f"ROBE {name}"] = lookup_function(robe, TableReader(**options))
        for distribution in DISTRIBUTIONS:
            label = f"lookups Z={chunk_size}, {distribution}"
            results["timings"][label] = time_side_by_side(functions, batches[distribution], args.repeats)
            print(label, {k: round(v * 1e3, 2) for k, v in results["timings"][label].items()}, flush=True)
        del functions, robe
        gc.collect()


def export(model, base_dir, name, results, **options):
    started = time.perf_counter()
    path = saved_model.export_saved_model(model, base_dir=base_dir, name=name, **options)
    with open(os.path.join(path, saved_model.METADATA_DIR, saved_model.METADATA_FILE)) as f:
        metadata = json.load(f)
    results["sizes"][name] = {"variables": metadata["exported_bytes"], "directory": directory_bytes(path),
                              "window_matrices": metadata.get("window_matrix_bytes", 0),
                              "uncompressed": metadata["uncompressed_bytes"], "path": path}
    print(f"exported {path} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def export_models(args, base_dir, results):
    """{column: path} of every exported model; each Keras model is dropped right after its export."""
    cards = (N_DENSE, len(CARDS))
    z = DIM  # the layer's default chunk size, min(output_dim, 32)
    tiny = {"tiny full": lambda: build_dlrm(cards, full_embedding(), TINY_BOTTOM, TINY_TOP, name="tiny_full"),
            "tiny ROBE": lambda: build_dlrm(cards, robe_embedding(args.compression, z), TINY_BOTTOM, TINY_TOP,
                                            name="tiny_robe")}
    whole = {
        "full": (lambda: build_dlrm(cards, full_embedding(), BOTTOM_MLP, TOP_MLP, name="full"), {}),
        "ROBE": (lambda: build_dlrm(cards, robe_embedding(args.compression, z), BOTTOM_MLP, TOP_MLP, name="robe"),
                 {}),
        "ROBE per_call": (lambda: build_dlrm(cards, robe_embedding(args.compression, z), BOTTOM_MLP, TOP_MLP,
                                             name="robe_per_call"), {"chunk_reads": "per_call"}),
        "ROBE xla": (lambda: build_dlrm(cards, robe_embedding(args.compression, z), BOTTOM_MLP, TOP_MLP,
                                        name="robe_xla"), {"jit_compile": True}),
        "ROBE int8": (lambda: build_dlrm(cards, robe_embedding(args.compression, z), BOTTOM_MLP, TOP_MLP,
                                         name="robe_int8"), {"quantize": "int8"}),
        "MLET folded": (lambda: build_dlrm(cards, MLETEmbedding(CARDS, DIM, MLET_INNER_DIM,
                                                                compression=args.compression, out_of_range="mod"),
                                           BOTTOM_MLP, TOP_MLP, name="mlet"), {}),
    }
    paths = {}
    for column, build in tiny.items():
        paths[column] = export(build(), base_dir, column.replace(" ", "_").lower(), results)
        gc.collect()
    for column, (build, options) in whole.items():
        name = column.replace(" ", "_").lower()
        paths[column] = export(build(), base_dir, name, results, **options)
        gc.collect()
    keras.backend.clear_session()
    return paths


def time_models(args, paths, batches, results):
    signatures = {column: tf.saved_model.load(path).signatures["serving_default"] for column, path in paths.items()}
    groups = {"tiny-head model": [c for c in signatures if c.startswith("tiny")],
              "whole DLRM": [c for c in signatures if not c.startswith("tiny")]}
    for group, columns in groups.items():
        for distribution in DISTRIBUTIONS:
            label = f"{group}, {distribution}"
            timings = time_side_by_side({c: signatures[c] for c in columns}, batches[distribution], args.repeats)
            results["timings"][label] = {c.replace("tiny ", ""): t for c, t in timings.items()}
            print(label, {k: round(v * 1e3, 2) for k, v in results["timings"][label].items()}, flush=True)


def print_tables(args, results):
    print(f"\nserving, batch {args.batch}, median of {args.repeats} calls, {os.cpu_count()} CPU threads, "
          f"ROBE {args.compression:g}x; ms per batch (ratio = full ms / this ms, > 1 is faster than full)")
    for label, medians in results["timings"].items():
        full = medians["full"]
        cells = ", ".join(f"{k} {v * 1e3:.1f} ({full / v:.2f}x)" for k, v in medians.items() if k != "full")
        print(f"{label:<34} full {full * 1e3:.1f} | {cells}")
    if results["sizes"]:
        print(f"\n{'export':<16} {'variables bytes':>16} {'of which W':>14} {'directory bytes':>16} "
              f"{'uncompressed':>16} {'ratio':>8}")
        for name, size in results["sizes"].items():
            print(f"{name:<16} {size['variables']:>16,} {size['window_matrices']:>14,} {size['directory']:>16,} "
                  f"{size['uncompressed']:>16,} {size['uncompressed'] / size['directory']:>7.1f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per column and table row")
    parser.add_argument("--compression", type=float, default=1000.0, help="ROBE compression ratio")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 4, 1], help="ROBE chunk sizes Z")
    parser.add_argument("--layouts", nargs="+", default=[name for name, _ in LOOKUP_LAYOUTS],
                        choices=[name for name, _ in LOOKUP_LAYOUTS],
                        help="ROBE serving layouts timed against full tables in the lookups-only part (each timed "
                             "layout shares the caches with the others: 'windows' alone is the pair the issue's "
                             "floor names)")
    parser.add_argument("--base-dir", help="keep the exports here (default: a temporary directory)")
    parser.add_argument("--skip-lookups", action="store_true", help="only the exported models")
    parser.add_argument("--skip-models", action="store_true", help="only the lookups")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="table sizes times this (a quick smoke test of the script; the numbers need 1.0)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    CARDS[:] = scale_cardinalities(CRITEO_KAGGLE_CARDINALITIES, args.scale)

    results = {"batch": args.batch, "repeats": args.repeats, "compression": args.compression,
               "chunk_sizes": args.chunk_sizes, "threads": os.cpu_count(), "timings": {}, "sizes": {}}
    batches = {distribution: make_batches(CARDS, args.batch, 4, distribution, seed=0)
               for distribution in DISTRIBUTIONS}
    if not args.skip_lookups:
        time_lookups(args, batches, results)
        gc.collect()
        keras.backend.clear_session()
    if not args.skip_models:
        with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
            paths = export_models(args, args.base_dir or tmp, results)
            time_models(args, paths, batches, results)
    print_tables(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
