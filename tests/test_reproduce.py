"""`tfcompress reproduce --profile tiny` end to end: every experiment, REPORT.md, stamped PNGs, and resume."""

import json
import os
import re

import pytest

from tfcompress import cli
from tfcompress.reproduce import robe_ratios, runner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reproduce") / "out")
    argv = ["reproduce", "--profile", "tiny", "--seed", "3", "--out", out]
    assert cli.main(argv) == 0
    return out, "tfcompress " + " ".join(argv)


def test_report_has_a_section_per_experiment(tiny_run):
    out, command = tiny_run
    with open(os.path.join(out, "REPORT.md")) as f:
        report = f.read()
    assert f"Command: `{command}`" in report
    for name in runner.EXPERIMENTS:
        module = runner.experiment_module(name)
        assert f"## {module.TITLE}" in report, name
        with open(os.path.join(out, "results", f"{name}.json")) as f:
            saved = json.load(f)
        assert saved["key"] == {"profile": "tiny", "seed": 3, "data": None}
    # Finite numbers in the tables: no experiment wrote NaN.
    assert "nan" not in report.lower()


def test_every_figure_is_a_png_named_with_command_and_seed(tiny_run):
    out, command = tiny_run
    with open(os.path.join(out, "REPORT.md")) as f:
        report = f.read()
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", report)
    assert len(figures) >= len(runner.EXPERIMENTS)
    for figure in figures:
        with open(os.path.join(out, figure), "rb") as f:
            assert f.read(8) == PNG_MAGIC, figure
    # Each figure's caption names the command and the seed (the PNG itself carries the same stamp).
    captions = re.findall(r"Produced by `([^`]+)` with seed (\d+)", report)
    assert len(captions) == len(figures)
    assert all(c == (command, "3") for c in captions)


def test_rerun_resumes_without_training(tiny_run, monkeypatch):
    out, _ = tiny_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished reproduce run trained again")

    monkeypatch.setattr("tfcompress.train.train", no_training)
    monkeypatch.setattr("tfcompress.reproduce.runner.experiment_module",
                        lambda name: _ReportOnly(runner.importlib.import_module(f"tfcompress.reproduce.{name}")))
    assert cli.main(["reproduce", "--profile", "tiny", "--seed", "3", "--out", out]) == 0


class _ReportOnly:
    """An experiment module whose run() must not be called (its results are on disk)."""

    def __init__(self, module):
        self.module = module
        self.TITLE = module.TITLE

    def run(self, context):
        raise AssertionError(f"{self.module.NAME} ran again although results/{self.module.NAME}.json exists")

    def report(self, results, context):
        return self.module.report(results, context)


def test_bad_arguments_are_named(tmp_path, capsys):
    assert cli.main(["reproduce", "--profile", "tiny", "--out", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown experiment"):
        runner.run_reproduce(str(tmp_path), profile="tiny", only=["nope"])
    with pytest.raises(ValueError, match="unknown profile"):
        runner.run_reproduce(str(tmp_path), profile="huge")


def test_epochs_to_reach_counts_evaluations_per_pass():
    curve = [0.60, 0.65, 0.70, 0.72]
    assert robe_ratios.epochs_to_reach(curve, 0.70, per_pass=2) == 1.5
    assert robe_ratios.epochs_to_reach(curve, 0.60, per_pass=1) == 1
    assert robe_ratios.epochs_to_reach(curve, 0.80, per_pass=2) is None
