"""`tfcompress learn-hash`: teacher -> clustering -> mappings -> a pipeline TOML that trains the compressed model.

Example::

    from tfcompress.pipeline import load_pipeline
    summary = learn_hash(load_pipeline("pipelines/synthetic_dlrm_robe.toml"), target=0.1, output_dir="runs/lh")
    # then: tfcompress train --pipeline runs/lh/synthetic_dlrm_robe_learned_hash.toml

Every table with at least `min_rows` ids gets round(target * n) full-width rows (see
`tfcompress.learn_hash.mapping` for how they are split over the K internal tables); smaller tables stay full
tables. The written pipeline is the input pipeline with a new name and its [compression] section replaced by
method "learned_hash", the mapping file, `uncompressed_below = min_rows` and the ratio those sizes give.
"""

import json
import os
import time
import tomllib

import numpy as np

from tfcompress.learn_hash.mapping import build_table_mapping, save_mappings
from tfcompress.learn_hash.teacher import id_counts, train_teacher
from tfcompress.pipeline import pipeline_toml, raw_pipeline
from tfcompress.train import prepare_data

DEFAULT_MIN_ROWS = 100_000


def learn_hash(pipeline, target, output_dir=None, teacher_dim=2, combiner="sum", min_rows=DEFAULT_MIN_ROWS,
               private_fraction=0.0, max_cluster_size=None, weighted=True, teacher_steps=None, teacher_epochs=1,
               min_count=1, teacher_tables=None, counts=None, verbose=1):
    """Run the learned-hashing stages for `pipeline` and write `mappings.npz` and a pipeline TOML.

    Args:
        pipeline: a validated `tfcompress.pipeline.Pipeline`.
        target: rows kept per compressed table as a fraction of its ids, in (0, 1).
        output_dir: where the files go (default: runs/<pipeline name>_learned_hash).
        teacher_dim: teacher width 1-4 = internal tables (mappings) per compressed table.
        combiner: "sum" or "concat" of the internal tables.
        min_rows: tables with fewer ids stay full tables.
        private_fraction: the most frequent ids (this fraction of each table) keep private rows.
        max_cluster_size, weighted: clustering options (see `cluster_1d`).
        min_count: ids accessed fewer times share one row (see `tfcompress.learn_hash.mapping`).
        teacher_steps, teacher_epochs: how long the teacher trains (steps win when given).
        teacher_tables, counts: results of an earlier run's teacher and counting stages (lists per table), to
            build mappings at several targets from one teacher; computed when None.

    Returns:
        dict with mappings_path, pipeline_path, ratio, tables (per compressed table: name, ids, num_rows,
        private, unseen, seconds), the stage times, and teacher / counts (the per-table arrays, for reuse).

    Raises:
        ValueError: target outside (0, 1), no table with min_rows ids, or a stage's own argument errors.
    """

    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1) (0.1 keeps 10% of each table's rows), got {target!r}")
    if int(min_rows) != min_rows or min_rows < 1:
        raise ValueError(f"min_rows must be an integer >= 1, got {min_rows!r}")
    output_dir = output_dir or os.path.join("runs", f"{pipeline.name}_learned_hash")
    data = prepare_data(pipeline.data, pipeline.source, verbose)
    cardinalities = data.schema.cardinalities
    large = [t for t, n in enumerate(cardinalities) if n >= min_rows]
    if not large:
        raise ValueError(f"no table has >= {min_rows} ids (largest: {max(cardinalities)}); lower min_rows")

    times = {}
    started = time.perf_counter()
    if counts is None:
        counts = id_counts(data, pipeline.data, verbose)
    times["count_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    teacher = teacher_tables
    if teacher is None:
        teacher = train_teacher(pipeline, data, teacher_dim=teacher_dim, epochs=teacher_epochs, steps=teacher_steps,
                                verbose=verbose)
    times["teacher_seconds"] = time.perf_counter() - started
    teacher_dim = int(np.shape(teacher[large[0]])[1])

    mappings, tables = [], []
    started = time.perf_counter()
    for t in large:
        n = cardinalities[t]
        name = data.schema.sparse_names[t]
        table_started = time.perf_counter()
        mapping = build_table_mapping(teacher[t], counts[t], max(teacher_dim, round(target * n)), combiner=combiner,
                                      private_fraction=private_fraction, max_cluster_size=max_cluster_size,
                                      weighted=weighted, min_count=min_count, name=name)
        mappings.append(mapping)
        tables.append(dict(name=name, ids=n, num_rows=list(mapping.num_rows), private=mapping.private,
                           unseen=mapping.unseen, mapping_bytes=mapping.nbytes,
                           seconds=round(time.perf_counter() - table_started, 3)))
        if verbose:
            print(f"learn-hash: {name}: {n:,} ids -> rows {list(mapping.num_rows)} ({mapping.unseen:,} unseen, "
                  f"{mapping.private:,} private) in {tables[-1]['seconds']:.1f} s", flush=True)
    times["cluster_seconds"] = time.perf_counter() - started

    os.makedirs(output_dir, exist_ok=True)
    mappings_path = os.path.join(output_dir, "mappings.npz")
    save_mappings(mappings_path, mappings)

    d = pipeline.model.embedding_dim
    small_rows = sum(n for n in cardinalities if n < min_rows)
    compressed_rows = sum(_full_width_rows(m) for m in mappings)
    ratio = sum(cardinalities) * d / ((small_rows + compressed_rows) * d)
    name = f"{pipeline.name}_learned_hash"
    pipeline_path = os.path.join(output_dir, f"{name}.toml")
    compression = {"method": "learned_hash", "mappings": mappings_path, "combiner": combiner,
                   # make_plan meets the ratio with the mappings' fixed sizes; a hair lower keeps float rounding
                   # from asking for less than they are.
                   "ratio": ratio * (1 - 1e-9), "uncompressed_below": int(min_rows)}
    write_pipeline(pipeline, pipeline_path, name, compression,
                   description=f"learned hashing (teacher width {teacher_dim}, {combiner}) of {pipeline.name}: "
                               f"{target:g} of each table with >= {min_rows} ids")
    summary = dict(mappings_path=mappings_path, pipeline_path=pipeline_path, ratio=ratio, tables=tables,
                   teacher=teacher, counts=counts, **times)
    with open(os.path.join(output_dir, "learn_hash.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k not in ("teacher", "counts")}, f, indent=2)
        f.write("\n")
    if verbose:
        print(f"learn-hash: wrote {mappings_path} and {pipeline_path} (embeddings {ratio:.2f}x smaller); train "
              f"with: tfcompress train --pipeline {pipeline_path}", flush=True)
    return summary


def _full_width_rows(mapping):
    """The mapping's size in full-width rows: the sum over "sum" tables, one table's rows for "concat"."""
    return sum(mapping.num_rows) if mapping.combiner == "sum" else mapping.num_rows[0]


def write_pipeline(pipeline, path, name, compression, description=""):
    """Write `pipeline` (its file with its overrides applied) under a new name with a new [compression] section."""

    raw = dict(raw_pipeline(pipeline), name=name, description=description, compression=compression)
    with open(path, "w") as f:
        f.write(pipeline_toml(raw, comment=f"Written by `tfcompress learn-hash` from {pipeline.source}."))
    with open(path, "rb") as f:  # what was written must read back as written
        if tomllib.load(f)["compression"] != compression:
            raise AssertionError(f"{path}: the [compression] section did not round-trip")
