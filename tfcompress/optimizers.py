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
from tfcompress.lookup import resource_variable


@register_serializable()
class SparseAdagrad(keras.optimizers.Adagrad):
    """`keras.optimizers.Adagrad` with row-sparse updates for IndexedSlices gradients (same results).

    Example:

    >>> model.compile(optimizer=SparseAdagrad(learning_rate=0.05), loss="binary_crossentropy")
    """

    def update_step(self, gradient, variable, learning_rate=None):
        if USING_LEGACY_KERAS:
            # tf_keras' Adagrad already applies IndexedSlices sparsely (and calls update_step without a rate).
            return super().update_step(gradient, variable)
        if not isinstance(gradient, tf.IndexedSlices):
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


@register_serializable()
class LazyAdam(keras.optimizers.Adam):
    """Adam whose IndexedSlices updates touch only the rows in the gradient ("lazy" Adam, as in TF Addons).

    Keras 3's Adam decays the moments of every row every step, so a sparse embedding gradient becomes a
    table-sized update (about 1 s per step on the 34M-row Criteo Kaggle tables here). LazyAdam updates the
    moments and the weights of the looked-up rows only. That is NOT the same algorithm as Adam: a row's moments
    decay only when the row is used. On rows used in every step the two agree exactly; dense gradients (MLPs,
    small ROBE arrays) take the stock Adam path. Measured on planted-signal Criteo (3M rows, 1 epoch, DLRM dim 16):
    AUC 0.7445 full tables / 0.7418 ROBE-1000x, against 0.7188 / 0.7181 for SGD after 2 epochs.
    """

    def update_step(self, gradient, variable, learning_rate=None):
        if USING_LEGACY_KERAS:
            return super().update_step(gradient, variable)
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        index = self._get_variable_index(variable)
        m, v = resource_variable(self._momentums[index]), resource_variable(self._velocities[index])
        indices, position = tf.unique(gradient.indices)
        values = tf.math.unsorted_segment_sum(tf.cast(gradient.values, dtype), position, tf.size(indices))
        m_rows = beta_1 * tf.gather(m, indices) + (1 - beta_1) * values
        v_rows = beta_2 * tf.gather(v, indices) + (1 - beta_2) * tf.square(values)
        self.assign(m, tf.IndexedSlices(m_rows, indices))
        self.assign(v, tf.IndexedSlices(v_rows, indices))
        self.assign_sub(variable, tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), indices))
