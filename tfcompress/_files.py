"""Atomic file writes: a reader, or a run resumed after a kill, sees the old file or the new one, never half."""

import json
import os


def write_atomically(path, data):
    """Write `data` (str or bytes) to a temporary file beside `path`, then rename it over `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json_atomically(path, value, **dump_options):
    """`json.dumps(value, **dump_options)` written with `write_atomically`."""
    write_atomically(path, json.dumps(value, **dump_options))
