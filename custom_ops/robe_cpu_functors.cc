// CPU computation of the ROBE-Z ops: the hashing plans, the row lookup loops (scalar or AVX2 hashing, normal or
// streaming stores), the race-free scatters (serial, partial_sums, destination_ranges), the sparse gradient's sort
// and segment sum, and the CPU specializations of the functors of robe_functor.h (declared in robe_cpu_functors.h).
// The op kernels that call them are in robe_kernels.cc. Work is split over TensorFlow's intra-op thread pool (the
// same pool tf.gather uses).

#include "robe_cpu_functors.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <utility>
#include <vector>

#include "robe_functor.h"
#include "robe_hash_avx2.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/work_sharder.h"

#if defined(__SSE2__)  // every x86-64 compiler; the non-temporal stores of the forward need nothing newer
#include <emmintrin.h>
#define TFCOMPRESS_ROBE_HAVE_SSE2 1
#else
#define TFCOMPRESS_ROBE_HAVE_SSE2 0
#endif

namespace tfcompress {

using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

namespace {

// ---------------------------------------------------------------------------------------------------------------
// CPU building blocks. Row r of the batch is (b, f) = (r / F, r % F).

// Per-call hash terms: IndexTerm(c, R2, R1) for every chunk, ElementTermModPrime(i, S2, S1) for every element.
struct CallTerms {
  std::vector<int64_t> chunk;
  std::vector<int32_t> element;

  explicit CallTerms(const robe::HashParams& p) : chunk(p.num_chunks), element(p.is_signed ? p.output_dim : 0) {
    for (int32_t c = 0; c < p.num_chunks; ++c) chunk[c] = robe::IndexTerm(c, p.r2, p.r1);
    for (size_t i = 0; i < element.size(); ++i) {
      element[i] = robe::ElementTermModPrime(static_cast<int64_t>(i), p.s2, p.s1);
    }
  }
};

// values[i] *= sign(a, i) for one row, sign_term = RowTerm(a, S3) (< P, so it fits int32). Vectorizes.
inline void ApplyRowSigns(const CallTerms& terms, int32_t sign_term, int32_t width, float* values) {
  const int32_t* element = terms.element.data();
  for (int32_t i = 0; i < width; ++i) values[i] *= robe::SignFromBit(robe::SignBit(sign_term, element[i]));
}

int64_t OffsetIdOf(const functor::RobeBatch& batch, int64_t r) {
  return batch.ids[r] + batch.offsets[r % batch.num_features];
}

// What the forward needs besides CallTerms, built once per call: cyclic copies of the per-feature tables (so a run
// of consecutive rows, wrapping past the last feature, reads its offsets with one load) and the hashing stage to
// use. The AVX2 stage needs every valid a = id + offset below P (sum of cardinalities <= P, true of any real set of
// tables: P is about 2^31); otherwise, or without AVX2, the scalar stage runs. Both give the same starts bit for bit.
struct LookupPlan {
  static constexpr int32_t kCyclicExtra = 4;  // the AVX2 stage loads 4 consecutive features
  std::vector<int64_t> cyclic_offsets;        // offsets[k % F], k < F + kCyclicExtra
  std::vector<int64_t> cyclic_cardinalities;  // cardinalities[k % F], same length
  bool use_avx2 = false;

