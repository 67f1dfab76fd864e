"""Periodic pruning and regrowth of `ChunkPrunedEmbedding` chunks (FIITED), and the Keras callback that runs it.

Every `period` training steps, for each chunk-pruned layer:

1. sample `sample_size` rows and read the utilities of their K chunks;
2. thresholds: "manual" gives chunk k its own pruning ratio p_k (a power-law or linear profile in k, fitted to the
   requested mean, each capped at 0.95; later chunks are pruned more), theta_k = the p_k-quantile of chunk k's
   sampled utilities; "dynamic" uses one global quantile of all sampled utilities for every chunk;
3. crossings = live chunks whose utility fell below their threshold; only when crossings exceed
   `enforce_ratio` x capacity are they evicted (their addresses pushed on the free stack), which avoids churning
   the pool for a handful of chunks;
4. pruned chunks with utility >= their threshold (and > 0) are allocated, highest utility first, from the free
   stack (LIFO) and re-initialized; when the stack is empty allocation waits for the next enforced eviction.

Everything runs vectorized on the layer's variables, outside the compiled training step (eagerly, in
cross-replica context under a tf.distribute strategy: every replica receives the same assignments). The only
per-step work is the layer's utility update.
"""

import numpy as np
import tensorflow as tf

from tfcompress._keras import USING_LEGACY_KERAS, fresh_initializer, keras
from tfcompress.layers.base import nested_layers
from tfcompress.layers.chunk_pruned import ChunkPrunedEmbedding
from tfcompress.lookup import resource_variable

MAX_CHUNK_RATIO = 0.95
PROFILES = ("power", "linear")
MODES = ("manual", "dynamic")


