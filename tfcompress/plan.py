"""Compression plans: from table sizes and a ratio or byte budget to the embedding layer that meets it.

Example::

    plan = make_plan(CRITEO_KAGGLE_CARDINALITIES, output_dim=16, method="robe", ratio=1000, chunk_size=4)
    print(plan.summary())          # logical vs physical parameters and bytes, per feature and in total
    embedding = plan.build_layer() # a Keras layer: ids [B, 26] -> [B, 26, 16]

Tables with fewer than `uncompressed_below` rows stay full tables; the rest share the budget that is left.
New methods register a planner with `register_method`.
"""

import dataclasses
import difflib
import inspect
import math
import warnings

from tfcompress.layers import (ChunkPrunedEmbedding, FullEmbedding, HashingTrickEmbedding, LearnedHashEmbedding,
                               MLETEmbedding, PlannedEmbedding, QREmbedding, RobeEmbedding)
from tfcompress.layers.base import check_cardinalities
from tfcompress.sizes import BYTES_PER_PARAMETER, format_bytes, parse_bytes

@dataclasses.dataclass
class MemberPlan:
    """One layer of the plan: which features it serves and how it is constructed."""

    method: str
    class_name: str
    features: list
    kwargs: dict
    logical_parameters: int
    physical_parameters: int
    # Trained floats of each feature's own tables, in `features` order; None where the features share one array
    # or pool (ROBE-Z, chunk pruning), so no table belongs to a single feature.
    feature_parameters: list = None
    # Size once deployed, when it differs from the trained size: MLET trains n*k + k*d floats, folds to n*d.
    folded_parameters: int = None

    @property
    def shared(self):
        return self.feature_parameters is None

    @property
    def deployed_parameters(self):
        return self.physical_parameters if self.folded_parameters is None else self.folded_parameters


@dataclasses.dataclass(frozen=True)
class Method:
    """A compression method as plans use it: its layer class, and the layer arguments for a compression.

    `options(cardinalities, output_dim, compression, options)` returns the layer's keyword arguments (besides
    cardinalities and output_dim) that reach `compression` = logical / physical for these tables; `compression`
    is None for uncompressed methods.
    """

    layer_class: type
    options: object


_METHODS = {}


def register_method(name, layer_class, options):
    """Make `make_plan(..., method=name)` available: `layer_class` sized by `layer_class.parameter_counts`."""
    _METHODS[name] = Method(layer_class, options)


def _robe_options(cardinalities, output_dim, compression, options):
    return dict(options, memory_size=math.floor(sum(cardinalities) * output_dim / compression))


def _mlet_options(cardinalities, output_dim, compression, options):
    # The ratio or budget is met by the DEPLOYED (folded) size: hash the tables to n / compression rows; the
    # k-wide training tables are temporary. compression 1 (ratio 1) means no hashing.
    hashed = {} if compression is None or compression <= 1.0 else {"compression": compression}
    return dict(options, **hashed)


def _pruned_options(cardinalities, output_dim, compression, options):
    # The budget is the chunk pool (the live chunks); address table and utilities are bookkeeping on top.
    return dict(options, budget=1.0 / compression)


def _learned_hash_options(cardinalities, output_dim, compression, options):
    # Sizes come from the mappings (`tfcompress learn-hash` writes them and a ratio that matches), not from
    # `compression`: the clustering already decided how many rows each table gets.
    if "mappings" not in options:
        raise ValueError("method 'learned_hash' needs the option mappings = \"<file>.npz\" (made by "
                         "`tfcompress learn-hash`)")
    return dict(options)


def _as_given(cardinalities, output_dim, compression, options):
    return dict(options)


def _with_compression(cardinalities, output_dim, compression, options):
    return dict(options, compression=compression)


register_method("full", FullEmbedding, _as_given)
register_method("robe", RobeEmbedding, _robe_options)
register_method("hashing", HashingTrickEmbedding, _with_compression)
register_method("qr", QREmbedding, _with_compression)
register_method("mlet", MLETEmbedding, _mlet_options)
register_method("pruned", ChunkPrunedEmbedding, _pruned_options)
register_method("learned_hash", LearnedHashEmbedding, _learned_hash_options)


def methods():
    return sorted(_METHODS)


# Layer arguments that decide a table's size. A method whose plan derives its size from the ratio or budget sets
# one of them itself (robe: memory_size, hashing / qr / mlet: compression, pruned: budget); given as options too,
# they would be overwritten or clash with it.
SIZE_OPTIONS = ("memory_size", "compression", "num_buckets", "budget")