  explicit LookupPlan(const functor::RobeBatch& batch) {
    const int32_t features = batch.num_features;
    for (int32_t k = 0; k < features + kCyclicExtra; ++k) {
      cyclic_offsets.push_back(batch.offsets[k % features]);
      cyclic_cardinalities.push_back(batch.cardinalities[k % features]);
    }
#if TFCOMPRESS_ROBE_HAVE_AVX2
    // offsets are non-negative prefix sums, so the last table's end is the total (RobeAttrs checked for overflow).
    const int64_t total = batch.offsets[features - 1] + batch.cardinalities[features - 1];
    use_avx2 = total <= robe::kPrime && CpuHasAvx2();
#endif
  }

#if TFCOMPRESS_ROBE_HAVE_AVX2
  static bool CpuHasAvx2() {
    static const bool has_avx2 = __builtin_cpu_supports("avx2");
    return has_avx2;
  }
#endif
};

// Scalar hashing stage: as robe::avx2::HashRows (chunk-major starts, sign terms, true when some id is out of
// range), for any id values. a is formed in unsigned arithmetic so that even a garbage id cannot overflow; its
// chunk starts still lie inside M, and the caller reports the bad id.
bool HashRowsScalar(const functor::RobeBatch& batch, const CallTerms& terms, const LookupPlan& plan, int64_t first,
                    int64_t n, int32_t feature, int64_t* starts, int64_t* sign_terms) {
  const robe::HashParams& p = batch.params;
  bool any_bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = batch.ids[first + i];
    any_bad |= static_cast<uint64_t>(id) >= static_cast<uint64_t>(plan.cyclic_cardinalities[feature]);
    const int64_t a =
        static_cast<int64_t>(static_cast<uint64_t>(id) + static_cast<uint64_t>(plan.cyclic_offsets[feature]));
    if (++feature == batch.num_features) feature = 0;
    const int64_t row_term = robe::RowTerm(a, p.r3);
    for (int32_t c = 0; c < p.num_chunks; ++c) starts[c * n + i] = robe::ChunkStart(p, row_term, terms.chunk[c]);
    if (p.is_signed) sign_terms[i] = robe::RowTerm(a, p.s3);
  }
  return any_bad;
}

// Outputs at least this large are written with non-temporal stores (see StreamRow); smaller ones are likely still
// in cache when the next op reads them, so they take normal stores.
constexpr int64_t kMinStreamedOutputBytes = int64_t{8} << 20;

// Whether StreamRow<kZ> can write this call's rows: kZ is 1, 2 or a multiple of 4 and divides D, D % 4 == 0 and the
// output is 16-byte aligned (then every group of 4 floats of every row is), no sign to apply, a large output.
template <int kZ>
bool CanStreamRows(const robe::HashParams& p, int64_t rows, const float* embeddings) {
  const bool chunk_fits = kZ == 1 || kZ == 2 || (kZ > 0 && kZ % 4 == 0);
  return TFCOMPRESS_ROBE_HAVE_SSE2 && chunk_fits && !p.is_signed && p.output_dim % 4 == 0 &&
         p.output_dim % p.chunk_size == 0 &&
         reinterpret_cast<uintptr_t>(embeddings) % 16 == 0 &&
         rows * p.output_dim * static_cast<int64_t>(sizeof(float)) >= kMinStreamedOutputBytes;
}

// Writes one output row straight from M with non-temporal stores, 4 floats at a time; starts[c * stride] is where
// chunk c begins. The output is written once and is far larger than the caches, so bypassing them saves the read of
// every output line that a normal store does first (read-for-ownership): about 10% of the forward at the bench's
// shape. Preconditions: CanStreamRows<kZ>. The caller issues _mm_sfence() before its results are used.
template <int kZ>
inline void StreamRow(const float* memory, const int64_t* starts, int64_t stride, int32_t output_dim, float* out) {
#if TFCOMPRESS_ROBE_HAVE_SSE2
  if constexpr (kZ == 1) {
    for (int32_t e = 0; e < output_dim; e += 4) {
      const int64_t* s = starts + e * stride;
      _mm_stream_ps(out + e,
                    _mm_set_ps(memory[s[3 * stride]], memory[s[2 * stride]], memory[s[stride]], memory[s[0]]));
    }
  } else if constexpr (kZ == 2) {
    for (int32_t e = 0; e < output_dim; e += 4) {
      const int64_t* s = starts + (e / 2) * stride;
      int64_t low, high;  // two floats each; memcpy keeps the loads free of aliasing questions
      std::memcpy(&low, memory + s[0], sizeof(low));
      std::memcpy(&high, memory + s[stride], sizeof(high));
      _mm_stream_ps(out + e, _mm_castsi128_ps(_mm_set_epi64x(high, low)));
    }
  } else {
    for (int32_t c = 0; c < output_dim / kZ; ++c) {
      const float* src = memory + starts[c * stride];
      for (int32_t o = 0; o < kZ; o += 4) _mm_stream_ps(out + c * kZ + o, _mm_loadu_ps(src + o));
    }
  }
#endif
}

// Copies rows [begin, end); returns true when some id of these rows is out of range (the ids are checked here,
// in the same pass, instead of in a separate one: the caller then raises the error and drops the output). kZ > 0
// fixes the chunk size at compile time (the copy becomes a few vector moves); kZ == 0 handles any Z. Rows go in
// blocks: first every chunk start of the block (pure arithmetic, four rows per AVX2 step), then every copy. The
// copies' addresses are then all known up front, so the CPU keeps many cache misses on M in flight instead of
// interleaving each one with the next row's hash.
template <int kZ>
bool LookupRows(const functor::RobeBatch& batch, const CallTerms& terms, const LookupPlan& plan,
                const float* memory, int64_t begin, int64_t end, float* embeddings) {
  constexpr int32_t kStartsPerBlock = 512;
  const robe::HashParams& p = batch.params;
  const int32_t z = kZ > 0 ? kZ : p.chunk_size;
  const int32_t chunks = p.num_chunks;
  const int32_t full_chunks = p.output_dim / z;
  const int64_t rows_per_block = std::max<int64_t>(1, kStartsPerBlock / chunks);
  alignas(64) int64_t starts_storage[kStartsPerBlock];
  alignas(64) int64_t sign_terms[kStartsPerBlock];
  std::vector<int64_t> wide_starts(chunks > kStartsPerBlock ? chunks : 0);  // only for very wide rows
  int64_t* starts = wide_starts.empty() ? starts_storage : wide_starts.data();
  // The feature of row r is r % F; stepping it avoids a 64-bit division per row.
  int32_t feature = static_cast<int32_t>(begin % batch.num_features);
  bool any_bad = false;
  const bool stream = CanStreamRows<kZ>(p, batch.rows, embeddings);
  for (int64_t block = begin; block < end; block += rows_per_block) {
    const int64_t n = std::min(end, block + rows_per_block) - block;
#if TFCOMPRESS_ROBE_HAVE_AVX2
    if (plan.use_avx2) {
      const robe::avx2::RowBlock rows{batch.ids + block, plan.cyclic_offsets.data(),
                                      plan.cyclic_cardinalities.data(), batch.num_features, feature, n};
      any_bad |= robe::avx2::HashRows(p, terms.chunk.data(), rows, starts, sign_terms);
    } else {
      any_bad |= HashRowsScalar(batch, terms, plan, block, n, feature, starts, sign_terms);
    }
#else
    any_bad |= HashRowsScalar(batch, terms, plan, block, n, feature, starts, sign_terms);
#endif
    feature = static_cast<int32_t>((feature + n) % batch.num_features);
    if (stream) {
      for (int64_t i = 0; i < n; ++i) {
        StreamRow<kZ>(memory, starts + i, n, p.output_dim, embeddings + (block + i) * p.output_dim);
      }
      continue;
    }
    for (int64_t i = 0; i < n; ++i) {
      float* out = embeddings + (block + i) * p.output_dim;
      for (int32_t c = 0; c < full_chunks; ++c) {
        // memcpy: memory and output never alias, so a fixed Z becomes a few unaligned vector moves.
        std::memcpy(out + c * z, memory + starts[c * n + i], sizeof(float) * z);
      }
      if (full_chunks < chunks) {  // the shorter last chunk
        std::memcpy(out + full_chunks * z, memory + starts[full_chunks * n + i],
                    sizeof(float) * robe::ChunkWidth(p, full_chunks));
      }
      if (p.is_signed) {  // while the row is hot
        ApplyRowSigns(terms, static_cast<int32_t>(sign_terms[i]), p.output_dim, out);
      }
    }
  }
#if TFCOMPRESS_ROBE_HAVE_SSE2
  if (stream) _mm_sfence();  // order the non-temporal stores before the shard reports completion
#endif
  return any_bad;
}

using LookupRowsFn = bool (*)(const functor::RobeBatch&, const CallTerms&, const LookupPlan&, const float*, int64_t,
                              int64_t, float*);

LookupRowsFn PickLookupRows(int32_t chunk_size) {
  switch (chunk_size) {
    case 1: return LookupRows<1>;
    case 2: return LookupRows<2>;
    case 4: return LookupRows<4>;
    case 8: return LookupRows<8>;
    case 16: return LookupRows<16>;
    case 32: return LookupRows<32>;
    case 64: return LookupRows<64>;
    default: return LookupRows<0>;
  }
}

// Adds sign * grad[r, c * Z + o] to chunk_dst[o] for o in [o_begin, o_end) (chunk_dst: where chunk c lands).
inline void AddChunkElements(const functor::RobeBatch& batch, const float* grad, int64_t r, int32_t c,
                             int64_t sign_term, const CallTerms& terms, int32_t o_begin, int32_t o_end,
                             float* chunk_dst) {
  const robe::HashParams& p = batch.params;
  const int32_t first = c * p.chunk_size;
  const float* g = grad + r * p.output_dim + first;
  if (p.is_signed) {
    const int32_t row_term = static_cast<int32_t>(sign_term);
    for (int32_t o = o_begin; o < o_end; ++o) {
      chunk_dst[o] += robe::SignFromBit(robe::SignBit(row_term, terms.element[first + o])) * g[o];
    }
  } else {
    for (int32_t o = o_begin; o < o_end; ++o) chunk_dst[o] += g[o];
  }
}

// Adds sign * grad of chunk c of row r into dst (an |M| array) at its start. If [lo, hi) is narrower than all of
// M, only the elements landing in [lo, hi) are added: the destination-ranges scatter gives each thread a slice.
inline void AddChunk(const functor::RobeBatch& batch, const float* grad, int64_t r, int32_t c, int64_t start,
                     int64_t sign_term, const CallTerms& terms, int64_t lo, int64_t hi, float* dst) {
  const int32_t o_begin = static_cast<int32_t>(std::max<int64_t>(0, lo - start));
  const int32_t o_end = static_cast<int32_t>(std::min<int64_t>(robe::ChunkWidth(batch.params, c), hi - start));
  AddChunkElements(batch, grad, r, c, sign_term, terms, o_begin, o_end, dst + start);
}

// Scatters rows [begin, end) into dst (no range restriction), in row order.
void ScatterRows(const functor::RobeBatch& batch, const CallTerms& terms, const float* grad, int64_t begin,
                 int64_t end, float* dst) {
  const robe::HashParams& p = batch.params;
  int32_t feature = static_cast<int32_t>(begin % batch.num_features);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t a = batch.ids[r] + batch.offsets[feature];
    if (++feature == batch.num_features) feature = 0;
    const int64_t row_term = robe::RowTerm(a, p.r3);
    const int64_t sign_term = p.is_signed ? robe::RowTerm(a, p.s3) : 0;
    for (int32_t c = 0; c < p.num_chunks; ++c) {
      const int64_t start = robe::ChunkStart(p, row_term, terms.chunk[c]);
      AddChunk(batch, grad, r, c, start, sign_term, terms, 0, p.memory_size, dst);
    }
  }
}

