"""Base classes of the embedding layers: argument checks, id handling and sizing shared by every method."""

import inspect

import numpy as np
import tensorflow as tf

from tfcompress._keras import keras
from tfcompress.lookup import GRADIENT_MODES

OUT_OF_RANGE_RULES = ("error", "mod")


def check_cardinalities(cardinalities):
    """A non-empty list of positive ints, returned as plain Python ints (so get_config stays JSON)."""
    if cardinalities is None or len(cardinalities) == 0:
        raise ValueError("cardinalities must be a non-empty list of table sizes, got an empty list")
    cards = [int(c) for c in cardinalities]
    for feature, card in enumerate(cards):
        if card < 1:
            raise ValueError(f"cardinalities[{feature}] must be >= 1, got {card}")
    return cards


def check_positive_int(name, value, minimum=1):
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_out_of_range(rule):
    if rule not in OUT_OF_RANGE_RULES:
        raise ValueError(f"out_of_range must be one of {OUT_OF_RANGE_RULES}, got {rule!r}")
    return rule


def prepare_ids(ids, cardinalities, out_of_range):
    """Cast ids [B, F] to int64 and apply the out-of-range rule.

    - "error": any id < 0 or >= cardinalities[f] raises InvalidArgumentError naming the feature and the value.
    - "mod": ids are folded into range with a floor modulo (so -1 becomes cardinality - 1).
    """
    ids = tf.cast(ids, tf.int64)
    cards = tf.constant(np.asarray(cardinalities, dtype=np.int64))
    if out_of_range == "mod":
        return tf.math.floormod(ids, cards)
    bad = tf.logical_or(ids < 0, ids >= cards)
    first_bad = tf.where(bad)[:1]  # [0 or 1, 2]: (row, feature) of the first offending id
    feature = tf.reshape(first_bad[:, 1], [-1])
    value = tf.gather_nd(ids, first_bad)
    check = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(bad)),
        ["id out of range: feature", feature, "value", value, "allowed [0, cardinality) with cardinalities",
         cards, "(use out_of_range='mod' to fold ids into range)"],
        summarize=64,
    )
    with tf.control_dependencies([check]):
        return tf.identity(ids)


def check_option_names(layer_class, options):
    """Raise ValueError naming any key of `options` that `layer_class`'s constructor does not take by name."""
    parameters = inspect.signature(layer_class.__init__).parameters
    known = {name for name, p in parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self", "cardinalities", "output_dim"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{layer_class.__name__} has no option {unknown[0]!r}; its options are {sorted(known)}")


def check_id_shape(input_shape, num_features, layer_name):
    if input_shape[-1] is not None and input_shape[-1] != num_features:
        raise ValueError(
            f"{layer_name} expects ids of shape [batch, {num_features}] (one column per table), "
            f"got shape {tuple(input_shape)}"
        )


class IdLayer(keras.layers.Layer):
    """Base of the layers that map integer ids [batch, F] to float32 [batch, F, output_dim].

    Holds the checked `cardinalities`, `output_dim` and `out_of_range`, `logical_parameters`, the output shape, the
    id-shape check and the id preparation, and the matching part of `get_config`. Subclasses create their weights
    in `build` (calling `check_id_shape` first and `super().build` last), call `prepare_ids` in `call`, and
    extend `get_config` with their own arguments. Not registered as serializable: only subclasses are saved.

    Args:
        cardinalities: ids of feature f lie in [0, cardinalities[f]).
        output_dim: embedding width D.
        out_of_range: "error" or "mod" (see `prepare_ids`).
        **kwargs: passed to `keras.layers.Layer` (name, dtype, trainable, ...).
    """

    def __init__(self, cardinalities, output_dim, out_of_range="error", **kwargs):
        super().__init__(**kwargs)
        self.cardinalities = check_cardinalities(cardinalities)
        self.output_dim = check_positive_int("output_dim", output_dim)
        self.out_of_range = check_out_of_range(out_of_range)

    @classmethod
    def parameter_counts(cls, cardinalities, output_dim, **options):
        """(trained, deployed) float parameters of `cls(cardinalities, output_dim, **options)`, without making it.

        Plans size every method through this (a layer is only made when the model is built). The deployed count
        differs from the trained one where export rewrites the layer (MLET folds to n*d per table); it is None
        otherwise. Option names are checked against the constructor's, and the options that decide the size by
        the same functions the constructor uses.

        Raises:
            ValueError: an unknown option, or a value the constructor would refuse.
        """
        check_option_names(cls, options)
        if "out_of_range" in options:
            check_out_of_range(options["out_of_range"])
        if options.get("gradient", "auto") not in GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {options['gradient']!r}")
        return cls._parameter_counts(check_cardinalities(cardinalities), check_positive_int("output_dim", output_dim),
                                     **options)

    @classmethod
    def _parameter_counts(cls, cardinalities, output_dim, **options):
        """Each planned method computes (trained, deployed or None) from its checked arguments."""
        raise TypeError(f"{cls.__name__} is not a planned method (it has no sizing from arguments)")

    @property
    def logical_parameters(self):
        """Size of full uncompressed D-wide tables: sum n_f * D."""
        return sum(self.cardinalities) * self.output_dim

    def check_id_shape(self, input_shape):
        """Raise ValueError unless the ids have one column per table."""
        check_id_shape(input_shape, len(self.cardinalities), type(self).__name__)

    def prepare_ids(self, ids):
        """The ids as int64 with this layer's out-of-range rule applied (see the module function)."""
        return prepare_ids(ids, self.cardinalities, self.out_of_range)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(cardinalities=self.cardinalities, output_dim=self.output_dim, out_of_range=self.out_of_range)
        return config


class IdEmbeddingLayer(IdLayer):
    """Base of the layers that look ids up in trained tables: `IdLayer` plus the tables' `gradient` mode and
    `embeddings_initializer`.

    Args:
        cardinalities, output_dim, out_of_range: as in `IdLayer`.
        gradient: gradient mode of the tables ("sparse", "dense" or "auto"); each subclass resolves it against
            its own table sizes (`tfcompress.lookup.resolve_gradient_mode`).
        embeddings_initializer: anything `keras.initializers.get` accepts.
        **kwargs: passed to `keras.layers.Layer` (name, dtype, trainable, ...).
    """

    def __init__(self, cardinalities, output_dim, gradient="sparse", out_of_range="error",
                 embeddings_initializer="uniform", **kwargs):
        super().__init__(cardinalities, output_dim, out_of_range=out_of_range, **kwargs)
        self.gradient = gradient
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def get_config(self):
        config = super().get_config()
        config.update(gradient=self.gradient,
                      embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer))
        return config


def nested_layers(layer):
    """Every layer inside `layer`, at any depth (nested models, PlannedEmbedding members), not `layer` itself."""
    if hasattr(layer, "_flatten_layers"):  # Keras 3 and tf_keras both track sub-layers this way
        return list(layer._flatten_layers(include_self=False, recursive=True))
    found = []
    for child in getattr(layer, "layers", []):
        found.append(child)
        found.extend(nested_layers(child))
    return found
