"""Check exported SavedModels the way a stock TF Serving would see them. Run as a script, never imported:

    python tfcompress/export/verify_standalone.py saved_models/NAME/VERSION [more versions ...] [--json report.json]

This file must not import tfcompress (TF Serving's binary has none of it, nor the ROBE custom-op library). It uses
only the standard library, NumPy and TensorFlow, plus tensorflow-serving-api and onnxruntime when installed. Run
as a script, Python puts this file's directory (tfcompress/export/, which holds e.g. `onnx.py`) first on
sys.path; that entry is removed before anything else is imported so no package module can shadow another (an
`import onnxruntime` must not find tfcompress/export/onnx.py as `onnx`).

Checks, per SavedModel directory (each one PASS, FAIL or SKIP with the reason):

  isolation       `tfcompress` is not imported and no tfcompress/custom-op shared library is mapped in this process
  stock_ops       every op of every graph and nested function is registered in this process's stock op registry
  load            tf.saved_model.load succeeds
  signatures      serving_default(dense, sparse) and examples(examples) exist with the documented dtypes, and the
                  shapes their signature_defs declare (any shape, checked in graph; older exports: [None, n])
  keras_parity    serving_default on the sample rows vs the Keras model's predictions (export's stated tolerance)
  serving_parity  the same vs the serving graph's predictions in the exporting process (1e-5)
  examples        the examples signature on tf.train.Example bytes built here (with and without `label`) equals
                  serving_default on the same rows
  predict_request a tensorflow-serving-api PredictRequest for the examples signature, serialized and parsed back
                  (as the server receives it), then its tensor proto fed to the signature
  warmup          the SavedModel's assets.extra/tf_serving_warmup_requests replayed as TF Serving does on load
  bad_ids         ids outside [0, n) (-1, n, 2^40, ...): with the "mod" rule no error and predictions equal those of
                  the ids folded with a floor modulo (computed here with NumPy); with a raising rule an
                  InvalidArgumentError, after which the model still serves valid rows
  bad_inputs      (exports that check inputs in graph) a sparse one column too wide, a rank-3 sparse, a record
                  that is not an Example and (raw signature) fields one column short are each refused with an
                  InvalidArgumentError naming the input and the shapes or the record; valid rows still serve
  onnx            model.onnx (when exported) run with onnxruntime vs the SavedModel, valid and bad ids (1e-5)
  raw             (exports with the raw-string signature) `raw_features` on the stored sample raw rows equals what
                  the converter wrote for them (ids, valid flags and reject reasons exactly, dense to 1e-6), and
                  `raw` equals serving_default on the converter's rows (1e-6), NaN where the row is rejected

Exports of models with other inputs (metadata `contract: "model_inputs"`) get the same checks on their own
inputs and outputs (`verify_model_inputs`): parity over every output, Examples built from the metadata's input list
(ragged inputs as variable-length features), PredictRequests with ragged inputs as NAME_values + NAME_row_lengths,
refusals of row lengths that do not add up; bad_ids and onnx are SKIP.

The checker also prints the size table (bytes per saved variable from the checkpoint itself, total, against the uncompressed
model). Exit status 0 when nothing FAILed, 1 otherwise, 2 for bad arguments.
"""

import os
import sys

# Before any other import: drop this file's directory (tfcompress/export/) from the module search path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402
from tensorflow.python.framework import op_def_registry  # noqa: E402

# Mirrors tfcompress.export.saved_model, .signatures and .raw_features (a test keeps them equal): the checker
# cannot import the package to read them.
METADATA_DIR = "assets.extra"
METADATA_FILE = "tfcompress_export.json"
SAMPLES_FILE = "tfcompress_samples.npz"
RAW_SAMPLES_FILE = "tfcompress_raw_samples.npz"
RAW_SIGNATURE = "raw"
RAW_FEATURES_SIGNATURE = "raw_features"
RAW_INPUT = "fields"
WARMUP_FILE = "tf_serving_warmup_requests"
TENSOR_SIGNATURE = "serving_default"
EXAMPLE_SIGNATURE = "examples"
EXAMPLES_INPUT = "examples"
OUTPUT_KEY = "probability"
MODEL_INPUTS_CONTRACT = "model_inputs"
VALUES_SUFFIX = "_values"
ROW_LENGTHS_SUFFIX = "_row_lengths"
EXACT_TOLERANCE = 1e-6  # two signatures of one SavedModel on the same rows: the same ops on the same values


class Report:
    """Results of the checks on one SavedModel."""

    def __init__(self, path):
        self.path = path
        self.checks = {}
        self.details = {}

    def record(self, name, status, message=""):
        self.checks[name] = {"status": status, "message": message}
        print(f"  {status:<5} {name:<16} {message}", flush=True)

    def passed(self, name, message=""):
        self.record(name, "PASS", message)

    def failed(self, name, message):
        self.record(name, "FAIL", message)

    def skipped(self, name, message):
        self.record(name, "SKIP", message)

    @property
    def ok(self):
        return all(check["status"] != "FAIL" for check in self.checks.values())

    def as_dict(self):
        return {"path": self.path, "ok": self.ok, "checks": self.checks, **self.details}


