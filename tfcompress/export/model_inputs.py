"""Exports of models with any inputs: the served tensors, tf.Example features and sample rows of `model.inputs`.

`export_saved_model` takes two kinds of models (docs/export_contract.md):

- the dense/sparse contract: inputs exactly {"dense": float32 [B, n], "sparse": int [B, F]} (`tfcompress.models`);
- any other Keras model built from Keras layers and tfcompress layers ("Models with other inputs"): its signature
  is derived here from `model.inputs` (names, dtypes, shapes, ragged or not).

Each model input becomes one `ServedInput`:

- a dense input NAME of shape [B, d1, ...] is served as the tensor NAME (its dtype, those dims; checked in graph);
- a ragged input NAME ([B, None], Keras `Input(ragged=True)` or tf.keras' ragged Input) is served as two tensors,
  NAME_values [N] and NAME_row_lengths int64 [B]: TF Serving's PredictRequest carries dense tensors only, so a
  client sends the flat values and the length of each row (`tf.RaggedTensor.from_row_lengths`);
- in the `examples` signature, a dense input is a FixedLenFeature (a [B, None] input: FixedLenSequenceFeature,
  padded with zeros / "" to the longest record of the request), a ragged input a RaggedFeature (a missing key is an
  empty row), strings are bytes_list, integers and bools int64_list, floats float_list.

Sample rows for the fresh-process parity check are generated per input: ids in the range of the layer that reads
them (an Embedding's input_dim, a tfcompress layer's cardinalities, a StringLookup's vocabulary), floats from a
normal distribution, ragged rows of 0 to 4 values (an empty row included; the same row lengths for every ragged input,
as a bag's ids and its weights need).
"""

import dataclasses
import re

import numpy as np
import tensorflow as tf


VALUES_SUFFIX = "_values"
ROW_LENGTHS_SUFFIX = "_row_lengths"
MAX_SAMPLE_ROW_LENGTH = 4
# The dtypes a served input may have, and the tf.Example list each is stored in.
EXAMPLE_DTYPES = {
    tf.float16: tf.float32, tf.bfloat16: tf.float32, tf.float32: tf.float32, tf.float64: tf.float32,
    tf.int8: tf.int64, tf.int16: tf.int64, tf.int32: tf.int64, tf.int64: tf.int64, tf.uint8: tf.int64,
    tf.uint16: tf.int64, tf.uint32: tf.int64, tf.bool: tf.int64, tf.string: tf.string,
}
EXAMPLE_LIST_NAMES = {tf.float32: "float_list", tf.int64: "int64_list", tf.string: "bytes_list"}
# Signature keys TF Serving accepts and a client can type: letters, digits, _ . -, not starting with - or .
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclasses.dataclass
class ServedInput:
    """One model input as it is served.

    Attributes:
        name: the input's name (the key of a dict-input model, else the Input's name).
        dtype: its tf.DType.
        shape: its dims after the batch dim (None: unknown); for a ragged input [None] (the ragged dim).
        ragged: whether it is a RaggedTensor [B, None] (served as NAME_values + NAME_row_lengths).
        id_range: for integer inputs, the ids the layers reading it take: (low, high) or None (not an id input).
        vocabulary: for string inputs read by a StringLookup, its vocabulary (sample rows draw from it).
    """

    name: str
    dtype: tf.DType
    shape: tuple
    ragged: bool = False
    id_range: tuple = None
    vocabulary: list = None

    @property
    def tensor_names(self):
        """The names of the signature inputs that carry it."""
        if self.ragged:
            return [self.name + VALUES_SUFFIX, self.name + ROW_LENGTHS_SUFFIX]
        return [self.name]

    @property
    def example_kind(self):
        """How the `examples` signature parses it: "fixed", "sequence" ([B, None] dense) or "ragged"."""
        if self.ragged:
            return "ragged"
        return "sequence" if None in self.shape else "fixed"

    @property
    def example_dtype(self):
        return EXAMPLE_DTYPES[self.dtype]

    def specs(self):
        """The documented TensorSpecs of its signature inputs (the signature_def declares any shape)."""
        if self.ragged:
            return [tf.TensorSpec([None], self.dtype, name=self.name + VALUES_SUFFIX),
                    tf.TensorSpec([None], tf.int64, name=self.name + ROW_LENGTHS_SUFFIX)]
        return [tf.TensorSpec([None, *self.shape], self.dtype, name=self.name)]

    def describe(self):
        """The metadata entry of this input (docs/export_contract.md, "Models with other inputs")."""
        return {"name": self.name, "dtype": self.dtype.name, "shape": [None, *self.shape], "ragged": self.ragged,
                "tensors": self.tensor_names, "example_kind": self.example_kind,
                "example_dtype": self.example_dtype.name,
                "id_range": None if self.id_range is None else [int(v) for v in self.id_range]}


