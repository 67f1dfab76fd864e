"""The multilayer perceptron block every model shares (DLRM bottom/top towers, the DCNv2 deep tower)."""

from tfcompress._keras import keras


def check_units(name, units):
    """`units` as a tuple of positive ints (an empty tuple is allowed: no hidden layers).

    Raises ValueError naming the argument and the bad entry.
    """
    if isinstance(units, (str, bytes)) or not hasattr(units, "__iter__"):
        raise ValueError(f"{name} must be a list of layer widths (positive integers), got {units!r}")
    units = tuple(units)
    for width in units:
        if isinstance(width, bool) or int(width) != width or width < 1:
            raise ValueError(f"{name} entries must be positive integers (layer widths), got {width!r} in {list(units)}")
    return tuple(int(width) for width in units)


def build_mlp(units, name, activation="relu", final_activation="relu"):
    """A `keras.Sequential` of Dense layers, one per entry of `units`.

    Hidden layers use `activation`; the last one uses `final_activation` (DLRM's bottom tower ends in ReLU because
    its output is an embedding-like vector; a tower feeding a logit layer keeps ReLU too).

    Args:
        units: widths of the layers, e.g. (512, 256). Empty: the block is the identity.
        name: the block's name; its Dense layers are named `{name}_0`, `{name}_1`, ...
        activation: activation of every layer but the last.
        final_activation: activation of the last layer.

    Returns:
        A Keras Sequential model usable as a layer in a functional graph.
    """
    units = check_units(name, units)
    layers = [
        keras.layers.Dense(
            width,
            activation=final_activation if i == len(units) - 1 else activation,
            # Glorot uniform is Keras' default; it is what DLRM's reference uses (scaled normal) in spirit and
            # trains stably with SGD/Adagrad at the learning rates the pipelines use.
            kernel_initializer="glorot_uniform",
            name=f"{name}_{i}",
        )
        for i, width in enumerate(units)
    ]
    return keras.Sequential(layers, name=name)
