"""Base classes of the embedding layers: argument checks, id handling and sizing shared by every method."""

import dataclasses
import inspect

import numpy as np
import tensorflow as tf

from tfcompress import lookup
from tfcompress._keras import keras

OUT_OF_RANGE_RULES = ("error", "mod")
# The id rules of `serving_lookup`: "mod" folds every id into range, "error" raises on an out-of-range id, and
# "as_trained" applies the layer's own `out_of_range`.
SERVING_RULES = ("mod", "as_trained", "error")


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


def check_ids(ids, num_features, layer_name):
    """`ids` as a tensor, after refusing what would otherwise be read silently wrong.

    Float ids would be truncated (1.7 -> 1, NaN -> INT64_MIN), so any non-integer dtype is a TypeError. A rank
    other than 2 would broadcast into a wrong output shape, so it is a ValueError: the same check and message on
    every path (pure TF, fused op, serving), made where the shape is known, before anything runs.
    """
    ids = tf.convert_to_tensor(ids)
    if not ids.dtype.is_integer:
        raise TypeError(f"{layer_name}: ids must be an integer tensor, got {ids.dtype.name}; float ids would be "
                        "truncated silently (cast them yourself once you know they are whole numbers)")
    check_id_shape(ids.shape, num_features, layer_name)
    return ids


def ids_in_range(ids, cards):
    """Whether every id of int64 ids [B, F] is in [0, cards[f]): a scalar bool tensor.

    Two reductions and one compare, in stock ops that tf2onnx converts (no unsigned bitcast): measured ~0.4 ms at
    [16384, 26], where folding every id (an int64 division each) costs ~1.2 ms.
    """
    return tf.logical_and(tf.reduce_min(ids) >= 0, tf.reduce_all(ids < cards))


def prepare_ids(ids, cardinalities, out_of_range, layer_name="ids"):
    """Check ids [B, F] (`check_ids`), cast them to int64 and apply the out-of-range rule.

    - "error": any id < 0 or >= cardinalities[f] raises InvalidArgumentError naming the feature and the value.
    - "mod": ids are folded into range with a floor modulo (so -1 becomes cardinality - 1). A batch whose ids are
      all in range (the usual case) skips the fold (`ids_in_range`).
    """
    ids = tf.cast(check_ids(ids, len(cardinalities), layer_name), tf.int64)
    cards = tf.constant(np.asarray(cardinalities, dtype=np.int64))
    if out_of_range == "mod":
        return tf.cond(ids_in_range(ids, cards), lambda: ids, lambda: tf.math.floormod(ids, cards))
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
    """Raise ValueError unless a shape can be [batch, num_features] (unknown dimensions pass)."""
    shape = tf.TensorShape(input_shape)
    if shape.rank is None:
        return
    if shape.rank != 2 or (shape[-1] is not None and shape[-1] != num_features):
        raise ValueError(f"{layer_name}: ids must have shape [batch, {num_features}] (one column per table), "
                         f"got shape {tuple(shape.as_list())}")


def serving_rule(out_of_range, trained_rule):
    """The id rule ("mod" or "error") a serving lookup applies: `out_of_range`, or `trained_rule` for "as_trained"."""
    if out_of_range not in SERVING_RULES:
        raise ValueError(f"out_of_range must be one of {SERVING_RULES}, got {out_of_range!r}")
    return trained_rule if out_of_range == "as_trained" else out_of_range


def table_reader(tables=None):
    """`tables`, or for None the reader of the stored variables (`tfcompress.lookup.TableReader`)."""
    return lookup.TableReader() if tables is None else tables


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """Float parameters of a method's tables, trained and deployed.

    `deployed` differs from `trained` where export rewrites the layer (MLET folds to n*d per table). The
    per-feature lists are None where the features share one array or pool (ROBE-Z, chunk pruning): no table
    belongs to a single feature there.
    """

    trained: int
    deployed: int
    trained_per_feature: list = None
    deployed_per_feature: list = None

    @classmethod
    def of(cls, trained, deployed=None):
        """From per-feature lists or shared totals; `deployed` None means "as trained"."""
        deployed = trained if deployed is None else deployed

        def total(counts):
            return int(sum(counts)) if isinstance(counts, list) else int(counts)

        def per_feature(counts):
            return [int(c) for c in counts] if isinstance(counts, list) else None

        return cls(total(trained), total(deployed), per_feature(trained), per_feature(deployed))


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
        """The float parameters of `cls(cardinalities, output_dim, **options)` (`ParameterCounts`), without making it.

        Plans size every method through this (a layer is only made when the model is built). Option names are
        checked against the constructor's, and the options that decide the size by the same functions the
        constructor uses.

        Raises:
            ValueError: an unknown option, or a value the constructor would refuse.
        """
        check_option_names(cls, options)
        if "out_of_range" in options:
            check_out_of_range(options["out_of_range"])
        if options.get("gradient", "auto") not in lookup.GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {lookup.GRADIENT_MODES}, got {options['gradient']!r}")
        trained, deployed = cls._parameter_counts(check_cardinalities(cardinalities),
                                                  check_positive_int("output_dim", output_dim), **options)
        return ParameterCounts.of(trained, deployed)

    @classmethod
    def _parameter_counts(cls, cardinalities, output_dim, **options):
        """Each planned method computes (trained, deployed or None) from its checked arguments: each a list with
        one count per feature, or one int where the features share one array."""
        raise TypeError(f"{cls.__name__} is not a planned method (it has no sizing from arguments)")

    @property
    def logical_parameters(self):
        """Size of full uncompressed D-wide tables: sum n_f * D."""
        return sum(self.cardinalities) * self.output_dim

    @property
    def described(self):
        """How errors name this layer: its class and name."""
        return f"{type(self).__name__} {self.name!r}"

    def check_id_shape(self, input_shape):
        """Raise ValueError unless the ids have one column per table."""
        check_id_shape(input_shape, len(self.cardinalities), self.described)

    def check_ids(self, ids):
        """The ids as a tensor, refused when they are not integer [batch, F] (see the module function)."""
        return check_ids(ids, len(self.cardinalities), self.described)

    def prepare_ids(self, ids):
        """The ids as int64 with this layer's out-of-range rule applied (see the module function)."""
        return prepare_ids(ids, self.cardinalities, self.out_of_range, self.described)

    def serving_ids(self, ids, out_of_range="mod"):
        """The ids as int64 with the serving id rule applied (see `serving_rule`)."""
        return prepare_ids(ids, self.cardinalities, serving_rule(out_of_range, self.out_of_range), self.described)

    def serving_lookup(self, ids, out_of_range="mod", tables=None):
        """What `call(ids)` returns, computed with stock TensorFlow ops only: the lookup of serving graphs.

        Exporters trace this instead of `call` (the layer itself is left as it is): no custom op, no gradient
        plumbing, an id rule chosen for serving, and tables read through `tables`. For in-range ids the values are
        bit-identical to `call`'s; out-of-range ids fold into range with "mod" whatever the layer's own rule.

        Args:
            ids: integer [batch, F].
            out_of_range: the serving id rule: "mod" (fold every id into range with a floor modulo; never raises),
                "error" (an id outside [0, n_f) raises InvalidArgumentError naming the feature and the value) or
                "as_trained" (the layer's own `out_of_range`).
            tables: how float tables are read, a `tfcompress.lookup.TableReader` (the exporter's reads int8 or
                float16 copies); default the stored variables.

        Returns:
            float32 [batch, F, output_dim].
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement serving_lookup, so it cannot be "
                                  "exported for serving")

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