# -------------------------------------------------------------------------------------------------- checks
def check_isolation(report):
    """Nothing of tfcompress in this process: not the package, not its custom-op library."""
    imported = sorted(name for name in sys.modules if name == "tfcompress" or name.startswith("tfcompress."))
    mapped = set()
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                library = parts[-1] if len(parts) >= 6 else ""
                if library.endswith(".so") or ".so." in library:
                    base = os.path.basename(library)
                    if base.startswith("_robe_ops") or f"{os.sep}tfcompress{os.sep}" in library:
                        mapped.add(library)
    report.details["isolation"] = {"tfcompress_modules": imported, "custom_libraries": sorted(mapped)}
    if imported or mapped:
        report.failed("isolation", f"tfcompress modules {imported}, custom libraries {sorted(mapped)}")
    else:
        report.passed("isolation", "tfcompress not imported, no custom-op library loaded")


def graph_ops(saved_model_path):
    """{op type: sorted names of the graphs/functions using it} over every meta graph and function library."""
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    uses, functions = {}, set()
    for meta_graph in proto.meta_graphs:
        graph_def = meta_graph.graph_def
        functions.update(function.signature.name for function in graph_def.library.function)
        groups = [("<graph>", graph_def.node)] + [
            (function.signature.name, function.node_def) for function in graph_def.library.function
        ]
        for owner, nodes in groups:
            for node in nodes:
                uses.setdefault(node.op, set()).add(owner)
    # A node whose op is a library function's name calls that function (whose own nodes are listed too).
    return {op: sorted(owners) for op, owners in uses.items()}, functions


def check_stock_ops(report, path):
    uses, functions = graph_ops(path)
    ops = {op: owners for op, owners in uses.items() if op not in functions}
    unknown = {op: owners for op, owners in ops.items() if op_def_registry.get(op) is None}
    report.details["ops"] = sorted(ops)
    report.details["functions"] = len(functions)
    if unknown:
        listed = "; ".join(f"{op} (in {', '.join(owners[:3])})" for op, owners in sorted(unknown.items()))
        report.details["non_stock_ops"] = sorted(unknown)
        report.failed("stock_ops", f"{len(unknown)} op(s) not in the stock TensorFlow registry: {listed}")
    else:
        report.details["non_stock_ops"] = []
        report.passed("stock_ops", f"{len(ops)} distinct ops in {len(functions)} functions, all stock TensorFlow")


def _probability(signature, dense, sparse):
    return signature(dense=tf.constant(dense, tf.float32), sparse=tf.constant(sparse, tf.int64))[OUTPUT_KEY].numpy()


