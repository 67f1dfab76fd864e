"""Raw click logs -> TFRecords (tfcompress.data.convert / formats / encoding / tfio) -> tfcompress.data.read.

Expected values are computed from the Python values the raw files were written from (plain-Python hashes, int(x, 16),
math.log1p, datetime), never from the converter's own code.
"""

import datetime
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

from tfcompress import cli
from tfcompress.data import convert_plan
from tfcompress.data import encoding as enc
from tfcompress.data import formats, tfio
from tfcompress.data.convert import ConvertError, convert, load_counts
from tfcompress.data import read
from tfcompress.data.schema import Schema

MASK64 = 2**64 - 1
MISSING = MASK64


# ---- plain-Python references ---------------------------------------------------------------------------------


def py_splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def py_fnv1a64(data):
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return h


def py_string_key(token):
    token = token.encode() if isinstance(token, str) else token
    return MISSING if not token else min(py_splitmix64(py_fnv1a64(token)), MASK64 - 1)


def py_hash_id(key, buckets):
    return py_splitmix64(key) % buckets


def py_in_eval(seed, file_name, line, fraction):
    mix = py_splitmix64(seed) ^ py_string_key(os.path.basename(file_name))
    return (py_splitmix64((mix + line) & MASK64) >> 11) * 2.0**-53 < fraction


def py_dense(value, log1p=True):
    """MLPerf: empty -> 0, negative -> 0, then log(1 + x); stored as float32."""
    x = max(0.0, float(value)) if value not in ("", None) else 0.0
    return np.float32(math.log1p(x) if log1p else x)


def read_all(directory, **kwargs):
    """Every row of a converted split in file order: (label [N], dense [N, d], sparse [N, s])."""
    ds = read(directory, batch_size=97, shuffle=False, repeat=False, deterministic=True, **kwargs)
    dense, sparse, label = [], [], []
    for features, y in ds:
        dense.append(features["dense"].numpy())
        sparse.append(features["sparse"].numpy())
        label.append(y.numpy()[:, 0])
    return np.concatenate(label).astype(np.int64), np.concatenate(dense), np.concatenate(sparse)


def check_report(report, output):
    """The accounting identity, in the returned report and in report.json."""
    with open(os.path.join(output, "report.json")) as f:
        stored = json.load(f)
    for r in (report, stored):
        assert r["rows_read"] == r["rows_written"] + r["rows_rejected"]
        assert r["rows_rejected"] == sum(r["rejected_by_reason"].values())
        assert r["rows_written"] == sum(r["rows_per_split"].values())
        for per_file in r["files"].values():
            assert per_file["rows_read"] == per_file["rows_written"] + per_file["rows_rejected"]


def quarantine(output):
    with open(os.path.join(output, "quarantine.tsv"), "rb") as f:
        lines = f.read().split(b"\n")[:-1]
    return [(path.decode(), int(line), reason.decode(), raw)
            for path, line, reason, raw in (entry.split(b"\t", 3) for entry in lines)]


# ---- raw data --------------------------------------------------------------------------------------------------


def criteo_rows(rng, n):
    """Rows of Python values: label int, 13 dense (int or ""), 26 hex tokens (8 digits or "")."""
    rows = []
    for _ in range(n):
        dense = ["" if rng.random() < 0.2 else int(rng.integers(-3, 100_000)) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 2**32)):08x}" for _ in range(26)]
        # A small vocabulary in C1 so that the vocab encoding sees repeats.
        cats[0] = ["", "00000001", "0000abcd", "deadbeef", "0badf00d"][int(rng.integers(0, 5))]
        rows.append((int(rng.integers(0, 2)), dense, cats))
    return rows


def criteo_text(rows, delimiter="\t"):
    return "".join(delimiter.join([str(label)] + [str(d) for d in dense] + cats) + "\n"
                   for label, dense, cats in rows)


def expected_criteo(rows, max_ind_range=None, vocab=None, log1p=True):
    label = np.array([r[0] for r in rows])
    dense = np.array([[py_dense(v, log1p) for v in r[1]] for r in rows], dtype=np.float32)
    sparse = []
    for r in rows:
        keys = [MISSING if h == "" else int(h, 16) for h in r[2]]
        if vocab is not None:
            sparse.append([vocab[j].get(k, 0) for j, k in enumerate(keys)])
        else:
            sparse.append([0 if k == MISSING else k % max_ind_range for k in keys])
    return label, dense, np.array(sparse, dtype=np.int64)


# ---- encoding ------------------------------------------------------------------------------------------------


def test_keys_match_plain_python_references():
    rng = np.random.default_rng(0)
    tokens = [b"", b"0", b"68fd1e64", b"DEADBEEF", b"ffffffffffffffff", b"fffffffffffffffe", b"12345678901234567",
              b"xyz", b"12g4", "né".encode(), b"a" * 100, b"1fbe01fe"]
    tokens += [bytes(rng.integers(33, 127, int(rng.integers(1, 20)), dtype=np.uint8)) for _ in range(300)]
    buf = np.frombuffer(b"".join(tokens), np.uint8)
    ends = np.cumsum([len(t) for t in tokens])
    starts = ends - [len(t) for t in tokens]
    keys, bad = enc.hex_keys(buf, starts, ends)
    for token, key, is_bad in zip(tokens, keys.tolist(), bad.tolist()):
        text = token.decode("utf-8", "replace")
        valid = token == b"" or (len(token) <= 16 and all(c in "0123456789abcdefABCDEF" for c in text)
                                 and int(text, 16) != MASK64)
        assert is_bad == (not valid), token
        if valid:
            assert key == (MISSING if token == b"" else int(text, 16)), token
    string_keys = enc.string_keys(buf, starts, ends)
    assert string_keys.tolist() == [py_string_key(t) for t in tokens]
    assert enc.string_key("1fbe01fe") == py_string_key(b"1fbe01fe")
    # 2-D input keeps its shape.
    assert enc.string_keys(buf, starts[:6].reshape(2, 3), ends[:6].reshape(2, 3)).shape == (2, 3)


