"""SparseAdagrad: the same trajectory as Keras' Adagrad, touching only the rows in the gradient."""

import numpy as np
import tensorflow as tf

from tfcompress._keras import keras
from tfcompress.layers import FullEmbedding, RobeEmbedding
from tfcompress.optimizers import SparseAdagrad


def train(optimizer, layer, steps=4, densify=False):
    for step in range(steps):
        rng = np.random.RandomState(step)
        ids = rng.randint(0, 40, (32, 2))  # many duplicates per batch
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids) ** 3 + layer(ids))
        grads = tape.gradient(loss, layer.trainable_variables)
        if densify:  # the textbook dense Adagrad (Keras' own would square duplicate IndexedSlices separately)
            grads = [tf.convert_to_tensor(g) for g in grads]
        optimizer.apply_gradients(zip(grads, layer.trainable_variables))
    return [w.numpy() for w in layer.weights]


def test_matches_keras_adagrad_on_sparse_and_dense_gradients():
    for make in (lambda: FullEmbedding([40, 60], 4, gradient="sparse"),
                 lambda: RobeEmbedding([40, 60], 4, memory_size=30, gradient="dense")):
        keras.utils.set_random_seed(3)
        reference = train(keras.optimizers.Adagrad(0.2), make(), densify=True)
        keras.utils.set_random_seed(3)
        ours = train(SparseAdagrad(0.2), make())
        for want, got in zip(reference, ours):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_untouched_rows_and_their_accumulators_stay_unchanged():
    layer = FullEmbedding([100], 2)
    layer.build((None, 1))
    before = layer.tables[0].numpy().copy()
    optimizer = SparseAdagrad(0.5)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(np.array([[7], [7], [9]])))
    optimizer.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables))
    changed = np.flatnonzero(np.any(layer.tables[0].numpy() != before, axis=1))
    assert list(changed) == [7, 9]
    # Row 7 was looked up twice: gradient 2, accumulator 0.1 + 4, step 0.5 * 2 / sqrt(4.1).
    np.testing.assert_allclose(before[7] - layer.tables[0].numpy()[7], 0.5 * 2 / np.sqrt(4.1 + 1e-7), rtol=1e-5)


def test_serializes_inside_a_keras_model(tmp_path):
    inputs = keras.Input((1,), dtype="int64")
    model = keras.Model(inputs, keras.layers.Flatten()(FullEmbedding([10], 2)(inputs)))
    model.compile(SparseAdagrad(0.1), "mse")
    model.fit(np.arange(10)[:, None], np.zeros((10, 2)), verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, SparseAdagrad)


def test_lazy_adam_equals_adam_when_every_row_is_used_and_skips_unused_rows():
    from tfcompress.optimizers import LazyAdam

    def run(optimizer, ids_per_step, densify):
        keras.utils.set_random_seed(5)
        layer = FullEmbedding([6], 3, gradient="sparse")
        layer.build((None, 1))
        for ids in ids_per_step:
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(ids[:, None]) ** 3)
            grads = tape.gradient(loss, layer.trainable_variables)
            if densify:
                grads = [tf.convert_to_tensor(g) for g in grads]
            optimizer.apply_gradients(zip(grads, layer.trainable_variables))
        return layer.tables[0].numpy()

    every_row = [np.array([0, 1, 2, 3, 4, 5, 5, 1])] * 3
    np.testing.assert_allclose(run(LazyAdam(0.1), every_row, False), run(keras.optimizers.Adam(0.1), every_row, True),
                               rtol=1e-5, atol=1e-6)
    # Rows 4 and 5 used only in step 1: afterwards Adam keeps moving them (decaying momentum), LazyAdam does not.
    some_rows = [np.array([0, 4, 5]), np.array([0, 1]), np.array([0, 1])]
    after_first = run(LazyAdam(0.1), some_rows[:1], False)
    lazy = run(LazyAdam(0.1), some_rows, False)
    adam = run(keras.optimizers.Adam(0.1), some_rows, True)
    np.testing.assert_array_equal(lazy[4:], after_first[4:])
    assert np.all(adam[4:] != after_first[4:])
