"""The planted-signal generator (tfcompress.data.synthetic) and the exact metrics (tfcompress.metrics).

Expected values come from closed forms (Zipf CDF, normal CDF, missing rates), brute force, or properties that a
wrong generator would break (determinism, prefix stability, group geometry); none are copied from the code.
"""

import filecmp
import itertools
import json
import math
import os

import numpy as np
import pytest

from tfcompress.data import synthetic
from tfcompress.data.synthetic import (
    AVAZU_CARDINALITIES,
    CRITEO_DENSE_MISSING,
    CRITEO_DENSE_MU,
    CRITEO_DENSE_SIGMA,
    CRITEO_KAGGLE_CARDINALITIES,
    PlantedModel,
    generate,
)
from tfcompress.metrics import exact_auc, log_loss

SCALE = 0.001


@pytest.fixture(scope="module")
def criteo_model():
    return PlantedModel("criteo", seed=1, cardinality_scale=SCALE)


@pytest.fixture(scope="module")
def criteo_rows(criteo_model):
    return criteo_model.rows("train", 50_000)


def _tree_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# ---- metrics ------------------------------------------------------------------------------------------------


def _brute_force_auc(labels, scores):
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_exact_auc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 12, 300).astype(float)  # few distinct values: many ties
    assert exact_auc(labels, scores) == pytest.approx(_brute_force_auc(labels, scores), abs=1e-12)


def test_exact_auc_hand_cases_and_errors():
    assert exact_auc([0, 1], [0.2, 0.9]) == 1.0
    assert exact_auc([0, 1], [0.9, 0.2]) == 0.0
    assert exact_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        exact_auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 or 1"):
        exact_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="3 values"):
        exact_auc([0, 1, 1], [0.1, 0.2])


def test_log_loss_matches_formula_and_clips():
    labels = np.array([1, 0, 1, 0])
    probs = np.array([0.9, 0.2, 0.6, 0.5])
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.5)) / 4
    assert log_loss(labels, probs) == pytest.approx(expected, rel=1e-12)
    assert log_loss([1, 0], [0.0, 1.0], eps=1e-7) == pytest.approx(-math.log(1e-7), rel=1e-6)


# ---- planted model -------------------------------------------------------------------------------------------


def test_cardinalities_constants():
    assert len(CRITEO_KAGGLE_CARDINALITIES) == 26 and CRITEO_KAGGLE_CARDINALITIES[2] == 10131227
    assert len(AVAZU_CARDINALITIES) == 23 and AVAZU_CARDINALITIES[-2:] == [24, 7]
    model = PlantedModel("avazu", seed=0, cardinality_scale=SCALE)
    assert model.n_dense == 0 and model.n_sparse == 23
    assert model.cardinalities == [max(1, round(n * SCALE)) for n in AVAZU_CARDINALITIES]


def test_ceiling_auc_and_click_rate(criteo_rows):
    labels, logit = criteo_rows["label"], criteo_rows["logit"]
    assert 0.22 < labels.mean() < 0.28
    assert exact_auc(labels, logit) > 0.7
    # The planted probabilities are calibrated: mean probability matches the click rate.
    assert abs(np.mean(1 / (1 + np.exp(-logit))) - labels.mean()) < 0.01


def test_avazu_ceiling_auc_and_click_rate():
    rows = PlantedModel("avazu", seed=3, cardinality_scale=0.01).rows("train", 30_000)
    assert rows["dense"].shape == (30_000, 0)
    assert 0.22 < rows["label"].mean() < 0.28
    assert exact_auc(rows["label"], rows["logit"]) > 0.7


def test_signal_is_learnable_from_data(criteo_model, criteo_rows):
    """A naive-Bayes sum of per-id click log-odds fitted on one stream ranks a different stream well above 0.5."""
    test = criteo_model.rows("eval", 20_000)
    train_labels = criteo_rows["label"]
    prior = train_labels.mean()
    score = np.zeros(len(test["label"]))
    for f, card in enumerate(criteo_model.cardinalities):
        clicks = np.bincount(criteo_rows["sparse"][:, f], weights=train_labels, minlength=card)
        shows = np.bincount(criteo_rows["sparse"][:, f], minlength=card)
        rate = (clicks + 20 * prior) / (shows + 20)  # shrunk toward the prior, so rare ids say little
        score += np.log(rate / (1 - rate))[test["sparse"][:, f]]
    assert exact_auc(test["label"], score) > 0.6


def test_ids_in_range_and_zipf_skewed(criteo_model, criteo_rows):
    sparse = criteo_rows["sparse"]
    cards = np.asarray(criteo_model.cardinalities)
    assert sparse.min() >= 0 and np.all(sparse.max(axis=0) < cards)
    f = 2  # C3: 10131 ids at this scale
    n, s = cards[f], criteo_model.zipf_exponents[f]
    assert 1.05 <= s <= 1.2
    counts = np.bincount(sparse[:, f], minlength=n)
    head_id = criteo_model.ranks_to_ids(f, 0)
    assert np.argmax(counts) == head_id
    # Share of the 10 most popular ranks vs the bounded-Zipf CDF on [1, n+1): ((11^(1-s) - 1) / ((n+1)^(1-s) - 1)).
    expected_head = (11 ** (1 - s) - 1) / ((n + 1) ** (1 - s) - 1)
    head_ids = criteo_model.ranks_to_ids(f, np.arange(10))
    assert counts[head_ids].sum() / len(sparse) == pytest.approx(expected_head, abs=0.01)
    assert expected_head > 0.25  # 0.1% of the ids carry a quarter of the rows
    assert (counts > 0).sum() > 0.2 * n  # ... and there is a long tail


