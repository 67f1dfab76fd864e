"""The signatures of an export: input specs, the functions traced for them, tf.Example parsing, warm-up requests.

- `serving_default` (`TENSOR_SIGNATURE`): `dense` f32[B, n_dense], `sparse` i64[B, n_sparse] -> {"probability"};
- `examples` (`EXAMPLE_SIGNATURE`): serialized `tf.train.Example` in the TFRecord layout -> {"probability"};
- `raw` and `raw_features` (with `raw_preprocessing`): raw string fields, preprocessed in graph
  (`tfcompress.export.raw_features`).

Every function calls the model as served (`tfcompress.export.serving_model.ServingModel`) on {"dense", "sparse"}
tensors; `tfcompress.export.saved_model` traces them.

Input checks (docs/export_contract.md, "Input checks"). TF Serving feeds a request's tensors by name into
Session::Run, which checks their dtypes but never their shapes against the signature's placeholders, and Grappler
folds what a signature's static shape promises: with a spec of [None, 26], a rank check becomes the constant 2 and a
rank-3 feed reaches the model's ops (measured with TF 2.21's DirectSession). So every signature input is declared
with an unknown shape (`SERVED_SHAPE`), and the first ops of every signature check rank, width and batch at run
time and fail the request with InvalidArgumentError naming the input, the expected and the received shape
(`checked_input`); `tf.ensure_shape` then gives the model its static shapes back. The documented shapes stay in
`input_signature` (ONNX) and in the export's metadata. Serialized Examples are parsed under an in-graph try
(`parse_examples`): a record that does not parse, or lacks `sparse`/`dense` of the right type and width, fails the
request naming its index and what is wrong with it, never TF's message that quotes the raw bytes.
"""

import numpy as np
import tensorflow as tf

from tfcompress.export import model_inputs
from tfcompress.export.raw_features import RAW_INPUT
from tfcompress.export.serving_config import SERVING_API_MISSING

try:
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
except ImportError as error:  # saved_model imports this module (through onnx) before serving_config
    raise ImportError(SERVING_API_MISSING) from error

TENSOR_SIGNATURE = "serving_default"
EXAMPLE_SIGNATURE = "examples"
EXAMPLES_INPUT = "examples"
OUTPUT_KEY = "probability"


# The shape every signature input declares in the SavedModel's signature_def: unknown (any rank), so that nothing
# can be folded from it; the graph checks the documented shape (`checked_input`).
SERVED_SHAPE = None
# A feature key no record is expected to hold: parsing it alone tells whether a record is an Example at all.
_PROBE_KEY = "__tfcompress_probe__"


def input_signature(n_dense, n_sparse):
    """The documented inputs of `serving_default`: dense f32[B, n_dense], sparse i64[B, n_sparse] (ONNX takes these).

    The signature itself declares `SERVED_SHAPE` and checks these shapes in graph (`served_signature`).
    """
    return [tf.TensorSpec([None, n_dense], tf.float32, name="dense"),
            tf.TensorSpec([None, n_sparse], tf.int64, name="sparse")]


def served_signature(specs):
    """`specs` as the signature_def declares them: the same names and dtypes, shape `SERVED_SHAPE`."""
    return [tf.TensorSpec(SERVED_SHAPE, spec.dtype, name=spec.name) for spec in specs]


def shape_text(shape):
    """[None, 26] -> "[batch, 26]"."""
    return "[" + ", ".join("batch" if d is None else str(d) for d in shape) + "]"


def _shape_string(shape):
    """A run-time shape (int vector) as text: "[2, 27]"."""
    return tf.strings.join(["[", tf.strings.reduce_join(tf.strings.as_string(shape), separator=", "), "]"])


def _fail_unless(ok, message, name):
    """An Assert that fails the request with `message` (a string tensor) when `ok` is false."""
    return tf.debugging.Assert(ok, [message], name=name)