# ------------------------------------------------------------------------------------------- model inputs
def input_structure(model):
    """The model's inputs as the model takes them: a dict, a list or one KerasTensor."""
    functional = getattr(model, "_functional", None)  # Keras 3 Sequential: the graph built from its Input
    try:
        structure = (functional or model).input
    except AttributeError:
        raise ValueError(f"model {model.name!r} has no defined inputs: build it from keras.Input (a Sequential model "
                         "starting with keras.Input) so that export can derive its signature") from None
    if isinstance(structure, tuple):
        structure = list(structure)
    return structure


def named_inputs(model):
    """[(name, KerasTensor)] in `tf.nest.flatten` order of `input_structure(model)`."""
    structure = input_structure(model)
    if isinstance(structure, dict):
        return [(key, structure[key]) for key in sorted(structure)]
    flat = tf.nest.flatten(structure)
    return [(_tensor_name(tensor), tensor) for tensor in flat]


def _tensor_name(tensor):
    name = getattr(tensor, "name", None) or ""
    return name.split(":")[0]


def _is_ragged(tensor):
    if getattr(tensor, "ragged", False):
        return True
    return isinstance(getattr(tensor, "type_spec", None), tf.RaggedTensorSpec)


def _is_sparse(tensor):
    if getattr(tensor, "sparse", False):
        return True
    return isinstance(getattr(tensor, "type_spec", None), tf.SparseTensorSpec)


def served_inputs(model):
    """One `ServedInput` per model input, checked (names, dtypes, shapes, ragged rank).

    Raises:
        ValueError: an input that cannot be served, named with the reason: a SparseTensor input, a dtype no
            tf.Example list holds, a ragged input other than [B, None], unknown dims after the first, a name that is
            not a valid signature key or that collides with another input's served tensors.
    """
    found = []
    for name, tensor in named_inputs(model):
        dtype = tf.as_dtype(getattr(tensor, "dtype", None) or "float32")
        shape = tuple(tf.TensorShape(tensor.shape).as_list()) if tensor.shape is not None else None
        where = f"model input {name!r} ({dtype.name}, shape {shape})"
        if not name or not _NAME.match(name):
            raise ValueError(f"{where}: its name is not a valid signature key (letters, digits, '_', '.', '-'); "
                             "name the keras.Input")
        if _is_sparse(tensor):
            raise ValueError(f"{where} is a SparseTensor, which export cannot serve (TF Serving's PredictRequest "
                             "carries dense tensors): take the ids as a ragged input (keras.Input(..., ragged=True), "
                             "served as NAME_values + NAME_row_lengths) or as a padded dense input")
        if dtype not in EXAMPLE_DTYPES:
            raise ValueError(f"{where}: dtype {dtype.name} cannot be served; inputs may be "
                             f"{sorted(d.name for d in EXAMPLE_DTYPES)}")
        if shape is None or len(shape) < 1:
            raise ValueError(f"{where}: export needs inputs with a batch dimension (rank >= 1)")
        ragged = _is_ragged(tensor)
        rest = shape[1:]
        if ragged:
            ragged_rank = getattr(tensor, "ragged_rank", None)
            spec = getattr(tensor, "type_spec", None)
            if ragged_rank is None and isinstance(spec, tf.RaggedTensorSpec):
                ragged_rank = spec.ragged_rank
            if len(rest) != 1 or ragged_rank not in (None, 1):
                raise ValueError(f"{where} is ragged with shape {shape}: export serves ragged inputs of shape "
                                 "[batch, None] (one ragged dimension of scalar values) only")
            rest = (None,)
        elif None in rest[1:] or (None in rest[:1] and len(rest) > 1):
            raise ValueError(f"{where}: only the first dimension after the batch may be unknown, and then it must be "
                             "the last one ([batch, None]); give the Input a full shape")
        found.append(ServedInput(name, dtype, rest, ragged))
    names = [n for item in found for n in item.tensor_names]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"model inputs give the served tensor name(s) {duplicated} twice (a ragged input NAME is "
                         "served as NAME_values and NAME_row_lengths); rename the keras.Input")
    _add_value_ranges(model, found)
    return found


