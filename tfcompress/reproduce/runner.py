"""Run the reproduce experiments in order, resuming finished ones, and write REPORT.md."""

import importlib
import json
import os
import time

from tfcompress._files import write_json_atomically
from tfcompress.reproduce import EXPERIMENTS
from tfcompress.reproduce.context import Context
from tfcompress.reproduce.profiles import get_profile
from tfcompress.reproduce.report import write_report



def experiment_module(name):
    return importlib.import_module(f"tfcompress.reproduce.{name}")


def run_key(context):
    """What a saved result must match to be reused: same profile, seed and data."""
    return {"profile": context.profile.name, "seed": context.seed, "data": context.data_dir}


def run_experiment(context, name):
    """(results, seconds it took, reused): loaded from results/<name>.json when this run already finished it."""
    path = os.path.join(context.out_dir, "results", f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["key"] == run_key(context):
            return saved["results"], saved["seconds"], True
    started = time.perf_counter()
    results = experiment_module(name).run(context)
    seconds = time.perf_counter() - started
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomically(path, {"key": run_key(context), "seconds": seconds, "results": results}, indent=1)
    return results, seconds, False


def run_reproduce(out_dir="reproduce", profile="full", seed=0, data_dir=None, only=None, command=None,
                  verbose=0):
    """Run the experiments (all, or those named in `only`) and write <out_dir>/REPORT.md.

    Args:
        out_dir: where data, runs, results/*.json, figures/*.png and REPORT.md go; rerunning the same command
            resumes there.
        profile: "full" (<= 60 minutes on 2 cores) or "tiny" (the smoke test).
        seed: seeds the synthetic data and every training run.
        data_dir: converted TFRecords (`tfcompress data convert` output: schema.json, train/, eval/) to use
            instead of synthetic data.
        only: experiment names to run (default: all of EXPERIMENTS).
        command: the command line stamped on the report and every figure.

    Returns:
        The path of REPORT.md.
    """
    names = list(only or EXPERIMENTS)
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; known: {', '.join(EXPERIMENTS)}")
    if data_dir is not None and not os.path.exists(os.path.join(data_dir, "schema.json")):
        raise ValueError(f"--data {data_dir}: no schema.json there (expected `tfcompress data convert` output)")
    command = command or f"tfcompress reproduce --profile {profile} --seed {seed} --out {out_dir}"
    context = Context(out_dir=out_dir, profile=get_profile(profile), seed=seed, command=command,
                      data_dir=data_dir, verbose=verbose)
    os.makedirs(out_dir, exist_ok=True)
    sections, seconds_by_experiment = [], {}
    for name in names:
        print(f"reproduce: {name} ...", flush=True)
        results, seconds_by_experiment[name], reused = run_experiment(context, name)
        sections.append(experiment_module(name).report(results, context))
        how = f"reused results/{name}.json (it took" if reused else "done (in"
        print(f"reproduce: {name} {how} {seconds_by_experiment[name] / 60:.1f} min)", flush=True)
    path = write_report(context, sections, seconds_by_experiment)
    print(f"reproduce: wrote {path}", flush=True)
    return path