def test_numbers_and_hours_parse_like_python():
    fields = [b"", b"0", b"-3", b"007", b"123456789012345678", b"1234567890123456789", b"1.5", b"-2e3", b"abc",
              b"-", b"nan", b"inf", b"4 "]
    buf = np.frombuffer(b"".join(fields), np.uint8)
    ends = np.cumsum([len(f) for f in fields])
    values, bad = formats.parse_numbers(buf, ends - [len(f) for f in fields], ends)
    for field, value, is_bad in zip(fields, values.tolist(), bad.tolist()):
        try:
            reference = float(field) if field else 0.0
        except ValueError:
            reference = math.nan
        assert is_bad == (not math.isfinite(reference)), field
        if not is_bad:
            assert value == reference, field
    hours = [b"14102100", b"14103123", b"16022923", b"15022900", b"14133100", b"14102124", b"1410210", b"14x02100"]
    buf = np.frombuffer(b"".join(hours), np.uint8)
    ends = np.cumsum([len(h) for h in hours])
    hour, weekday, bad = formats.parse_hours(buf, ends - [len(h) for h in hours], ends)
    for text, h, w, is_bad in zip(hours, hour.tolist(), weekday.tolist(), bad.tolist()):
        try:
            t = text.decode()
            date = datetime.datetime(2000 + int(t[:2]), int(t[2:4]), int(t[4:6]), int(t[6:8])) if len(t) == 8 else None
        except ValueError:
            date = None
        assert is_bad == (date is None), text
        if date is not None:
            assert (h, w) == (date.hour, date.weekday()), text


def test_encoders_and_key_counter():
    keys = np.array([5, 3, 5, 9, 5, 3, 7, int(MISSING)], dtype=np.uint64)
    counter = enc.KeyCounter(compact_every=3)
    for part in np.array_split(keys, 4):
        counter.add(part)
    reference = Counter(keys.tolist())
    got_keys, got_counts = counter.result()
    assert dict(zip(got_keys.tolist(), got_counts.tolist())) == reference
    assert got_keys.tolist() == sorted(reference)
    # Vocabulary: count >= 2 kept, most frequent first: 5 (3x) -> 1, 3 (2x) -> 2; the rest -> 0.
    vocabulary = enc.VocabularyEncoder.from_counts(got_keys, got_counts, min_count=2)
    assert vocabulary.cardinality == 3
    assert vocabulary.encode(np.array([5, 3, 9, 7, 11], np.uint64)).tolist() == [1, 2, 0, 0, 0]
    # Ties by count go to the smaller key.
    tied = enc.VocabularyEncoder.from_counts(np.array([8, 2, 4], np.uint64), np.array([1, 1, 3]), 1)
    assert tied.encode(np.array([4, 2, 8], np.uint64)).tolist() == [1, 2, 3]
    assert enc.HexModEncoder(7).encode(np.array([15, int(MISSING)], np.uint64)).tolist() == [1, 0]
    assert enc.HashEncoder(1000).encode(keys).tolist() == [py_hash_id(k, 1000) for k in keys.tolist()]
    with pytest.raises(ValueError, match="max_ind_range"):
        enc.HexModEncoder(0)
    with pytest.raises(ValueError, match="min_count"):
        enc.VocabularyEncoder.from_counts(got_keys, got_counts, 0)


# ---- formats end to end ----------------------------------------------------------------------------------------


def test_criteo_tsv_pieces_gzip_hexmod_and_counts(tmp_path, monkeypatch):
    # Small read blocks, so that lines straddle block boundaries while scanning and while converting.
    monkeypatch.setattr(convert_plan, "BLOCK_BYTES", 1000)
    rng = np.random.default_rng(1)
    rows = criteo_rows(rng, 700)
    plain = tmp_path / "day_0"
    plain.write_text(criteo_text(rows[:500]).rstrip("\n"))  # no final newline: the last line still counts
    packed = tmp_path / "day_1.gz"
    with gzip.open(packed, "wt") as f:
        f.write(criteo_text(rows[500:]))
    out = tmp_path / "out"
    report = convert([plain, packed], out, "criteo-tsv", max_ind_range=1000, shard_bytes=9000, rows_per_shard=60)
    check_report(report, out)
    assert report["rows_read"] == report["rows_written"] == 700 and report["pieces"] > 5

    label, dense, sparse = read_all(out / "train")
    exp_label, exp_dense, exp_sparse = expected_criteo(rows, max_ind_range=1000)
    np.testing.assert_array_equal(label, exp_label)
    np.testing.assert_array_equal(dense, exp_dense)  # float32 bit-exact
    np.testing.assert_array_equal(sparse, exp_sparse)

    schema = Schema.load(out)
    assert schema.cardinalities == [1000] * 26 and schema.encoding == "hex-mod"
    assert schema.dense_transform == "log1p" and schema.n_dense == 13
    counts = load_counts(out, "train")
    for j, name in enumerate(schema.sparse_names):
        reference = Counter(exp_sparse[:, j].tolist())
        ids, table_counts = counts[name]
        assert dict(zip(ids.tolist(), table_counts.tolist())) == reference
    # Shards are named by piece, hold at most rows_per_shard rows, and are listed in the report.
    shards = sorted(os.listdir(out / "train"))
    assert shards == sorted(os.path.basename(p) for p in report["shards"]["train"])
    assert all(sum(1 for _ in tf.data.TFRecordDataset(str(out / "train" / s))) <= 60 for s in shards)


