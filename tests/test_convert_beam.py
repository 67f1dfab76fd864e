"""`tfcompress data convert --runner beam`: the Beam pipeline (DirectRunner) gives the local converter's output.

Run with `make test-beam` (a separate venv with the `beam` extra: apache-beam 2.77 pins protobuf < 7); the `beam`
marker keeps these tests out of `make test`. Expected values are the local converter's output on the same input,
which tests/test_convert.py checks against plain Python references.
"""

import glob
import gzip
import json
import os
import textwrap
from collections import Counter

import numpy as np
import pytest

from test_convert import criteo_rows, criteo_text, read_all

from tfcompress import cli
from tfcompress.data.convert import ConvertError, convert

pytestmark = pytest.mark.beam

DIRECT = ["--runner=DirectRunner"]
REPORT_COUNTS = ("rows_read", "rows_written", "rows_rejected", "rejected_by_reason", "rows_per_split", "files",
                 "pieces", "errors")


def convert_beam(*args, **kwargs):
    from tfcompress.data.convert_beam import convert_beam as run  # needs apache_beam: only in the beam venv

    return run(*args, beam_options=kwargs.pop("beam_options", DIRECT), **kwargs)


def row_multiset(split_dir):
    label, dense, sparse = read_all(split_dir)
    return Counter((int(y), d.tobytes(), s.tobytes()) for y, d, s in zip(label, dense, sparse))


def file_bytes(output):
    """{relative path: bytes} of every shard, counts file, vocabulary and the quarantine."""
    found = {}
    for pattern in ("*/part-*.tfrecord", "counts/*.npz", "vocabulary.npz", "quarantine.tsv"):
        for path in glob.glob(os.path.join(output, pattern)):
            with open(path, "rb") as f:
                found[os.path.relpath(path, output)] = f.read()
    return found


def assert_same_conversion(local_out, beam_out, splits):
    with open(os.path.join(local_out, "report.json")) as f:
        local_report = json.load(f)
    with open(os.path.join(beam_out, "report.json")) as f:
        beam_report = json.load(f)
    assert beam_report["runner"] == "beam"
    assert {k: beam_report[k] for k in REPORT_COUNTS} == {k: local_report[k] for k in REPORT_COUNTS}
    for split in splits:
        assert row_multiset(os.path.join(beam_out, split)) == row_multiset(os.path.join(local_out, split))
    # Stronger than the issue asks: the same pieces give the same shard bytes, quarantine and vocabulary.
    local_files, beam_files = file_bytes(local_out), file_bytes(beam_out)
    assert sorted(beam_files) == sorted(local_files)
    for name in local_files:
        assert beam_files[name] == local_files[name], name
    with open(os.path.join(local_out, "schema.json")) as f, open(os.path.join(beam_out, "schema.json")) as g:
        assert json.load(f) == json.load(g)
    return beam_report


def malformed_criteo_lines(rng, n):
    lines = criteo_text(criteo_rows(rng, n)).splitlines()
    lines[3] = ""  # empty_line
    lines[6] = "1\t2\t3"  # wrong_column_count
    lines[12] = "2" + lines[12][1:]  # bad_label
    lines[18] = "\t".join(lines[18].split("\t")[:3] + ["12x"] + lines[18].split("\t")[4:])  # non_numeric_dense
    lines[21] = "\t".join(lines[21].split("\t")[:20] + ["zz00ff00"] + lines[21].split("\t")[21:])  # bad_hex
    return lines


def test_criteo_tsv_vocabulary_days_and_malformed_rows_match_the_local_converter(tmp_path):
    rng = np.random.default_rng(18)
    day0 = tmp_path / "day_0"  # plain text: cut into several byte-range pieces
    day0.write_text("\n".join(malformed_criteo_lines(rng, 300)) + "\n")
    with gzip.open(tmp_path / "day_1.gz", "wt") as f:  # gzip: one piece; the held-out day
        f.write("\n".join(malformed_criteo_lines(rng, 120)) + "\n")
    inputs = [day0, tmp_path / "day_1.gz"]
    options = dict(encoding="vocab", min_count=2, max_ind_range=1000, split="criteo-days-halves", test_day=1,
                   shard_bytes=20_000, rows_per_shard=50)
    local_report = convert(inputs, tmp_path / "local", "criteo-tsv", workers=1, **options)
    beam_report = convert_beam(inputs, tmp_path / "beam", "criteo-tsv", **options)
    assert local_report["pieces"] >= 4 and local_report["rows_rejected"] == 10
    assert set(local_report["rows_per_split"]) == {"train", "eval", "test"}
    assert_same_conversion(tmp_path / "local", tmp_path / "beam", ["train", "eval", "test"])
    assert {k: beam_report[k] for k in REPORT_COUNTS} == {k: local_report[k] for k in REPORT_COUNTS}
    with np.load(tmp_path / "beam" / "vocabulary.npz") as vocabulary:
        # C1 draws 5 values; the empty one is the missing key 2^64 - 1, a uint64 that crosses Beam as an int64.
        assert vocabulary["keys_C1"].size == 5 and 2**64 - 1 in vocabulary["keys_C1"].tolist()