def _max_difference(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _declared_inputs(metadata, name):
    """{key: [dtype, shape]} that the signature_def of `name` declares: `signature_def_inputs` (shape null: any,
    the graph checks the documented `inputs` shapes itself), or `inputs` for exports from before those checks."""
    entry = metadata["signatures"][name]
    return entry.get("signature_def_inputs", entry["inputs"])


def _spec_matches(spec, dtype, shape):
    if spec is None or spec.dtype.name != dtype:
        return False
    if shape is None:
        return spec.shape.rank is None
    return spec.shape.rank is not None and spec.shape.as_list() == shape


def check_signatures(report, loaded, metadata):
    problems = []
    for name in (TENSOR_SIGNATURE, EXAMPLE_SIGNATURE):
        if name not in loaded.signatures:
            problems.append(f"missing signature {name!r}")
            continue
        signature = loaded.signatures[name]
        inputs = signature.structured_input_signature[1]
        for key, (dtype, shape) in _declared_inputs(metadata, name).items():
            spec = inputs.get(key)
            if not _spec_matches(spec, dtype, shape):
                problems.append(f"{name}.{key}: expected {dtype} {'any shape' if shape is None else shape}, "
                                f"got {spec}")
        outputs = signature.structured_outputs
        if is_model_inputs(metadata):
            for key, (dtype, _) in metadata["signatures"][name]["outputs"].items():
                if key not in outputs or outputs[key].dtype.name != dtype:
                    problems.append(f"{name}: no {dtype} output {key!r}")
        elif OUTPUT_KEY not in outputs or outputs[OUTPUT_KEY].dtype != tf.float32:
            problems.append(f"{name}: no float32 output {OUTPUT_KEY!r}")
    if problems:
        report.failed("signatures", "; ".join(problems))
    else:
        report.passed("signatures", f"{sorted(loaded.signatures)}")
    return not problems


def check_parity(report, signature, samples, metadata):
    probability = _probability(signature, samples["dense"], samples["sparse"])
    keras_difference = _max_difference(probability, samples["keras_probability"])
    tolerance = metadata["keras_tolerance"]
    label = f"quantize={metadata['quantize']}" if metadata.get("quantize") else "float32"
    message = f"max |diff| {keras_difference:.2e} on {len(probability)} rows (tolerance {tolerance:g}, {label})"
    report.details["keras_max_abs_difference"] = keras_difference
    (report.passed if keras_difference <= tolerance else report.failed)("keras_parity", message)
    serving_difference = _max_difference(probability, samples["serving_probability"])
    tolerance = metadata["parity_tolerance"]
    message = f"max |diff| {serving_difference:.2e} (tolerance {tolerance:g})"
    (report.passed if serving_difference <= tolerance else report.failed)("serving_parity", message)
    return probability


def example_bytes(dense, sparse, with_label):
    """Serialized tf.train.Example per row in the TFRecord layout, built with the protobuf API."""
    records = []
    for row, (d, s) in enumerate(zip(dense, sparse)):
        feature = {"sparse": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in s]))}
        if len(d):
            feature["dense"] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in d]))
        if with_label:
            feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[row % 2]))
        records.append(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return records


def check_examples(report, signature, samples, probability):
    differences = []
    for with_label in (True, False):
        records = example_bytes(samples["dense"], samples["sparse"], with_label)
        result = signature(**{EXAMPLES_INPUT: tf.constant(records)})[OUTPUT_KEY].numpy()
        differences.append(_max_difference(result, probability))
    worst = max(differences)
    message = f"max |diff| vs serving_default {worst:.2e} (with and without label)"
    (report.passed if worst <= EXACT_TOLERANCE else report.failed)("examples", message)


def check_predict_request(report, loaded, samples, probability, model_name, required):
    try:
        # optional in the verifier: only the PredictRequest check needs it
        from tensorflow_serving.apis import model_pb2, predict_pb2
    except ImportError:
        (report.failed if required else report.skipped)("predict_request", "tensorflow-serving-api not installed")
        return
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=EXAMPLE_SIGNATURE))
    records = example_bytes(samples["dense"], samples["sparse"], with_label=False)
    request.inputs[EXAMPLES_INPUT].CopyFrom(tf.make_tensor_proto(records, dtype=tf.string))
    # What the server does: bytes off the wire -> PredictRequest -> the named signature's inputs as tensors.
    received = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    signature = loaded.signatures[received.model_spec.signature_name]
    feeds = {key: tf.constant(tf.make_ndarray(proto)) for key, proto in received.inputs.items()}
    result = signature(**feeds)[OUTPUT_KEY].numpy()
    difference = _max_difference(result, probability)
    message = f"{len(records)} Examples via PredictRequest({received.model_spec.signature_name!r}), " \
              f"max |diff| {difference:.2e}"
    (report.passed if difference <= EXACT_TOLERANCE else report.failed)("predict_request", message)


def check_warmup(report, loaded, path, metadata):
    warmup = os.path.join(path, METADATA_DIR, WARMUP_FILE)
    if not os.path.exists(warmup):
        report.skipped("warmup", "no warmup file (written when tensorflow-serving-api is installed at export)")
        return
    try:
        # optional in the verifier: only the PredictRequest check needs it
        from tensorflow_serving.apis import prediction_log_pb2
    except ImportError:
        report.skipped("warmup", "tensorflow-serving-api not installed here")
        return
    replayed = []
    for record in tf.data.TFRecordDataset(warmup).as_numpy_iterator():
        request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
        signature = loaded.signatures[request.model_spec.signature_name or TENSOR_SIGNATURE]
        feeds = {key: tf.constant(tf.make_ndarray(proto)) for key, proto in request.inputs.items()}
        outputs = signature(**feeds)
        if OUTPUT_KEY in outputs and not is_model_inputs(metadata):
            output = outputs[OUTPUT_KEY].numpy()
            if output.ndim != 2 or output.shape[1] != 1 or not np.all(np.isfinite(output)):
                report.failed("warmup", f"request for {request.model_spec.signature_name!r} gave shape "
                                        f"{output.shape}")
                return
        else:  # a model with other inputs: every output has one row per request row (its values are the model's)
            row_keys = [EXAMPLES_INPUT] if request.model_spec.signature_name == EXAMPLE_SIGNATURE else \
                [item["name"] + ROW_LENGTHS_SUFFIX if item["ragged"] else item["name"] for item in metadata["inputs"]]
            rows = {len(feeds[key]) for key in row_keys}
            bad = [key for key, value in outputs.items() if value.shape.rank == 0 or {value.shape[0]} != rows]
            if bad:
                report.failed("warmup", f"request for {request.model_spec.signature_name!r} gave outputs {bad} "
                                        f"without one row per example")
                return
        replayed.append(request.model_spec.signature_name)
    report.passed("warmup", f"replayed {len(replayed)} PredictRequests: {replayed}")


