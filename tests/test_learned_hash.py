"""Learned hashing: the clustering's invariants and ranking rules, the mapping artifacts, and the layer."""

import os

import numpy as np
import pytest
import tensorflow as tf

from tfcompress._keras import keras
from tfcompress.layers import LearnedHashEmbedding
from tfcompress.learn_hash import (
    TableMapping,
    build_table_mapping,
    cluster_1d,
    load_mappings,
    save_mappings,
    smallest_row_dtype,
)
from tfcompress.learn_hash.cluster import _chain_split, _smallest


def _random_table(n, seed):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n)
    counts = np.floor(rng.pareto(1.2, n) * 3)  # heavy tail, many zeros and ones, a few large
    return values, counts


# ---- clustering ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, target, cap, weighted", [(1, 1, None, True), (500, 50, None, True),
                                                      (2000, 7, None, False), (3000, 300, 40, True),
                                                      (1000, 999, None, True)])
def test_clusters_conserve_sizes_and_counts_stay_contiguous_and_hit_the_target(n, target, cap, weighted):
    values, counts = _random_table(n, seed=n)
    result = cluster_1d(values, counts, target, max_cluster_size=cap, weighted=weighted)
    assert result.sizes.size == result.values.size == result.counts.size == target
    assert result.sizes.sum() == n
    assert result.counts.sum() == pytest.approx(counts.sum())
    assert np.array_equal(np.bincount(result.labels, minlength=target), result.sizes)
    assert np.allclose(np.bincount(result.labels, weights=counts, minlength=target), result.counts)
    # Contiguous runs of the sorted order: along increasing value the label never goes down, and every label
    # occupies one run (a label's ids are exactly the positions between its first and last occurrence).
    sorted_labels = result.labels[np.argsort(values, kind="stable")]
    assert np.all(np.diff(sorted_labels) >= 0)
    assert sorted_labels[0] == 0 and sorted_labels[-1] == target - 1
    # Each cluster's value is the (weighted) mean of its members, computed independently here.
    for label in range(0, target, max(1, target // 10)):
        member_values = values[result.labels == label]
        member_weights = counts[result.labels == label]
        if weighted and member_weights.sum() > 0:
            expected = np.average(member_values, weights=member_weights)
        else:
            expected = member_values.mean()
        assert result.values[label] == pytest.approx(expected)


def test_a_chain_of_selected_merges_is_split_left_to_right():
    # A B C D E, all four neighbour pairs selected: AB and CD merge, E stays.
    assert _chain_split(np.array([True, True, True, True])).tolist() == [True, False, True, False]
    # Two chains, each split from its own left end.
    assert _chain_split(np.array([True, True, False, True, True, True])).tolist() == [
        True, False, False, True, False, True]


def test_candidate_selection_matches_a_full_lexicographic_sort():
    # Heavy ties in both keys, as with many count-1 ids at equal spacing.
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 80))
        score, distance = rng.integers(0, 4, n).astype(float), rng.integers(0, 3, n).astype(float)
        take = int(rng.integers(1, n + 1))
        reference = np.lexsort((np.arange(n), distance, score))[:take]
        assert sorted(_smallest(score, distance, take).tolist()) == sorted(reference.tolist())


def test_cap_two_on_equal_spacing_gives_pairs_from_the_left():
    # Five ids one apart, equal counts, cap 2, three clusters: ranked equal by frequency and distance, the left
    # pairs come first; B would join AB past the cap, so C and D pair next: AB, CD, E.
    result = cluster_1d([0.0, 1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1, 1], 3, max_cluster_size=2, merge_fraction=1.0)
    assert result.labels.tolist() == [0, 0, 1, 1, 2]


def test_no_cluster_exceeds_the_cap_while_merges_under_it_exist():
    values, counts = _random_table(4000, seed=3)
    result = cluster_1d(values, counts, 200, max_cluster_size=40)  # mean size 20
    assert not result.cap_lifted
    assert result.sizes.max() <= 40
    assert result.sizes.size == 200


def test_the_cap_is_lifted_only_when_the_target_needs_it():
    with pytest.warns(UserWarning, match="lifting the cap"):
        result = cluster_1d(np.arange(10.0), None, 2, max_cluster_size=3)
    assert result.cap_lifted and result.sizes.size == 2 and result.sizes.sum() == 10


def test_with_equal_distances_the_lowest_frequency_pair_merges_first():
    # Ids one apart; the only pair of two rare ids is (2, 3).
    result = cluster_1d(np.arange(6.0), [50, 40, 1, 2, 40, 50], 5)
    assert result.labels.tolist() == [0, 1, 2, 2, 3, 4]


