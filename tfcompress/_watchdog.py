"""The cluster watchdog process of multi-worker training (tfcompress.multiworker.ClusterWatchdog): standard
library only, so that the process starts in milliseconds and holds no TensorFlow."""

import os
import select
import signal
import socket
import sys
import time


def _answers(address, timeout_s=1.0):
    """Whether something accepts TCP connections at "host:port"."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def failure_message(source, me, peers, what, timeout_s):
    """Why a collective phase did not finish: names the workers of TF_CONFIG that do not answer on their port."""
    silent = [f"{name} at {address}" for name, address in peers if not _answers(address)]
    if silent:
        cause = ("no answer from " + ", ".join(silent) + ": the worker is not running (crashed, killed, not yet "
                 "started) or TF_CONFIG names a wrong or unreachable address")
    else:
        cause = ("every worker of TF_CONFIG answers on its port, but the collective does not complete: a worker "
                 "may have crashed and been restarted alone (restart the whole job; it resumes from its "
                 "checkpoints), or the workers run different pipelines or steps")
    return (f"{source}: multi-worker training failed on {me}: {what} did not finish within [train] "
            f"cluster_timeout_s = {timeout_s:g} s; {cause}")


def watch(parent_pid, timeout_s, source, me, peers):
    """The watchdog process: reads "arm <what>" / "disarm" lines; kills `parent_pid` when an armed phase
    outlasts `timeout_s` (after printing `failure_message`), exits when the parent closes the pipe."""
    what, deadline, buffer = None, None, b""
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([sys.stdin.buffer], [], [], wait)
        if not ready:
            print(failure_message(source, me, peers, what, timeout_s), file=sys.stderr, flush=True)
            os.kill(parent_pid, signal.SIGKILL)
            return
        chunk = os.read(sys.stdin.fileno(), 65536)
        if not chunk:
            return  # the parent ended (or stopped the watchdog)
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            command, _, argument = line.decode().partition(" ")
            if command == "arm":
                what, deadline = argument, time.monotonic() + timeout_s
            else:
                what, deadline = None, None
