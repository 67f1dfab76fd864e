"""The serving layout an export fixes for ROBE-Z lookups (docs/export_contract.md "Serving layout").

`export_saved_model(..., chunk_reads=, unique_ids=, jit_compile=)` checks its options here and hands them to the
`tfcompress.lookup.TableReader` every `serving_lookup` reads through. The defaults are the measured fastest on CPU
without XLA (bench/bench_serving.py, BENCHMARKS.md "Serving (issue 20)"):

- chunk_reads="auto": "windows" — the window matrix W[j] = M[j : j + Z] is saved with the export (Z times |M|: at
  1000x with Z = 16 still ~60x smaller than the full tables) and each chunk is one row gather from it — wherever W
  holds at most a tenth of the floats of the full tables (`tfcompress.lookup.WINDOWS_MAX_FRACTION`), else
  "per_call" (only M saved, slower lookups), so an export is never less than 10x smaller than full tables because
  of W.
- unique_ids=False: `tf.unique` over a [16384, 26] batch cost more than it saved, even on Zipf ids.
- jit_compile=False: XLA is faster (1.6-1.7x full tables at Z = 16 against ~1.5x without), but TF Serving answers a
  model that uses it only when started with `--xla_cpu_compilation_enabled=true`; a default must serve anywhere.
"""

import warnings

from tfcompress.lookup import TableReader

DEFAULT_CHUNK_READS = "auto"
XLA_SERVING_FLAG = "--xla_cpu_compilation_enabled=true"


def serving_layout(chunk_reads=DEFAULT_CHUNK_READS, unique_ids=False, jit_compile=False, onnx=False):
    """The checked layout options as the `TableReader` keyword arguments (also what the metadata records).

    Raises:
        ValueError: an unknown chunk_reads (one of `tfcompress.lookup.CHUNK_READS`), or jit_compile with onnx
            (tf2onnx cannot convert the XLA-compiled function's variable reads; ONNX runtimes do not use XLA
            anyway: export the ONNX model without it).
        TypeError: unique_ids or jit_compile not a bool.
    """
    if jit_compile is True and onnx:
        raise ValueError("jit_compile=True cannot be combined with onnx=True: tf2onnx cannot convert the "
                         "XLA-compiled ROBE lookup; export the ONNX model from an export without jit_compile")
    layout = {"chunk_reads": chunk_reads, "unique_ids": unique_ids, "jit_compile": jit_compile}
    TableReader(**layout)  # its checks, made here before the export does any work
    return layout


def window_matrix_paths(reader, paths):
    """{id(W): saved name} for the window matrices `reader` made: the Keras path of the table W was made from plus
    "/windows<Z>", then "/int8" or "/fp16" when it was made from such a copy (as the copies are named), so the size
    table lists them as embedding bytes."""
    named = {}
    for (source, chunk_size), matrix in reader.window_matrices.items():
        base = paths.get(source, matrix.name.split(":")[0].rsplit("/windows", 1)[0])
        stem, _, suffix = base.rpartition("/")
        if stem and suffix in ("int8", "fp16"):
            named[id(matrix)] = f"{stem}/windows{chunk_size}/{suffix}"
        else:
            named[id(matrix)] = f"{base}/windows{chunk_size}"
    return named


def warn_if_windows_are_large(sizes, stacklevel=3):
    """Warn when the window matrices hold more than half the bytes of the full float32 tables they replace.

    W has Z times the floats of M, so it is Z / compression of the full tables: at 1000x with Z = 16 it is 1.6%,
    but at compression <= 2Z it is half their size or more, and then `chunk_reads="elements"` or `"per_call"`
    (which save only M) keep the export small. A warning, not a switch: the export stays what was asked for.
    `stacklevel` as for `warnings.warn`, counted from this function (3: the caller of the function calling it).
    """
    window_bytes, full_bytes = sizes.get("window_matrix_bytes", 0), sizes["uncompressed_bytes"]
    if window_bytes and window_bytes * 2 > full_bytes:
        warnings.warn(f"the ROBE window matrices take {window_bytes:,} bytes, more than half of the full tables' "
                      f"{full_bytes:,}: export with chunk_reads='elements' or 'per_call' to save only the array M",
                      RuntimeWarning, stacklevel=stacklevel)