def test_frequency_ranks_before_distance():
    # (0, 1) is much closer, but both ids are frequent; the rare pair (2, 3) merges.
    result = cluster_1d([0.0, 0.1, 5.0, 6.0], [100, 100, 1, 1], 3)
    assert result.labels.tolist() == [0, 1, 2, 2]


def test_weighted_values_lie_closer_to_the_frequent_member():
    weighted = cluster_1d([0.0, 1.0], [1, 9], 1)
    assert weighted.values[0] == pytest.approx(0.9)  # (0 * 1 + 1 * 9) / 10
    plain = cluster_1d([0.0, 1.0], [1, 9], 1, weighted=False)
    assert plain.values[0] == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(values=[], num_clusters=1), "non-empty"),
    (dict(values=[0.0, np.nan], num_clusters=1), "finite"),
    (dict(values=[0.0, 1.0], num_clusters=3), "num_clusters"),
    (dict(values=[0.0, 1.0], counts=[1], num_clusters=1), "counts"),
    (dict(values=[0.0, 1.0], counts=[1, -1], num_clusters=1), "counts"),
    (dict(values=[0.0, 1.0], num_clusters=1, max_cluster_size=0), "max_cluster_size"),
])
def test_bad_clustering_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cluster_1d(**kwargs)


# ---- mappings -----------------------------------------------------------------------------------------------


def test_smallest_row_dtype():
    assert smallest_row_dtype(255) == np.uint8
    assert smallest_row_dtype(256) == np.uint16
    assert smallest_row_dtype(70_000) == np.uint32


@pytest.mark.parametrize("combiner", ["sum", "concat"])
def test_mapping_rows_are_in_range_and_the_budget_is_met(combiner):
    n, budget = 5000, 600
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((n, 2))
    counts = np.floor(rng.pareto(1.0, n))  # many zeros: unseen ids
    mapping = build_table_mapping(teacher, counts, budget, combiner=combiner, private_fraction=0.01)
    assert mapping.rows.shape == (2, n) and mapping.rows.dtype == np.uint16
    for k in range(2):
        assert mapping.rows[k].max() < mapping.num_rows[k]
        assert np.unique(mapping.rows[k]).size == mapping.num_rows[k]  # every row is used
    if combiner == "sum":
        assert sum(mapping.num_rows) == budget  # K tables of width d share the budget
    else:
        assert mapping.num_rows == (budget, budget)  # K tables of width d/K, each with all rows
    # Unseen ids share one row per table, which no seen id uses.
    unseen = counts == 0
    assert mapping.unseen == unseen.sum() - np.sum(unseen & _top_ids(counts, 50))
    for k in range(2):
        unseen_rows = np.unique(mapping.rows[k, unseen])
        assert unseen_rows.size == 1
        assert not np.isin(mapping.rows[k, ~unseen], unseen_rows).any()


def test_ids_below_min_count_share_the_rare_row():
    rng = np.random.default_rng(8)
    counts = rng.integers(0, 6, 3000)
    mapping = build_table_mapping(rng.standard_normal((3000, 1)), counts, 200, min_count=3)
    rare = counts < 3
    assert mapping.unseen == rare.sum()
    assert np.unique(mapping.rows[0, rare]).size == 1
    assert not np.isin(mapping.rows[0, ~rare], mapping.rows[0, rare]).any()
    assert mapping.num_rows == (200,)


def _top_ids(counts, number):
    mask = np.zeros(counts.size, dtype=bool)
    mask[np.lexsort((np.arange(counts.size), -counts))[:number]] = True
    return mask


def test_the_most_frequent_ids_keep_private_rows():
    n = 2000
    rng = np.random.default_rng(1)
    teacher = rng.standard_normal((n, 2))
    counts = rng.integers(1, 1000, n).astype(float)
    top = _top_ids(counts, 20)  # private_fraction 1% of 2000
    for combiner, private_tables in (("sum", [0]), ("concat", [0, 1])):
        mapping = build_table_mapping(teacher, counts, 300, combiner=combiner, private_fraction=0.01)
        assert mapping.private == 20
        for k in private_tables:
            rows_of_top = mapping.rows[k, top]
            assert np.unique(rows_of_top).size == 20  # one row each
            assert not np.isin(mapping.rows[k, ~top], rows_of_top).any()  # shared with nobody


