"""Chunk-pruned embeddings (FIITED): utilities, thresholds, the VHPI pool, the callback, saving and planning."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tfcompress import chunk_pruning
from tfcompress._keras import keras
from tfcompress.layers import ChunkPrunedEmbedding
from tfcompress.layers.chunk_pruned import dense_table
from tfcompress.plan import make_plan

CARDS = [20, 7, 13]
R = sum(CARDS)


def built(num_chunks=2, budget=0.5, dim=4, cards=CARDS, **kwargs):
    layer = ChunkPrunedEmbedding(cards, dim, num_chunks=num_chunks, budget=budget, **kwargs)
    layer.build((None, len(cards)))
    return layer


def set_utilities(layer, values):
    layer.utilities.assign(np.asarray(values, np.float32).reshape(-1))
    layer.utility_scale.assign(1.0)


def table_utilities(layer):
    return layer.true_utilities().numpy().reshape(layer.num_rows, layer.num_chunks)


def run_step(layer, ids, upstream):
    """One recorded training step whose output gradient is `upstream` [B, F, d]; returns the pool gradient."""
    with tf.GradientTape() as tape:
        out = layer(ids, training=True)
        loss = tf.reduce_sum(out * upstream)
    return out, tape.gradient(loss, layer.pool)


# ---- utilities -------------------------------------------------------------------------------------------------


def reference_contributions(ids, upstream, num_chunks, offsets, frequency=False):
    """{chunk key: a * ||sum of that chunk's gradients||} computed row by row with NumPy."""
    width = upstream.shape[-1] // num_chunks
    sums, counts = {}, {}
    for b in range(ids.shape[0]):
        for f in range(ids.shape[1]):
            for k in range(num_chunks):
                key = (int(ids[b, f]) + offsets[f]) * num_chunks + k
                sums[key] = sums.get(key, 0) + upstream[b, f, k * width:(k + 1) * width]
                counts[key] = counts.get(key, 0) + 1
    return {key: counts[key] * (1.0 if frequency else np.linalg.norm(sums[key])) for key in sums}


@pytest.mark.parametrize("frequency", [False, True])
def test_utility_is_decayed_accesses_times_gradient_norm_with_repeated_ids(frequency):
    layer = built(num_chunks=2, decay=0.5, utility="frequency" if frequency else "gradient")
    offsets = [0, 20, 27]
    rng = np.random.default_rng(1)
    ids = np.array([[3, 1, 5], [3, 1, 12], [3, 6, 5], [19, 1, 0]])  # row 3 of table 0 three times, etc.
    expected = np.zeros(R * 2)
    for step in range(3):
        upstream = rng.normal(size=(4, 3, 4)).astype(np.float32)
        run_step(layer, ids, upstream)
        expected *= 0.5
        for key, value in reference_contributions(ids, upstream, 2, offsets, frequency).items():
            expected[key] += value
        np.testing.assert_allclose(layer.true_utilities().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert expected[(3 + 0) * 2] > 0 and expected[(0 + 20) * 2] == 0  # row 0 of table 1 never seen


def test_utility_rescaling_keeps_values_when_the_scale_overflows():
    layer = built(num_chunks=1, decay=0.01)  # scale x100 per step: rescaled every ~10 steps
    ids = np.array([[1, 2, 3]])
    upstream = np.ones((1, 3, 4), np.float32)
    for _ in range(25):
        run_step(layer, ids, upstream)
    # u = 2 * (1 + 0.01 + 0.01^2 + ...) = 2 / 0.99 (||g|| = 2, one access per step)
    np.testing.assert_allclose(layer.true_utilities().numpy()[[1, 22, 30]], 2 / 0.99, rtol=1e-5)
    assert float(layer.utility_scale.numpy()) < 1e21


def test_inference_does_not_record_utilities():
    layer = built()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(np.array([[1, 2, 3]]), training=False))
    tape.gradient(loss, layer.pool)
    assert not np.any(layer.utilities.numpy())


# ---- thresholds and profiles -----------------------------------------------------------------------------------


@pytest.mark.parametrize("profile, exponent", [("power", 2.0), ("power", 3.0), ("linear", 1.0)])
def test_profile_is_capped_and_its_mean_is_the_target(profile, exponent):
    for k, mean in [(8, 0.9), (4, 0.5), (2, 0.93)]:
        ratios = chunk_pruning.chunk_pruning_ratios(k, mean, profile, exponent)
        assert ratios.mean() == pytest.approx(mean, abs=1e-9)
        assert ratios.max() <= 0.95 + 1e-12 and np.all(np.diff(ratios) >= -1e-12)
        free = ratios < 0.95 - 1e-9
        shape = np.arange(1, k + 1)[free] ** exponent
        np.testing.assert_allclose(ratios[free] / shape, (ratios[free] / shape)[0], rtol=1e-9)  # the power law
    assert chunk_pruning.chunk_pruning_ratios(8, 0.9, profile, exponent)[-1] == pytest.approx(0.95)  # the cap is hit
    np.testing.assert_allclose(chunk_pruning.chunk_pruning_ratios(1, 0.9), [0.9])
    with pytest.raises(ValueError, match="0.97"):
        chunk_pruning.chunk_pruning_ratios(4, 0.97)


def test_thresholds_hit_the_requested_per_chunk_ratios_when_the_sample_covers_all():
    layer = built(num_chunks=4, budget=1.0, dim=8)
    rng = np.random.default_rng(0)
    set_utilities(layer, rng.permutation(R * 4) + 1.0)  # distinct, positive
    ratios = np.array([0.1, 0.3, 0.55, 0.8])
    stats = chunk_pruning.prune_step(layer, "manual", ratios, sample_size=R)
    u = table_utilities(layer)
    theta = np.array(stats["thresholds"])
    np.testing.assert_array_equal((u < theta).sum(axis=0), np.floor(ratios * R))
    live = np.asarray(layer.addresses).reshape(R, 4) >= 0
    np.testing.assert_array_equal(live.sum(axis=0), R - np.floor(ratios * R))
    chunk_pruning.check_pool(layer)


def test_dynamic_mode_uses_one_global_threshold():
    layer = built(num_chunks=2, budget=1.0)
    set_utilities(layer, np.random.default_rng(3).permutation(R * 2) + 1.0)
    stats = chunk_pruning.prune_step(layer, "dynamic", 0.75, sample_size=R)
    live = np.asarray(layer.addresses) >= 0
    assert live.sum() == R * 2 - np.floor(0.75 * R * 2)
    assert stats["thresholds"][0] == stats["thresholds"][1]


# ---- the pool (VHPI) -------------------------------------------------------------------------------------------


def test_freed_addresses_are_reused_last_in_first_out():
    layer = built(budget=4 / (R * 2))  # capacity 4
    assert layer.capacity == 4 and layer.pool.shape == (4, 2)
    np.testing.assert_array_equal(chunk_pruning.allocate(layer, [10, 11, 12]), [0, 1, 2])
    chunk_pruning.evict(layer, [1, 2])  # pushed 1 then 2
    np.testing.assert_array_equal(chunk_pruning.allocate(layer, [30]), [2])
    np.testing.assert_array_equal(chunk_pruning.allocate(layer, [31]), [1])
    np.testing.assert_array_equal(chunk_pruning.allocate(layer, [32]), [3])
    chunk_pruning.check_pool(layer)
    with pytest.raises(ValueError, match="only 0 free"):
        chunk_pruning.allocate(layer, [33])


def test_live_plus_free_is_capacity_through_random_pruning_events():
    layer = built(num_chunks=2, budget=0.3)
    rng = np.random.default_rng(7)
    for event in range(12):
        set_utilities(layer, rng.exponential(size=R * 2) * (rng.random(R * 2) < 0.6))
        ratios = chunk_pruning.chunk_pruning_ratios(2, rng.uniform(0.2, 0.9))
        stats = chunk_pruning.prune_step(layer, "manual", ratios, sample_size=int(rng.integers(5, 60)),
                                   enforce_ratio=rng.uniform(0, 0.2), rng=rng)
        chunk_pruning.check_pool(layer)
        assert stats["live"] == int((np.asarray(layer.addresses) >= 0).sum()) <= layer.capacity


def test_regrowth_gives_fresh_values_and_pruned_chunks_read_zero():
    layer = built(num_chunks=2, budget=0.5)
    ids = np.array([[4, 0, 0]])
    key = 4 * 2 + 1  # row 4 of table 0, chunk 1
    chunk_pruning.allocate(layer, [key])
    before = layer(ids).numpy()[0, 0]
    assert np.all(before[:2] == 0) and np.all(before[2:] != 0)
    chunk_pruning.evict(layer, [0])
    np.testing.assert_array_equal(layer(ids).numpy()[0, 0], 0)
    chunk_pruning.allocate(layer, [key])  # same address again (LIFO), new values
    after = layer(ids).numpy()[0, 0]
    assert np.all(after[2:] != 0) and not np.allclose(after[2:], before[2:])


def test_no_eviction_while_crossings_stay_below_the_enforce_ratio():
    layer = built(num_chunks=1, budget=10 / R)  # capacity 10
    u = np.arange(R, dtype=np.float32) + 1.0
    set_utilities(layer, u)
    chunk_pruning.prune_step(layer, "manual", [1 - 10 / R], sample_size=R)
    live_before = np.asarray(layer.addresses).copy()
    assert (live_before >= 0).sum() == 10 and np.all(live_before[-10:] >= 0)  # the 10 highest utilities
    # Two live rows fall below the threshold: 2 crossings of a capacity of 10.
    u[-2:] = 0.5
    u[:2] = [100.0, 101.0]
    set_utilities(layer, u)
    stats = chunk_pruning.prune_step(layer, "manual", [1 - 10 / R], sample_size=R, enforce_ratio=0.25)
    assert stats["crossings"] == 2 and stats["evicted"] == 0 and stats["allocated"] == 0  # the pool is full
    np.testing.assert_array_equal(np.asarray(layer.addresses), live_before)
    stats = chunk_pruning.prune_step(layer, "manual", [1 - 10 / R], sample_size=R, enforce_ratio=0.1)
    assert stats["evicted"] == 2 and stats["allocated"] == 2
    live = np.asarray(layer.addresses) >= 0
    assert live[0] and live[1] and not live[-1] and not live[-2]
    chunk_pruning.check_pool(layer)


# ---- forward and gradients -------------------------------------------------------------------------------------


def test_pruned_chunks_are_zero_and_gradients_reach_only_live_storage():
    layer = built(num_chunks=2, budget=0.5, gradient="sparse")
    chunk_pruning.allocate(layer, [3 * 2, (20 + 1) * 2 + 1, (27 + 5) * 2])  # (t0 row3 c0), (t1 row1 c1), (t2 row5 c0)
    ids = np.array([[3, 1, 5], [3, 2, 5], [0, 1, 12]])
    upstream = np.random.default_rng(2).normal(size=(3, 3, 4)).astype(np.float32)
    out, grad = run_step(layer, ids, upstream)
    reference = dense_table(layer)[ids + np.array([0, 20, 27])]
    np.testing.assert_array_equal(out.numpy(), reference)
    assert np.all(out.numpy()[2, 0] == 0) and np.all(out.numpy()[0, 0, 2:] == 0)  # fully and partly pruned
    dense = tf.convert_to_tensor(grad).numpy() if not isinstance(grad, tf.IndexedSlices) else \
        tf.math.unsorted_segment_sum(grad.values, grad.indices, 4).numpy()[:3]
    assert set(np.asarray(grad.indices).tolist()) <= {0, 1, 2}
    np.testing.assert_allclose(dense[0], upstream[0, 0, :2] + upstream[1, 0, :2], rtol=1e-6)
    np.testing.assert_allclose(dense[1], upstream[0, 1, 2:] + upstream[2, 1, 2:], rtol=1e-6)
    np.testing.assert_allclose(dense[2], upstream[0, 2, :2] + upstream[1, 2, :2], rtol=1e-6)


def test_one_chunk_equals_whole_row_pruning():
    layer = built(num_chunks=1, budget=0.25, dim=6)
    u = np.random.default_rng(5).permutation(R).astype(np.float32) + 1.0
    set_utilities(layer, u)
    chunk_pruning.prune_step(layer, "manual", chunk_pruning.chunk_pruning_ratios(1, 0.75), sample_size=R)
    keep = u >= np.sort(u)[int(np.floor(0.75 * R))]  # row pruning: the top quarter of rows by utility
    np.testing.assert_array_equal(np.asarray(layer.addresses) >= 0, keep)
    table = dense_table(layer)
    assert np.all(table[~keep] == 0) and np.all(table[keep] != 0)
    ids = np.array([[0, 1, 2], [19, 6, 12]])
    np.testing.assert_array_equal(layer(ids).numpy(), table[ids + np.array([0, 20, 27])])


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="divisor"):
        ChunkPrunedEmbedding(CARDS, 6, num_chunks=4)
    with pytest.raises(ValueError, match="budget"):
        ChunkPrunedEmbedding(CARDS, 4, budget=-0.5)
    with pytest.raises(ValueError, match="decay"):
        ChunkPrunedEmbedding(CARDS, 4, decay=0.0)
    with pytest.raises(ValueError, match="period"):
        chunk_pruning.ChunkPruningCallback(period=0)
    layer = ChunkPrunedEmbedding(CARDS, 4, num_chunks=2, budget="80B")  # 80 bytes = 10 chunks of 2 floats
    assert layer.capacity == 10


