"""Learned hash functions ("Learning to Collide"): teacher -> frequency-aware clustering -> id -> row mappings.

Stages, one module each:

- `teacher`: train the pipeline's model with full-height tables at a tiny width (2 or 4) and count accesses per id;
- `cluster`: 1-D agglomerative clustering of one table's ids, sorted by one teacher dimension, to a target count;
- `mapping`: the id -> row artifacts (one per teacher dimension), their save/load format and the unseen-id rule;
- `workflow`: all of it for a pipeline, writing the mappings and a pipeline TOML that trains the compressed model
  (`tfcompress learn-hash --pipeline P --target 0.1`).

The layer that uses the mappings is `tfcompress.layers.LearnedHashEmbedding`.
"""

from tfcompress.learn_hash.cluster import ClusterResult, cluster_1d
from tfcompress.learn_hash.mapping import (
    TableMapping,
    build_table_mapping,
    load_mappings,
    save_mappings,
    smallest_row_dtype,
)

__all__ = [
    "ClusterResult",
    "TableMapping",
    "build_table_mapping",
    "cluster_1d",
    "load_mappings",
    "save_mappings",
    "smallest_row_dtype",
]