def test_mappings_round_trip_through_a_file(tmp_path):
    rng = np.random.default_rng(2)
    mappings = [build_table_mapping(rng.standard_normal((n, 2)), rng.integers(0, 5, n), n // 10, name=f"C{n}")
                for n in (300, 4000)]
    path = tmp_path / "mappings.npz"
    save_mappings(path, mappings)
    again = load_mappings(path)
    assert [m.name for m in again] == ["C300", "C4000"]
    for a, b in zip(mappings, again):
        assert a.num_rows == b.num_rows and a.rows.dtype == b.rows.dtype and np.array_equal(a.rows, b.rows)
    with pytest.raises(FileNotFoundError, match="learn-hash"):
        load_mappings(tmp_path / "missing.npz")


def test_a_budget_too_small_raises():
    with pytest.raises(ValueError, match="num_rows"):
        build_table_mapping(np.zeros((100, 2)), np.arange(100), 11, private_fraction=0.1)


# ---- the layer ----------------------------------------------------------------------------------------------


def test_colliding_ids_share_one_vector_and_their_gradients_add_up():
    rows = np.array([0, 0, 1, 2, 2, 2], dtype=np.int64)  # ids 0,1 -> row 0; id 2 -> row 1; ids 3-5 -> row 2
    layer = LearnedHashEmbedding(mappings=[rows], output_dim=3)
    ids = tf.constant([[0], [1], [3], [5], [4], [2]])
    upstream = np.random.default_rng(0).standard_normal((6, 1, 3)).astype(np.float32)
    with tf.GradientTape() as tape:
        out = layer(ids)
        loss = tf.reduce_sum(out * upstream)
    table = layer.tables[0][0].numpy()
    np.testing.assert_allclose(out.numpy()[:, 0], table[rows[ids.numpy()[:, 0]]])
    np.testing.assert_array_equal(out.numpy()[0], out.numpy()[1])
    (grad,) = tape.gradient(loss, [layer.tables[0][0]])
    dense_grad = tf.convert_to_tensor(grad).numpy()
    expected = np.zeros_like(table)
    np.add.at(expected, rows[ids.numpy()[:, 0]], upstream[:, 0])  # NumPy reference: scatter-add per row
    np.testing.assert_allclose(dense_grad, expected, rtol=1e-6)


@pytest.mark.parametrize("combiner", ["sum", "concat"])
def test_several_mappings_are_combined(combiner):
    rng = np.random.default_rng(3)
    maps = [TableMapping(rows=np.stack([rng.integers(0, 7, 40), rng.integers(0, 5, 40)]), num_rows=[7, 5],
                         combiner=combiner),
            TableMapping(rows=rng.integers(0, 9, (2, 25)), num_rows=[9, 9], combiner=combiner)]
    layer = LearnedHashEmbedding(mappings=maps, output_dim=5)
    ids = np.stack([rng.integers(0, 40, 16), rng.integers(0, 25, 16)], axis=1)
    out = layer(tf.constant(ids)).numpy()
    assert out.shape == (16, 2, 5)
    for f, mapping in enumerate(maps):
        parts = [layer.tables[f][k].numpy()[mapping.rows[k, ids[:, f]]] for k in range(2)]
        expected = parts[0] + parts[1] if combiner == "sum" else np.concatenate(parts, axis=1)
        np.testing.assert_allclose(out[:, f], expected, rtol=1e-6)
    widths = [3, 2] if combiner == "concat" else [5, 5]
    assert layer.physical_parameters == sum(m * w for mapping in maps for m, w in zip(mapping.num_rows, widths))


def test_layer_config_and_keras_file_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    maps = [TableMapping(rows=rng.integers(0, 300, (2, 1000)), num_rows=[300, 300]),
            TableMapping(rows=rng.integers(0, 4, (1, 50)), num_rows=[4])]
    path = tmp_path / "maps.npz"
    save_mappings(path, maps)
    layer = LearnedHashEmbedding(mappings=str(path), output_dim=4, name="lh")
    config = layer.get_config()
    assert config["mappings"] is None and config["num_rows"] == [[300, 300], [4]]
    assert config["cardinalities"] == [1000, 50]
    again = LearnedHashEmbedding.from_config(config)
    assert again.get_config() == config

    inputs = keras.Input(shape=(2,), dtype="int64")
    model = keras.Model(inputs, layer(inputs))
    ids = np.stack([rng.integers(0, 1000, 32), rng.integers(0, 50, 32)], axis=1)
    before = model.predict_on_batch(ids)
    model.save(tmp_path / "model.keras")
    os.remove(path)  # the saved model must not need the mapping file
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict_on_batch(ids), before)
    restored = loaded.get_layer("lh")
    assert restored.mappings[0][0].dtype == "uint16"
    np.testing.assert_array_equal(np.asarray(restored.mappings[0][1]), maps[0].rows[1])


