"""The ROBE-Z index contract of docs/robe_z.md, checked against exact Python-integer arithmetic written out here."""

import numpy as np
import pytest
import tensorflow as tf

from tfcompress import robe_hash

P = 2038074743
R1, R2, R3 = 634329019, 1825252241, 871205356  # the constants docs/robe_z.md lists for seed 1024


def contract_index(x, table, cardinalities, i, chunk_size, memory_size, r=(R1, R2, R3)):
    """docs/robe_z.md's formula with Python's unbounded ints: no reduction tricks, no NumPy."""
    a = x + sum(cardinalities[:table])
    c, o = divmod(i, chunk_size)
    return ((a * r[2] + c * r[1] + r[0]) % P) % (memory_size - chunk_size + 1) + o


def test_constants_are_the_documented_draw():
    assert list(robe_hash.hash_constants(1024)[:3]) == [R1, R2, R3]
    other = robe_hash.hash_constants(7)
    assert list(other) == list(np.random.RandomState(7).randint(0, P, 50))
    assert list(other[:3]) != [R1, R2, R3]


def test_hand_worked_examples():
    # |M| = 100, Z = 4, so h is taken mod 97. Worked by hand from the constants:
    #   x=0 of table 0, element 0: a=0, c=0 -> R1 mod 97 = 634329019 mod 97 = 41
    #   element 5: c=1, o=1 -> ((R2 + R1) mod P) mod 97 + 1 = (421506517 mod 97) + 1 = 1 + 1 = 2
    #   x=0 of table 1 (10 rows before it): a=10 -> ((10 R3 + R1) mod P) mod 97 = 27
    idx = robe_hash.robe_indices([[0, 0]], [10, 20], output_dim=8, chunk_size=4, memory_size=100)
    assert idx[0, 0, 0] == 41
    assert list(idx[0, 0, 4:]) == [2 - 1, 2, 3, 4]
    assert idx[0, 1, 0] == 27


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 8])
def test_matches_exact_integer_formula(chunk_size):
    rng = np.random.default_rng(chunk_size)
    cards = [5, 1000, 3, 70000]
    ids = np.stack([rng.integers(0, n, 40) for n in cards], axis=1)
    memory_size = 997
    got = robe_hash.robe_indices(ids, cards, output_dim=8, chunk_size=chunk_size, memory_size=memory_size)
    for b in range(ids.shape[0]):
        for t in range(len(cards)):
            for i in range(8):
                assert got[b, t, i] == contract_index(int(ids[b, t]), t, cards, i, chunk_size, memory_size)


def test_chunks_are_contiguous_and_never_wrap():
    cards = [100000]
    ids = np.arange(100000)[:, None]
    idx = robe_hash.robe_indices(ids, cards, output_dim=8, chunk_size=4, memory_size=50)
    assert idx.min() >= 0 and idx.max() <= 49
    np.testing.assert_array_equal(np.diff(idx[:, :, :4], axis=-1), 1)
    np.testing.assert_array_equal(np.diff(idx[:, :, 4:], axis=-1), 1)


def test_large_ids_stay_exact():
    # a close to 2^32: a*R3 alone is about 2^62.9, so naive int64 arithmetic would overflow with c*R2 added.
    cards = [2**32 - 10]
    ids = np.array([[2**32 - 11], [123456789]])
    got = robe_hash.robe_indices(ids, cards, output_dim=16, chunk_size=2, memory_size=10**6)
    for b in range(2):
        for i in range(16):
            assert got[b, 0, i] == contract_index(int(ids[b, 0]), 0, cards, i, 2, 10**6)


def test_tf_twin_is_bit_identical():
    rng = np.random.default_rng(3)
    cards = [17, 40000, 9, 2**31]
    ids = np.stack([rng.integers(0, n, 64) for n in cards], axis=1)
    for chunk_size, dim, seed in [(1, 5, 1024), (4, 16, 1024), (3, 16, 99), (16, 16, 5)]:
        want = robe_hash.robe_indices(ids, cards, dim, chunk_size, 4099, seed)
        a = tf.constant(ids + robe_hash.table_offsets(cards)[None, :])
        got = robe_hash.robe_indices_tf(a, dim, chunk_size, 4099, seed).numpy()
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(robe_hash.robe_signs_tf(a, dim, seed).numpy(),
                                      robe_hash.robe_signs(ids, cards, dim, seed))


