"""Pipeline TOML validation and overrides, the training loop's pieces, and the `tfcompress` CLI end to end."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tfcompress import train as train_module
from tfcompress.pipeline import load_pipeline, parse_override, pipeline_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_PIPELINE = """
name = "{name}"

[data]
source = "synthetic"
dataset = "{dataset}"
rows = 6000
eval_rows = 3000
seed = 1
cardinality_scale = 0.001
path = "{data_path}"

[model]
arch = "{arch}"
embedding_dim = 8
bottom_mlp = [16]
top_mlp = [16]
cross_layers = 1
deep_layers = [16]

[compression]
method = "{method}"
{compression}

[train]
optimizer = "adam"
learning_rate = 0.01
batch_size = 256
epochs = 2
eval_batch_size = 1024
seed = 0
"""


def write_pipeline(directory, name, method="robe", compression="ratio = 10.0\nchunk_size = 4", arch="dlrm",
                   data_path=None, dataset="criteo"):
    path = os.path.join(directory, f"{name}.toml")
    data_path = data_path or os.path.join(directory, "data")
    with open(path, "w") as f:
        f.write(TINY_PIPELINE.format(name=name, method=method, compression=compression, arch=arch,
                                     data_path=data_path, dataset=dataset))
    return path


def run_cli(*args, cwd=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "tfcompress.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=600)


# ---- pipeline validation -----------------------------------------------------------------------------------------


def test_shipped_pipelines_validate():
    paths = sorted(glob.glob(os.path.join(ROOT, "pipelines", "*.toml")))
    names = {os.path.basename(p) for p in paths}
    assert {"synthetic_dlrm_robe.toml", "synthetic_dlrm_full.toml", "synthetic_dcn_robe.toml"} <= names
    for path in paths:
        pipeline = load_pipeline(path)
        assert pipeline.name == os.path.splitext(os.path.basename(path))[0]
    robe = load_pipeline(os.path.join(ROOT, "pipelines", "synthetic_dlrm_robe.toml"))
    full = load_pipeline(os.path.join(ROOT, "pipelines", "synthetic_dlrm_full.toml"))
    # The demo compares the two on the same data, model and training: only the compression differs.
    assert robe.data == full.data and robe.model == full.model and robe.train == full.train
    assert (robe.compression.method, robe.compression.ratio, full.compression.method) == ("robe", 1000.0, "full")
    assert robe.data.rows >= 1_000_000 and robe.data.cardinality_scale == 1.0 and robe.model.embedding_dim == 16


def test_defaults_and_types(tmp_path):
    pipeline = load_pipeline(write_pipeline(str(tmp_path), "tiny"))
    assert pipeline.name == "tiny" and pipeline.source.endswith("tiny.toml")
    assert pipeline.model.bottom_mlp == (16,) and pipeline.train.epochs == 2
    assert pipeline.compression.ratio == 10.0 and isinstance(pipeline.compression.ratio, float)
    assert pipeline.compression.options == {"chunk_size": 4}
    assert pipeline.compression.plan_kwargs() == {
        "method": "robe", "ratio": 10.0, "budget": None, "uncompressed_below": 0, "chunk_size": 4}
    empty = pipeline_from_dict({"compression": {"method": "full"}}, default_name="x")
    assert (empty.data.source, empty.model.arch, empty.train.optimizer) == ("synthetic", "dlrm", "sgd")
    assert empty.compression.plan_kwargs() == {"method": "full", "uncompressed_below": 0}


@pytest.mark.parametrize(
    "section, body, fragment",
    [
        ("model", "arch = \"dlrm\"\nbotom_mlp = [8]", "[model] unknown key 'botom_mlp'"),
        ("train", "batch_size = \"big\"", "[train] batch_size: expected an integer"),
        ("train", "epochs = 1.5", "[train] epochs: expected an integer"),
        ("train", "batch_size = 0", "[train] batch_size: must be >= 1"),
        ("train", "optimizer = \"rmsprop\"", "[train] optimizer: must be one of"),
        ("train", "save_model = 1", "[train] save_model: expected true or false"),
        ("model", "top_mlp = [64, -1]", "[model] top_mlp: expected a list of positive integers"),
        ("model", "arch = \"wide_deep\"", "[model] arch: must be one of"),
        ("data", "rows = true", "[data] rows: expected an integer"),
        ("data", "source = \"tfrecord\"", "[data] train: required"),
        ("data", "train = \"x/*.tfrecord\"", "[data] train: only used when source"),
        ("compression", "method = \"robe\"", "[compression] method 'robe' needs exactly one of ratio or budget"),
        ("compression", "method = \"rob\"\nratio = 10.0", "[compression] method: must be one of"),
        ("compression", "method = \"robe\"\nratio = 0.5", "[compression] ratio: must be >= 1"),
        ("compression", "method = \"robe\"\nratio = \"big\"", "[compression] ratio: expected a number"),
        ("optimizer", "name = \"sgd\"", "unknown top-level key or section 'optimizer'"),
        ("train", "learning_rate = inf", "[train] learning_rate: must be a finite number > 0, got inf"),
        ("train", "learning_rate = nan", "[train] learning_rate: must be a finite number > 0, got nan"),
        ("train", "restore_best = 1", "[train] restore_best: expected true or false"),
        ("train", "patience = 0", "[train] patience: must be >= 1"),
        # Method options are checked against the method's layer when the file is loaded, before any data step.
        ("compression", "method = \"robe\"\nratio = 10.0\nchunksize = 4",
         "[compression] chunksize: method 'robe' has no option 'chunksize' (did you mean 'chunk_size'?)"),
        ("compression", "method = \"full\"\nchunk_size = 4", "[compression] chunk_size: method 'full' has no option"),
        ("compression", "method = \"robe\"\nratio = 10.0\nmemory_size = 100",
         "[compression] memory_size: method 'robe' takes its size from ratio or budget"),
        ("compression", "method = \"hashing\"\nratio = 10.0\nnum_buckets = 100",
         "[compression] num_buckets: method 'hashing' takes its size from ratio or budget"),
        ("compression", "method = \"mlet\"\nratio = 10.0", "[compression] inner_dim: method 'mlet' needs the option"),
        ("compression", "method = \"learned_hash\"", "[compression] method 'learned_hash' needs the option mappings"),
    ],
)
def test_validation_errors_name_file_section_and_key(tmp_path, section, body, fragment):
    path = tmp_path / "bad.toml"
    base = "" if section == "compression" else "[compression]\nmethod = \"full\"\n"
    path.write_text(base + f"[{section}]\n{body}\n")
    with pytest.raises(ValueError) as error:
        load_pipeline(str(path))
    assert str(path) in str(error.value) and fragment in str(error.value), str(error.value)


def test_invalid_toml_and_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nepochs = 1\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_pipeline(str(path))
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_pipeline(str(tmp_path / "nope.toml"))


def test_parse_override_reads_toml_values_or_plain_strings():
    assert parse_override("train.learning_rate=0.05") == ("train", "learning_rate", 0.05)
    assert parse_override("train.epochs=3") == ("train", "epochs", 3)
    assert parse_override("model.top_mlp=[64, 32]") == ("model", "top_mlp", [64, 32])
    assert parse_override("train.save_model=false") == ("train", "save_model", False)
    assert parse_override("compression.method=full") == ("compression", "method", "full")
    assert parse_override("compression.budget=100MB") == ("compression", "budget", "100MB")
    assert parse_override("data.path=\"a b\"") == ("data", "path", "a b")
    assert parse_override("name=other") == (None, "name", "other")
    for bad in ("train.epochs", "epochs=3", "a.b.c=1", ".x=1"):
        with pytest.raises(ValueError, match="section.key=value"):
            parse_override(bad)


def test_overrides_apply_before_validation(tmp_path):
    path = write_pipeline(str(tmp_path), "tiny")
    pipeline = load_pipeline(path, ["train.epochs=5", "model.top_mlp=[4, 2]", "compression.chunk_size=2",
                                    "name=renamed"])
    assert (pipeline.train.epochs, pipeline.model.top_mlp, pipeline.name) == (5, (4, 2), "renamed")
    assert pipeline.compression.options == {"chunk_size": 2}
    # A budget replaces the file's ratio instead of clashing with it.
    budget = load_pipeline(path, ["compression.budget=1MB"]).compression
    assert (budget.ratio, budget.budget) == (None, "1MB")
    with pytest.raises(ValueError, match=r"\[train\] epochs: expected an integer"):
        load_pipeline(path, ["train.epochs=many"])
    with pytest.raises(ValueError, match=r"unknown section \[trian\]"):
        load_pipeline(path, ["trian.epochs=1"])
    with pytest.raises(ValueError, match=r"\[model\] unknown key 'widths'"):
        load_pipeline(path, ["model.widths=[1]"])


# ---- training pieces ---------------------------------------------------------------------------------------------


def test_throughput_callback_skips_the_first_batch_of_each_epoch(monkeypatch):
    clock = iter([0.0, 10.0, 10.5, 11.0, 100.0, 200.0, 201.0])  # batch ends; 10 s and 100 s are start-up costs
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: next(clock))
    callback = train_module.ThroughputCallback(batch_size=100)
    callback.on_epoch_begin(0)
    for batch in range(4):  # ends at 0, 10, 10.5, 11: three counted intervals, 11 s
        callback.on_train_batch_end(batch)
    callback.on_epoch_begin(1)
    for batch in range(3):  # ends at 100, 200, 201: two counted intervals, 101 s
        callback.on_train_batch_end(batch)
    assert callback.samples == 500
    assert callback.samples_per_s == pytest.approx(500 / 112.0)


def test_format_results_table_hand_made_rows():
    results = [
        {"name": "full", "method": "full", "logical_bytes": 2_160_000_000, "physical_bytes": 2_160_000_000,
         "deployed_bytes": 2_160_000_000, "ratio": 1.0, "auc": 0.78123, "log_loss": 0.45678, "ceiling_auc": 0.8,
         "train_samples_per_s": 51234.6, "best_epoch": 2, "epochs_run": 3, "best_val_auc": 0.78456,
         "last_val_auc": 0.7801, "restored_best": True},
        {"name": "robe", "method": "robe", "logical_bytes": 2_160_000_000, "physical_bytes": 2_160_000,
         "deployed_bytes": 2_160_000, "ratio": 1000.0, "auc": 0.775, "log_loss": 0.46, "ceiling_auc": None,
         "train_samples_per_s": None, "best_epoch": 1, "epochs_run": 1, "best_val_auc": 0.7749,
         "last_val_auc": 0.7749, "restored_best": False},
        # MLET trains n*k + k*d floats per table and deploys the folded n*d: the ratio is logical / deployed.
        {"name": "mlet", "method": "mlet", "logical_bytes": 2_160_000_000, "physical_bytes": 8_640_000,
         "deployed_bytes": 2_160_000, "ratio": 250.0, "auc": 0.776, "log_loss": 0.459, "ceiling_auc": None,
         "train_samples_per_s": 1000.0},  # a result of an older version: no best-epoch fields
    ]
    lines = train_module.format_results_table(results).splitlines()
    assert len(lines) == 5
    assert [c.strip() for c in lines[0].split("  ") if c.strip()] == [
        "pipeline", "method", "logical", "trained", "deployed", "ratio", "AUC", "log loss", "ceiling AUC",
        "epoch best/last", "val AUC best/last", "weights", "samples/s"]
    assert lines[2].split() == ["full", "full", "2.16", "GB", "2.16", "GB", "2.16", "GB", "1.0x", "0.7812", "0.4568",
                                "0.8000", "2/3", "0.7846/0.7801", "best", "51,235"]
    assert lines[3].split() == ["robe", "robe", "2.16", "GB", "2.16", "MB", "2.16", "MB", "1,000.0x", "0.7750",
                                "0.4600", "-", "1/1", "0.7749/0.7749", "last", "-"]
    assert lines[4].split() == ["mlet", "mlet", "2.16", "GB", "8.64", "MB", "2.16", "MB", "1,000.0x", "0.7760",
                                "0.4590", "-", "-", "-", "last", "1,000"]


# ---- the CLI -----------------------------------------------------------------------------------------------------


def test_help_lists_subcommands():
    completed = run_cli("--help")
    assert completed.returncode == 0, completed.stderr
    for command in ("train", "generate", "plan"):
        assert command in completed.stdout


def test_bad_input_is_a_friendly_error(tmp_path, capsys):
    from tfcompress.cli import main

    path = write_pipeline(str(tmp_path), "tiny")
    assert main(["train", "--pipeline", path, "--set", "train.batch_size=-3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "[train] batch_size" in err and "Traceback" not in err
    assert main(["train", "--pipeline", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err
    assert main(["plan", "--cardinalities", "1000,x", "--dim", "8", "--method", "robe", "--ratio", "10"]) == 2
    assert capsys.readouterr().err.startswith("error: --cardinalities")
    assert main(["plan", "--cardinalities", "1000", "--dim", "8", "--method", "robe", "--ratio", "0.5"]) == 2
    assert "ratio" in capsys.readouterr().err


def test_plan_subcommand_prints_the_summary(capsys):
    from tfcompress.cli import main

    assert main(["plan", "--cardinalities", "1000,50,20000", "--dim", "8", "--method", "robe", "--ratio", "10",
                 "--option", "chunk_size=4"]) == 0
    out = capsys.readouterr().out
    # 21,050 rows x 8 = 168,400 logical parameters; 10x smaller = 16,840 floats.
    assert "168,400" in out and "16,840" in out
    assert main(["plan", "--dataset", "criteo", "--scale", "0.01", "--dim", "16", "--method", "full"]) == 0
    out = capsys.readouterr().out
    # Criteo Kaggle tables scaled by 0.01 (max(1, round(n * 0.01)) rows each), times 16 floats.
    cards = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992, 5461306,
             10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
    assert f"{sum(max(1, round(n * 0.01)) for n in cards) * 16:,}" in out


def test_generate_subcommand_writes_a_dataset(tmp_path, capsys):
    from tfcompress.cli import main

    out_dir = tmp_path / "gen"
    assert main(["generate", "--dataset", "avazu", "--rows", "3000", "--eval-rows", "1000", "--seed", "2",
                 "--scale", "0.001", "--output", str(out_dir)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["splits"]["train"]["rows"] == 3000 and stats["splits"]["eval"]["rows"] == 1000
    assert (out_dir / "schema.json").is_file() and list((out_dir / "train").glob("*.tfrecord"))


def test_train_two_pipelines_end_to_end_prints_one_table(tmp_path):
    full = write_pipeline(str(tmp_path), "tiny_full", method="full", compression="")
    robe = write_pipeline(str(tmp_path), "tiny_robe")
    runs = str(tmp_path / "runs")
    completed = run_cli("train", "--pipeline", full, "--pipeline", robe, "--runs-dir", runs, "--verbose", "2")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = completed.stdout
    assert "val_auc" in out and "val_log_loss" in out  # per-epoch metrics from Keras
    table = out[out.rindex("pipeline"):].splitlines()
    assert "ceiling AUC" in table[0] and "samples/s" in table[0]
    assert table[2].split()[:2] == ["tiny_full", "full"] and table[3].split()[:2] == ["tiny_robe", "robe"]

    results = {}
    for name in ("tiny_full", "tiny_robe"):
        with open(os.path.join(runs, name, "results.json")) as f:
            results[name] = json.load(f)["result"]
        assert os.path.isfile(os.path.join(runs, name, "model.keras"))
    full_result, robe_result = results["tiny_full"], results["tiny_robe"]
    assert full_result["logical_bytes"] == full_result["physical_bytes"] == robe_result["logical_bytes"]
    assert robe_result["ratio"] == pytest.approx(10.0, rel=0.01)
    assert full_result["ceiling_auc"] == robe_result["ceiling_auc"] > 0.6
    for result in results.values():
        # Both learned something, and no model beats the planted model that generated the labels by more than noise.
        assert 0.55 < result["auc"] < result["ceiling_auc"] + 0.02, result
        assert result["train_samples_per_s"] > 0 and result["epochs"] == 2
    # The printed table shows the exact AUCs saved in results.json.
    assert f"{full_result['auc']:.4f}" in table[2] and f"{robe_result['auc']:.4f}" in table[3]


@pytest.mark.parametrize("arch, dataset", [("dcn", "criteo"), ("dlrm", "avazu")])  # avazu: no dense features
def test_trained_model_reloads_with_same_metrics(tmp_path, arch, dataset):
    from tfcompress._keras import keras
    from tfcompress.data import read

    path = write_pipeline(str(tmp_path), f"tiny_{arch}", arch=arch, dataset=dataset)
    pipeline = load_pipeline(path, ["train.epochs=1"])
    result = train_module.train(pipeline, runs_dir=str(tmp_path / "runs"), verbose=0)
    model = keras.models.load_model(result["model_path"])
    eval_split = read(os.path.join(pipeline.data.path, "eval"), 1024, shuffle=False, repeat=False, deterministic=True)
    auc, loss = train_module.exact_metrics(model, eval_split)
    assert (auc, loss) == (pytest.approx(result["auc"], abs=1e-6), pytest.approx(result["log_loss"], abs=1e-6))
    assert 0.55 < result["auc"] < result["ceiling_auc"] + 0.02


def test_tensorboard_log_has_metrics_sizes_and_throughput(tmp_path):
    import glob

    import tensorflow as tf

    path = write_pipeline(str(tmp_path), "tiny_tb")
    pipeline = load_pipeline(path, ["train.epochs=2", "train.save_model=false"])
    result = train_module.train(pipeline, runs_dir=str(tmp_path / "runs"), verbose=0)
    scalars = {}
    for event_file in glob.glob(str(tmp_path / "runs" / "tiny_tb" / "tensorboard" / "train" / "*")):
        for event in tf.compat.v1.train.summary_iterator(event_file):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    for tag in ("epoch_loss", "epoch_auc", "epoch_log_loss", "samples_per_s"):
        assert len(scalars[tag]) == 2, tag
    assert scalars["embedding_physical_bytes"][-1] == result["physical_bytes"]
    assert scalars["embedding_logical_bytes"][-1] == result["logical_bytes"]
    assert scalars["compression_ratio"][-1] == pytest.approx(result["logical_bytes"] / result["physical_bytes"])


def test_make_optimizer_keeps_adagrad_sparse():
    from tfcompress.optimizers import SparseAdagrad
    from tfcompress.pipeline import TrainConfig

    optimizer = train_module.make_optimizer(TrainConfig(optimizer="adagrad", learning_rate=0.25))
    assert isinstance(optimizer, SparseAdagrad)
    assert float(optimizer.learning_rate) == pytest.approx(0.25)
    assert type(train_module.make_optimizer(TrainConfig(optimizer="sgd"))).__name__ == "SGD"
