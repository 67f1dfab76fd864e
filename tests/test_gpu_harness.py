"""custom_ops/cuda_harness/run_harness.py's Python side, without a GPU: the bench's plumbing (input file, output
parsing, the printed table and the JSON records) against a stand-in harness binary, and the correctness cases'
validity. A GPU session gets one prepared device command (custom_ops/README.md, "GPU check"); an error in this
script would waste it."""

import importlib.util
import json
import os
import stat

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_run_harness():
    spec = importlib.util.spec_from_file_location(
        "run_harness", os.path.join(ROOT, "custom_ops", "cuda_harness", "run_harness.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# What the harness prints in bench mode (robe_harness.cu, RunDevice), with a GPU name that contains spaces.
FAKE_LINE = ('mode=device gpu="NVIDIA H100 80GB HBM3" rows={rows} D={d} Z={z} M={m} lookup_tiled_ms=0.5000 '
             'scatter_tiled_ms=0.7000 lookup_warp_rows_ms=0.2500 scatter_warp_rows_ms=0.3500 scatter_sorted_ms=3.0000 '
             'sparse_sorted_ms=3.1000 lookup_mismatches=0 scatter_relative_error=1.2e-07 sorted_identical=1 '
             'lookup_bytes=1000000000 scatter_bytes=1500000000 dram_bytes=500000000 copy_ms=0.2500 copy_gbs=4000.0')


def fake_harness(tmp_path, header_log):
    """A stand-in binary: checks the bench input's header, writes first_bad_row = -1, prints FAKE_LINE."""
    script = tmp_path / "robe_harness"
    script.write_text(f"""#!{os.environ.get('PYTHON', 'python3')}
import sys, numpy as np
header = np.fromfile(sys.argv[2], np.int64, 16)
with open({str(header_log)!r}, "a") as log:
    log.write(" ".join(str(int(v)) for v in header) + "\\n")
np.array([-1], np.int64).tofile(sys.argv[3])
print({FAKE_LINE!r}.format(rows=header[1], d=header[3], z=header[4], m=header[5]))
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_bench_plumbing_with_a_stand_in_harness(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setenv("PYTHON", sys.executable)
    rh = load_run_harness()
    header_log = tmp_path / "headers.txt"
    monkeypatch.setattr(rh, "BINARY", fake_harness(tmp_path, header_log))
    monkeypatch.setattr(rh, "torch_anchors", lambda *args, **kwargs: {"torch_embedding_ms": 5.0,
                                                                      "torch_robe_ms": 2.5,
                                                                      "torch_index_add_ms": 0.7})
    json_path = tmp_path / "bench.json"
    failures = rh.run_bench("device", np.random.default_rng(0), 64, str(json_path))
    assert failures == 0
    headers = [list(map(int, line.split())) for line in header_log.read_text().splitlines()]
    assert [(h[3], h[4]) for h in headers] == rh.BENCH_SHAPES
    for h in headers:
        assert h[0] == rh.MAGIC and h[1] == 64 * 26 and h[2] == 26 and h[14] == 1  # a bench input: ids only
        assert h[5] == sum(rh.KAGGLE_CARDINALITIES) * h[3] // 1000
    records = json.loads(json_path.read_text())
    lookup = [r for r in records if r["kernel"] == "lookup_warp_rows"]
    assert len(lookup) == len(rh.BENCH_SHAPES)
    assert lookup[0]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert lookup[0]["gbs"] == 4000.0 and lookup[0]["of_copy"] == 1.0 and lookup[0]["dram_gbs"] == 2000.0
    assert lookup[0]["speedup_vs_torch"] == 20.0  # the full-table gather at 5 ms
    scatter = [r for r in records if r["kernel"] == "scatter_warp_rows"][0]
    assert scatter["speedup_vs_torch"] == 2.0  # index_add_ at 0.7 ms
    assert {r["kernel"] for r in records} >= {"torch_embedding", "torch_robe", "torch_index_add", "scatter_sorted",
                                              "sparse_sorted", "lookup_tiled", "scatter_tiled"}
    printed = capsys.readouterr().out
    assert "PASS bench NVIDIA H100 80GB HBM3 D=16 Z=4" in printed and "FAIL" not in printed


def test_correctness_cases_are_valid_inputs():
    rh = load_run_harness()
    cases = rh.correctness_cases(np.random.default_rng(2024))
    for name, ids, cards, output_dim, chunk_size, memory_size, signed, seed in cases:
        assert 1 <= chunk_size <= output_dim and memory_size >= chunk_size, name
        assert ids.shape[1] == len(cards) and sum(cards) < 2**63, name
        assert ((ids >= 0) & (ids < np.asarray(cards, dtype=np.int64))).all(), name
    names = " ".join(case[0] for case in cases)
    for covered in ("ids up to 2^63", "grid stride", "D=64 Z=32", "D=128 Z=1", "D=7", "wide rows"):
        assert covered in names


def test_framework_robe_anchor_equals_robe_indices():
    """The bench's pure-framework ROBE-Z anchor (run with PyTorch on the GPU) is one expression for NumPy and
    PyTorch; with NumPy it must give robe_indices exactly."""
    rh = load_run_harness()
    robe_hash = rh.robe_hash
    rng = np.random.default_rng(3)
    cards = rh.KAGGLE_CARDINALITIES
    ids = rh.kaggle_ids(rng, 50)
    a = ids + robe_hash.table_offsets(cards)[None, :]
    r1, r2, r3 = (int(v) for v in robe_hash.hash_constants(1024)[:3])
    for output_dim, chunk_size, memory_size in ((16, 4, 540201), (64, 32, 2160805), (128, 1, 100), (7, 3, 50)):
        chunks = -(-output_dim // chunk_size)
        chunk_terms = (np.arange(chunks) * r2 % robe_hash.P + r1) % robe_hash.P
        got = rh.framework_robe_positions(a, chunk_terms, np.arange(chunk_size), memory_size, output_dim, r3)
        np.testing.assert_array_equal(got, robe_hash.robe_indices(ids, cards, output_dim, chunk_size, memory_size))