def check_method_options(method, options):
    """Check a method's option names before any data, plan or layer exists (a pipeline's [compression] keys).

    Only names are checked, and what a method cannot run without; values are checked by `make_plan` (through the
    layer's `parameter_counts`), which needs the tables' sizes.

    Raises:
        ValueError: whose message starts with the offending key ("chunksize: ..."): an option the method's layer
            does not take (naming the closest option when one is close), a size option that the plan sets from
            the ratio or budget, or a required option left out (mlet's inner_dim, learned_hash's mappings).
    """
    if method not in _METHODS:
        raise ValueError(f"method: must be one of {methods()}, got {method!r}")
    spec = _METHODS[method]
    parameters = inspect.signature(spec.layer_class.__init__).parameters
    known = sorted(name for name, p in parameters.items()
                   if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                   and name not in ("self", "cardinalities", "output_dim"))
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{key}: method {method!r} has no option {key!r}{hint}; its options are {known}")
    try:
        planned = set(spec.options([1000], 8, 2.0, {}))  # what the plan sets for a 2x compression
    except ValueError:
        planned = set()  # a method that cannot plan without options of its own sets no size (learned_hash)
    if planned:
        for key in options:
            if key in SIZE_OPTIONS:
                raise ValueError(f"{key}: method {method!r} takes its size from ratio or budget (the plan sets "
                                 f"{sorted(planned)[0]}); remove {key}")
    for name, p in parameters.items():
        if (p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and name not in ("self", "cardinalities", "output_dim") and name not in options):
            raise ValueError(f"{name}: method {method!r} needs the option {name}")
    spec.options([1000], 8, 2.0, dict(options))  # a method's own needs ("learned_hash needs mappings = ...")


def _member(method, features, cardinalities, output_dim, compression, options):
    cards = [cardinalities[f] for f in features]
    spec = _METHODS[method]
    kwargs = spec.options(cards, output_dim, compression, options)
    try:
        counts = spec.layer_class.parameter_counts(cards, output_dim, **kwargs)
    except TypeError as error:  # e.g. a required option left out
        raise ValueError(f"method {method!r}: bad option ({error})") from None
    except ValueError as error:
        raise ValueError(f"method {method!r}: {error}") from None
    kwargs = dict(kwargs, cardinalities=cards, output_dim=output_dim)
    folded = counts.deployed if counts.deployed != counts.trained else None
    return MemberPlan(method, spec.layer_class.__name__, list(features), kwargs, sum(cards) * output_dim,
                      counts.trained, counts.trained_per_feature, folded)


@dataclasses.dataclass
class CompressionPlan:
    """Which layer serves which features, with logical (full-table) and physical sizes."""

    cardinalities: list
    output_dim: int
    method: str
    members: list
    requested_ratio: float = None
    budget_bytes: int = None
    uncompressed_below: int = 0

    @property
    def logical_parameters(self):
        return sum(m.logical_parameters for m in self.members)

    @property
    def physical_parameters(self):
        return sum(m.physical_parameters for m in self.members)

    @property
    def deployed_parameters(self):
        """Size of the exported tables: the physical size, except MLET members count their folded n*d."""
        return sum(m.deployed_parameters for m in self.members)

    @property
    def deployed_ratio(self):
        """logical / deployed: what a ratio or budget given to `make_plan` is met by."""
        return self.logical_parameters / self.deployed_parameters

    @property
    def logical_bytes(self):
        return self.logical_parameters * BYTES_PER_PARAMETER

    @property
    def physical_bytes(self):
        return self.physical_parameters * BYTES_PER_PARAMETER

    @property
    def ratio(self):
        """Achieved compression: logical / physical."""
        return self.logical_parameters / self.physical_parameters

    def build_layer(self, name="embedding"):
        """The Keras layer that implements the plan: ids [B, F] -> [B, F, output_dim]."""
        groups = [
            {"features": m.features, "layer": _METHODS[m.method].layer_class(name=f"{name}_{m.method}_{i}", **m.kwargs)}
            for i, m in enumerate(self.members)
        ]
        out_of_range = self.members[-1].kwargs.get("out_of_range", "error")
        return PlannedEmbedding(len(self.cardinalities), self.output_dim, groups, out_of_range, name=name)

    def summary(self):
        """A table of logical vs physical parameters and bytes per feature and in total."""
        lines = [f"{'feature':>7} {'rows':>12} {'method':>8} {'logical params':>15} {'physical params':>16} "
                 f"{'physical bytes':>15}"]
        owner = {f: (m, k) for m in self.members for k, f in enumerate(m.features)}
        for f, n in enumerate(self.cardinalities):
            m, k = owner[f]
            logical = n * self.output_dim
            if m.shared:
                physical, physical_bytes = "shared", "shared"
            else:
                count = m.feature_parameters[k]
                physical, physical_bytes = f"{count:,}", format_bytes(count * BYTES_PER_PARAMETER)
            lines.append(f"{f:>7} {n:>12,} {m.method:>8} {logical:>15,} {physical:>16} {physical_bytes:>15}")
        for m in self.members:
            if m.shared:
                lines.append(f"{'shared':>7} {'':>12} {m.method:>8} {m.logical_parameters:>15,} "
                             f"{m.physical_parameters:>16,} {format_bytes(m.physical_parameters * BYTES_PER_PARAMETER):>15}")
        lines.append(f"{'total':>7} {sum(self.cardinalities):>12,} {self.method:>8} {self.logical_parameters:>15,} "
                     f"{self.physical_parameters:>16,} {format_bytes(self.physical_bytes):>15}")
        change = f"{self.ratio:,.1f}x smaller" if self.ratio >= 1 else f"{1 / self.ratio:,.1f}x larger"
        lines.append(f"logical {format_bytes(self.logical_bytes)} -> physical {format_bytes(self.physical_bytes)}: "
                     f"{change}")
        if any(m.folded_parameters is not None for m in self.members):
            deployed_bytes = self.deployed_parameters * BYTES_PER_PARAMETER
            lines.append(f"trained size above (MLET: n*k + k*d per table); after fold (n*d): "
                         f"{self.deployed_parameters:,} parameters, {format_bytes(deployed_bytes)} float32, "
                         f"{self.deployed_ratio:,.1f}x smaller; as int8 ~{format_bytes(deployed_bytes // 4)}")
        return "\n".join(lines)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data["members"] = [MemberPlan(**m) for m in data["members"]]
        return cls(**data)


