"""The one place that decides which Keras the package uses.

Keras 3 (what `tf.keras` is on TF >= 2.16) is primary. Stacks that run legacy tf.keras set
`TF_USE_LEGACY_KERAS=1` before TensorFlow is imported (tensorflow-recommenders needs it); there `tf_keras` is
used instead, so the same layer classes work on both sides. Every module imports `keras` from here, never
directly.

What differs between the two stacks and is handled here (the layers themselves are written once):

- registration: `keras.saving.register_keras_serializable` (Keras 3) vs `keras.utils.register_keras_serializable`
  (tf_keras); `register_serializable()` picks the right one.
- weights: Keras 3 hands a `KerasVariable` wrapping a `tf.Variable`, tf_keras the `tf.Variable` itself. Both
  convert with `tf.convert_to_tensor` and both are accepted by `tf.GradientTape.gradient`, so code uses those
  (never `.value`, which is a method of `tf.Variable` in tf_keras but the wrapped variable in Keras 3).
- saving: both write and load `.keras` files; tf_keras also writes SavedModel directories (`model.save(dir)`,
  `tf.saved_model.save`), which is what TFRS stacks export.
- initializers: `fresh_initializer()` gives every weight its own draw (see there; needed in both stacks).
- shared objects: `object_sharing_scope()` is the scope in which both stacks serialize an object that several
  layers hold (a shared `RobeMemory`) once and deserialize it as one object again (what `.keras` saving uses).
"""

import os

# TensorFlow reads the same variable, with exactly these values, to decide what `tf.keras` is; reading it the
# same way keeps `tfcompress` and `tf.keras` (and so tensorflow-recommenders) on one Keras.
USING_LEGACY_KERAS = os.environ.get("TF_USE_LEGACY_KERAS") in ("true", "True", "1")

if USING_LEGACY_KERAS:
    try:
        import tf_keras as keras  # noqa: F401  (re-exported)
    except ImportError as error:
        raise ImportError(
            "TF_USE_LEGACY_KERAS is set, so tfcompress uses legacy tf.keras, but the tf_keras package is not "
            "installed: install the tf-keras release matching TensorFlow (e.g. tf-keras~=2.21.0 for TF 2.21)"
        ) from error

    def register_serializable(package="tfcompress"):
        """Class decorator: make a layer loadable by name from saved configs (tf_keras registry)."""
        return keras.utils.register_keras_serializable(package=package)

else:
    import keras  # noqa: F401  (re-exported)

    def register_serializable(package="tfcompress"):
        """Class decorator: make a layer loadable by name from saved configs (Keras 3 registry)."""
        return keras.saving.register_keras_serializable(package=package)


def fresh_initializer(initializer):
    """`initializer` ready for ONE more `add_weight` call: an unseeded one is copied so it draws new values.

    Both stacks fix an unseeded initializer's random seed when the initializer object is made and draw with
    stateless ops, so one object used for several weights draws the same stream for each: tables of equal shape
    start identical, and a [50, D] table starts as the first 50 rows of a [1000, D] one. A copy made from its
    config picks its own seed (reproducible under `keras.utils.set_random_seed`). A seeded initializer is
    returned unchanged: a fixed seed asks for fixed values.

    Args:
        initializer: a Keras initializer object (from `keras.initializers.get`) or a plain callable.
    """
    if not isinstance(initializer, keras.initializers.Initializer):
        return initializer  # a plain function: nothing to copy
    config = initializer.get_config()
    if config.get("seed") is not None:
        return initializer
    return type(initializer).from_config(config)


# Keras' object-sharing scope: inside it, an object serialized by several layers' configs (a shared RobeMemory) is
# deserialized once and handed to all of them. `.keras` save and load open it themselves; neither stack exports it
# publicly, so it is reached here, the one module that knows which Keras is in use. The private modules are
# imported when first needed, so a Keras release that moves them breaks memory sharing only, not the package.


def _serialization_lib():
    if USING_LEGACY_KERAS:
        # private module, imported on use (see above)
        from tf_keras.src.saving import serialization_lib
    else:
        # private module, imported on use (see above)
        from keras.src.saving import serialization_lib
    return serialization_lib


def in_object_sharing_scope():
    """True inside a Keras object-sharing scope (where shared objects are serialized and read back once)."""
    if USING_LEGACY_KERAS:  # tf_keras keeps the flag in a thread-local
        return bool(getattr(_serialization_lib().SHARED_OBJECTS, "enabled", False))
    # Keras 3 keeps its map in global state while a scope is open; private module, imported on use (see above)
    from keras.src.backend.common import global_state

    return global_state.get_global_attribute("shared_objects/id_to_obj_map") is not None


def object_sharing_scope():
    """A context manager: configs made and read inside it keep objects shared by several layers shared."""
    return _serialization_lib().ObjectSharingScope()


def legacy_loading_scope():
    """The tf_keras SavedModel loader's shared-object scope while `load_model(directory)` runs, else None.

    That loader rebuilds layers from their configs outside the object-sharing scope above; this scope (its own,
    with `get(key)` / `set(key, object)`) is what lets an object shared by several layers come back shared there.
    """
    if not USING_LEGACY_KERAS:
        return None
    # private module, imported on use (see above)
    from tf_keras.src.saving.legacy import serialization as legacy_serialization

    scope = legacy_serialization._shared_object_loading_scope()
    return scope if isinstance(scope, legacy_serialization.SharedObjectLoadingScope) else None
