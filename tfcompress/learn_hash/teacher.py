"""The teacher of learned hashing: the pipeline's model with full-height tables at a tiny width, trained briefly.

Its embedding of each id (2 or 4 numbers) is what the clustering sorts by: ids the teacher placed close together
behave alike for the model, so they can share a row. Per-id access counts (the clustering's frequency score and
weights) come from the converter's `counts/train.npz` when the data has one, otherwise from one pass over the
training shards.

Example::

    from tfcompress.pipeline import load_pipeline
    from tfcompress.train import prepare_data
    pipeline = load_pipeline("pipelines/synthetic_dlrm_robe.toml")
    data = prepare_data(pipeline.data)
    counts = id_counts(data, pipeline.data)
    tables = train_teacher(pipeline, data, teacher_dim=2, steps=500)   # [n_t, 2] per table
"""

import dataclasses
import os
import time

import numpy as np
import tensorflow as tf

from tfcompress._keras import keras
from tfcompress.data import read
from tfcompress.data.convert import dense_count_array
from tfcompress.layers import FullEmbedding
from tfcompress.train import build_model, make_optimizer

COUNTS_FILE = os.path.join("counts", "train.npz")
TEACHER_DIMS = (1, 2, 3, 4)


def _data_directories(data, data_config):
    """Where a dataset's side files (schema.json, counts/) may live."""
    candidates = []
    if data_config.source == "synthetic":
        candidates.append(data_config.synthetic_path())
    if data_config.schema:
        candidates.append(data_config.schema if os.path.isdir(data_config.schema)
                          else os.path.dirname(data_config.schema))
    if data.train_files:
        shard_dir = os.path.dirname(os.path.abspath(data.train_files[0]))
        candidates += [shard_dir, os.path.dirname(shard_dir)]
    return candidates


def load_counts_file(path, schema):
    """Dense per-table count arrays from a converter counts file (`ids_<name>`, `counts_<name>` per table).

    Raises:
        ValueError: a table missing from the file, or an id outside its table (naming the file and the table).
    """
    counts = []
    with np.load(path) as data:
        for name, n in zip(schema.sparse_names, schema.cardinalities):
            if f"ids_{name}" not in data or f"counts_{name}" not in data:
                raise ValueError(f"{path}: no counts for table {name!r} (expected ids_{name} and counts_{name})")
            ids, table_counts = data[f"ids_{name}"], data[f"counts_{name}"]
            if ids.size and (ids.min() < 0 or ids.max() >= n):
                raise ValueError(f"{path}: table {name!r} has ids outside [0, {n}) (max {int(ids.max())})")
            counts.append(dense_count_array(ids, table_counts, n))
    return counts


def count_ids_in_files(files, schema, batch_size=65536):
    """Accesses per id of every table over one pass of TFRecord shards: a list of int64 [n_t] arrays."""

    counts = [np.zeros(n, dtype=np.int64) for n in schema.cardinalities]
    dataset = read(files, batch_size, schema=schema, shuffle=False, repeat=False)
    for features, _ in dataset:
        sparse = features["sparse"].numpy()
        for t, n in enumerate(schema.cardinalities):
            counts[t] += np.bincount(sparse[:, t], minlength=n)
    return counts


def id_counts(data, data_config, verbose=1):
    """Per-table access counts of the training split: the converter's counts file if there is one, else counted.

    Args:
        data: `tfcompress.train.PreparedData`.
        data_config: the pipeline's [data] section (to find the dataset directory).
    """
    for directory in _data_directories(data, data_config):
        path = os.path.join(directory, COUNTS_FILE)
        if os.path.isfile(path):
            if verbose:
                print(f"learn-hash: id counts from {path}", flush=True)
            return load_counts_file(path, data.schema)
    started = time.perf_counter()
    counts = count_ids_in_files(data.train_files, data.schema)
    if verbose:
        print(f"learn-hash: counted ids over {len(data.train_files)} training shard(s) in "
              f"{time.perf_counter() - started:.1f} s (no {COUNTS_FILE} next to the data)", flush=True)
    return counts


def train_teacher(pipeline, data, teacher_dim=2, epochs=1, steps=None, verbose=1):
    """Train the pipeline's model with full tables of width `teacher_dim`; return each table's values.

    Args:
        pipeline: a validated `tfcompress.pipeline.Pipeline` (its [model] and [train] sections are used; the
            [compression] section is not: the teacher is uncompressed).
        data: `tfcompress.train.PreparedData` of the pipeline.
        teacher_dim: embedding width of the teacher, 1 to 4 (one mapping per dimension).
        epochs: passes over the training data (ignored when `steps` is given).
        steps: train this many batches instead ("trained briefly").

    Returns:
        list of float32 [n_t, teacher_dim] arrays, one per table.
    """

    if teacher_dim not in TEACHER_DIMS:
        raise ValueError(f"teacher_dim must be one of {TEACHER_DIMS}, got {teacher_dim!r}")
    if steps is not None and (int(steps) != steps or steps < 1):
        raise ValueError(f"steps must be None or an integer >= 1, got {steps!r}")
    config = pipeline.train
    keras.utils.set_random_seed(config.seed)
    embedding = FullEmbedding(data.schema.cardinalities, teacher_dim, gradient="sparse", name="teacher_embedding")
    model_config = dataclasses.replace(pipeline.model, embedding_dim=teacher_dim)
    model = build_model(model_config, data.schema, embedding, name="teacher")
    model.compile(optimizer=make_optimizer(config), loss=keras.losses.BinaryCrossentropy())
    if steps is None:
        steps, epochs_run = (max(1, data.train_rows // config.batch_size) if data.train_rows else None), epochs
    else:
        epochs_run = 1
    dataset = read(data.train_files, config.batch_size, schema=data.schema, shuffle=True,
                   repeat=steps is not None, seed=config.seed, drop_remainder=True)
    started = time.perf_counter()
    model.fit(dataset, epochs=epochs_run, steps_per_epoch=steps, verbose=verbose, shuffle=False)  # the reader shuffles
    if verbose:
        print(f"learn-hash: teacher (width {teacher_dim}) trained in {time.perf_counter() - started:.1f} s",
              flush=True)

    return [tf.convert_to_tensor(table).numpy() for table in embedding.tables]
