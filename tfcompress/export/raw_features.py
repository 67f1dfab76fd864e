"""The converter's preprocessing (raw fields -> dense values and table ids) as a TensorFlow graph of stock ops.

An export made with `export_saved_model(..., raw_preprocessing=DATA_DIR)` gains two signatures that take the raw
fields of click-log rows as strings, exactly as they appear in the files `tfcompress data convert` read:

    raw           fields string[B, F] -> probability f32[B, 1] (NaN for a rejected row), valid bool[B],
                  reject_reason string[B] ("" when valid, else the converter's reason, e.g. b"bad_hex")
    raw_features  fields string[B, F] -> dense f32[B, n_dense], sparse i64[B, n_sparse], valid, reject_reason
                  (what the converter would have written for the rows; zeros for rejected rows)

`fields` holds one row per request row and the raw feature columns of the dataset in `RawSpec.columns` order
(label and unused columns left out): Criteo I1..I13, C1..C26 (a TSV line without its label); Avazu hour, C1,
banner_pos, ..., C21 (a CSV line without `id` and `click`); a schema-driven CSV its dense columns, then the sources
of its categorical features. The column names are stored in the export's metadata.

Why the graph equals the converter (`tfcompress.data.formats`, `.encoding`, `.convert`), rule by rule:

- Dense field: empty -> 0. Otherwise it must be what Python's float() reads (the converter's integer fast path
  only reads a subset of that) and finite: `NUMBER_PATTERN` is float()'s grammar (ASCII whitespace around,
  optional sign, digits with single underscores between them, optional fraction and exponent; no inf/nan),
  underscores are removed, and tf.strings.to_number (float64, correctly rounded like float()) parses it; an
  overflow to inf is caught by is_finite. A field that fails -> the row is rejected (`non_numeric_dense`). Then,
  as the converter: negative -> 0 when `clip_negative`, log1p when `dense_transform == "log1p"` (float64), cast to
  float32. (TF's float64 log1p can differ from NumPy's in the last bit; after the cast to float32 that vanished in
  400k values tested, and the tests compare at 1e-6.)
- Hex field (Criteo): empty -> the missing key 2^64 - 1. Otherwise 1 to 16 hex digits, either case (regex), read
  by padding to 16 digits, decoding the bytes and or-ing 4-bit digit values into a uint64; more digits, another
  character, or the reserved value 2^64 - 1 -> rejected (`bad_hex`).
- String field (Avazu, schema CSV): key = splitmix64(fnv1a64(bytes)), at most 2^64 - 2, empty -> 2^64 - 1. FNV-1a
  runs as a tf.while_loop over byte positions of the batch's longest field (bytes from tf.io.decode_raw), all in
  uint64 arithmetic, which wraps like NumPy's; TF's CPU kernels for uint64 add/mul/xor/shift/mod/min are stock.
- YYMMDDHH field (Avazu `hour`): exactly 8 digits, year 20YY, a real date and hour <= 23, else rejected
  (`bad_hour`); hour_of_day and weekday (Monday = 0) by the same days-from-civil arithmetic (int64 floor ops).
- A field holding the delimiter or a newline: the converter would have read a line with too many columns ->
  rejected (`wrong_column_count`). When several reasons apply the first in `formats.REJECT_REASONS` order wins.
- Ids: the encoders the converter built for the dataset (read back from schema.json / vocabulary.npz by the
  converter's own `_encoders`): hex-mod = key mod max_ind_range (missing -> 0); hash = splitmix64(key) mod
  buckets (missing hashed like any key); vocab = a lookup table from key (hex keys folded mod max_ind_range first
  when it is set) to 1..V (unseen -> 0; the missing key is
  an ordinary key and has an id when the training data had enough empty fields), loaded from a text asset of
  the vocabulary (tf.lookup.TextFileInitializer: TF Serving restores it with the SavedModel); derived hour
  features as they are.

`reference_features` computes the same outputs with the converter's NumPy parser and encoders (a line is built
from the fields and parsed by `formats.parse_text_block`); the exporter checks the graph against it on sample rows
and stores them for `tfcompress verify`. The tests check both against complete conversions.

Not covered: Parquet conversions (integer-typed Parquet columns are keys as they are, not text), and a trailing
carriage return, which the converter strips from the last field of a line only.
"""