# -------------------------------------------------------------------- which layers read an input (for samples)
def _nodes(model):
    """(layer, input KerasTensors, output KerasTensors) of every call in the model's graph, nested models included."""
    functional = getattr(model, "_functional", None) or model
    calls = []
    for layer in getattr(functional, "layers", []):
        for node in getattr(layer, "_inbound_nodes", []):
            inputs = getattr(node, "input_tensors", None)
            if inputs is None:
                inputs = getattr(node, "keras_inputs", [])
            outputs = getattr(node, "output_tensors", None)
            if outputs is None:
                outputs = getattr(node, "outputs", [])
            calls.append((layer, tf.nest.flatten(inputs), tf.nest.flatten(outputs)))
    return calls


def _layer_range(layer, position=0):
    """(low, high) of the ids `layer` reads as its `position`-th flat input, a vocabulary list, or None when it is
    not an id layer."""
    feature_configs = getattr(layer, "feature_configs", None)
    if feature_configs is not None:  # CompressedEmbeddings: keras-rs FeatureConfigs, flat in the inputs' order
        features = tf.nest.flatten(feature_configs)
        table = getattr(features[position], "table", None) if position < len(features) else None
        size = getattr(table, "vocabulary_size", None)
        return (0, int(size)) if size is not None else None
    vocabulary = getattr(layer, "get_vocabulary", None)
    if callable(vocabulary):
        return list(vocabulary())
    if getattr(layer, "num_bins", None) is not None:  # Hashing: any value is fine
        return (0, 1000)
    input_dim = getattr(layer, "input_dim", None)
    if isinstance(input_dim, (int, np.integer)):
        return (0, int(input_dim))
    cardinalities = getattr(layer, "cardinalities", None)
    if cardinalities:
        return (0, int(min(cardinalities)))
    num_tokens = getattr(layer, "num_tokens", None)
    if isinstance(num_tokens, (int, np.integer)):
        return (0, int(num_tokens))
    return None


def _reached_ranges(calls, tensor, depth=0):
    """Ranges of the id layers that read `tensor`, following layers that pass it on (Reshape, Flatten, ...)."""
    found, passed = [], []
    for layer, inputs, outputs in calls:
        positions = [i for i, t in enumerate(inputs) if t is tensor]
        if not positions:
            continue
        layer_ranges = [_layer_range(layer, i) for i in positions]
        if any(r is not None for r in layer_ranges):
            found += [r for r in layer_ranges if r is not None]
        elif hasattr(layer, "layers") and hasattr(layer, "inputs"):  # a nested model: its own graph
            inner = tf.nest.flatten(layer.inputs)
            for i in positions:
                if i < len(inner):
                    found += _reached_ranges(_nodes(layer), inner[i], depth + 1)[0]
        elif depth < 4:
            passed.append(layer.name)
            for output in outputs:
                more, through = _reached_ranges(calls, output, depth + 1)
                found += more
                passed += through
    return found, passed


def _add_value_ranges(model, inputs):
    """Sets `id_range` of integer inputs and `vocabulary` of string inputs from the layers that read them."""
    calls = _nodes(model)
    tensors = dict(named_inputs(model))
    for item in inputs:
        ranges, passed = _reached_ranges(calls, tensors[item.name])
        vocabularies = [r for r in ranges if isinstance(r, list)]
        bounds = [r for r in ranges if isinstance(r, tuple)]
        if item.dtype == tf.string:
            item.vocabulary = [str(v) for v in vocabularies[0]] if vocabularies else None
        elif item.dtype.is_integer:
            if vocabularies:
                ints = [int(v) for v in vocabularies[0] if str(v).lstrip("-").isdigit()]
                bounds.append((min(ints), max(ints) + 1) if ints else (0, 1))
            if bounds:
                item.id_range = (max(b[0] for b in bounds), min(b[1] for b in bounds))


# ------------------------------------------------------------------------------------------ serving side
def signature_specs(inputs):
    """The documented TensorSpecs of `serving_default`, in order (names are the signature's input keys)."""
    return [spec for item in inputs for spec in item.specs()]


