"""Several embedding layers behind one: each handles a subset of the features, outputs come back in order."""

import numpy as np
import tensorflow as tf

from tfcompress._keras import keras, register_serializable
from tfcompress.layers import base


@register_serializable()
class PlannedEmbedding(keras.layers.Layer):
    """Routes the columns of ids [batch, F] to the layers of a `CompressionPlan` and reassembles [batch, F, D].

    Built by `CompressionPlan.build_layer()`; e.g. small tables stay `FullEmbedding` while the rest share one
    `RobeEmbedding`.

    Args:
        num_features: F, the number of id columns.
        output_dim: D, the width every member layer must produce.
        groups: list of {"features": [column indices], "layer": a layer or its serialized config}; the features
            of all groups together are each column exactly once.
        out_of_range: "error" or "mod", applied here on the full id matrix so an error names the model's feature
            index (not the member's column).

    Input shape: integer [batch, F]. Output shape: float32 [batch, F, output_dim].
    """

    def __init__(self, num_features, output_dim, groups, out_of_range="error", **kwargs):
        super().__init__(**kwargs)
        self.out_of_range = base.check_out_of_range(out_of_range)
        self.num_features = base.check_positive_int("num_features", num_features)
        self.output_dim = base.check_positive_int("output_dim", output_dim)
        self.group_features = [[int(f) for f in group["features"]] for group in groups]
        covered = sorted(f for features in self.group_features for f in features)
        if covered != list(range(self.num_features)):
            raise ValueError(
                f"groups must cover each of the {self.num_features} features exactly once, got {self.group_features}"
            )
        self.members = [
            group["layer"] if isinstance(group["layer"], keras.layers.Layer) else keras.layers.deserialize(group["layer"])
            for group in groups
        ]
        for member in self.members:
            if member.output_dim != self.output_dim:
                raise ValueError(f"member {member.name} has output_dim {member.output_dim}, expected {self.output_dim}")
        order = np.concatenate(self.group_features)
        # Position of feature f in the concatenation of the members' outputs.
        self._restore_order = np.argsort(order)
        self._identity_order = len(self.members) == 1 and list(order) == list(range(self.num_features))
        self.cardinalities = [0] * self.num_features
        for member, features in zip(self.members, self.group_features):
            for column, feature in enumerate(features):
                self.cardinalities[feature] = member.cardinalities[column]

    @property
    def logical_parameters(self):
        return sum(member.logical_parameters for member in self.members)

    @property
    def physical_parameters(self):
        return sum(member.physical_parameters for member in self.members)

    def build(self, input_shape):
        base.check_id_shape(input_shape, self.num_features, f"{type(self).__name__} {self.name!r}")
        for member, features in zip(self.members, self.group_features):
            if not member.built:  # deserialized members arrive built from their own build_config
                member.build((input_shape[0], len(features)))
        super().build(input_shape)

    def call(self, ids):
        ids = base.prepare_ids(ids, self.cardinalities, self.out_of_range, f"{type(self).__name__} {self.name!r}")
        if self._identity_order:
            return self.members[0](ids)
        outputs = [
            member(tf.gather(ids, features, axis=1)) for member, features in zip(self.members, self.group_features)
        ]
        return tf.gather(tf.concat(outputs, axis=1), self._restore_order, axis=1)

    def serving_lookup(self, ids, out_of_range="mod", tables=None):
        """`call` for serving graphs: the serving id rule here (`base.serving_rule`), then every member's
        `serving_lookup` with the same rule and `tables` (see `base.IdLayer.serving_lookup`)."""
        ids = base.prepare_ids(ids, self.cardinalities, base.serving_rule(out_of_range, self.out_of_range),
                               f"{type(self).__name__} {self.name!r}")
        if self._identity_order:
            return self.members[0].serving_lookup(ids, out_of_range, tables)
        outputs = [member.serving_lookup(tf.gather(ids, features, axis=1), out_of_range, tables)
                   for member, features in zip(self.members, self.group_features)]
        return tf.gather(tf.concat(outputs, axis=1), self._restore_order, axis=1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_features=self.num_features,
            output_dim=self.output_dim,
            out_of_range=self.out_of_range,
            groups=[
                {"features": features, "layer": keras.layers.serialize(member)}
                for features, member in zip(self.group_features, self.members)
            ],
        )
        return config