SHOP_SCHEMA = """
    name = "shop"
    delimiter = ";"
    header = true
    columns = ["ts", "clicked", "price", "user", "item"]
    label = "clicked"
    dense = ["price"]
    sparse = ["user", "item"]
    dense_transform = "none"
"""


def shop_csv(rng, n):
    lines = ["ts;clicked;price;user;item"]
    for i in range(n):
        lines.append(f"{1700000000 + i};{int(rng.integers(0, 2))};{rng.normal(5, 3):.3f};u{int(rng.integers(0, 30))};"
                     f"item-{int(rng.integers(0, 5000))}")
    lines[7] = "1700000007;1;cheap;u1;item-1"  # non_numeric_dense
    lines[20] = "1700000020;yes;1.0;u1;item-1"  # bad_label
    lines[33] = "1700000033;1;1.0"  # wrong_column_count
    return "\n".join(lines) + "\n"


def test_csv_schema_auto_encoding_random_split_matches_the_local_converter(tmp_path):
    schema = tmp_path / "shop.toml"
    schema.write_text(textwrap.dedent(SHOP_SCHEMA))
    rng = np.random.default_rng(19)
    (tmp_path / "a.csv").write_text(shop_csv(rng, 500))
    (tmp_path / "b.csv").write_text(shop_csv(rng, 200))
    inputs = [tmp_path / "a.csv", tmp_path / "b.csv"]
    # auto: "user" (30 keys) gets a vocabulary, "item" (thousands) is hashed.
    options = dict(schema=schema, encoding="auto", vocab_max_keys=100, hash_buckets=1 << 12, split="random",
                   eval_fraction=0.25, seed=7, shard_bytes=4000)
    local_report = convert(inputs, tmp_path / "local", "csv", **options)
    convert_beam(inputs, tmp_path / "beam", "csv", **options)
    assert local_report["rows_rejected"] == 6 and local_report["rows_per_split"]["eval"] > 0
    report = assert_same_conversion(tmp_path / "local", tmp_path / "beam", ["train", "eval"])
    assert [t["encoding"] for t in report["tables"]] == ["vocab", "hash"]


def test_a_truncated_gzip_fails_like_the_local_converter_and_a_rerun_resumes(tmp_path):
    rng = np.random.default_rng(20)
    whole = gzip.compress(criteo_text(criteo_rows(rng, 2000)).encode())
    (tmp_path / "day_0.gz").write_bytes(whole[: len(whole) * 2 // 3])  # breaks off mid-stream
    (tmp_path / "day_1").write_text(criteo_text(criteo_rows(rng, 50)))
    inputs = [tmp_path / "day_0.gz", tmp_path / "day_1"]
    messages = {}
    for name, run in (("local", convert), ("beam", convert_beam)):
        with pytest.raises(ConvertError, match=r"day_0.gz is truncated or unreadable .* rows were kept") as error:
            run(inputs, tmp_path / name, "criteo-tsv", max_ind_range=1000)
        messages[name] = str(error.value)
    assert messages["beam"] == messages["local"]
    for name in ("local", "beam"):
        with open(tmp_path / name / "report.json") as f:
            messages[name] = {k: v for k, v in json.load(f).items() if k in REPORT_COUNTS}
    assert messages["beam"] == messages["local"]

    # A rerun after a lost worker: piece 1's results are gone (as if its worker died before finishing); the
    # rerun converts only that piece, to the same bytes.
    (tmp_path / "day_0.gz").write_bytes(whole)
    for name, run in (("local", convert), ("beam", convert_beam)):
        run(inputs, tmp_path / name, "criteo-tsv", max_ind_range=1000, overwrite=True)
    before = file_bytes(tmp_path / "beam")
    os.remove(tmp_path / "beam" / "_state" / "piece-00001.json")
    os.remove(glob.glob(str(tmp_path / "beam" / "train" / "part-00001-*"))[0])
    report = convert_beam(inputs, tmp_path / "beam", "criteo-tsv", max_ind_range=1000)
    assert report["pieces_skipped"] == 1
    assert file_bytes(tmp_path / "beam") == before
    assert_same_conversion(tmp_path / "local", tmp_path / "beam", ["train"])


def test_strict_and_unsupported_options_fail_with_a_clear_error(tmp_path):
    lines = criteo_text(criteo_rows(np.random.default_rng(21), 10)).splitlines()
    lines[3] = "x" + lines[3][1:]
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConvertError, match=rf"--strict: bad row in {path} line 4 \(bad_label\)"):
        convert_beam([path], tmp_path / "out", "criteo-tsv", strict=True, encoding="vocab")
    with pytest.raises(ConvertError, match="--runner beam does not do split 'by-column'"):
        convert_beam([path], tmp_path / "out2", "criteo-tsv", split="by-column", split_column="I1")


def test_cli_runner_beam(tmp_path, capsys):
    path = tmp_path / "day_0"
    path.write_text(criteo_text(criteo_rows(np.random.default_rng(22), 40)))
    assert cli.main(["data", "convert", "--format", "criteo-tsv", "--input", str(path), "--output",
                     str(tmp_path / "out"), "--runner", "beam", "--beam-option=--runner=DirectRunner",
                     "--max-ind-range", "100", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.split("\ntables")[0])["rows_written"] == 40
    with open(tmp_path / "out" / "report.json") as f:
        assert json.load(f)["beam_options"] == ["--runner=DirectRunner"]


def test_protobuf_tensorflow_and_beam_coexist(tmp_path):
    """One process: Beam writes a TFRecord of tf.train.Examples that TensorFlow reads, and the other way round."""
    import apache_beam as beam
    import google.protobuf
    import tensorflow as tf

    major, minor = (int(part) for part in google.protobuf.__version__.split(".")[:2])
    assert (6, 31) <= (major, minor) < (7, 0), google.protobuf.__version__
    examples = [tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(int64_list=tf.train.Int64List(value=[i, 2 * i]))})).SerializeToString()
        for i in range(5)]
    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(DIRECT)) as pipeline:
        _ = (pipeline | beam.Create(examples)
             | beam.io.WriteToTFRecord(str(tmp_path / "beam"), file_name_suffix=".tfrecord", num_shards=1))
    written = glob.glob(str(tmp_path / "beam*.tfrecord"))
    read_back = sorted(tf.train.Example.FromString(r.numpy()).features.feature["x"].int64_list.value[1]
                       for r in tf.data.TFRecordDataset(written))
    assert read_back == [0, 2, 4, 6, 8]
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
        for record in examples:
            writer.write(record)
    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(DIRECT)) as pipeline:
        _ = (pipeline | beam.io.ReadFromTFRecord(str(tmp_path / "tf.tfrecord"))
             | beam.Map(lambda r: tf.train.Example.FromString(r).features.feature["x"].int64_list.value[0])
             | beam.combiners.ToList()
             | beam.Map(lambda values: (tmp_path / "values.json").write_text(json.dumps(sorted(values)))))
    assert json.loads((tmp_path / "values.json").read_text()) == [0, 1, 2, 3, 4]


