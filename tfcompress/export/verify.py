"""Prove an export serves without tfcompress: run the checks in a fresh Python process that never imports it.

    from tfcompress.export.verify import verify

    result = verify("saved_models/criteo_robe/1")
    assert result.ok, result.output

or `tfcompress verify saved_models/criteo_robe/1`. The checks (stock ops only, fresh-process load, parity with the
Keras model, tf.Example and PredictRequest paths, out-of-range ids, ONNX, size table) live in
`verify_standalone.py` next to this file, which is run as a script file (`python .../verify_standalone.py PATH`),
so neither the package's `__init__` nor the custom-op library is ever loaded there; the script itself checks that.
This module imports neither TensorFlow nor the rest of tfcompress.
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STANDALONE_SCRIPT = Path(__file__).resolve().with_name("verify_standalone.py")
DEFAULT_TIMEOUT_S = 900


@dataclasses.dataclass
class VerifyResult:
    """What the checker process found.

    Attributes:
        ok: every check of every path passed or was skipped (none failed) and the process exited 0.
        reports: one dict per path: {"path", "ok", "checks": {name: {"status", "message"}}, "ops", "sizes", ...}.
        output: the checker's printed report (stdout and stderr).
        returncode: the checker's exit status.
    """

    ok: bool
    reports: list
    output: str
    returncode: int

    def report(self, path=None):
        """The report of `path` (the only one when None)."""
        if path is None:
            if len(self.reports) != 1:
                raise ValueError(f"{len(self.reports)} reports; name the path")
            return self.reports[0]
        wanted = os.path.abspath(path)
        for report in self.reports:
            if os.path.abspath(report["path"]) == wanted:
                return report
        raise KeyError(f"no report for {path}")

    def status(self, check, path=None):
        """"PASS", "FAIL" or "SKIP" of one check (None when it did not run)."""
        return self.report(path)["checks"].get(check, {}).get("status")


def verify(paths, require_serving_api=False, require_onnx=False, python=None, timeout=DEFAULT_TIMEOUT_S,
           echo=False):
    """Check one or more exported SavedModel directories in a fresh process (one TensorFlow import for all).

    Args:
        paths: a version directory (saved_models/NAME/VERSION) or a list of them.
        require_serving_api: fail, rather than skip, the PredictRequest check when tensorflow-serving-api is
            not installed.
        require_onnx: fail, rather than skip, the ONNX check of an ONNX export when onnxruntime is missing.
        python: the interpreter to run (default: this one).
        timeout: seconds before the checker is stopped.
        echo: also print the checker's report as it comes.

    Returns:
        VerifyResult.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("give at least one SavedModel directory to verify")
    for path in paths:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no SavedModel directory at {path}")
    with tempfile.TemporaryDirectory(prefix="tfcompress-verify-") as tmp:
        report_path = os.path.join(tmp, "report.json")
        command = [python or sys.executable, str(STANDALONE_SCRIPT), *[os.path.abspath(p) for p in paths], "--json", report_path]
        if require_serving_api:
            command.append("--require-serving-api")
        if require_onnx:
            command.append("--require-onnx")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   timeout=timeout, env=env, cwd=tmp)
        if echo:
            print(completed.stdout, end="")
        reports = []
        if os.path.exists(report_path):
            with open(report_path) as f:
                reports = json.load(f)
    ok = completed.returncode == 0 and bool(reports) and all(report["ok"] for report in reports)
    return VerifyResult(ok=ok, reports=reports, output=completed.stdout, returncode=completed.returncode)
