"""Raw click-log formats -> label / dense / categorical-key columns, with a rejection reason for every bad row.

Formats (`layout_for_format`):

- `criteo-tsv`: Criteo Terabyte `day_N` files and Criteo Kaggle `train.txt`: tab-separated, no header, label,
  I1..I13 (integers), C1..C26 (8 hex digits); any field may be empty.
- `criteo-csv`: the same 40 columns comma-separated, with a header `label,I1..I13,C1..C26`.
- `avazu-csv`: header `id,click,hour,C1,banner_pos,...,C21`; `click` is the label, `id` is dropped, `hour`
  (YYMMDDHH) becomes the categorical features `hour_of_day` (0..23) and `weekday` (0 = Monday .. 6).
- `csv`: any delimited click log described by a schema TOML file (`layout_from_schema_file`).
- `parquet`: Criteo columns (or a schema's) from Parquet files, e.g. Spark/NVTabular output (`parse_record_batch`).

Text is parsed a block of complete lines at a time with NumPy (no Python loop per row): delimiter positions give
the field boundaries, integers and hex digits are folded position by position over all fields at once. Rows are
rejected, never dropped silently, for one reason each (the first that applies, in this order):

    empty_line, wrong_column_count, bad_label, non_numeric_dense, bad_hex, bad_categorical, bad_hour,
    bad_split_value, dense_overflow, dense_log1p_domain

Values: label must be exactly "0" or "1", unless the schema maps it (`LabelRule`: a threshold on a number, or a
list of values that count as positive). Dense fields are integers (fast path) or anything Python's float()
reads that is finite; empty -> 0. With `dense_options` (what the converter passes) the dense values are also
transformed as written (negative -> 0, log1p, float32) and a row whose value does not fit float32 (beyond
+-3.4e38: `dense_overflow`) or lies outside log1p's domain (<= -1 with negatives kept: `dense_log1p_domain`) is
rejected instead of being written as inf / NaN. The `--split-column` of a by-column split must be a finite number
(`bad_split_value` otherwise). Categorical fields become uint64 keys (see `tfcompress.data.encoding`); empty ->
MISSING_KEY. Fields are taken literally: CSV quoting is not interpreted (a quoted field that holds the delimiter
gives a wrong column count and is quarantined, not mis-read).

Example:
    >>> layout = layout_for_format("criteo-tsv")
    >>> parsed = parse_text_block(b"1\\t5" + b"\\t" * 12 + b"\\t68fd1e64" + b"\\t" * 25 + b"\\n", layout,
    ...                           layout.column_map(), first_line=1)
    >>> parsed.label.tolist(), parsed.dense[0].tolist()[:2], hex(int(parsed.keys[0, 0]))
    ([1], [5.0, 0.0], '0x68fd1e64')
"""

import dataclasses
import json
import math
import tomllib

import numpy as np

from tfcompress.data.encoding import MISSING_KEY, gather_tokens, hex_keys, string_keys

FORMATS = ("criteo-tsv", "criteo-csv", "avazu-csv", "csv", "parquet")
# New reasons go at the end: the codes (1-based positions) are part of the raw serving signature's output.
REJECT_REASONS = ("empty_line", "wrong_column_count", "bad_label", "non_numeric_dense", "bad_hex",
                  "bad_categorical", "bad_hour", "bad_split_value", "dense_overflow", "dense_log1p_domain")
_REASON_CODE = {reason: code for code, reason in enumerate(REJECT_REASONS, start=1)}
SPARSE_KINDS = ("hex", "string", "hour_of_day", "weekday")
DERIVED_CARDINALITY = {"hour_of_day": 24, "weekday": 7}

CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = ["label"] + CRITEO_DENSE + CRITEO_SPARSE
AVAZU_CATEGORICAL = [
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model", "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18",
    "C19", "C20", "C21",
]
AVAZU_COLUMNS = ["id", "click", "hour"] + AVAZU_CATEGORICAL

_MAX_FAST_DIGITS = 18  # 10^18 < 2^63: integers this long sum in int64 without overflow
_POW10 = 10 ** np.arange(_MAX_FAST_DIGITS, dtype=np.int64)


class FormatError(ValueError):
    """A problem with a whole input (header, schema, column types), as opposed to one bad row."""


@dataclasses.dataclass(frozen=True)
class LabelRule:
    """How a schema's label column becomes the 0/1 label (schema TOML `label = {source = ..., ...}`).

    Exactly one of:
        threshold: label = 1 when the field is a number >= threshold, else 0 (e.g. ratings 1-5, threshold 4).
        positive: label = 1 when the field is exactly one of these strings (bytes compared), else 0.

    An empty field, or a non-number under `threshold`, is rejected as `bad_label` (never read as 0).
    """

    threshold: float = None
    positive: tuple = None

    def describe(self):
        """JSON-able form (schema.json `extra.label_rule`)."""
        if self.threshold is not None:
            return {"threshold": self.threshold}
        return {"positive": [p.decode("utf-8") for p in self.positive]}


@dataclasses.dataclass(frozen=True)
class DenseOptions:
    """The dense transform the converter applies before writing (`transform_dense`)."""

    clip_negative: bool = True
    transform: str = "none"