def test_rank_id_bijection(criteo_model):
    for f in (0, 2, 8):  # 1460 -> 1, 10131, 3 -> 1 ids
        n = criteo_model.cardinalities[f]
        ids = criteo_model.ranks_to_ids(f, np.arange(n))
        assert sorted(ids.tolist()) == list(range(n))
        np.testing.assert_array_equal(criteo_model.ids_to_ranks(f, ids), np.arange(n))


def test_dense_missing_and_counts(criteo_rows):
    dense = criteo_rows["dense"]
    assert dense.shape == (50_000, 13) and dense.dtype == np.float32
    # Stored values are log1p of integer counts.
    counts = np.expm1(dense.astype(np.float64))
    assert np.all(np.abs(counts - np.round(counts)) <= 1e-4 * np.maximum(1, counts))
    # Zero = missing, or a count floor(exp(mu + sigma z)) of 0, i.e. z < -mu/sigma.
    for d in range(13):
        p_zero_count = 0.5 * (1 + math.erf(-CRITEO_DENSE_MU[d] / CRITEO_DENSE_SIGMA[d] / math.sqrt(2)))
        missing = CRITEO_DENSE_MISSING[d]
        expected = missing + (1 - missing) * p_zero_count
        assert np.mean(dense[:, d] == 0) == pytest.approx(expected, abs=0.015), f"column I{d + 1}"
    assert np.mean(dense[:, 11] == 0) > 0.8  # I12 is mostly missing
    assert dense[:, 4].max() > np.log1p(10_000)  # heavy tail: I5 reaches large counts


def test_latent_groups_make_similar_ids(criteo_model):
    f = 2
    ids = np.arange(criteo_model.cardinalities[f])
    groups = criteo_model.group_of(f, ids)
    assert groups.min() == 0 and groups.max() == criteo_model.options["num_groups"] - 1
    latents = criteo_model.latent_of(f, ids).astype(np.float64)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(ids), (2, 20_000))
    distance = np.sum((latents[a] - latents[b]) ** 2, axis=1)
    same = groups[a] == groups[b]
    assert same.sum() > 100
    # Closed form for unit-variance dims: same group 2k s^2/(1+s^2) = 0.4k at s=0.5, different groups 2k.
    k = criteo_model.options["latent_dim"]
    assert distance[same].mean() == pytest.approx(0.4 * k, rel=0.15)
    assert distance[~same].mean() == pytest.approx(2 * k, rel=0.15)
    # Without within-group noise every id of a group has its group's latent exactly.
    tight = PlantedModel("criteo", seed=1, cardinality_scale=SCALE, within_group_noise=0.0)
    tight_latents = tight.latent_of(f, ids)
    first_of_group = {g: i for i, g in reversed(list(enumerate(tight.group_of(f, ids))))}
    for i in range(0, len(ids), 97):
        np.testing.assert_array_equal(tight_latents[i], tight_latents[first_of_group[groups[i]]])


def test_rows_are_prefix_stable_and_splits_differ(criteo_model):
    long = criteo_model.rows("train", 70_000)  # crosses a chunk boundary
    short = criteo_model.rows("train", 66_000)
    for key in ("label", "dense", "sparse", "logit"):
        np.testing.assert_array_equal(long[key][:66_000], short[key])
    other = criteo_model.rows("eval", 1000)
    assert not np.array_equal(other["sparse"], long["sparse"][:1000])


def test_bad_options_raise():
    with pytest.raises(ValueError, match="dataset"):
        PlantedModel("movielens")
    with pytest.raises(ValueError, match="cardinality_scale"):
        PlantedModel("criteo", cardinality_scale=0)
    with pytest.raises(ValueError, match="unknown generator options"):
        PlantedModel("criteo", cardinality_scale=SCALE, latent_size=4)
    with pytest.raises(ValueError, match="target_auc"):
        PlantedModel("criteo", cardinality_scale=SCALE, target_auc=1.2)
    with pytest.raises(ValueError, match="no signal"):
        PlantedModel("avazu", cardinality_scale=SCALE, bias_weight=0, interaction_weight=0)


# ---- generate() -----------------------------------------------------------------------------------------------

SMALL = dict(dataset="criteo", rows=3000, eval_rows=1000, cardinality_scale=SCALE, rows_per_shard=1000)