import dataclasses
import gzip
import os

import numpy as np
import tensorflow as tf

from tfcompress.data import encoding, formats
from tfcompress.data.convert_plan import ConvertOptions, is_gzip, make_encoders
from tfcompress.data.schema import Schema

RAW_SIGNATURE = "raw"
RAW_FEATURES_SIGNATURE = "raw_features"
RAW_INPUT = "fields"
SUPPORTED_FORMATS = ("criteo-tsv", "criteo-csv", "avazu-csv", "csv")
REASONS = ("",) + formats.REJECT_REASONS  # code 0 = the row is fine

_WHITESPACE = r"[ \t\n\x0b\x0c\r]*"
_DIGITS = r"[0-9](?:_?[0-9])*"
NUMBER_PATTERN = (rf"{_WHITESPACE}[+-]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][+-]?{_DIGITS})?"
                  rf"{_WHITESPACE}")
HEX_PATTERN = f"[0-9a-fA-F]{{1,{encoding.MAX_HEX_DIGITS}}}"
HOUR_PATTERN = "[0-9]{8}"

_U64 = tf.uint64
_MISSING = int(encoding.MISSING_KEY)
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


@dataclasses.dataclass(frozen=True)
class SparseFeature:
    """One categorical output column: read from raw column `column`, parsed as `kind`, encoded by `encoder`."""

    name: str
    column: int
    kind: str
    encoder: object


@dataclasses.dataclass(frozen=True)
class RawSpec:
    """Everything the in-graph preprocessing needs, read from a converted data directory (`load_raw_spec`).

    Args:
        data_dir: the converted data directory.
        layout: the converter's `formats.Layout` of the dataset.
        options: the converter's resolved `convert.ConvertOptions`.
        columns: names of the raw input columns, in `fields` order.
        dense_columns: index in `columns` of each dense output column.
        sparse: SparseFeature per categorical output column (schema order).
        cardinalities: table sizes (schema.json).
    """

    data_dir: str
    layout: object
    options: object
    columns: tuple
    dense_columns: tuple
    sparse: tuple
    cardinalities: tuple

    @property
    def n_dense(self):
        return len(self.dense_columns)

    @property
    def n_sparse(self):
        return len(self.sparse)

    def describe(self):
        """JSON-able summary for the export metadata."""
        return {"columns": list(self.columns), "format": self.options.format, "encoding": self.options.encoding,
                "dense_transform": self.options.dense_transform, "clip_negative": bool(self.options.clip_negative),
                "data_dir": self.data_dir}


def raw_columns(layout):
    """The raw input columns of a layout: its feature columns in file order where known, label excluded."""
    needed = [c for c in layout.required_columns() if c != layout.label]
    if layout.columns is not None:
        order = list(layout.columns)
    elif layout.format == "avazu-csv":
        order = list(formats.AVAZU_COLUMNS)
    elif layout.format == "criteo-csv":
        order = list(formats.CRITEO_COLUMNS)
    else:
        order = needed
    return tuple(c for c in order if c in needed)