@dataclasses.dataclass(frozen=True)
class SparseColumn:
    """One categorical output feature.

    Args:
        name: feature name in schema.json (e.g. "C1", "hour_of_day").
        source: input column it is read from (e.g. "C1", "hour").
        kind: "hex" (hex digits -> value), "string" (stable hash of the bytes), "hour_of_day" / "weekday"
            (derived from a YYMMDDHH column).
        multi: None (one value per field), or the one-byte delimiter of a multi-valued field ("Action|Comedy" is
            two tokens, each a "string" key; an empty field is no token). Multi-valued columns sit in
            `Layout.multi`, never in `Layout.sparse`.
    """

    name: str
    source: str
    kind: str
    multi: bytes = None


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one format's lines map to label / dense / categorical columns.

    Args:
        name: dataset name written to schema.json ("criteo", "avazu", or the schema's name).
        format: one of FORMATS.
        delimiter: field separator (one byte).
        header: True when every file starts with a header line naming its columns.
        columns: the column names of a line, in order, for files without a header (None: read from the header).
        label: label column name.
        dense: dense column names (output order).
        sparse: SparseColumn per categorical output feature (output order).
        dense_transform: default dense transform of the format ("log1p" or "none").
        default_encoding: default categorical encoding of the format.
        label_rule: None (the label field must be "0" or "1") or a `LabelRule` mapping it to 0/1.
        split_column: a column read for a by-column split (set by the converter from --split-column; it need not
            be a feature column, and is not one unless the schema also names it).
        multi: SparseColumn per multi-valued categorical feature (output order; each has a `multi` delimiter).
            They are written as variable-length features (docs/tfrecord_layout.md, "Multi-valued fields").
    """

    name: str
    format: str
    delimiter: bytes
    header: bool
    columns: tuple
    label: str
    dense: tuple
    sparse: tuple
    dense_transform: str = "none"
    default_encoding: str = "hash"
    label_rule: object = None
    split_column: str = None
    multi: tuple = ()

    @property
    def sparse_names(self):
        return [column.name for column in self.sparse]

    @property
    def multi_names(self):
        return [column.name for column in self.multi]

    @property
    def tables(self):
        """Every categorical column, one embedding table each: the single-valued ones, then the multi-valued."""
        return tuple(self.sparse) + tuple(self.multi)

    def required_columns(self):
        sources = [self.label] + list(self.dense) + [column.source for column in self.sparse]
        sources += [column.source for column in self.multi]
        if self.split_column is not None:
            sources.append(self.split_column)
        return list(dict.fromkeys(sources))

    def column_map(self, header_names=None, source="<input>"):
        """ColumnMap of this layout for a file whose header is `header_names` (None for header-less formats).

        Raises:
            FormatError: a required column is missing from the header (naming the file and the columns).
        """
        names = list(self.columns) if header_names is None else [str(n) for n in header_names]
        if header_names is not None and len(set(names)) != len(names):
            duplicated = sorted({n for n in names if names.count(n) > 1})
            raise FormatError(f"{source}: header has duplicate columns {duplicated}")
        index = {name: i for i, name in enumerate(names)}
        missing = [name for name in self.required_columns() if name not in index]
        if missing:
            raise FormatError(f"{source}: the {self.format} header lacks columns {missing}; it has {names}")
        return ColumnMap(
            n_columns=len(names),
            label=index[self.label],
            dense=tuple(index[name] for name in self.dense),
            sparse=tuple(index[column.source] for column in self.sparse),
            split=None if self.split_column is None else index[self.split_column],
            multi=tuple(index[column.source] for column in self.multi),
        )


@dataclasses.dataclass(frozen=True)
class ColumnMap:
    """Field positions of a layout's columns within a line of one file."""

    n_columns: int
    label: int
    dense: tuple
    sparse: tuple
    split: int = None
    multi: tuple = ()


@dataclasses.dataclass
class Parsed:
    """Parsed rows of one block, in input order, plus the rejected lines.

    Attributes:
        label: int64 [G] (0/1) of the good rows.
        dense: float64 [G, n_dense], empty fields as 0 (no clipping or transform yet).
        keys: uint64 [G, n_sparse] (derived features hold their small integer value).
        line: int64 [G], 1-based line (or row) number of each good row in its file.
        rejected: list of (line number, reason, raw bytes) of the bad rows.
        n_read: rows read in the block (good + rejected).
        split_value: float64 [G], the split column's value of each good row (None without a split column).
        multi: per multi-valued column (`Layout.multi`), (keys uint64 [T], row_lengths int64 [G]): the tokens of
            the good rows end to end, and how many belong to each row (0 for an empty field).

    With `dense_options`, `dense` is float32, transformed as written (`transform_dense`).
    """

    label: np.ndarray
    dense: np.ndarray
    keys: np.ndarray
    line: np.ndarray
    rejected: list
    n_read: int
    split_value: np.ndarray = None
    multi: list = dataclasses.field(default_factory=list)

    @property
    def n_good(self):
        return int(self.label.shape[0])


# ---- layouts -------------------------------------------------------------------------------------------------


def criteo_layout(format_name, delimiter, header):
    return Layout(
        name="criteo", format=format_name, delimiter=delimiter, header=header,
        columns=None if header else tuple(CRITEO_COLUMNS), label="label", dense=tuple(CRITEO_DENSE),
        sparse=tuple(SparseColumn(name, name, "hex") for name in CRITEO_SPARSE),
        dense_transform="log1p", default_encoding="hex-mod",
    )


def avazu_layout():
    sparse = [SparseColumn(name, name, "string") for name in AVAZU_CATEGORICAL]
    sparse += [SparseColumn("hour_of_day", "hour", "hour_of_day"), SparseColumn("weekday", "hour", "weekday")]
    return Layout(name="avazu", format="avazu-csv", delimiter=b",", header=True, columns=None, label="click",
                  dense=(), sparse=tuple(sparse), dense_transform="none", default_encoding="hash")


def layout_for_format(format_name, schema_path=None):
    """The Layout of a format name; `csv` needs `schema_path`, `parquet` takes one optionally (else Criteo's).

    Raises:
        ValueError: an unknown format, or a schema given where it means nothing / missing where it is needed.
    """
    if format_name not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format_name!r}")
    if format_name == "csv":
        if schema_path is None:
            raise ValueError("format 'csv' needs a schema file (--schema schema.toml) naming its columns")
        return layout_from_schema_file(schema_path)
    if schema_path is not None and format_name != "parquet":
        raise ValueError(f"--schema is only used with the 'csv' and 'parquet' formats, not {format_name!r}")
    if format_name == "criteo-tsv":
        return criteo_layout("criteo-tsv", b"\t", header=False)
    if format_name == "criteo-csv":
        return criteo_layout("criteo-csv", b",", header=True)
    if format_name == "avazu-csv":
        return avazu_layout()
    if schema_path is not None:
        layout = layout_from_schema_file(schema_path)
        if layout.multi:
            raise ValueError(f"format 'parquet' does not read multi-valued columns yet; schema {schema_path} declares "
                             f"{layout.multi_names} (convert them from CSV, or declare them as plain sparse columns)")
        return dataclasses.replace(layout, format="parquet", header=True, columns=None)
    return dataclasses.replace(criteo_layout("parquet", b",", header=True), format="parquet")