// Chunk starts of every (row, chunk) occurrence, in occurrence order (row-major), computed in parallel.
void ComputeChunkStarts(OpKernelContext* ctx, const functor::RobeBatch& batch, const CallTerms& terms,
                        int64_t* starts) {
  const robe::HashParams& p = batch.params;
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(workers->num_threads, workers->workers, batch.rows, 40 * p.num_chunks,
                    [&](int64_t begin, int64_t end) {
                      int32_t feature = static_cast<int32_t>(begin % batch.num_features);
                      for (int64_t r = begin; r < end; ++r) {
                        const int64_t row_term = robe::RowTerm(batch.ids[r] + batch.offsets[feature], p.r3);
                        if (++feature == batch.num_features) feature = 0;
                        for (int32_t c = 0; c < p.num_chunks; ++c) {
                          starts[r * p.num_chunks + c] = robe::ChunkStart(p, row_term, terms.chunk[c]);
                        }
                      }
                    });
}

// Splits [0, n) into `parts` contiguous, nearly equal ranges; returns the start of range k.
int64_t PartStart(int64_t n, int64_t parts, int64_t k) { return n / parts * k + std::min(k, n % parts); }

// Below this many gradient elements a single thread is faster than waking the pool.
constexpr int64_t kMinElementsPerShard = 1 << 15;

