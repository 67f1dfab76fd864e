"""Reading + parsing converted Criteo-shaped TFRecords into batches: simple readers vs `tfcompress.data.read`.

    python bench/bench_read.py                       # makes 1M raw Criteo rows, converts them, then measures
    python bench/bench_read.py --data DIR --cores 2  # an existing conversion (DIR/train/*.tfrecord)
    python bench/bench_read.py --baseline 257f32b    # also that git revision's `read`, in the same rounds

Readers, measured side by side in rounds (A B C D A B C D ...) so that a noisy, shared machine slows them alike:

    record-at-a-time   interleave files -> parse_single_example per record -> batch
    batch-then-parse   interleave files -> batch serialized records -> parse_example (docs/tfrecord_layout.md)
    batch+shuffle      the same with a 65536-record shuffle before the batch (`read` before blocks)
    read generic       tfcompress.data.read(..., fixed_width=False): blocks of records + parse_example
    read (shuffle)     tfcompress.data.read(..., shuffle=True): fixed-width fast path (training)
    read (in order)    tfcompress.data.read(..., shuffle=False): fixed-width fast path
    read (unchecked)   the shuffled fast path with the per-batch record check (CRC, label, varints) swapped for
                       the framing-bytes assert it replaced: what the check costs, measured in the same rounds
                       (bench only; `read` has no way to turn the check off)

For each: rows/s (wall clock, median over rounds), CPU-seconds per million rows of the whole process (all threads;
steadier than wall time when other processes compete), and the ratio to the simple readers. Batch 16384, repeat,
prefetch; --cores pins the process (and so every tf.data thread) to that many CPUs.

--baseline REV adds "REV (shuffle)" and "REV (in order)": `read` as tfcompress/data/{reader,fixed_records,tfrecord}.py
were at git revision REV (loaded from `git show` into a scratch package), measured in the same rounds as the rest: a
before/after comparison that a busy shared machine slows alike.

Then, on fixed-width data, what the record check costs by itself (`fixed_records.FrameChecker`; one thread, CPU
time, best of 10 batches): the check `read` runs on every batch (framing, label and varint bits, and the batch's
CRC-32C against the one its stored CRCs imply), the exact per-record CRC in NumPy (used to name a damaged record,
and instead of the batch CRC where TensorFlow's native CRC-32C is not found), and the native CRC-32C alone.
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

    def unchecked():
        from tfcompress.data import fixed_records

        checked = fixed_records.decoder
        fixed_records.decoder = lambda layout, check_data=False, files=None: checked(layout)  # framing assert only
        try:
            return read(files, batch_size, schema=schema, seed=0)
        finally:
            fixed_records.decoder = checked

    readers = {
        "record-at-a-time": record_at_a_time,
        "batch-then-parse": lambda: batch_then_parse(False),
        "batch+shuffle": lambda: batch_then_parse(True),
        "read generic": lambda: read(files, batch_size, schema=schema, seed=0, fixed_width=False),
        "read (shuffle)": lambda: read(files, batch_size, schema=schema, seed=0),
        "read (in order)": lambda: read(files, batch_size, schema=schema, shuffle=False),
    }
    if schema.extra.get("fixed_record"):
        readers["read (unchecked)"] = unchecked
    return readers


def baseline_readers(revision, files, schema, batch_size):
    """`read` (shuffled and in order) from git revision `revision`, imported as a scratch package."""
    import importlib
    import subprocess

    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package = f"tfcompress_at_{revision.replace('-', '_').replace('.', '_')}"
    directory = tempfile.mkdtemp(prefix="bench_read_baseline_")
    os.makedirs(os.path.join(directory, package))
    open(os.path.join(directory, package, "__init__.py"), "w").close()
    for name in ("reader", "fixed_records", "tfrecord"):
        text = subprocess.run(["git", "show", f"{revision}:tfcompress/data/{name}.py"], cwd=repository, check=True,
                              capture_output=True, text=True).stdout
        for module in ("fixed_records", "tfrecord"):  # the revision's own modules, not this checkout's
            text = text.replace(f"from tfcompress.data import {module}", f"from {package} import {module}")
            text = text.replace(f"from tfcompress.data.{module} import", f"from {package}.{module} import")
        with open(os.path.join(directory, package, f"{name}.py"), "w") as f:
            f.write(text)
    sys.path.insert(0, directory)
    read = importlib.import_module(f"{package}.reader").read
    return {
        f"{revision} (shuffle)": lambda: read(files, batch_size, schema=schema, seed=0),
        f"{revision} (in order)": lambda: read(files, batch_size, schema=schema, shuffle=False),
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
    parser.add_argument("--baseline", help="also measure `read` as it was at this git revision, in the same rounds")
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

    makers = readers(files, schema, args.batch_size)
    if args.baseline:
        makers.update(baseline_readers(args.baseline, files, schema, args.batch_size))
    iterators = {}
    for name, make in makers.items():
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
    if fixed:
        measure_check(files[0], fixed, args.batch_size)
    return 0


def measure_check(path, fixed, batch_size):
    """CPU time of the fast path's per-batch record check alone (CRC + framing + label + varints), one thread."""
    import numpy as np

    from tfcompress.data import fixed_records

    layout = fixed_records.FixedLayout.from_dict(fixed)
    frames = np.fromfile(path, np.uint8, count=batch_size * layout.frame_bytes).reshape(-1, layout.frame_bytes)
    checker = fixed_records.FrameChecker(layout)
    native = fixed_records.native_crc32c()
    steps = {"check per batch": checker.check, "exact CRC per record (NumPy)": checker.masked_crc}
    if native is not None:
        steps["native CRC-32C of the batch"] = lambda f: native(f.reshape(-1))
    else:
        print("(TensorFlow's native CRC-32C was not found: the check uses the NumPy CRC per record)")
    results = {}
    for name, step in steps.items():
        best = float("inf")
        for _ in range(10):
            started = time.thread_time()
            step(frames)
            best = min(best, time.thread_time() - started)
        results[name] = best / frames.shape[0] * 1e9
    print(f"record check alone, one thread, batch of {frames.shape[0]}: " +
          ", ".join(f"{name} {ns:.0f} ns/row" for name, ns in results.items()))


if __name__ == "__main__":
    sys.exit(main())