def test_signs_are_an_independent_balanced_hash():
    cards = [200000]
    ids = np.arange(200000)[:, None]
    signs = robe_hash.robe_signs(ids, cards, output_dim=4)
    assert set(np.unique(signs)) == {-1.0, 1.0}
    assert abs(signs.mean()) < 0.01
    # Independent of the location hash: the sign does not follow the parity of the position.
    idx = robe_hash.robe_indices(ids, cards, 4, 4, 1000)
    agreement = np.mean((idx % 2 == 0) == (signs > 0))
    assert 0.48 < agreement < 0.52


def test_reference_rejects_out_of_range_ids_and_bad_arguments():
    with pytest.raises(ValueError, match="feature 1"):
        robe_hash.robe_indices([[0, 20]], [10, 20], 4, 2, 100)
    with pytest.raises(ValueError, match="chunk_size"):
        robe_hash.robe_indices([[0, 0]], [10, 20], 4, 5, 100)
    with pytest.raises(ValueError, match="memory_size"):
        robe_hash.robe_indices([[0, 0]], [10, 20], 4, 4, 3)


def _adversarial_offset_ids(r3):
    """Offset ids that stress the int64-per-id / int32-per-chunk split of the TF twin."""
    inverse = pow(r3, -1, P)  # a * r3 = t (mod P) for a = t * inverse
    a_terms = [0, 1, P - 1, P - 2, P // 2]
    # a_term right at the fold point of chunk constant k: a_term + k crosses P there (u = a_term - (P - k) ~ 0).
    for c in range(16):
        k = (c * R2 + R1) % P
        a_terms += [(P - k - 1) % P, (P - k) % P, (P - k + 1) % P]
    ids = [t * inverse % P for t in a_terms]
    ids += [0, 1, P - 1, P, P + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**34, 2**40 - 1, 2**62, 2**63 - 2, 2**63 - 1]
    return ids


@pytest.mark.parametrize("output_dim, chunk_size, memory_size", [
    (16, 4, 4099),  # the common case
    (10, 4, 1000),  # a partial last chunk
    (7, 1, 97),  # Z = 1
    (16, 16, 16),  # Z = D = |M|: one possible chunk start
    (8, 3, 2**31 - 1), (8, 4, 2**31), (8, 4, 2**31 + 5),  # |M| around int32's limit
    (8, 2, P), (8, 2, P + 1), (8, 2, P + 2), (8, 2, 2**40),  # |M| - Z + 1 around P and beyond
    (8, 8, 97), (8, 8, P + 7), (8, 8, 2**40), (6, 4, 1000),  # one chunk per row (the folded single-chunk hash)
])
def test_tf_twin_equals_reference_bit_for_bit_on_adversarial_ids(output_dim, chunk_size, memory_size):
    ids = _adversarial_offset_ids(R3)
    a = np.array(ids + [-1, -P, -(2**63)], dtype=np.int64)  # negative a: the general path reduces them mod P too
    element = np.arange(output_dim)
    want = [[((x * R3 + (i // chunk_size) * R2 + R1) % P) % (memory_size - chunk_size + 1) + i % chunk_size
             for i in range(output_dim)] for x in a.tolist()]
    numpy_reference = robe_hash.robe_chunk_hash(a[:, None], element // chunk_size, memory_size, chunk_size) \
        + element % chunk_size
    np.testing.assert_array_equal(numpy_reference, want)
    for dtype in (None, tf.int32, tf.int64):
        got = robe_hash.robe_indices_tf(tf.constant(a), output_dim, chunk_size, memory_size, dtype=dtype)
        assert got.dtype == (dtype or tf.int64)
        np.testing.assert_array_equal(got.numpy(), want)
    # The serving shortcut: ids known to lie in [0, bound) with bound <= P skip the first reduction.
    in_range = (a >= 0) & (a < P)
    got = robe_hash.robe_indices_tf(tf.constant(a[in_range]), output_dim, chunk_size, memory_size, id_bound=P)
    np.testing.assert_array_equal(got.numpy(), np.array(want)[in_range])
    # A larger bound must not skip it: a * R3 overflows int64 once a > 2^63 / R3 (about 2^33.3).
    below = (a >= 0) & (a < 2**40)
    got = robe_hash.robe_indices_tf(tf.constant(a[below]), output_dim, chunk_size, memory_size, id_bound=2**40)
    np.testing.assert_array_equal(got.numpy(), np.array(want)[below])


@pytest.mark.parametrize("output_dim, chunk_size, memory_size", [(8, 8, 97), (8, 8, P + 7), (8, 4, 1000),
                                                                  (7, 3, 2**31 + 5)])
def test_offsets_folded_into_the_hash_equal_offsetting_the_ids_first(output_dim, chunk_size, memory_size):
    # Per-feature ids at the edges of their tables, with offsets near P and near where a * R3 leaves int64.
    cards = np.array([3, P - 5, 2**33, 10], dtype=np.int64)
    offsets = np.array([0, 7, P - 2, 2**40], dtype=np.int64)
    ids = np.array([[0, 0, 0, 0], [2, P - 6, 2**33 - 1, 9], [1, P // 2, P, 5]], dtype=np.int64)
    chunks = robe_hash.num_chunks(output_dim, chunk_size)
    want = robe_hash.robe_chunk_hash((ids + offsets)[..., None], np.arange(chunks), memory_size, chunk_size)
    s1, s2, s3 = (int(v) for v in robe_hash.hash_constants()[3:6])
    want_signs = [[[1.0 if ((x * s3 + i * s2 + s1) % P) % 2 == 0 else -1.0 for i in range(output_dim)] for x in row]
                  for row in (ids + offsets).tolist()]
    for id_bound in (None, int(cards.max())):  # a bound above P keeps the first reduction
        for dtype in (None, tf.int64):
            got = robe_hash.robe_chunk_hash_tf(tf.constant(ids), chunks, memory_size, chunk_size, id_bound=id_bound,
                                               offsets=offsets, dtype=dtype)
            assert got.dtype == (dtype or tf.int32)
            np.testing.assert_array_equal(got.numpy(), want)
        signs = robe_hash.robe_signs_tf(tf.constant(ids), output_dim, id_bound=id_bound, offsets=offsets)
        np.testing.assert_array_equal(signs.numpy(), want_signs)
    # Ids below P with a bound <= P skip the reduction of the ids; the folded constants keep the sum in int64.
    small = ids[:, :2]
    got = robe_hash.robe_chunk_hash_tf(tf.constant(small), chunks, memory_size, chunk_size, id_bound=P,
                                       offsets=offsets[:2], dtype=tf.int64)
    np.testing.assert_array_equal(got.numpy(), want[:, :2])


def test_tf_signs_equal_reference_on_adversarial_ids():
    s1, s2, s3 = (int(v) for v in robe_hash.hash_constants()[3:6])
    a = np.array(_adversarial_offset_ids(s3) + [-1, -(2**63)], dtype=np.int64)
    want = [[1.0 if ((x * s3 + i * s2 + s1) % P) % 2 == 0 else -1.0 for i in range(9)] for x in a.tolist()]
    np.testing.assert_array_equal(robe_hash.robe_signs_tf(tf.constant(a), 9).numpy(), want)
    in_range = (a >= 0) & (a < P)
    np.testing.assert_array_equal(robe_hash.robe_signs_tf(tf.constant(a[in_range]), 9, id_bound=P).numpy(),
                                  np.array(want)[in_range])


def test_int32_positions_are_refused_when_they_cannot_hold_the_largest_position():
    assert robe_hash.max_position(2**40, 3) == P - 1 + 2
    with pytest.raises(ValueError, match="int32 positions"):
        robe_hash.robe_indices_tf(tf.constant([0], tf.int64), 2**28, 2**28, 2**40, dtype=tf.int32)


def test_kernel_arithmetic_is_exact_without_64_bit_division(tmp_path):
    """custom_ops/robe_hash.h's division-free reductions (Montgomery mod P for ids up to 2^63, a 32-bit
    multiply-high reciprocal for mod |M| - Z + 1), shared by the CPU op and the CUDA kernels, against 128-bit
    exact arithmetic on adversarial inputs: multiples of P and of the modulus +-3, ids near 2^63, 2^63 / R and
    2^32 * P, moduli around powers of two, P, 2^31 and 2^32 (custom_ops/cuda_harness/robe_hash_check.cc)."""
    import os
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = os.path.join(root, "custom_ops", "cuda_harness", "robe_hash_check.cc")
    compiler = os.environ.get("CXX") or shutil.which("g++") or "c++"
    binary = str(tmp_path / "robe_hash_check")
    subprocess.run([compiler, "-O2", "-std=c++17", "-o", binary, source], check=True)
    completed = subprocess.run([binary], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.count("PASS") == 3 and "all passed" in completed.stdout
