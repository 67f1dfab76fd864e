"""Reading + parsing converted Criteo-shaped TFRecords into batches: simple readers vs `tfcompress.data.read`.

    python bench/bench_read.py                       # makes 1M raw Criteo rows, converts them, then measures
    python bench/bench_read.py --data DIR --cores 2  # an existing conversion (DIR/train/*.tfrecord)

Readers, measured side by side in rounds (A B C D A B C D ...) so that a noisy, shared machine slows them alike:

    record-at-a-time   interleave files -> parse_single_example per record -> batch
    batch-then-parse   interleave files -> batch serialized records -> parse_example (docs/tfrecord_layout.md)
    batch+shuffle      the same with a 65536-record shuffle before the batch (`read` before blocks)
    read generic       tfcompress.data.read(..., fixed_width=False): blocks of records + parse_example
    read (shuffle)     tfcompress.data.read(..., shuffle=True): fixed-width fast path (training)
    read (in order)    tfcompress.data.read(..., shuffle=False): fixed-width fast path

For each: rows/s (wall clock, median over rounds), CPU-seconds per million rows of the whole process (all threads;
steadier than wall time when other processes compete), and the ratio to the simple readers. Batch 16384, repeat,
prefetch; --cores pins the process (and so every tf.data thread) to that many CPUs.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def make_raw_criteo(path, rows, seed=0):
    """A Criteo-TSV-shaped file: label, 13 integer counts (20% empty), 26 hex ids (10% empty), Zipf-ish ids."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            label = rng.integers(0, 2, n).astype(str)
            dense = np.floor(np.exp(rng.normal(1.5, 1.5, (n, 13)))).astype(np.int64).astype(str)
            dense[rng.random((n, 13)) < 0.2] = ""
            ids = np.floor(rng.pareto(0.7, (n, 26)) * 1000).astype(np.uint64) % np.uint64(2**32)
            cats = np.char.mod("%08x", ids)
            cats[rng.random((n, 26)) < 0.1] = ""
            table = np.concatenate([label[:, None], dense, cats], axis=1)
            f.write("\n".join("\t".join(row) for row in table.tolist()) + "\n")


def readers(files, schema, batch_size):
    import tensorflow as tf

    from tfcompress.data.reader import example_parser, feature_spec, read

    spec = feature_spec(schema)
    parse_batch = example_parser(schema)

    def record_at_a_time():
        ds = tf.data.Dataset.from_tensor_slices(files).repeat()
        ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(8, len(files)),
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        def parse_one(serialized):
            parsed = tf.io.parse_single_example(serialized, spec)
            return {"dense": parsed["dense"], "sparse": parsed["sparse"]}, tf.cast(parsed["label"], tf.float32)

        ds = ds.map(parse_one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    def batch_then_parse(shuffle):
        ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=0).repeat()
        ds = ds.interleave(lambda p: tf.data.TFRecordDataset(p, buffer_size=1 << 20),
                           cycle_length=min(8, len(files)), num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=False)
        if shuffle:
            ds = ds.shuffle(65536, seed=0)
        ds = ds.batch(batch_size)
        return ds.map(parse_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).prefetch(
            tf.data.AUTOTUNE)

    return {
        "record-at-a-time": record_at_a_time,
        "batch-then-parse": lambda: batch_then_parse(False),
        "batch+shuffle": lambda: batch_then_parse(True),
        "read generic": lambda: read(files, batch_size, schema=schema, seed=0, fixed_width=False),
        "read (shuffle)": lambda: read(files, batch_size, schema=schema, seed=0),
        "read (in order)": lambda: read(files, batch_size, schema=schema, shuffle=False),
    }


def measure(iterator, batch_size, seconds):
    """(rows/s wall, CPU seconds per million rows) over about `seconds` of pulling batches."""
    rows = 0
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        features, _ = next(iterator)
        rows += int(features["sparse"].shape[0])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return rows / wall, cpu / rows * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a converted dataset directory (default: make one under --workdir)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tfcompress_bench_read"))
    parser.add_argument("--rows", type=int, default=1_000_000, help="raw rows to make when --data is not given")
    parser.add_argument("--batch-size", type=int, default=16384)
    parser.add_argument("--seconds", type=float, default=8.0, help="per reader per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2, help="pin to this many CPUs (0: no pinning)")
    args = parser.parse_args(argv)

    if args.cores:
        cpus = sorted(os.sched_getaffinity(0))[: args.cores]
        os.sched_setaffinity(0, cpus)  # before TensorFlow starts its thread pools
    import tensorflow as tf

    from tfcompress.data.convert import convert
    from tfcompress.data.reader import list_files
    from tfcompress.data.schema import Schema

    data = args.data
    if data is None:
        data = os.path.join(args.workdir, f"criteo_{args.rows}")
        raw = os.path.join(args.workdir, f"day_0_{args.rows}.tsv")
        if not os.path.isfile(os.path.join(data, "report.json")):
            os.makedirs(args.workdir, exist_ok=True)
            if not os.path.isfile(raw):
                print(f"making {args.rows:,} raw Criteo rows in {raw}", flush=True)
                make_raw_criteo(raw, args.rows)
            print(f"converting into {data}", flush=True)
            convert([raw], data, "criteo-tsv", shard_bytes=32 << 20, workers=2, overwrite=True)
    files = list_files(os.path.join(data, "train"))
    schema = Schema.load(data)
    size = sum(os.path.getsize(f) for f in files)
    fixed = schema.extra.get("fixed_record")
    print(f"data: {data}: {len(files)} files, {size / 1e6:.0f} MB, "
          f"{'fixed-width records (' + str(fixed['record_bytes']) + ' bytes)' if fixed else 'canonical records'}; "
          f"batch {args.batch_size}; "
          f"CPUs {sorted(os.sched_getaffinity(0))}; TensorFlow {tf.__version__}", flush=True)

    iterators = {}
    for name, make in readers(files, schema, args.batch_size).items():
        iterators[name] = iter(make())
        for _ in range(3):  # warm up: start threads, fill buffers, let autotune settle
            next(iterators[name])
    results = {name: [] for name in iterators}
    for round_index in range(args.rounds):
        for name, iterator in iterators.items():
            seconds = args.seconds / 4 if name == "record-at-a-time" else args.seconds  # it is slow: fewer rows
            results[name].append(measure(iterator, args.batch_size, seconds))
            print(f"round {round_index + 1} {name:18s} {results[name][-1][0] / 1e6:6.3f} M rows/s "
                  f"({results[name][-1][1]:.2f} CPU-s per M rows)", flush=True)

    print()
    rate = {name: statistics.median(r[0] for r in runs) for name, runs in results.items()}
    cpu = {name: statistics.median(r[1] for r in runs) for name, runs in results.items()}
    header = f"{'reader':18s} {'M rows/s':>9s} {'CPU-s/M rows':>13s} {'x record':>9s} {'x batch':>8s}"
    print(header)
    print("-" * len(header))
    for name in results:
        print(f"{name:18s} {rate[name] / 1e6:9.3f} {cpu[name]:13.2f} {rate[name] / rate['record-at-a-time']:9.1f} "
              f"{rate[name] / rate['batch-then-parse']:8.2f}")
    print(f"\n(medians of {args.rounds} rounds; 'x record' / 'x batch': wall-clock ratio to the record-at-a-time / "
          "batch-then-parse reader measured in the same rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