// ---------------------------------------------------------------------------------------------------------------
// Coalesced sparse gradient (CPU only): sort the chunk occurrences by start, merge their [start, start + width)
// intervals into disjoint covered runs, and sum each element's terms in (start, occurrence) order.

// Occurrence ids (r * num_chunks + c) ordered by chunk start, ties in occurrence order: a stable LSD radix sort
// over the bits |M| needs (11 bits a pass), so its cost is linear in the batch and independent of the thread count.
std::vector<int64_t> SortByStart(const int64_t* starts, int64_t count, int64_t max_start) {
  constexpr int kBits = 11;
  constexpr int64_t kBuckets = int64_t{1} << kBits;
  int bits = 1;
  while (bits < 63 && (max_start >> bits) != 0) ++bits;
  std::vector<int64_t> order(count), scratch(count);
  for (int64_t n = 0; n < count; ++n) order[n] = n;
  std::vector<int64_t> histogram(kBuckets);
  for (int shift = 0; shift < bits; shift += kBits) {
    std::fill(histogram.begin(), histogram.end(), 0);
    for (int64_t n = 0; n < count; ++n) ++histogram[(starts[order[n]] >> shift) & (kBuckets - 1)];
    int64_t total = 0;
    for (int64_t& h : histogram) {
      const int64_t bucket_count = h;
      h = total;
      total += bucket_count;
    }
    for (int64_t n = 0; n < count; ++n) scratch[histogram[(starts[order[n]] >> shift) & (kBuckets - 1)]++] = order[n];
    order.swap(scratch);
  }
  return order;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// CPU functors.

namespace functor {

absl::Status RobeValidateIdsFunctor<CPUDevice>::operator()(OpKernelContext* ctx, const RobeBatch& batch) {
  const int64_t features = batch.num_features;
  // The common case (all valid) costs one unsigned compare per id; only a failing batch pays for the search.
  bool any_bad = false;
  for (int64_t r = 0, f = 0; r < batch.rows; ++r) {
    any_bad |= static_cast<uint64_t>(batch.ids[r]) >= static_cast<uint64_t>(batch.cardinalities[f]);
    if (++f == features) f = 0;
  }
  if (!any_bad) return absl::OkStatus();
  for (int64_t r = 0; r < batch.rows; ++r) {
    const int64_t f = r % features;
    if (batch.ids[r] < 0 || batch.ids[r] >= batch.cardinalities[f]) {
      return InvalidArgument("id out of range: feature ", f, ", value ", batch.ids[r], " (row ", r / features,
                             "), allowed [0, ", batch.cardinalities[f], ")");
    }
  }
  return absl::OkStatus();
}

void RobeLookupFunctor<CPUDevice>::operator()(OpKernelContext* ctx, const RobeBatch& batch, const float* memory,
                                              float* embeddings) {
  LookupCheckingIds(ctx, batch, memory, embeddings);  // ids are validated already (the functor's contract)
}

bool RobeLookupFunctor<CPUDevice>::LookupCheckingIds(OpKernelContext* ctx, const RobeBatch& batch,
                                                     const float* memory, float* embeddings) {
  const robe::HashParams& p = batch.params;
  const CallTerms terms(p);
  const LookupPlan plan(batch);
  const LookupRowsFn lookup_rows = PickLookupRows(p.chunk_size);
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  // Cost per row in the pool's units (about one per cycle): the row's hash, a few vector instructions per chunk,
  // a load + store per element (and the sign's arithmetic).
  const int64_t cost_per_row = 8 + 4 * p.num_chunks + 2 * p.output_dim + (p.is_signed ? 6 * p.output_dim : 0);
  std::atomic<bool> any_bad{false};
  tensorflow::Shard(workers->num_threads, workers->workers, batch.rows, cost_per_row,
                    [&](int64_t begin, int64_t end) {
                      if (lookup_rows(batch, terms, plan, memory, begin, end, embeddings)) {
                        any_bad.store(true, std::memory_order_relaxed);
                      }
                    });
  return any_bad.load(std::memory_order_relaxed);
}

void RobeScatterGradFunctor<CPUDevice>::operator()(OpKernelContext* ctx, const RobeBatch& batch, const float* grad,
                                                   ScatterAlgorithm algorithm, float* memory_grad) {
  const robe::HashParams& p = batch.params;
  const CallTerms terms(p);
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  const int64_t memory_size = p.memory_size;
  const int64_t elements = batch.rows * p.output_dim;
  const int64_t threads = std::max(1, workers->num_threads);
  const int64_t shards = std::max<int64_t>(1, std::min<int64_t>(threads, elements / kMinElementsPerShard));

  if (algorithm == ScatterAlgorithm::kAuto) {
    if (shards == 1) {
      algorithm = ScatterAlgorithm::kSerial;
    } else if ((shards - 1) * memory_size <= elements) {
      // The extra buffers cost (shards - 1) * |M| writes + reads, no more than the scatter itself.
      algorithm = ScatterAlgorithm::kPartialSums;
    } else {
      algorithm = ScatterAlgorithm::kDestinationRanges;
    }
  }

  if (algorithm == ScatterAlgorithm::kSerial) {
    // Zeroing a large |M| is the dominant cost when the batch is small: spread it over the pool.
    tensorflow::Shard(threads, workers->workers, memory_size, 1, [&](int64_t begin, int64_t end) {
      std::fill(memory_grad + begin, memory_grad + end, 0.0f);
    });
    ScatterRows(batch, terms, grad, 0, batch.rows, memory_grad);
    return;
  }

  if (algorithm == ScatterAlgorithm::kPartialSums) {
    // Shard k owns rows [PartStart(k), PartStart(k+1)) and buffer k (buffer 0 is the output). The shard count
    // and row split are fixed before the pool runs, so the summation order never depends on scheduling.
    // (shards - 1) * |M| cannot overflow: |M| <= 2^48 and shards <= the pool size.
    Tensor partials;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({(shards - 1) * memory_size}),
                                           &partials));
    float* extra = partials.flat<float>().data();
    auto buffer = [&](int64_t k) { return k == 0 ? memory_grad : extra + (k - 1) * memory_size; };
    tensorflow::Shard(threads, workers->workers, shards, elements / shards * 4 + memory_size,
                      [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        float* dst = buffer(k);
        std::fill(dst, dst + memory_size, 0.0f);
        ScatterRows(batch, terms, grad, PartStart(batch.rows, shards, k), PartStart(batch.rows, shards, k + 1),
                    dst);
      }
    });
    tensorflow::Shard(threads, workers->workers, memory_size, shards, [&](int64_t begin, int64_t end) {
      for (int64_t k = 1; k < shards; ++k) {
        const float* src = buffer(k);
        for (int64_t j = begin; j < end; ++j) memory_grad[j] += src[j];
      }
    });
    return;
  }

  // Destination ranges: thread k owns M[PartStart(k), PartStart(k+1)), zeroes it, then walks every chunk in
  // occurrence order and adds the part of it that lands in its range. Each element therefore receives its terms
  // in the same order as the serial scatter, whatever the thread count: the result equals kSerial bit for bit.
  Tensor starts_tensor;
  OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT64, TensorShape({batch.rows * p.num_chunks}),
                                         &starts_tensor));
  int64_t* starts = starts_tensor.flat<int64_t>().data();
  ComputeChunkStarts(ctx, batch, terms, starts);
  const int64_t ranges = std::min<int64_t>(threads, memory_size);
  tensorflow::Shard(
      threads, workers->workers, ranges,
      batch.rows * p.num_chunks * 2 + elements / ranges * 4 + memory_size / ranges,
      [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const int64_t lo = PartStart(memory_size, ranges, k);
          const int64_t hi = PartStart(memory_size, ranges, k + 1);
          std::fill(memory_grad + lo, memory_grad + hi, 0.0f);
          for (int64_t r = 0; r < batch.rows; ++r) {
            const int64_t* row_starts = starts + r * p.num_chunks;
            int64_t sign_term = -1;  // computed only for rows that touch this range
            for (int32_t c = 0; c < p.num_chunks; ++c) {
              const int64_t start = row_starts[c];
              if (start >= hi || start + robe::ChunkWidth(p, c) <= lo) continue;
              if (p.is_signed && sign_term < 0) sign_term = robe::RowTerm(OffsetIdOf(batch, r), p.s3);
              AddChunk(batch, grad, r, c, start, sign_term, terms, lo, hi, memory_grad);
            }
          }
        }
      });
}