def test_a_failing_piece_fails_the_pipeline_naming_it_and_a_rerun_resumes(tmp_path, monkeypatch):
    """Any failure inside a piece (here a RuntimeError, as a crashed library would raise) stops the pipeline with
    a ConvertError that names the piece and its input; the rerun converts what is missing, to the local bytes."""
    from tfcompress.data import convert_beam as beam_module

    path = tmp_path / "day_0"
    path.write_text(criteo_text(criteo_rows(np.random.default_rng(24), 300)))
    options = dict(max_ind_range=1000, shard_bytes=20_000)
    convert([path], tmp_path / "local", "criteo-tsv", **options)
    real = beam_module.convert_piece

    def fail_piece_2(piece):
        if piece["index"] == 2:
            raise RuntimeError("simulated crash")
        return real(piece)

    monkeypatch.setattr(beam_module, "convert_piece", fail_piece_2)  # the DirectRunner runs steps in this process
    with pytest.raises(ConvertError, match=rf"converting piece 2 \(input {path}, bytes \d+-\d+\) failed: "
                                           r"RuntimeError: simulated crash.*rerun the same command to resume"):
        convert_beam([path], tmp_path / "beam", "criteo-tsv", **options)
    monkeypatch.setattr(beam_module, "convert_piece", real)
    report = convert_beam([path], tmp_path / "beam", "criteo-tsv", **options)
    assert report["pieces"] >= 3
    assert_same_conversion(tmp_path / "local", tmp_path / "beam", ["train"])


def test_multi_valued_columns_are_refused_by_name():
    """Multi-valued csv columns (`Layout.multi`) are converted by the local runner only."""
    from types import SimpleNamespace

    from tfcompress.data.convert_beam import _check_supported

    layout = SimpleNamespace(multi=(SimpleNamespace(name="genres"),))
    with pytest.raises(ConvertError, match=r"multi-valued columns yet \(\['genres'\]\)"):
        _check_supported(layout, "none")


def test_workers_in_separate_processes_give_the_same_output(tmp_path):
    """DirectRunner multi_processing: every step is pickled to other processes, as on a cluster (the context, the
    plan's rules and the vocabulary as side inputs, the module-level step functions)."""
    rng = np.random.default_rng(25)
    (tmp_path / "day_0").write_text("\n".join(malformed_criteo_lines(rng, 200)) + "\n")
    (tmp_path / "day_1").write_text("\n".join(malformed_criteo_lines(rng, 100)) + "\n")
    inputs = [tmp_path / "day_0", tmp_path / "day_1"]
    options = dict(encoding="vocab", min_count=2, max_ind_range=1000, split="criteo-days", test_day=1,
                   shard_bytes=20_000)
    convert(inputs, tmp_path / "local", "criteo-tsv", **options)
    convert_beam(inputs, tmp_path / "beam", "criteo-tsv", beam_options=DIRECT + [
        "--direct_num_workers=2", "--direct_running_mode=multi_processing"], **options)
    assert_same_conversion(tmp_path / "local", tmp_path / "beam", ["train", "eval"])
