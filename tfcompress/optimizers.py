"""Optimizers that keep sparse embedding updates sparse.

Keras 3's Adagrad turns an IndexedSlices gradient into a table-sized dense update (it divides by the whole
accumulator), so every step rewrites every row: measured 1.1-1.5 s per step on the 34M-row Criteo Kaggle tables
against 0.02 s with `SparseAdagrad` (batch 4096, 2 cores). `SparseAdagrad` updates only the rows in the gradient;
for rows outside it the dense algorithm changes nothing either (their gradient is 0), so the result equals Adagrad
on the dense gradient. (Keras' own Adagrad also squares duplicate IndexedSlices rows one by one, which is not the
square of their sum; SparseAdagrad sums duplicates first.)
"""

import tensorflow as tf

from tfcompress._keras import USING_LEGACY_KERAS, keras, register_serializable
from tfcompress.ops import resource_variable


@register_serializable()
class SparseAdagrad(keras.optimizers.Adagrad):
    """`keras.optimizers.Adagrad` with row-sparse updates for IndexedSlices gradients (same results).

    Example:

    >>> model.compile(optimizer=SparseAdagrad(learning_rate=0.05), loss="binary_crossentropy")
    """

    def update_step(self, gradient, variable, learning_rate):
        if USING_LEGACY_KERAS or not isinstance(gradient, tf.IndexedSlices):
            # tf_keras' Adagrad already applies IndexedSlices sparsely; dense gradients take the stock path.
            return super().update_step(gradient, variable, learning_rate)
        lr = tf.cast(learning_rate, variable.dtype)
        accumulator = self._accumulators[self._get_variable_index(variable)]
        # Duplicate indices must be summed before squaring; tfcompress layers already coalesce, others may not.
        indices, position = tf.unique(gradient.indices)
        values = tf.math.unsorted_segment_sum(tf.cast(gradient.values, variable.dtype), position, tf.size(indices))
        # Keras' assign_add/assign_sub scatter IndexedSlices: only these rows are read and written.
        self.assign_add(accumulator, tf.IndexedSlices(tf.square(values), indices))
        accumulated = tf.gather(resource_variable(accumulator), indices)
        self.assign_sub(variable, tf.IndexedSlices(lr * values / tf.sqrt(accumulated + self.epsilon), indices))
