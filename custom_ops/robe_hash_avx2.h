// AVX2 form of the CPU forward's hashing stage (robe_hash.h's ChunkStart and RowTerm, four rows at a time), for the
// CPU kernels only. Compiled with a per-function target attribute instead of -mavx2, so the library still builds
// and loads on any x86-64 machine: robe_cpu_functors.cc calls it only when the CPU reports AVX2 at run time.
//
// Why it is exact (bit for bit the scalar result): every value is an integer below 2^62 computed with 32x32->64-bit
// multiplies (_mm256_mul_epu32), and only the quotient of each modulo is estimated in double precision. For
// x < 2^62 and a divisor m < 2^31 the estimate round(x * (1/m)) is floor(x / m) or floor(x / m) + 1 (its error is far
// below 1/2), so r = x - q * m lies in [-m, m) and one conditional add of m gives x mod m exactly.
//
// Preconditions (checked by the caller once per call): every valid offset id a = id + offset_t is < P, i.e. the
// sum of cardinalities is at most P; then a, the hash constants and every reduced value fit 31 bits.

#ifndef TFCOMPRESS_CUSTOM_OPS_ROBE_HASH_AVX2_H_
#define TFCOMPRESS_CUSTOM_OPS_ROBE_HASH_AVX2_H_

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TFCOMPRESS_ROBE_HAVE_AVX2 1

#include <immintrin.h>

#include <cstdint>

#include "robe_hash.h"

namespace tfcompress {
namespace robe {
namespace avx2 {

#define TFCOMPRESS_AVX2_INLINE __attribute__((target("avx2"), always_inline)) inline

// Rows of one block to hash: ids[0, n) of consecutive rows whose first row has feature `feature`. The cyclic tables
// hold offsets[k % F] and cardinalities[k % F] for k < F + 4, so four consecutive rows load theirs in one go.
struct RowBlock {
  const int64_t* ids;
  const int64_t* cyclic_offsets;
  const int64_t* cyclic_cardinalities;
  int32_t num_features;
  int32_t feature;
  int64_t n;
};

// Exact for 0 <= x < 2^52: the bit pattern of 2^52 + x, minus 2^52 (AVX2 has no int64 -> double conversion).
TFCOMPRESS_AVX2_INLINE __m256d ToDouble(__m256i x) {
  const __m256i exponent = _mm256_set1_epi64x(0x4330000000000000LL);
  return _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(x, exponent)), _mm256_set1_pd(4503599627370496.0));
}

// round(x) for 0 <= x < 2^51, the inverse trick.
TFCOMPRESS_AVX2_INLINE __m256i RoundToInt(__m256d x) {
  const __m256d two52 = _mm256_set1_pd(4503599627370496.0);
  return _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(x, two52)), _mm256_castpd_si256(two52));
}

// x mod m for exact x < 2^62, m < 2^31, given quotient ~ x / m (within the error bound in the file comment).
TFCOMPRESS_AVX2_INLINE __m256i ModFromQuotient(__m256i x, __m256d quotient, __m256i m) {
  const __m256i remainder = _mm256_sub_epi64(x, _mm256_mul_epu32(RoundToInt(quotient), m));
  const __m256i negative = _mm256_cmpgt_epi64(_mm256_setzero_si256(), remainder);
  return _mm256_add_epi64(remainder, _mm256_and_si256(negative, m));
}

// RowTerm(a, r) = a * r mod P for a, r < P (so a * r < 2^62 and a mod P = a).
TFCOMPRESS_AVX2_INLINE __m256i RowTerm4(__m256i a, __m256d a_double, int64_t r) {
  const __m256d r_over_p = _mm256_set1_pd(static_cast<double>(r) / static_cast<double>(kPrime));
  return ModFromQuotient(_mm256_mul_epu32(a, _mm256_set1_epi64x(r)), _mm256_mul_pd(a_double, r_over_p),
                         _mm256_set1_epi64x(kPrime));
}