# ---- training, callback, saving, planning ----------------------------------------------------------------------


def planted_model(layer, seed=0):
    keras.utils.set_random_seed(seed)
    ids_in = keras.Input((len(layer.cardinalities),), dtype="int64")
    logits = keras.layers.Dense(1)(keras.layers.Flatten()(layer(ids_in)))
    model = keras.Model(ids_in, keras.layers.Activation("sigmoid")(logits))
    model.compile(keras.optimizers.SGD(0.5), "binary_crossentropy")
    return model


def planted_data(cards, rows=512, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, n, rows) for n in cards], axis=1)
    effect = rng.normal(size=max(cards)) * 2
    labels = (rng.random(rows) < 1 / (1 + np.exp(-effect[ids[:, 0]]))).astype(np.float32)
    return ids, labels[:, None]


def test_pruning_runs_only_at_multiples_of_the_period():
    layer = ChunkPrunedEmbedding(CARDS, 4, num_chunks=2, budget=0.5)
    model = planted_model(layer)
    ids, labels = planted_data(CARDS, rows=70)
    callback = chunk_pruning.ChunkPruningCallback(period=3)
    model.fit(ids, labels, batch_size=10, epochs=1, verbose=0, callbacks=[callback])  # 7 steps
    assert [event["step"] for event in callback.history] == [3, 6]
    assert callback.history[0]["allocated"] > 0


