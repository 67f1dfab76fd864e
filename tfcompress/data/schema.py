"""schema.json: what the columns of a TFRecord dataset are (docs/tfrecord_layout.md).

Every dataset directory holds one `schema.json` next to (or one level above) its shards. Readers take the column
counts from it, models take the table sizes from it, so it is the one place a dataset describes itself.

Example:
    >>> schema = Schema(name="toy", dense_names=["I1"], sparse_names=["C1", "C2"], cardinalities=[10, 3])
    >>> schema.n_dense, schema.n_sparse
    (1, 2)
"""

import dataclasses
import json
import os

SCHEMA_FILENAME = "schema.json"


@dataclasses.dataclass
class Schema:
    """Column names and table sizes of one dataset.

    Args:
        name: dataset name, e.g. "criteo", "avazu".
        label: name of the 0/1 label column (the TFRecord key is always `label`).
        dense_names: names of the dense columns, in the order of the `dense` float vector.
        sparse_names: names of the categorical columns, in the order of the `sparse` int64 vector.
        cardinalities: one table size per sparse column; ids of column f lie in [0, cardinalities[f]).
        dense_transform: what was applied to the raw dense values before writing, e.g. "log1p".
        encoding: how the categorical ids were made, e.g. "synthetic", "vocabulary", "hash".
        extra: free-form JSON-serializable details (generator options, source files, ...).
        multi_fields: multi-valued categorical columns, each {"name", "cardinality", "delimiter"}: written as a
            variable-length int64 feature under its name, ids in [0, cardinality); `read()` returns it as
            `features[name]`, a RaggedTensor [B, None] (docs/tfrecord_layout.md, "Multi-valued fields"). Left out of
            schema.json when empty, so schemas without such columns keep their bytes.
    """

    name: str
    label: str = "label"
    dense_names: list = dataclasses.field(default_factory=list)
    sparse_names: list = dataclasses.field(default_factory=list)
    cardinalities: list = dataclasses.field(default_factory=list)
    dense_transform: str = "none"
    encoding: str = "unknown"
    extra: dict = dataclasses.field(default_factory=dict)
    multi_fields: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        # Plain Python types so that the schema is JSON and compares equal after a round trip.
        self.dense_names = [str(n) for n in self.dense_names]
        self.sparse_names = [str(n) for n in self.sparse_names]
        self.cardinalities = [int(c) for c in self.cardinalities]
        if len(self.cardinalities) != len(self.sparse_names):
            raise ValueError(
                f"cardinalities must have one entry per sparse column ({len(self.sparse_names)}), "
                f"got {len(self.cardinalities)}"
            )
        for name, card in zip(self.sparse_names, self.cardinalities):
            if card < 1:
                raise ValueError(f"cardinality of sparse column {name!r} must be >= 1, got {card}")
        for kind, names in (("dense", self.dense_names), ("sparse", self.sparse_names)):
            if len(set(names)) != len(names):
                raise ValueError(f"{kind}_names must be unique, got {names}")
        self.multi_fields = [_multi_field(field) for field in self.multi_fields]
        names = self.multi_names
        clashing = sorted(set(names) & {"dense", "label", "sparse"})
        if len(set(names)) != len(names) or clashing or set(names) & set(self.sparse_names):
            raise ValueError(f"multi_fields names must be unique, differ from sparse_names and from the record keys "
                             f"dense/label/sparse, got {names}")

    @property
    def multi_names(self):
        """Names of the multi-valued columns, in order (each a RaggedTensor `features[name]` from `read()`)."""
        return [field["name"] for field in self.multi_fields]

    @property
    def table_names(self):
        """Every embedding table's name: the sparse columns, then the multi-valued ones."""
        return self.sparse_names + self.multi_names

    def require_no_multi_fields(self, what):
        """Raise a ValueError naming the multi-valued columns when `what` (e.g. "the fixed-width reader") cannot
        consume them: nothing drops them silently."""
        if self.multi_fields:
            raise ValueError(f"{what} cannot consume the multi-valued fields {self.multi_names} of schema "
                             f"{self.name!r} (variable-length features); "
                             "use read() with fixed_width=False, or a model with a ragged input for each")

    @property
    def n_dense(self):
        return len(self.dense_names)

    @property
    def n_sparse(self):
        return len(self.sparse_names)

    def to_dict(self):
        data = dataclasses.asdict(self)
        if not data["multi_fields"]:
            del data["multi_fields"]  # schemas without multi-valued columns keep the bytes they had
        return data

    def save(self, path_or_dir):
        """Write schema.json (sorted keys, so equal schemas give equal bytes); returns the file path.

        Args:
            path_or_dir: a directory (schema.json is written inside it) or a file path ending in .json.
        """
        path = _schema_path_for_write(path_or_dir)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, sort_keys=True, indent=2)
            f.write("\n")
        os.replace(tmp, path)  # readers never see a half-written schema
        return path

    @classmethod
    def from_dict(cls, data, source="<dict>"):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"schema {source} has unknown keys {unknown}; allowed keys are {sorted(fields)}")
        if "name" not in data:
            raise ValueError(f"schema {source} has no 'name'")
        return cls(**data)

    @classmethod
    def load(cls, path_or_dir):
        """Read schema.json from a file path, or from a directory (looked up in it, then in its parent).

        The parent lookup lets a reader given `data/train/` find `data/schema.json`.

        Raises:
            FileNotFoundError: no schema.json where it was looked for (the message names the paths).
            ValueError: the file is not valid JSON or not a schema (the message names the file).
        """
        path = find_schema(path_or_dir)
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"schema file {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"schema file {path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data, source=path)
        except TypeError as e:
            raise ValueError(f"schema file {path} is malformed: {e}") from e


def _multi_field(field):
    """A checked {"name", "cardinality", "delimiter"} entry of `Schema.multi_fields`."""
    if not isinstance(field, dict) or set(field) != {"name", "cardinality", "delimiter"}:
        raise ValueError(f"each multi_fields entry must be {{'name', 'cardinality', 'delimiter'}}, got {field!r}")
    name, cardinality, delimiter = field["name"], field["cardinality"], field["delimiter"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"multi_fields: name must be a non-empty string, got {name!r}")
    if isinstance(cardinality, bool) or not isinstance(cardinality, int) or cardinality < 1:
        raise ValueError(f"multi_fields: cardinality of {name!r} must be an integer >= 1, got {cardinality!r}")
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ValueError(f"multi_fields: delimiter of {name!r} must be one character, got {delimiter!r}")
    return {"name": name, "cardinality": int(cardinality), "delimiter": delimiter}


def find_schema(path_or_dir):
    """The schema.json a path refers to: the file itself, <dir>/schema.json, or <dir>/../schema.json."""
    path_or_dir = os.fspath(path_or_dir)
    if os.path.isdir(path_or_dir):
        candidates = [
            os.path.join(path_or_dir, SCHEMA_FILENAME),
            os.path.join(os.path.dirname(os.path.abspath(path_or_dir)), SCHEMA_FILENAME),
        ]
    else:
        candidates = [path_or_dir]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no {SCHEMA_FILENAME} found; looked for {' and '.join(candidates)}")


def _schema_path_for_write(path_or_dir):
    path_or_dir = os.fspath(path_or_dir)
    if path_or_dir.endswith(".json"):
        return path_or_dir
    return os.path.join(path_or_dir, SCHEMA_FILENAME)
