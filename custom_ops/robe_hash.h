// The ROBE-Z index arithmetic (the index function contract of docs/robe_z.md), written once for the CPU kernels,
// the CUDA kernels and the standalone CUDA harness. No TensorFlow here: the harness compiles this header with
// plain nvcc.
//
// For an already-offset id a = x + offset_t, chunk c = i / Z and in-chunk offset o = i % Z:
//
//   h(a, c)   = ((a*R3 + c*R2 + R1) mod P) mod (|M| - Z + 1)
//   idx(a, i) = h(a, c) + o
//   sign(a,i) = +1 if ((a*S3 + i*S2 + S1) mod P) is even else -1
//
// Every term is reduced mod P exactly as tfcompress/robe_hash.py does ((a mod P) * R3 < 2^62 fits int64), so the
// indices equal tfcompress.robe_hash.robe_indices bit for bit. The row term (a mod P) * R3 mod P is computed once per
// embedding row and the chunk term c * R2 mod P + R1 once per kernel, which leaves one add, one conditional
// subtract and one modulo by |M| - Z + 1 per chunk. That last modulo uses a precomputed reciprocal (Lemire,
// "Faster Remainder by Direct Computation", 2019), exact for every 32-bit dividend and divisor.

#ifndef TFCOMPRESS_CUSTOM_OPS_ROBE_HASH_H_
#define TFCOMPRESS_CUSTOM_OPS_ROBE_HASH_H_

#include <cstdint>

#if defined(__CUDACC__)
#define ROBE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ROBE_HOST_DEVICE inline
#endif

namespace tfcompress {
namespace robe {

// The prime of docs/robe_z.md. Every hash constant lies in [0, kPrime).
constexpr int64_t kPrime = 2038074743;

// (a mod P) * r mod P for a >= 0: the per-row term of both hashes. Unsigned arithmetic (equal for a >= 0) lets the
// compiler turn both divisions by the constant P into a multiply-high without sign fix-ups.
ROBE_HOST_DEVICE int64_t RowTerm(int64_t a, int64_t r) {
  constexpr uint64_t kPrimeU = static_cast<uint64_t>(kPrime);
  return static_cast<int64_t>(static_cast<uint64_t>(a) % kPrimeU * static_cast<uint64_t>(r) % kPrimeU);
}

// (k * r) mod P + offset: the per-chunk (or per-element) term, constant for a whole kernel call.
// Exact for k < 2^32 (k * r < 2^63) and offset < P.
ROBE_HOST_DEVICE int64_t IndexTerm(int64_t k, int64_t r, int64_t offset) { return (k * r) % kPrime + offset; }

// (row_term + index_term) mod P where both terms are < P and < 2P respectively: the sum is < 3P, so two
// conditional subtractions give the same value as the % in robe_hash.py without a division.
ROBE_HOST_DEVICE int64_t AddModPrime(int64_t row_term, int64_t index_term) {
  int64_t mixed = row_term + index_term;
  if (mixed >= kPrime) mixed -= kPrime;
  if (mixed >= kPrime) mixed -= kPrime;
  return mixed;
}

// x mod d for a fixed divisor d = |M| - Z + 1, with the reciprocal computed once per kernel call.
struct FastModulo {
  uint64_t divisor;     // d >= 1
  uint64_t reciprocal;  // ceil(2^64 / d) when d < 2^32, unused otherwise
  bool small;           // d < 2^32: the reciprocal path is exact for every 32-bit x

  ROBE_HOST_DEVICE static FastModulo Make(uint64_t d) {
    FastModulo m;
    m.divisor = d;
    m.small = d < (uint64_t{1} << 32);
    // For d == 1 this wraps to 0, and 0 * x * d >> 64 = 0 = x mod 1, so no special case is needed.
    m.reciprocal = m.small ? ~uint64_t{0} / d + 1 : 0;
    return m;
  }