def out_of_range_rows(n_dense, cardinalities):
    """Ids no table has, one kind per row (the same kinds the exporter checks)."""
    cards = np.asarray(cardinalities, np.int64)
    sparse = np.stack([-np.ones_like(cards), cards, cards + 12345, np.full_like(cards, 2**40),
                       np.full_like(cards, -(2**40) - 3), np.where(np.arange(len(cards)) % 2 == 0, cards - 1, -7)])
    return np.zeros((len(sparse), n_dense), np.float32), sparse


def check_bad_ids(report, signature, metadata, samples):
    dense, sparse = out_of_range_rows(metadata["n_dense"], metadata["cardinalities"])
    if metadata["bad_ids_raise"]:
        try:
            _probability(signature, dense, sparse)
        except tf.errors.InvalidArgumentError as error:
            lines = [line.strip() for line in str(error.message).splitlines() if line.strip()]
            first_line = next((line for line in lines if "assertion failed" in line), lines[0] if lines else "")
            first_line = first_line[:160]
            again = _probability(signature, samples["dense"], samples["sparse"])
            fine = np.all(np.isfinite(again))
            (report.passed if fine else report.failed)(
                "bad_ids", f"rule {metadata['serving_out_of_range']}: request rejected ({first_line}); "
                           "valid rows still served")
            return
        report.failed("bad_ids", "the export says out-of-range ids raise, but no error was raised")
        return
    try:
        result = _probability(signature, dense, sparse)
    except tf.errors.OpError as error:
        report.failed("bad_ids", f"out-of-range ids made the model fail: {type(error).__name__}")
        return
    folded = np.mod(sparse, np.asarray(metadata["cardinalities"], np.int64))  # NumPy's mod is a floor modulo
    reference = _probability(signature, dense, folded)
    difference = _max_difference(result, reference)
    in_range = bool(np.all((result >= 0) & (result <= 1)))
    ok = difference <= EXACT_TOLERANCE and in_range
    (report.passed if ok else report.failed)(
        "bad_ids", f"{len(sparse)} rows of ids like -1, n, 2^40: no error, max |diff| vs floor-mod ids "
                   f"{difference:.2e}")


def _refusal(signature, feeds):
    """The InvalidArgumentError message of a request that must be refused, or None when it was served."""
    try:
        signature(**{key: tf.constant(value) for key, value in feeds.items()})
    except tf.errors.InvalidArgumentError as error:
        return str(error.message)
    return None


def _refusal_problems(loaded, cases):
    """What went wrong with [(signature name, feeds, expected message part)] requests that must all be refused."""
    problems = []
    for name, feeds, expected in cases:
        message = _refusal(loaded.signatures[name], feeds)
        if message is None or expected not in message:
            problems.append(f"{name} {sorted(feeds)}: expected an InvalidArgumentError with {expected!r}, got "
                            f"{'none' if message is None else repr(message.strip().splitlines()[0][:200])}")
    return problems


def check_bad_inputs(report, loaded, metadata, samples):
    """Requests of the wrong shape, or records that are not Examples, are refused naming the input (in graph)."""
    if "signature_def_inputs" not in metadata["signatures"][TENSOR_SIGNATURE]:
        report.skipped("bad_inputs", "the export predates the in-graph input checks")
        return
    n_sparse = metadata["n_sparse"]
    dense, sparse = samples["dense"][:2], samples["sparse"][:2]
    records = example_bytes(dense, sparse, with_label=False)
    cases = [
        (TENSOR_SIGNATURE, {"dense": dense, "sparse": np.concatenate([sparse, sparse[:, :1]], axis=1)},
         f"input sparse: expected int64 [batch, {n_sparse}], received shape [2, {n_sparse + 1}]"),
        (TENSOR_SIGNATURE, {"dense": dense, "sparse": sparse[:, :, None]},
         f"input sparse: expected int64 [batch, {n_sparse}], received shape [2, {n_sparse}, 1]"),
        (EXAMPLE_SIGNATURE, {EXAMPLES_INPUT: np.array([records[0], b"\xff not an Example"], dtype=object)},
         f"input {EXAMPLES_INPUT}: record 1 of 2 is not a serialized tf.train.Example"),
    ]
    if RAW_SIGNATURE in metadata["signatures"]:
        columns = metadata["signatures"][RAW_SIGNATURE]["inputs"][RAW_INPUT][1][1]
        cases.append((RAW_SIGNATURE, {RAW_INPUT: np.full((1, columns - 1), b"", dtype=object)},
                      f"input {RAW_INPUT}: expected string [batch, {columns}], received shape [1, {columns - 1}]"))
    problems = _refusal_problems(loaded, cases)
    again = _probability(loaded.signatures[TENSOR_SIGNATURE], samples["dense"], samples["sparse"])
    if not np.all(np.isfinite(again)):
        problems.append("valid rows are not served after the refused requests")
    if problems:
        report.failed("bad_inputs", "; ".join(problems))
    else:
        report.passed("bad_inputs", f"{len(cases)} malformed requests refused naming the input; valid rows still "
                                    "served")