def test_every_rejection_kind_is_counted_and_quarantined(tmp_path):
    rows = criteo_rows(np.random.default_rng(2), 30)
    lines = criteo_text(rows).splitlines()
    bad = {
        3: ("", "empty_line"),
        6: ("1\t2\t3", "wrong_column_count"),
        9: (lines[9] + "\textra", "wrong_column_count"),
        12: ("2" + lines[12][1:], "bad_label"),
        15: ("\t".join([""] + lines[15].split("\t")[1:]), "bad_label"),
        18: ("\t".join(lines[18].split("\t")[:3] + ["12x"] + lines[18].split("\t")[4:]), "non_numeric_dense"),
        21: ("\t".join(lines[21].split("\t")[:20] + ["zz00ff00"] + lines[21].split("\t")[21:]), "bad_hex"),
        24: ("\t".join(lines[24].split("\t")[:39] + ["123456789abcdef01"]), "bad_hex"),
    }
    for index, (text, _) in bad.items():
        lines[index] = text
    path = tmp_path / "day_5"
    path.write_text("\r\n".join(lines) + "\r\n")  # Windows line ends are fine
    out = tmp_path / "out"
    # Several pieces, so the line numbers in the quarantine also check each piece's first line.
    report = convert([path], out, "criteo-tsv", max_ind_range=97, shard_bytes=2000)
    check_report(report, out)
    assert report["pieces"] >= 3
    assert report["rows_read"] == 30 and report["rows_rejected"] == len(bad)
    expected_reasons = Counter(reason for _, reason in bad.values())
    assert {k: v for k, v in report["rejected_by_reason"].items() if v} == expected_reasons
    assert quarantine(out) == [(str(path), i + 1, reason, text.encode()) for i, (text, reason) in sorted(bad.items())]
    good = [r for i, r in enumerate(rows) if i not in bad]
    label, dense, sparse = read_all(out / "train")
    exp = expected_criteo(good, max_ind_range=97)
    np.testing.assert_array_equal(label, exp[0])
    np.testing.assert_array_equal(dense, exp[1])
    np.testing.assert_array_equal(sparse, exp[2])


def test_strict_stops_at_first_bad_row(tmp_path):
    lines = criteo_text(criteo_rows(np.random.default_rng(3), 10)).splitlines()
    lines[3] = "x" + lines[3][1:]
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConvertError, match=rf"--strict: bad row in {path} line 4 \(bad_label\)"):
        convert([path], tmp_path / "out", "criteo-tsv", strict=True)


