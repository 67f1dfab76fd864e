"""Compile the standalone CUDA harness and check the ROBE-Z kernels against tfcompress.robe_hash (NumPy only).

    python custom_ops/cuda_harness/run_harness.py --mode device          # on a GPU machine (no TensorFlow needed)
    python custom_ops/cuda_harness/run_harness.py --mode host            # the shared arithmetic + kernel emulation
    python custom_ops/cuda_harness/run_harness.py --mode device --bench  # + every variant timed (see run_bench)
    python custom_ops/cuda_harness/run_harness.py --compile-only         # nvcc check only

Checks, per case: positions and signs equal robe_indices / robe_signs bit for bit; the embeddings of every kernel
variant (tiled, warp_rows, warp_rows_two_blocks) equal memory[positions] * signs exactly; every atomic scatter
equals a float64 np.add.at to 1e-5 relative (atomics add in any order); the sorted (deterministic) scatter and the
sparse gradient (sorted unique positions, summed values: RobeLookupSparseGrad's contract) to 1e-5, with the same
bits on a second run and, on the device, the bits of the host emulation; an invalid id is reported at the right
row. In host mode the variants are the reference loop and the warp-row kernels and sorted gradient emulated on the
CPU from the kernels' own code. Exit status 0 only when every case passes.

Bag cases (the pooled op, ../robe_bag_gpu_kernels.cu.h; `--only bag` runs just these): every combiner, with and
without weights, signed or not, empty rows and a row of many ids, against a float64 NumPy reference of
tf.nn.safe_embedding_lookup_sparse's arithmetic: the forward to 1e-5 relative (float32 sums in id order), the
memory gradient to 1e-5 of its largest value, the weights gradient to 1e-4; an invalid id reported at its position.
"""

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BINARY = HERE / "build" / "robe_harness"
MAGIC = 0x524F42455A
BAG_MAGIC = 0x524F4245424147
COMBINERS = {"sum": 0, "mean": 1, "sqrtn": 2}

# Criteo Kaggle cardinalities (26 categorical features): the benchmark shape of the issue.
KAGGLE_CARDINALITIES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                        5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]


