"""Fuzz the ROBE-Z custom ops with random shapes, dtypes, attrs and values: errors, never a crashed process.

The cases run in a subprocess (this file's __main__), so a segfault or an abort inside a kernel fails the test with
the last case's description instead of killing pytest. Every call must either succeed or raise one of TensorFlow's
errors / TypeError / ValueError; a call that succeeds on valid inputs must also match the NumPy reference
(tfcompress.robe_hash), so the fuzz checks values, not only survival.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

CASES = 400


def test_fuzz_cases_raise_errors_never_crash(tmp_path):
    report = tmp_path / "report.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, __file__, str(CASES), "20240611", str(report)], capture_output=True,
                            text=True, env=env, timeout=600)
    last_case = result.stdout.strip().splitlines()[-1:] or ["<none>"]
    assert result.returncode == 0, (
        f"fuzz process died (rc {result.returncode}) at: {last_case}\n{result.stderr[-3000:]}")
    summary = json.loads(report.read_text())
    assert summary["unexpected"] == [], summary["unexpected"][:5]
    assert summary["wrong_values"] == [], summary["wrong_values"][:5]
    # Not vacuous: plenty of both outcomes, and successes were checked against NumPy.
    assert summary["ok"] >= CASES // 5 and summary["errors"] >= CASES // 5, summary
    assert summary["checked"] >= CASES // 10, summary


@pytest.mark.slow
def test_fuzz_many_cases_raise_errors_never_crash(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, __file__, "5000", "7", str(report)], capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=3600)
    assert result.returncode == 0, result.stdout.strip().splitlines()[-1:]
    summary = json.loads(report.read_text())
    assert summary["unexpected"] == [] and summary["wrong_values"] == []


# ---------------------------------------------------------------------------------------------------------------
# The subprocess side.

OPS = ("lookup", "resource_lookup", "grad", "sparse_grad", "positions")


def random_case(rng):
    """One random call: mostly near-valid inputs with one thing perturbed, sometimes anything goes."""
    from tfcompress import robe_hash

    features = int(rng.integers(1, 5))
    cards = [int(rng.choice([1, 2, 7, 1000, 2**32 + 3])) for _ in range(features)]
    output_dim = int(rng.integers(1, 20))
    chunk_size = int(rng.integers(1, output_dim + 1))
    seed = int(rng.integers(0, 2**31))
    constants = [int(v) for v in robe_hash.hash_constants(seed)[:6]]
    memory_size = int(rng.integers(chunk_size, 300))
    batch = int(rng.choice([0, 1, 3, 17, 64]))
    ids = np.stack([rng.integers(0, c, batch) for c in cards], axis=1).reshape(batch, features).astype(np.int64)
    case = dict(op=str(rng.choice(OPS)), cards=cards, output_dim=output_dim, chunk_size=chunk_size,
                constants=constants, seed=seed, signed=bool(rng.integers(0, 2)), memory_size=memory_size, ids=ids,
                memory=rng.standard_normal(memory_size).astype(np.float32),
                grad=rng.standard_normal((batch, features, output_dim)).astype(np.float32),
                graph=bool(rng.integers(0, 4) == 0), valid=True)
    for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):
        try:
            perturb(rng, case)
        except (IndexError, OverflowError, ValueError, TypeError):
            case["valid"] = False  # two perturbations that do not compose (e.g. slicing a 0-d array): keep the first
    return case


def perturb(rng, case):
    """Break one input or attr; marks the case as not checkable against the reference."""
    case["valid"] = False
    kind = int(rng.integers(0, 16))
    ids = case["ids"]
    int64_matrix = ids.dtype == np.int64 and ids.size > 0  # earlier perturbations may have changed dtype or rank
    if kind == 0 and int64_matrix:
        ids.flat[int(rng.integers(0, ids.size))] = int(rng.choice([-1, -2**63, 2**63 - 1, 2**40]))
    elif kind == 1 and int64_matrix and ids.ndim == 2 and ids.shape[1] <= len(case["cards"]):
        feature = int(rng.integers(0, ids.shape[1]))
        ids[int(rng.integers(0, ids.shape[0])), feature] = case["cards"][feature]  # one past the end
    elif kind == 2:
        case["ids"] = rng.integers(0, 3, size=tuple(int(d) for d in rng.integers(0, 4, int(rng.integers(0, 4)))))
    elif kind == 3:
        case["ids"] = ids.astype(rng.choice([np.int32, np.float32, np.uint8, np.float64]))
    elif kind == 4:
        case["memory"] = rng.standard_normal(tuple(int(d) for d in rng.integers(0, 5, int(rng.integers(0, 3)))))
    elif kind == 5:
        case["memory"] = case["memory"].astype(rng.choice([np.float64, np.float16, np.int32]))
    elif kind == 6:
        case["memory"] = case["memory"][: int(rng.integers(0, case["chunk_size"]))]
    elif kind == 7:
        case["memory_size"] = int(rng.choice([-5, 0, case["chunk_size"] - 1, 2**48 + 1, -2**63]))
    elif kind == 8:
        case["memory_size"] = np.array([case["memory_size"]] * int(rng.integers(0, 3)), np.int64)
    elif kind == 9:
        shape = list(case["grad"].shape)
        shape[int(rng.integers(0, 3))] += int(rng.choice([-1, 1, 5]))
        case["grad"] = np.zeros([max(d, 0) for d in shape], np.float32)
    elif kind == 10:
        case["chunk_size"] = int(rng.choice([0, -1, case["output_dim"] + 1, 2**40]))
    elif kind == 11:
        case["output_dim"] = int(rng.choice([0, -3, 2**25, 2**40]))
    elif kind == 12:
        case["cards"] = case["cards"] + [int(rng.choice([0, -1, 5]))]
    elif kind == 13:
        case["cards"] = [int(rng.choice([0, -7, 2**62]))] * len(case["cards"])
    elif kind == 14:
        case["constants"] = [int(v) for v in rng.choice([-1, 0, 5, 2038074743, 2**62], int(rng.integers(0, 9)))]
    else:
        case["grad"] = case["grad"].astype(np.float64)


def run_op(lib, case):
    import tensorflow as tf

    attrs = dict(cardinalities=case["cards"], output_dim=case["output_dim"], chunk_size=case["chunk_size"],
                 hash_constants=case["constants"], signed=case["signed"])

    def call():
        op = case["op"]
        if op == "lookup":
            return lib.robe_lookup(case["memory"], case["ids"], **attrs)
        if op == "resource_lookup":
            return lib.robe_resource_lookup(tf.Variable(case["memory"]).handle, case["ids"], **attrs)
        if op == "grad":
            algorithm = ["auto", "serial", "partial_sums", "destination_ranges"][case["seed"] % 4]
            return lib.robe_lookup_grad(case["grad"], case["ids"], case["memory_size"], scatter_algorithm=algorithm,
                                        **attrs)
        if op == "sparse_grad":
            return lib.robe_lookup_sparse_grad(case["grad"], case["ids"], case["memory_size"], **attrs)
        return lib.robe_positions(case["ids"], case["memory_size"], **attrs)

    if case["graph"] and case["op"] != "resource_lookup":
        result = tf.function(call, autograph=False)()
    else:
        result = call()
    return [t.numpy() for t in (result if isinstance(result, (list, tuple)) else [result])]


def reference(case):
    """Expected outputs for a valid case (NumPy, float64 scatters)."""
    from tfcompress import robe_hash

    cards, dim, z, seed = case["cards"], case["output_dim"], case["chunk_size"], case["seed"]
    size = case["memory"].size if case["op"] in ("lookup", "resource_lookup") else case["memory_size"]
    positions = robe_hash.robe_indices(case["ids"], cards, dim, z, size, seed)
    signs = (robe_hash.robe_signs(case["ids"], cards, dim, seed) if case["signed"]
             else np.ones(positions.shape, np.float32))
    if case["op"] in ("lookup", "resource_lookup"):
        return [case["memory"][positions] * signs]
    if case["op"] == "positions":
        return [positions, signs]
    dense = np.zeros(size, np.float64)
    np.add.at(dense, positions.ravel(), (case["grad"].astype(np.float64) * signs).ravel())
    if case["op"] == "grad":
        return [dense]
    touched = np.unique(positions)
    return [touched, dense[touched]]


def matches(actual, expected):
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            return False
        if a.dtype.kind in "iu" or e.dtype == np.float32:
            if not np.array_equal(a, e):
                return False
        elif e.size and np.abs(a - e).max() > 1e-5 * max(1.0, np.abs(e).max()):
            return False
    return True


def main(count, seed, report_path):
    import tensorflow as tf

    from tfcompress import fused_ops

    lib = fused_ops.load_library()
    if lib is None:
        raise SystemExit(f"custom ops unavailable: {fused_ops.unavailable_reason()}")
    rng = np.random.default_rng(seed)
    summary = dict(ok=0, errors=0, checked=0, unexpected=[], wrong_values=[])
    for index in range(count):
        case = random_case(rng)
        description = {k: (v.shape, str(v.dtype)) if isinstance(v, np.ndarray) else v for k, v in case.items()
                       if k not in ("constants",)}
        print(f"case {index}: {description}", flush=True)  # the last line names the culprit if the process dies
        try:
            outputs = run_op(lib, case)
        except (tf.errors.OpError, TypeError, ValueError):
            summary["errors"] += 1
            continue
        except Exception as error:  # noqa: BLE001 - anything else is a finding
            summary["unexpected"].append(f"case {index}: {type(error).__name__}: {error}"[:500])
            continue
        summary["ok"] += 1
        if case["valid"]:
            summary["checked"] += 1
            if not matches(outputs, reference(case)):
                summary["wrong_values"].append(f"case {index}: {description}")
    with open(report_path, "w") as f:
        json.dump(summary, f)
    print("done", {k: v if isinstance(v, int) else len(v) for k, v in summary.items()}, flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
