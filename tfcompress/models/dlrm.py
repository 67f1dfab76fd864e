"""DLRM (Naumov et al. 2019): bottom MLP on dense features, pairwise dot interactions, top MLP."""

import numpy as np
import tensorflow as tf

from tfcompress._keras import keras, register_serializable
from tfcompress.models import features as model_inputs
from tfcompress.models.mlp import build_mlp, check_units


@register_serializable()
class DotInteraction(keras.layers.Layer):
    """Pairwise dot products of N vectors: [batch, N, D] -> [batch, N * (N - 1) / 2].

    Output column k is <x_i, x_j> for the k-th pair (i, j) with i < j in row-major order (the strict upper
    triangle of x x^T, as in the DLRM paper and the MLPerf reference). With `self_interaction=True` the diagonal
    is included too (i <= j): N * (N + 1) / 2 columns.

    Example:

    >>> DotInteraction()(tf.ones([2, 3, 4])).shape
    TensorShape([2, 3])

    Args:
        self_interaction: also output <x_i, x_i>.

    Input shape: float [batch, N, D]. Output shape: [batch, number of pairs].
    """

    def __init__(self, self_interaction=False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(self_interaction, (bool, np.bool_)):
            raise ValueError(f"self_interaction must be True or False, got {self_interaction!r}")
        self.self_interaction = bool(self_interaction)

    def _pair_positions(self, n):
        """Flat positions i * n + j of the kept pairs in an n x n matrix (row-major upper triangle)."""
        rows, cols = np.triu_indices(n, k=0 if self.self_interaction else 1)
        return (rows * n + cols).astype(np.int32)

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[1] is None:
            raise ValueError(f"DotInteraction expects [batch, N, D] with N known, got shape {tuple(input_shape)}")
        super().build(input_shape)

    def call(self, vectors):
        n = vectors.shape[1]
        gram = tf.matmul(vectors, vectors, transpose_b=True)  # [B, N, N]
        flat = tf.reshape(gram, [-1, n * n])
        return tf.gather(flat, tf.constant(self._pair_positions(n)), axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], len(self._pair_positions(input_shape[1])))

    def get_config(self):
        config = super().get_config()
        config.update(self_interaction=self.self_interaction)
        return config


def build_dlrm(schema_or_dims, embedding_layer, bottom_mlp=(512, 256), top_mlp=(512, 256), name="dlrm"):
    """A DLRM click model as a Keras functional model.

    Dense features go through the bottom MLP (ReLU), whose last layer has the embedding width D (appended
    automatically after `bottom_mlp`), giving one more D-vector next to the F embedded categorical features. The
    dot products of every pair of these F + 1 vectors (strict upper triangle), concatenated with the bottom output,
    feed the top MLP (ReLU) and one logit; the output is its sigmoid. With no dense features (Avazu) there is no
    bottom MLP and the interactions are among the F embeddings only.

    Example:

    >>> from tfcompress.layers import RobeEmbedding
    >>> model = build_dlrm((13, 26), RobeEmbedding([1000] * 26, 16, compression=100.0), (64,), (64, 32))
    >>> model({"dense": tf.zeros([2, 13]), "sparse": tf.zeros([2, 26], tf.int64)}).shape
    TensorShape([2, 1])

    Args:
        schema_or_dims: a `tfcompress.data.schema.Schema` (or anything with `n_dense` and `n_sparse`), a
            mapping with those keys, or a tuple (n_dense, n_sparse).
        embedding_layer: any layer mapping int ids [B, n_sparse] to [B, n_sparse, D] (ROBE, full tables, a
            `CompressionPlan.build_layer()` result, ...).
        bottom_mlp: hidden widths of the bottom MLP; a final layer of width D is appended.
        top_mlp: hidden widths of the top MLP; a final 1-unit logit layer is appended.
        name: the model's name.

    Returns:
        A `keras.Model` with inputs {"dense": float32 [B, n_dense], "sparse": int64 [B, n_sparse]} and output
        click probability float32 [B, 1].
    """
    n_dense, n_sparse = model_inputs.feature_counts(schema_or_dims)
    bottom_mlp = check_units("bottom_mlp", bottom_mlp)
    top_mlp = check_units("top_mlp", top_mlp)
    inputs = model_inputs.feature_inputs(n_dense, n_sparse)

    embedded = model_inputs.embed(embedding_layer, inputs["sparse"])  # [B, F, D]
    dim = embedded.shape[-1]
    if n_dense > 0:
        bottom = build_mlp(bottom_mlp + (dim,), name="bottom_mlp")(inputs["dense"])  # [B, D]
        bottom_as_row = keras.layers.Reshape((1, dim), name="bottom_as_row")(bottom)
        vectors = keras.layers.Concatenate(axis=1, name="all_vectors")([bottom_as_row, embedded])  # [B, F+1, D]
        interactions = DotInteraction(name="dot_interaction")(vectors)
        top_input = keras.layers.Concatenate(axis=1, name="top_input")([bottom, interactions])
    else:
        top_input = DotInteraction(name="dot_interaction")(embedded)
    hidden = build_mlp(top_mlp, name="top_mlp")(top_input) if top_mlp else top_input
    logit = keras.layers.Dense(1, name="logit")(hidden)
    probability = keras.layers.Activation("sigmoid", dtype="float32", name="probability")(logit)
    return keras.Model(inputs=inputs, outputs=probability, name=name)