def chunk_pruning_ratios(num_chunks, mean, profile="power", exponent=2.0, cap=MAX_CHUNK_RATIO):
    """Per-chunk pruning ratios p_k = min(cap, s * (k + 1)^e) with s chosen so that mean(p) = `mean`.

    Args:
        num_chunks: K.
        mean: the requested mean pruning ratio in [0, cap].
        profile: "power" (e = `exponent`) or "linear" (e = 1).
        exponent: e > 0 of the power-law profile.
        cap: the largest ratio of any chunk.

    Returns:
        float64 array [K], increasing in k, mean `mean` (to 1e-9), each <= cap.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if not 0.0 <= mean <= cap:
        raise ValueError(f"the mean pruning ratio must be in [0, {cap}], got {mean!r}")
    if not exponent > 0:
        raise ValueError(f"exponent must be > 0, got {exponent!r}")
    weights = np.arange(1, num_chunks + 1, dtype=np.float64) ** (1.0 if profile == "linear" else exponent)
    low, high = 0.0, cap / weights[0]  # at s = high every chunk is capped: mean = cap >= the target
    for _ in range(200):  # bisection: mean(min(cap, s * w)) is continuous and increasing in s
        middle = (low + high) / 2
        if np.minimum(cap, middle * weights).mean() < mean:
            low = middle
        else:
            high = middle
    return np.minimum(cap, high * weights)


def thresholds(sampled, ratios):
    """theta_k = the value below which a fraction ratios[k] of column k of `sampled` [m, K] lies.

    theta_k = sorted(sampled[:, k])[floor(ratios[k] * m)], so exactly floor(ratios[k] * m) of distinct samples are
    < theta_k. A scalar ratio means one global threshold over all samples (dynamic mode), returned for every chunk.
    """
    sampled = np.asarray(sampled, np.float64)
    m, k = sampled.shape
    if np.ndim(ratios) == 0:
        flat = np.sort(sampled.reshape(-1))
        return np.full(k, flat[min(int(np.floor(float(ratios) * flat.size)), flat.size - 1)])
    ordered = np.sort(sampled, axis=0)
    positions = np.minimum(np.floor(np.asarray(ratios) * m).astype(np.int64), m - 1)
    return ordered[positions, np.arange(k)]


def sample_rows(num_rows, sample_size, rng):
    """Row indices to sample: all rows when sample_size >= num_rows (exact thresholds), else a random subset."""
    if sample_size >= num_rows:
        return np.arange(num_rows, dtype=np.int64)
    return np.sort(rng.choice(num_rows, size=sample_size, replace=False)).astype(np.int64)


def evict(layer, addresses):
    """Prune the chunks at pool `addresses` (int array): their table entries become -1, addresses are pushed."""
    addresses = np.asarray(addresses, np.int64)
    n = addresses.size
    if n == 0:
        return
    owners = resource_variable(layer.owners)
    keys = tf.gather(owners, addresses)
    resource_variable(layer.addresses).scatter_update(tf.IndexedSlices(tf.fill([n], -1), keys))
    owners.scatter_update(tf.IndexedSlices(tf.fill([n], tf.constant(-1, tf.int64)), addresses))
    top = int(tf.convert_to_tensor(layer.free_top))
    resource_variable(layer.free_stack).scatter_update(
        tf.IndexedSlices(tf.constant(addresses, tf.int32), tf.range(top, top + n)))
    resource_variable(layer.free_top).assign(top + n)


def allocate(layer, keys, optimizer=None):
    """Give each chunk key (int64 array, at most free_top of them) a popped address and fresh initial values.

    The addresses come off the top of the free stack, the most recently freed first (LIFO). Returns them.
    """
    keys = np.asarray(keys, np.int64)
    n = keys.size
    top = int(tf.convert_to_tensor(layer.free_top))
    if n > top:
        raise ValueError(f"cannot allocate {n} chunks: only {top} free addresses")
    if n == 0:
        return np.zeros([0], np.int64)
    popped = tf.cast(tf.reverse(resource_variable(layer.free_stack)[top - n:top], [0]), tf.int64)
    resource_variable(layer.free_top).assign(top - n)
    resource_variable(layer.addresses).scatter_update(tf.IndexedSlices(tf.cast(popped, tf.int32), keys))
    resource_variable(layer.owners).scatter_update(tf.IndexedSlices(tf.constant(keys), popped))
    # A fresh copy of the initializer per allocation: an unseeded Keras initializer redraws the same values for
    # the same shape, and a regrown chunk must not restart from the values it had before.
    values = fresh_initializer(layer.embeddings_initializer)(shape=(n, layer.chunk_width), dtype="float32")
    resource_variable(layer.pool).scatter_update(tf.IndexedSlices(tf.convert_to_tensor(values), popped))
    if optimizer is not None:
        reset_optimizer_state(optimizer, layer.pool, popped)
    return popped.numpy()


def reset_optimizer_state(optimizer, variable, rows):
    """Set the optimizer's per-row state of `variable` (Keras 3 slots shaped like it) at `rows` to its start value.

    A reallocated address must not inherit the evicted chunk's accumulators (Adagrad's would shrink its learning
    rate). Adagrad's accumulators restart at `initial_accumulator_value`, every other slot (momentum, Adam's
    moments) at 0. tf_keras optimizers are left unchanged.
    """
    if USING_LEGACY_KERAS or not hasattr(optimizer, "_get_variable_index"):
        return
    try:
        index = optimizer._get_variable_index(variable)
    except (KeyError, ValueError, AttributeError):
        return  # the optimizer is not built yet (no step taken): it has no state to reset
    for name, slots in vars(optimizer).items():
        if not isinstance(slots, list) or len(slots) <= index:
            continue
        slot = slots[index]
        if not hasattr(slot, "shape") or tuple(slot.shape) != tuple(variable.shape) or slot is variable:
            continue
        start = getattr(optimizer, "initial_accumulator_value", 0.0) if name == "_accumulators" else 0.0
        fill = tf.fill(tf.stack([tf.size(rows), tf.shape(slot)[1]]), tf.cast(start, slot.dtype))
        resource_variable(slot).scatter_update(tf.IndexedSlices(fill, rows))


# Chunks compared per block when looking for chunks to allocate: the comparison masks stay a few MB instead of
# several bytes per chunk of the whole table (hundreds of MB at Criteo size).
SCAN_BLOCK_CHUNKS = 1 << 22


def pruned_above_threshold(layer, theta):
    """Keys (int64) and stored utilities of the pruned chunks with utility >= theta[k] and > 0.

    The utilities and the address table are read once (after sparse updates TensorFlow reads a variable by
    copying it: one transient copy of the bookkeeping, R*K*8 bytes; reading block by block would copy the whole
    variable per block, and gathering each block was measured 10x slower), then scanned in blocks of
    `SCAN_BLOCK_CHUNKS` chunks so the comparison masks stay small.
    """
    k = layer.num_chunks
    utilities = tf.convert_to_tensor(resource_variable(layer.utilities).read_value())
    addresses = tf.convert_to_tensor(resource_variable(layer.addresses).read_value())
    block_rows = max(1, SCAN_BLOCK_CHUNKS // k)
    theta = tf.constant(theta, tf.float32)
    keys, values = [], []
    for start in range(0, layer.num_rows, block_rows):
        stop = min(layer.num_rows, start + block_rows)
        block = tf.reshape(utilities[start * k:stop * k], [-1, k])
        wanted = (tf.reshape(addresses[start * k:stop * k], [-1, k]) < 0) & (block >= theta) & (block > 0)
        found = tf.where(wanted)  # [C, 2] (row in block, chunk)
        keys.append(((found[:, 0] + start) * k + found[:, 1]).numpy())
        values.append(tf.gather_nd(block, found).numpy())
    del utilities, addresses
    return np.concatenate(keys), np.concatenate(values)


def prune_step(layer, mode="manual", ratios=None, sample_size=100_000, enforce_ratio=0.05, rng=None,
               optimizer=None):
    """One pruning event on `layer` (see the module doc). Returns a dict of what it did.

    Args:
        layer: a built ChunkPrunedEmbedding.
        mode: "manual" (per-chunk `ratios`, array [K]) or "dynamic" (`ratios` a scalar: one global threshold).
        ratios: pruning ratios; default from the budget: 1 - capacity / (R*K) for every chunk.
        sample_size: m, rows whose utilities are sampled (>= the row count: all rows, exact thresholds).
        enforce_ratio: evict only when more than enforce_ratio * capacity live chunks are below threshold.
        rng: numpy Generator for the sample (the same seed gives the same decisions everywhere).
        optimizer: when given, optimizer state of reallocated pool rows is reset (`reset_optimizer_state`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rng = np.random.default_rng(0) if rng is None else rng
    num_rows, k = layer.num_rows, layer.num_chunks
    if ratios is None:
        ratios = 1.0 - layer.capacity / (num_rows * k)
        ratios = ratios if mode == "dynamic" else np.full(k, ratios)
    utilities = resource_variable(layer.utilities)
    rows = sample_rows(num_rows, sample_size, rng)
    sample_keys = rows[:, None] * k + np.arange(k)
    sampled = tf.gather(utilities, sample_keys).numpy()
    # Comparisons use the stored (scaled) utilities: one positive factor for all chunks leaves the order intact.
    theta = thresholds(sampled, ratios).astype(np.float32)

    owners = np.asarray(tf.convert_to_tensor(layer.owners))
    live_addresses = np.flatnonzero(owners >= 0)
    live_keys = owners[live_addresses]
    live_utilities = tf.gather(utilities, live_keys).numpy()
    below = live_utilities < theta[live_keys % k]
    crossings = int(below.sum())
    evicted = 0
    if crossings > enforce_ratio * layer.capacity:
        evict(layer, live_addresses[below])
        evicted = crossings

    candidate_keys, candidate_utilities = pruned_above_threshold(layer, theta)
    free = int(tf.convert_to_tensor(layer.free_top))
    if candidate_keys.size > free:  # the pool is full: the highest utilities first, the rest wait
        candidate_keys = candidate_keys[np.argsort(-candidate_utilities, kind="stable")[:free]]
    allocated = allocate(layer, candidate_keys, optimizer)
    scale = float(tf.convert_to_tensor(layer.utility_scale))
    return {"thresholds": (theta / scale).tolist(), "crossings": crossings, "evicted": evicted,
            "allocated": int(allocated.size), "live": layer.live_chunk_count()}


def check_pool(layer):
    """Raise AssertionError unless the VHPI invariants hold: live + free = capacity, no address owned twice,
    table and owners agree. Vectorized; meant for tests and debugging."""
    capacity = layer.capacity
    addresses = np.asarray(tf.convert_to_tensor(layer.addresses)).astype(np.int64)
    owners = np.asarray(tf.convert_to_tensor(layer.owners))
    top = int(tf.convert_to_tensor(layer.free_top))
    free = np.asarray(tf.convert_to_tensor(layer.free_stack))[:top].astype(np.int64)
    used = addresses[addresses >= 0]
    assert used.size + top == capacity, f"live {used.size} + free {top} != capacity {capacity}"
    assert np.unique(used).size == used.size, "an address is owned by two chunks"
    assert np.unique(free).size == free.size and not np.intersect1d(free, used).size, "a free address is in use"
    live_keys = np.flatnonzero(addresses >= 0)
    np.testing.assert_array_equal(owners[addresses[live_keys]], live_keys, err_msg="owners disagree with table")
    assert np.all(owners[free] == -1), "a free address has an owner"


def chunk_pruned_layers(model):
    """Every ChunkPrunedEmbedding inside `model` (nested layers included)."""

    return [layer for layer in [model, *nested_layers(model)] if isinstance(layer, ChunkPrunedEmbedding)]


class ChunkPruningCallback(keras.callbacks.Callback):
    """Run `prune_step` on every ChunkPrunedEmbedding of the model whenever the training step is a multiple of T.

    Example:

    >>> model.fit(data, epochs=1, callbacks=[ChunkPruningCallback(period=100)])

    Args:
        period: T, steps between pruning events (the step is the optimizer's iteration count, so resuming from a
            checkpoint keeps the schedule).
        sample_size: m, rows sampled per event to compute thresholds.
        mode: "manual" (per-chunk ratios from `profile`) or "dynamic" (one global threshold).
        profile: "power" or "linear" (manual mode; see `chunk_pruning_ratios`).
        exponent: the power-law exponent.
        target: mean pruning ratio; default each layer's 1 - capacity / (rows * K) (fill exactly the budget).
        enforce_ratio: evict only when more than this fraction of the capacity is below threshold.
        reset_optimizer_state: restart the optimizer's slots of reallocated pool rows.
        seed: seeds the sampling (decisions are reproducible).
        verbose: 1 prints one line per event.
    """

    def __init__(self, period, sample_size=100_000, mode="manual", profile="power", exponent=2.0, target=None,
                 enforce_ratio=0.05, reset_optimizer_state=True, seed=0, verbose=0):
        super().__init__()
        if int(period) != period or period < 1:
            raise ValueError(f"period must be an integer >= 1, got {period!r}")
        if int(sample_size) != sample_size or sample_size < 1:
            raise ValueError(f"sample_size must be an integer >= 1, got {sample_size!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
        if target is not None and not 0.0 <= target <= MAX_CHUNK_RATIO:
            raise ValueError(f"target must be in [0, {MAX_CHUNK_RATIO}], got {target!r}")
        if not 0.0 <= enforce_ratio <= 1.0:
            raise ValueError(f"enforce_ratio must be in [0, 1], got {enforce_ratio!r}")
        self.period = int(period)
        self.sample_size = int(sample_size)
        self.mode, self.profile, self.exponent = mode, profile, float(exponent)
        self.target = target
        self.enforce_ratio = float(enforce_ratio)
        self.reset_optimizer_state = bool(reset_optimizer_state)
        self.seed = int(seed)
        self.verbose = verbose
        self.history = []  # one dict per (event, layer): step, layer name and what prune_step returned
        self._last_step = None
        self._batches = 0

    def ratios(self, layer):
        target = 1.0 - layer.capacity / (layer.num_rows * layer.num_chunks) if self.target is None else self.target
        target = min(target, MAX_CHUNK_RATIO)
        if self.mode == "dynamic":
            return target
        return chunk_pruning_ratios(layer.num_chunks, target, self.profile, self.exponent)

    def _step(self):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and hasattr(optimizer, "iterations"):
            return int(tf.convert_to_tensor(optimizer.iterations))
        self._batches += 1  # no optimizer (a custom loop): count the batches seen
        return self._batches

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        previous, self._last_step = self._last_step, step
        # With steps_per_execution > 1 a batch end can skip a multiple of T; prune when one was crossed.
        if previous is not None and step // self.period == previous // self.period:
            return
        if previous is None and step % self.period:
            return
        self.prune(step)

    def prune(self, step):
        """One pruning event on every chunk-pruned layer of the model (also callable by hand)."""
        optimizer = getattr(self.model, "optimizer", None) if self.reset_optimizer_state else None
        for i, layer in enumerate(chunk_pruned_layers(self.model)):
            rng = np.random.default_rng([self.seed, step, i])
            stats = prune_step(layer, self.mode, self.ratios(layer), self.sample_size, self.enforce_ratio, rng,
                               optimizer)
            self.history.append(dict(stats, step=step, layer=layer.name))
            if self.verbose:
                print(f"step {step} {layer.name}: live {stats['live']}/{layer.capacity}, allocated "
                      f"{stats['allocated']}, evicted {stats['evicted']} (crossings {stats['crossings']})")