def check_onnx(report, path, metadata, signature, samples, required):
    onnx_info = metadata.get("onnx")
    if not onnx_info:
        report.skipped("onnx", "not exported (export with onnx=True / --onnx)")
        return
    try:
        import onnxruntime  # optional: the [export] extra
    except ImportError:
        (report.failed if required else report.skipped)("onnx", "onnxruntime not installed")
        return
    session = onnxruntime.InferenceSession(os.path.join(path, onnx_info["file"]),
                                           providers=["CPUExecutionProvider"])
    rows = [(samples["dense"], samples["sparse"])]
    if not metadata["bad_ids_raise"]:
        rows.append(out_of_range_rows(metadata["n_dense"], metadata["cardinalities"]))
    worst = 0.0
    for dense, sparse in rows:
        result = session.run([OUTPUT_KEY], {"dense": dense.astype(np.float32), "sparse": sparse.astype(np.int64)})
        worst = max(worst, _max_difference(result[0], _probability(signature, dense, sparse)))
    message = f"onnxruntime {onnxruntime.__version__}, opset {onnx_info['opset']}: max |diff| {worst:.2e}"
    (report.passed if worst <= metadata["parity_tolerance"] else report.failed)("onnx", message)


def unpack_fields(arrays):
    """The sample raw rows: an object array [N, F] of bytes (stored as one byte buffer plus offsets)."""
    data, offsets = arrays["fields_data"].tobytes(), arrays["fields_offsets"]
    flat = [data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    return np.array(flat, dtype=object).reshape(tuple(int(s) for s in arrays["fields_shape"]))


def check_raw(report, loaded, path, metadata):
    """The raw-string signatures against the converter's output for the same rows, and against serving_default."""
    if RAW_SIGNATURE not in metadata["signatures"]:
        report.skipped("raw", "no raw-string signature (export with raw_preprocessing= / --raw-signature)")
        return
    problems = []
    for name in (RAW_SIGNATURE, RAW_FEATURES_SIGNATURE):
        if name not in loaded.signatures:
            problems.append(f"missing signature {name!r}")
            continue
        spec = loaded.signatures[name].structured_input_signature[1].get(RAW_INPUT)
        dtype, shape = _declared_inputs(metadata, name)[RAW_INPUT]
        if not _spec_matches(spec, dtype, shape):
            problems.append(f"{name}.{RAW_INPUT}: expected {dtype} {'any shape' if shape is None else shape}, "
                            f"got {spec}")
    if problems:
        report.failed("raw", "; ".join(problems))
        return
    with np.load(os.path.join(path, METADATA_DIR, RAW_SAMPLES_FILE)) as data:
        stored = {key: data[key] for key in data.files}
    fields = tf.constant([[bytes(v) for v in row] for row in unpack_fields(stored)], tf.string)
    features = {k: v.numpy() for k, v in loaded.signatures[RAW_FEATURES_SIGNATURE](**{RAW_INPUT: fields}).items()}
    for key in ("sparse", "valid", "reject_reason"):
        if not np.array_equal(features[key], stored[f"converter_{key}"]):
            rows = np.flatnonzero(np.any(np.reshape(features[key] != stored[f"converter_{key}"],
                                                    (len(features[key]), -1)), axis=1))
            problems.append(f"raw_features {key} differs from the converter's on rows {rows[:5].tolist()}")
    dense_difference = _max_difference(features["dense"], stored["converter_dense"])
    if not dense_difference <= EXACT_TOLERANCE:
        problems.append(f"raw_features dense differs from the converter's by {dense_difference:.2e}")
    result = loaded.signatures[RAW_SIGNATURE](**{RAW_INPUT: fields})
    probability = result[OUTPUT_KEY].numpy()
    valid = stored["converter_valid"]
    reference = _probability(loaded.signatures[TENSOR_SIGNATURE], stored["converter_dense"][valid],
                             stored["converter_sparse"][valid])
    difference = _max_difference(probability[valid], reference)
    if not difference <= EXACT_TOLERANCE:
        problems.append(f"raw probability differs from serving_default on the converter's rows by {difference:.2e}")
    if not np.all(np.isnan(probability[~valid])) or not np.array_equal(result["valid"].numpy(), valid):
        problems.append("rejected rows must give NaN with valid = False")
    message = (f"{len(valid)} raw rows ({int(np.sum(~valid))} rejected: "
               f"{sorted(set(r.decode() for r in stored['converter_reject_reason'][~valid]))}): max |diff| vs "
               f"serving_default {difference:.2e}, dense vs converter {dense_difference:.2e}")
    if problems:
        report.failed("raw", "; ".join(problems))
    else:
        report.passed("raw", message)


# ---------------------------------------------------------------------------- models with other inputs
def is_model_inputs(metadata):
    """Whether the export is of a model with other inputs (docs/export_contract.md, "Models with other inputs")."""
    return metadata.get("contract") == MODEL_INPUTS_CONTRACT


def _constants(arrays):
    return {key: tf.constant(value) for key, value in arrays.items()}


def _outputs(signature, feeds):
    return {key: value.numpy() for key, value in signature(**_constants(feeds)).items()}


def _worst(got, expected):
    """The largest |difference| over every output: inf when keys or shapes differ, strings differ, or one side is
    NaN where the other is not (NaN on both sides is equal: a model may give NaN, e.g. a mean over nothing)."""
    if sorted(got) != sorted(expected):
        return float("inf")
    worst = 0.0
    for key in got:
        a, b = got[key], expected[key]
        if a.dtype.kind in "SO" or b.dtype.kind in "SO":
            worst = max(worst, 0.0 if np.array_equal(a.astype(bytes), b.astype(bytes)) else float("inf"))
            continue
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
            return float("inf")
        known = ~np.isnan(a)
        worst = max(worst, float(np.max(np.abs(a[known] - b[known]))) if np.any(known) else 0.0)
    return worst


def model_input_examples(inputs, tensors, with_label):
    """Serialized tf.train.Example per row, one feature per model input, built here from the metadata's input list
    (ragged inputs from NAME_values cut by NAME_row_lengths)."""
    first = inputs[0]
    rows = len(tensors[first["name"] + ROW_LENGTHS_SUFFIX] if first["ragged"] else tensors[first["name"]])
    splits = {item["name"]: np.concatenate([[0], np.cumsum(tensors[item["name"] + ROW_LENGTHS_SUFFIX])])
              for item in inputs if item["ragged"]}
    records = []
    for row in range(rows):
        feature = {}
        for item in inputs:
            name = item["name"]
            if item["ragged"]:
                values = tensors[name + VALUES_SUFFIX][splits[name][row]:splits[name][row + 1]]
            else:
                values = np.asarray(tensors[name][row]).reshape(-1)
            if item["example_dtype"] == "string":
                feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(v) for v in values]))
            elif item["example_dtype"] == "int64":
                feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
            else:
                feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
        if with_label:
            feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[row % 2]))
        records.append(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return records


def verify_model_inputs(report, loaded, path, metadata, require_serving_api):
    """The checks of an export of a model with other inputs: parity of every output, Examples, PredictRequests,
    warmup and malformed requests (bad_ids and onnx do not apply: SKIP)."""
    with np.load(os.path.join(path, METADATA_DIR, SAMPLES_FILE)) as data:
        stored = {key: data[key] for key in data.files}

    def part(prefix):
        return {key[len(prefix) + 1:]: value for key, value in stored.items() if key.startswith(prefix + ".")}

    tensors, keras_outputs, serving_outputs = part("input"), part("keras"), part("serving")
    inputs = metadata["inputs"]
    tensor_signature = loaded.signatures[TENSOR_SIGNATURE]
    outputs = _outputs(tensor_signature, tensors)
    rows = len(next(iter(outputs.values())))
    ragged = [item["name"] for item in inputs if item["ragged"]]
    keras_difference = _worst(outputs, keras_outputs)
    tolerance = metadata["keras_tolerance"]
    report.details["keras_max_abs_difference"] = keras_difference
    (report.passed if keras_difference <= tolerance else report.failed)(
        "keras_parity", f"outputs {sorted(outputs)}: max |diff| {keras_difference:.2e} on {rows} rows of inputs "
                        f"{[item['name'] for item in inputs]} (ragged {ragged}; tolerance {tolerance:g})")
    serving_difference = _worst(outputs, serving_outputs)
    tolerance = metadata["parity_tolerance"]
    (report.passed if serving_difference <= tolerance else report.failed)(
        "serving_parity", f"max |diff| {serving_difference:.2e} (tolerance {tolerance:g})")

    example_signature = loaded.signatures[EXAMPLE_SIGNATURE]
    differences = []
    for with_label in (True, False):
        records = model_input_examples(inputs, tensors, with_label)
        differences.append(_worst(_outputs(example_signature, {EXAMPLES_INPUT: np.array(records, dtype=object)}),
                                  outputs))
    worst = max(differences)
    (report.passed if worst <= EXACT_TOLERANCE else report.failed)(
        "examples", f"{rows} Examples (one feature per input, ragged as variable-length lists), with and without "
                    f"label: max |diff| vs serving_default {worst:.2e}")

    try:
        # optional in the verifier: only the PredictRequest check needs it
        from tensorflow_serving.apis import model_pb2, predict_pb2
    except ImportError:
        (report.failed if require_serving_api else report.skipped)("predict_request",
                                                                   "tensorflow-serving-api not installed")
    else:
        worst = 0.0
        requests = [(TENSOR_SIGNATURE, tensors),
                    (EXAMPLE_SIGNATURE, {EXAMPLES_INPUT: np.array(model_input_examples(inputs, tensors, False),
                                                                  dtype=object)})]
        for signature_name, feeds in requests:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=metadata["name"], signature_name=signature_name))
            for key, value in feeds.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value, dtype=tf.string if value.dtype.kind in "SO"
                                                                  else None))
            received = predict_pb2.PredictRequest.FromString(request.SerializeToString())
            signature = loaded.signatures[received.model_spec.signature_name]
            got = {key: value.numpy() for key, value in signature(**{
                key: tf.constant(tf.make_ndarray(proto)) for key, proto in received.inputs.items()}).items()}
            worst = max(worst, _worst(got, outputs))
        (report.passed if worst <= EXACT_TOLERANCE else report.failed)(
            "predict_request", f"PredictRequests for {TENSOR_SIGNATURE} ({len(tensors)} tensors: "
                               f"{sorted(tensors)}) and {EXAMPLE_SIGNATURE}, max |diff| {worst:.2e}")
    check_warmup(report, loaded, path, metadata)
    report.skipped("bad_ids", "a model with other inputs: its layers apply the serving id rule "
                              f"{metadata['serving_out_of_range']!r} to the ids the model routes to them")
    check_model_input_refusals(report, loaded, inputs, tensors, outputs)
    check_onnx(report, path, metadata, None, None, False)
    check_raw(report, loaded, path, metadata)