def test_criteo_csv_vocabulary_and_random_split(tmp_path):
    rows = criteo_rows(np.random.default_rng(4), 400)
    path = tmp_path / "kaggle.csv"
    header = ",".join(["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)])
    path.write_text(header + "\n" + criteo_text(rows, ","))
    out = tmp_path / "out"
    report = convert([path], out, "criteo-csv", encoding="vocab", min_count=2, split="random", eval_fraction=0.25,
                     seed=2020, shard_bytes=5000, dense_transform="none")
    check_report(report, out)
    # Line 1 is the header, so row i sits on line i + 2.
    in_eval = [py_in_eval(2020, str(path), i + 2, 0.25) for i in range(len(rows))]
    assert 40 < sum(in_eval) < 160
    train_rows = [r for r, e in zip(rows, in_eval) if not e]
    eval_rows = [r for r, e in zip(rows, in_eval) if e]
    # The vocabulary counts training rows only: keys seen >= 2 times, most frequent first, ties by smaller key.
    vocab = []
    for j in range(26):
        counts = Counter(MISSING if r[2][j] == "" else int(r[2][j], 16) for r in train_rows)
        kept = sorted((k for k, c in counts.items() if c >= 2), key=lambda k: (-counts[k], k))
        vocab.append({k: i + 1 for i, k in enumerate(kept)})
    schema = Schema.load(out)
    assert schema.cardinalities == [len(v) + 1 for v in vocab] and schema.encoding == "vocab"
    assert schema.cardinalities[0] > 3  # C1 has a small vocabulary that repeats
    for split, split_rows in (("train", train_rows), ("eval", eval_rows)):
        label, dense, sparse = read_all(out / split)
        exp = expected_criteo(split_rows, vocab=vocab, log1p=False)
        np.testing.assert_array_equal(label, exp[0])
        np.testing.assert_array_equal(dense, exp[1])
        np.testing.assert_array_equal(sparse, exp[2])


def test_vocabulary_on_hex_keys_folded_by_max_ind_range(tmp_path):
    # MLPerf's vocab with max_ind_range: hex keys are folded mod the range before counting AND before lookup, so
    # a key above the range gets the id of its folded key (not "unseen").
    rows = criteo_rows(np.random.default_rng(5), 300)
    path = tmp_path / "day_0"
    path.write_text(criteo_text(rows))
    out = tmp_path / "out"
    check_report(convert([path], out, "criteo-tsv", encoding="vocab", max_ind_range=50, min_count=2), out)

    def fold(h):
        return MISSING if h == "" else int(h, 16) % 50

    vocab = []
    for j in range(26):
        counts = Counter(fold(r[2][j]) for r in rows)
        kept = sorted((k for k, c in counts.items() if c >= 2), key=lambda k: (-counts[k], k))
        vocab.append({k: i + 1 for i, k in enumerate(kept)})
    _, _, sparse = read_all(out / "train")
    expected = np.array([[vocab[j].get(fold(h), 0) for j, h in enumerate(r[2])] for r in rows], dtype=np.int64)
    np.testing.assert_array_equal(sparse, expected)
    assert (expected[:, 1:] > 0).mean() > 0.9  # folded to 50 keys, nearly every key repeats: few unseen ids


def avazu_text(rng, n):
    header = formats.AVAZU_COLUMNS
    rows, lines = [], [",".join(header)]
    for i in range(n):
        hour = f"14{int(rng.integers(10, 13)):02d}{int(rng.integers(1, 29)):02d}{int(rng.integers(0, 24)):02d}"
        cats = [("" if rng.random() < 0.05 else f"{int(rng.integers(0, 50)):x}{'abc'[int(rng.integers(0, 3))]}")
                for _ in formats.AVAZU_CATEGORICAL]
        click = int(rng.integers(0, 2))
        rows.append((click, hour, cats))
        lines.append(",".join([str(10**19 + i), str(click), hour] + cats))
    return rows, lines


def test_avazu_hash_hour_features_and_bad_hour(tmp_path):
    rows, lines = avazu_text(np.random.default_rng(5), 250)
    lines[7] = lines[7].replace(f",{rows[6][1]},", ",14103200,", 1)  # October 32nd
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    report = convert([path], out, "avazu-csv", hash_buckets=5000)
    check_report(report, out)
    assert report["rejected_by_reason"]["bad_hour"] == 1 and report["rows_written"] == 249
    good = [r for i, r in enumerate(rows) if i != 6]
    label, dense, sparse = read_all(out / "train")
    assert dense.shape == (249, 0)
    np.testing.assert_array_equal(label, [r[0] for r in good])
    expected = []
    for click, hour, cats in good:
        date = datetime.datetime(2000 + int(hour[:2]), int(hour[2:4]), int(hour[4:6]), int(hour[6:]))
        expected.append([py_hash_id(py_string_key(c), 5000) for c in cats] + [date.hour, date.weekday()])
    np.testing.assert_array_equal(sparse, expected)
    schema = Schema.load(out)
    assert schema.sparse_names[-2:] == ["hour_of_day", "weekday"]
    assert schema.cardinalities == [5000] * 21 + [24, 7] and schema.encoding == "hash"


def test_schema_driven_csv(tmp_path):
    schema_file = tmp_path / "clicks.toml"
    schema_file.write_text(textwrap.dedent("""
        name = "shop"
        delimiter = ";"
        header = false
        columns = ["ts", "clicked", "price", "user", "item", "unused"]
        label = "clicked"
        dense = ["price"]
        sparse = ["user", "item"]
        dense_transform = "none"
    """))
    rng = np.random.default_rng(6)
    rows = [(int(rng.integers(0, 2)), round(float(rng.normal(5, 3)), 3), f"u{int(rng.integers(0, 40))}",
             "" if i % 7 == 0 else f"item-{int(rng.integers(0, 9))}") for i in range(120)]
    text = "".join(f"1700000000;{c};{p};{u};{it};zz\n" for c, p, u, it in rows)
    path = tmp_path / "log.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(text + "1700000000;1;cheap;u1;x;zz\n")
    out = tmp_path / "out"
    # encoding "hash" explicitly: a schema's default is "auto" (vocab for these small columns).
    report = convert([path], out, "csv", schema=schema_file, encoding="hash", hash_buckets=1 << 40)
    check_report(report, out)
    assert report["rejected_by_reason"]["non_numeric_dense"] == 1
    label, dense, sparse = read_all(out / "train")
    np.testing.assert_array_equal(label, [r[0] for r in rows])
    np.testing.assert_array_equal(dense[:, 0], np.array([max(0.0, r[1]) for r in rows], np.float32))
    buckets = 1 << 40
    np.testing.assert_array_equal(sparse, [[py_hash_id(py_string_key(u), buckets), py_hash_id(py_string_key(it), buckets)]
                                           for _, _, u, it in rows])
    schema = Schema.load(out)
    assert (schema.name, schema.dense_names, schema.sparse_names) == ("shop", ["price"], ["user", "item"])
    with pytest.raises(ValueError, match="lacks columns"):
        schema_file.write_text('label = "clicked"\ndense = ["nope"]\nheader = false\ncolumns = ["clicked"]\n')
        formats.layout_from_schema_file(schema_file)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = criteo_rows(np.random.default_rng(7), 300)
    columns = {"label": pa.array([r[0] for r in rows], pa.int64())}
    for i in range(13):
        columns[f"I{i + 1}"] = pa.array([None if r[1][i] == "" else r[1][i] for r in rows], pa.int64())
    for j in range(26):
        columns[f"C{j + 1}"] = pa.array([None if r[2][j] == "" else r[2][j] for r in rows], pa.string())
    columns["C26"] = pa.array([None if r[2][25] == "" else int(r[2][25], 16) for r in rows], pa.int64())
    table = pa.table(columns)
    path = tmp_path / "part.parquet"
    pq.write_table(table, path, row_group_size=128)
    bad = pa.table({**columns, "label": pa.array([2] + [r[0] for r in rows[1:]], pa.int64()),
                    "C3": pa.array(["nothex"] + [None if r[2][2] == "" else r[2][2] for r in rows[1:]], pa.string())})
    bad_path = tmp_path / "bad.parquet"
    pq.write_table(bad.slice(0, 3), bad_path)
    out = tmp_path / "out"
    report = convert([path, bad_path], out, "parquet", max_ind_range=10**6)
    check_report(report, out)
    assert report["rows_read"] == 303 and report["rows_rejected"] == 1
    assert report["tensorflow_io"].startswith("tensorflow-io")
    label, dense, sparse = read_all(out / "train")
    exp = expected_criteo(rows + rows[1:3], max_ind_range=10**6)
    np.testing.assert_array_equal(label, exp[0])
    np.testing.assert_array_equal(dense, exp[1])
    np.testing.assert_array_equal(sparse, exp[2])
    (entry,) = quarantine(out)
    assert entry[:3] == (str(bad_path), 1, "bad_label") and json.loads(entry[3])["C3"] == "nothex"


# ---- splits, errors, resume --------------------------------------------------------------------------------------


def test_criteo_days_halves(tmp_path):
    rng = np.random.default_rng(8)
    day0, day1 = criteo_rows(rng, 20), criteo_rows(rng, 11)
    (tmp_path / "day_0").write_text(criteo_text(day0))
    with gzip.open(tmp_path / "day_1.gz", "wt") as f:
        f.write(criteo_text(day1))
    out = tmp_path / "out"
    report = convert([tmp_path / "day_*"], out, "criteo-tsv", split="criteo-days-halves", test_day=1,
                     max_ind_range=50)
    check_report(report, out)
    assert report["rows_per_split"] == {"train": 20, "eval": 6, "test": 5}  # 11 lines: first half gets 6
    for split, rows in (("train", day0), ("eval", day1[:6]), ("test", day1[6:])):
        np.testing.assert_array_equal(read_all(out / split)[2], expected_criteo(rows, max_ind_range=50)[2])
    with pytest.raises(ConvertError, match="day_N"):
        convert([tmp_path / "day_0", tmp_path / "out" / "report.json"], tmp_path / "o2", "criteo-tsv",
                split="criteo-days")


def test_truncated_gzip_names_file_and_rows_kept(tmp_path):
    rows = criteo_rows(np.random.default_rng(9), 3000)
    good = tmp_path / "day_0.gz"
    with gzip.open(good, "wt") as f:
        f.write(criteo_text(rows[:100]))
    data = gzip.compress(criteo_text(rows).encode())
    broken = tmp_path / "day_1.gz"
    broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=r"day_1\.gz is truncated or unreadable .* rows were kept") as caught:
        convert([good, broken], out, "criteo-tsv")
    with open(out / "report.json") as f:
        report = json.load(f)
    kept = report["files"][str(broken)]["rows_read"]
    assert 0 < kept < 3000 and f"{kept:,} rows were kept" in str(caught.value)
    assert report["files"][str(good)]["rows_written"] == 100
    assert report["rows_read"] == report["rows_written"] + report["rows_rejected"] == 100 + kept
    # The kept rows are the file's first rows, intact.
    np.testing.assert_array_equal(read_all(out / "train")[2][100:],
                                  expected_criteo(rows[:kept], max_ind_range=40_000_000)[2])
    not_gzip = tmp_path / "day_2.gz"
    not_gzip.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(ConvertError, match=r"day_2\.gz is truncated or unreadable .* 0 rows were kept"):
        convert([not_gzip], tmp_path / "out2", "criteo-tsv")
    with pytest.raises(FileNotFoundError, match="no_such_day"):
        convert([tmp_path / "no_such_day"], tmp_path / "out3", "criteo-tsv")


def test_options_and_output_directory_are_checked(tmp_path):
    path = tmp_path / "day_0"
    path.write_text(criteo_text(criteo_rows(np.random.default_rng(10), 5)))
    for kwargs, message in [({"encoding": "nope"}, "encoding must be one of"),
                            ({"split": "weekly"}, "split must be one of"),
                            ({"eval_fraction": 1.5, "split": "random"}, r"eval_fraction must be a number in \(0, 1\)"),
                            ({"workers": 0}, "workers must be an integer >= 1"),
                            ({"max_ind_range": 0}, "max_ind_range must be an integer >= 1")]:
        with pytest.raises(ValueError, match=message):
            convert([path], tmp_path / "out", "criteo-tsv", **kwargs)
    with pytest.raises(ValueError, match="format must be one of"):
        convert([path], tmp_path / "out", "tsv")
    with pytest.raises(ValueError, match="hex-mod.*avazu-csv"):
        convert([path], tmp_path / "out", "avazu-csv", encoding="hex-mod")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("keep me")
    with pytest.raises(ConvertError, match="not empty"):
        convert([path], tmp_path / "busy", "criteo-tsv")
    convert([path], tmp_path / "out", "criteo-tsv", max_ind_range=10)
    with pytest.raises(ConvertError, match="other inputs or options"):
        convert([path], tmp_path / "out", "criteo-tsv", max_ind_range=11)
    again = convert([path], tmp_path / "out", "criteo-tsv", max_ind_range=10)  # same conversion: nothing redone
    assert again["pieces_skipped"] == again["pieces"] == 1
    csv = tmp_path / "wrong.csv"
    csv.write_text("label,I1\n1,2\n")
    with pytest.raises(ValueError, match=r"wrong.csv: the criteo-csv header lacks columns \['I2'"):
        convert([csv], tmp_path / "out4", "criteo-csv")


_KILLED_CONVERSION = """
import sys, time
from tfcompress.data.convert import convert
def slow_down(report):
    time.sleep(0.5 if report["index"] == 1 else 0)  # the parent kills the process here
convert([sys.argv[1]], sys.argv[2], "criteo-tsv", encoding="vocab", shard_bytes=4000, rows_per_shard=7,
        split="random", on_piece_done=slow_down)
"""


def test_killed_conversion_resumes_to_identical_bytes_for_any_worker_count(tmp_path):
    path = tmp_path / "day_0"
    path.write_text(criteo_text(criteo_rows(np.random.default_rng(11), 180)))
    kwargs = dict(encoding="vocab", shard_bytes=4000, rows_per_shard=7, split="random")
    reference = convert([path], tmp_path / "reference", "criteo-tsv", workers=2, **kwargs)
    assert reference["pieces"] >= 6

    out = tmp_path / "resumed"
    process = subprocess.Popen([sys.executable, "-c", _KILLED_CONVERSION, str(path), str(out)],
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    marker = out / "_state" / "piece-00001.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists() and not (out / "report.json").exists()
    finished_shard = out / "train" / "part-00000-00000.tfrecord"
    inode = os.stat(finished_shard).st_ino
    # Leftovers of a piece killed mid-write: a temporary shard and a complete-looking shard without a done marker.
    (out / "train" / "part-00002-00000.tfrecord.tmp-99999").write_bytes(b"half")
    (out / "train" / "part-00002-00009.tfrecord").write_bytes(b"stale")

    resumed = convert([path], out, "criteo-tsv", **kwargs)
    assert resumed["pieces_skipped"] >= 2 and os.stat(finished_shard).st_ino == inode  # not rewritten
    check_report(resumed, out)

    def tree(root):
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                for d, _, files in os.walk(root) for f in files
                if "_state" not in d and f != "report.json"}

    assert tree(out) == tree(tmp_path / "reference")  # shards, schema, counts, vocabulary, quarantine


def test_two_input_pipelines_read_each_converted_row_once(tmp_path):
    path = tmp_path / "day_0"
    rows = criteo_rows(np.random.default_rng(12), 150)
    for i, row in enumerate(rows):
        row[2][1] = f"{i:08x}"  # C2 = row index, to recognise rows
    path.write_text(criteo_text(rows))
    convert([path], tmp_path / "out", "criteo-tsv", shard_bytes=3000, max_ind_range=2**32)
    seen = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline)
        ds = read(tmp_path / "out" / "train", 16, seed=3, repeat=False, input_context=context)
        seen.append(np.concatenate([f["sparse"].numpy()[:, 1] for f, _ in ds]))
    assert len(seen[0]) and len(seen[1])
    assert sorted(np.concatenate(seen).tolist()) == list(range(150))


