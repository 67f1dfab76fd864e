"""Serving export: SavedModels that stock TensorFlow Serving loads, their checks, and ONNX.

    from tfcompress.export import export_saved_model
    from tfcompress.export.verify import verify

    path = export_saved_model(model, base_dir="saved_models", name="criteo_robe")   # saved_models/criteo_robe/1
    assert verify(path).ok                                                           # in a fresh process

Modules:

- `saved_model`: `export_saved_model` (staging and rename, metadata, size table, sample rows, versions);
- `serving_model`: what the Keras model takes, MLET folding, the serving graph and the quantized table copies;
- `signatures`: the input specs and the signature functions (tensors, tf.Example, raw strings), warm-up requests;
- `serving_config`: TF Serving's `models.config`;
- `onnx`: `model.onnx` (tf2onnx with converters for the integer ops) and onnxruntime's predictions;
- `raw_features`: the `raw` signature's in-graph preprocessing, equal to `tfcompress data convert`'s;
- `verify`: `verify(paths)` runs `verify_standalone.py` as a script in a fresh process that never imports
  tfcompress (neither this package nor TensorFlow is imported by `verify` itself).

The names below are loaded on first use, so importing this package (as `tfcompress verify` does, for
`tfcompress.export.verify`) imports neither TensorFlow nor the exporter.
"""

import importlib

# name -> (module, attribute): resolved lazily by __getattr__ below.
_LAZY = {
    "export_saved_model": ("tfcompress.export.saved_model", "export_saved_model"),
    "load_keras_model": ("tfcompress.export.serving_model", "load_keras_model"),
    "update_models_config": ("tfcompress.export.serving_config", "update_models_config"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tfcompress.export' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
