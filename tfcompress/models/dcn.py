"""DCNv2 (Wang et al. 2021): explicit feature crosses x0 * (W x_l + b) + x_l combined with a deep tower."""

import tensorflow as tf

from tfcompress._keras import keras, register_serializable
from tfcompress.models import features as model_inputs
from tfcompress.models.mlp import build_mlp, check_units

STRUCTURES = ("stacked", "parallel")


@register_serializable()
class Cross(keras.layers.Layer):
    """One DCNv2 cross layer: x_{l+1} = x0 * (W x_l + b) + x_l (element-wise product with the base input x0).

    W is full rank [d, d] by default; with `projection_dim=r` it is the low-rank product U V (U [d, r], V [r, d]),
    which is cheaper when r < d / 2 (the paper's "DCN-Mix"-free low-rank variant).

    Example:

    >>> x0 = tf.ones([2, 5])
    >>> Cross()([x0, x0]).shape
    TensorShape([2, 5])

    Args:
        projection_dim: None for a full-rank W, or the rank r >= 1 of the low-rank W = U V.
        use_bias: add b.
        kernel_initializer: initializer of W (or of U and V).
        bias_initializer: initializer of b.

    Input: a list [x0, x_l] of two float tensors [batch, d]. Output shape: [batch, d].
    """

    def __init__(
        self,
        projection_dim=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if projection_dim is not None and (
            isinstance(projection_dim, bool) or int(projection_dim) != projection_dim or projection_dim < 1
        ):
            raise ValueError(f"projection_dim must be None (full rank) or an integer >= 1, got {projection_dim!r}")
        self.projection_dim = None if projection_dim is None else int(projection_dim)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ValueError(f"Cross expects a list [x0, x_l] of two [batch, d] tensors, got {input_shape!r}")
        x0_shape, x_shape = (tuple(shape) for shape in input_shape)
        if len(x0_shape) != 2 or x0_shape[-1] is None or x0_shape[-1] != x_shape[-1]:
            raise ValueError(f"Cross expects x0 and x_l of the same shape [batch, d], got {x0_shape} and {x_shape}")
        width = x0_shape[-1]
        if self.projection_dim is None:
            self.kernel = self.add_weight(name="kernel", shape=(width, width), initializer=self.kernel_initializer)
        else:
            # A fresh initializer per weight: legacy tf.keras repeats an unseeded instance's values.
            fresh = self.kernel_initializer.__class__.from_config(self.kernel_initializer.get_config())
            self.down_kernel = self.add_weight(
                name="down_kernel", shape=(width, self.projection_dim), initializer=self.kernel_initializer
            )
            self.up_kernel = self.add_weight(name="up_kernel", shape=(self.projection_dim, width), initializer=fresh)
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(width,), initializer=self.bias_initializer)
        super().build(input_shape)

    def call(self, inputs):
        x0, x = inputs
        if self.projection_dim is None:
            projected = tf.matmul(x, self.kernel)
        else:
            projected = tf.matmul(tf.matmul(x, self.down_kernel), self.up_kernel)
        if self.use_bias:
            projected = projected + self.bias
        return x0 * projected + x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[1])

    def get_config(self):
        config = super().get_config()
        config.update(
            projection_dim=self.projection_dim,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config


def build_dcn(
    schema_or_dims,
    embedding_layer,
    cross_layers=3,
    deep_layers=(512, 256),
    projection_dim=None,
    structure="stacked",
    name="dcn",
):
    """A DCNv2 click model as a Keras functional model.

    x0 = concat(flattened embeddings [B, F * D], dense features [B, n_dense]); `cross_layers` Cross layers map x0
    to x_L. "stacked": the deep tower (ReLU MLP) runs on x_L. "parallel": the deep tower runs on x0 and its output
    is concatenated with x_L. A 1-unit logit layer and a sigmoid give the click probability.

    Example:

    >>> from tfcompress.layers import RobeEmbedding
    >>> model = build_dcn((13, 26), RobeEmbedding([1000] * 26, 16, compression=100.0), 2, (64, 32))
    >>> model({"dense": tf.zeros([2, 13]), "sparse": tf.zeros([2, 26], tf.int64)}).shape
    TensorShape([2, 1])

    Args:
        schema_or_dims: a Schema (anything with `n_dense`, `n_sparse`), a mapping with those keys, or a pair.
        embedding_layer: any layer mapping int ids [B, n_sparse] to [B, n_sparse, D].
        cross_layers: number of Cross layers, >= 0.
        deep_layers: widths of the deep tower (may be empty).
        projection_dim: None for full-rank cross layers, or the rank of low-rank ones.
        structure: "stacked" or "parallel".
        name: the model's name.

    Returns:
        A `keras.Model` with inputs {"dense": float32 [B, n_dense], "sparse": int64 [B, n_sparse]} and output
        click probability float32 [B, 1].
    """
    n_dense, n_sparse = model_inputs.feature_counts(schema_or_dims)
    if isinstance(cross_layers, bool) or int(cross_layers) != cross_layers or cross_layers < 0:
        raise ValueError(f"cross_layers must be an integer >= 0, got {cross_layers!r}")
    deep_layers = check_units("deep_layers", deep_layers)
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    inputs = model_inputs.feature_inputs(n_dense, n_sparse)

    embedded = model_inputs.embed(embedding_layer, inputs["sparse"])  # [B, F, D]
    flat = keras.layers.Flatten(name="flatten_embeddings")(embedded)
    x0 = keras.layers.Concatenate(axis=1, name="x0")([flat, inputs["dense"]]) if n_dense > 0 else flat
    crossed = x0
    for i in range(int(cross_layers)):
        crossed = Cross(projection_dim=projection_dim, name=f"cross_{i}")([x0, crossed])

    deep = build_mlp(deep_layers, name="deep_mlp") if deep_layers else None
    if structure == "stacked":
        hidden = deep(crossed) if deep is not None else crossed
    else:
        hidden = keras.layers.Concatenate(axis=1, name="cross_and_deep")([crossed, deep(x0)]) if deep else crossed
    logit = keras.layers.Dense(1, name="logit")(hidden)
    probability = keras.layers.Activation("sigmoid", dtype="float32", name="probability")(logit)
    return keras.Model(inputs=inputs, outputs=probability, name=name)