// Chunk starts of the block's rows, chunk-major (starts[c * n + i] for row i, chunk c), and, when p.is_signed, the
// rows' sign terms RowTerm(a, S3). chunk_terms[c] = IndexTerm(c, R2, R1). Returns true when some id lies outside
// [0, cardinality of its feature); such rows are hashed as id 0 (in range, so the copies that follow stay inside M)
// and the caller turns the flag into an error.
__attribute__((target("avx2"))) inline bool HashRows(const HashParams& p, const int64_t* chunk_terms,
                                                      const RowBlock& block, int64_t* starts, int64_t* sign_terms) {
  const int64_t n = block.n;
  const uint64_t divisor = p.chunk_start_range.divisor;
  // d >= P > every reduced value x: x mod d = x. Otherwise d < P < 2^31 and the quotient trick applies.
  const bool identity_modulo = divisor >= static_cast<uint64_t>(kPrime);
  const __m256i d = _mm256_set1_epi64x(static_cast<int64_t>(divisor));
  const __m256d inverse_d = _mm256_set1_pd(1.0 / static_cast<double>(divisor));
  const __m256i prime = _mm256_set1_epi64x(kPrime);
  const __m256i prime_minus_one = _mm256_set1_epi64x(kPrime - 1);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i one = _mm256_set1_epi64x(1);
  __m256i bad = zero;
  int32_t feature = block.feature;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256i id = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block.ids + i));
    const __m256i offset = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block.cyclic_offsets + feature));
    const __m256i cardinality =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block.cyclic_cardinalities + feature));
    feature += 4;
    if (feature >= block.num_features) feature %= block.num_features;
    const __m256i lane_bad = _mm256_or_si256(_mm256_cmpgt_epi64(zero, id),
                                             _mm256_cmpgt_epi64(id, _mm256_sub_epi64(cardinality, one)));
    bad = _mm256_or_si256(bad, lane_bad);
    const __m256i a = _mm256_andnot_si256(lane_bad, _mm256_add_epi64(id, offset));
    const __m256d a_double = ToDouble(a);
    const __m256i row_term = RowTerm4(a, a_double, p.r3);
    for (int32_t c = 0; c < p.num_chunks; ++c) {
      // row_term < P, chunk term < 2P: two conditional subtractions reduce mod P (AddModPrime).
      __m256i x = _mm256_add_epi64(row_term, _mm256_set1_epi64x(chunk_terms[c]));
      x = _mm256_sub_epi64(x, _mm256_and_si256(_mm256_cmpgt_epi64(x, prime_minus_one), prime));
      x = _mm256_sub_epi64(x, _mm256_and_si256(_mm256_cmpgt_epi64(x, prime_minus_one), prime));
      if (!identity_modulo) x = ModFromQuotient(x, _mm256_mul_pd(ToDouble(x), inverse_d), d);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(starts + c * n + i), x);
    }
    if (p.is_signed) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sign_terms + i), RowTerm4(a, a_double, p.s3));
    }
  }
  bool any_bad = !_mm256_testz_si256(bad, bad);
  for (; i < n; ++i) {  // the last n % 4 rows, scalar, same rule for bad ids
    const int64_t id = block.ids[i];
    const bool row_bad = static_cast<uint64_t>(id) >= static_cast<uint64_t>(block.cyclic_cardinalities[feature]);
    any_bad |= row_bad;
    const int64_t a = row_bad ? 0 : id + block.cyclic_offsets[feature];
    if (++feature == block.num_features) feature = 0;
    const int64_t row_term = RowTerm(a, p.r3);
    for (int32_t c = 0; c < p.num_chunks; ++c) starts[c * n + i] = ChunkStart(p, row_term, chunk_terms[c]);
    if (p.is_signed) sign_terms[i] = RowTerm(a, p.s3);
  }
  return any_bad;
}

#undef TFCOMPRESS_AVX2_INLINE

}  // namespace avx2
}  // namespace robe
}  // namespace tfcompress

#else
#define TFCOMPRESS_ROBE_HAVE_AVX2 0
#endif  // x86-64 with GCC or Clang
#endif  // TFCOMPRESS_CUSTOM_OPS_ROBE_HASH_AVX2_H_
