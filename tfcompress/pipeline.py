"""Pipeline configs: one TOML file = data + model + compression + training, validated into dataclasses.

Example pipeline (every key but the section headers is optional; defaults below)::

    name = "synthetic_dlrm_robe"         # default: the file name without .toml; names runs/<name>/

    [data]
    source = "synthetic"                 # or "tfrecord"
    dataset = "criteo"                   # "criteo" | "avazu" (synthetic only)
    rows = 1000000                       # synthetic: training rows
    eval_rows = 100000                   # synthetic: evaluation rows
    seed = 0                             # synthetic: generator seed
    cardinality_scale = 1.0              # synthetic: multiplies the default table sizes
    path = "data/synthetic_criteo"       # synthetic: where the data is generated (reused when options match)
    # tfrecord only: train = "data/criteo/train", eval = "data/criteo/eval" (a directory, a glob, or a list)
    # schema = "data/criteo"             # tfrecord: schema.json or its directory (default: found from `train`)

    [model]
    arch = "dlrm"                        # or "dcn"
    embedding_dim = 16
    bottom_mlp = [512, 256]              # dlrm: hidden widths; a layer of width embedding_dim is appended
    top_mlp = [512, 256]                 # dlrm
    cross_layers = 3                     # dcn
    deep_layers = [512, 256]             # dcn
    # projection_dim = 64                # dcn: low-rank cross layers
    structure = "stacked"                # dcn: "stacked" or "parallel"

    [compression]                        # passed to tfcompress.plan.make_plan
    method = "robe"
    ratio = 1000.0                       # or budget = "100MB"
    uncompressed_below = 0
    chunk_size = 4                       # any other key is a method option (chunk_size, signed, seed, ...)

    [train]
    optimizer = "sgd"                    # "sgd" | "adagrad" | "adam" | "lazy_adam"
    learning_rate = 0.5
    batch_size = 2048                    # per replica: the global batch is batch_size x replicas
    epochs = 1
    # steps_per_epoch = 100              # default: one pass over the training data
    eval_batch_size = 16384
    seed = 0
    save_model = true                    # write runs/<name>/model.keras
    strategy = "default"                 # "mirrored" (local GPUs / --cpu-replicas) | "multiworker" (TF_CONFIG)
    deterministic = false                # fixed reader order: same seed, same batches
    cluster_timeout_s = 300.0            # multiworker: a worker unreachable (or no step) this long fails the job
    # checkpoint_every_steps = 1000      # crash-safe: checkpoints every N steps and at epoch end
    # backup_dir = "runs/<name>/backup"  # where those checkpoints go; a rerun resumes from them (exactly
    #                                    # where it stopped with deterministic = true); a directory of
    #                                    # tfcompress's own (marked, locked), deleted once the run is saved
    restore_best = false                 # save (and report) the weights of the epoch with the best eval AUC
    # patience = 2                       # stop after 2 epochs without a better eval AUC

Relative paths are relative to the working directory. Unknown keys and wrong types raise ValueError naming the
file, the section and the key; so do [compression] keys that the method does not take (checked against the
method's layer here, before any data is made). Overrides "section.key=value" (the CLI's --set) are applied before
validation; the value is read as a TOML value when it parses as one (0.1, [64, 32], true, "x"), else as a plain
string.
"""

import dataclasses
import json
import math
import numbers
import os
import tomllib

from tfcompress.plan import check_method_options, methods

SECTIONS = ("data", "model", "compression", "train")
TOP_LEVEL_KEYS = ("name", "description")


def _option(default, kind, choices=None, minimum=None):
    """A dataclass field with what validation needs: its kind, allowed values and minimum."""
    return dataclasses.field(default=default, metadata={"kind": kind, "choices": choices, "minimum": minimum})


@dataclasses.dataclass
class DataConfig:
    source: str = _option("synthetic", "str", choices=("synthetic", "tfrecord"))
    dataset: str = _option("criteo", "str", choices=("criteo", "avazu"))
    rows: int = _option(1_000_000, "int", minimum=1)
    eval_rows: int = _option(100_000, "int", minimum=1)
    seed: int = _option(0, "int", minimum=0)
    cardinality_scale: float = _option(1.0, "float")
    path: str = _option(None, "str")
    train: list = _option(None, "paths")
    eval: list = _option(None, "paths")
    schema: str = _option(None, "str")

    def synthetic_path(self):
        """Where synthetic data is generated: `path`, or a name under data/ that spells out the options."""
        if self.path:
            return self.path
        return os.path.join(
            "data", f"synthetic_{self.dataset}_rows{self.rows}_eval{self.eval_rows}_seed{self.seed}"
            f"_scale{self.cardinality_scale:g}"
        )


