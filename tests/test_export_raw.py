"""The raw-string signatures (`raw`, `raw_features`): their in-graph preprocessing equals the converter's.

The independent reference is the converter itself: each test writes raw Criteo TSV / Avazu CSV lines (with
unseen values, empty fields, malformed hex, odd numbers, bad hours, a field holding the delimiter), converts them
with `tfcompress.data.convert`, and feeds the same rows, as string fields, to the exported SavedModel. What the
converter wrote (TFRecords in file order) and quarantined (quarantine.tsv: line and reason) must be what the
signature returns. One export per encoding; one fresh checker process (`tfcompress verify`) checks them all.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from test_convert import quarantine, read_all

from tfcompress._keras import keras
from tfcompress.data import encoding as enc
from tfcompress.data import formats
from tfcompress.data.convert import convert
from tfcompress.data.schema import Schema
from tfcompress.export import raw_features
from tfcompress.export.saved_model import export_saved_model
from tfcompress.export.signatures import TENSOR_SIGNATURE
from tfcompress.export.verify import verify
from tfcompress.layers import FullEmbedding
from tfcompress.models import build_dlrm

CASES = {  # name: (format, convert options)
    "criteo_hexmod": ("criteo-tsv", {"max_ind_range": 97}),
    "criteo_vocab": ("criteo-tsv", {"encoding": "vocab", "min_count": 2}),
    "criteo_vocab_folded": ("criteo-tsv", {"encoding": "vocab", "min_count": 2, "max_ind_range": 4096}),
    "criteo_hash": ("criteo-tsv", {"encoding": "hash", "hash_buckets": 61}),
    # No transform: 1e300 is beyond float32 (dense_overflow); log1p with negatives kept: -5 has no log1p.
    "criteo_untransformed": ("criteo-tsv", {"dense_transform": "none", "max_ind_range": 97}),
    "criteo_log1p_negatives": ("criteo-tsv", {"clip_negative": False, "max_ind_range": 97}),
    "avazu_hash": ("avazu-csv", {"hash_buckets": 53}),
    "avazu_vocab": ("avazu-csv", {"encoding": "vocab", "min_count": 2}),
}


# ---- raw rows: (fields in the signature's column order, the file line holding them) --------------------------
def criteo_rows(rng, n):
    """Criteo rows as fields I1..I13, C1..C26, most ordinary, then one line per rule."""
    rows = []
    for _ in range(n):
        dense = ["" if rng.random() < 0.2 else str(int(rng.integers(-3, 5000))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 40)):08x}" for _ in range(26)]
        rows.append(dense + cats)
    base = rows[0]

    def edit(dense=None, cats=None):
        row = list(base)
        for j, v in (dense or {}).items():
            row[j] = v
        for j, v in (cats or {}).items():
            row[13 + j] = v
        return row

    rows += [
        [""] * 39,                                                       # every field empty
        edit(cats={0: "0123456789abcdef", 1: "DEADBEEF", 2: "7"}),       # unseen values, upper case, 1 digit
        edit(dense={0: " 7 ", 1: "1_000", 2: "2.5e1", 3: "-0", 4: ".5", 5: "12345678901234567890"}),
        edit(dense={6: "abc"}),                                          # non_numeric_dense
        edit(dense={7: "1e400"}),                                        # overflows: non_numeric_dense
        edit(dense={7: "1e300"}),                                        # float64, not float32: dense_overflow
        edit(dense={9: "-5"}),                                           # log1p(-5) with negatives kept
        edit(dense={9: "-5", 10: "1e300"}, cats={3: "zz"}),              # bad_hex wins over the dense reasons
        edit(dense={8: "1__0"}),                                         # not float(): non_numeric_dense
        edit(cats={3: "zz"}),                                            # bad_hex
        edit(cats={4: "00000000000000001"}),                             # 17 digits: bad_hex
        edit(cats={5: "ffffffffffffffff"}),                              # the reserved key: bad_hex
        edit(cats={6: "fffffffffffffffe"}),                              # the largest allowed key
        edit(dense={0: "x"}, cats={7: "q"}),                             # two reasons: the first wins
        edit(cats={8: "ab\tcd"}),                                        # holds the delimiter: wrong_column_count
    ]
    labels = [str(i % 2) for i in range(len(rows))]
    lines = ["\t".join([label] + row) for label, row in zip(labels, rows)]
    return rows, lines


def avazu_rows(rng, n):
    """Avazu rows as fields hour, C1, banner_pos, ..., C21, most ordinary, then one line per rule."""
    rows = []
    for _ in range(n):
        hour = f"14{int(rng.integers(10, 13)):02d}{int(rng.integers(1, 29)):02d}{int(rng.integers(0, 24)):02d}"
        cats = ["" if rng.random() < 0.05 else f"{int(rng.integers(0, 12)):x}{'ab'[int(rng.integers(0, 2))]}"
                for _ in formats.AVAZU_CATEGORICAL]
        rows.append([hour] + cats)
    base = rows[0]

    def edit(hour=None, cats=None):
        row = list(base)
        row[0] = base[0] if hour is None else hour
        for j, v in (cats or {}).items():
            row[1 + j] = v
        return row

    rows += [
        edit(cats={j: "" for j in range(21)}),                           # every categorical field empty
        edit(cats={0: "never seen", 1: "caf\u00e9", 2: "x" * 90}),        # unseen, UTF-8, longer than 64 bytes
        edit(hour="16022923"),                                           # a leap day
        edit(hour="14023000"),                                           # February 30th: bad_hour
        edit(hour="1410210"),                                            # 7 digits: bad_hour
        edit(hour=""),                                                   # empty hour: bad_hour
        edit(cats={3: "a,b"}),                                           # holds the delimiter: wrong_column_count
    ]
    lines = [",".join(formats.AVAZU_COLUMNS)]
    lines += [",".join([str(10**19 + i), str(i % 2)] + row) for i, row in enumerate(rows)]
    return rows, lines


def build_model(schema, seed):
    keras.utils.set_random_seed(seed)
    embedding = FullEmbedding(schema.cardinalities, 4, name="tables")
    model = build_dlrm((schema.n_dense, schema.n_sparse), embedding, (8,), (8,), name="raw_model")
    # Large random tables: every id moves the prediction, so a wrong id cannot hide.
    for weight in embedding.weights:
        weight.assign(np.random.default_rng(seed).normal(size=weight.shape).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{case: (fields [N, F], lines, data dir, SavedModel path)} plus one fresh-process verify of all exports."""
    root = tmp_path_factory.mktemp("raw")
    results = {}
    for i, (name, (fmt, options)) in enumerate(CASES.items()):
        rng = np.random.default_rng(i)
        fields, lines = criteo_rows(rng, 40) if fmt == "criteo-tsv" else avazu_rows(rng, 40)
        source = root / f"{name}.{'tsv' if fmt == 'criteo-tsv' else 'csv'}"
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")
        data_dir = root / f"{name}_data"
        convert([source], data_dir, fmt, **options)
        model = build_model(Schema.load(data_dir), seed=i)
        path = export_saved_model(model, base_dir=root / "saved_models", name=name,
                                         raw_preprocessing=data_dir)
        results[name] = (fields, lines, data_dir, path)
    checked = verify([results[name][3] for name in CASES])
    return results, checked


