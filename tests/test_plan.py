"""Plan arithmetic: ratios and budgets reached, small tables kept full, errors that name the problem."""

import numpy as np
import pytest

from tfcompress.plan import CompressionPlan, make_plan
from tfcompress.sizes import parse_bytes

KAGGLE = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992, 5461306,
          10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]


def test_parse_bytes_units():
    assert parse_bytes("100MB") == 100_000_000
    assert parse_bytes("64MiB") == 64 * 1024 * 1024
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(4096) == 4096
    for bad in ["ten MB", "5XB", "-3MB", 0]:
        with pytest.raises(ValueError, match="budget"):
            parse_bytes(bad)


def test_robe_ratio_counts_every_parameter():
    plan = make_plan(KAGGLE, 16, "robe", ratio=1000, chunk_size=4)
    logical = sum(KAGGLE) * 16
    assert plan.logical_parameters == logical
    assert plan.physical_parameters == logical // 1000
    assert plan.ratio == pytest.approx(1000, rel=1e-5)
    assert plan.logical_bytes == logical * 4


def test_small_tables_stay_full_and_share_the_budget():
    plan = make_plan(KAGGLE, 16, "robe", ratio=1000, uncompressed_below=1000)
    small = [f for f, n in enumerate(KAGGLE) if n < 1000]
    full_member, robe_member = plan.members
    assert full_member.method == "full" and full_member.features == small
    assert full_member.physical_parameters == sum(KAGGLE[f] for f in small) * 16
    # The budget is total: full small tables + the ROBE array hit logical / 1000.
    assert plan.physical_parameters == pytest.approx(sum(KAGGLE) * 16 / 1000, rel=1e-5)
    assert robe_member.kwargs["memory_size"] == plan.physical_parameters - full_member.physical_parameters


@pytest.mark.parametrize("method", ["robe", "hashing", "qr"])
def test_byte_budget_is_never_exceeded(method):
    plan = make_plan(KAGGLE, 16, method, budget="64MiB")
    assert plan.physical_bytes <= 64 * 2**20
    assert plan.physical_bytes > 0.99 * 64 * 2**20


def test_hashing_rows_per_table():
    plan = make_plan([1000, 10, 55], 8, "hashing", ratio=10)
    (member,) = plan.members
    layer = plan.build_layer().members[0]
    assert layer.num_buckets == [100, 1, 6]
    assert member.physical_parameters == (100 + 1 + 6) * 8


def test_qr_that_cannot_reach_the_target_warns_and_reports_what_it_reaches():
    with pytest.warns(UserWarning, match="cannot go below"):
        plan = make_plan([10**6], 16, "qr", ratio=10000)
    # The smallest QR pair for 10^6 ids is two 1000-row tables.
    assert plan.physical_parameters == 2000 * 16
    assert plan.ratio == pytest.approx(500)


def test_build_layer_has_the_planned_size_and_works():
    plan = make_plan([5000, 30, 700], 8, "robe", ratio=50, uncompressed_below=100, chunk_size=2)
    layer = plan.build_layer()
    out = layer(np.array([[4999, 29, 0], [0, 0, 699]]))
    assert out.shape == (2, 3, 8)
    assert sum(int(np.prod(w.shape)) for w in layer.weights) == plan.physical_parameters


def test_summary_lists_each_feature_and_the_total():
    plan = make_plan(KAGGLE, 16, "robe", ratio=1000, uncompressed_below=1000)
    text = plan.summary()
    assert len([l for l in text.splitlines() if l.strip().split()[0].isdigit()]) == len(KAGGLE)
    assert "shared" in text and "total" in text and "1,000.0x" in text


def test_plan_round_trips_through_a_dict():
    plan = make_plan(KAGGLE, 16, "qr", budget="10MB", operation="add")
    again = CompressionPlan.from_dict(plan.to_dict())
    assert again == plan


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="robe", ratio=0.5), "ratio"),
        (dict(method="robe"), "exactly one of ratio or budget"),
        (dict(method="robe", ratio=10, budget="1MB"), "exactly one of ratio or budget"),
        (dict(method="zip", ratio=10), "method"),
        (dict(method="robe", budget="100GB"), "larger than the full tables"),
        (dict(method="robe", ratio=10**6, uncompressed_below=10**6), "uncompressed_below"),
        (dict(method="robe", ratio=10, chunk_size=99), "chunk_size"),
        (dict(method="robe", ratio=10, colour="red"), "colour"),
    ],
)
def test_invalid_plans_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_plan(KAGGLE, 16, **kwargs)


def _feature_weights(layer, feature):
    """Floats the built layer holds for one feature: its own tables (and MLET's slice of the projections)."""
    own = [w for w in layer.weights if w.dtype == "float32"
           and (w.name.split("/")[-1].split(":")[0].split("_")[1:2] == [str(feature)])]
    count = sum(int(np.prod(w.shape)) for w in own)
    if hasattr(layer, "inner_dim"):
        count += layer.inner_dim * layer.output_dim
    return count


@pytest.mark.parametrize("method, options", [
    ("full", {}), ("hashing", {}), ("qr", {}), ("qr", {"operation": "concat"}), ("mlet", {"inner_dim": 32}),
])
def test_per_table_sizes_equal_the_built_layers(method, options):
    cards = [5000, 700, 64, 3, 120_000]
    plan = make_plan(cards, 16, method, **({} if method == "full" else {"ratio": 40}), **options)
    (member,) = plan.members
    layer = plan.build_layer().members[0]
    layer(np.zeros((1, len(cards)), np.int64))
    assert member.feature_parameters == [_feature_weights(layer, f) for f in range(len(cards))]
    assert sum(member.feature_parameters) == layer.physical_parameters == member.physical_parameters
    table = plan.summary().splitlines()
    for f, count in enumerate(member.feature_parameters):
        assert table[1 + f].split()[4] == f"{count:,}", table[1 + f]


def test_hashing_that_leaves_a_table_one_row_warns():
    with pytest.warns(UserWarning, match=r"table\(s\) \[1, 2\] with fewer than 2 rows"):
        make_plan([100_000, 40, 90, 5000], 8, "hashing", ratio=100)