@dataclasses.dataclass
class ModelConfig:
    arch: str = _option("dlrm", "str", choices=("dlrm", "dcn"))
    embedding_dim: int = _option(16, "int", minimum=1)
    bottom_mlp: list = _option((512, 256), "int_list")
    top_mlp: list = _option((512, 256), "int_list")
    cross_layers: int = _option(3, "int", minimum=0)
    deep_layers: list = _option((512, 256), "int_list")
    projection_dim: int = _option(None, "int", minimum=1)
    structure: str = _option("stacked", "str", choices=("stacked", "parallel"))


@dataclasses.dataclass
class CompressionConfig:
    method: str = _option("robe", "str")
    ratio: float = _option(None, "float")
    budget: object = _option(None, "bytes")
    uncompressed_below: int = _option(0, "int", minimum=0)
    # method "pruned": steps between pruning events (tfcompress.ChunkPruningCallback's period).
    pruning_period: int = _option(None, "int", minimum=1)
    # Every other key of [compression]: options of the method's layer, checked by make_plan.
    options: dict = dataclasses.field(default_factory=dict, metadata={"kind": "rest"})

    def plan_kwargs(self):
        """Keyword arguments of `tfcompress.plan.make_plan` (besides cardinalities and output_dim)."""
        kwargs = dict(self.options, method=self.method, uncompressed_below=self.uncompressed_below)
        if self.method != "full":
            kwargs.update(ratio=self.ratio, budget=self.budget)
        return kwargs


@dataclasses.dataclass
class TrainConfig:
    optimizer: str = _option("sgd", "str", choices=("sgd", "adagrad", "adam", "lazy_adam"))
    learning_rate: float = _option(0.1, "float")
    batch_size: int = _option(2048, "int", minimum=1)
    epochs: int = _option(1, "int", minimum=1)
    steps_per_epoch: int = _option(None, "int", minimum=1)
    eval_batch_size: int = _option(16384, "int", minimum=1)
    seed: int = _option(0, "int", minimum=0)
    save_model: bool = _option(True, "bool")
    # TensorBoard logs under runs/<name>/tensorboard: loss, AUC, log loss, embedding bytes, ratio, samples/s.
    tensorboard: bool = _option(True, "bool")
    # tf.distribute: "default" (one device), "mirrored" (all local GPUs, or the logical CPUs of --cpu-replicas),
    # "multiworker" (MultiWorkerMirroredStrategy from TF_CONFIG). batch_size is per replica.
    strategy: str = _option("default", "str", choices=("default", "mirrored", "multiworker"))
    # Fixed reader order (a little slower): the same seed gives the same batches on every run.
    deterministic: bool = _option(False, "bool")
    # Multi-worker: seconds to wait for every worker of TF_CONFIG to be reachable and for each training step
    # (a collective across workers) to finish; past it the job fails with a message naming the unreachable
    # workers instead of hanging.
    cluster_timeout_s: float = _option(300.0, "float", minimum=1.0)
    # Crash-safe training: checkpoints every N steps (and at epoch end) to backup_dir (default runs/<name>/backup,
    # a directory tfcompress makes, marks and locks); a rerun of the same pipeline resumes from the last one.
    checkpoint_every_steps: int = _option(None, "int", minimum=1)
    backup_dir: str = _option(None, "str")
    # Best epoch on the eval AUC (Keras' val_auc, every epoch): restore_best saves and reports the best epoch's
    # weights instead of the last's; patience stops training after that many epochs without a better one.
    restore_best: bool = _option(False, "bool")
    patience: int = _option(None, "int", minimum=1)


_SECTION_CLASSES = {"data": DataConfig, "model": ModelConfig, "compression": CompressionConfig, "train": TrainConfig}


