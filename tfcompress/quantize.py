"""Post-training int8 quantization of embedding tables, and the storage each deployment choice needs.

Symmetric, one scale per table: q = clip(round(w / s), -127, 127) and w ~ q * s. The scale is not simply
max|w| / 127: a smaller scale clips the few largest values but rounds all the others more finely, which often
lowers the total error. `quantize_int8` searches a grid of fractions of max|w| / 127 (max-abs itself included,
so the chosen scale is never worse than it) for the least L2 error between the float and de-quantized values.

Example::

    values, scale = quantize_int8(table)          # int8 [n, d], float
    restored = dequantize_int8(values, scale)     # float32 [n, d]
    small = quantize_model(trained_model)         # every full/hashed/MLET table -> QuantizedEmbedding
    print(format_deployment_sizes(cardinalities, output_dim, inner_dim=64))   # d, d/2, d/4, d/8
"""

import numpy as np

INT8_LIMIT = 127  # symmetric range [-127, 127]: -128 is left unused so that q and -q are both representable
DEFAULT_GRID_SIZE = 100
BYTES_PER_FLOAT = 4
BYTES_PER_INT8 = 1


def check_grid_size(grid_size):
    if isinstance(grid_size, bool) or int(grid_size) != grid_size or grid_size < 1:
        raise ValueError(f"grid_size must be an integer >= 1, got {grid_size!r}")
    return int(grid_size)


def quantize_with_scale(table, scale):
    """int8 values of `table` at `scale`: clip(round(table / scale), -127, 127)."""
    return np.clip(np.rint(np.asarray(table, np.float32) / np.float32(scale)), -INT8_LIMIT, INT8_LIMIT).astype(np.int8)


def dequantize_int8(values, scale):
    """float32 values * scale."""
    return np.asarray(values, np.float32) * np.float32(scale)


def quantization_error(table, scale):
    """Sum of squared differences between `table` and its int8 round trip at `scale`."""
    table = np.asarray(table, np.float32)
    restored = dequantize_int8(quantize_with_scale(table, scale), scale)
    return float(np.sum(np.square(restored.astype(np.float64) - table.astype(np.float64))))


def max_abs_scale(table):
    """The scale that maps the largest |value| to 127 exactly (1.0 for an all-zero table)."""
    peak = float(np.max(np.abs(table))) if np.size(table) else 0.0
    return peak / INT8_LIMIT if peak > 0 else 1.0


def scale_candidates(table, grid_size=DEFAULT_GRID_SIZE):
    """Scales tried by `quantize_int8`: max_abs_scale * j / grid_size for j = 1 .. grid_size (the last is max-abs)."""
    grid_size = check_grid_size(grid_size)
    return max_abs_scale(table) * np.arange(1, grid_size + 1, dtype=np.float64) / grid_size


def quantize_int8(table, grid_size=DEFAULT_GRID_SIZE):
    """Quantize one float table to int8 with the scale of least L2 error on a grid.

    Args:
        table: float array of any shape (one embedding table).
        grid_size: number of scales tried, evenly spaced fractions (1/grid_size .. 1) of the max-abs scale.

    Returns:
        (int8 array of the table's shape, float scale) with table ~ values * scale.

    Raises:
        ValueError: the table holds NaN or infinite values, or grid_size < 1.
    """
    table = np.asarray(table, np.float32)
    if not np.all(np.isfinite(table)):
        raise ValueError(f"cannot quantize a table with NaN or infinite values ({np.sum(~np.isfinite(table))} of them)")
    candidates = scale_candidates(table, grid_size)
    errors = [quantization_error(table, s) for s in candidates]
    # argmin takes the first minimum: on ties the finer scale wins, which only matters for degenerate tables.
    # The layer stores the scale as float32; return exactly that value so the error measured here is the real one.
    best = float(np.float32(candidates[int(np.argmin(errors))]))
    return quantize_with_scale(table, best), best


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


def quantize_layer(layer, grid_size=DEFAULT_GRID_SIZE):
    """The int8 replacement of one layer, or None when it has no float table to quantize.

    Args:
        layer: a built `FullEmbedding` or `HashingTrickEmbedding` -> a `QuantizedEmbedding` with the same rows and
            name; an `MLETEmbedding` -> folded first, then quantized; a `PlannedEmbedding` -> a new one with those
            members quantized and copies of the others (ROBE, QR, ... stay as they are); any other layer -> None.
        grid_size: scales tried per table (see `quantize_int8`).
    """
    from tfcompress.folding import fold_layer, rebuild_planned
    from tfcompress.layers import FullEmbedding, HashingTrickEmbedding, MLETEmbedding, PlannedEmbedding
    from tfcompress.layers.quantized import QuantizedEmbedding

    if isinstance(layer, MLETEmbedding):
        layer = fold_layer(layer)
    if isinstance(layer, (FullEmbedding, HashingTrickEmbedding)):
        if not layer.built:
            raise ValueError(
                f"{type(layer).__name__} {layer.name!r} is not built (no weights yet); call it on ids first")
        num_buckets = layer.num_buckets if isinstance(layer, HashingTrickEmbedding) else None
        quantized = QuantizedEmbedding(layer.cardinalities, layer.output_dim, num_buckets=num_buckets,
                                       out_of_range=layer.out_of_range, name=layer.name)
        pairs = [quantize_int8(table.numpy(), grid_size) for table in layer.tables]
        quantized.set_quantized([values for values, _ in pairs], [scale for _, scale in pairs])
        return quantized
    if isinstance(layer, PlannedEmbedding):
        return rebuild_planned(layer, lambda member: quantize_layer(member, grid_size))
    return None


def quantize_model(model, grid_size=DEFAULT_GRID_SIZE):
    """A new model with every full, hashed or MLET (folded first) table stored as int8 (see `quantize_layer`)."""
    from tfcompress.folding import replace_layers

    grid_size = check_grid_size(grid_size)
    return replace_layers(model, lambda layer: quantize_layer(layer, grid_size))