def check_model_input_refusals(report, loaded, inputs, tensors, served):
    """Malformed requests are refused naming the input: row lengths that do not add up, a dense input one column
    too wide, a record that is not an Example."""
    first = {}
    for item in inputs:
        name = item["name"]
        if item["ragged"]:
            lengths = tensors[name + ROW_LENGTHS_SUFFIX][:2]
            first[name + ROW_LENGTHS_SUFFIX] = lengths
            first[name + VALUES_SUFFIX] = tensors[name + VALUES_SUFFIX][:int(np.sum(lengths))]
        else:
            first[name] = tensors[name][:2]
    cases = []
    for item in inputs:
        name = item["name"]
        if item["ragged"]:
            feeds = dict(first)
            feeds[name + ROW_LENGTHS_SUFFIX] = first[name + ROW_LENGTHS_SUFFIX] + np.array([0, 1], np.int64)
            cases.append((TENSOR_SIGNATURE, feeds, f"input {name}: {name}{ROW_LENGTHS_SUFFIX} must be >= 0 and add "
                                                   f"up to the number of {name}{VALUES_SUFFIX}"))
        elif len(item["shape"]) == 2 and item["shape"][1] is not None:
            feeds = dict(first)
            feeds[name] = np.concatenate([first[name], first[name][:, :1]], axis=1)
            cases.append((TENSOR_SIGNATURE, feeds, f"input {name}: expected {item['dtype']} [batch, "
                                                   f"{item['shape'][1]}], received shape [2, {item['shape'][1] + 1}]"))
    records = model_input_examples(inputs, first, False)
    cases.append((EXAMPLE_SIGNATURE, {EXAMPLES_INPUT: np.array([records[0], b"\xff not an Example"], dtype=object)},
                  f"input {EXAMPLES_INPUT}: record 1 of 2 is not a serialized tf.train.Example"))
    problems = _refusal_problems(loaded, cases)
    again = _outputs(loaded.signatures[TENSOR_SIGNATURE], tensors)
    if _worst(again, served) > EXACT_TOLERANCE:
        problems.append("valid rows are not served as before after the refused requests")
    if problems:
        report.failed("bad_inputs", "; ".join(problems))
    else:
        report.passed("bad_inputs", f"{len(cases)} malformed requests refused naming the input; valid rows still "
                                    "served")