def load_robe_hash():
    """tfcompress/robe_hash.py by path: it needs only NumPy, and the GPU machine has no TensorFlow."""
    spec = importlib.util.spec_from_file_location("robe_hash", ROOT / "tfcompress" / "robe_hash.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


robe_hash = load_robe_hash()


def compile_harness(nvcc, arch):
    BINARY.parent.mkdir(exist_ok=True)
    command = [nvcc, "-O3", "-std=c++17", f"-arch={arch}", "-o", str(BINARY), str(HERE / "robe_harness.cu")]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def write_input(path, ids, cardinalities, output_dim, chunk_size, memory, grad, signed, seed, repeats,
                bench=False):
    """The harness's INPUT file; a bench input carries no memory / grad (the harness fills them on the device)."""
    constants = robe_hash.hash_constants(seed)[:6]
    memory_size = memory if bench else memory.size
    header = np.array(
        [MAGIC, ids.shape[0] * ids.shape[1], ids.shape[1], output_dim, chunk_size, memory_size, int(signed),
         *constants, repeats, int(bench), 0], dtype=np.int64,
    )
    arrays = [header, np.asarray(cardinalities, np.int64), robe_hash.table_offsets(cardinalities),
              ids.astype(np.int64).ravel()]
    if not bench:
        arrays += [memory.astype(np.float32), grad.astype(np.float32).ravel()]
    with open(path, "wb") as f:
        for array in arrays:
            f.write(np.ascontiguousarray(array).tobytes())


def read_output(path, rows, output_dim, memory_size):
    """(first_bad_row, dict) from the harness's OUTPUT; dict is None when an id was rejected."""
    raw = Path(path).read_bytes()
    first_bad = int(np.frombuffer(raw[:8], np.int64)[0])
    if first_bad >= 0:
        return first_bad, None
    lookup_variants, scatter_variants = (int(v) for v in np.frombuffer(raw[8:24], np.int64))
    elements = rows * output_dim
    offset = 24
    out = {}

    def take(dtype, count):
        nonlocal offset
        size = np.dtype(dtype).itemsize * count
        value = np.frombuffer(raw[offset:offset + size], dtype)
        offset += size
        return value

    out["positions"] = take(np.int64, elements)
    out["signs"] = take(np.float32, elements)
    out["embeddings"] = [take(np.float32, elements) for _ in range(lookup_variants)]
    out["memory_grads"] = [take(np.float32, memory_size) for _ in range(scatter_variants)]
    out["sorted_memory_grad"] = take(np.float32, memory_size)
    out["sorted_repeat_identical"] = int(take(np.int64, 1)[0])
    unique = int(take(np.int64, 1)[0])
    out["sparse_positions"] = take(np.int64, unique)
    out["sparse_values"] = take(np.float32, unique)
    return -1, out


def relative_error(got, expected):
    """max |got - expected| / max |expected| (0 for empty arrays)."""
    if expected.size == 0:
        return 0.0
    scale = np.abs(expected).max()
    return float(np.abs(np.asarray(got, np.float64) - expected).max() / max(scale, 1e-30))


def run_case(mode, name, ids, cardinalities, output_dim, chunk_size, memory_size, signed, seed, repeats=1,
             bad_row=None, rng=None):
    rng = rng or np.random.default_rng(0)
    memory = rng.standard_normal(memory_size).astype(np.float32)
    grad = rng.standard_normal((ids.shape[0], ids.shape[1], output_dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as work:
        src, dst = os.path.join(work, "in.bin"), os.path.join(work, "out.bin")
        write_input(src, ids, cardinalities, output_dim, chunk_size, memory, grad, signed, seed, repeats)
        completed = subprocess.run([str(BINARY), mode, src, dst], capture_output=True, text=True)
        if completed.returncode != 0:
            return False, f"harness exited {completed.returncode}: {completed.stderr.strip()}"
        first_bad, out = read_output(dst, ids.size, output_dim, memory_size)
    timing = completed.stdout.strip()
    if bad_row is not None:
        return first_bad == bad_row, f"first bad row {first_bad}, expected {bad_row}"
    if first_bad >= 0:
        return False, f"harness rejected row {first_bad} of a valid batch"
    positions = robe_hash.robe_indices(ids, cardinalities, output_dim, chunk_size, memory_size, seed).ravel()
    signs = (robe_hash.robe_signs(ids, cardinalities, output_dim, seed).ravel() if signed
             else np.ones(positions.size, np.float32))
    embeddings = memory[positions] * signs
    memory_grad = np.zeros(memory_size, np.float64)
    np.add.at(memory_grad, positions, grad.ravel().astype(np.float64) * signs)
    unique = np.unique(positions)
    problems = []
    if not np.array_equal(out["positions"], positions):
        problems.append(f"{int((out['positions'] != positions).sum())} positions differ")
    if not np.array_equal(out["signs"], signs):
        problems.append("signs differ")
    # Every kernel variant: the lookup bit for bit, the atomic scatter to 1e-5 relative.
    for variant, got in enumerate(out["embeddings"]):
        if not np.array_equal(got, embeddings):
            problems.append(f"embeddings of variant {variant} differ in {int((got != embeddings).sum())} places")
    for variant, got in enumerate(out["memory_grads"]):
        error = relative_error(got, memory_grad)
        if error > 1e-5:
            problems.append(f"scatter variant {variant} relative error {error:.2e}")
    # The deterministic scatter and the sparse gradient (RobeLookupSparseGrad's contract: the sorted unique
    # positions and their summed values), and the same bits on a second run.
    error = relative_error(out["sorted_memory_grad"], memory_grad)
    if error > 1e-5:
        problems.append(f"sorted scatter relative error {error:.2e}")
    if not np.array_equal(out["sparse_positions"], unique):
        problems.append(f"sparse positions: {out['sparse_positions'].size} returned, {unique.size} expected")
    else:
        error = relative_error(out["sparse_values"], memory_grad[unique])
        if error > 1e-5:
            problems.append(f"sparse values relative error {error:.2e}")
    if out["sorted_repeat_identical"] != 1:
        problems.append("the deterministic scatter or the sparse gradient changed bits between two runs, or (device) "
                        "differs from the host emulation of the same code")
    return not problems, "; ".join(problems) or timing


def correctness_cases(rng):
    """(name, ids, cardinalities, D, Z, M, signed, seed) covering every chunk size, partial chunks, ids near 2^32,
    every warp-row kernel form (float4 with one hash per vector, float4 with a hash per element, scalar), row counts
    that are not multiples of 32, and ids up to 2^63 around multiples of P and of 2^32 * P."""
    cases = []
    for output_dim in (1, 7, 16, 33):
        for chunk_size in sorted({1, 2, 3, output_dim // 2 or 1, output_dim}):
            if chunk_size > output_dim:
                continue
            for signed in (False, True):
                cards = [5, 1000, 2**32 + 7]
                ids = np.stack([rng.integers(0, c, 64) for c in cards], axis=1)
                memory_size = int(rng.integers(chunk_size, 5000))
                cases.append((f"D={output_dim} Z={chunk_size} signed={signed} M={memory_size}", ids, cards,
                              output_dim, chunk_size, memory_size, signed, int(rng.integers(0, 10000))))
    for output_dim, chunk_size in ((64, 4), (64, 32), (64, 6), (128, 16), (128, 32), (128, 1), (20, 4), (12, 12)):
        for signed in (False, True):
            cards = [3, 77, 2**40 + 1, 12345]
            ids = np.stack([rng.integers(0, c, 61) for c in cards], axis=1)  # 244 rows: not a multiple of 32
            memory_size = int(rng.integers(chunk_size, 300000))
            cases.append((f"D={output_dim} Z={chunk_size} signed={signed} M={memory_size} F=4", ids, cards,
                          output_dim, chunk_size, memory_size, signed, int(rng.integers(0, 10000))))
    # More rows than the two-block variant's 16 warps cover in one step (512): its warps stride, advancing the
    # feature index by 512 mod 3.
    for output_dim, chunk_size in ((16, 4), (7, 3), (64, 2)):
        cards = [11, 2**33 + 1, 5000]
        ids = np.stack([rng.integers(0, c, 450) for c in cards], axis=1)  # 1350 rows
        cases.append((f"grid stride D={output_dim} Z={chunk_size} rows=1350", ids, cards, output_dim, chunk_size,
                      int(rng.integers(chunk_size, 100000)), True, int(rng.integers(0, 10000))))
    big = [2**32 - 1, 3]
    ids = np.array([[2**32 - 2, 2], [0, 0], [2**31, 1]], dtype=np.int64)
    cases.append(("ids near 2^32", ids, big, 16, 4, 2**20 + 3, True, 1024))
    cases.append(("memory of exactly one chunk", ids, big, 8, 8, 8, False, 7))
    cases.append(("memory of 8M floats", ids, big, 4, 2, 2**23 + 1, False, 3))
    p = int(robe_hash.P)
    huge = [2**62, 2**62 - 1]  # a = id (first table) or 2^62 + id (second): up to 2^63 - 2
    firsts = [0, 1, p - 1, p, p + 1, 3 * p - 1, 2**62 - 1, 2**31, 2**32, 2**32 - 1, 2**63 // 871205356,
              2**63 // 679088993 + 1, (p << 29) - 1, p << 29]
    near = (p << 32) - 2**62  # a = 2^32 * P: the largest Montgomery sum t + m * P
    seconds = [0, 2**62 - 2, 2**62 - 3, near - 1, near, near + 1, p * 1000, 2**61, 7, 2**62 - p, 1, 2, 3, 4]
    ids = np.array([firsts, seconds], dtype=np.int64).T
    for memory_size, chunk_size in ((4093, 4), (2**20 + 7, 1), (1000, 16)):
        cases.append((f"ids up to 2^63, M={memory_size} Z={chunk_size}", ids, huge, 16, chunk_size, memory_size, True,
                      1024))
    cases.append(("empty batch", np.zeros((0, 2), np.int64), big, 8, 4, 100, True, 1))
    wide = np.stack([rng.integers(0, c, 3) for c in (10, 20)], axis=1)
    cases.append(("wide rows (per-element kernel)", wide, [10, 20], 6000, 7, 100000, True, 11))
    return cases


def kaggle_ids(rng, batch):
    """Zipf-distributed ids per feature, scattered over each table (hot ids are not the low ids)."""
    columns = []
    for cardinality in KAGGLE_CARDINALITIES:
        ranks = rng.zipf(1.1, batch) - 1
        columns.append((ranks * 2654435761 + 12345) % cardinality)
    return np.stack(columns, axis=1).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Bag cases.


def bag_reference(ids, row_splits, weights, offset, output_dim, chunk_size, memory, grad, signed, seed, combiner):
    """(embeddings, memory_grad, weights_grad) in float64 NumPy: the contract of the bag op."""
    a = ids.astype(np.int64) + offset
    element = np.arange(output_dim, dtype=np.int64)
    positions = robe_hash.robe_chunk_hash(a[:, None], element // chunk_size, memory.size, chunk_size, seed)
    positions = positions + element % chunk_size
    signs = np.ones(positions.shape)
    if signed:
        s1, s2, s3 = robe_hash.hash_constants(seed)[3:6]
        mixed = ((a[:, None] % robe_hash.P) * s3 % robe_hash.P + (element * s2) % robe_hash.P + s1) % robe_hash.P
        signs = (1 - 2 * (mixed & 1)).astype(np.float64)
    e = memory.astype(np.float64)[positions] * signs  # [N, D]
    w = np.ones(ids.size) if weights is None else weights.astype(np.float64)
    rows = len(row_splits) - 1
    segments = np.repeat(np.arange(rows), np.diff(row_splits))
    summed = np.zeros((rows, output_dim))
    np.add.at(summed, segments, e * w[:, None])
    if combiner == "sum":
        denominator = np.ones(rows)
    elif combiner == "mean":
        denominator = np.bincount(segments, w, rows)
    else:
        denominator = np.sqrt(np.bincount(segments, w * w, rows))
    safe = np.where(denominator == 0, 1.0, denominator)
    out = np.where(denominator[:, None] == 0, 0.0, summed / safe[:, None])
    g = grad.astype(np.float64)
    id_grad = (g / safe[:, None])[segments] * w[:, None] * signs
    memory_grad = np.zeros(memory.size)
    np.add.at(memory_grad, positions.ravel(), id_grad.ravel())
    g_dot_e = np.einsum("kd,kd->k", g[segments], e)
    g_dot_out = np.einsum("bd,bd->b", g, out)[segments]
    if combiner == "sum":
        weights_grad = g_dot_e
    elif combiner == "mean":
        weights_grad = (g_dot_e - g_dot_out) / safe[segments]
    else:
        weights_grad = (g_dot_e - g_dot_out * w / safe[segments]) / safe[segments]
    return out, memory_grad, weights_grad


def run_bag_case(mode, name, lengths, cardinality, offset, output_dim, chunk_size, memory_size, signed, seed,
                 combiner, weighted, rng, repeats=1, bad_id=None):
    row_splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(row_splits[-1])
    ids = rng.integers(0, cardinality, n).astype(np.int64)
    if bad_id is not None:
        ids[bad_id] = cardinality
    weights = rng.uniform(0.1, 2.0, n).astype(np.float32)
    memory = rng.standard_normal(memory_size).astype(np.float32)
    grad = rng.standard_normal((len(lengths), output_dim)).astype(np.float32)
    constants = robe_hash.hash_constants(seed)[:6]
    header = np.array([BAG_MAGIC, n, len(lengths), output_dim, chunk_size, memory_size, int(signed), *constants,
                       repeats, COMBINERS[combiner], int(weighted), offset, cardinality, 0, 0], dtype=np.int64)
    with tempfile.TemporaryDirectory() as work:
        src, dst = os.path.join(work, "in.bin"), os.path.join(work, "out.bin")
        with open(src, "wb") as f:
            for array in (header, ids, row_splits, weights, memory, grad):
                f.write(np.ascontiguousarray(array).tobytes())
        completed = subprocess.run([str(BINARY), mode, src, dst], capture_output=True, text=True)
        if completed.returncode != 0:
            return False, f"harness exited {completed.returncode}: {completed.stderr.strip()}"
        raw = Path(dst).read_bytes()
    first_bad = int(np.frombuffer(raw[:8], np.int64)[0])
    if bad_id is not None:
        return first_bad == bad_id, f"first bad id {first_bad}, expected {bad_id}"
    if first_bad >= 0:
        return False, f"harness rejected id {first_bad} of a valid bag"
    sizes = (len(lengths) * output_dim, memory_size, n)
    parts = np.split(np.frombuffer(raw[8:], np.float32), np.cumsum(sizes)[:-1])
    out, memory_grad, weights_grad = bag_reference(ids, row_splits, weights if weighted else None, offset,
                                                   output_dim, chunk_size, memory, grad, signed, seed, combiner)
    problems = []

    def relative(got, expected):
        scale = np.abs(expected).max() if expected.size else 1.0
        return np.abs(got - expected).max() / max(scale, 1e-30) if expected.size else 0.0

    if relative(parts[0], out.ravel()) > 1e-5:
        problems.append(f"forward relative error {relative(parts[0], out.ravel()):.2e}")
    empty = np.repeat(np.asarray(lengths) == 0, output_dim)
    if parts[0][empty].any():
        problems.append("an empty row is not zeros")
    if relative(parts[1], memory_grad) > 1e-5:
        problems.append(f"memory gradient relative error {relative(parts[1], memory_grad):.2e}")
    if weighted and relative(parts[2], weights_grad) > 1e-4:
        problems.append(f"weights gradient relative error {relative(parts[2], weights_grad):.2e}")
    return not problems, "; ".join(problems) or completed.stdout.strip()


def bag_cases(rng):
    """(name, lengths, cardinality, offset, D, Z, M, signed, seed, combiner, weighted)."""
    cases = []
    lengths = [0, 3, 1, 0, 7, 500, 5, 0, 1, 0]  # empty rows first, inside and last; one long row
    for combiner in COMBINERS:
        for weighted in (False, True):
            for signed in (False, True):
                for output_dim, chunk_size in ((16, 4), (7, 3)):
                    cases.append((f"bag {combiner} weighted={weighted} signed={signed} D={output_dim} "
                                  f"Z={chunk_size}", lengths, 1000, 12345, output_dim, chunk_size,
                                  int(rng.integers(chunk_size, 20000)), signed, int(rng.integers(0, 10000)),
                                  combiner, weighted))
    cases.append(("bag ids near 2^32", [2, 1], 2**32 - 1, 2**32, 8, 2, 2**20 + 3, True, 5, "mean", True))
    cases.append(("bag of no rows", [], 10, 0, 4, 2, 50, False, 1, "sqrtn", True))
    return cases


def run_bag_cases(mode, rng, bench):
    failures = 0
    for name, lengths, cardinality, offset, d, z, m, signed, seed, combiner, weighted in bag_cases(rng):
        ok, detail = run_bag_case(mode, name, lengths, cardinality, offset, d, z, m, signed, seed, combiner,
                                  weighted, rng)
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail if not ok else ''}".rstrip(), flush=True)
    ok, detail = run_bag_case(mode, "bag invalid id", [2, 3], 10, 0, 4, 2, 50, False, 1, "sum", False, rng, bad_id=3)
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} bag invalid id reported at its position: {detail}", flush=True)
    if bench:
        # The bag shape: 16384 rows x 20 ids of a 10M-row table, D=16, Z=4, 1000x.
        ok, detail = run_bag_case(mode, "bag bench", [20] * 16384, 10_000_000, 0, 16, 4, 160_000, False, 1024,
                                  "mean", False, rng, repeats=20)
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} bag 16384 x 20 mean: {detail}", flush=True)
    return failures


# ---------------------------------------------------------------------------------------------------------------
# Bench: every kernel variant, the device copy and the PyTorch anchors of issue 19, in one run.

BENCH_SHAPES = [(16, 1), (16, 4), (16, 16), (64, 1), (64, 4), (64, 16), (64, 32), (128, 1), (128, 4), (128, 16),
                (128, 32)]  # (D, Z); Z = 32 > D = 16 is not a valid shape


def run_bench_case(ids, output_dim, chunk_size, memory_size, repeats):
    """The harness in bench mode (memory and gradient made on the device, results compared there): (ok, fields)."""
    with tempfile.TemporaryDirectory() as work:
        src, dst = os.path.join(work, "in.bin"), os.path.join(work, "out.bin")
        write_input(src, ids, KAGGLE_CARDINALITIES, output_dim, chunk_size, memory_size, None, False, 1024, repeats,
                    bench=True)
        completed = subprocess.run([str(BINARY), "device", src, dst], capture_output=True, text=True)
        if completed.returncode != 0:
            return False, {"error": f"harness exited {completed.returncode}: {completed.stderr.strip()}"}
        first_bad = int(np.frombuffer(Path(dst).read_bytes()[:8], np.int64)[0])
    fields = dict(item.split("=", 1) for item in shlex.split(completed.stdout.strip().splitlines()[-1]))
    return first_bad == -1, fields


def median_ms(torch, fn, repeats):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return float(np.median(times))


def framework_robe_positions(a, chunk_terms, in_chunk, memory_size, output_dim, r3):
    """ROBE-Z positions in array-framework ops (NumPy or PyTorch: the same expression), the pure-framework anchor:
    a [B, F] offset ids, chunk_terms [C] = (c*R2 + R1) mod P, in_chunk [Z] = 0..Z-1 -> positions [B, F, D]."""
    p = int(robe_hash.P)
    chunks, chunk_size = chunk_terms.shape[0], in_chunk.shape[0]
    row = (a % p) * r3 % p
    starts = (row[..., None] + chunk_terms) % p % (memory_size - chunk_size + 1)
    return (starts[..., None] + in_chunk).reshape(*a.shape, chunks * chunk_size)[..., :output_dim]


def torch_anchors(ids, output_dim, chunk_size, memory_size, repeats):
    """The issue's PyTorch anchors on the same ids, or {} when torch (with CUDA) does not import: the full-table
    `embedding` gather, ROBE-Z written in framework ops (hash + gather), and `index_add_` with the positions
    precomputed."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    device = torch.device("cuda")
    r1, r2, r3 = (int(v) for v in robe_hash.hash_constants(1024)[:3])
    p = int(robe_hash.P)
    a = torch.as_tensor(ids + robe_hash.table_offsets(KAGGLE_CARDINALITIES)[None, :], device=device)
    out = {}
    table = torch.empty((sum(KAGGLE_CARDINALITIES), output_dim), device=device).uniform_(-1, 1)
    out["torch_embedding_ms"] = median_ms(torch, lambda: torch.nn.functional.embedding(a, table), repeats)
    del table
    torch.cuda.empty_cache()
    memory = torch.empty(memory_size, device=device).uniform_(-1, 1)
    chunks = -(-output_dim // chunk_size)
    chunk_terms = (torch.arange(chunks, device=device) * r2 % p + r1) % p
    in_chunk = torch.arange(chunk_size, device=device)

    def robe_positions():
        return framework_robe_positions(a, chunk_terms, in_chunk, memory_size, output_dim, r3)

    positions = robe_positions()
    expected = robe_hash.robe_indices(ids[:64], KAGGLE_CARDINALITIES, output_dim, chunk_size, memory_size, 1024)
    if not np.array_equal(positions[:64].cpu().numpy(), expected):
        raise AssertionError("the PyTorch ROBE anchor's positions differ from robe_indices")
    out["torch_robe_ms"] = median_ms(torch, lambda: memory[robe_positions()], repeats)
    flat = positions.reshape(-1)
    grad = torch.empty(flat.numel(), device=device).uniform_(-1, 1)
    out["torch_index_add_ms"] = median_ms(
        torch, lambda: torch.zeros(memory_size, device=device).index_add_(0, flat, grad), repeats)
    del positions, flat, grad, memory
    torch.cuda.empty_cache()
    return out


def run_bench(mode, rng, batch, json_path):
    """Times every lookup / scatter variant per (D, Z); prints ms, GB/s as the harness counts bytes, the fraction
    of the device-to-device copy measured in the same harness run, the DRAM-only view (ids in + embeddings out)
    and the PyTorch anchors. Returns the number of failed cases."""
    if mode != "device":
        print("bench: needs --mode device (skipped)")
        return 0
    ids = kaggle_ids(rng, batch)
    logical_rows = sum(KAGGLE_CARDINALITIES)
    failures = 0
    records = []
    for output_dim, chunk_size in BENCH_SHAPES:
        memory_size = logical_rows * output_dim // 1000
        ok, fields = run_bench_case(ids, output_dim, chunk_size, memory_size, repeats=20)
        failures += not ok
        if "error" in fields:
            print(f"FAIL bench D={output_dim} Z={chunk_size}: {fields['error']}", flush=True)
            continue
        try:
            anchors = torch_anchors(ids, output_dim, chunk_size, memory_size, repeats=20)
        except Exception as error:  # an anchor's failure must not cost the kernels' numbers of this one GPU run
            print(f"  torch anchors failed: {type(error).__name__}: {error}", flush=True)
            anchors = {}
        copy_gbs = float(fields["copy_gbs"])
        lookup_bytes, scatter_bytes, dram_bytes = (float(fields[k]) for k in ("lookup_bytes", "scatter_bytes",
                                                                              "dram_bytes"))
        print(f"{'PASS' if ok else 'FAIL'} bench {fields['gpu']} D={output_dim} Z={chunk_size} rows={fields['rows']} "
              f"M={memory_size} copy={copy_gbs:.0f} GB/s (lookup mismatches {fields['lookup_mismatches']}, scatter "
              f"relative error {fields['scatter_relative_error']}, sorted bit-identical {fields['sorted_identical']})",
              flush=True)
        print(f"  {'kernel':<32}{'ms':>9}{'GB/s':>9}{'of copy':>9}{'DRAM GB/s':>11}{'vs torch':>10}")
        for key, value in fields.items():
            if not key.endswith("_ms") or key == "copy_ms":
                continue
            ms = float(value)
            kind = key.split("_", 1)[0]
            counted = lookup_bytes if kind == "lookup" else scatter_bytes
            gbs = counted / ms / 1e6
            anchor = anchors.get("torch_embedding_ms" if kind == "lookup" else "torch_index_add_ms")
            record = dict(gpu=fields["gpu"], D=output_dim, Z=chunk_size, rows=int(fields["rows"]), M=memory_size,
                          kernel=key[:-3], ms=ms, gbs=gbs, of_copy=gbs / copy_gbs, dram_gbs=dram_bytes / ms / 1e6,
                          copy_gbs=copy_gbs, speedup_vs_torch=(anchor / ms if anchor else None))
            records.append(record)
            print(f"  {key[:-3]:<32}{ms:>9.4f}{gbs:>9.0f}{gbs / copy_gbs:>9.1%}{dram_bytes / ms / 1e6:>11.0f}"
                  + (f"{anchor / ms:>9.2f}x" if anchor else ""), flush=True)
        for key, ms in anchors.items():
            records.append(dict(gpu=fields["gpu"], D=output_dim, Z=chunk_size, rows=int(fields["rows"]),
                                M=memory_size, kernel=key[:-3], ms=ms, copy_gbs=copy_gbs))
            print(f"  {key[:-3]:<32}{ms:>9.4f}", flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(records, indent=1))
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("host", "device"), default="device")
    parser.add_argument("--arch", default="sm_90", help="nvcc -arch (default %(default)s: H100/H200)")
    parser.add_argument("--nvcc", default=os.environ.get("NVCC") or shutil.which("nvcc") or "nvcc")
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--rebuild", action="store_true", help="recompile even if the binary exists")
    parser.add_argument("--bench", action="store_true", help="also time every kernel variant on the Kaggle shape "
                        "(batch x 26 features, ROBE 1000x, D in 16/64/128, Z in 1/4/16/32) beside the device copy and "
                        "the PyTorch anchors, and the bag shape (16384 rows x 20 ids)")
    parser.add_argument("--batch", type=int, default=262144, help="bench batch (rows of 26 ids; default %(default)s)")
    parser.add_argument("--json", help="also write the bench records to this JSON file")
    parser.add_argument("--only", choices=("all", "lookup", "bag"), default="all",
                        help="which cases to run (default %(default)s)")
    args = parser.parse_args(argv)

    if args.rebuild or args.compile_only or not BINARY.exists():
        compile_harness(args.nvcc, args.arch)
    if args.compile_only:
        return 0

    rng = np.random.default_rng(2024)
    failures = 0
    if args.only in ("all", "bag"):
        failures += run_bag_cases(args.mode, np.random.default_rng(16), args.bench)
    if args.only == "bag":
        print("all passed" if failures == 0 else f"{failures} failed")
        return 1 if failures else 0
    for name, ids, cards, output_dim, chunk_size, memory_size, signed, seed in correctness_cases(rng):
        ok, detail = run_case(args.mode, name, ids, cards, output_dim, chunk_size, memory_size, signed, seed, rng=rng)
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail if not ok else ''}".rstrip(), flush=True)
    ids = np.array([[1, 2], [3, 20]], dtype=np.int64)
    ok, detail = run_case(args.mode, "invalid id", ids, [10, 20], 4, 2, 50, False, 1, bad_row=3)
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} invalid id reported at its row: {detail}", flush=True)

    if args.bench:
        failures += run_bench(args.mode, rng, args.batch, args.json)
    print("all passed" if failures == 0 else f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