@dataclasses.dataclass
class Pipeline:
    """A validated pipeline. `source` is the file it came from (or "<dict>"), `overrides` the --set strings."""

    name: str
    data: DataConfig
    model: ModelConfig
    compression: CompressionConfig
    train: TrainConfig
    description: str = ""
    source: str = "<dict>"
    overrides: tuple = ()

    def to_dict(self):
        return dataclasses.asdict(self)


def load_pipeline(path, overrides=()):
    """Read, override and validate a pipeline TOML file.

    Args:
        path: the .toml file.
        overrides: strings "section.key=value" (or "name=value") applied before validation.

    Raises:
        FileNotFoundError: no such file.
        ValueError: invalid TOML, an unknown section or key, a wrong type or value, or a malformed override; the
            message names the file, the section and the key.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pipeline file {path} does not exist")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: invalid TOML: {error}") from None
    default_name = os.path.splitext(os.path.basename(path))[0]
    return pipeline_from_dict(raw, source=path, overrides=overrides, default_name=default_name)


def pipeline_from_dict(raw, source="<dict>", overrides=(), default_name="pipeline"):
    """Validate a parsed pipeline (the dict `tomllib` returns); see `load_pipeline`."""
    raw = apply_overrides(raw, overrides, source)
    unknown = sorted(set(raw) - set(SECTIONS) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(
            f"{source}: unknown top-level key or section {unknown[0]!r}; allowed: sections "
            f"{list(SECTIONS)} and keys {list(TOP_LEVEL_KEYS)}"
        )
    sections = {}
    for section in SECTIONS:
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"{source}: [{section}] must be a table (a [{section}] section), got {table!r}")
        sections[section] = _section_from_dict(_SECTION_CLASSES[section], table, source, section)
    name = raw.get("name", default_name)
    description = raw.get("description", "")
    for key, value in (("name", name), ("description", description)):
        if not isinstance(value, str):
            raise ValueError(f"{source}: top-level key {key!r} must be a string, got {value!r}")
    if not name or os.sep in name or name in (".", ".."):
        raise ValueError(f"{source}: name must be a non-empty file name (it names runs/<name>/), got {name!r}")
    pipeline = Pipeline(name=name, description=description, source=source, overrides=tuple(overrides), **sections)
    _check_consistency(pipeline)
    return pipeline


def parse_override(override):
    """'section.key=value' -> (section, key, value); 'name=value' -> (None, 'name', value).

    The value is read as a TOML value when it parses as one (numbers, booleans, lists, quoted strings), otherwise
    it is taken as a plain string, so `compression.method=full` and `compression.budget=100MB` need no quotes.
    """
    if not isinstance(override, str) or "=" not in override:
        raise ValueError(f"override must look like section.key=value, got {override!r}")
    target, text = override.split("=", 1)
    parts = target.strip().split(".")
    if len(parts) == 1 and parts[0] in TOP_LEVEL_KEYS:
        section, key = None, parts[0]
    elif len(parts) == 2 and all(parts):
        section, key = parts
    else:
        raise ValueError(f"override must look like section.key=value, got {override!r}")
    try:
        value = tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return section, key, value


def apply_overrides(raw, overrides, source="<dict>"):
    """A copy of the raw pipeline dict with the overrides applied (unknown sections are rejected).

    Setting one of compression.ratio / compression.budget removes the other, so a ratio pipeline can be rerun
    with a budget from the command line.
    """
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for override in overrides:
        section, key, value = parse_override(override)
        if section is None:
            raw[key] = value
            continue
        if section not in SECTIONS:
            raise ValueError(f"{source}: override {override!r}: unknown section [{section}]; allowed {list(SECTIONS)}")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"{source}: [{section}] must be a table, got {table!r}")
        if section == "compression" and key in ("ratio", "budget"):
            table.pop("budget" if key == "ratio" else "ratio", None)
        table[key] = value
    return raw


def raw_pipeline(pipeline):
    """The pipeline as a raw dict (as `tomllib` reads it): its TOML file with the --set overrides applied, or,
    for a pipeline not read from a file, its validated values."""
    if os.path.isfile(pipeline.source):
        with open(pipeline.source, "rb") as f:
            return apply_overrides(tomllib.load(f), pipeline.overrides, pipeline.source)
    raw = pipeline.to_dict()
    for key in ("source", "overrides"):
        raw.pop(key)
    raw["compression"] = dict(raw["compression"].pop("options"), **raw["compression"])
    return raw


def pipeline_toml(raw, comment=None):
    """A raw pipeline dict written as TOML: top-level keys first, then one table per section; None values are
    left out. Values may be strings, booleans, numbers (NumPy's too) and lists of them.

    Args:
        raw: the dict.
        comment: an optional first line (without the "# ").
    """
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, numbers.Integral):  # NumPy integers register as Integral, NumPy floats as Real
            return str(int(v))
        if isinstance(v, numbers.Real):
            return repr(float(v))
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise ValueError(f"cannot write {v!r} ({type(v).__name__}) as a TOML value")

    lines = [f"# {comment}", ""] if comment else []
    lines += [f"{k} = {value(v)}" for k, v in raw.items() if not isinstance(v, dict) and v is not None]
    for section, table in raw.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def _section_from_dict(cls, table, source, section):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    rest_field = next((f.name for f in fields.values() if f.metadata.get("kind") == "rest"), None)
    known = {name for name, f in fields.items() if f.metadata.get("kind") != "rest"}
    values, rest = {}, {}
    for key, value in table.items():
        if key in known:
            values[key] = _check_value(value, fields[key].metadata, source, section, key)
        elif rest_field is not None:
            if isinstance(value, dict):
                raise ValueError(f"{source}: [{section}] {key}: method options must be plain values, got a table")
            rest[key] = value
        else:
            raise ValueError(f"{source}: [{section}] unknown key {key!r}; allowed keys: {sorted(known)}")
    if rest_field is not None:
        values[rest_field] = rest
    return cls(**values)


def _check_value(value, spec, source, section, key):
    """The value converted to its field's kind, or a ValueError naming file, section and key."""
    kind, choices, minimum = spec["kind"], spec.get("choices"), spec.get("minimum")
    where = f"{source}: [{section}] {key}"

    def fail(expected):
        raise ValueError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")

    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            fail("a string")
    elif kind == "bool":
        if not isinstance(value, bool):
            fail("true or false")
    elif kind == "int_list":
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            fail("a list of positive integers such as [512, 256]")
        value = tuple(value)
    elif kind == "paths":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            fail("a path or glob, or a non-empty list of them")
    elif kind == "bytes":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            fail("a byte budget such as \"100MB\" or a number of bytes")
    else:  # pragma: no cover - a programming error in the field table
        raise AssertionError(f"unknown field kind {kind!r}")
    if choices is not None and value not in choices:
        raise ValueError(f"{where}: must be one of {list(choices)}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: must be >= {minimum}, got {value!r}")
    return value


def _check_consistency(pipeline):
    """Checks that span keys: what each data source needs, ratio vs budget."""
    source, data, compression = pipeline.source, pipeline.data, pipeline.compression

    if compression.method not in methods():
        raise ValueError(f"{source}: [compression] method: must be one of {methods()}, got {compression.method!r}")
    try:
        check_method_options(compression.method, compression.options)
    except ValueError as error:  # its message starts with the key
        raise ValueError(f"{source}: [compression] {error}") from None
    if data.source == "tfrecord":
        for key in ("train", "eval"):
            if getattr(data, key) is None:
                raise ValueError(f"{source}: [data] {key}: required when source = \"tfrecord\" (a directory or glob)")
    else:
        for key in ("train", "eval", "schema"):
            if getattr(data, key) is not None:
                raise ValueError(f"{source}: [data] {key}: only used when source = \"tfrecord\"; remove it")
        if not data.cardinality_scale > 0:
            raise ValueError(f"{source}: [data] cardinality_scale: must be > 0, got {data.cardinality_scale!r}")
    if compression.method != "full" and (compression.ratio is None) == (compression.budget is None):
        raise ValueError(
            f"{source}: [compression] method {compression.method!r} needs exactly one of ratio or budget"
        )
    if compression.ratio is not None and not compression.ratio >= 1:
        raise ValueError(
            f"{source}: [compression] ratio: must be >= 1 (1000 = 1000x smaller), got {compression.ratio!r}"
        )
    if not (pipeline.train.learning_rate > 0 and math.isfinite(pipeline.train.learning_rate)):
        raise ValueError(f"{source}: [train] learning_rate: must be a finite number > 0, got "
                         f"{pipeline.train.learning_rate!r}")