// Coalesced sparse gradient (robe_cpu_functors.h): the sort and interval merge here, the segment sum in
// SparseGradValues once the kernel has allocated the outputs.
absl::Status PlanSparseGrad(OpKernelContext* ctx, const RobeBatch& batch, SparseGradPlan* plan) {
  const robe::HashParams& p = batch.params;
  const CallTerms terms(p);
  const int64_t count = batch.rows * p.num_chunks;

  Tensor starts_tensor;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT64, TensorShape({count}), &starts_tensor));
  int64_t* starts = starts_tensor.flat<int64_t>().data();
  ComputeChunkStarts(ctx, batch, terms, starts);
  plan->order = SortByStart(starts, count, p.memory_size - p.chunk_size);
  const std::vector<int64_t>& order = plan->order;

  // Merge intervals into runs. Element e of a run beginning at run_start is output row run_base + e - run_start,
  // so each occurrence needs only the output row of its chunk start.
  std::vector<int64_t>& out_row = plan->out_row;
  std::vector<std::pair<int64_t, int64_t>>& runs = plan->runs;
  std::vector<int64_t>& run_first_entry = plan->run_first_entry;
  out_row.assign(count, 0);
  runs.clear();
  run_first_entry.clear();
  int64_t covered = 0;
  for (int64_t n = 0; n < count; ++n) {
    const int64_t start = starts[order[n]];
    const int64_t end = start + robe::ChunkWidth(p, static_cast<int32_t>(order[n] % p.num_chunks));
    if (runs.empty() || start >= runs.back().second) {
      if (!runs.empty()) covered += runs.back().second - runs.back().first;
      runs.push_back({start, end});
      run_first_entry.push_back(n);
    } else {
      runs.back().second = std::max(runs.back().second, end);
    }
    out_row[n] = covered + start - runs.back().first;
  }
  if (!runs.empty()) covered += runs.back().second - runs.back().first;
  plan->covered = covered;
  return absl::OkStatus();
}

