"""Argument checks and id handling shared by every embedding layer (same calling convention everywhere)."""

import numpy as np
import tensorflow as tf

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


def check_id_shape(input_shape, num_features, layer_name):
    if input_shape[-1] is not None and input_shape[-1] != num_features:
        raise ValueError(
            f"{layer_name} expects ids of shape [batch, {num_features}] (one column per table), "
            f"got shape {tuple(input_shape)}"
        )