# ---------------------------------------------------------------------------------------------- size table
def _unescape_checkpoint_name(name):
    """Object-graph names escape '/' as '.S' and '.' as '..' in checkpoint keys."""
    out, i = [], 0
    while i < len(name):
        if name[i] == "." and i + 1 < len(name):
            out.append({"S": "/", ".": "."}.get(name[i + 1], name[i + 1]))
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def size_table(path, metadata):
    """Bytes of every saved variable, read from the checkpoint (not from the exporter's metadata)."""
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    rows = []
    for key in sorted(shapes):
        if key.startswith("_CHECKPOINTABLE_OBJECT_GRAPH"):
            continue
        local = key.split("/.ATTRIBUTES/")[0]
        name = _unescape_checkpoint_name(local.split("/", 1)[1] if "/" in local else local)
        nbytes = int(np.prod(shapes[key], dtype=np.int64)) * dtypes[key].size
        rows.append((name, dtypes[key].name, tuple(shapes[key]), nbytes))
    total = sum(row[3] for row in rows)
    on_disk = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    uncompressed = metadata.get("uncompressed_bytes")
    lines = [f"    {'variable':<48} {'dtype':<8} {'shape':<16} {'bytes':>14}"]
    lines += [f"    {n:<48} {d:<8} {str(s):<16} {b:>14,}" for n, d, s, b in rows]
    # ROBE window matrices of the serving layout (named NAME/memory/windows<Z>[/int8|/fp16] by the exporter).
    windows = sum(row[3] for row in rows if "/windows" in row[0])
    if windows:
        lines.append(f"    {'of which ROBE window matrices (serving layout)':<74} {windows:>14,}")
    lines.append(f"    {'total (variables)':<74} {total:>14,}")
    lines.append(f"    {'files on disk (whole version directory)':<74} {on_disk:>14,}")
    if uncompressed:
        lines.append(f"    {'uncompressed model (full float32 tables)':<74} {uncompressed:>14,}")
        lines.append(f"    {'compression (uncompressed / total)':<74} {uncompressed / max(total, 1):>13.1f}x")
    print("\n".join(lines), flush=True)
    return {"variables": [{"name": n, "dtype": d, "shape": list(s), "bytes": b} for n, d, s, b in rows],
            "total_bytes": total, "window_matrix_bytes": windows, "disk_bytes": on_disk,
            "uncompressed_bytes": uncompressed}


