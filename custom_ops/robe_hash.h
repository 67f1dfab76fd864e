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
// subtract and one modulo by |M| - Z + 1 per chunk.
//
// No 64-bit division anywhere (a GPU emulates it in dozens of instructions; a profile of the Z=4 lookup showed it
// arithmetic-bound on exactly that):
//   - mod (|M| - Z + 1): the dividend is already reduced mod P, so it is < 2^31. A 32-bit multiply-high reciprocal
//     (Granlund & Montgomery, "Division by invariant integers using multiplication", 1994, Thm 4.2 with N = 31)
//     gives the exact quotient: one 32x32->64 multiply, one shift, one multiply-subtract (FastModulo).
//   - mod P of the per-row term (a mod P) * R mod P: Montgomery reduction with R = 2^32 (Montgomery 1985). The
//     id a < 2^63 is reduced once per row (ReducedId) and multiplied by R3 and S3 in Montgomery form
//     (MulModPrime); every step is a 32x32->64 multiply plus adds, exact for every a in [0, 2^63).
// The CPU kernels keep RowTerm (the compiler's 64-bit multiply-high by the constant P is cheap on x86-64); the
// one-shot forms (IndexOf, SignOf) and the GPU kernels use the Montgomery path, so the CPU RobePositions op and the
// harness's host mode check it against NumPy.

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

// 2^32 mod P, (2^32)^2 mod P and -P^-1 mod 2^32: the Montgomery constants of P with R = 2^32.
constexpr uint32_t kMontgomeryRModPrime = 218817810;
constexpr uint32_t kMontgomeryR2ModPrime = 138615905;
constexpr uint32_t kPrimeNegInverse = 1204528057;
static_assert(static_cast<uint32_t>(static_cast<uint32_t>(kPrime) * kPrimeNegInverse) == 0xffffffffu,
              "-P^-1 mod 2^32: P * (-P^-1) must be -1 mod 2^32");
static_assert((uint64_t{1} << 32) % static_cast<uint64_t>(kPrime) == kMontgomeryRModPrime, "2^32 mod P");
static_assert(uint64_t{kMontgomeryRModPrime} * kMontgomeryRModPrime % static_cast<uint64_t>(kPrime) ==
                  kMontgomeryR2ModPrime,
              "2^64 mod P");

ROBE_HOST_DEVICE uint64_t WideMultiply32(uint32_t x, uint32_t y) {
  return static_cast<uint64_t>(x) * static_cast<uint64_t>(y);  // one IMAD.WIDE.U32 on the GPU
}

// t * 2^-32 mod P, fully reduced, for every t < 2^63 (every non-negative int64). With m = (t mod 2^32) * (-P^-1)
// mod 2^32, t + m * P is a multiple of 2^32 and < 2^63 + 2^63 (no overflow), so u = (t + m * P) / 2^32 < 2^32
// < 3P: two conditional subtractions finish the reduction.
ROBE_HOST_DEVICE uint32_t MontgomeryReduce(uint64_t t) {
  const uint32_t m = static_cast<uint32_t>(t) * kPrimeNegInverse;
  uint32_t u = static_cast<uint32_t>((t + WideMultiply32(m, static_cast<uint32_t>(kPrime))) >> 32);
  if (u >= static_cast<uint32_t>(kPrime)) u -= static_cast<uint32_t>(kPrime);
  if (u >= static_cast<uint32_t>(kPrime)) u -= static_cast<uint32_t>(kPrime);
  return u;
}

// a * 2^-32 mod P for an id a in [0, 2^63): computed once per embedding row, shared by the chunk and sign hashes.
ROBE_HOST_DEVICE uint32_t ReducedId(int64_t a) { return MontgomeryReduce(static_cast<uint64_t>(a)); }

// r * 2^64 mod P (host, once per call): the Montgomery form that MulModPrime needs for a hash constant r < P.
ROBE_HOST_DEVICE uint32_t MontgomeryConstant(int64_t r) {
  return static_cast<uint32_t>(static_cast<uint64_t>(r) % static_cast<uint64_t>(kPrime) * kMontgomeryR2ModPrime %
                               static_cast<uint64_t>(kPrime));
}

// (a mod P) * r mod P = RowTerm(a, r) from reduced = ReducedId(a) and r_montgomery = MontgomeryConstant(r):
// (a 2^-32) (r 2^64) 2^-32 = a r (mod P). Both factors are < P, so the product is < P^2 and u < P^2/2^32 + P < 2P:
// one conditional subtraction.
ROBE_HOST_DEVICE uint32_t MulModPrime(uint32_t reduced, uint32_t r_montgomery) {
  const uint64_t t = WideMultiply32(reduced, r_montgomery);
  const uint32_t m = static_cast<uint32_t>(t) * kPrimeNegInverse;
  uint32_t u = static_cast<uint32_t>((t + WideMultiply32(m, static_cast<uint32_t>(kPrime))) >> 32);
  if (u >= static_cast<uint32_t>(kPrime)) u -= static_cast<uint32_t>(kPrime);
  return u;
}