def checked_input(tensor, name, shape):
    """`tensor` after a run-time check that it has `shape` (None: any size), with that shape made static.

    The check runs in graph whatever the caller: TF Serving's Session::Run, a v1 Session or a loaded signature. A
    wrong rank or width fails with InvalidArgumentError "input NAME: expected DTYPE [batch, 26], received shape
    [2, 27]". (Assert escapes quotes in its message, so the input's name is not quoted.)
    """
    received = tf.shape(tensor, out_type=tf.int64)
    rank = len(shape)
    padded = tf.concat([received, tf.fill([rank], tf.constant(-1, tf.int64))], axis=0)[:rank]
    ok = tf.equal(tf.size(received), rank)
    for axis, size in enumerate(shape):
        if size is not None:
            ok = tf.logical_and(ok, tf.equal(padded[axis], size))
    message = tf.strings.join([f"input {name}: expected {tensor.dtype.name} {shape_text(shape)}, received shape ",
                               _shape_string(received)])
    with tf.control_dependencies([_fail_unless(ok, message, f"check_{name}")]):
        return tf.ensure_shape(tf.identity(tensor), shape)


def checked_batch(tensors):
    """{name: tensor} after a run-time check that all have the same number of rows."""
    names = sorted(tensors)
    rows = [tf.shape(tensors[name], out_type=tf.int64)[0] for name in names]
    ok = tf.reduce_all(tf.equal(tf.stack(rows), rows[0]))
    received = [piece for i, (name, n) in enumerate(zip(names, rows))
                for piece in (f"{', ' if i else ' '}{name} ", tf.strings.as_string(n))]
    message = tf.strings.join([f"inputs {' and '.join(names)}: expected the same number of rows (one per example), "
                               "received"] + received)
    with tf.control_dependencies([_fail_unless(ok, message, "check_batch")]):
        return {name: tf.identity(tensors[name]) for name in names}


def checked_tensor_inputs(dense, sparse, n_dense, n_sparse):
    """serving_default's inputs, checked (rank, width, the same batch) and with static shapes."""
    dense = checked_input(dense, "dense", [None, n_dense])
    sparse = checked_input(sparse, "sparse", [None, n_sparse])
    both = checked_batch({"dense": dense, "sparse": sparse})
    return both["dense"], both["sparse"]


def example_features(n_dense, n_sparse):
    """parse_example spec of the TFRecord layout; `label` is not parsed (clients at serving have none)."""
    spec = {"sparse": tf.io.FixedLenFeature([n_sparse], tf.int64)}
    if n_dense > 0:
        spec["dense"] = tf.io.FixedLenFeature([n_dense], tf.float32)
    return spec


def _try(function, args, fallback):
    """(True, function(*args)), or (False, fallback) when it raises: an in-graph try.

    A one-element tf.data pipeline whose errors are dropped (`ignore_errors`), followed by the fallback; the first
    element is taken. Stock ops (TensorDataset, MapDataset, IgnoreErrorsDataset, ConcatenateDataset, TakeDataset,
    DatasetToSingleElement); 0.1 to 0.3 ms per request on 2 CPU cores (docs/export_contract.md).
    """
    attempt = tf.data.Dataset.from_tensors(args).map(lambda *a: (tf.constant(True), function(*a))).ignore_errors()
    otherwise = tf.data.Dataset.from_tensors((tf.constant(False), fallback))
    return attempt.concatenate(otherwise).take(1).get_single_element()


def _layout_checks(n_dense, n_sparse):
    """(key, dtype, list name, width) of the TFRecord layout's features, as `_record_problem` checks them."""
    checks = [("sparse", tf.int64, "int64_list", n_sparse)]
    if n_dense > 0:
        checks.append(("dense", tf.float32, "float_list", n_dense))
    return checks


