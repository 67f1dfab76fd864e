"""tensorflow-io detection: do its native ops load next to the installed TensorFlow?

tensorflow-io ships prebuilt kernels (`libtensorflow_io.so`) compiled against one TensorFlow version; on TensorFlow
2.18-2.21 they fail to load with undefined symbols (measured), and a bad native library can also crash the process
that loads it. So the check loads the library in a *subprocess* and reads back one JSON line; the importing process
never touches the library. The result is cached per process. Nothing in the default path needs tensorflow-io: the
converters read Parquet with pyarrow, and `parquet_dataset` is only an extra input path where the ops do load.

Example:
    >>> status = tensorflow_io_status()
    >>> print(status.line())   # e.g. "tensorflow-io is not installed; Parquet is read with pyarrow"
"""

import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import subprocess
import sys

PROBE_TIMEOUT_S = 180

# Runs in a fresh interpreter: load the native op library the way tensorflow_io does, without importing
# tensorflow_io itself (its import loads the library at import time and prints warnings).
_PROBE = r"""
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import importlib.util
spec = importlib.util.find_spec("tensorflow_io")
library = os.path.join(os.path.dirname(spec.origin), "python", "ops", "libtensorflow_io.so")
import tensorflow as tf
result = {"tensorflow": tf.__version__}
try:
    tf.load_op_library(library)
    result["ok"] = True
except Exception as error:
    result["ok"] = False
    result["error"] = f"{type(error).__name__}: {error}"
print("TFIO_PROBE " + json.dumps(result))
"""


@dataclasses.dataclass(frozen=True)
class TensorflowIoStatus:
    """Whether tensorflow-io's native ops load in this environment.

    Attributes:
        installed: the tensorflow-io package is installed.
        available: its native ops load (its Parquet dataset can be used).
        version: tensorflow-io's version (None when not installed).
        tensorflow: the TensorFlow version the probe ran with (None when not probed).
        reason: why it is not available (one line), else "".
    """

    installed: bool
    available: bool
    version: str = None
    tensorflow: str = None
    reason: str = ""

    def line(self):
        """One clear line for logs and the CLI."""
        if not self.installed:
            return "tensorflow-io is not installed; Parquet is read with pyarrow"
        if self.available:
            return (f"tensorflow-io {self.version}: native ops load on TensorFlow {self.tensorflow}; its Parquet "
                    "dataset is available (the converters still use pyarrow)")
        return (f"tensorflow-io {self.version}: native ops do not load on TensorFlow {self.tensorflow or '?'} "
                f"({self.reason}); Parquet is read with pyarrow")


def _first_line(text, limit=200):
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def probe(python=None, timeout=PROBE_TIMEOUT_S, script=_PROBE):
    """Run the load check in a subprocess; returns a TensorflowIoStatus (never raises for a failed load)."""
    if importlib.util.find_spec("tensorflow_io") is None:
        return TensorflowIoStatus(installed=False, available=False, reason="not installed")
    try:
        version = importlib.metadata.version("tensorflow-io")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    try:
        completed = subprocess.run([python or sys.executable, "-c", script], capture_output=True, text=True,
                                   timeout=timeout)
    except subprocess.TimeoutExpired:
        return TensorflowIoStatus(True, False, version, reason=f"the load check timed out after {timeout} s")
    lines = [line for line in completed.stdout.splitlines() if line.startswith("TFIO_PROBE ")]
    if completed.returncode != 0 or not lines:
        how = (f"the load check crashed (signal {-completed.returncode})" if completed.returncode < 0
               else f"the load check failed (exit {completed.returncode})")
        detail = _first_line(completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else "")
        return TensorflowIoStatus(True, False, version, reason=f"{how}{': ' + detail if detail else ''}")
    result = json.loads(lines[-1][len("TFIO_PROBE "):])
    return TensorflowIoStatus(True, bool(result["ok"]), version, result.get("tensorflow"),
                              reason="" if result["ok"] else _first_line(_short_error(result.get("error", ""))))


def _short_error(error):
    """The informative part of a failed dlopen: 'undefined symbol: X' rather than the whole path list."""
    marker = "undefined symbol"
    if marker in error:
        return error[error.index(marker):].split("'")[0].split("]")[0].strip()
    return error


@functools.lru_cache(maxsize=1)
def tensorflow_io_status():
    """`probe()` once per process (it starts a Python with TensorFlow: seconds)."""
    return probe()


def parquet_dataset(path, columns=None):
    """tensorflow-io's Parquet dataset (`tfio.IODataset.from_parquet`) where its native ops load.

    Args:
        path: a Parquet file.
        columns: column names to read (None: all).

    Raises:
        RuntimeError: tensorflow-io is missing or its ops do not load (the message is `status.line()`); convert
            the Parquet files with `tfcompress data convert --format parquet` (pyarrow) instead.
    """
    status = tensorflow_io_status()
    if not status.available:
        raise RuntimeError(status.line() + "; convert with `tfcompress data convert --format parquet` instead")
    import tensorflow_io as tfio  # optional package, imported only once the probe says its ops load

    return tfio.IODataset.from_parquet(path, columns=columns)
