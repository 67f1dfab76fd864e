// Exactness check of robe_hash.h's division-free arithmetic (Montgomery mod P, multiply-high mod |M| - Z + 1)
// against the exact-integer definition of docs/robe_z.md, computed with 128-bit integers. Host only (g++ or nvcc);
// the GPU kernels compile the same functions.
//
//   robe_hash_check            adversarial and random inputs (a few seconds)
//   robe_hash_check exhaustive also every dividend x < P for a few divisors (about a minute per divisor)
//
// Prints one line per group and "all passed", or the first mismatch of each group; exit status 1 on any mismatch.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../robe_hash.h"

namespace {

namespace robe = tfcompress::robe;
using u128 = unsigned __int128;

constexpr uint64_t P = static_cast<uint64_t>(robe::kPrime);

int64_t failures = 0;

void Report(const char* group, uint64_t checked, uint64_t bad, const char* first) {
  std::printf("%s %s: %llu checked%s%s\n", bad ? "FAIL" : "PASS", group, static_cast<unsigned long long>(checked),
              bad ? ", first mismatch: " : "", bad ? first : "");
  failures += bad != 0;
}

// Ids a in [0, 2^63) where a reduction could go wrong: around multiples of P, of 2^32 and of 2^32 * P (the
// Montgomery sum t + m * P nearest to overflow), near 2^63 and near 2^63 / R for the hash constants R.
std::vector<uint64_t> AdversarialIds(const std::vector<uint64_t>& constants, std::mt19937_64* rng) {
  std::vector<uint64_t> ids;
  const uint64_t top = (uint64_t{1} << 63) - 1;
  auto around = [&](uint64_t center) {
    for (int64_t delta = -3; delta <= 3; ++delta) {
      const uint64_t a = center + static_cast<uint64_t>(delta);
      if (a <= top) ids.push_back(a);
    }
  };
  for (uint64_t a = 0; a < 4096; ++a) ids.push_back(a);
  for (uint64_t k = 1; k < 64; ++k) around(k * P);
  for (uint64_t k = 1; k <= top / P; k = k * 3 + 1) around(k * P);
  for (int bit = 1; bit < 63; ++bit) around(uint64_t{1} << bit);
  around(top);
  around(P << 32);
  for (uint64_t k = 1; k < 8; ++k) around(k * (P << 32) > top ? top : k * (P << 32));
  for (uint64_t r : constants) {
    if (r > 1) around(top / r);
    if (r > 1) around((uint64_t{1} << 62) / r);
  }
  for (int k = 0; k < 200000; ++k) ids.push_back((*rng)() >> 1);
  for (int k = 0; k < 200000; ++k) ids.push_back((*rng)() >> (1 + (*rng)() % 62));
  return ids;
}

void CheckRowTerms(std::mt19937_64* rng) {
  std::vector<uint64_t> constants = {0, 1, 2, P - 1, P - 2, 871205356, 679088993, 1825252241, 634329019};
  for (int k = 0; k < 40; ++k) constants.push_back((*rng)() % P);
  const std::vector<uint64_t> ids = AdversarialIds(constants, rng);
  uint64_t checked = 0, bad = 0;
  char first[256] = "";
  for (uint64_t r : constants) {
    const uint32_t r_montgomery = robe::MontgomeryConstant(static_cast<int64_t>(r));
    for (uint64_t a : ids) {
      const uint32_t reduced = robe::ReducedId(static_cast<int64_t>(a));
      const uint64_t got = robe::MulModPrime(reduced, r_montgomery);
      const uint64_t expected = static_cast<uint64_t>(static_cast<u128>(a) * r % P);
      const uint64_t old = static_cast<uint64_t>(robe::RowTerm(static_cast<int64_t>(a), static_cast<int64_t>(r)));
      ++checked;
      if (got != expected || old != expected || reduced >= P) {
        if (!bad++) {
          std::snprintf(first, sizeof(first), "a=%llu r=%llu montgomery=%llu RowTerm=%llu expected=%llu",
                        static_cast<unsigned long long>(a), static_cast<unsigned long long>(r),
                        static_cast<unsigned long long>(got), static_cast<unsigned long long>(old),
                        static_cast<unsigned long long>(expected));
        }
      }
    }
  }
  Report("row terms (a mod P) * r mod P, Montgomery and RowTerm", checked, bad, first);
}

// Divisors d = |M| - Z + 1 where a multiply-high reciprocal could go wrong: small, around powers of two (the
// rounding of m is worst just above 2^(l-1)), around P (the identity switch), 2^31, 2^32 and beyond.
std::vector<uint64_t> AdversarialDivisors(std::mt19937_64* rng) {
  std::vector<uint64_t> divisors;
  for (uint64_t d = 1; d <= 3000; ++d) divisors.push_back(d);
  for (int bit = 2; bit <= 40; ++bit) {
    for (int64_t delta = -3; delta <= 3; ++delta) divisors.push_back((uint64_t{1} << bit) + delta);
  }
  for (int64_t delta = -5; delta <= 5; ++delta) divisors.push_back(P + delta);
  for (uint64_t d : {P / 2, P / 2 + 1, P / 3, (P + 1) / 2, uint64_t{1} << 62, ~uint64_t{0} >> 1}) divisors.push_back(d);
  for (int k = 0; k < 3000; ++k) divisors.push_back(1 + (*rng)() % (uint64_t{1} << (1 + (*rng)() % 33)));
  return divisors;
}

void CheckModulo(std::mt19937_64* rng) {
  uint64_t checked = 0, bad = 0;
  char first[256] = "";
  for (uint64_t d : AdversarialDivisors(rng)) {
    const robe::FastModulo f = robe::FastModulo::Make(d);
    std::vector<uint64_t> xs = {0, 1, 2, P - 1, P - 2, P / 2, (uint64_t{1} << 31) - 1 - (uint64_t{1} << 31) + P};
    for (int64_t delta = -2; delta <= 2; ++delta) {
      if (d + delta < P) xs.push_back(d + delta);
      for (uint64_t k = 2; k < 5; ++k) {
        if (k * d + delta < P) xs.push_back(k * d + delta);
      }
      const uint64_t last = (P - 1) / d * d;  // the largest multiple of d below P
      if (last + delta < P) xs.push_back(last + delta);
    }
    for (int k = 0; k < 200; ++k) xs.push_back((*rng)() % P);
    for (uint64_t x : xs) {
      const uint64_t got = f.Mod(x);
      ++checked;
      if (got != x % d) {
        if (!bad++) {
          std::snprintf(first, sizeof(first), "d=%llu x=%llu got=%llu expected=%llu",
                        static_cast<unsigned long long>(d), static_cast<unsigned long long>(x),
                        static_cast<unsigned long long>(got), static_cast<unsigned long long>(x % d));
        }
      }
    }
  }
  Report("x mod (|M| - Z + 1) for x < P, multiply-high", checked, bad, first);
}

// The whole index function: ChunkStartOf / IndexOf / SignOf (the GPU kernels' path) and the CPU path (RowTerm,
// IndexTerm, ChunkStart) against ((a R3 + c R2 + R1) mod P) mod (|M| - Z + 1) on 128-bit integers.
void CheckIndexFunction(std::mt19937_64* rng) {
  uint64_t checked = 0, bad = 0;
  char first[320] = "";
  const std::vector<int64_t> memory_sizes = {1, 2, 16, 17, 1000, 4096, 2200000, (int64_t{1} << 31) - 1,
                                             int64_t{1} << 31, static_cast<int64_t>(P) - 1, static_cast<int64_t>(P),
                                             static_cast<int64_t>(P) + 1, static_cast<int64_t>(P) + 40,
                                             (int64_t{1} << 32) - 1, int64_t{1} << 32, (int64_t{1} << 32) + 1,
                                             int64_t{1} << 40};
  const std::vector<int32_t> chunk_sizes = {1, 4, 16, 32};
  std::vector<std::vector<uint64_t>> constant_sets = {
      {634329019, 1825252241, 871205356, 80759397, 1857946201, 679088993},  // seed 1024
      {0, 0, 0, 0, 0, 0},
      {P - 1, P - 1, P - 1, P - 1, P - 1, P - 1}};
  for (int k = 0; k < 6; ++k) {
    std::vector<uint64_t> c;
    for (int j = 0; j < 6; ++j) c.push_back((*rng)() % P);
    constant_sets.push_back(c);
  }
  std::vector<uint64_t> all_constants;
  for (const auto& c : constant_sets) all_constants.insert(all_constants.end(), c.begin(), c.end());
  std::vector<uint64_t> ids = AdversarialIds(all_constants, rng);
  ids.resize(6000);  // the adversarial head; random ids are covered by the row-term group
  for (int k = 0; k < 1000; ++k) ids.push_back((*rng)() >> 1);
  for (const auto& c : constant_sets) {
    for (int64_t m : memory_sizes) {
      for (int32_t z : chunk_sizes) {
        if (m < z) continue;
        const int32_t d = 64;
        const robe::HashParams p = robe::MakeHashParams(c[0], c[1], c[2], c[3], c[4], c[5], m, d, z, true);
        const uint64_t modulus = static_cast<uint64_t>(m - z + 1);
        for (uint64_t a : ids) {
          const int64_t row_term = robe::RowTerm(static_cast<int64_t>(a), p.r3);
          // First and last element of the first two chunks and of the last one.
          for (const int32_t i : {0, z - 1, z, 2 * z - 1, d - z, d - 1}) {
            const int32_t chunk = i / z;
            const uint64_t mixed = static_cast<uint64_t>((static_cast<u128>(a) * c[2] + static_cast<u128>(chunk) * c[1] + c[0]) % P);
            const uint64_t expected_index = mixed % modulus + static_cast<uint64_t>(i % z);
            const uint64_t sign_mixed = static_cast<uint64_t>((static_cast<u128>(a) * c[5] + u128{uint64_t(i)} * c[4] + c[3]) % P);
            const float expected_sign = (sign_mixed & 1) ? -1.0f : 1.0f;
            const uint64_t gpu_index = static_cast<uint64_t>(robe::IndexOf(p, static_cast<int64_t>(a), i));
            const uint64_t cpu_index = static_cast<uint64_t>(
                robe::ChunkStart(p, row_term, robe::IndexTerm(chunk, p.r2, p.r1)) + i % z);
            const float gpu_sign = robe::SignOf(p, static_cast<int64_t>(a), i);
            ++checked;
            if (gpu_index != expected_index || cpu_index != expected_index || gpu_sign != expected_sign) {
              if (!bad++) {
                std::snprintf(first, sizeof(first),
                              "a=%llu i=%d M=%lld Z=%d R=(%llu,%llu,%llu): index %llu (CPU path %llu), sign %g; "
                              "expected %llu, %g",
                              static_cast<unsigned long long>(a), i, static_cast<long long>(m), z,
                              static_cast<unsigned long long>(c[0]), static_cast<unsigned long long>(c[1]),
                              static_cast<unsigned long long>(c[2]), static_cast<unsigned long long>(gpu_index),
                              static_cast<unsigned long long>(cpu_index), gpu_sign,
                              static_cast<unsigned long long>(expected_index), expected_sign);
              }
            }
          }
        }
      }
    }
  }
  Report("index function (positions and signs), GPU and CPU paths", checked, bad, first);
}

// Every x < P for a few divisors whose reciprocal has the largest rounding error.
void CheckModuloExhaustive() {
  for (uint64_t d : {uint64_t{3}, (uint64_t{1} << 30) + 1, P - 1, uint64_t{1000003}, (uint64_t{1} << 20) + 1}) {
    const robe::FastModulo f = robe::FastModulo::Make(d);
    uint64_t bad = 0;
    char first[128] = "";
    for (uint64_t x = 0; x < P; ++x) {
      if (f.Mod(x) != x % d && !bad++) {
        std::snprintf(first, sizeof(first), "d=%llu x=%llu", static_cast<unsigned long long>(d),
                      static_cast<unsigned long long>(x));
      }
    }
    char group[96];
    std::snprintf(group, sizeof(group), "every x < P mod %llu", static_cast<unsigned long long>(d));
    Report(group, P, bad, first);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937_64 rng(20240519);
  CheckRowTerms(&rng);
  CheckModulo(&rng);
  CheckIndexFunction(&rng);
  if (argc > 1 && std::strcmp(argv[1], "exhaustive") == 0) CheckModuloExhaustive();
  std::printf(failures ? "%lld groups failed\n" : "all passed\n", static_cast<long long>(failures));
  return failures ? 1 : 0;
}