def make_plan(cardinalities, output_dim, method, ratio=None, budget=None, uncompressed_below=0, **options):
    """Plan the embedding of `cardinalities` tables of width `output_dim`.

    Args:
        cardinalities: rows per table.
        output_dim: embedding width.
        method: one of `methods()` ("full", "robe", "hashing", "qr", ...).
        ratio: logical / physical size to reach, >= 1 (1000 = 1000x smaller), counting uncompressed small tables.
        budget: a byte budget instead ("100MB", "64MiB", or bytes) for all embedding parameters (float32).
        uncompressed_below: tables with fewer rows stay full tables.
            For "mlet" (pass inner_dim=k) the ratio or budget is met by the folded, deployed size (n*d per table,
            hashed to fewer rows when the ratio is above 1); the plan's physical size is the larger training size
            n*k + k*d, and `deployed_parameters` the folded one.
        **options: passed to the method's layer (e.g. chunk_size, signed, seed, gradient, out_of_range, operation).

    Raises:
        ValueError: unknown method, ratio < 1, both or neither of ratio/budget for a compressing method, a budget
            that the uncompressed small tables already exceed, or a bad layer option.
    """
    cardinalities = check_cardinalities(cardinalities)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {methods()}, got {method!r}")
    if uncompressed_below < 0:
        raise ValueError(f"uncompressed_below must be >= 0, got {uncompressed_below}")
    if method == "full":
        member = _member("full", range(len(cardinalities)), cardinalities, output_dim, None, options)
        return CompressionPlan(cardinalities, output_dim, method, [member])
    if (ratio is None) == (budget is None):
        raise ValueError(f"method {method!r} needs exactly one of ratio or budget")
    logical = sum(cardinalities) * output_dim
    budget_bytes = None
    if budget is not None:
        budget_bytes = parse_bytes(budget)
        target_physical = budget_bytes // BYTES_PER_PARAMETER
    else:
        if not ratio >= 1:
            raise ValueError(f"ratio must be >= 1 (1000 = 1000x smaller), got {ratio!r}")
        target_physical = logical / ratio
    if target_physical > logical:
        raise ValueError(f"budget {budget!r} is larger than the full tables "
                         f"({format_bytes(logical * BYTES_PER_PARAMETER)}); "
                         "use method 'full'")

    small = [f for f, n in enumerate(cardinalities) if n < uncompressed_below]
    large = [f for f, n in enumerate(cardinalities) if n >= uncompressed_below]
    members = []
    if small:
        shared_options = {k: v for k, v in options.items() if k in ("out_of_range", "gradient")}
        members.append(_member("full", small, cardinalities, output_dim, None, shared_options))
    if large:
        remaining = target_physical - sum(m.deployed_parameters for m in members)
        if remaining < 1:
            raise ValueError(
                f"tables below uncompressed_below={uncompressed_below} rows already need "
                f"{format_bytes(members[0].physical_parameters * BYTES_PER_PARAMETER)}, "
                f"more than the target {format_bytes(target_physical * BYTES_PER_PARAMETER)}; lower uncompressed_below or the ratio"
            )
        large_logical = sum(cardinalities[f] for f in large) * output_dim
        compression = large_logical / remaining
        member = _member(method, large, cardinalities, output_dim, compression, options)
        # Per-table rounding (whole rows) can overshoot the target slightly; tighten until it fits. Methods with a
        # floor on their size (QR needs 2 sqrt(n) rows) stop improving, and the plan reports what they reach.
        for _ in range(8):
            if member.deployed_parameters <= remaining:
                break
            compression *= member.deployed_parameters / remaining * (1 + 1e-6)
            tighter = _member(method, large, cardinalities, output_dim, compression, options)
            if tighter.deployed_parameters >= member.deployed_parameters:
                break
            member = tighter
        members.append(member)
        if member.deployed_parameters > remaining * 1.05:  # more than whole-row rounding
            warnings.warn(
                f"method {method!r} cannot go below {format_bytes(member.deployed_parameters * BYTES_PER_PARAMETER)} "
                f"for these tables; the target was {format_bytes(remaining * BYTES_PER_PARAMETER)}",
                stacklevel=2,
            )
    return CompressionPlan(cardinalities, output_dim, method, members, ratio, budget_bytes, uncompressed_below)
