"""Conversion speed of `tfcompress data convert`: rows/s, per worker, per format and encoding.

    python bench/bench_convert.py                  # 300k raw Criteo rows and 300k Avazu rows, made on the fly
    python bench/bench_convert.py --rows 2000000 --workers 1 2
    .venv-beam/bin/python bench/bench_convert.py --cases criteo-hexmod --runners local beam   # issue 18

`--runners beam` also converts each case with `--runner beam` on Beam's DirectRunner (the `beam` extra, so run it
from .venv-beam, `make test-beam` builds it): 1 worker is the DirectRunner's default (in-memory, one thread);
N > 1 workers are `--direct_num_workers=N --direct_running_mode=multi_processing`.

Each case converts the same raw file from scratch (overwrite) with 1 and 2 worker processes, alternating in rounds,
and reports: rows/s (wall clock), rows/s per worker, and rows per CPU-second (parent and worker processes
together; what one worker converts on a core of its own, and steadier than wall time on a shared machine).
The wall time includes starting the worker processes (they do not import TensorFlow: fixed-width records are framed
in NumPy) and the final merge of counts and quarantine.
"""

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_read import make_raw_criteo  # noqa: E402  (same directory)


def make_raw_avazu(path, rows, seed=0):
    """An Avazu-shaped CSV: id, click, hour (YYMMDDHH in Oct 2014), 21 categorical fields (hex-ish strings)."""
    import numpy as np

    from tfcompress.data.formats import AVAZU_COLUMNS

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write(",".join(AVAZU_COLUMNS) + "\n")
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            ids = (np.arange(start, start + n, dtype=np.uint64) * np.uint64(2654435761)).astype(str)
            click = rng.integers(0, 2, n).astype(str)
            hour = np.char.mod("1410%02d", rng.integers(21, 31, n))
            hour = np.char.add(hour, np.char.mod("%02d", rng.integers(0, 24, n)))
            cats = np.char.mod("%08x", (rng.pareto(0.8, (n, 21)) * 500).astype(np.int64))
            table = np.concatenate([ids[:, None], click[:, None], hour[:, None], cats], axis=1)
            f.write("\n".join(",".join(row) for row in table.tolist()) + "\n")


CASES = {
    "criteo-hexmod": ("criteo-tsv hex-mod", "criteo-tsv", {}),
    "criteo-vocab": ("criteo-tsv vocab (2 passes)", "criteo-tsv", {"encoding": "vocab"}),
    "avazu-hash": ("avazu-csv hash", "avazu-csv", {}),
}


def cpu_seconds():
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # worker processes, once they have been joined
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tfcompress_bench_convert"))
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runners", nargs="+", choices=("local", "beam"), default=["local"])
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    args = parser.parse_args(argv)

    from tfcompress.data.convert import convert

    def run(runner, path, out, fmt, workers, **options):
        if runner == "local":
            return convert([path], out, fmt, workers=workers, **options)
        from tfcompress.data.convert_beam import convert_beam

        flags = ["--runner=DirectRunner"]
        if workers > 1:
            flags += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
        return convert_beam([path], out, fmt, beam_options=flags, **options)

    os.makedirs(args.workdir, exist_ok=True)
    criteo = os.path.join(args.workdir, f"day_0_{args.rows}.tsv")
    avazu = os.path.join(args.workdir, f"avazu_{args.rows}.csv")
    if not os.path.isfile(criteo):
        make_raw_criteo(criteo, args.rows)
    if not os.path.isfile(avazu):
        make_raw_avazu(avazu, args.rows)
    # Pieces of ~1/8 of the file, so that 2 workers have work to share.
    cases = [(label, criteo if fmt.startswith("criteo") else avazu, fmt, options)
             for name, (label, fmt, options) in CASES.items() if name in args.cases]
    print(f"{args.rows:,} rows per case; CPUs available: {len(os.sched_getaffinity(0))}", flush=True)
    results = {}
    for round_index in range(args.rounds):
        for label, path, fmt, options in cases:
            shard_bytes = max(1 << 20, os.path.getsize(path) // 8)
            for runner in args.runners:
                for workers in args.workers:
                    out = os.path.join(args.workdir, "out")
                    shutil.rmtree(out, ignore_errors=True)
                    wall, cpu = time.perf_counter(), cpu_seconds()
                    report = run(runner, path, out, fmt, workers, shard_bytes=shard_bytes, **options)
                    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
                    rows = report["rows_read"]
                    results.setdefault((label, runner, workers), []).append((rows / wall, rows / cpu))
                    print(f"round {round_index + 1} {label:28s} {runner:5s} workers {workers}: {rows / wall:10,.0f} "
                          f"rows/s, {rows / cpu:10,.0f} rows per CPU-s", flush=True)
    print()
    header = (f"{'case':28s} {'runner':6s} {'workers':>7s} {'rows/s':>10s} {'rows/s/worker':>14s} "
              f"{'rows/CPU-s':>11s}")
    print(header)
    print("-" * len(header))
    for (label, runner, workers), runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        per_cpu = statistics.median(r[1] for r in runs)
        print(f"{label:28s} {runner:6s} {workers:7d} {rate:10,.0f} {rate / workers:14,.0f} {per_cpu:11,.0f}")
    print(f"\n(medians of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
