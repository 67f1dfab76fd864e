"""Latency under load, memory and start-up of exported SavedModels, side by side (issue 20).

    .venv/bin/python bench/bench_serving.py --base-dir /tmp/exports      # exports full, robe, ... there
    .venv/bin/python bench/bench_latency.py --model full=/tmp/exports/full/1 --model robe=/tmp/exports/robe/1

Latency: every model is loaded into this one process; for each batch size (--batches, default 1, 64, 512) and
client count (--clients, default 1 and 4), N client threads call the model's `serving_default` signature back to
back for --seconds, then the next model, for --rounds rounds (models interleaved round by round, so a shared
machine's load drifts hit both alike). Reported per model: p50 and p99 of every call's latency over all rounds and
the median over rounds of rows/s (rows answered / wall time). Ids are uniform over each table (the full tables'
worst case) or Zipf (--distribution), dense features log-normal, as in bench_serving.py.

Memory and start-up, each model in --rss-runs fresh subprocesses that import only TensorFlow (not tfcompress):
the RSS of the process after `import tensorflow` and one tiny op (the floor), then `tf.saved_model.load` (timed:
load time), then 10 calls at --rss-batch rows; reported: RSS after the calls minus the floor, and the load time,
medians over the runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

METADATA = os.path.join("assets.extra", "tfcompress_export.json")


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def model_inputs(path, rows, distribution, seed):
    """{"dense", "sparse"} numpy rows for the model at `path` (its sizes from the export's metadata)."""
    with open(os.path.join(path, METADATA)) as f:
        metadata = json.load(f)
    if "cardinalities" not in metadata:  # `contract: "model_inputs"`: no dense/sparse widths to generate rows for
        raise ValueError(f"--model {path}: bench_latency times exports with the {{dense, sparse}} inputs; this one "
                         f"is a model with other inputs ({metadata.get('contract')!r})")
    cards = np.asarray(metadata["cardinalities"], np.int64)
    rng = np.random.default_rng(seed)
    if distribution == "uniform":
        sparse = (rng.random((rows, len(cards))) * cards).astype(np.int64)
    else:  # as tfcompress.reproduce.systems.make_batches: Zipf(1.1) ranks scrambled over the table
        sparse = ((rng.zipf(1.1, size=(rows, len(cards))) - 1) * 2654435761) % cards
    dense = np.log1p(rng.lognormal(1.0, 1.0, size=(rows, metadata["n_dense"]))).astype(np.float32)
    return {"dense": dense, "sparse": sparse}


# -------------------------------------------------------------------------------------- fresh-process memory
def child_memory(path, rows, distribution):
    """Runs in a fresh subprocess: prints {"floor", "after", "load_s"} as JSON."""
    import tensorflow as tf

    tf.constant([1.0]) + 1.0  # the runtime's thread pools exist before the floor is read
    floor = rss_bytes()
    inputs = model_inputs(path, rows, distribution, seed=1)
    inputs = {key: tf.constant(value) for key, value in inputs.items()}
    started = time.perf_counter()
    signature = tf.saved_model.load(path).signatures["serving_default"]
    load_s = time.perf_counter() - started
    for _ in range(10):
        signature(**inputs)["probability"].numpy()
    print(json.dumps({"floor": floor, "after": rss_bytes(), "load_s": load_s}))


def measure_memory(path, rows, distribution, runs):
    samples = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, __file__, "--child-memory", path, "--rss-batch", str(rows),
                              "--distribution", distribution], check=True, capture_output=True, text=True)
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"rss_above_floor": statistics.median(s["after"] - s["floor"] for s in samples),
            "floor": statistics.median(s["floor"] for s in samples),
            "load_s": statistics.median(s["load_s"] for s in samples), "runs": samples}