def load_raw_spec(data_dir):
    """The RawSpec of a directory written by `tfcompress.data.convert` (schema.json, vocabulary.npz).

    Raises:
        FileNotFoundError: no schema.json there.
        ValueError: not a converter output, a format without raw-string serving (Parquet, synthetic data), a
            schema-driven CSV whose schema TOML is gone, or a schema with multi-valued fields (named).
    """
    data_dir = os.path.abspath(os.fspath(data_dir))
    schema = Schema.load(data_dir)
    # The signature's `fields` string[B, F] holds one value per column: no place for a list of tokens.
    schema.require_no_multi_fields(f"the raw-string serving signature (tfcompress export --raw-signature {data_dir})")
    extra = schema.extra or {}
    if extra.get("converter") != "tfcompress.data.convert" or "options" not in extra:
        raise ValueError(f"{data_dir} was not written by `tfcompress data convert` (schema.json has no converter "
                         "options), so the raw preprocessing is unknown; give the converted data directory")
    options = ConvertOptions(**extra["options"])
    if options.format not in SUPPORTED_FORMATS:
        raise ValueError(f"a raw-string signature needs a text format, one of {list(SUPPORTED_FORMATS)}; {data_dir} "
                         f"was converted from {options.format!r}")
    if options.schema_path and not os.path.isfile(options.schema_path):
        raise ValueError(f"the schema file {options.schema_path} of the conversion in {data_dir} is gone; it "
                         "describes the raw columns the signature takes")
    layout = formats.layout_for_format(options.format, options.schema_path)
    options = options.resolved(layout)
    encoders = make_encoders(layout, options, data_dir)  # the converter's own choice of encoder per column
    columns = raw_columns(layout)
    index = {name: i for i, name in enumerate(columns)}
    sparse = tuple(SparseFeature(c.name, index[c.source], c.kind, e) for c, e in zip(layout.sparse, encoders))
    cardinalities = tuple(int(e.cardinality) for e in encoders)
    if list(cardinalities) != [int(c) for c in schema.cardinalities]:
        raise ValueError(f"{data_dir}: schema.json cardinalities {schema.cardinalities} differ from the converter's "
                         f"encoders {list(cardinalities)}")
    return RawSpec(data_dir=data_dir, layout=layout, options=options, columns=columns,
                   dense_columns=tuple(index[name] for name in layout.dense), sparse=sparse,
                   cardinalities=cardinalities)


# ------------------------------------------------------------------------------------------ uint64 helpers
def _u64(value):
    return tf.constant(value, _U64)


def splitmix64_tf(x):
    """`tfcompress.data.synthetic.splitmix64` in uint64 TF ops (wrapping, bit-identical)."""
    z = x + _u64(_GOLDEN)
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, _u64(30))) * _u64(_MIX1)
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, _u64(27))) * _u64(_MIX2)
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, _u64(31)))


def string_keys_tf(tokens):
    """`encoding.string_keys` of a string tensor (any shape): FNV-1a 64 + splitmix64, empty -> 2^64 - 1."""
    shape = tf.shape(tokens)
    flat = tf.reshape(tokens, [-1])
    lengths = tf.strings.length(flat)
    width = tf.reduce_max(tf.concat([lengths, [1]], axis=0))  # >= 1: decode_raw needs a width
    data = tf.transpose(tf.cast(tf.io.decode_raw(flat, tf.uint8, fixed_length=width), _U64))  # [width, N]
    prime = _u64(int(encoding.FNV_PRIME))

    def body(j, h):
        # FNV-1a is sequential in the bytes: one step per byte position, every token at once.
        step = tf.bitwise.bitwise_xor(h, data[j]) * prime
        return j + 1, tf.where(j < lengths, step, h)

    h0 = tf.fill(tf.shape(flat), _u64(int(encoding.FNV_OFFSET)))
    _, h = tf.while_loop(lambda j, h: j < width, body, (tf.constant(0), h0))
    keys = tf.minimum(splitmix64_tf(h), _u64(_MISSING - 1))
    keys = tf.where(lengths == 0, _u64(_MISSING), keys)
    return tf.reshape(keys, shape)


