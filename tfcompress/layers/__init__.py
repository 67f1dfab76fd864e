"""Keras embedding layers, one method per file. All map integer ids [batch, F] to [batch, F, output_dim]."""

from tfcompress.layers.full import FullEmbedding
from tfcompress.layers.hashing_trick import HashingTrickEmbedding
from tfcompress.layers.planned import PlannedEmbedding
from tfcompress.layers.qr import QREmbedding
from tfcompress.layers.robe import RobeEmbedding

__all__ = ["FullEmbedding", "HashingTrickEmbedding", "PlannedEmbedding", "QREmbedding", "RobeEmbedding"]
