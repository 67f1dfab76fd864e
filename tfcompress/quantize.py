"""Post-training int8 quantization of one embedding table (NumPy; the model rewrite is `tfcompress.model_rewrite`).

Symmetric, one scale per table: q = clip(round(w / s), -127, 127) and w ~ q * s. The scale is not simply
max|w| / 127: a smaller scale clips the few largest values but rounds all the others more finely, which often
lowers the total error. `quantize_int8` searches a grid of fractions of max|w| / 127 (max-abs itself included,
so the chosen scale is never worse than it) for the least L2 error between the float and de-quantized values.

Example::

    values, scale = quantize_int8(table)          # int8 [n, d], float
    restored = dequantize_int8(values, scale)     # float32 [n, d]
"""

import numpy as np

INT8_LIMIT = 127  # symmetric range [-127, 127]: -128 is left unused so that q and -q are both representable
DEFAULT_GRID_SIZE = 100


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