// (x + y) mod P for x, y < P: x + y < 2P < 2^32 fits uint32.
ROBE_HOST_DEVICE uint32_t AddModPrime32(uint32_t x, uint32_t y) {
  const uint32_t sum = x + y;
  return sum >= static_cast<uint32_t>(kPrime) ? sum - static_cast<uint32_t>(kPrime) : sum;
}

// x mod d for a fixed divisor d = |M| - Z + 1 and a dividend x < P < 2^31 (a value reduced mod P), with the
// reciprocal computed once per call. d >= P leaves every such x unchanged, so it is replaced by 2^31 (also > x),
// which keeps one branch-free formula. For 1 <= d <= 2^31 with l = ceil(log2 d) (2^(l-1) < d <= 2^l) and
// multiplier m = ceil(2^(31 + l) / d) < 2^32, floor(x / d) = (m * x) >> (31 + l) for every x < 2^31
// (Granlund & Montgomery 1994, Theorem 4.2, N = 31). d = 1 gives l = 0, m = 2^31 and the quotient x.
struct FastModulo {
  uint64_t divisor;     // d = |M| - Z + 1 >= 1, as given (the AVX2 hashing reads it)
  uint32_t reduced_divisor;  // min(d, 2^31)
  uint32_t multiplier;  // m
  uint32_t shift;       // 31 + l

  ROBE_HOST_DEVICE static FastModulo Make(uint64_t d) {
    FastModulo f;
    f.divisor = d;
    const uint64_t e = d < static_cast<uint64_t>(kPrime) ? d : (uint64_t{1} << 31);
    uint32_t l = 0;
    while ((uint64_t{1} << l) < e) ++l;
    f.reduced_divisor = static_cast<uint32_t>(e);
    f.multiplier = static_cast<uint32_t>(((uint64_t{1} << (31 + l)) - 1) / e + 1);
    f.shift = 31 + l;
    return f;
  }

  ROBE_HOST_DEVICE uint32_t Mod32(uint32_t x) const {
    const uint32_t quotient = static_cast<uint32_t>(WideMultiply32(x, multiplier) >> shift);
    return x - quotient * reduced_divisor;
  }

  // x < P < 2^31 always holds here (x is a value reduced mod P).
  ROBE_HOST_DEVICE uint64_t Mod(uint64_t x) const { return Mod32(static_cast<uint32_t>(x)); }
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
  uint32_t r3_montgomery;  // MontgomeryConstant(R3): the row term of the chunk hash is MulModPrime(ReducedId(a), .)
  uint32_t s3_montgomery;  // MontgomeryConstant(S3): the row term of the sign hash
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
  p.r3_montgomery = MontgomeryConstant(r3);
  p.s3_montgomery = MontgomeryConstant(s3);
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

// The 32-bit forms of the GPU kernels: (c * R2 + R1) mod P fully reduced (< P, per call), the row terms from
// ReducedId, and h(a, c) from them with one add, one conditional subtract and FastModulo::Mod32.
ROBE_HOST_DEVICE uint32_t ChunkTermModPrime(int64_t c, const HashParams& p) {
  return static_cast<uint32_t>(AddModPrime(0, IndexTerm(c, p.r2, p.r1)));
}

ROBE_HOST_DEVICE uint32_t ChunkRowTerm(const HashParams& p, uint32_t reduced_id) {
  return MulModPrime(reduced_id, p.r3_montgomery);
}

ROBE_HOST_DEVICE uint32_t SignRowTerm(const HashParams& p, uint32_t reduced_id) {
  return MulModPrime(reduced_id, p.s3_montgomery);
}

ROBE_HOST_DEVICE uint32_t ChunkStart32(const HashParams& p, uint32_t row_term, uint32_t chunk_term_mod_prime) {
  return p.chunk_start_range.Mod32(AddModPrime32(row_term, chunk_term_mod_prime));
}

// One-shot forms (recompute the per-call terms): for the harness, the positions op and code paths where speed does
// not matter. They take the Montgomery path, so every check of positions against NumPy checks it too.
ROBE_HOST_DEVICE int64_t ChunkStartOf(const HashParams& p, int64_t a, int32_t c) {
  return ChunkStart32(p, ChunkRowTerm(p, ReducedId(a)), ChunkTermModPrime(c, p));
}

ROBE_HOST_DEVICE int64_t IndexOf(const HashParams& p, int64_t a, int32_t i) {
  return ChunkStartOf(p, a, i / p.chunk_size) + i % p.chunk_size;
}

ROBE_HOST_DEVICE float SignOf(const HashParams& p, int64_t a, int32_t i) {
  return SignFromBit(SignBit(static_cast<int32_t>(SignRowTerm(p, ReducedId(a))), ElementTermModPrime(i, p.s2, p.s1)));
}

}  // namespace robe
}  // namespace tfcompress

#endif  // TFCOMPRESS_CUSTOM_OPS_ROBE_HASH_H_