def test_short_fit_with_the_callback_lowers_the_loss_and_saves_its_state(tmp_path):
    layer = ChunkPrunedEmbedding([50, 9], 8, num_chunks=2, budget=0.5, name="pruned")
    model = planted_model(layer)
    ids, labels = planted_data([50, 9])
    callback = chunk_pruning.ChunkPruningCallback(period=4, sample_size=30)
    history = model.fit(ids, labels, batch_size=32, epochs=8, verbose=0, callbacks=[callback])
    losses = history.history["loss"]
    assert losses[-1] < losses[0] - 0.05
    chunk_pruning.check_pool(layer)
    assert 0 < layer.live_chunk_count() <= layer.capacity

    path = str(tmp_path / "pruned.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    twin = loaded.get_layer("pruned")
    assert twin.get_config() == layer.get_config()
    for name in ("pool", "addresses", "owners", "free_stack", "free_top", "utilities", "utility_scale"):
        np.testing.assert_array_equal(np.asarray(getattr(twin, name)), np.asarray(getattr(layer, name)))
    np.testing.assert_allclose(loaded.predict(ids, verbose=0), model.predict(ids, verbose=0), rtol=1e-6)


def test_plan_builds_a_pruned_layer_at_the_ratio():
    plan = make_plan([1000, 500, 20], 8, "pruned", ratio=10, uncompressed_below=100, num_chunks=2)
    member = plan.members[-1]
    assert member.class_name == "ChunkPrunedEmbedding"
    assert plan.logical_parameters / plan.physical_parameters == pytest.approx(10, rel=1e-3)
    assert plan.build_layer()(np.array([[1, 2, 3]])).shape == (1, 3, 8)


def test_mirrored_strategy_replicas_make_identical_decisions():
    script = textwrap.dedent("""
        import numpy as np, tensorflow as tf
        tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
        from tfcompress._keras import keras
        from tfcompress import chunk_pruning
        from tfcompress.layers import ChunkPrunedEmbedding

        def run(strategy):
            keras.utils.set_random_seed(0)
            with strategy.scope():
                layer = ChunkPrunedEmbedding([40, 9], 4, num_chunks=2, budget=0.4, embeddings_initializer="ones")
                ids_in = keras.Input((2,), dtype="int64")
                out = keras.layers.Dense(1, kernel_initializer="ones")(keras.layers.Flatten()(layer(ids_in)))
                model = keras.Model(ids_in, out)
                model.compile(keras.optimizers.SGD(0.1), "mse")
            rng = np.random.default_rng(0)
            ids = np.stack([rng.integers(0, 40, 64), rng.integers(0, 9, 64)], 1)
            model.fit(ids, rng.normal(size=(64, 1)), batch_size=16, epochs=3, verbose=0, shuffle=False,
                      callbacks=[chunk_pruning.ChunkPruningCallback(period=4, sample_size=49)])
            values = [np.asarray(layer.utilities), np.asarray(layer.addresses)]
            for name in ("utilities", "addresses", "pool"):
                var = getattr(layer, name).value
                if hasattr(var, "values"):  # a distributed variable: every replica's copy must be equal
                    copies = [v.numpy() for v in var.values]
                    assert len(copies) == 2 and all(np.array_equal(copies[0], c) for c in copies), name
            return values

        single = run(tf.distribute.get_strategy())
        mirrored = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        np.testing.assert_allclose(mirrored[0], single[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(mirrored[1] >= 0, single[1] >= 0)
        print("OK")
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_export_writes_only_the_pool_and_the_address_table(tmp_path):
    from tfcompress.export import saved_model
    from tfcompress.models import build_dlrm

    keras.utils.set_random_seed(3)
    layer = ChunkPrunedEmbedding([100, 20, 7], 8, num_chunks=2, budget=0.3, name="pruned")
    model = build_dlrm((3, 3), layer, (16,), (16,), name="pr")
    chunk_pruning.allocate(layer, np.arange(0, 254, 4))  # some rows partly, some fully pruned
    path = saved_model.export_saved_model(model, base_dir=str(tmp_path), name="pr")
    rng = np.random.default_rng(0)
    inputs = {"dense": rng.normal(size=(32, 3)).astype(np.float32),
              "sparse": np.stack([rng.integers(0, n, 32) for n in (100, 20, 7)], 1).astype(np.int64)}
    served = tf.saved_model.load(path).signatures["serving_default"](
        dense=tf.constant(inputs["dense"]), sparse=tf.constant(inputs["sparse"]))["probability"].numpy()
    np.testing.assert_allclose(served, np.asarray(model(inputs, training=False)), atol=1e-6)
    with open(os.path.join(path, saved_model.METADATA_DIR, saved_model.METADATA_FILE)) as f:
        saved = {row["name"]: row for row in __import__("json").load(f)["variables"] if row["embedding"]}
    assert sorted(saved) == ["pruned/addresses", "pruned/pool"]  # no utilities, owners or free stack
    assert saved["pruned/pool"]["shape"] == [layer.capacity, 4]


def test_legacy_tf_keras_trains_prunes_and_saves(tmp_path):
    script = textwrap.dedent("""
        import os, sys, numpy as np
        from tfcompress._keras import keras, USING_LEGACY_KERAS
        from tfcompress import chunk_pruning
        from tfcompress.layers import ChunkPrunedEmbedding
        assert USING_LEGACY_KERAS
        keras.utils.set_random_seed(0)
        layer = ChunkPrunedEmbedding([50, 9], 8, num_chunks=2, budget=0.5, name="pruned")
        inp = keras.Input((2,), dtype="int64")
        out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(layer(inp)))
        model = keras.Model(inp, out)
        model.compile(keras.optimizers.SGD(0.5), "binary_crossentropy")
        rng = np.random.default_rng(0)
        ids = np.stack([rng.integers(0, 50, 256), rng.integers(0, 9, 256)], 1)
        labels = (ids[:, :1] % 2).astype("float32")
        callback = chunk_pruning.ChunkPruningCallback(period=4, sample_size=30)
        history = model.fit(ids, labels, batch_size=32, epochs=12, verbose=0, callbacks=[callback])
        assert history.history["loss"][-1] < history.history["loss"][0] - 0.05, history.history["loss"]
        assert [e["step"] for e in callback.history][:3] == [4, 8, 12]
        chunk_pruning.check_pool(layer)
        path = os.path.join(sys.argv[1], "m.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_array_equal(np.asarray(loaded.get_layer("pruned").addresses), np.asarray(layer.addresses))
        np.testing.assert_allclose(loaded.predict(ids, verbose=0), model.predict(ids, verbose=0), rtol=1e-6)
        print("OK")
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_USE_LEGACY_KERAS="1")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_raw_unbounded_ids_reach_an_entry_table_by_hashing():
    from tfcompress.layers.chunk_pruned import hash_entry, hash_entry_tf

    cards = [13, 1000]
    ids = np.array([[0, 2**62 + 12345], [-1, -(2**63)], [2**63 - 1, 7], [10**15, 10**15], [5, 5]], np.int64)
    np.testing.assert_array_equal(hash_entry_tf(ids, cards).numpy(), hash_entry(ids, cards))
    entries = hash_entry(ids, cards)
    assert np.all(entries >= 0) and np.all(entries < np.array(cards))
    spread = hash_entry(np.arange(10**12, 10**12 + 5000)[:, None].repeat(2, 1), cards)[:, 1]
    assert np.unique(spread).size > 950  # 5000 consecutive raw ids cover nearly every one of 1000 entries
    layer = built(num_chunks=2, cards=cards, hash_ids=True, budget=1.0)
    chunk_pruning.allocate(layer, np.arange(layer.capacity))
    np.testing.assert_array_equal(layer(ids).numpy(), dense_table(layer)[entries + np.array([0, 13])])
    assert ChunkPrunedEmbedding.from_config(layer.get_config()).hash_ids


def test_reallocated_addresses_restart_their_optimizer_state():
    from tfcompress.optimizers import SparseAdagrad

    layer = ChunkPrunedEmbedding(CARDS, 4, num_chunks=2, budget=0.5, name="pruned")
    model = planted_model(layer)
    model.compile(SparseAdagrad(0.1, initial_accumulator_value=0.25), "binary_crossentropy")
    chunk_pruning.allocate(layer, np.arange(0, 40, 2))  # chunk 0 of the first 20 rows: addresses 0..19
    ids, labels = planted_data(CARDS, rows=64)
    model.fit(ids, labels, batch_size=64, epochs=1, verbose=0)
    accumulator = [v for v in model.optimizer.variables if tuple(v.shape) == tuple(layer.pool.shape)]
    assert len(accumulator) == 1
    before = np.asarray(accumulator[0]).copy()
    grown = np.sort(np.argsort(before[:, 0])[-2:])  # two addresses whose accumulators grew
    assert np.all(before[grown] > 0.25)
    chunk_pruning.evict(layer, grown)
    np.testing.assert_array_equal(chunk_pruning.allocate(layer, [61, 63], optimizer=model.optimizer), grown[::-1])
    after = np.asarray(accumulator[0])
    np.testing.assert_array_equal(after[grown], 0.25)
    np.testing.assert_array_equal(np.delete(after, grown, axis=0), np.delete(before, grown, axis=0))