def test_generate_is_deterministic_and_seed_dependent(tmp_path):
    a = generate(tmp_path / "a", seed=5, **SMALL)
    b = generate(tmp_path / "b", seed=5, **SMALL)
    c = generate(tmp_path / "c", seed=6, **SMALL)
    files = _tree_files(tmp_path / "a")
    assert files == _tree_files(tmp_path / "b")
    assert files == ["eval/part-00000.tfrecord", "schema.json", "stats.json", "train/part-00000.tfrecord",
                     "train/part-00001.tfrecord", "train/part-00002.tfrecord"]
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert mismatch == [] and errors == []
    assert a == b
    assert not filecmp.cmp(tmp_path / "a/train/part-00000.tfrecord", tmp_path / "c/train/part-00000.tfrecord",
                           shallow=False)
    assert a["splits"]["train"]["rows"] == 3000 and a["splits"]["eval"]["rows"] == 1000
    assert c["seed"] == 6 and a["options"]["planted"]["target_auc"] == 0.8


def test_generate_stats_match_rows(tmp_path):
    stats = generate(tmp_path, seed=2, **SMALL)
    model = PlantedModel("criteo", seed=2, cardinality_scale=SCALE)
    with open(tmp_path / "stats.json") as f:
        assert json.load(f) == stats
    for split, n in (("train", 3000), ("eval", 1000)):
        rows = model.rows(split, n)
        assert stats["splits"][split]["click_rate"] == pytest.approx(rows["label"].mean())
        assert stats["splits"][split]["ceiling_auc"] == pytest.approx(
            _brute_force_auc(rows["label"], rows["logit"]) if n <= 1000 else exact_auc(rows["label"], rows["logit"]),
            abs=1e-4)
    assert stats["generator_version"] == synthetic.GENERATOR_VERSION
    assert stats["cardinalities"] == model.cardinalities


def test_generate_reuses_complete_dataset_and_refuses_other_options(tmp_path):
    first = generate(tmp_path, seed=0, **SMALL)
    shard = tmp_path / "train" / "part-00000.tfrecord"
    mtime = os.stat(shard).st_mtime_ns
    assert generate(tmp_path, seed=0, **SMALL) == first
    assert os.stat(shard).st_mtime_ns == mtime  # not rewritten
    with pytest.raises(ValueError, match=str(tmp_path)):
        generate(tmp_path, seed=1, **SMALL)
    with pytest.raises(ValueError, match="different options"):
        generate(tmp_path, seed=0, click_rate=0.3, **SMALL)
    replaced = generate(tmp_path, seed=1, overwrite=True, **{**SMALL, "rows": 1500})
    assert replaced["seed"] == 1
    assert _tree_files(tmp_path / "train") == ["part-00000.tfrecord", "part-00001.tfrecord"]
    assert not any(name.startswith(".generate-tmp") for name in os.listdir(tmp_path))


def test_generate_refuses_incomplete_dataset(tmp_path):
    generate(tmp_path, seed=0, **SMALL)
    os.remove(tmp_path / "stats.json")  # as if the run had died before finishing
    with pytest.raises(ValueError, match="incomplete"):
        generate(tmp_path, seed=0, **SMALL)
    assert generate(tmp_path, seed=0, overwrite=True, **SMALL)["splits"]["train"]["rows"] == 3000


def test_generate_avazu(tmp_path):
    stats = generate(tmp_path, dataset="avazu", rows=2000, eval_rows=500, cardinality_scale=SCALE)
    with open(tmp_path / "schema.json") as f:
        schema = json.load(f)
    assert schema["dense_names"] == [] and len(schema["sparse_names"]) == 23
    assert stats["splits"]["train"]["rows"] == 2000


def test_generate_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="rows"):
        generate(tmp_path, rows=0)
    with pytest.raises(ValueError, match="unknown generator options"):
        generate(tmp_path, rows=10, eval_rows=0, cardinality_scale=SCALE, num_grups=3)
    assert not os.listdir(tmp_path)


def test_expected_auc_matches_sampled_auc():
    """The calibration's expected AUC agrees with the average AUC of labels drawn from the probabilities."""
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(2000)
    probs = 1 / (1 + np.exp(-(2 * scores - 1)))
    sampled = np.mean([exact_auc(rng.random(2000) < probs, scores) for _ in range(30)])
    assert synthetic.expected_auc(probs, scores) == pytest.approx(sampled, abs=0.005)


def test_bounded_zipf_ranks_against_cdf():
    n, s = 1000, 1.1
    u = (np.arange(100_000) + 0.5) / 100_000
    ranks = synthetic.bounded_zipf_ranks(u, n, s)
    assert ranks.min() == 0 and ranks.max() == n - 1
    for m in (1, 10, 100):
        expected = ((m + 1) ** (1 - s) - 1) / ((n + 1) ** (1 - s) - 1)
        assert np.mean(ranks < m) == pytest.approx(expected, abs=1e-4)
    uniform = synthetic.bounded_zipf_ranks(u, 7, 0.0)
    np.testing.assert_allclose(np.bincount(uniform) / len(u), 1 / 7, atol=1e-4)
    assert list(itertools.islice(synthetic.bounded_zipf_ranks(u, 1, 1.0), 3)) == [0, 0, 0]