# ------------------------------------------------------------------------------------------- load generator
def drive(signature, requests, clients, seconds):
    """`clients` threads call `signature` back to back for `seconds`: (latencies in s, rows answered, wall s)."""
    latencies, rows, lock = [], [0], threading.Lock()
    stop = time.perf_counter() + seconds

    def client(k):
        mine, answered = [], 0
        i = k
        while time.perf_counter() < stop:
            request = requests[i % len(requests)]
            started = time.perf_counter()
            signature(**request)["probability"].numpy()
            mine.append(time.perf_counter() - started)
            answered += int(request["dense"].shape[0])
            i += clients
        with lock:
            latencies.extend(mine)
            rows[0] += answered

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, rows[0], time.perf_counter() - started


def measure_latency(signatures, paths, args):
    import tensorflow as tf

    results = {}
    for batch in args.batches:
        requests = {name: [{key: tf.constant(value) for key, value in
                            model_inputs(paths[name], batch, args.distribution, seed=s).items()} for s in range(8)]
                    for name in signatures}
        for clients in args.clients:
            for name, signature in signatures.items():  # warm-up: kernels, thread pools, XLA compilation
                for request in requests[name][:2]:
                    signature(**request)["probability"].numpy()
            latencies = {name: [] for name in signatures}
            throughput = {name: [] for name in signatures}
            for _ in range(args.rounds):
                for name, signature in signatures.items():
                    got, rows, wall = drive(signature, requests[name], clients, args.seconds)
                    latencies[name].extend(got)
                    throughput[name].append(rows / wall)
            key = f"batch {batch}, {clients} clients"
            results[key] = {name: {"p50_ms": float(np.percentile(latencies[name], 50) * 1e3),
                                   "p99_ms": float(np.percentile(latencies[name], 99) * 1e3),
                                   "rows_per_s": statistics.median(throughput[name]),
                                   "calls": len(latencies[name])} for name in signatures}
            print(key, json.dumps(results[key]), flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="an exported version directory; give two or more (the first is the baseline)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=2.0, help="per model, batch, client count and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--distribution", choices=("uniform", "zipf"), default="uniform")
    parser.add_argument("--rss-batch", type=int, default=16384, help="rows per call of the memory measurement")
    parser.add_argument("--rss-runs", type=int, default=3, help="fresh subprocesses per model")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child-memory", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory:
        child_memory(args.child_memory, args.rss_batch, args.distribution)
        return 0
    paths = dict(entry.split("=", 1) for entry in args.model)
    if len(paths) < 2:
        parser.error("give at least two --model NAME=PATH (the first is the baseline)")
    for name, path in paths.items():
        if not os.path.exists(os.path.join(path, METADATA)):
            parser.error(f"--model {name}={path}: not a tfcompress export version directory (no {METADATA})")
    results = {"args": vars(args), "threads": os.cpu_count()}
    baseline = next(iter(paths))
    if not args.skip_latency:
        import tensorflow as tf

        signatures = {name: tf.saved_model.load(path).signatures["serving_default"] for name, path in paths.items()}
        results["latency"] = measure_latency(signatures, paths, args)
        del signatures
    if not args.skip_memory:
        results["memory"] = {name: measure_memory(path, args.rss_batch, args.distribution, args.rss_runs)
                             for name, path in paths.items()}

    print(f"\n{os.cpu_count()} CPU threads, {args.distribution} ids, {args.rounds} rounds x {args.seconds:g} s per "
          f"model; ratios against {baseline} (> 1 is better than {baseline})")
    for key, by_model in results.get("latency", {}).items():
        base = by_model[baseline]
        def cell(name, v):
            text = f"{name} p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} ms {v['rows_per_s']:,.0f} rows/s"
            if name != baseline:
                text += f" (p99 {base['p99_ms'] / v['p99_ms']:.2f}x, rows/s {v['rows_per_s'] / base['rows_per_s']:.2f}x)"
            return text

        cells = " | ".join(cell(name, v) for name, v in by_model.items())
        print(f"{key:<22} {cells}")
    for name, memory in results.get("memory", {}).items():
        base = results["memory"][baseline]
        print(f"{name:<16} RSS above TF-only floor {memory['rss_above_floor'] / 2**20:,.1f} MiB "
              f"({memory['rss_above_floor'] / base['rss_above_floor']:.3f}x of {baseline}), "
              f"load {memory['load_s']:.3f} s ({memory['load_s'] / base['load_s']:.3f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
