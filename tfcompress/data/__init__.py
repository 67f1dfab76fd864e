"""Data: schema.json, TFRecord writing, the tf.data reader and the planted-signal synthetic generator.

    from tfcompress.data import generate
    from tfcompress.data.read import read
    generate("data/synthetic", dataset="criteo", rows=1_000_000)      # TFRecords + schema.json + stats.json
    train = read("data/synthetic/train", batch_size=4096, seed=0)     # ({"dense", "sparse"}, label) batches

The reader lives in `tfcompress.data.read` (the module shares the function's name, so it is not re-exported
here); importing this package does not import TensorFlow.
"""

from tfcompress.data.schema import Schema
from tfcompress.data.synthetic import PlantedModel, generate
from tfcompress.data.tfrecord import ShardWriter, serialize_rows

__all__ = ["PlantedModel", "Schema", "ShardWriter", "generate", "serialize_rows"]