def _example_expectation(checks):
    """"int64 sparse[26] and float dense[13]" ("[var]" for a feature of any length)."""
    parts = [f"{'float' if dtype == tf.float32 else dtype.name if dtype != tf.string else 'bytes'} "
             f"{key}[{'var' if width is None else width}]" for key, dtype, _, width in checks]
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def _record_problem(record, checks):
    """Why one serialized record fails to parse: a string tensor (run only on the failure path).

    `checks`: (key, dtype, list name, width) per feature; width None for a feature of any length (ragged or
    sequence inputs), which is only checked for its list type.
    """
    one = tf.reshape(record, [1])
    parses, _ = _try(lambda r: tf.io.parse_example(r, {_PROBE_KEY: tf.io.VarLenFeature(tf.string)})[_PROBE_KEY]
                     .values, (one,), tf.zeros([0], tf.string))
    reasons = [(tf.logical_not(parses), tf.constant("its bytes do not parse as a tf.train.Example"))]
    for key, dtype, list_name, width in checks:
        typed, values = _try(lambda r, key=key, dtype=dtype: tf.io.parse_example(r, {key: tf.io.VarLenFeature(dtype)})
                             [key].values, (one,), tf.zeros([0], dtype))
        reasons.append((tf.logical_not(typed), tf.constant(f"its feature {key} is not a valid {list_name}")))
        if width is None:
            continue
        count = tf.size(values, out_type=tf.int64)
        reasons += [
            (tf.equal(count, 0), tf.constant(f"it has no feature {key} (or an empty one)")),
            (tf.not_equal(count, width),
             tf.strings.join([f"its feature {key} has ", tf.strings.as_string(count), f" values, expected {width}"])),
        ]
    why = tf.constant("TensorFlow's parser rejects it")
    for condition, text in reversed(reasons):
        why = tf.where(condition, text, why)
    return why


def _empty_parsed(feature):
    """A zero-row value of what parse_example gives for `feature` (the fallback of the in-graph try)."""
    if isinstance(feature, tf.io.RaggedFeature):
        return tf.RaggedTensor.from_row_lengths(tf.zeros([0], feature.dtype), tf.zeros([0], feature.row_splits_dtype))
    if isinstance(feature, tf.io.FixedLenSequenceFeature):
        return tf.zeros([0, 0] + list(feature.shape), feature.dtype)
    return tf.zeros([0] + list(feature.shape), feature.dtype)


def parse_examples(examples, n_dense, n_sparse):
    """A checked vector of serialized Examples -> {"dense", "sparse"} in the TFRecord layout.

    All records are parsed at once under `_try`. Only when that fails are the records tried one by one, and the
    request fails with InvalidArgumentError naming the first bad record and why: "input examples: record 3 of 8 is
    not a serialized tf.train.Example with int64 sparse[26] and float dense[13]: its feature sparse has 25 values,
    expected 26". TF's own message for bytes that do not parse quotes them raw, and names no record.
    """
    return parse_example_records(examples, example_features(n_dense, n_sparse), _layout_checks(n_dense, n_sparse))


def parse_example_records(examples, features, checks):
    """A checked vector of serialized Examples parsed with `features` ({key: tf.io feature}), or the request fails
    naming the first bad record and why (`parse_examples`; `checks` as in `_record_problem`)."""
    fallback = {key: _empty_parsed(feature) for key, feature in features.items()}
    parsed_ok, parsed = _try(lambda e: tf.io.parse_example(e, features), (examples,), fallback)

    def first_bad_record():
        n = tf.size(examples, out_type=tf.int64)
        good = (tf.data.Dataset.range(n)
                .map(lambda i: (i, tf.io.parse_example(tf.reshape(examples[i], [1]), features)))
                .ignore_errors()
                .map(lambda i, _: i)
                .batch(tf.maximum(n, 1))
                .concatenate(tf.data.Dataset.from_tensors(tf.zeros([0], tf.int64)))
                .take(1).get_single_element())
        parsed_alone = tf.scatter_nd(good[:, None], tf.ones_like(good, tf.int32), tf.reshape(n, [1]))
        index = tf.argmin(tf.concat([parsed_alone, [0]], axis=0), output_type=tf.int64)  # n when every record parses
        record = tf.gather(tf.concat([examples, [""]], axis=0), index)
        why = tf.cond(index < n, lambda: _record_problem(record, checks),
                      lambda: tf.constant("the batch does not parse, although each record does alone"))
        return tf.strings.join([f"input {EXAMPLES_INPUT}: record ", tf.strings.as_string(index), " of ",
                                tf.strings.as_string(n), " is not a serialized tf.train.Example with "
                                f"{_example_expectation(checks)}: ", why])

    message = tf.cond(parsed_ok, lambda: tf.constant(""), first_bad_record)
    with tf.control_dependencies([_fail_unless(parsed_ok, message, f"check_{EXAMPLES_INPUT}_records")]):
        return tf.nest.map_structure(tf.identity, parsed, expand_composites=True)