def test_layer_arguments_are_checked():
    rows = [np.array([0, 1, 1])]
    with pytest.raises(ValueError, match="cardinalities"):
        LearnedHashEmbedding(mappings=rows, output_dim=2, cardinalities=[4])
    with pytest.raises(ValueError, match="combiner"):
        LearnedHashEmbedding(mappings=rows, output_dim=2, combiner="max")
    with pytest.raises(ValueError, match="cardinalities and num_rows"):
        LearnedHashEmbedding(output_dim=2)
    with pytest.raises(ValueError, match="output_dim"):
        LearnedHashEmbedding(mappings=[np.zeros((3, 5), dtype=int)], output_dim=2, combiner="concat")


def test_plan_builds_a_learned_hash_layer(tmp_path):
    from tfcompress.plan import make_plan

    rng = np.random.default_rng(5)
    path = tmp_path / "maps.npz"
    save_mappings(path, [build_table_mapping(rng.standard_normal((5000, 2)), rng.integers(0, 3, 5000), 500)])
    cards = [5000, 30]
    logical = sum(cards) * 8
    ratio = logical / ((500 + 30) * 8)
    plan = make_plan(cards, 8, "learned_hash", ratio=ratio, uncompressed_below=1000, mappings=str(path))
    assert plan.physical_parameters == (500 + 30) * 8
    out = plan.build_layer()(np.array([[4999, 29], [0, 0]]))
    assert out.shape == (2, 2, 8)
    with pytest.raises(ValueError, match="mappings"):
        make_plan(cards, 8, "learned_hash", ratio=2.0)


def test_counts_come_from_the_converters_counts_file(tmp_path):
    from tfcompress.data.schema import Schema
    from tfcompress.learn_hash.teacher import load_counts_file

    schema = Schema(name="x", sparse_names=["a", "b"], cardinalities=[5, 3])
    path = tmp_path / "train.npz"
    np.savez(path, ids_a=np.array([0, 4]), counts_a=np.array([7, 2]), ids_b=np.array([1]), counts_b=np.array([9]))
    counts = load_counts_file(path, schema)
    assert counts[0].tolist() == [7, 0, 0, 0, 2] and counts[1].tolist() == [0, 9, 0]
    np.savez(path, ids_a=np.array([5]), counts_a=np.array([1]), ids_b=np.array([1]), counts_b=np.array([9]))
    with pytest.raises(ValueError, match="outside"):
        load_counts_file(path, schema)


# ---- learn-hash end to end ----------------------------------------------------------------------------------


def test_learn_hash_command_writes_mappings_and_a_pipeline_that_plans(tmp_path, monkeypatch):
    from tfcompress import cli
    from tfcompress.pipeline import load_pipeline
    from tfcompress.plan import make_plan

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.toml").write_text(
        'name = "p"\n[data]\nrows = 6000\neval_rows = 1000\ncardinality_scale = 0.0005\n'
        '[model]\nembedding_dim = 4\nbottom_mlp = [8]\ntop_mlp = [8]\n'
        '[compression]\nmethod = "hashing"\nratio = 4.0\n[train]\nbatch_size = 500\nsave_model = false\n')
    status = cli.main(["learn-hash", "--pipeline", "p.toml", "--target", "0.2", "--min-rows", "2000",
                       "--teacher-steps", "3", "--output", "lh", "--private-fraction", "0.01"])
    assert status == 0
    pipeline = load_pipeline("lh/p_learned_hash.toml")
    assert pipeline.compression.method == "learned_hash"
    assert pipeline.data.rows == 6000 and pipeline.model.bottom_mlp == (8,)
    mappings = load_mappings(pipeline.compression.options["mappings"])
    from tfcompress.data.synthetic import CRITEO_KAGGLE_CARDINALITIES, scale_cardinalities

    cards = scale_cardinalities(CRITEO_KAGGLE_CARDINALITIES, 0.0005)
    assert [m.cardinality for m in mappings] == [n for n in cards if n >= 2000]
    for mapping in mappings:
        assert sum(mapping.num_rows) == round(0.2 * mapping.cardinality)
        assert mapping.private == int(0.01 * mapping.cardinality)
    plan = make_plan(cards, 4, **pipeline.compression.plan_kwargs())
    expected_rows = sum(n for n in cards if n < 2000) + sum(sum(m.num_rows) for m in mappings)
    assert plan.physical_parameters == expected_rows * 4
    assert plan.build_layer()(np.zeros((2, len(cards)), dtype=np.int64)).shape == (2, len(cards), 4)


def test_learn_hash_bad_target_is_a_friendly_error(tmp_path, capsys):
    from tfcompress import cli

    (tmp_path / "p.toml").write_text('[compression]\nmethod = "hashing"\nratio = 4.0\n')
    assert cli.main(["learn-hash", "--pipeline", str(tmp_path / "p.toml"), "--target", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: target must be in (0, 1)") and "Traceback" not in err