def converter_output(data_dir, n_rows):
    """What the converter made of rows 0..n-1: valid, reasons, and dense/sparse of the valid rows (file order)."""
    header = Schema.load(data_dir).extra["format"] == "avazu-csv"
    reasons = [""] * n_rows
    for _, line, reason, _ in quarantine(data_dir):
        reasons[line - 1 - header] = reason  # quarantine lines are 1-based file lines
    _, dense, sparse = read_all(data_dir / "train")
    return np.array([not r for r in reasons]), np.array(reasons), dense, sparse


@pytest.mark.parametrize("name", list(CASES))
def test_raw_signatures_equal_converter_and_tensor_signature(exported, name):
    results, _ = exported
    fields, _, data_dir, path = results[name]
    loaded = tf.saved_model.load(path)
    feed = {raw_features.RAW_INPUT: tf.constant([[v.encode("utf-8") for v in row] for row in fields])}
    features = {k: v.numpy() for k, v in loaded.signatures[raw_features.RAW_FEATURES_SIGNATURE](**feed).items()}
    valid, reasons, dense, sparse = converter_output(data_dir, len(fields))
    assert (~valid).sum() >= 4 and valid.sum() >= 40  # the file has rejected rows of several kinds, and good ones
    expected_dense_reason = {"criteo_untransformed": "dense_overflow", "criteo_log1p_negatives": "dense_log1p_domain"}
    if name in expected_dense_reason:  # the rows that only these conversions reject are in the comparison
        assert expected_dense_reason[name] in set(reasons), sorted(set(reasons))

    np.testing.assert_array_equal(features["valid"], valid)
    np.testing.assert_array_equal(features["reject_reason"].astype(str), reasons)
    np.testing.assert_array_equal(features["sparse"][valid], sparse)
    np.testing.assert_allclose(features["dense"][valid], dense, rtol=1e-6, atol=1e-6)

    raw = loaded.signatures[raw_features.RAW_SIGNATURE](**feed)
    tensors = loaded.signatures[TENSOR_SIGNATURE](dense=tf.constant(dense), sparse=tf.constant(sparse))
    probability, reference = raw["probability"].numpy(), tensors["probability"].numpy()
    np.testing.assert_allclose(probability[valid], reference, atol=1e-6, rtol=0)
    assert np.std(reference) > 1e-3  # the model's output depends on the ids: the comparison can fail
    assert np.all(np.isnan(probability[~valid])) and not np.any(np.isnan(probability[valid]))
    np.testing.assert_array_equal(raw["valid"].numpy(), valid)