def serving_functions(model, n_dense, n_sparse):
    """The two signature functions (tf.function, not yet traced): tensors -> probability, Examples -> probability.

    Args:
        model: the model as served, {"dense", "sparse"} -> probability [B, 1]: a
            `tfcompress.export.serving_model.ServingModel` (or any callable taking that dict).
        n_dense, n_sparse: the widths of the inputs.
    """

    def probability(dense, sparse):
        values = model({"dense": dense, "sparse": sparse})
        return {OUTPUT_KEY: tf.cast(tf.reshape(values, [-1, 1]), tf.float32)}

    @tf.function(input_signature=served_signature(input_signature(n_dense, n_sparse)))
    def serve_tensors(dense, sparse):
        return probability(*checked_tensor_inputs(dense, sparse, n_dense, n_sparse))

    @tf.function(input_signature=served_signature([tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)]))
    def serve_examples(examples):
        examples = checked_input(examples, EXAMPLES_INPUT, [None])
        parsed = parse_examples(examples, n_dense, n_sparse)
        dense = parsed["dense"] if n_dense > 0 else tf.zeros([tf.shape(examples)[0], 0], tf.float32)
        return probability(dense, parsed["sparse"])

    return serve_tensors, serve_examples


def model_input_functions(model, inputs):
    """The two signature functions (not yet traced) of a model with other inputs ("Models with other inputs").

    `serving_default` takes one tensor per dense input and NAME_values + NAME_row_lengths per ragged input
    (`tfcompress.export.model_inputs.ServedInput`), checks every documented shape, that all inputs have the same
    number of rows and that each ragged input's row lengths add up to its values, then calls the model as served.
    `examples` parses serialized Examples with one feature per input (`model_inputs.example_features`) into the same
    tensors. Both return the model's outputs (`model_inputs.output_dict`).

    Args:
        model: the model as served: a `tfcompress.export.serving_model.ServingModel` of the Keras model.
        inputs: `model_inputs.served_inputs(keras_model)`.
    """
    specs = model_inputs.signature_specs(inputs)

    def outputs(tensors):
        return model_inputs.output_dict(model(model_inputs.model_feeds(model.model, inputs, tensors)))

    @tf.function(input_signature=served_signature(specs))
    def serve_tensors(*tensors):
        checked = {spec.name: checked_input(tensor, spec.name, spec.shape.as_list())
                   for spec, tensor in zip(specs, tensors)}
        return outputs(checked_model_tensors(inputs, checked))

    features = model_inputs.example_features(inputs)
    checks = [(item.name, item.example_dtype, model_inputs.EXAMPLE_LIST_NAMES[item.example_dtype],
               int(np.prod(item.shape)) if item.example_kind == "fixed" else None) for item in inputs]

    @tf.function(input_signature=served_signature([tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)]))
    def serve_examples(examples):
        examples = checked_input(examples, EXAMPLES_INPUT, [None])
        parsed = parse_example_records(examples, features, checks)
        return outputs(model_inputs.parsed_to_tensors(inputs, parsed))

    return serve_tensors, serve_examples


