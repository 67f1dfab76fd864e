"""Pool tasks for tests/test_convert_safety.py that spawn workers can import (a test module would pull in
pytest fixtures and TensorFlow in every worker)."""

import os
import signal


def die_on_piece_1(piece):
    """A worker that the out-of-memory killer takes while it converts piece 1 (SIGKILL: no cleanup, no exception)."""
    if piece["index"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"index": piece["index"]}