void SparseGradValues(OpKernelContext* ctx, const RobeBatch& batch, const SparseGradPlan& plan, const float* grad,
                      int64_t* indices, float* values) {
  const robe::HashParams& p = batch.params;
  const CallTerms terms(p);
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  const int64_t count = batch.rows * p.num_chunks;
  const int64_t threads = std::max(1, workers->num_threads);
  const std::vector<int64_t>& order = plan.order;
  const std::vector<int64_t>& out_row = plan.out_row;
  const std::vector<std::pair<int64_t, int64_t>>& runs = plan.runs;
  const std::vector<int64_t>& run_first_entry = plan.run_first_entry;

  // Runs are disjoint in the output, so threads that own whole runs never write the same element.
  const int64_t num_runs = static_cast<int64_t>(runs.size());
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(threads, num_runs));
  tensorflow::Shard(threads, workers->workers, pieces, count * p.chunk_size * 4 / pieces,
                    [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t first_run = PartStart(num_runs, pieces, k), last_run = PartStart(num_runs, pieces, k + 1);
      if (first_run == last_run) continue;
      // The first entry of a run starts at the run's first element.
      int64_t base = out_row[run_first_entry[first_run]];
      for (int64_t run = first_run; run < last_run; ++run) {
        const int64_t length = runs[run].second - runs[run].first;
        for (int64_t e = 0; e < length; ++e) {
          indices[base + e] = runs[run].first + e;
          values[base + e] = 0.0f;
        }
        base += length;
      }
      const int64_t entry_end = last_run < num_runs ? run_first_entry[last_run] : count;
      for (int64_t n = run_first_entry[first_run]; n < entry_end; ++n) {
        const int64_t occurrence = order[n];
        const int64_t r = occurrence / p.num_chunks;
        const int32_t c = static_cast<int32_t>(occurrence % p.num_chunks);
        const int64_t sign_term = p.is_signed ? robe::RowTerm(OffsetIdOf(batch, r), p.s3) : 0;
        AddChunkElements(batch, grad, r, c, sign_term, terms, 0, robe::ChunkWidth(p, c), values + out_row[n]);
      }
    }
  });
}

void ComputePositions(const RobeBatch& batch, int64_t* pos, float* sgn) {
  const robe::HashParams& p = batch.params;
  // The one-shot helpers on purpose: this op is the independent check of the fast paths' precomputed terms.
  for (int64_t r = 0; r < batch.rows; ++r) {
    const int64_t a = OffsetIdOf(batch, r);
    for (int32_t i = 0; i < p.output_dim; ++i) {
      pos[r * p.output_dim + i] = robe::IndexOf(p, a, i);
      sgn[r * p.output_dim + i] = p.is_signed ? robe::SignOf(p, a, i) : 1.0f;
    }
  }
}

}  // namespace functor
}  // namespace tfcompress