SCHEMA_KEYS = ("name", "delimiter", "header", "columns", "label", "dense", "sparse", "hex_sparse", "hour_column",
               "dense_transform", "encoding", "multi_sparse")
FIELD_KEYS = ("type", "multi")  # a field declared by its own key: NAME = {type = "categorical", multi = "|"}
FIELD_TYPES = ("categorical",)
LABEL_RULE_KEYS = ("source", "threshold", "positive")
SCHEMA_ENCODINGS = ("auto", "hash", "vocab", "hex-mod")

# The schema file's documentation: `tfcompress data convert --help` prints it, the README repeats it.
SCHEMA_FILE_HELP = """\
schema file (--schema, TOML; for --format csv, optional for parquet). Every key:
  name             dataset name in schema.json (default "csv")
  delimiter        one single-byte character (default ","; "\\t" for TSV); quoting is not interpreted
  header           true (default): each file starts with a header line naming its columns
  columns          every column of a line, in order; required when header = false
  label            the 0/1 label column (required): a column name whose fields are exactly 0 or 1, or a mapping
                   {source = "rating", threshold = 4}       1 when the number is >= 4, else 0
                   {source = "action", positive = ["click", "1"]}   1 when the field is one of these, else 0
                   (an empty field, or a non-number under threshold, is rejected as bad_label)
  dense            numeric columns, float32 features (empty -> 0; beyond float32 -> rejected: dense_overflow)
  sparse           categorical columns (the field's bytes -> stable 64-bit key -> table id)
  hex_sparse       categorical columns holding hex numbers (Criteo-like)
  hour_column      a YYMMDDHH column -> two categorical features, hour_of_day and weekday
  multi_sparse     multi-valued categorical columns and their token delimiter, e.g. {genres = "|"}: the field
                   "Action|Comedy" is two tokens, each encoded like a `sparse` value (one table per column); an
                   empty field is an empty list. Written as a variable-length feature; read() gives a RaggedTensor
  NAME = {...}     a column declared by its own key: {type = "categorical"} is a `sparse` column,
                   {type = "categorical", multi = "|"} a `multi_sparse` one (the same thing, the issue-16 form)
  dense_transform  "none" (default) or "log1p" (after negative -> 0 unless --keep-negative)
  encoding         "auto" (default), "vocab", "hash" or "hex-mod"; --encoding overrides it. auto: a first pass
                   counts each categorical column's distinct keys in the training rows; a column with at most
                   --vocab-max-keys (1,000,000) of them gets a vocabulary (ids 1..V by frequency, keys seen
                   fewer than --min-count times -> 0), a larger one hashes into --hash-buckets (4,194,304)

Example, a MovieLens-like CSV with the header userId,movieId,rating,timestamp,genres:
  name = "movielens"
  delimiter = ","
  header = true
  label = {source = "rating", threshold = 4}    # liked: rating >= 4 (ratings 0.5-5 are not 0/1)
  sparse = ["userId", "movieId"]
  genres = {type = "categorical", multi = "|"}  # "Comedy|Drama": two tokens (or: multi_sparse = {genres = "|"})
  dense = []                                     # timestamp is no feature here, but it can split the data:
  # tfcompress data convert --format csv --schema movielens.toml --input ratings.csv --output data/ml \\
  #     --split by-column --split-column timestamp --eval-fraction 0.2

The raw serving signature (`tfcompress export --raw-signature DATA_DIR`) takes the feature columns in this order
(`fields` string[B, F]; for the example without genres: userId, movieId): with `columns`, their order there; else
the dense columns, then the sources of sparse, hex_sparse and hour_column, each list in the order written; the
label, the split column and columns the schema does not use are left out. It has no multi-valued fields: exporting
it for a schema with multi_sparse columns is an error naming them.
"""


