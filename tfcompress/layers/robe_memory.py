"""RobeMemory: one trainable ROBE-Z array shared by several embedding layers (docs/robe_z.md, "Shared memory").

ROBE's point is one small memory for ALL tables. `RobeEmbedding(cardinalities=[n_0, ..., n_{F-1}])` lays its F
tables end to end (offset_t = n_0 + ... + n_{t-1}) and hashes a = x + offset_t into one array M. A `RobeMemory`
is that array on its own: every layer made with `memory=` registers its table(s) with it and gets the next offset
(or an explicit `table_offset`), so N single-table layers over one memory read exactly what one N-table
`RobeEmbedding` over the same array reads. The hash settings (chunk size Z, seed, signs) belong to the array, so
every sharer uses the memory's.
"""

import math
import uuid

from tfcompress import robe_hash
from tfcompress._keras import (fresh_initializer, in_object_sharing_scope, keras, legacy_loading_scope,
                               object_sharing_scope, register_serializable)

# What the memory's chunk size is when neither it nor its first sharer names one (as RobeEmbedding's default).
MAX_DEFAULT_CHUNK = 32


@register_serializable()
class RobeMemory(keras.layers.Layer):
    """One shared ROBE-Z array M for the tables of several layers.

    Example:

    >>> memory = RobeMemory(compression=1000.0, chunk_size=8)
    >>> users = CompressedEmbedding(1_000_000, 16, memory=memory)      # table offset 0
    >>> items = CompressedEmbedding(200_000, 16, memory=memory)        # table offset 1_000_000
    >>> memory.size                                                     # ceil(1.2M * 16 / 1000)
    19200

    Args:
        size: |M|, the floats in the array. Give this or `compression`.
        compression: |M| = max(Z, ceil(sum over the registered tables of rows * width / compression)), fixed when
            the array is made (the first build of any sharer): make every sharing layer before calling one.
        chunk_size: Z; default min(width of the first sharer, 32). Every sharer's width must be >= Z.
        seed: the hash seed (docs/robe_z.md); default `robe_hash.DEFAULT_SEED`.
        signed: multiply each element by a +-1 hash (default False).
        embeddings_initializer: initializer of M.
        share_key: the id that configs name this memory by (default: a fresh random one); a config read back
            keeps it, so a tf_keras SavedModel load hands all sharers one memory.
        **kwargs: `keras.layers.Layer` arguments (name, ...).

    Sharing survives `.keras` save/load (Keras saves shared objects once and restores them shared). Reading the
    config of a memory with more than one table outside a Keras object-sharing scope raises ValueError rather
    than give each deserialized layer its own copy; `sharing_scope()` and docs/layers.md ("Drop-in:
    CompressedEmbedding") say how to keep it shared.
    """

    def __init__(self, size=None, compression=None, chunk_size=None, seed=None, signed=None,
                 embeddings_initializer="uniform", share_key=None, **kwargs):
        super().__init__(**kwargs)
        # Names this memory in configs, so a loader without Keras' object-sharing scope (tf_keras SavedModel
        # directories) can still hand every sharer the same object.
        self.share_key = share_key or uuid.uuid4().hex
        if (size is None) == (compression is None):
            raise ValueError(f"{self.described}: give exactly one of size= (floats in the array) or compression= "
                             f"(logical size / array size), got size={size!r}, compression={compression!r}")
        if size is not None and (int(size) != size or size < 1):
            raise ValueError(f"{self.described}: size must be an integer >= 1, got {size!r}")
        if compression is not None and not compression >= 1.0:
            raise ValueError(f"{self.described}: compression must be >= 1, got {compression!r}")
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
            raise ValueError(f"{self.described}: chunk_size must be an integer >= 1, got {chunk_size!r}")
        self._size = None if size is None else int(size)
        self.compression = None if compression is None else float(compression)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.seed = robe_hash.DEFAULT_SEED if seed is None else int(seed)
        self.signed = False if signed is None else bool(signed)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.tables = []  # (owner, table_offset, rows, width) in registration order
        self.array = None

    @property
    def described(self):
        return f"{type(self).__name__} {self.name!r}"

    @property
    def total_rows(self):
        """End of the id space the registered tables use: max(offset + rows), 0 before any registration."""
        return max((offset + rows for _, offset, rows, _ in self.tables), default=0)

    @property
    def logical_parameters(self):
        """Floats the registered tables would take uncompressed: sum of rows * width."""
        return sum(rows * width for _, _, rows, width in self.tables)

    @property
    def size(self):
        """|M|: `size`, or from `compression` and the tables registered so far (fixed once the array exists)."""
        if self._size is not None:
            return self._size
        if not self.tables:
            raise ValueError(f"{self.described}: its size comes from compression={self.compression} and the tables "
                             "that share it, and no layer has registered a table yet")
        return max(self.chunk_size, math.ceil(self.logical_parameters / self.compression))

    def register(self, owner, rows, width, chunk_size=None, seed=None, signed=None, table_offset=None):
        """Add `rows` rows of width `width` for layer `owner` (a description for errors); return the table offset.

        Raises:
            ValueError: a chunk size, seed or sign setting that differs from the memory's (naming both), a width
                below the chunk size, a table overlapping one registered before, or a compression-sized memory
                whose array already exists.
        """
        for argument, asked, own in (("chunk_size", chunk_size, self.chunk_size), ("seed", seed, self.seed),
                                     ("signed", signed, self.signed)):
            if asked is not None and own is not None and asked != own:
                raise ValueError(f"{owner} asks {argument}={asked!r} but its shared memory {self.described} has "
                                 f"{argument}={own!r}: every layer of one memory uses the memory's hash settings "
                                 f"(leave {argument} unset on the layer)")
        if self.chunk_size is None:
            self.chunk_size = min(width, MAX_DEFAULT_CHUNK) if chunk_size is None else int(chunk_size)
        if width < self.chunk_size:
            raise ValueError(f"{owner}: output_dim={width} is below the chunk_size={self.chunk_size} of its shared "
                             f"memory {self.described}; every sharer needs output_dim >= chunk_size")
        if self.array is not None and self.compression is not None:
            raise ValueError(f"{owner} registers with {self.described} after its array was made from "
                             f"compression={self.compression}; make every sharing layer before calling any")
        offset = self.total_rows if table_offset is None else int(table_offset)
        if offset < 0:
            raise ValueError(f"{owner}: table_offset must be >= 0, got {table_offset!r}")
        for other, other_offset, other_rows, _ in self.tables:
            if offset < other_offset + other_rows and other_offset < offset + rows:
                raise ValueError(f"{owner}: table rows [{offset}, {offset + rows}) overlap the rows "
                                 f"[{other_offset}, {other_offset + other_rows}) of {other} in {self.described}")
        self.tables.append((owner, offset, int(rows), int(width)))
        return offset

    def build(self, input_shape=None):
        """Make the array (once; every sharer's build calls this)."""
        if self.array is not None:
            return
        if self._size is None:
            self._size = self.size  # fixed from here on: the variable has this shape
        self.array = self.add_weight(name="memory", shape=(self._size,),
                                     initializer=fresh_initializer(self.embeddings_initializer), trainable=True)
        self.built = True

    def call(self, inputs=None):
        raise TypeError(f"{self.described} is an array shared by embedding layers, not a layer to call; pass it "
                        "as memory= to CompressedEmbedding or RobeEmbedding")

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        sharers = config.pop("sharers", 0)
        legacy_scope = legacy_loading_scope()
        if legacy_scope is not None and config.get("share_key"):
            key = ("tfcompress.RobeMemory", config["share_key"])
            memory = legacy_scope.get(key)
            if memory is None:
                memory = cls(**config)
                legacy_scope.set(key, memory)
            return memory
        if sharers > 1 and not in_object_sharing_scope():
            # Each layer deserializing this config would make its own copy: N arrays instead of one, trained apart.
            raise ValueError(
                f"RobeMemory {config.get('name')!r} holds {sharers} tables, and its config is being read outside "
                "a Keras object-sharing scope, where each layer would get its own copy of the memory: load the "
                "model from a .keras file, or make and read the config inside "
                "`with tfcompress.layers.sharing_scope():` (docs/layers.md, 'Drop-in: CompressedEmbedding')")
        return cls(**config)

    def get_config(self):
        config = super().get_config()
        config.update(
            sharers=len(self.tables),
            share_key=self.share_key,
            # The resolved size alone fixes the array (as RobeEmbedding stores memory_size, not compression), so a
            # reloaded memory does not depend on the order its sharers are deserialized in.
            size=self.size,
            compression=None,
            chunk_size=self.chunk_size,
            seed=self.seed,
            signed=self.signed,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
        )
        return config


def sharing_scope():
    """Keep RobeMemory objects shared through `get_config`/`from_config` made inside this `with` block.

    `.keras` save and load do this themselves. For an in-memory round trip::

        with tfcompress.layers.sharing_scope():
            clone = keras.Model.from_config(model.get_config())
    """
    return object_sharing_scope()
