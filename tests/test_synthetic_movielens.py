"""The MovieLens-shaped generator: deterministic, the documented shapes, and a label a simple model can learn."""

import csv

import numpy as np
import pytest

from tfcompress.data.synthetic_movielens import (
    CSV_COLUMNS, GENRES, item_ids, movielens_like, user_ids, write_movielens_like_csv,
)
from tfcompress.metrics import exact_auc


def _equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key == "genres":
            assert a[key] == b[key]
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_same_seed_same_data_other_seed_other_data():
    first = movielens_like(2000, num_users=40, num_items=60, seed=3)
    _equal(first, movielens_like(2000, num_users=40, num_items=60, seed=3))
    other = movielens_like(2000, num_users=40, num_items=60, seed=4)
    assert not np.array_equal(first["user_id"], other["user_id"])
    assert not np.array_equal(first["label"], other["label"])


def test_shapes_dtypes_and_vocabularies():
    n, length = 3000, 7
    data = movielens_like(n, num_users=30, num_items=50, seed=0, history_length=length)
    assert set(data) == {"user_id", "item_id", "genres", "history", "age", "hour_of_day", "timestamp", "label"}
    assert data["user_id"].shape == (n,) and data["item_id"].shape == (n,)
    assert set(data["user_id"]) <= set(user_ids(30)) and set(data["item_id"]) <= set(item_ids(50))
    assert data["history"].shape == (n, length)
    assert data["age"].dtype == np.float32 and data["hour_of_day"].dtype == np.float32
    assert data["timestamp"].dtype == np.int64 and data["label"].dtype == np.int64
    assert set(np.unique(data["label"])) == {0, 1}
    assert np.all((data["age"] >= 18) & (data["age"] <= 70))
    np.testing.assert_array_equal(data["hour_of_day"], (data["timestamp"] // 3600) % 24)
    assert len(data["genres"]) == n and all(set(g) <= set(GENRES) for g in data["genres"])
    lengths = [len(g) for g in data["genres"]]
    assert min(lengths) == 0 and max(lengths) == 3  # empty bags exist, as in MovieLens' "(no genres listed)"
    # history: item ids then "" padding only (the mask of StringLookup(mask_token="") + Embedding(mask_zero=True))
    filled = data["history"] != ""
    assert np.all(filled[:, :-1] | ~filled[:, 1:]), "padding must only follow the ids"
    assert set(data["history"][filled]) <= set(item_ids(50))
    assert filled.sum(axis=1).min() == 0 and filled.sum(axis=1).max() == length


def test_bad_counts_name_the_argument():
    with pytest.raises(ValueError, match="num_items"):
        movielens_like(10, num_users=5, num_items=0)
    with pytest.raises(ValueError, match="history_length"):
        movielens_like(10, num_users=5, num_items=5, history_length=2.5)


def _logistic_regression_auc(train_x, train_y, eval_x, eval_y, steps=300, lr=0.1):
    """Full-batch Adam on the log loss with a little L2 (no sklearn in the environment)."""
    w = np.zeros(train_x.shape[1])
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for step in range(1, steps + 1):
        p = 1.0 / (1.0 + np.exp(-(train_x @ w)))
        grad = train_x.T @ (p - train_y) / len(train_y) + 1e-4 * w
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        w -= lr * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
    return exact_auc(eval_y, eval_x @ w)


def test_planted_signal_is_learnable():
    num_users, num_items = 200, 300
    data = movielens_like(20000, num_users=num_users, num_items=num_items, seed=1, return_probability=True)
    assert exact_auc(data["label"], data["planted_probability"]) > 0.75  # the ceiling
    user = np.array([int(u[1:]) for u in data["user_id"]])
    item = np.array([int(i[1:]) for i in data["item_id"]])
    genre_index = {g: k for k, g in enumerate(GENRES)}
    x = np.zeros((len(user), 1 + num_users + num_items + len(GENRES) + 1))
    x[:, 0] = 1.0
    x[np.arange(len(user)), 1 + user] = 1.0
    x[np.arange(len(user)), 1 + num_users + item] = 1.0
    for row, genres in enumerate(data["genres"]):
        for g in genres:
            x[row, 1 + num_users + num_items + genre_index[g]] = 1.0
    x[:, -1] = (data["age"] - 44.0) / 15.0
    y = data["label"].astype(np.float64)
    auc = _logistic_regression_auc(x[:15000], y[:15000], x[15000:], y[15000:])
    print("logistic regression AUC", auc)
    assert auc > 0.6, auc


def test_csv_round_trip(tmp_path):
    path = tmp_path / "ml.csv"
    data = write_movielens_like_csv(path, 500, num_users=20, num_items=30, seed=2, history_length=5)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 501
    for k, row in enumerate(rows[1:]):
        record = dict(zip(CSV_COLUMNS, row))
        assert record["user_id"] == data["user_id"][k] and record["item_id"] == data["item_id"][k]
        assert (record["genres"].split("|") if record["genres"] else []) == data["genres"][k]
        assert (record["history"].split("|") if record["history"] else []) == [h for h in data["history"][k] if h]
        assert float(record["age"]) == data["age"][k] and int(record["label"]) == data["label"][k]
        assert int(record["timestamp"]) == data["timestamp"][k]
