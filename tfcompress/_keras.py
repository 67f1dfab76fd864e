"""The one place that decides which Keras the package uses.

Keras 3 (what `tf.keras` is on TF >= 2.16) is primary. Stacks that run legacy tf.keras set
`TF_USE_LEGACY_KERAS=1` before TensorFlow is imported (tensorflow-recommenders needs it); there `tf_keras` is
used instead, so the same layer classes work on both sides. Every module imports `keras` from here, never
directly.
"""

import os

USING_LEGACY_KERAS = os.environ.get("TF_USE_LEGACY_KERAS", "0").lower() in ("1", "true", "yes")

if USING_LEGACY_KERAS:
    import tf_keras as keras  # noqa: F401  (re-exported)

    def register_serializable(package="tfcompress"):
        return keras.utils.register_keras_serializable(package=package)

else:
    import keras  # noqa: F401  (re-exported)

    def register_serializable(package="tfcompress"):
        return keras.saving.register_keras_serializable(package=package)
