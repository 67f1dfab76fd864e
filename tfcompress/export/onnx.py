"""ONNX next to the SavedModel: tf2onnx conversion of the served tensor signature, with converters for the integer
ops of the id handling and the ROBE hash, and onnxruntime's predictions for the parity check.

Requires the [export] extra (tf2onnx, onnx, onnxruntime).
"""

import numpy as np
import tensorflow as tf

from tfcompress.export.signatures import OUTPUT_KEY, TENSOR_SIGNATURE, input_signature

# 18: the first opset with BitwiseAnd (the signed ROBE hash uses it), and the newest tf2onnx 1.17 targets.
DEFAULT_ONNX_OPSET = 18


def export_onnx(saved_model_dir, output_path, n_dense, n_sparse, opset=DEFAULT_ONNX_OPSET):
    """Convert the SavedModel's tensor signature (what is served, not the Keras model) to ONNX with tf2onnx.

    Returns the tf2onnx version. Requires the [export] extra (tf2onnx, onnx).
    """
    try:
        import tf2onnx  # optional: the [export] extra
    except ImportError:
        raise ValueError("onnx=True needs tf2onnx and onnxruntime: pip install 'tfcompress[export]'") from None
    loaded = tf.saved_model.load(saved_model_dir)
    signature = loaded.signatures[TENSOR_SIGNATURE]
    spec = input_signature(n_dense, n_sparse)

    @tf.function(input_signature=spec)
    def tensors(dense, sparse):
        return signature(dense=dense, sparse=sparse)

    if opset < 18:
        raise ValueError(f"onnx_opset must be >= 18 (BitwiseAnd, used by signed ROBE hashing), got {opset}")
    handlers = {"BitwiseAnd": (_onnx_bitwise_and, []), "FloorMod": (_onnx_floor_mod, []),
                "FloorDiv": (_onnx_floor_div, [])}
    tf2onnx.convert.from_function(tensors, input_signature=spec, opset=opset, output_path=output_path,
                                  custom_op_handlers=handlers)
    return tf2onnx.__version__


# Converters for the integer ops of the id handling and the ROBE hash, where tf2onnx 1.17 is missing or wrong.
def _onnx_bitwise_and(ctx, node, name, args):
    """tf2onnx 1.17 has no converter for TF's BitwiseAnd; ONNX's (opset 18) has the same semantics."""
    node.type = "BitwiseAnd"
    return node


def _is_float(ctx, tensor_name):
    from onnx import TensorProto  # optional: the [export] extra

    return ctx.get_dtype(tensor_name) in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


def _onnx_floor_mod(ctx, node, name, args):
    """Integer FloorMod as ONNX Mod(fmod=0), whose result takes the divisor's sign: a floor modulo.

    tf2onnx 1.17 writes a - (a / b) * b with ONNX's truncating integer Div, which differs for negative a: the
    "mod" rule would send -1 to row -1 instead of n - 1, and an exported ROBE would hash it elsewhere.
    """
    if _is_float(ctx, node.input[0]):
        from tf2onnx.onnx_opset.math import FloorMod  # optional: the [export] extra

        return FloorMod.version_7(ctx, node)
    node.type = "Mod"
    node.set_attr("fmod", 0)
    return node


def _onnx_floor_div(ctx, node, name, args):
    """Integer FloorDiv as (a - floormod(a, b)) / b: exact, so ONNX's truncating Div gives the floor."""
    if _is_float(ctx, node.input[0]):
        from tf2onnx.onnx_opset.math import FloorDiv  # optional: the [export] extra

        return FloorDiv.version_6(ctx, node)
    a, b = node.input[0], node.input[1]
    remainder = ctx.make_node("Mod", [a, b], attr={"fmod": 0})
    exact = ctx.make_node("Sub", [a, remainder.output[0]])
    node.type = "Div"
    ctx.replace_inputs(node, [exact.output[0], b])
    return node


def onnx_predictions(onnx_path, inputs):
    """onnxruntime's probabilities for {"dense", "sparse"} rows."""
    try:
        import onnxruntime  # optional: the [export] extra
    except ImportError:
        raise ValueError("onnx=True needs onnxruntime: pip install 'tfcompress[export]'") from None
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feeds = {"dense": np.asarray(inputs["dense"], np.float32), "sparse": np.asarray(inputs["sparse"], np.int64)}
    return session.run([OUTPUT_KEY], feeds)[0]
