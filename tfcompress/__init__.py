"""tfcompress: compressed embedding tables for TensorFlow/Keras recommendation models.

    import tfcompress

    layer = tfcompress.layers.RobeEmbedding([1000, 50], output_dim=16, compression=100.0)
    plan = tfcompress.make_plan(cardinalities, output_dim=16, method="robe", ratio=1000)
    folded = tfcompress.fold(model)          # MLET tables -> one table each (tfcompress.model_rewrite)
    small = tfcompress.compress(model, ratio=1000)   # your own Keras model, its Embeddings compressed

Subpackages and modules (`tfcompress.layers`, `tfcompress.data`, `tfcompress.export`, ...) and the top-level names
below are loaded on first use, as `tf.keras.layers` is, so `import tfcompress` itself does not import TensorFlow
(the serving verifier and the CLI's --help stay fast). docs/ARCHITECTURE.md says which module owns which stage.
"""

import importlib

__version__ = "0.1.0"

# name -> (module, attribute): resolved lazily by __getattr__ below.
_LAZY = {
    "fold": ("tfcompress.model_rewrite", "fold"),
    "compress": ("tfcompress.model_compress", "compress"),
    "make_plan": ("tfcompress.plan", "make_plan"),
    "export_saved_model": ("tfcompress.export", "export_saved_model"),
    "ChunkPruningCallback": ("tfcompress.chunk_pruning", "ChunkPruningCallback"),
    "SparseAdagrad": ("tfcompress.optimizers", "SparseAdagrad"),
    "LazyAdam": ("tfcompress.optimizers", "LazyAdam"),
}

# Submodules reachable as attributes after a bare `import tfcompress` (Python only binds a submodule to its
# package once something imports it).
_SUBMODULES = (
    "chunk_pruning", "cli", "data", "export", "fused_ops", "layers", "learn_hash", "lookup", "metrics",
    "model_compress", "model_rewrite", "models", "optimizers", "pipeline", "plan", "quantize", "reproduce",
    "robe_hash", "sizes",
    "train", "tune",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"tfcompress.{name}")
    if name not in _LAZY:
        raise AttributeError(f"module 'tfcompress' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))