def test_cli_data_convert(tmp_path, capsys):
    path = tmp_path / "day_0"
    path.write_text(criteo_text(criteo_rows(np.random.default_rng(13), 40)) + "oops\n")
    argv = ["data", "convert", "--format", "criteo-tsv", "--input", str(path), "--output", str(tmp_path / "out"),
            "--max-ind-range", "100", "--split", "random", "--no-progress"]
    # 1 of 41 rows rejected is over the default --max-reject-fraction 0.01: an error, with the output written.
    assert cli.main(argv) == 2
    assert "1 of 41 rows (2.4%) were rejected" in capsys.readouterr().err
    assert cli.main(argv + ["--max-reject-fraction", "0.05"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\ntables ")[0])
    assert summary["rows_read"] == 41 and summary["rows_rejected"] == 1
    assert cli.main(["data", "convert", "--format", "criteo-tsv", "--input", str(path), "--output",
                     str(tmp_path / "o2"), "--strict", "--no-progress"]) == 2
    assert f"{path} line 41" in capsys.readouterr().err


# ---- tensorflow-io ---------------------------------------------------------------------------------------------


def test_tensorflow_io_detection_is_one_clear_line(monkeypatch):
    status = tfio.tensorflow_io_status()
    line = status.line()
    assert "\n" not in line and line.startswith("tensorflow-io")
    if tf.__version__.startswith(("2.18.", "2.19.", "2.20.", "2.21.")):
        assert not status.available  # measured: its native ops do not load on these TensorFlow versions
        assert "not installed" in line or "do not load" in line
    with pytest.raises(RuntimeError, match="tensorflow-io"):
        if not status.available:
            tfio.parquet_dataset("x.parquet")
        else:
            raise RuntimeError("tensorflow-io loads here")
    monkeypatch.setattr(tfio.importlib.util, "find_spec", lambda name: None)
    assert tfio.probe().line() == "tensorflow-io is not installed; Parquet is read with pyarrow"


def test_tensorflow_io_probe_reports_a_crash(monkeypatch):
    monkeypatch.setattr(tfio.importlib.util, "find_spec", lambda name: object())
    crashed = tfio.probe(script="import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert not crashed.available and "crashed (signal 11)" in crashed.line()
    failed = tfio.probe(script='print(\'TFIO_PROBE {"ok": false, "tensorflow": "2.21.0", "error": "NotFoundError: '
                               'x.so: undefined symbol: _ZN3tsl5mutex6unlockEv"}\')')
    assert failed.reason == "undefined symbol: _ZN3tsl5mutex6unlockEv"
    assert "do not load on TensorFlow 2.21.0" in failed.line()


# ---- pipelines on converted data ---------------------------------------------------------------------------------

REAL_DATA_PIPELINES = {
    "criteo_tb_dlrm_robe1000": "criteo",
    "criteo_kaggle_dlrm_robe1000": "criteo",
    "avazu_dcn_robe": "avazu",
    "avazu_dcn_mlet": "avazu",
}
PIPELINES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipelines")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Small converted Criteo (vocab, like Kaggle) and Avazu (hash) datasets with train/ and eval/ splits."""
    root = tmp_path_factory.mktemp("converted")
    (root / "train.txt").write_text(criteo_text(criteo_rows(np.random.default_rng(14), 600)))
    convert([root / "train.txt"], root / "criteo", "criteo-tsv", encoding="vocab", split="random", eval_fraction=0.2)
    _, lines = avazu_text(np.random.default_rng(15), 600)
    (root / "avazu.csv").write_text("\n".join(lines) + "\n")
    convert([root / "avazu.csv"], root / "avazu", "avazu-csv", split="random", eval_fraction=0.2, hash_buckets=1000)
    return root


def _pointed_at(name, converted, extra=()):
    from tfcompress.pipeline import load_pipeline

    data = converted / REAL_DATA_PIPELINES[name]
    return load_pipeline(os.path.join(PIPELINES_DIR, f"{name}.toml"),
                         [f"data.train={json.dumps(str(data / 'train'))}",
                          f"data.eval={json.dumps(str(data / 'eval'))}", *extra])


@pytest.mark.filterwarnings("ignore:method 'mlet' cannot go below")  # tiny test tables cannot shrink 1000x
@pytest.mark.parametrize("name", sorted(REAL_DATA_PIPELINES))
def test_real_data_pipelines_find_converted_data(name, converted):
    from tfcompress.plan import make_plan
    from tfcompress.train import prepare_data

    pipeline = _pointed_at(name, converted)
    assert pipeline.data.source == "tfrecord"
    data = prepare_data(pipeline.data, pipeline.source, verbose=0)
    assert data.schema == Schema.load(converted / REAL_DATA_PIPELINES[name])
    plan = make_plan(data.schema.cardinalities, pipeline.model.embedding_dim, **pipeline.compression.plan_kwargs())
    assert plan.ratio > 1


def _train_briefly(name, converted, tmp_path):
    from tfcompress.train import train

    small = ["train.steps_per_epoch=2", "train.batch_size=64", "train.eval_batch_size=128", "train.save_model=false",
             "model.embedding_dim=8", "compression.ratio=10.0"]
    if REAL_DATA_PIPELINES[name] == "criteo":
        small += ["model.bottom_mlp=[16]", "model.top_mlp=[16]", "compression.chunk_size=4"]
    else:
        small += ["model.deep_layers=[16]", "model.cross_layers=1"]
    result = train(_pointed_at(name, converted, small), runs_dir=str(tmp_path), verbose=0)
    assert 0.0 <= result["auc"] <= 1.0 and np.isfinite(result["log_loss"])


def test_kaggle_pipeline_trains_on_converted_data(converted, tmp_path):
    _train_briefly("criteo_kaggle_dlrm_robe1000", converted, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_DATA_PIPELINES))
def test_every_real_data_pipeline_trains_on_converted_data(name, converted, tmp_path):
    _train_briefly(name, converted, tmp_path)


# ---- fixed-width records ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_dense,n_sparse,id_bound", [(13, 26, 40_000_000), (0, 23, 1 << 22), (2, 1, 2),
                                                      (1, 3, 2**62), (3, 2, 2**14), (1, 2, 2**40)])
