"""Keras embedding layers, one method per file. All map integer ids [batch, F] to [batch, F, output_dim]."""

from tfcompress.layers.full import FullEmbedding
from tfcompress.layers.hashing_trick import HashingTrickEmbedding
from tfcompress.layers.learned_hash import LearnedHashEmbedding
from tfcompress.layers.mlet import MLETEmbedding
from tfcompress.layers.planned import PlannedEmbedding
from tfcompress.layers.chunk_pruned import ChunkPrunedEmbedding
from tfcompress.layers.qr import QREmbedding
from tfcompress.layers.quantized import QuantizedEmbedding
from tfcompress.layers.robe import RobeEmbedding

__all__ = [
    "ChunkPrunedEmbedding",
    "FullEmbedding",
    "HashingTrickEmbedding",
    "LearnedHashEmbedding",
    "MLETEmbedding",
    "PlannedEmbedding",
    "QREmbedding",
    "QuantizedEmbedding",
    "RobeEmbedding",
]
