"""Compression plans: from table sizes and a ratio or byte budget to the embedding layer that meets it.

Example::

    plan = make_plan(CRITEO_KAGGLE_CARDINALITIES, output_dim=16, method="robe", ratio=1000, chunk_size=4)
    print(plan.summary())          # logical vs physical parameters and bytes, per feature and in total
    embedding = plan.build_layer() # a Keras layer: ids [B, 26] -> [B, 26, 16]

Tables with fewer than `uncompressed_below` rows stay full tables; the rest share the budget that is left.
New methods register a planner with `register_method`.
"""

import dataclasses
import math
import re
import warnings

BYTES_PER_PARAMETER = 4  # float32

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(budget):
    """'100MB' -> 100_000_000, '64MiB' -> 67_108_864, 1500 -> 1500. Decimal units are powers of 10."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value = float(budget)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"budget must look like '100MB', '64MiB' or a number of bytes, got {budget!r}")
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"budget must be > 0 bytes, got {budget!r}")
    return int(value)


def format_bytes(n):
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass
class MemberPlan:
    """One layer of the plan: which features it serves and how it is constructed."""

    method: str
    class_name: str
    features: list
    kwargs: dict
    logical_parameters: int
    physical_parameters: int
    shared: bool  # True when the features share one array (ROBE): no per-feature physical size exists
    # Size once deployed, when it differs from the trained size: MLET trains n*k + k*d floats, folds to n*d.
    folded_parameters: int = None

    @property
    def deployed_parameters(self):
        return self.physical_parameters if self.folded_parameters is None else self.folded_parameters


# A planner maps (cardinalities of its features, output_dim, compression for them, options) to
# (layer class name, constructor kwargs, shared?). `compression` is None for uncompressed methods.
_PLANNERS = {}


def register_method(name, planner):
    """Make `make_plan(..., method=name)` available."""
    _PLANNERS[name] = planner


def _layer_class(class_name):
    from tfcompress import layers

    return getattr(layers, class_name)


def _plan_full(cardinalities, output_dim, compression, options):
    return "FullEmbedding", dict(options), False


def _plan_robe(cardinalities, output_dim, compression, options):
    memory_size = math.floor(sum(cardinalities) * output_dim / compression)
    return "RobeEmbedding", dict(options, memory_size=memory_size), True


def _plan_hashing(cardinalities, output_dim, compression, options):
    return "HashingTrickEmbedding", dict(options, compression=compression), False


def _plan_qr(cardinalities, output_dim, compression, options):
    return "QREmbedding", dict(options, compression=compression), False


def _plan_mlet(cardinalities, output_dim, compression, options):
    # The ratio or budget is met by the DEPLOYED (folded) size: hash the tables to n / compression rows; the
    # k-wide training tables are temporary. compression 1 (ratio 1) means no hashing.
    hashing = {} if compression is None or compression <= 1.0 else {"compression": compression}
    return "MLETEmbedding", dict(options, **hashing), False


def _plan_pruned(cardinalities, output_dim, compression, options):
    # The budget is the chunk pool (the live chunks); address table and utilities are bookkeeping on top.
    return "ChunkPrunedEmbedding", dict(options, budget=1.0 / compression), False


def _plan_learned_hash(cardinalities, output_dim, compression, options):
    # Sizes come from the mappings (`tfcompress learn-hash` writes them and a ratio that matches), not from
    # `compression`: the clustering already decided how many rows each table gets.
    if "mappings" not in options:
        raise ValueError("method 'learned_hash' needs the option mappings = \"<file>.npz\" (made by "
                         "`tfcompress learn-hash`)")
    return "LearnedHashEmbedding", dict(options), False


register_method("full", _plan_full)
register_method("robe", _plan_robe)
register_method("hashing", _plan_hashing)
register_method("qr", _plan_qr)
register_method("mlet", _plan_mlet)
register_method("pruned", _plan_pruned)
register_method("learned_hash", _plan_learned_hash)


def methods():
    return sorted(_PLANNERS)


def _member(method, features, cardinalities, output_dim, compression, options):
    cards = [cardinalities[f] for f in features]
    class_name, kwargs, shared = _PLANNERS[method](cards, output_dim, compression, options)
    kwargs = dict(kwargs, cardinalities=cards, output_dim=output_dim)
    try:
        layer = _layer_class(class_name)(**kwargs)  # validates every option now, not at training time
    except TypeError as error:  # Keras 3 raises ValueError for unknown keywords, tf_keras TypeError
        raise ValueError(f"method {method!r}: bad option ({error})") from None
    return MemberPlan(method, class_name, list(features), kwargs, layer.logical_parameters,
                      layer.physical_parameters, shared, getattr(layer, "folded_parameters", None))


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
        from tfcompress.layers import PlannedEmbedding

        groups = [
            {"features": m.features, "layer": _layer_class(m.class_name)(name=f"{name}_{m.method}_{i}", **m.kwargs)}
            for i, m in enumerate(self.members)
        ]
        out_of_range = self.members[-1].kwargs.get("out_of_range", "error")
        return PlannedEmbedding(len(self.cardinalities), self.output_dim, groups, out_of_range, name=name)

    def summary(self):
        """A table of logical vs physical parameters and bytes per feature and in total."""
        lines = [f"{'feature':>7} {'rows':>12} {'method':>8} {'logical params':>15} {'physical params':>16} "
                 f"{'physical bytes':>15}"]
        owner = {f: m for m in self.members for f in m.features}
        for f, n in enumerate(self.cardinalities):
            m = owner[f]
            logical = n * self.output_dim
            if m.shared:
                physical, physical_bytes = "shared", "shared"
            else:
                rows_share = logical / m.logical_parameters
                physical_count = round(m.physical_parameters * rows_share) if len(m.features) > 1 else m.physical_parameters
                physical, physical_bytes = f"{physical_count:,}", format_bytes(physical_count * BYTES_PER_PARAMETER)
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
    from tfcompress.layers.base import check_cardinalities

    cardinalities = check_cardinalities(cardinalities)
    if method not in _PLANNERS:
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