def hex_keys_tf(tokens):
    """`encoding.hex_keys` of a string tensor: (uint64 keys, bad bool); empty -> 2^64 - 1, not bad."""
    lengths = tf.strings.length(tokens)
    well_formed = tf.strings.regex_full_match(tokens, HEX_PATTERN)
    width = encoding.MAX_HEX_DIGITS
    padded = tf.strings.substr(tf.strings.join(["0" * width, tf.where(well_formed, tokens, "")]), -width, width)
    digits = tf.cast(tf.io.decode_raw(padded, tf.uint8, fixed_length=width), tf.int32)  # [..., 16] ASCII
    values = tf.where(digits <= ord("9"), digits - ord("0"), tf.bitwise.bitwise_or(digits, 32) - (ord("a") - 10))
    shifts = tf.constant([4 * (width - 1 - i) for i in range(width)], _U64)
    # Disjoint nibbles: the sum is the bitwise or.
    keys = tf.reduce_sum(tf.bitwise.left_shift(tf.cast(values, _U64), shifts), axis=-1)
    bad = (lengths > 0) & (~well_formed | tf.equal(keys, _u64(_MISSING)))
    keys = tf.where(lengths == 0, _u64(_MISSING), keys)
    return keys, bad


def hours_tf(tokens):
    """`formats.parse_hours` of a string tensor: (hour_of_day int64, weekday int64, bad bool)."""
    good = tf.strings.regex_full_match(tokens, HOUR_PATTERN)
    value = tf.strings.to_number(tf.where(good, tokens, "0"), tf.int64)
    year = 2000 + value // 1_000_000
    month = value // 10_000 % 100
    day = value // 100 % 100
    hour = value % 100
    leap = tf.equal(year % 4, 0) & (tf.not_equal(year % 100, 0) | tf.equal(year % 400, 0))
    month_days = tf.gather(tf.constant([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], tf.int64),
                           tf.clip_by_value(month, 0, 12))
    month_days += tf.cast(tf.equal(month, 2) & leap, tf.int64)
    valid = good & (month >= 1) & (month <= 12) & (day >= 1) & (day <= month_days) & (hour <= 23)
    # Days since 1970-01-01 (H. Hinnant's days_from_civil, as the converter); 1970-01-01 was a Thursday (3).
    m = tf.clip_by_value(month, 1, 12)
    y = year - tf.cast(m <= 2, tf.int64)
    era = y // 400
    year_of_era = y - era * 400
    day_of_year = (153 * (m + tf.where(m > 2, tf.constant(-3, tf.int64), 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    weekday = (era * 146097 + day_of_era - 719468 + 3) % 7
    zero = tf.zeros_like(value)
    return tf.where(valid, hour, zero), tf.where(valid, weekday, zero), ~valid


def numbers_tf(tokens):
    """`formats.parse_numbers` of a string tensor: (float64 values, bad bool); empty -> 0."""
    empty = tf.equal(tf.strings.length(tokens), 0)
    readable = tf.strings.regex_full_match(tokens, NUMBER_PATTERN)
    text = tf.where(readable, tf.strings.regex_replace(tf.strings.strip(tokens), "_", ""), "0")
    values = tf.strings.to_number(text, tf.float64)
    bad = ~empty & ~(readable & tf.math.is_finite(values))
    return tf.where(bad | empty, tf.zeros_like(values), values), bad


# ------------------------------------------------------------------------------------------ the preprocessor
class RawPreprocessor(tf.Module):
    """raw fields string[B, F] -> {"dense", "sparse", "valid", "reject_reason"}, as the converter would write them.

    Vocabulary tables (encoding "vocab") are read from text files written into `asset_dir` (one int64 key per
    line, the key of id i + 1 on line i); saved with the SavedModel they become assets.

    Args:
        spec: the RawSpec (`load_raw_spec`).
        asset_dir: an existing directory for the vocabulary files; it must exist until the model is saved.
    """

    def __init__(self, spec, asset_dir=None, name="raw_preprocessing"):
        super().__init__(name=name)
        self.spec = spec
        self.tables = {}
        for j, feature in enumerate(spec.sparse):
            if feature.encoder.kind != "vocab" or feature.encoder.keys.size == 0:
                continue
            if asset_dir is None:
                raise ValueError("encoding 'vocab' needs asset_dir= for the vocabulary files")
            path = os.path.join(asset_dir, f"raw_vocabulary_{j:03d}.txt")
            keys = feature.encoder.keys.view(np.int64)  # int64 table keys: the uint64 bits, reinterpreted
            with open(path, "w") as f:
                f.write("".join(f"{k}\n" for k in keys.tolist()))
            initializer = tf.lookup.TextFileInitializer(
                path, tf.int64, tf.lookup.TextFileIndex.WHOLE_LINE, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER)
            self.tables[f"f{j:03d}"] = tf.lookup.StaticHashTable(initializer, default_value=-1)

    @tf.autograph.experimental.do_not_convert  # plain Python control flow: it only builds the graph
    def __call__(self, fields):
        spec = self.spec
        fields = tf.convert_to_tensor(fields, tf.string)
        rows = tf.shape(fields)[0]
        reason = tf.zeros([rows], tf.int32)

        def reject(reason, bad, name):
            return tf.where(tf.equal(reason, 0) & bad, REASONS.index(name), reason)

        # A field with the delimiter or a newline in it would have made its line one of too many columns.
        flat = tf.reshape(fields, [-1])
        split = [tf.strings.split(flat, sep=sep).row_lengths() > 1 for sep in (spec.layout.delimiter.decode(), "\n")]
        extra_columns = tf.reduce_any(tf.reshape(split[0] | split[1], tf.shape(fields)), axis=1)
        reason = reject(reason, extra_columns, "wrong_column_count")

        dense, dense_bad = numbers_tf(tf.gather(fields, tf.constant(spec.dense_columns, tf.int32), axis=1))
        reason = reject(reason, tf.reduce_any(dense_bad, axis=1), "non_numeric_dense")
        if spec.options.clip_negative:
            dense = tf.maximum(dense, 0.0)
        # As formats.transform_dense: log1p has no value at <= -1 (negatives kept), and a finite float64 beyond
        # float32's range would be written as +-inf. Both reject the row, after every other reason (below).
        outside_log1p = tf.zeros([rows], tf.bool)
        if spec.options.dense_transform == "log1p":
            outside_log1p = tf.reduce_any(dense <= -1.0, axis=1)
            dense = tf.math.log1p(tf.where(dense <= -1.0, tf.zeros_like(dense), dense))
        dense = tf.cast(dense, tf.float32)
        overflow = tf.reduce_any(~tf.math.is_finite(dense), axis=1)

        keys = [None] * spec.n_sparse
        for kind, reason_name in (("hex", "bad_hex"), ("string", None)):
            positions = [j for j, f in enumerate(spec.sparse) if f.kind == kind]
            if not positions:
                continue
            tokens = tf.gather(fields, tf.constant([spec.sparse[j].column for j in positions], tf.int32), axis=1)
            if kind == "hex":
                kind_keys, bad = hex_keys_tf(tokens)
                reason = reject(reason, tf.reduce_any(bad, axis=1), reason_name)
            else:
                kind_keys = string_keys_tf(tokens)
            for i, j in enumerate(positions):
                keys[j] = kind_keys[:, i]
        derived = [j for j, f in enumerate(spec.sparse) if f.kind in formats.DERIVED_CARDINALITY]
        if derived:
            hour, weekday, bad = hours_tf(fields[:, spec.sparse[derived[0]].column])
            reason = reject(reason, bad, "bad_hour")
            for j in derived:
                keys[j] = hour if spec.sparse[j].kind == "hour_of_day" else weekday
        reason = reject(reason, overflow, "dense_overflow")
        reason = reject(reason, outside_log1p, "dense_log1p_domain")

        ids = [self._encode(j, feature, keys[j]) for j, feature in enumerate(spec.sparse)]
        sparse = tf.stack(ids, axis=1) if ids else tf.zeros([rows, 0], tf.int64)
        valid = tf.equal(reason, 0)
        # A rejected row is not a row of the dataset: zeros, never a half-parsed value.
        dense = tf.where(valid[:, None], dense, tf.zeros_like(dense))
        sparse = tf.where(valid[:, None], sparse, tf.zeros_like(sparse))
        return {"dense": dense, "sparse": sparse, "valid": valid,
                "reject_reason": tf.gather(tf.constant(REASONS), reason)}

    def _encode(self, j, feature, keys):
        encoder = feature.encoder
        if encoder.kind == "direct":
            return tf.cast(keys, tf.int64)
        if encoder.kind == "hex-mod":
            ids = tf.math.floormod(keys, _u64(encoder.max_ind_range))
            return tf.cast(tf.where(tf.equal(keys, _u64(_MISSING)), _u64(0), ids), tf.int64)
        if encoder.kind == "hash":
            return tf.cast(tf.math.floormod(splitmix64_tf(keys), _u64(encoder.buckets)), tf.int64)
        if encoder.kind == "vocab":
            table = self.tables.get(f"f{j:03d}")
            if table is None:  # an empty vocabulary: every key is out of vocabulary
                return tf.zeros(tf.shape(keys), tf.int64)
            if encoder.key_modulus is not None:  # MLPerf: hex keys folded before the lookup, as the vocabulary was
                keys = tf.where(tf.equal(keys, _u64(_MISSING)), keys,
                                tf.math.floormod(keys, _u64(encoder.key_modulus)))
            return table.lookup(tf.bitcast(keys, tf.int64)) + 1  # line i holds id i + 1; unseen: -1 + 1 = 0
        raise ValueError(f"unknown encoder kind {encoder.kind!r} of feature {feature.name!r}")


# ------------------------------------------------------------------------------------------ NumPy reference
def _as_bytes(value):
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def reference_features(spec, fields):
    """What the converter writes for rows of raw fields: its own parser and encoders, on lines built from them.

    Args:
        spec: RawSpec.
        fields: [N, F] array-like of str/bytes in `spec.columns` order.

    Returns:
        {"dense": f32[N, n_dense], "sparse": i64[N, n_sparse], "valid": bool[N], "reject_reason": bytes[N]},
        rejected rows zero like the graph's.
    """
    fields = [[_as_bytes(v) for v in row] for row in fields]
    layout, options = spec.layout, spec.options
    n = len(fields)
    if layout.columns is not None:
        file_columns = list(layout.columns)
    else:
        file_columns = [layout.label] + [c for c in raw_columns(layout)] if layout.format == "csv" else (
            list(formats.AVAZU_COLUMNS) if layout.format == "avazu-csv" else list(formats.CRITEO_COLUMNS))
    column_map = layout.column_map(None if layout.columns is not None else file_columns)
    position = {name: i for i, name in enumerate(spec.columns)}
    reasons = [b""] * n
    lines = []
    for r, row in enumerate(fields):
        if any(b"\n" in v for v in row):
            reasons[r] = b"wrong_column_count"  # as the graph: the field cannot be part of one line
            row = [b""] * len(row)
        values = [row[position[name]] if name in position else (b"0" if name == layout.label else b"")
                  for name in file_columns]
        lines.append(layout.delimiter.join(values) + b"\n")
    dense_options = formats.DenseOptions(options.clip_negative, options.dense_transform)
    parsed = formats.parse_text_block(b"".join(lines), layout, column_map, first_line=0, dense_options=dense_options)
    for line, reason, _ in parsed.rejected:
        reasons[line] = reasons[line] or reason.encode()
    dense = np.zeros((n, spec.n_dense), np.float32)
    sparse = np.zeros((n, spec.n_sparse), np.int64)
    good = np.array([i for i in parsed.line if not reasons[i]], np.int64)
    keep = np.isin(parsed.line, good)
    dense[good] = parsed.dense[keep]  # already transformed as the converter writes it
    for j, feature in enumerate(spec.sparse):
        sparse[good, j] = feature.encoder.encode(parsed.keys[keep][:, j])
    return {"dense": dense, "sparse": sparse, "valid": np.array([not r for r in reasons], bool),
            "reject_reason": np.array(reasons, dtype="S")}


def _input_rows(spec, limit):
    """Up to `limit` rows of raw fields from the conversion's first readable text input (none if it is gone)."""
    layout = spec.layout
    position = {name: i for i, name in enumerate(spec.columns)}
    for path in Schema.load(spec.data_dir).extra.get("inputs", []):
        if not os.path.isfile(path):
            continue
        opener = gzip.open if is_gzip(path) else open
        rows = []
        with opener(path, "rb") as f:
            header = f.readline().rstrip(b"\r\n").split(layout.delimiter) if layout.header else \
                [name.encode() for name in layout.columns]
            index = {name.decode("utf-8", "replace"): i for i, name in enumerate(header)}
            if any(name not in index for name in spec.columns):
                continue
            for line in f:
                values = line.rstrip(b"\r\n").split(layout.delimiter)
                if len(values) == len(header):
                    rows.append([values[index[name]] for name in position])
                if len(rows) >= limit:
                    break
        if rows:
            return rows
    return []


def edge_rows(spec):
    """Rows that exercise every rule: all empty, unseen values, each malformed kind, numbers in odd spellings."""
    n = len(spec.columns)
    kinds = {}
    for feature in spec.sparse:
        kinds.setdefault(feature.column, feature.kind)
    dense = set(spec.dense_columns)

    def row(dense_value, hex_value, string_value, hour_value):
        out = []
        for c in range(n):
            kind = "dense" if c in dense else kinds.get(c)
            out.append({"dense": dense_value, "hex": hex_value, "string": string_value}.get(kind, hour_value))
        return [_as_bytes(v) for v in out]

    rows = [row("", "", "", "14102100"),                                       # every field empty
            row("-5", "FFFFFFFFFFFFFFFE", "never-seen-\u00e9", "16022923"),   # leap day, unseen values
            row(" 1_000.5e-1 ", "0", "x" * 70, "14123123"),                   # float() spelling, long string
            row("12345678901234567890", "68fd1e64", "a", "00010100"),         # 20-digit integer
            row("abc", "68fd1e64", "a", "14102100"),                          # non_numeric_dense
            row("1e400", "68fd1e64", "a", "14102100"),                        # overflows: non_numeric_dense
            row("1e300", "68fd1e64", "a", "14102100"),                        # beyond float32: dense_overflow
            row("1", "xyz", "a", "14102100"),                                 # bad_hex
            row("1", "ffffffffffffffff", "a", "14102100"),                    # the reserved key: bad_hex
            row("1", "00000000000000001", "a", "14102100"),                   # 17 digits: bad_hex
            row("1", "1", "a", "14023000"),                                   # February 30th: bad_hour
            row("1", "1", "a", "1410210"),                                    # 7 digits: bad_hour
            row("1", "1" + spec.layout.delimiter.decode(), "b" + spec.layout.delimiter.decode(),
                "14102100")]                                                   # wrong_column_count
    return rows


def raw_sample_rows(spec, rows=48):
    """Sample raw rows for an export: the conversion's first input rows (when still there) plus `edge_rows`."""
    return _input_rows(spec, rows) + edge_rows(spec)


def pack_fields(fields):
    """[N, F] bytes -> arrays that np.savez stores without pickling (any bytes, trailing NULs included)."""
    flat = [_as_bytes(v) for row in fields for v in row]
    offsets = np.zeros(len(flat) + 1, np.int64)
    offsets[1:] = np.cumsum([len(v) for v in flat])
    data = np.frombuffer(b"".join(flat), np.uint8)
    return {"fields_data": data, "fields_offsets": offsets,
            "fields_shape": np.array([len(fields), len(fields[0]) if fields else 0], np.int64)}


def unpack_fields(arrays):
    """Inverse of `pack_fields`: an object array [N, F] of bytes."""
    data, offsets = arrays["fields_data"].tobytes(), arrays["fields_offsets"]
    flat = [data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    return np.array(flat, dtype=object).reshape(tuple(int(s) for s in arrays["fields_shape"]))