  // x < P < 2^31 always holds here (x is a value reduced mod P).
  ROBE_HOST_DEVICE uint64_t Mod(uint64_t x) const {
    if (!small) return x < divisor ? x : x % divisor;  // d >= 2^32 > P > x: x itself
    const uint64_t low_bits = reciprocal * x;
#if defined(__CUDA_ARCH__)
    return __umul64hi(low_bits, divisor);
#else
    return static_cast<uint64_t>((static_cast<unsigned __int128>(low_bits) * divisor) >> 64);
#endif
  }
};

// Everything a kernel needs to hash one batch; built once per call on the host, passed by value to CUDA kernels.
struct HashParams {
  int64_t r1, r2, r3;  // chunk-start hash
  int64_t s1, s2, s3;  // sign hash
  int64_t memory_size;
  int32_t output_dim;  // D
  int32_t chunk_size;  // Z
  int32_t num_chunks;  // ceil(D / Z)
  bool is_signed;
  FastModulo chunk_start_range;  // mod |M| - Z + 1
};

ROBE_HOST_DEVICE HashParams MakeHashParams(int64_t r1, int64_t r2, int64_t r3, int64_t s1, int64_t s2, int64_t s3,
                                           int64_t memory_size, int32_t output_dim, int32_t chunk_size,
                                           bool is_signed) {
  HashParams p;
  p.r1 = r1;
  p.r2 = r2;
  p.r3 = r3;
  p.s1 = s1;
  p.s2 = s2;
  p.s3 = s3;
  p.memory_size = memory_size;
  p.output_dim = output_dim;
  p.chunk_size = chunk_size;
  p.num_chunks = (output_dim + chunk_size - 1) / chunk_size;
  p.is_signed = is_signed;
  p.chunk_start_range = FastModulo::Make(static_cast<uint64_t>(memory_size - chunk_size + 1));
  return p;
}

// Elements in chunk c: Z, except a shorter last chunk when Z does not divide D.
ROBE_HOST_DEVICE int32_t ChunkWidth(const HashParams& p, int32_t c) {
  const int32_t rest = p.output_dim - c * p.chunk_size;
  return rest < p.chunk_size ? rest : p.chunk_size;
}

// h(a, c) from the row term RowTerm(a, r3) and the chunk term IndexTerm(c, r2, r1).
ROBE_HOST_DEVICE int64_t ChunkStart(const HashParams& p, int64_t row_term, int64_t chunk_term) {
  return static_cast<int64_t>(p.chunk_start_range.Mod(static_cast<uint64_t>(AddModPrime(row_term, chunk_term))));
}

// The sign hash's element term reduced mod P: ((i * S2) mod P + S1) mod P, < P < 2^31.
ROBE_HOST_DEVICE int32_t ElementTermModPrime(int64_t i, int64_t s2, int64_t s1) {
  return static_cast<int32_t>(AddModPrime(0, IndexTerm(i, s2, s1)));
}

// 1 when sign(a, i) = -1, i.e. (row_term + element) mod P is odd, for row_term = RowTerm(a, S3) and element =
// ElementTermModPrime(i, S2, S1), both < P. Branch-free on 32-bit values, so CPU loops over i vectorize: the sum
// wraps past P exactly when element >= P - row_term, and since P is odd the wrap flips the parity.
ROBE_HOST_DEVICE int32_t SignBit(int32_t row_term, int32_t element) {
  return ((row_term ^ element) & 1) ^ static_cast<int32_t>(element >= static_cast<int32_t>(kPrime) - row_term);
}

// 1.0f for bit 0, -1.0f for bit 1 (signed int -> float converts in SIMD lanes; unsigned would not).
ROBE_HOST_DEVICE float SignFromBit(int32_t bit) { return static_cast<float>(1 - 2 * bit); }

// One-shot forms (recompute the per-call terms): for the harness and for code paths where speed does not matter.
ROBE_HOST_DEVICE int64_t ChunkStartOf(const HashParams& p, int64_t a, int32_t c) {
  return ChunkStart(p, RowTerm(a, p.r3), IndexTerm(c, p.r2, p.r1));
}

ROBE_HOST_DEVICE int64_t IndexOf(const HashParams& p, int64_t a, int32_t i) {
  return ChunkStartOf(p, a, i / p.chunk_size) + i % p.chunk_size;
}

ROBE_HOST_DEVICE float SignOf(const HashParams& p, int64_t a, int32_t i) {
  return SignFromBit(SignBit(static_cast<int32_t>(RowTerm(a, p.s3)), ElementTermModPrime(i, p.s2, p.s1)));
}

}  // namespace robe
}  // namespace tfcompress

#endif  // TFCOMPRESS_CUSTOM_OPS_ROBE_HASH_H_