def test_unseen_values_follow_the_converter_rule(exported):
    """Unseen vocab keys get id 0, empty hex fields id 0 under hex-mod: the converter's ids, checked by hand too."""
    results, _ = exported
    fields, _, data_dir, path = results["criteo_vocab"]
    loaded = tf.saved_model.load(path)
    unseen = list(fields[0])
    unseen[13:16] = ["0123456789abcdef", "", "cafef00d"]
    out = loaded.signatures[raw_features.RAW_FEATURES_SIGNATURE](fields=tf.constant([unseen]))
    with np.load(os.path.join(data_dir, "vocabulary.npz")) as vocabulary:
        in_vocab = [enc.MISSING_KEY in vocabulary[f"keys_C{j}"] for j in (1, 2, 3)]
    expected_c2 = 1 + int(np.flatnonzero(np.load(os.path.join(data_dir, "vocabulary.npz"))["keys_C2"] ==
                                         enc.MISSING_KEY)[0]) if in_vocab[1] else 0
    assert out["sparse"].numpy()[0, 0] == 0 and out["sparse"].numpy()[0, 2] == 0  # never in the training file
    assert out["sparse"].numpy()[0, 1] == expected_c2  # empty: the missing key, an ordinary vocabulary key

    fields, _, _, path = results["criteo_hexmod"]
    loaded = tf.saved_model.load(path)
    row = list(fields[0])
    row[13:16] = ["", "0123456789abcdef", "DEADBEEF"]
    out = loaded.signatures[raw_features.RAW_FEATURES_SIGNATURE](fields=tf.constant([row]))
    assert out["sparse"].numpy()[0, :3].tolist() == [0, 0x0123456789ABCDEF % 97, 0xDEADBEEF % 97]


def test_fresh_process_verify_checks_the_raw_signature_and_stock_ops(exported):
    results, checked = exported
    assert checked.ok, checked.output
    for name in CASES:
        report = checked.report(results[name][3])
        assert report["checks"]["raw"]["status"] == "PASS", report["checks"]["raw"]
        assert report["checks"]["stock_ops"]["status"] == "PASS"
        assert report["non_stock_ops"] == []
        # The checked op set includes the raw preprocessing (so the stock-op check covered it).
        assert {"StringToNumber", "DecodePaddedRaw"} <= set(report["ops"])
        assert any(op.endswith("RegexFullMatch") for op in report["ops"])
    vocab_ops = set(checked.report(results["criteo_vocab"][3])["ops"])
    assert {"HashTableV2", "InitializeTableFromTextFileV2", "LookupTableFindV2"} <= vocab_ops


def test_in_graph_keys_match_the_converter_keys():
    rng = np.random.default_rng(3)
    tokens = [b"", b"a", b"\xff\x00\x01", "caf\u00e9".encode(), b"x" * 65, b"y" * 200]
    tokens += [bytes(rng.integers(0, 256, int(rng.integers(1, 80))).astype(np.uint8)) for _ in range(200)]
    got = raw_features.string_keys_tf(tf.constant(tokens)).numpy()
    assert got.tolist() == [enc.string_key(t) for t in tokens]  # the scalar Python reference

    hexes = [b"", b"0", b"F", b"68fd1e64", b"DEADbeef", b"fffffffffffffffe", b"ffffffffffffffff", b"1" * 17, b"g1",
             b" 1", b"\xff"] + [f"{int(v):x}".encode() for v in rng.integers(0, 2**63, 50)]
    keys, bad = raw_features.hex_keys_tf(tf.constant(hexes))
    for token, key, is_bad in zip(hexes, keys.numpy().tolist(), bad.numpy().tolist()):
        try:
            expected = enc.parse_hex_token(token)
        except ValueError:
            assert is_bad, token
            continue
        assert not is_bad and key == expected, token


def test_export_refuses_a_data_dir_of_another_model(exported, tmp_path):
    results, _ = exported
    criteo_dir = results["criteo_hash"][2]
    model = build_model(Schema.load(results["avazu_hash"][2]), seed=0)
    with pytest.raises(ValueError, match="give the data directory the model was trained on"):
        export_saved_model(model, base_dir=tmp_path, name="wrong", raw_preprocessing=criteo_dir)
    with pytest.raises(ValueError, match="not written by `tfcompress data convert`"):
        Schema(name="toy", dense_names=[], sparse_names=["a"], cardinalities=[3]).save(tmp_path / "toy")
        export_saved_model(model, base_dir=tmp_path, name="wrong", raw_preprocessing=tmp_path / "toy")
    assert not os.path.exists(tmp_path / "wrong")


def test_cli_export_raw_signature(exported, tmp_path, capsys):
    from tfcompress.cli import main

    results, _ = exported
    data_dir = results["avazu_hash"][2]
    checkpoint = tmp_path / "model.keras"
    build_model(Schema.load(data_dir), seed=1).save(checkpoint)
    code = main(["export", "--checkpoint", str(checkpoint), "--name", "cli_raw", "--base-dir",
                 str(tmp_path / "models"), "--raw-signature", str(data_dir)])
    assert code == 0, capsys.readouterr()
    loaded = tf.saved_model.load(str(tmp_path / "models" / "cli_raw" / "1"))
    assert {raw_features.RAW_SIGNATURE, raw_features.RAW_FEATURES_SIGNATURE} <= set(loaded.signatures)