def model_feeds(model, inputs, tensors):
    """The model's input structure built from the signature's tensors {tensor name: tensor} (ragged rebuilt)."""
    values = {}
    for item in inputs:
        if item.ragged:
            values[item.name] = tf.RaggedTensor.from_row_lengths(
                tensors[item.name + VALUES_SUFFIX], tensors[item.name + ROW_LENGTHS_SUFFIX], validate=False)
        else:
            values[item.name] = tensors[item.name]
    structure = input_structure(model)
    if isinstance(structure, dict):
        return {key: values[key] for key in structure}
    return tf.nest.pack_sequence_as(structure, [values[name] for name, _ in named_inputs(model)])


def example_features(inputs):
    """The parse_example spec of the `examples` signature: {name: feature}."""
    features = {}
    for item in inputs:
        dtype = item.example_dtype
        if item.example_kind == "ragged":
            features[item.name] = tf.io.RaggedFeature(dtype, row_splits_dtype=tf.int64)
        elif item.example_kind == "sequence":
            default = "" if dtype == tf.string else 0
            features[item.name] = tf.io.FixedLenSequenceFeature([], dtype, allow_missing=True, default_value=default)
        else:
            features[item.name] = tf.io.FixedLenFeature(list(item.shape), dtype)
    return features


def parsed_to_tensors(inputs, parsed):
    """{tensor name: tensor} of serving_default from parsed Examples (cast back to each input's dtype)."""
    tensors = {}
    for item in inputs:
        value = parsed[item.name]
        if item.ragged:
            tensors[item.name + VALUES_SUFFIX] = tf.cast(value.flat_values, item.dtype)
            tensors[item.name + ROW_LENGTHS_SUFFIX] = tf.cast(value.row_lengths(), tf.int64)
        else:
            tensors[item.name] = tf.cast(value, item.dtype)
    return tensors


# ------------------------------------------------------------------------------------------------- samples
def _values(item, count, rng):
    if item.dtype == tf.string:
        if item.vocabulary:
            choices = item.vocabulary + ["__tfcompress_unseen__"]
            return np.array([choices[i].encode() for i in rng.integers(0, len(choices), count)], dtype=object)
        return np.array([f"token_{i}".encode() for i in rng.integers(0, 50, count)], dtype=object)
    if item.dtype == tf.bool:
        return rng.integers(0, 2, count).astype(bool)
    if item.dtype.is_integer:
        low, high = item.id_range
        return rng.integers(low, max(high, low + 1), count).astype(item.dtype.as_numpy_dtype)
    return rng.normal(size=count).astype(item.dtype.as_numpy_dtype)


def sample_tensors(inputs, rows, seed=0):
    """{tensor name: NumPy array} of `rows` generated rows for serving_default (strings as bytes objects).

    Raises:
        ValueError: an integer input whose id range no layer gives (pass sample_inputs= to export_saved_model).
    """
    for item in inputs:
        if item.dtype.is_integer and item.dtype != tf.bool and item.id_range is None:
            raise ValueError(f"model input {item.name!r} ({item.dtype.name}): no Embedding, tfcompress or lookup "
                             "layer reads it, so the ids to generate sample rows from are unknown; pass "
                             "sample_inputs= (in-range rows, as the model takes them) to export_saved_model")
    rng = np.random.default_rng(seed)
    # One set of row lengths for every ragged input: a bag's ids and its per-id weights must have the same rows.
    lengths = rng.integers(0, MAX_SAMPLE_ROW_LENGTH + 1, rows).astype(np.int64)
    lengths[0] = 0  # an empty row: a bag with no ids
    if rows > 1:
        lengths[1] = MAX_SAMPLE_ROW_LENGTH
    tensors = {}
    for item in inputs:
        if item.ragged:
            tensors[item.name + VALUES_SUFFIX] = _values(item, int(lengths.sum()), rng)
            tensors[item.name + ROW_LENGTHS_SUFFIX] = lengths
            continue
        shape = [rows] + [2 if d is None else d for d in item.shape]
        values = _values(item, int(np.prod(shape)), rng).reshape(shape)
        if item.id_range is not None and rows > 1:  # the edge ids in the first two rows
            values[0] = item.id_range[0]
            values[1] = item.id_range[1] - 1
            if values[0].size > 1:
                # Not only the lowest id: for a mask_zero sequence an all-zero row is all padding, which a masked
                # mean turns into NaN (and fused graph ops into another value): a row no model is asked to score.
                values[0].reshape(-1)[-1] = item.id_range[1] - 1
        tensors[item.name] = values
    return tensors


