"""Keras embedding layers, one method per file. The per-method layers map integer ids [batch, F] to
[batch, F, output_dim]; CompressedEmbedding is the drop-in for keras.layers.Embedding built on them."""

from tfcompress.layers.full import FullEmbedding
from tfcompress.layers.hashing_trick import HashingTrickEmbedding
from tfcompress.layers.learned_hash import LearnedHashEmbedding
from tfcompress.layers.mlet import MLETEmbedding
from tfcompress.layers.planned import PlannedEmbedding
from tfcompress.layers.chunk_pruned import ChunkPrunedEmbedding
from tfcompress.layers.compressed_embedding import CompressedEmbedding
from tfcompress.layers.compressed_embeddings import CompressedEmbeddings
from tfcompress.layers.qr import QREmbedding
from tfcompress.layers.quantized import QuantizedEmbedding
from tfcompress.layers.robe import RobeEmbedding
from tfcompress.layers.robe_memory import RobeMemory, sharing_scope

__all__ = [
    "ChunkPrunedEmbedding",
    "CompressedEmbedding",
    "CompressedEmbeddings",
    "FullEmbedding",
    "HashingTrickEmbedding",
    "LearnedHashEmbedding",
    "MLETEmbedding",
    "PlannedEmbedding",
    "QREmbedding",
    "QuantizedEmbedding",
    "RobeEmbedding",
    "RobeMemory",
    "sharing_scope",
]