def _label_rule(path, value):
    """(label column, LabelRule or None) of a schema file's `label` value."""
    if isinstance(value, str) and value:
        return value, None
    if not isinstance(value, dict):
        raise FormatError(f"schema file {path}: label must be a column name or a table like "
                          f'{{source = "rating", threshold = 4}}, got {value!r}')
    unknown = sorted(set(value) - set(LABEL_RULE_KEYS))
    if unknown:
        raise FormatError(f"schema file {path}: label has unknown keys {unknown}; allowed: {list(LABEL_RULE_KEYS)}")
    source = value.get("source")
    if not isinstance(source, str) or not source:
        raise FormatError(f"schema file {path}: label.source must be the label column's name, got {source!r}")
    if ("threshold" in value) == ("positive" in value):
        raise FormatError(f"schema file {path}: label needs exactly one of threshold (label = value >= threshold) "
                          f"or positive (a list of values that mean 1), got {value!r}")
    if "threshold" in value:
        threshold = value["threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise FormatError(f"schema file {path}: label.threshold must be a finite number, got {threshold!r}")
        return source, LabelRule(threshold=float(threshold))
    positive = value["positive"]
    if not isinstance(positive, list) or not positive or not all(isinstance(p, str) and p for p in positive):
        raise FormatError(f"schema file {path}: label.positive must be a non-empty list of non-empty strings, got "
                          f"{positive!r}")
    return source, LabelRule(positive=tuple(dict.fromkeys(p.encode("utf-8") for p in positive)))


RESERVED_FEATURE_KEYS = ("dense", "label", "sparse")  # the record's own keys (docs/tfrecord_layout.md)


def _multi_delimiter(path, name, value, delimiter):
    if not isinstance(value, str) or len(value.encode()) != 1 or value in ("\n", "\r") or value == delimiter:
        raise FormatError(f"schema file {path}: column {name!r}: multi must be one single-byte character other than "
                          f"the file's delimiter {delimiter!r} and a newline, got {value!r}")
    return value.encode()


def _multi_columns(path, multi_sparse, declared, sparse, delimiter):
    """Multi-valued SparseColumns from `multi_sparse = {name = "|"}` and from `name = {type = ..., multi = ...}`
    declarations; a declaration without `multi` is appended to `sparse` (a single-valued categorical column)."""
    if not isinstance(multi_sparse, dict):
        raise FormatError(f'schema file {path}: multi_sparse must be a table like {{genres = "|"}}, got '
                          f"{multi_sparse!r}")
    multi = [SparseColumn(name, name, "string", multi=_multi_delimiter(path, name, value, delimiter))
             for name, value in multi_sparse.items()]
    for name, declaration in declared.items():
        unknown = sorted(set(declaration) - set(FIELD_KEYS))
        if unknown:
            raise FormatError(f"schema file {path}: column {name!r} has unknown keys {unknown}; allowed: "
                              f"{list(FIELD_KEYS)}")
        if declaration.get("type") not in FIELD_TYPES:
            raise FormatError(f"schema file {path}: column {name!r}: type must be one of {list(FIELD_TYPES)}, got "
                              f"{declaration.get('type')!r}")
        if "multi" in declaration:
            multi.append(SparseColumn(name, name, "string",
                                      multi=_multi_delimiter(path, name, declaration["multi"], delimiter)))
        else:
            sparse.append(SparseColumn(name, name, "string"))
    return multi


def layout_from_schema_file(path):
    """A Layout from a schema TOML file describing any delimited click log (`SCHEMA_FILE_HELP` lists the keys).

    Example file::

        name = "shop_clicks"        # dataset name in schema.json
        delimiter = ","             # one character; "\\t" for TSV
        header = true               # files start with a header line; else give `columns`
        # columns = ["clicked", "price", "user", "item", "ts"]   # every column of a line, in order
        label = "clicked"           # 0/1 column, or {source = "rating", threshold = 4}, or
                                    # {source = "action", positive = ["click"]}
        dense = ["price"]           # numeric columns (empty -> 0)
        sparse = ["user", "item"]   # categorical columns (stable string hash -> key)
        hex_sparse = []             # categorical columns holding hex numbers (Criteo-like)
        hour_column = "ts"          # optional YYMMDDHH column -> hour_of_day and weekday features
        dense_transform = "none"    # or "log1p"
        encoding = "auto"           # default encoding: "auto", "hash", "vocab" or "hex-mod"

    Raises:
        FileNotFoundError: no such file.
        FormatError: invalid TOML, unknown keys, wrong types (the message names the file and the key).
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as error:
        raise FormatError(f"schema file {path}: invalid TOML: {error}") from None
    declared = {key: value for key, value in raw.items() if key not in SCHEMA_KEYS and isinstance(value, dict)}
    unknown = sorted(set(raw) - set(SCHEMA_KEYS) - set(declared))
    if unknown:
        raise FormatError(f"schema file {path}: unknown keys {unknown}; allowed keys: {list(SCHEMA_KEYS)}, or a "
                          f'column declared by its name, e.g. genres = {{type = "categorical", multi = "|"}}')

    def get(key, kind, default):
        value = raw.get(key, default)
        if kind == "str_list":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise FormatError(f"schema file {path}: {key} must be a list of column names, got {value!r}")
        elif not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise FormatError(f"schema file {path}: {key} must be a {kind.__name__}, got {value!r}")
        return value

    name = get("name", str, "csv")
    delimiter = get("delimiter", str, ",")
    if len(delimiter.encode()) != 1 or delimiter in ("\n", "\r"):
        raise FormatError(f"schema file {path}: delimiter must be one single-byte character, got {delimiter!r}")
    header = get("header", bool, True)
    columns = raw.get("columns")
    if columns is not None:
        columns = tuple(get("columns", "str_list", None))
    if not header and columns is None:
        raise FormatError(f"schema file {path}: header = false needs `columns` (every column of a line, in order)")
    if "label" not in raw:
        raise FormatError(f"schema file {path}: `label` (the 0/1 column) is required")
    label, label_rule = _label_rule(path, raw["label"])
    dense = get("dense", "str_list", [])
    sparse = [SparseColumn(n, n, "string") for n in get("sparse", "str_list", [])]
    multi = _multi_columns(path, raw.get("multi_sparse", {}), declared, sparse, delimiter)
    sparse += [SparseColumn(n, n, "hex") for n in get("hex_sparse", "str_list", [])]
    hour_column = raw.get("hour_column")
    if hour_column is not None:
        hour_column = get("hour_column", str, None)
        sparse += [SparseColumn("hour_of_day", hour_column, "hour_of_day"),
                   SparseColumn("weekday", hour_column, "weekday")]
    dense_transform = get("dense_transform", str, "none")
    if dense_transform not in ("none", "log1p"):
        raise FormatError(f"schema file {path}: dense_transform must be 'none' or 'log1p', got {dense_transform!r}")
    encoding = get("encoding", str, "auto")
    if encoding not in SCHEMA_ENCODINGS:
        raise FormatError(f"schema file {path}: encoding must be one of {list(SCHEMA_ENCODINGS)}, got {encoding!r}")
    names = list(dense) + [c.name for c in sparse] + [c.name for c in multi]
    if len(set(names)) != len(names) or label in names:
        raise FormatError(f"schema file {path}: label, dense, sparse and multi-valued columns must be distinct, got "
                          f"label {label!r}, dense {dense}, sparse {[c.name for c in sparse]}, multi-valued "
                          f"{[c.name for c in multi]}")
    reserved = [c.name for c in multi if c.name in RESERVED_FEATURE_KEYS]
    if reserved:
        raise FormatError(f"schema file {path}: multi-valued columns {reserved} would collide with the record keys "
                          f"{list(RESERVED_FEATURE_KEYS)}; rename the column in the file")
    if not sparse and not dense and not multi:
        raise FormatError(f"schema file {path}: name at least one dense or sparse column")
    layout = Layout(name=name, format="csv", delimiter=delimiter.encode(), header=header, columns=columns,
                    label=label, dense=tuple(dense), sparse=tuple(sparse), dense_transform=dense_transform,
                    default_encoding=encoding, label_rule=label_rule, multi=tuple(multi))
    if columns is not None:
        layout.column_map(None, source=f"schema file {path}")  # every named column must be among `columns`
    return layout


# ---- text parsing --------------------------------------------------------------------------------------------


def _fold_digits(buf, starts, lengths):
    """Decimal digit strings buf[starts:starts+lengths] (1-D, at most 18 digits) -> (int64 values, ok bool)."""
    width = int(lengths.max(initial=0))
    if width == 0:
        return np.zeros(starts.shape, np.int64), np.ones(starts.shape, bool)
    data, mask = gather_tokens(buf, starts, lengths, width, align="right")
    digits = np.where(mask, data - np.uint8(48), np.uint8(0))  # bytes below '0' wrap above 9
    ok = (digits <= 9).all(axis=1)
    if width <= 15:  # a float64 product sums integers below 2^53 exactly, and runs in BLAS
        values = (digits.astype(np.float64) @ _POW10[width - 1::-1].astype(np.float64)).astype(np.int64)
    else:
        values = digits.astype(np.int64) @ _POW10[width - 1::-1]
    return values, ok


def parse_numbers(buf, starts, ends):
    """Numeric fields buf[starts:ends] -> (float64 values, bad bool); empty fields -> 0.

    Integers of up to 18 digits (optional leading '-') are parsed in NumPy; anything else falls back to Python's
    float() per field (e.g. "1.5", "2e3"), and is bad unless that gives a finite number.
    """
    shape = np.shape(starts)
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    ends = np.asarray(ends, dtype=np.int64).reshape(-1)
    lengths = ends - starts
    nonempty = lengths > 0
    first = buf[np.where(nonempty, starts, 0)] if buf.size else np.zeros(starts.shape, np.uint8)
    negative = nonempty & (first == ord("-"))
    digits = lengths - negative
    fast = (digits > 0) & (digits <= _MAX_FAST_DIGITS)
    integers, ok = _fold_digits(buf, starts + negative, np.where(fast, digits, 0))
    values = np.where(negative, -integers, integers).astype(np.float64)
    values[~nonempty] = 0.0
    bad = np.zeros(starts.shape, dtype=bool)
    for i in np.flatnonzero(nonempty & ~(fast & ok)):
        try:
            value = float(buf[starts[i]:ends[i]].tobytes())
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            values[i] = value
        else:
            bad[i] = True
    return values.reshape(shape), bad.reshape(shape)


def _days_from_civil(year, month, day):
    """Days since 1970-01-01 of proleptic Gregorian dates (H. Hinnant's algorithm, vectorized, int64)."""
    year = year - (month <= 2)
    era = np.floor_divide(year, 400)
    year_of_era = year - era * 400
    day_of_year = (153 * (month + np.where(month > 2, -3, 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def parse_hours(buf, starts, ends):
    """YYMMDDHH fields (Avazu `hour`, year 20YY) -> (hour_of_day int64, weekday int64 (Monday = 0), bad bool)."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    lengths = np.asarray(ends, dtype=np.int64).reshape(-1) - starts
    well_sized = lengths == 8
    value, ok = _fold_digits(buf, starts, np.where(well_sized, 8, 0))
    year = 2000 + value // 1_000_000
    month = value // 10_000 % 100
    day = value // 100 % 100
    hour = value % 100
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_days = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[np.clip(month, 0, 12)]
    month_days = month_days + ((month == 2) & leap)
    valid = well_sized & ok & (month >= 1) & (month <= 12) & (day >= 1) & (day <= month_days) & (hour <= 23)
    weekday = (_days_from_civil(year, np.clip(month, 1, 12), day) + 3) % 7  # 1970-01-01 was a Thursday (3)
    return np.where(valid, hour, 0), np.where(valid, weekday, 0), ~valid


def _sparse_keys(layout, buf, starts, ends):
    """Categorical keys [G, n_sparse] and per-row reason codes (0 = fine) from field boundaries [G, n_sparse]."""
    rows = starts.shape[0]
    keys = np.zeros((rows, len(layout.sparse)), dtype=np.uint64)
    reason = np.zeros(rows, dtype=np.int8)
    kinds = np.array([column.kind for column in layout.sparse])
    for kind, bad_reason in (("hex", "bad_hex"), ("string", None)):
        columns = np.flatnonzero(kinds == kind)
        if not columns.size:
            continue
        if kind == "hex":
            keys[:, columns], bad = hex_keys(buf, starts[:, columns], ends[:, columns])
            reason = np.where((reason == 0) & bad.any(axis=1), _REASON_CODE[bad_reason], reason)
        else:
            keys[:, columns] = string_keys(buf, starts[:, columns], ends[:, columns])
    derived = np.flatnonzero(np.isin(kinds, ("hour_of_day", "weekday")))
    if derived.size:
        column = derived[0]  # every derived feature reads the same hour column
        hour, weekday, bad = parse_hours(buf, starts[:, column], ends[:, column])
        for c in derived:
            keys[:, c] = (hour if kinds[c] == "hour_of_day" else weekday).astype(np.uint64)
        reason = np.where((reason == 0) & bad, _REASON_CODE["bad_hour"], reason)
    return keys, reason


def transform_dense(dense, options):
    """Dense values as written: (float32 values, overflow bool [G], log1p-domain bool [G]).

    Negative -> 0 (options.clip_negative), then log1p (options.transform == "log1p"), then float32. A row is flagged
    `overflow` when a value is beyond float32's range (it would be written as +-inf), `domain` when log1p meets a
    value <= -1 (NaN or -inf; only with clip_negative off). Flagged values are 0 in the result.
    """
    dense = np.asarray(dense, dtype=np.float64)
    if options.clip_negative:
        dense = np.maximum(dense, 0.0)
    domain = np.zeros(dense.shape, bool)
    if options.transform == "log1p":
        domain = dense <= -1.0
        dense = np.log1p(np.where(domain, 0.0, dense))
    with np.errstate(over="ignore"):
        out = dense.astype(np.float32)
    overflow = ~np.isfinite(out)
    out[overflow] = 0.0
    return out, overflow.any(axis=1), domain.any(axis=1)


def _match_tokens(buf, starts, ends, values):
    """Whether each token buf[starts:ends] equals one of `values` (bytes), exactly."""
    lengths = ends - starts
    match = np.zeros(starts.shape, bool)
    for value in values:
        same_length = lengths == len(value)
        if not same_length.any():
            continue
        if not value:
            match |= same_length
            continue
        data, _ = gather_tokens(buf, starts, np.where(same_length, lengths, 0), len(value))
        match |= same_length & (data == np.frombuffer(value, np.uint8)).all(axis=1)
    return match


def label_from_fields(buf, starts, ends, rule):
    """Label fields buf[starts:ends] -> (int64 0/1 labels, ok bool): "0"/"1" without a rule, else `LabelRule`."""
    lengths = ends - starts
    nonempty = lengths > 0
    if rule is None:
        first = buf[np.where(nonempty, starts, 0)] if buf.size else np.zeros(starts.shape, np.uint8)
        ok = (lengths == 1) & ((first == ord("0")) | (first == ord("1")))
        return np.where(ok, first.astype(np.int64) - ord("0"), 0), ok
    if rule.threshold is not None:
        values, bad = parse_numbers(buf, starts, ends)
        ok = nonempty & ~bad
        return (ok & (values >= rule.threshold)).astype(np.int64), ok
    return (nonempty & _match_tokens(buf, starts, ends, rule.positive)).astype(np.int64), nonempty


def _split_values(buf, starts, ends):
    """The split column's fields -> (float64 values, bad bool): empty or not a finite number is bad."""
    values, bad = parse_numbers(buf, starts, ends)
    return values + 0.0, bad | (ends == starts)  # + 0.0: -0.0 becomes 0.0, one value for the threshold


def parse_text_block(block, layout, column_map, first_line, dense_options=None):
    """Parse a block of complete lines (bytes, every line ending in \\n) of one delimited file.

    Args:
        block: bytes; a trailing \\r before \\n is stripped (Windows line ends).
        layout: the format's Layout.
        column_map: field positions in this file (`layout.column_map(header)`).
        first_line: 1-based line number of the block's first line in its file.
        dense_options: a `DenseOptions`: transform the dense values as written and reject rows that overflow
            float32 or leave log1p's domain (None: raw float64 values, no such check).

    Returns:
        Parsed (good rows in order, rejected lines with their reason).
    """
    buf = np.frombuffer(block, dtype=np.uint8)
    newline = np.flatnonzero(buf == 10)
    n = int(newline.size)
    if n and newline[-1] != buf.size - 1 or (buf.size and not n):
        raise ValueError("parse_text_block needs complete lines, each ending in a newline")
    line_start = np.zeros(n, dtype=np.int64)
    line_start[1:] = newline[:-1] + 1
    line_end = newline.astype(np.int64)
    carriage = (line_end > line_start) & (buf[np.maximum(line_end - 1, 0)] == 13) if n else np.zeros(0, bool)
    line_end = line_end - carriage

    delimiter = np.flatnonzero(buf == layout.delimiter[0])
    first_delimiter = np.searchsorted(delimiter, line_start)
    n_delimiters = np.searchsorted(delimiter, line_end) - first_delimiter
    reason = np.zeros(n, dtype=np.int8)
    empty = line_end == line_start
    reason[empty] = _REASON_CODE["empty_line"]
    reason[~empty & (n_delimiters != column_map.n_columns - 1)] = _REASON_CODE["wrong_column_count"]

    good = np.flatnonzero(reason == 0)
    width = column_map.n_columns
    # Every good line has exactly width - 1 delimiters, so its delimiters are a run in `delimiter`.
    if width > 1:
        bounds = delimiter[first_delimiter[good][:, None] + np.arange(width - 1)]
    else:
        bounds = np.zeros((good.size, 0), np.int64)
    field_starts = np.concatenate([line_start[good][:, None], bounds + 1], axis=1)
    field_ends = np.concatenate([bounds, line_end[good][:, None]], axis=1)

    row_reason = np.zeros(good.size, dtype=np.int8)
    label, label_ok = label_from_fields(buf, field_starts[:, column_map.label], field_ends[:, column_map.label],
                                        layout.label_rule)
    row_reason[~label_ok] = _REASON_CODE["bad_label"]

    dense_columns = list(column_map.dense)
    dense, dense_bad = parse_numbers(buf, field_starts[:, dense_columns], field_ends[:, dense_columns])
    row_reason = np.where((row_reason == 0) & dense_bad.any(axis=1), _REASON_CODE["non_numeric_dense"], row_reason)

    sparse_columns = list(column_map.sparse)
    keys, sparse_reason = _sparse_keys(layout, buf, field_starts[:, sparse_columns], field_ends[:, sparse_columns])
    row_reason = np.where(row_reason == 0, sparse_reason, row_reason)

    split_value = None
    if column_map.split is not None:
        split_value, split_bad = _split_values(buf, field_starts[:, column_map.split], field_ends[:, column_map.split])
        row_reason = np.where((row_reason == 0) & split_bad, _REASON_CODE["bad_split_value"], row_reason)
    if dense_options is not None:
        dense, row_reason = _check_dense(dense, dense_options, row_reason)
    reason[good] = row_reason

    keep = row_reason == 0
    multi = [multi_tokens(buf, field_starts[:, c], field_ends[:, c], column.multi, keep)
             for column, c in zip(layout.multi, column_map.multi)]
    rejected_lines = np.flatnonzero(reason != 0)
    rejected = [(first_line + int(i), REJECT_REASONS[reason[i] - 1], block[line_start[i]:line_end[i]])
                for i in rejected_lines]
    return Parsed(
        label=label[keep],
        dense=dense[keep],
        keys=keys[keep],
        line=first_line + good[keep].astype(np.int64),
        rejected=rejected,
        n_read=n,
        split_value=None if split_value is None else split_value[keep],
        multi=multi,
    )


def multi_tokens(buf, starts, ends, delimiter, keep):
    """The tokens of multi-valued fields buf[starts:ends] split at `delimiter`, of the rows where `keep` is True.

    An empty field has no token; otherwise a field with k delimiters has k + 1 tokens, each keyed like a single
    "string" field (`string_keys`; an empty token, as in "A||B", is the missing key like an empty single field).

    Returns:
        (keys uint64 [T], row_lengths int64 [kept rows]).
    """
    starts, ends = starts[keep], ends[keep]
    positions = np.flatnonzero(buf == delimiter[0])
    first = np.searchsorted(positions, starts)
    n_delimiters = np.searchsorted(positions, ends) - first
    lengths = np.where(ends > starts, n_delimiters + 1, 0).astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.uint64), lengths
    row = np.repeat(np.arange(lengths.size), lengths)
    k = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # token index within its row
    at = first[row] + k  # the delimiter that ends token k (when k < n_delimiters)
    token_ends = np.where(k < n_delimiters[row], positions[np.minimum(at, positions.size - 1)], ends[row])
    token_starts = np.where(k == 0, starts[row], positions[np.maximum(at - 1, 0)] + 1)
    return string_keys(buf, token_starts, token_ends), lengths


def _check_dense(dense, dense_options, row_reason):
    """(dense as written, row reasons with dense_overflow / dense_log1p_domain where no earlier reason applies)."""
    dense, overflow, domain = transform_dense(dense, dense_options)
    row_reason = np.where((row_reason == 0) & overflow, _REASON_CODE["dense_overflow"], row_reason)
    row_reason = np.where((row_reason == 0) & domain, _REASON_CODE["dense_log1p_domain"], row_reason)
    return dense, row_reason


# ---- Parquet -------------------------------------------------------------------------------------------------


def _arrow_string_fields(array):
    """(uint8 data buffer, starts, ends) of a pyarrow string/binary array (nulls -> empty fields)."""
    import pyarrow as pa  # optional package (the `data` extra): only Parquet input needs it

    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        array = array.cast(pa.large_binary()) if pa.types.is_large_string(array.type) else array.cast(pa.binary())
    large = pa.types.is_large_binary(array.type)
    array = array.fill_null(b"") if array.null_count else array
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64 if large else np.int32)
    offsets = offsets[array.offset: array.offset + len(array) + 1].astype(np.int64)
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    return data, offsets[:-1], offsets[1:]


def _is_text(array_type):
    import pyarrow as pa  # optional package (the `data` extra): only Parquet input needs it

    if pa.types.is_dictionary(array_type):
        array_type = array_type.value_type
    return any(check(array_type) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                              pa.types.is_large_binary))


def check_parquet_types(arrow_schema, layout, source):
    """FormatError unless every column the layout needs is in the Parquet file with a usable type."""
    import pyarrow as pa  # optional package (the `data` extra): only Parquet input needs it

    names = arrow_schema.names
    missing = [name for name in layout.required_columns() if name not in names]
    if missing:
        raise FormatError(f"{source}: Parquet file lacks columns {missing}; it has {names}")
    for name in layout.required_columns():
        column_type = arrow_schema.field(name).type
        numeric = pa.types.is_integer(column_type) or pa.types.is_floating(column_type) or pa.types.is_boolean(
            column_type)
        sparse_kinds = {c.kind for c in layout.sparse if c.source == name}
        text_or_integer = _is_text(column_type) or pa.types.is_integer(column_type)
        if sparse_kinds & {"hour_of_day", "weekday"} and not text_or_integer:
            raise FormatError(f"{source}: column {name!r} (YYMMDDHH) must be text or integer, got {column_type}")
        if sparse_kinds and not text_or_integer:
            raise FormatError(f"{source}: categorical column {name!r} must be integer or text, got {column_type}")
        if not sparse_kinds and not (numeric or _is_text(column_type)):
            raise FormatError(f"{source}: column {name!r} must be numeric or text, got {column_type}")


def parse_record_batch(batch, layout, first_row, dense_options=None):
    """Parse one pyarrow RecordBatch of a Parquet file (columns by name) like a block of text lines.

    Integer categorical columns are taken as keys as they are (already-encoded ids stay ids under hex-mod with a
    large enough range, or are re-encoded by vocab/hash); negative ones are rejected as bad_categorical. Text
    categorical columns follow the layout (hex or string hash). Nulls are empty fields. Rejected rows are quoted
    as JSON in the quarantine. A label rule's threshold applies to numeric or text columns; its `positive` values
    are compared with the field as text (non-text columns are cast to string by Arrow first). `dense_options`: as
    in `parse_text_block`.
    """
    import pyarrow as pa  # optional package (the `data` extra): only Parquet input needs it
    import pyarrow.compute as pc  # optional: the [data] extra

    n = batch.num_rows
    reason = np.zeros(n, dtype=np.int8)

    def set_reason(bad, name):
        nonlocal reason
        reason = np.where((reason == 0) & bad, _REASON_CODE[name], reason)

    label_column = batch.column(layout.label)
    rule = layout.label_rule
    if rule is not None and rule.positive is not None and not _is_text(label_column.type):
        label_column = pc.cast(label_column, pa.string())
    if _is_text(label_column.type):
        data, starts, ends = _arrow_string_fields(label_column)
        label, label_ok = label_from_fields(data, starts, ends, rule)
        label_ok &= label_column.is_valid().to_numpy(zero_copy_only=False)
    else:
        values = label_column.cast(pa.float64()).fill_null(math.nan).to_numpy(zero_copy_only=False)
        if rule is None:
            label_ok = (values == 0) | (values == 1)
            label = np.where(label_ok, values, 0).astype(np.int64)
        else:
            label_ok = np.isfinite(values)
            label = (label_ok & (values >= rule.threshold)).astype(np.int64)
    set_reason(~label_ok, "bad_label")

    dense = np.zeros((n, len(layout.dense)), dtype=np.float64)
    dense_bad = np.zeros(n, dtype=bool)
    for j, name in enumerate(layout.dense):
        column = batch.column(name)
        if _is_text(column.type):
            data, starts, ends = _arrow_string_fields(column)
            dense[:, j], bad = parse_numbers(data, starts, ends)
        else:
            dense[:, j] = column.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
            bad = ~np.isfinite(dense[:, j])
            dense[bad, j] = 0.0
        dense_bad |= bad
    set_reason(dense_bad, "non_numeric_dense")

    keys = np.zeros((n, len(layout.sparse)), dtype=np.uint64)
    hex_bad = np.zeros(n, dtype=bool)
    categorical_bad = np.zeros(n, dtype=bool)
    hour_bad = np.zeros(n, dtype=bool)
    for j, sparse_column in enumerate(layout.sparse):
        column = batch.column(sparse_column.source)
        if sparse_column.kind in ("hour_of_day", "weekday"):
            if not _is_text(column.type):
                column = pc.cast(column, pa.string())
            data, starts, ends = _arrow_string_fields(column)
            hour, weekday, bad = parse_hours(data, starts, ends)
            keys[:, j] = (hour if sparse_column.kind == "hour_of_day" else weekday).astype(np.uint64)
            hour_bad |= bad
        elif _is_text(column.type):
            data, starts, ends = _arrow_string_fields(column)
            if sparse_column.kind == "hex":
                keys[:, j], bad = hex_keys(data, starts, ends)
                hex_bad |= bad
            else:
                keys[:, j] = string_keys(data, starts, ends)
        else:
            values = column.cast(pa.int64())
            null = values.is_null().to_numpy(zero_copy_only=False)
            values = values.fill_null(0).to_numpy(zero_copy_only=False)
            categorical_bad |= values < 0
            keys[:, j] = np.where(null, MISSING_KEY, values.astype(np.uint64))
    set_reason(hex_bad, "bad_hex")
    set_reason(categorical_bad, "bad_categorical")
    set_reason(hour_bad, "bad_hour")

    split_value = None
    if layout.split_column is not None:
        column = batch.column(layout.split_column)
        if _is_text(column.type):
            data, starts, ends = _arrow_string_fields(column)
            split_value, split_bad = _split_values(data, starts, ends)
            split_bad |= ~column.is_valid().to_numpy(zero_copy_only=False)
        else:
            split_value = column.cast(pa.float64()).fill_null(math.nan).to_numpy(zero_copy_only=False) + 0.0
            split_bad = ~np.isfinite(split_value)
        set_reason(split_bad, "bad_split_value")
    if dense_options is not None:
        dense, reason = _check_dense(dense, dense_options, reason)

    keep = reason == 0
    rejected = []
    for i in np.flatnonzero(~keep):
        row = batch.slice(int(i), 1).to_pylist()[0]
        text = json.dumps({k: row[k] for k in layout.required_columns()}, default=str, sort_keys=False)
        rejected.append((first_row + int(i), REJECT_REASONS[reason[i] - 1], text.encode()))
    return Parsed(label=label[keep], dense=dense[keep], keys=keys[keep],
                  line=first_row + np.flatnonzero(keep).astype(np.int64), rejected=rejected, n_read=n,
                  split_value=None if split_value is None else split_value[keep])