def test_fixed_records_are_ordinary_examples(n_dense, n_sparse, id_bound):
    from tfcompress.data import fixed_records

    rng = np.random.default_rng(n_sparse)
    layout = fixed_records.FixedLayout.for_ids_below(n_dense, n_sparse, id_bound)
    needed = -(-(id_bound - 1).bit_length() // 7)
    assert layout.id_width == min(w for w in (1, 2, 4, 8, 9) if w >= needed)
    label = rng.integers(0, 2, 50)
    dense = rng.normal(0, 100, (50, n_dense)).astype(np.float32)
    ids = rng.integers(0, id_bound, (50, n_sparse), dtype=np.int64)
    ids[0] = id_bound - 1
    ids[1] = 0
    records = fixed_records.serialize_fixed(layout, label, dense, ids)
    assert {len(r) for r in records} == {layout.record_bytes}
    for i in (0, 1, 17):  # python-protobuf reads the padded varints as the same values
        example = tf.train.Example.FromString(records[i])
        assert list(example.features.feature["sparse"].int64_list.value) == ids[i].tolist()
        assert list(example.features.feature["label"].int64_list.value) == [label[i]]
    spec = {"label": tf.io.FixedLenFeature([1], tf.int64), "dense": tf.io.FixedLenFeature([n_dense], tf.float32),
            "sparse": tf.io.FixedLenFeature([n_sparse], tf.int64)}
    parsed = tf.io.parse_example(tf.constant(records), spec)
    np.testing.assert_array_equal(parsed["sparse"].numpy(), ids)
    np.testing.assert_array_equal(parsed["dense"].numpy(), dense)
    np.testing.assert_array_equal(parsed["label"].numpy()[:, 0], label)
    # The batched decoder, on frames laid out as a TFRecord file lays them out, agrees with parse_example.
    frames = np.stack([np.frombuffer(layout.frame_header() + r + b"\0" * 4, np.uint8) for r in records])
    features, decoded_label = fixed_records.decoder(layout)(tf.constant(frames))
    np.testing.assert_array_equal(features["sparse"].numpy(), ids)
    np.testing.assert_array_equal(features["dense"].numpy(), dense)
    np.testing.assert_array_equal(decoded_label.numpy()[:, 0], label)
    with pytest.raises(ValueError, match="ids must lie in"):
        fixed_records.serialize_fixed(layout, label[:1], dense[:1], np.full((1, n_sparse), 1 << (7 * layout.id_width)))


def test_fast_and_generic_readers_agree_and_damage_is_caught(tmp_path):
    rows = criteo_rows(np.random.default_rng(16), 1000)
    path = tmp_path / "day_0"
    path.write_text(criteo_text(rows))
    out = tmp_path / "out"
    convert([path], out, "criteo-tsv", shard_bytes=60_000, max_ind_range=5000)  # 5 files, partial last blocks
    fast = read_all(out / "train")
    generic = read_all(out / "train", fixed_width=False)
    for a, b in zip(fast, generic):
        np.testing.assert_array_equal(a, b)
    # Shuffled fast reading with blocks smaller than the files covers every row once: one pipeline, two (files
    # split between them) and eight (more pipelines than the 5 files: blocks split between them).
    for shards in (1, 2, 8):
        seen = []
        for pipeline in range(shards):
            context = tf.distribute.InputContext(num_input_pipelines=shards, input_pipeline_id=pipeline)
            ds = read(out / "train", 64, seed=1, repeat=False, input_context=context, shuffle_block=32)
            for features, _ in ds:
                seen.extend(map(tuple, features["sparse"].numpy().tolist()))
        assert sorted(seen) == sorted(map(tuple, fast[2].tolist()))
    # One byte of framing flipped: caught while reading; a truncated file: caught before reading.
    shard = sorted((out / "train").iterdir())[0]
    data = bytearray(shard.read_bytes())
    frame = Schema.load(out).extra["fixed_record"]["record_bytes"] + 16
    data[5 * frame + 12 + 1] ^= 0xFF  # inside record 5's protobuf header (record 0 is checked up front, by CRC)
    shard.write_bytes(bytes(data))
    with pytest.raises(tf.errors.InvalidArgumentError, match="fixed-width layout"):
        read_all(out / "train")
    shard.write_bytes(bytes(data[:-5]))
    with pytest.raises(ValueError, match="not a whole number of"):
        read(out / "train", 8, fixed_width=True)
    with pytest.raises(ValueError, match="declares no fixed-width"):
        convert([path], tmp_path / "canonical", "criteo-tsv", record_layout="canonical")
        read(tmp_path / "canonical" / "train", 8, fixed_width=True)


def test_fixed_shard_writer_writes_what_tensorflow_writes(tmp_path):
    from tfcompress.data import fixed_records

    rng = np.random.default_rng(17)
    for n_dense, n_sparse, id_bound in ((13, 26, 40_000_000), (0, 23, 1 << 22), (1, 1, 2)):
        layout = fixed_records.FixedLayout.for_ids_below(n_dense, n_sparse, id_bound)
        rows = fixed_records.fixed_rows(layout, rng.integers(0, 2, 25), rng.random((25, n_dense)),
                                        rng.integers(0, id_bound, (25, n_sparse)))
        directory = tmp_path / f"w{n_sparse}"
        writer = fixed_records.FixedShardWriter(directory, layout, rows_per_shard=10)
        writer.write_rows(rows[:7])
        writer.write_rows(rows[7:])
        assert [os.path.basename(p) for p in writer.close()] == [f"part-0000{i}.tfrecord" for i in range(3)]
        reference = tmp_path / f"tf{n_sparse}.tfrecord"
        with tf.io.TFRecordWriter(str(reference)) as tf_writer:
            for record in fixed_records.serialize_fixed(layout, *_unpack(layout, rows)):
                tf_writer.write(record)
        written = b"".join(open(p, "rb").read() for p in writer.paths)
        assert written == reference.read_bytes()  # identical framing and CRCs
    aborted = fixed_records.FixedShardWriter(tmp_path / "aborted", layout, rows_per_shard=10)
    aborted.write_rows(rows[:3])
    aborted.abort()
    assert os.listdir(tmp_path / "aborted") == []


def _unpack(layout, rows):
    """(label, dense, ids) back from fixed rows, through python-protobuf (an independent parser)."""
    label, dense, ids = [], [], []
    for row in rows:
        feature = tf.train.Example.FromString(row.tobytes()).features.feature
        label.append(feature["label"].int64_list.value[0])
        dense.append(list(feature["dense"].float_list.value))
        ids.append(list(feature["sparse"].int64_list.value))
    return (np.array(label), np.array(dense, np.float32).reshape(len(rows), layout.n_dense),
            np.array(ids, np.int64).reshape(len(rows), layout.n_sparse))
