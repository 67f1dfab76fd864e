"""tfcompress: compressed embedding tables for TensorFlow/Keras recommendation models.

Import the pieces you need::

    from tfcompress.layers import RobeEmbedding
    from tfcompress.plan import make_plan
    import tfcompress
    folded = tfcompress.fold(model)          # MLET tables -> one table each (tfcompress.model_rewrite)

Top-level names are loaded on first use, so `import tfcompress` itself does not import TensorFlow (the serving
verifier and the CLI's --help stay fast).
"""

__version__ = "0.1.0"

# name -> (module, attribute): resolved lazily by __getattr__ below.
_LAZY = {
    "fold": ("tfcompress.model_rewrite", "fold"),
    "make_plan": ("tfcompress.plan", "make_plan"),
    "export_saved_model": ("tfcompress.export", "export_saved_model"),
    "ChunkPruningCallback": ("tfcompress.chunk_pruning", "ChunkPruningCallback"),
    "SparseAdagrad": ("tfcompress.optimizers", "SparseAdagrad"),
    "LazyAdam": ("tfcompress.optimizers", "LazyAdam"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tfcompress' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
