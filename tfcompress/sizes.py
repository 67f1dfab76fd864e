"""Byte sizes: parsing and printing them, and the storage that tables of each kind take.

The bottom of the package (no TensorFlow, no other tfcompress module): plans, layers, training and export all
measure tables with these functions, so the numbers they print agree.
"""

import re

BYTES_PER_FLOAT = 4  # float32: every trained table
BYTES_PER_INT8 = 1
BYTES_PER_PARAMETER = BYTES_PER_FLOAT

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(budget):
    """'100MB' -> 100_000_000, '64MiB' -> 67_108_864, 1500 -> 1500. Decimal units are powers of 10."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value = float(budget)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"budget must look like '100MB', '64MiB' or a number of bytes, got {budget!r}")
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"budget must be > 0 bytes, got {budget!r}")
    return int(value)


def format_bytes(n):
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def storage_bytes(rows, output_dim, int8=False, tables=1):
    """Bytes of `rows` rows of width `output_dim`: float32, or int8 plus one float32 scale per table."""
    if int8:
        return rows * output_dim * BYTES_PER_INT8 + tables * BYTES_PER_FLOAT
    return rows * output_dim * BYTES_PER_FLOAT


def deployment_sizes(cardinalities, output_dim, hashed_rows=None, inner_dim=None):
    """Bytes of the embedding tables for each way of deploying them, as (name, bytes, ratio to full float32).

    The four deployments of the MLET paper: full float32 d-wide tables ("d" floats per id), hashed to
    `hashed_rows` (d/2 per id when the hashing halves the rows), int8 (d/4: a byte instead of four) and hashed
    + int8 (d/8). With `inner_dim` the MLET training size (rows * k + F * k * d floats) is listed too.

    Args:
        cardinalities: rows of each full table.
        output_dim: d.
        hashed_rows: rows of each hashed table (e.g. `[ceil(n / 2) for n in cardinalities]`); default: halve
            every table, as the paper does for its largest ones.
        inner_dim: k of an MLET training, or None.
    """
    cards = [int(n) for n in cardinalities]
    if hashed_rows is None:
        hashed_rows = [(n + 1) // 2 for n in cards]
    if len(hashed_rows) != len(cards):
        raise ValueError(f"hashed_rows has {len(hashed_rows)} entries for {len(cards)} tables")
    tables = len(cards)
    full = storage_bytes(sum(cards), output_dim)
    rows = []
    if inner_dim is not None:
        training = (sum(cards) * inner_dim + tables * inner_dim * output_dim) * BYTES_PER_FLOAT
        rows.append((f"MLET training, k={inner_dim} (float32)", training))
        hashed_training = (sum(hashed_rows) * inner_dim + tables * inner_dim * output_dim) * BYTES_PER_FLOAT
        rows.append((f"MLET training, hashed, k={inner_dim} (float32)", hashed_training))
    rows += [
        ("full / folded (float32)", full),
        ("hashed (float32)", storage_bytes(sum(hashed_rows), output_dim)),
        ("full / folded (int8)", storage_bytes(sum(cards), output_dim, int8=True, tables=tables)),
        ("hashed (int8)", storage_bytes(sum(hashed_rows), output_dim, int8=True, tables=tables)),
    ]
    return [(name, size, size / full) for name, size in rows]


def format_deployment_sizes(cardinalities, output_dim, hashed_rows=None, inner_dim=None):
    """`deployment_sizes` as a markdown table."""
    lines = ["| deployment | bytes | vs full float32 |", "|---|---:|---:|"]
    for name, size, ratio in deployment_sizes(cardinalities, output_dim, hashed_rows, inner_dim):
        lines.append(f"| {name} | {size:,} | {ratio:.3f} |")
    return "\n".join(lines)