def checked_model_tensors(inputs, tensors):
    """{tensor name: tensor} of a model with other inputs after run-time checks that every input has the same
    number of rows, and that each ragged input's row lengths are >= 0 and add up to its number of values."""
    checked = dict(tensors)
    rows = {}
    for item in inputs:
        if item.ragged:
            values_name = item.name + model_inputs.VALUES_SUFFIX
            lengths_name = item.name + model_inputs.ROW_LENGTHS_SUFFIX
            lengths, values = tensors[lengths_name], tensors[values_name]
            total = tf.reduce_sum(lengths)
            count = tf.shape(values, out_type=tf.int64)[0]
            ok = tf.logical_and(tf.equal(total, count), tf.reduce_all(lengths >= 0))
            message = tf.strings.join([f"input {item.name}: {lengths_name} must be >= 0 and add up to the number of "
                                       f"{values_name}, received a sum of ", tf.strings.as_string(total), " for ",
                                       tf.strings.as_string(count), " values"])
            with tf.control_dependencies([_fail_unless(ok, message, f"check_{item.name}_row_lengths")]):
                checked[lengths_name] = tf.identity(lengths)
            rows[lengths_name] = checked[lengths_name]
        else:
            rows[item.name] = checked[item.name]
    if len(rows) > 1:
        checked.update(checked_batch(rows))
    return checked


def raw_serving_functions(model, preprocessor):
    """The raw-string signature functions (not yet traced) of a `tfcompress.export.raw_features.RawPreprocessor`.

    `model` is the model as served (see `serving_functions`). `raw`: fields -> {probability (NaN where the row is
    rejected), valid, reject_reason}; `raw_features`: fields -> the converter's {dense, sparse, valid,
    reject_reason}. Rejected rows reach the model as zeros (always in range) and their probability is replaced, so
    one bad row never fails a batched request. `fields` of another rank or width fails the request
    (`checked_input`).
    """

    shape = [None, len(preprocessor.spec.columns)]
    spec = served_signature([tf.TensorSpec(shape, tf.string, name=RAW_INPUT)])

    @tf.function(input_signature=spec)
    def serve_raw(fields):
        features = preprocessor(checked_input(fields, RAW_INPUT, shape))
        probability = model({"dense": features["dense"], "sparse": features["sparse"]})
        probability = tf.cast(tf.reshape(probability, [-1, 1]), tf.float32)
        probability = tf.where(features["valid"][:, None], probability, tf.constant(np.nan, tf.float32))
        return {OUTPUT_KEY: probability, "valid": features["valid"], "reject_reason": features["reject_reason"]}

    @tf.function(input_signature=spec)
    def serve_raw_features(fields):
        return preprocessor(checked_input(fields, RAW_INPUT, shape))

    return serve_raw, serve_raw_features


def write_warmup_requests(path, model_name, samples, rows=8):
    """TF Serving's warmup file (a TFRecord of PredictionLog): one PredictRequest per signature."""

    dense, sparse = samples["dense"][:rows], samples["sparse"][:rows]
    _write_warmup_file(path, model_name, {"dense": dense, "sparse": sparse},
                       [serialize_example(d, s) for d, s in zip(dense, sparse)])


def _write_warmup_file(path, model_name, tensors, records):
    """The warmup TFRecord of PredictionLogs: `serving_default` on {input key: NumPy array} (arrays of bytes
    objects as strings) and `examples` on the serialized `records`."""
    tensor_request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=TENSOR_SIGNATURE))
    for key, value in tensors.items():
        tensor_request.inputs[key].CopyFrom(tf.make_tensor_proto(value, dtype=tf.string if value.dtype == object
                                                                 else None))
    example_request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=EXAMPLE_SIGNATURE))
    example_request.inputs[EXAMPLES_INPUT].CopyFrom(tf.make_tensor_proto(records, dtype=tf.string))
    with tf.io.TFRecordWriter(path) as writer:
        for request in (tensor_request, example_request):
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def serialize_example(dense, sparse, label=None):
    """One row as a serialized tf.train.Example in the TFRecord layout (label optional)."""
    feature = {"sparse": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in sparse]))}
    if len(dense):
        feature["dense"] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in dense]))
    if label is not None:
        feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_model_input_warmup(path, model_name, inputs, tensors, rows=8):
    """TF Serving's warmup file for a model with other inputs: one PredictRequest per signature on the first
    `rows` rows (ragged inputs as NAME_values + NAME_row_lengths)."""
    first = model_inputs.first_rows(inputs, tensors, rows)
    _write_warmup_file(path, model_name, first, model_inputs.example_rows(inputs, first))
