"""The signatures of an export: input specs, the functions traced for them, tf.Example parsing, warm-up requests.

- `serving_default` (`TENSOR_SIGNATURE`): `dense` f32[B, n_dense], `sparse` i64[B, n_sparse] -> {"probability"};
- `examples` (`EXAMPLE_SIGNATURE`): serialized `tf.train.Example` in the TFRecord layout -> {"probability"};
- `raw` and `raw_features` (with `raw_preprocessing`): raw string fields, preprocessed in graph
  (`tfcompress.export.raw_features`).

Every function calls the model as served (`tfcompress.export.serving_model.ServingModel`) on {"dense", "sparse"}
tensors; `tfcompress.export.saved_model` traces them.
"""

import numpy as np
import tensorflow as tf

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


def input_signature(n_dense, n_sparse):
    return [tf.TensorSpec([None, n_dense], tf.float32, name="dense"),
            tf.TensorSpec([None, n_sparse], tf.int64, name="sparse")]


def example_features(n_dense, n_sparse):
    """parse_example spec of the TFRecord layout; `label` is not parsed (clients at serving have none)."""
    spec = {"sparse": tf.io.FixedLenFeature([n_sparse], tf.int64)}
    if n_dense > 0:
        spec["dense"] = tf.io.FixedLenFeature([n_dense], tf.float32)
    return spec


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

    @tf.function(input_signature=input_signature(n_dense, n_sparse))
    def serve_tensors(dense, sparse):
        return probability(dense, sparse)

    features = example_features(n_dense, n_sparse)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_examples(examples):
        parsed = tf.io.parse_example(examples, features)
        dense = parsed["dense"] if n_dense > 0 else tf.zeros([tf.shape(examples)[0], 0], tf.float32)
        return probability(dense, parsed["sparse"])

    return serve_tensors, serve_examples


def raw_serving_functions(model, preprocessor):
    """The raw-string signature functions (not yet traced) of a `tfcompress.export.raw_features.RawPreprocessor`.

    `model` is the model as served (see `serving_functions`). `raw`: fields -> {probability (NaN where the row is rejected), valid, reject_reason}; `raw_features`: fields ->
    the converter's {dense, sparse, valid, reject_reason}. Rejected rows reach the model as zeros (always in
    range) and their probability is replaced, so one bad row never fails a batched request.
    """

    spec = [tf.TensorSpec([None, len(preprocessor.spec.columns)], tf.string, name=RAW_INPUT)]

    @tf.function(input_signature=spec)
    def serve_raw(fields):
        features = preprocessor(fields)
        probability = model({"dense": features["dense"], "sparse": features["sparse"]})
        probability = tf.cast(tf.reshape(probability, [-1, 1]), tf.float32)
        probability = tf.where(features["valid"][:, None], probability, tf.constant(np.nan, tf.float32))
        return {OUTPUT_KEY: probability, "valid": features["valid"], "reject_reason": features["reject_reason"]}

    @tf.function(input_signature=spec)
    def serve_raw_features(fields):
        return preprocessor(fields)

    return serve_raw, serve_raw_features


def write_warmup_requests(path, model_name, samples, rows=8):
    """TF Serving's warmup file (a TFRecord of PredictionLog): one PredictRequest per signature."""

    dense, sparse = samples["dense"][:rows], samples["sparse"][:rows]
    tensor_request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=TENSOR_SIGNATURE))
    tensor_request.inputs["dense"].CopyFrom(tf.make_tensor_proto(dense))
    tensor_request.inputs["sparse"].CopyFrom(tf.make_tensor_proto(sparse))
    example_request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=EXAMPLE_SIGNATURE))
    examples = [serialize_example(d, s) for d, s in zip(dense, sparse)]
    example_request.inputs[EXAMPLES_INPUT].CopyFrom(tf.make_tensor_proto(examples, dtype=tf.string))
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
