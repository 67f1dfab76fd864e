"""Data: schema.json, TFRecord writing, the tf.data reader and the planted-signal synthetic generator.

    from tfcompress.data import generate, read
    generate("data/synthetic", dataset="criteo", rows=1_000_000)      # TFRecords + schema.json + stats.json
    train = read("data/synthetic/train", batch_size=4096, seed=0)     # ({"dense", "sparse"}, label) batches
    data = movielens_like(100_000, num_users=1000, num_items=2000, seed=0)  # MovieLens-shaped NumPy columns

`read` lives in `tfcompress.data.reader` and is loaded on first use, so importing this package does not import
TensorFlow.
"""

from tfcompress.data.schema import Schema
from tfcompress.data.synthetic import PlantedModel, generate
from tfcompress.data.synthetic_movielens import movielens_like, write_movielens_like_csv
from tfcompress.data.tfrecord import ShardWriter, serialize_rows

__all__ = ["PlantedModel", "Schema", "ShardWriter", "generate", "movielens_like", "read", "serialize_rows",
           "write_movielens_like_csv"]


def __getattr__(name):
    # The reader imports TensorFlow; resolving it here on first use keeps `import tfcompress.data` light.
    if name == "read":
        from tfcompress.data.reader import read  # lazily: the reader imports TensorFlow

        globals()["read"] = read
        return read
    raise AttributeError(f"module 'tfcompress.data' has no attribute {name!r}")