def tensors_from_model_rows(inputs, rows):
    """{tensor name: NumPy array} from rows as the model takes them ({input name: array or tf.RaggedTensor})."""
    if not isinstance(rows, dict):
        raise ValueError("sample_inputs must be a dict {input name: rows} for a model with other inputs, got "
                         f"{type(rows).__name__}")
    missing = sorted(item.name for item in inputs if item.name not in rows)
    if missing:
        raise ValueError(f"sample_inputs lacks the model input(s) {missing}")
    tensors = {}
    for item in inputs:
        value = rows[item.name]
        if item.ragged:
            ragged = value if isinstance(value, tf.RaggedTensor) else tf.ragged.constant(value, dtype=item.dtype)
            tensors[item.name + VALUES_SUFFIX] = _to_numpy(ragged.flat_values)
            tensors[item.name + ROW_LENGTHS_SUFFIX] = ragged.row_lengths().numpy().astype(np.int64)
        else:
            tensors[item.name] = _to_numpy(tf.convert_to_tensor(value, item.dtype))
    return tensors


def _to_numpy(tensor):
    value = tensor.numpy()
    return value.astype(object) if value.dtype.kind in "SO" else value


def batch_size(inputs, tensors):
    item = inputs[0]
    key = item.name + ROW_LENGTHS_SUFFIX if item.ragged else item.name
    return len(tensors[key])


def to_constants(tensors):
    """{name: tf constant} of NumPy arrays (arrays of bytes objects become tf.string)."""
    return {key: tf.constant(value, dtype=tf.string if value.dtype == object else None)
            for key, value in tensors.items()}


def model_rows(model, inputs, tensors):
    """The model's inputs (eager) from {tensor name: NumPy array}: what `model(...)` is called on for reference."""
    return model_feeds(model, inputs, to_constants(tensors))


def first_rows(inputs, tensors, rows):
    """The first `rows` rows of {tensor name: array} (ragged values cut at the end of the last row kept)."""
    first = {}
    for item in inputs:
        if item.ragged:
            lengths = tensors[item.name + ROW_LENGTHS_SUFFIX][:rows]
            first[item.name + ROW_LENGTHS_SUFFIX] = lengths
            first[item.name + VALUES_SUFFIX] = tensors[item.name + VALUES_SUFFIX][:int(np.sum(lengths))]
        else:
            first[item.name] = tensors[item.name][:rows]
    return first


def example_rows(inputs, tensors):
    """Serialized tf.train.Example per row of `tensors`, one feature per model input."""
    rows = batch_size(inputs, tensors)
    records = []
    splits = {}
    for item in inputs:
        if item.ragged:
            splits[item.name] = np.concatenate([[0], np.cumsum(tensors[item.name + ROW_LENGTHS_SUFFIX])])
    for row in range(rows):
        feature = {}
        for item in inputs:
            if item.ragged:
                start, stop = splits[item.name][row], splits[item.name][row + 1]
                values = tensors[item.name + VALUES_SUFFIX][start:stop]
            else:
                values = np.asarray(tensors[item.name][row]).reshape(-1)
            feature[item.name] = _feature(item.example_dtype, values)
        records.append(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return records


def _feature(dtype, values):
    if dtype == tf.string:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(v) for v in values]))
    if dtype == tf.int64:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def output_dict(model_outputs):
    """The model's outputs as the signature's {key: tensor}: a dict keeps its keys; one tensor is "output"; a list
    is "output_0", "output_1", ...

    Raises:
        ValueError: a ragged or sparse output (a signature output is a dense tensor).
    """
    if isinstance(model_outputs, dict):
        named = dict(model_outputs)
    elif isinstance(model_outputs, (list, tuple)):
        named = {f"output_{i}": value for i, value in enumerate(model_outputs)}
    else:
        named = {"output": model_outputs}
    for key, value in named.items():
        if isinstance(value, (tf.RaggedTensor, tf.SparseTensor)):
            raise ValueError(f"model output {key!r} is a {type(value).__name__}; a serving signature returns dense "
                             "tensors (pool or pad it in the model)")
    return {key: tf.identity(value) for key, value in named.items()}


def keras_outputs(model, inputs, tensors):
    """The Keras model's outputs on `tensors` as {key: NumPy array} (the reference of the parity checks)."""
    outputs = model(model_rows(model, inputs, tensors), training=False)
    return {key: value.numpy() for key, value in output_dict(outputs).items()}
