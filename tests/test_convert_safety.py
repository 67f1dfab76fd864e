"""`tfcompress data convert`: nothing lost, nothing silently wrong (a MovieLens-shaped CSV through csv + schema).

Each test starts from what the converter got wrong: dense values beyond float32 written as inf, a 1-5 rating label
rejected for 93% of the rows with exit status 0, raw tracebacks for a full disk or a read-only output, two
conversions into one directory, no time split, 4,194,304 hash buckets for a 2-valued column, the schema file and
the raw signature's column order undocumented. Expected values come from plain Python over the rows the files were
written from (test_convert's references), never from the converter's own code.
"""

import errno
import gzip
import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from test_convert import check_report, py_hash_id, py_string_key, quarantine, read_all

from tfcompress import cli
from tfcompress.data import fixed_records, formats
from tfcompress.data.convert import ConvertError, convert
from tfcompress.data.schema import Schema

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
HEADER = "userId,movieId,rating,timestamp,genres"
GENRES = ["Comedy", "Drama|Romance", "Action|Sci-Fi", "(no genres listed)"]


def write(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def movielens_rows(rng, n, n_users=30, n_movies=200, t0=1_000_000_000, span=10_000):
    """(userId, movieId, rating, timestamp, genres) tuples, ratings 0.5..5 in halves."""
    ratings = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    return [(int(rng.integers(1, n_users + 1)), int(rng.integers(1, n_movies + 1)),
             ratings[int(rng.integers(0, len(ratings)))], int(rng.integers(t0, t0 + span)),
             GENRES[int(rng.integers(0, len(GENRES)))]) for _ in range(n)]


def number(x):
    """A rating as written in the file: 4.0 -> "4", 3.5 -> "3.5"."""
    return str(int(x)) if float(x).is_integer() else str(x)


def movielens_csv(path, rows):
    lines = [HEADER] + [",".join([str(u), str(m), number(r), str(t), g]) for u, m, r, t, g in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of `tfcompress ...`; an exception escaping main is a failure."""
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---- 1. dense values beyond float32 -------------------------------------------------------------------------------


def test_dense_values_beyond_float32_are_rejected_not_written_as_inf(tmp_path):
    schema = write(tmp_path / "s.toml", """
        label = "clicked"
        dense = ["x", "y"]
        sparse = ["user"]
        encoding = "hash"
    """)
    # x, y as written; float32 max is 3.4028234663852886e38: 3.5e38 and 1e39 become inf in float32.
    values = [("1.5", "2"), ("1e39", "0"), ("3.4e38", "1"), ("0", "3.5e38"), ("-1e39", "4"), ("", "7"),
              ("1e300", "1e300"), ("12", "-3")]
    path = tmp_path / "log.csv"
    path.write_text("clicked,x,y,user\n" + "".join(f"{i % 2},{x},{y},u{i}\n" for i, (x, y) in enumerate(values)))
    out = tmp_path / "out"
    report = convert([path], out, "csv", schema=schema, dense_transform="none", hash_buckets=101)
    check_report(report, out)
    _, dense, _ = read_all(out / "train")
    assert np.isfinite(dense).all()  # was: 1e39 and 3.5e38 written as inf
    overflowing = [1, 3, 6]  # -1e39 is clipped to 0 first (negatives -> 0), so it fits
    assert report["rejected_by_reason"]["dense_overflow"] == len(overflowing)
    assert report["rows_rejected"] == len(overflowing) and report["rows_written"] == len(values) - 3
    assert [(line, reason) for _, line, reason, _ in quarantine(out)] == [(i + 2, "dense_overflow")
                                                                          for i in overflowing]
    kept = [v for i, v in enumerate(values) if i not in overflowing]
    expected = [[np.float32(max(0.0, float(x or 0))), np.float32(max(0.0, float(y)))] for x, y in kept]
    np.testing.assert_array_equal(dense, np.array(expected, np.float32))

    # log1p with negatives kept: log1p(x <= -1) is not a number; the row is rejected, not written as NaN / -inf.
    out2 = tmp_path / "out2"
    report = convert([path], out2, "csv", schema=schema, dense_transform="log1p", clip_negative=False,
                     hash_buckets=101)
    check_report(report, out2)
    assert report["rejected_by_reason"]["dense_log1p_domain"] == 2  # -1e39 and -3
    assert report["rejected_by_reason"]["dense_overflow"] == 0  # log1p(1e39) = 89.8 fits
    _, dense, _ = read_all(out2 / "train")
    assert np.isfinite(dense).all() and dense.shape == (6, 2)
    assert dense[1, 0] == np.float32(math.log1p(1e39))


# ---- 2. labels: too many rejected rows, and mapping a label ---------------------------------------------------------


def test_rating_as_label_fails_with_top_reasons_and_hint(tmp_path, capsys):
    rows = movielens_rows(np.random.default_rng(1), 400)
    path = movielens_csv(tmp_path / "ratings.csv", rows)
    schema = write(tmp_path / "ml.toml", """
        name = "movielens"
        label = "rating"
        sparse = ["userId", "movieId", "genres"]
    """)
    out = tmp_path / "out"
    status, _, err = run_cli(["data", "convert", "--format", "csv", "--schema", str(schema), "--input", str(path),
                              "--output", str(out), "--no-progress"], capsys)
    bad = sum(r[2] not in (0.0, 1.0) for r in rows)
    assert bad / len(rows) > 0.8
    assert status == 2
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: ") and "Traceback" not in err
    assert f"{bad:,} of {len(rows):,} rows" in message and f"bad_label {bad:,}" in message
    assert 'label = {source = "rating", threshold = 4}' in message
    seen = Counter(number(r[2]) for r in rows if r[2] not in (0.0, 1.0))
    top = sorted(seen.items(), key=lambda item: (-item[1], item[0]))[:5]
    assert "rejected label values include " + ", ".join(f"'{v}' x{c:,}" for v, c in top) in message
    # The output is complete and exact all the same: report.json and the quarantine hold every rejected row.
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["rows_read"] == 400 and report["rows_rejected"] == bad == report["rejected_by_reason"]["bad_label"]
    assert report["rows_written"] == 400 - bad
    assert len(quarantine(out)) == bad
    # Accepting them is a decision: a larger --max-reject-fraction, and the finished work is reused.
    status, stdout, _ = run_cli(["data", "convert", "--format", "csv", "--schema", str(schema), "--input",
                                 str(path), "--output", str(out), "--no-progress", "--max-reject-fraction", "1"],
                                capsys)
    assert status == 0 and json.loads(stdout.split("\ntables")[0])["pieces_skipped"] == 1
    # The API has no limit unless asked (callers read the report); asked, it raises the same error.
    with pytest.raises(ConvertError, match=r"bad_label .*threshold = 4"):
        convert([path], out, "csv", schema=schema, max_reject_fraction=0.01)


def test_label_threshold_and_positive_values(tmp_path):
    rng = np.random.default_rng(2)
    rows = movielens_rows(rng, 300)
    path = movielens_csv(tmp_path / "ratings.csv", rows)
    with open(path, "a") as f:
        f.write("1,2,,1000000001,Comedy\n")        # empty rating: bad_label, not 0
        f.write("1,2,great,1000000001,Comedy\n")   # not a number: bad_label
    schema = write(tmp_path / "ml.toml", """
        name = "movielens"
        label = {source = "rating", threshold = 4}
        sparse = ["userId", "movieId", "genres"]
    """)
    out = tmp_path / "out"
    report = convert([path], out, "csv", schema=schema)
    check_report(report, out)
    assert report["rows_rejected"] == report["rejected_by_reason"]["bad_label"] == 2
    assert [line for _, line, _, _ in quarantine(out)] == [302, 303]
    label, _, _ = read_all(out / "train")
    np.testing.assert_array_equal(label, [int(r[2] >= 4) for r in rows])
    stored = Schema.load(out)
    assert stored.label == "rating" and stored.extra["label_rule"] == {"source": "rating", "threshold": 4.0}

    # positive: the field's exact text decides; other values are 0, an empty field is rejected.
    actions = ["click", "view", "1", "", "Click", "0", "click "]
    log = tmp_path / "actions.tsv"
    log.write_text("action\titem\n" + "".join(f"{a}\ti{i}\n" for i, a in enumerate(actions)))
    schema2 = write(tmp_path / "a.toml", """
        delimiter = "\\t"
        label = {source = "action", positive = ["click", "1"]}
        sparse = ["item"]
    """)
    report = convert([log], tmp_path / "out2", "csv", schema=schema2)
    check_report(report, tmp_path / "out2")
    assert report["rejected_by_reason"]["bad_label"] == 1
    label, _, _ = read_all(tmp_path / "out2" / "train")
    assert label.tolist() == [1, 0, 1, 0, 0, 0]

    for bad, message in [('label = {source = "r", threshold = 4, positive = ["1"]}', "exactly one of"),
                         ('label = {source = "r"}', "exactly one of"),
                         ('label = {threshold = 4}', "label.source"),
                         ('label = {source = "r", threshold = "4"}', "finite number"),
                         ('label = {source = "r", positive = []}', "non-empty list"),
                         ('label = {source = "r", above = 4}', "unknown keys")]:
        (tmp_path / "bad.toml").write_text(f'{bad}\nsparse = ["x"]\n')
        with pytest.raises(formats.FormatError, match=message):
            formats.layout_from_schema_file(tmp_path / "bad.toml")


def test_label_rule_on_parquet(tmp_path):
    import pyarrow as pa  # the [data] extra, which `make test` installs
    import pyarrow.parquet as pq
    ratings = [0.5, 4.0, None, 5.0, 3.5, 4.5]
    table = pa.table({"rating": pa.array(ratings, pa.float64()), "item": pa.array([f"i{i}" for i in range(6)]),
                      "action": pa.array(["click", "view", "click", None, "1", "x"])})
    pq.write_table(table, tmp_path / "t.parquet")
    write(tmp_path / "r.toml", 'label = {source = "rating", threshold = 4}\nsparse = ["item"]\n')
    report = convert([tmp_path / "t.parquet"], tmp_path / "o1", "parquet", schema=tmp_path / "r.toml")
    assert report["rejected_by_reason"]["bad_label"] == 1  # the null rating
    assert read_all(tmp_path / "o1" / "train")[0].tolist() == [0, 1, 1, 0, 1]
    write(tmp_path / "a.toml", 'label = {source = "action", positive = ["click", "1"]}\nsparse = ["item"]\n')
    report = convert([tmp_path / "t.parquet"], tmp_path / "o2", "parquet", schema=tmp_path / "a.toml")
    assert report["rejected_by_reason"]["bad_label"] == 1  # the null action
    assert read_all(tmp_path / "o2" / "train")[0].tolist() == [1, 0, 1, 1, 0]


# ---- 3. errors: disk full, read-only, permissions, two conversions ---------------------------------------------------


def _small_csv(tmp_path, n=60):
    """A MovieLens-like CSV with a 0/1 label (liked) and a schema any converter version reads."""
    rows = movielens_rows(np.random.default_rng(3), n)
    path = tmp_path / "liked.csv"
    path.write_text("userId,movieId,liked,timestamp,genres\n" + "".join(
        f"{u},{m},{int(r >= 4)},{t},{g}\n" for u, m, r, t, g in rows))
    schema = write(tmp_path / "ml.toml", """
        label = "liked"
        sparse = ["userId", "movieId", "genres"]
    """)
    return path, schema, rows


def test_disk_full_is_one_sentence_and_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    path, schema, rows = _small_csv(tmp_path)
    out = tmp_path / "out"

    def full(self, frames):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fixed_records.FixedShardWriter, "write_rows", full)
    argv = ["data", "convert", "--format", "csv", "--schema", str(schema), "--input", str(path), "--output", str(out),
            "--no-progress"]
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "the disk is full (ENOSPC)" in line and str(out) in line and str(path) in line
    assert "piece 0" in line and "rerun" in line
    monkeypatch.undo()
    status, _, _ = run_cli(argv, capsys)
    assert status == 0
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["rows_read"] == report["rows_written"] == len(rows)
    assert not os.path.exists(out / "_convert.lock")


def test_read_only_output_and_permission_denied_name_the_file(tmp_path, capsys, monkeypatch):
    path, schema, _ = _small_csv(tmp_path)
    out = tmp_path / "ro"
    real_makedirs = os.makedirs

    def read_only(name, *args, **kwargs):
        if os.fspath(name).startswith(str(out)):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(name))
        return real_makedirs(name, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", read_only)
    status, _, err = run_cli(["data", "convert", "--format", "csv", "--schema", str(schema), "--input", str(path),
                              "--output", str(out), "--no-progress"], capsys)
    monkeypatch.undo()
    assert status == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "read-only (EROFS)" in line and f"cannot write {out}" in line

    # A shard that cannot be created: the message names it.
    out2 = tmp_path / "denied"

    def denied(self, name):
        raise PermissionError(errno.EACCES, "Permission denied", name)

    monkeypatch.setattr(fixed_records.FixedShardWriter, "_open_file", denied)
    status, _, err = run_cli(["data", "convert", "--format", "csv", "--schema", str(schema), "--input", str(path),
                              "--output", str(out2), "--no-progress"], capsys)
    monkeypatch.undo()
    assert status == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "permission denied (EACCES)" in line
    assert re.search(rf"cannot write {re.escape(str(out2))}/train/part-00000-00000\.tfrecord\S* in output directory",
                     line), line


_HOLDING_CONVERSION = """
import os, sys, time
from tfcompress.data.convert import convert
started, release = sys.argv[4], sys.argv[5]
def wait(report):
    open(started, "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
convert([sys.argv[1]], sys.argv[2], "csv", schema=sys.argv[3], shard_bytes=1500, on_piece_done=wait)
"""


def test_second_conversion_into_one_directory_is_refused(tmp_path, capsys):
    path, schema, rows = _small_csv(tmp_path, n=200)
    out = tmp_path / "out"
    started, release = tmp_path / "started", tmp_path / "release"
    first = subprocess.Popen([sys.executable, "-c", _HOLDING_CONVERSION, str(path), str(out), str(schema),
                              str(started), str(release)], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists(), first.stderr.read().decode()
        # The first run is inside its conversion (a piece done, more to come): the second must not join it.
        with pytest.raises(ConvertError, match=rf"in use by another conversion: pid {first.pid} on host "
                                               rf"{re.escape(socket.gethostname())}, started \d{{4}}-"):
            convert([path], out, "csv", schema=schema, shard_bytes=1500)
        status, _, err = run_cli(["data", "convert", "--format", "csv", "--schema", str(schema), "--input",
                                  str(path), "--output", str(out), "--shard-size", "1500", "--no-progress"], capsys)
        assert status == 2 and f"pid {first.pid}" in err and "Traceback" not in err
    finally:
        release.touch()
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr.decode()
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["pieces"] > 2 and report["rows_read"] == report["rows_written"] == len(rows)
    assert report["pieces_skipped"] == 0 and not os.path.exists(out / "_convert.lock")


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    path, schema, rows = _small_csv(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {"pid": dead.pid, "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00",
            "command": ["tfcompress", "data", "convert"]}
    (out / "_convert.lock").write_text(json.dumps(lock))
    report = convert([path], out, "csv", schema=schema)
    err = capsys.readouterr().err
    assert f"warning: took over the stale lock {out / '_convert.lock'} of pid {dead.pid}" in err
    assert any(f"pid {dead.pid}" in w for w in report["warnings"])
    assert report["rows_written"] == len(rows) and not os.path.exists(out / "_convert.lock")

    # A lock from another host cannot be checked: an error that says how to proceed.
    other = tmp_path / "other"
    other.mkdir()
    (other / "_convert.lock").write_text(json.dumps(dict(lock, host="elsewhere.example", pid=4242)))
    with pytest.raises(ConvertError, match=r"another host \(pid 4242 on host elsewhere\.example.*delete the lock"):
        convert([path], other, "csv", schema=schema)


def test_a_file_system_without_locks_is_one_sentence(tmp_path, monkeypatch):
    from tfcompress.data import convert_plan

    path, schema, _ = _small_csv(tmp_path)

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(convert_plan.fcntl, "flock", no_locks)
    with pytest.raises(ConvertError, match=r"cannot lock .*_convert\.lock \(No locks available\): .* does not "
                                           r"support flock"):
        convert([path], tmp_path / "out", "csv", schema=schema)


# ---- 4. a time split on a numeric column ----------------------------------------------------------------------------


def expected_time_split(values, fraction):
    """Plain Python: k = floor(N * fraction) (fraction as the decimal it is written as), T = the (N-k)-th smallest
    value, eval = value > T."""
    n = len(values)
    k = math.floor(n * Fraction(str(fraction)))
    threshold = sorted(values)[n - k - 1]
    return threshold, [v > threshold for v in values]


def test_split_by_column_is_exact_with_ties_for_any_worker_count(tmp_path):
    rng = np.random.default_rng(4)
    n = 997
    # Many ties: timestamps from a small range, so the cut falls inside a group of equal values.
    stamps = [int(t) for t in rng.integers(1_000_000_000, 1_000_000_040, n)]
    lines = ["rowid,userId,rating,timestamp"]
    for i, t in enumerate(stamps):
        lines.append(f"{i},u{int(rng.integers(0, 20))},{int(rng.integers(1, 6))},{t}")
    bad = {5: "5,u1,4,", 17: "17,u1,4,soon", 40: "40,u1,,1000000001"}  # empty / text timestamp; bad label
    for i, text in bad.items():
        lines[i + 1] = text
    path = tmp_path / "ratings.csv"
    path.write_text("\n".join(lines) + "\n")
    schema = write(tmp_path / "s.toml", """
        label = {source = "rating", threshold = 4}
        dense = ["rowid"]
        sparse = ["userId"]
    """)
    kwargs = dict(schema=schema, split="by-column", split_column="timestamp", eval_fraction=0.2)
    out = tmp_path / "one"
    report = convert([path], out, "csv", **kwargs)
    check_report(report, out)
    assert report["rejected_by_reason"]["bad_split_value"] == 2 and report["rejected_by_reason"]["bad_label"] == 1

    good = [i for i in range(n) if i not in bad]
    threshold, in_eval = expected_time_split([stamps[i] for i in good], 0.2)
    eval_ids = [i for i, e in zip(good, in_eval) if e]
    train_ids = [i for i, e in zip(good, in_eval) if not e]
    k = math.floor(len(good) * Fraction(1, 5))
    assert len(eval_ids) < k  # ties at the threshold stayed in train
    assert report["split"] == {"column": "timestamp", "eval_fraction": 0.2, "rows": len(good),
                               "target_eval_rows": k, "threshold": float(threshold),
                               "threshold_key": report["split"]["threshold_key"], "train_rows": len(train_ids),
                               "eval_rows": len(eval_ids)}
    assert any("stay in train" in w for w in report["warnings"])
    assert report["rows_per_split"] == {"train": len(train_ids), "eval": len(eval_ids)}
    for split, ids in (("train", train_ids), ("eval", eval_ids)):
        _, dense, _ = read_all(out / split)
        assert dense[:, 0].astype(int).tolist() == ids  # file order inside each split
    assert max(stamps[i] for i in train_ids) == threshold < min(stamps[i] for i in eval_ids)

    # Many pieces, two workers: the same bytes.
    many = tmp_path / "many"
    report2 = convert([path], many, "csv", workers=2, shard_bytes=2000, **kwargs)
    assert report2["pieces"] >= 5 and report2["split"] == report["split"]

    def tree(root):
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                for d, _, files in os.walk(root) for f in files if "_state" not in d and f != "report.json"}

    one_piece = convert([path], tmp_path / "one_b", "csv", shard_bytes=2000, **kwargs)
    assert one_piece["pieces"] == report2["pieces"]
    assert tree(many) == tree(tmp_path / "one_b")


def test_split_by_column_cli_and_checks(tmp_path, capsys):
    rows = movielens_rows(np.random.default_rng(5), 500)
    path = movielens_csv(tmp_path / "ratings.csv", rows)
    schema = write(tmp_path / "ml.toml", """
        label = {source = "rating", threshold = 4}
        sparse = ["userId", "movieId", "genres"]
    """)
    base = ["data", "convert", "--format", "csv", "--schema", str(schema), "--input", str(path), "--no-progress"]
    status, out, _ = run_cli(base + ["--output", str(tmp_path / "o"), "--split", "by-column", "--split-column",
                                     "timestamp", "--eval-fraction", "0.2"], capsys)
    assert status == 0
    threshold, in_eval = expected_time_split([r[3] for r in rows], 0.2)
    assert f"split by timestamp: eval = value > {float(threshold)!r} ({sum(in_eval):,} rows" in out
    assert Schema.load(tmp_path / "o").extra["split"]["threshold"] == threshold
    status, _, err = run_cli(base + ["--output", str(tmp_path / "o2"), "--split", "by-column"], capsys)
    assert status == 2 and "needs split_column (--split-column NAME)" in err
    status, _, err = run_cli(base + ["--output", str(tmp_path / "o3"), "--split", "by-column", "--split-column",
                                     "when"], capsys)
    assert status == 2 and "lacks columns ['when']" in err


# ---- 5. encoding: real cardinalities for small columns ------------------------------------------------------------


def test_schema_csv_defaults_to_vocab_for_small_columns_and_prints_cardinalities(tmp_path, capsys):
    rng = np.random.default_rng(6)
    n = 600
    rows = [(int(rng.integers(0, 2)), ["yes", "no"][int(rng.integers(0, 2))], f"user{int(rng.integers(0, 500))}")
            for _ in range(n)]
    path = tmp_path / "log.csv"
    path.write_text("clicked,flag,user\n" + "".join(f"{c},{f},{u}\n" for c, f, u in rows))
    schema = write(tmp_path / "s.toml", """
        label = "clicked"
        sparse = ["flag", "user"]
    """)
    out = tmp_path / "out"
    status, stdout, _ = run_cli(["data", "convert", "--format", "csv", "--schema", str(schema), "--input", str(path),
                                 "--output", str(out), "--no-progress", "--vocab-max-keys", "100"], capsys)
    assert status == 0
    users = len({u for _, _, u in rows})
    user_ids = len({py_hash_id(py_string_key(u), 1 << 22) for _, _, u in rows})
    assert users > 100
    stored = Schema.load(out)
    # flag: 2 keys -> ids 1, 2 (0 = unseen); user: more than --vocab-max-keys distinct keys -> hashed.
    assert stored.cardinalities == [3, 1 << 22] and stored.encoding == "auto"
    assert stored.extra["column_encodings"] == {"flag": "vocab", "user": "hash"}
    counts = Counter(py_string_key(f) for _, f, _ in rows)
    ids = {key: i + 1 for i, key in enumerate(sorted(counts, key=lambda k: (-counts[k], k)))}
    _, _, sparse = read_all(out / "train")
    assert sparse[:, 0].tolist() == [ids[py_string_key(f)] for _, f, _ in rows]
    assert re.search(r"flag\s+vocab\s+cardinality\s+3\s+train ids used\s+2", stdout)
    assert re.search(r"user\s+hash\s+cardinality\s+4,194,304\s+train ids used\s+" + f"{user_ids:,}", stdout)

    # Many pieces, each with fewer distinct users than the limit, together more: still hashed, flag still vocab.
    report = convert([path], tmp_path / "pieces", "csv", schema=schema, shard_bytes=800, vocab_max_keys=120)
    assert report["pieces"] >= 10
    assert [(t["encoding"], t["cardinality"]) for t in report["tables"]] == [("vocab", 3), ("hash", 1 << 22)]

    # An explicit hash encoding keeps 4,194,304 buckets, and says loudly that the table is mostly empty.
    status, _, err = run_cli(["data", "convert", "--format", "csv", "--schema", str(schema), "--input", str(path),
                              "--output", str(tmp_path / "hashed"), "--no-progress", "--encoding", "hash"], capsys)
    assert status == 0
    assert "warning: column 'flag': the training rows use 2 of its 4,194,304 hash ids" in err
    assert "--encoding auto" in err


# ---- 6 / 7. documentation: the schema file and the raw signature's column order ---------------------------------


def test_schema_file_is_documented_in_help_and_readme(capsys):
    with pytest.raises(SystemExit):
        cli.main(["data", "convert", "--help"])
    help_text = capsys.readouterr().out
    with open(README) as f:
        readme = f.read()
    for text in (help_text, readme):
        for key in formats.SCHEMA_KEYS + ("threshold", "positive", "--split-column", "--max-reject-fraction"):
            assert key in text, key
        assert "userId,movieId,rating,timestamp,genres" in text


def test_readme_schema_example_parses_and_states_the_raw_column_order(tmp_path):
    from tfcompress.export.raw_features import raw_columns

    with open(README) as f:
        readme = f.read()
    (block,) = re.findall(r"```toml\n(.*?)```", readme, re.S)
    (tmp_path / "movielens.toml").write_text(block)
    layout = formats.layout_from_schema_file(tmp_path / "movielens.toml")
    assert layout.label == "rating" and layout.label_rule.threshold == 4
    order = raw_columns(layout)
    assert order == ("userId", "movieId", "genres")
    assert "`fields` columns of a schema-driven CSV: " + ", ".join(order) in readme.replace("\n", " ")
    # The general rule stated there, checked on a schema with every kind of column and no `columns` list.
    (tmp_path / "all.toml").write_text(textwrap.dedent("""
        label = "y"
        sparse = ["s1", "s2"]
        hex_sparse = ["h"]
        dense = ["d2", "d1"]
        hour_column = "hour"
    """))
    assert raw_columns(formats.layout_from_schema_file(tmp_path / "all.toml")) == ("d2", "d1", "s1", "s2", "h",
                                                                                   "hour")


def test_a_worker_killed_mid_piece_fails_the_run_naming_the_piece(tmp_path):
    """A multiprocessing.Pool waited forever for the task of a worker that died; now the run fails, naming it."""
    import threading

    from _convert_faults import die_on_piece_1
    from tfcompress.data import convert as convert_module

    pieces = [{"index": i, "path": f"/data/day_{i}.gz", "kind": "gzip"} for i in range(2)]
    outcome = {}

    def run():
        try:
            outcome["results"] = list(convert_module._run_tasks(die_on_piece_1, pieces, None, workers=1 + 1))
        except ConvertError as error:
            outcome["error"] = str(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the pool hung after a worker died"
    assert "error" in outcome, outcome
    assert "piece 1 (input /data/day_1.gz)" in outcome["error"]
    assert "worker process of the conversion died" in outcome["error"]
    assert "rerun" in outcome["error"]


def test_a_single_gzip_input_warns_and_gunzip_first_spreads_it_with_the_same_rows(tmp_path):
    """A .gz input is one piece (one worker): the run says so and how to pre-split it; `gunzip --keep` then gives
    a plain file cut into byte ranges for every worker, with the same rows in the same splits (halves included)."""
    from test_convert import criteo_rows, criteo_text

    rng = np.random.default_rng(23)
    gz_dir, plain_dir = tmp_path / "gz", tmp_path / "plain"
    gz_dir.mkdir()
    plain_dir.mkdir()
    for day, n in ((0, 300), (23, 201)):
        lines = criteo_text(criteo_rows(rng, n)).splitlines()
        lines[5] = "2" + lines[5][1:]  # a bad_label row: rejections and their line numbers carry over too
        with gzip.open(gz_dir / f"day_{day}.gz", "wt") as f:
            f.write("\n".join(lines) + "\n")
    options = dict(split="criteo-days-halves", test_day=23, max_ind_range=1000)
    single = convert([gz_dir / "day_23.gz"], tmp_path / "single", "criteo-tsv", workers=2, **options)
    assert any("gunzip --keep" in w and "day_23.gz" in w for w in single["warnings"])
    by_gz = convert(sorted(gz_dir.glob("*.gz")), tmp_path / "out_gz", "criteo-tsv", **options)
    for path in sorted(gz_dir.glob("*.gz")):  # the recommended command, as the warning prints it
        subprocess.run(["gunzip", "--keep", str(path)], check=True)
        os.replace(path.with_suffix(""), plain_dir / path.with_suffix("").name)
    by_plain = convert(sorted(plain_dir.glob("day_*")), tmp_path / "out_plain", "criteo-tsv", workers=2,
                       shard_bytes=20_000, **options)
    assert by_gz["pieces"] == 2 and by_plain["pieces"] >= 6
    assert not any("gunzip" in w for w in by_plain["warnings"])
    for key in ("rows_read", "rows_written", "rows_rejected", "rejected_by_reason", "rows_per_split"):
        assert by_plain[key] == by_gz[key], key
    for split in ("train", "eval", "test"):
        for a, b in zip(read_all(tmp_path / "out_gz" / split), read_all(tmp_path / "out_plain" / split)):
            np.testing.assert_array_equal(a, b)
    assert [(line, reason) for _, line, reason, _ in quarantine(tmp_path / "out_plain")] == \
        [(line, reason) for _, line, reason, _ in quarantine(tmp_path / "out_gz")]


def test_runner_beam_without_apache_beam_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as in an install without the `beam` extra
    path = write(tmp_path / "day_0", "1\t2\n")
    assert cli.main(["data", "convert", "--format", "criteo-tsv", "--input", str(path), "--output",
                     str(tmp_path / "out"), "--runner", "beam"]) == 2
    assert re.fullmatch(r"error: --runner beam needs Apache Beam: pip install 'tfcompress\[beam\]' .*\n",
                        capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