def print_serving_layout(metadata):
    """The ROBE-Z serving layout the export chose, and the TF Serving flag an XLA-compiled graph needs."""
    layout = metadata.get("serving_layout")
    if not layout:
        return
    print(f"    serving layout: chunk_reads={layout['chunk_reads']} unique_ids={layout['unique_ids']} "
          f"jit_compile={layout['jit_compile']}", flush=True)
    if layout["jit_compile"]:
        print("    XLA-compiled lookups: start tensorflow_model_server with --xla_cpu_compilation_enabled=true "
              "(TF Serving leaves XLA on CPU off by default)", flush=True)
    else:
        print("    no XLA in the graph: stock TF Serving flags (--xla_cpu_compilation_enabled=true is only needed "
              "for exports made with jit_compile=True / --xla)", flush=True)


# ------------------------------------------------------------------------------------------------- driver
def verify_dense_sparse(report, loaded, path, metadata, require_serving_api, require_onnx):
    """The checks of an export with the {"dense", "sparse"} contract."""
    with np.load(os.path.join(path, METADATA_DIR, SAMPLES_FILE)) as data:
        samples = {key: data[key] for key in data.files}
    tensors = loaded.signatures[TENSOR_SIGNATURE]
    probability = check_parity(report, tensors, samples, metadata)
    check_examples(report, loaded.signatures[EXAMPLE_SIGNATURE], samples, probability)
    check_predict_request(report, loaded, samples, probability, metadata["name"], require_serving_api)
    check_warmup(report, loaded, path, metadata)
    check_bad_ids(report, tensors, metadata, samples)
    check_bad_inputs(report, loaded, metadata, samples)
    check_onnx(report, path, metadata, tensors, samples, require_onnx)
    check_raw(report, loaded, path, metadata)


def verify_one(path, require_serving_api=False, require_onnx=False):
    report = Report(path)
    print(f"verify {path}", flush=True)
    check_isolation(report)
    if not os.path.exists(os.path.join(path, "saved_model.pb")):
        report.failed("load", f"no saved_model.pb in {path}")
        return report
    metadata_path = os.path.join(path, METADATA_DIR, METADATA_FILE)
    metadata = None
    if os.path.exists(metadata_path):
        with open(metadata_path) as f:
            metadata = json.load(f)
    check_stock_ops(report, path)
    try:
        loaded = tf.saved_model.load(path)
    except Exception as error:  # noqa: BLE001 - any load failure is the finding
        report.failed("load", f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}")
        return report
    report.passed("load", "tf.saved_model.load")
    if metadata is None:
        report.failed("signatures", f"no {METADATA_DIR}/{METADATA_FILE}: not a tfcompress export")
        return report
    if not check_signatures(report, loaded, metadata):
        return report
    if is_model_inputs(metadata):
        verify_model_inputs(report, loaded, path, metadata, require_serving_api)
    else:
        verify_dense_sparse(report, loaded, path, metadata, require_serving_api, require_onnx)
    # Both contracts: the size table and the serving layout (an XLA-compiled graph needs a TF Serving flag).
    report.details["sizes"] = size_table(path, metadata)
    print_serving_layout(metadata)
    check_isolation(report)  # again (the later result is kept): nothing above may have pulled tfcompress in
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="SavedModel version directories (saved_models/NAME/VERSION)")
    parser.add_argument("--json", help="also write the reports to this JSON file")
    parser.add_argument("--require-serving-api", action="store_true",
                        help="FAIL (not SKIP) the PredictRequest check when tensorflow-serving-api is missing")
    parser.add_argument("--require-onnx", action="store_true",
                        help="FAIL (not SKIP) the ONNX check when onnxruntime is missing")
    args = parser.parse_args(argv)
    reports = []
    for path in args.paths:
        try:
            report = verify_one(path, args.require_serving_api, args.require_onnx)
        except Exception as error:  # noqa: BLE001 - report it and go on with the other paths
            report = Report(path)
            report.failed("crash", f"{type(error).__name__}: {error}")
        print(f"  {'OK' if report.ok else 'FAILED'}: {path}\n", flush=True)
        reports.append(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([report.as_dict() for report in reports], f, indent=2)
    return 0 if all(report.ok for report in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
