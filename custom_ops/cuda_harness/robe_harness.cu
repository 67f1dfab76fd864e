// Standalone check of the ROBE-Z CUDA kernels (../robe_gpu_kernels.cu.h, ../robe_sorted_gpu_kernels.cu.h) without
// TensorFlow.
//
//   robe_harness host|device INPUT OUTPUT
//
// INPUT (written by run_harness.py, little-endian):
//   int64 header[16] = {magic 0x524f42455a, rows, F, D, Z, M, signed, R1, R2, R3, S1, S2, S3, repeats, bench, 0}
//   int64 cardinalities[F], int64 offsets[F], int64 ids[rows], then, unless bench, float memory[M],
//   float grad[rows * D]
// OUTPUT (not bench):
//   int64 first_bad_row (-1 when all ids are valid), int64 lookup_variants V, int64 scatter_variants S,
//   int64 positions[rows * D], float signs[rows * D], float embeddings[V][rows * D], float memory_grad[S][M],
//   float sorted_memory_grad[M] (the deterministic scatter), int64 sorted_repeat_identical (1 when a second run of
//   the deterministic scatter and of the sparse gradient gave the same bits and, on the device, the bits of the
//   host emulation), int64 unique U,
//   int64 sparse_positions[U], float sparse_values[U]
// OUTPUT (bench): int64 first_bad_row only; the results are compared on the device (every lookup variant against
//   the tiled kernel bit for bit, every scatter against the deterministic one to 1e-5 of the largest |value|).
// stdout: one line of key=value (device mode: median milliseconds over `repeats` of every variant, the bytes
// each moves, and the device-to-device copy bandwidth measured in the same run).
//
// "host" runs the same robe_hash.h arithmetic on the CPU (so the file format, the header and the arithmetic are
// checkable on a machine without a GPU): the reference loop as variant 0, the warp-row variants and the sorted
// gradient emulated from the kernels' own bodies (WarpRowsWork, SortInputOf, SegmentSumsWork). "device" runs the CUDA kernels. When an id is invalid only first_bad_row is meaningful.
//
// Bag problems (../robe_bag_gpu_kernels.cu.h), told apart by their magic 0x524f4245424147 ("ROBEBAG"):
//   INPUT:  int64 header[20] = {magic, N, B, D, Z, M, signed, R1, R2, R3, S1, S2, S3, repeats, combiner (0 sum,
//           1 mean, 2 sqrtn), weighted, table_offset, cardinality, 0, 0},
//           int64 ids[N], int64 row_splits[B + 1], float weights[N], float memory[M], float grad[B * D]
//   OUTPUT: int64 first_bad_id (-1 when all are valid), float embeddings[B * D], float memory_grad[M],
//           float weights_grad[N] (zeros when not weighted)
// "host" calls the kernels' own per-element functions (BagForwardElement, BagIdGradOf, BagWeightGradOf) in loops.

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "../robe_bag_gpu_kernels.cu.h"
#include "../robe_gpu_kernels.cu.h"
#include "../robe_sorted_gpu_kernels.cu.h"

namespace {

using tfcompress::robe::HashParams;

constexpr int64_t kMagic = 0x524f42455a;
constexpr int64_t kBagMagic = 0x524f4245424147;

struct Problem {
  HashParams params;
  int64_t rows = 0, features = 0, repeats = 1;
  bool bench = false;
  std::vector<int64_t> cardinalities, offsets, ids;
  std::vector<float> memory, grad;
};

struct Result {
  int64_t first_bad_row = -1;
  bool bench = false;
  std::vector<int64_t> positions;
  std::vector<float> signs;
  std::vector<std::vector<float>> embeddings, memory_grads;  // one per variant
  std::vector<float> sorted_memory_grad;
  int64_t sorted_repeat_identical = 0;
  std::vector<int64_t> sparse_positions;
  std::vector<float> sparse_values;
};

void Fail(const char* what) {
  std::fprintf(stderr, "robe_harness: %s\n", what);
  std::exit(2);
}

void Check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    std::fprintf(stderr, "robe_harness: %s: %s\n", what, cudaGetErrorString(error));
    std::exit(3);
  }
}

template <typename T>
void ReadVector(std::FILE* file, std::vector<T>* out, int64_t count) {
  out->resize(count);
  if (count > 0 && std::fread(out->data(), sizeof(T), count, file) != static_cast<size_t>(count)) Fail("short input");
}

template <typename T>
void WriteVector(std::FILE* file, const std::vector<T>& values) {
  if (!values.empty() && std::fwrite(values.data(), sizeof(T), values.size(), file) != values.size()) {
    Fail("short write");
  }
}

void WriteInt(std::FILE* file, int64_t value) {
  if (std::fwrite(&value, sizeof(int64_t), 1, file) != 1) Fail("short write");
}

Problem ReadProblem(const char* path) {
  std::FILE* file = std::fopen(path, "rb");
  if (file == nullptr) Fail("cannot open the input file");
  int64_t h[16];
  if (std::fread(h, sizeof(int64_t), 16, file) != 16 || h[0] != kMagic) Fail("bad input header");
  Problem p;
  p.rows = h[1];
  p.features = h[2];
  if (p.rows < 0 || p.features < 1 || h[3] < 1 || h[4] < 1 || h[4] > h[3] || h[5] < h[4]) Fail("bad sizes");
  p.params = tfcompress::robe::MakeHashParams(h[7], h[8], h[9], h[10], h[11], h[12], h[5],
                                              static_cast<int32_t>(h[3]), static_cast<int32_t>(h[4]), h[6] != 0);
  p.repeats = std::max<int64_t>(1, h[13]);
  p.bench = h[14] != 0;
  ReadVector(file, &p.cardinalities, p.features);
  ReadVector(file, &p.offsets, p.features);
  ReadVector(file, &p.ids, p.rows);
  if (!p.bench) {
    ReadVector(file, &p.memory, h[5]);
    ReadVector(file, &p.grad, p.rows * h[3]);
  }
  std::fclose(file);
  return p;
}

void WriteResult(const char* path, const Result& r) {
  std::FILE* file = std::fopen(path, "wb");
  if (file == nullptr) Fail("cannot open the output file");
  WriteInt(file, r.first_bad_row);
  if (r.first_bad_row < 0 && !r.bench) {
    WriteInt(file, static_cast<int64_t>(r.embeddings.size()));
    WriteInt(file, static_cast<int64_t>(r.memory_grads.size()));
    WriteVector(file, r.positions);
    WriteVector(file, r.signs);
    for (const auto& e : r.embeddings) WriteVector(file, e);
    for (const auto& g : r.memory_grads) WriteVector(file, g);
    WriteVector(file, r.sorted_memory_grad);
    WriteInt(file, r.sorted_repeat_identical);
    WriteInt(file, static_cast<int64_t>(r.sparse_positions.size()));
    WriteVector(file, r.sparse_positions);
    WriteVector(file, r.sparse_values);
  }
  std::fclose(file);
}

int64_t FirstBadRowOnHost(const Problem& p) {
  for (int64_t row = 0; row < p.rows; ++row) {
    if (static_cast<uint64_t>(p.ids[row]) >= static_cast<uint64_t>(p.cardinalities[row % p.features])) return row;
  }
  return -1;
}

namespace gpu = tfcompress::robe::gpu;

// ---------------------------------------------------------------------------------------------------------------
// CPU emulation of the warp-row kernels: their body (gpu::WarpRowsWork) runs with 32 std::threads per warp, warps
// one after another, on the grid the launcher would use. __shfl_sync becomes an exchange through a 32-thread
// barrier; a lane that reaches a shuffle its warp never reaches (a divergent trip count) stops the harness.

class HostWarp {
 public:
  uint32_t Exchange(int32_t lane, uint32_t value, int32_t source) {
    slots_[lane] = value;
    Wait();
    const uint32_t result = slots_[source];
    Wait();
    return result;
  }

 private:
  void Wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++arrived_ == 32) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(20), [&] { return generation != generation_; })) {
      Fail("emulated warp: lanes diverged at a shuffle (not every lane reached it)");
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  int32_t arrived_ = 0;
  int64_t generation_ = 0;
  uint32_t slots_[32] = {};
};

struct HostLane {
  HostWarp* warp;
  int32_t lane;
  std::mutex* atomic_mutex;
  uint32_t Shuffle(uint32_t value, int32_t source) const { return warp->Exchange(lane, value, source); }
  int64_t LoadId(const int64_t* p) const { return *p; }
  float LoadMemory(const float* p) const { return *p; }
  float LoadStream(const float* p) const { return *p; }
  float4 LoadStream4(const float4* p) const { return *p; }
  void StoreStream(float* p, float v) const { *p = v; }
  void StoreStream4(float4* p, float4 v) const { *p = v; }
  void AtomicAdd(float* p, float v) const {
    std::lock_guard<std::mutex> lock(*atomic_mutex);
    *p += v;
  }
};

struct HostSumLane {
  float LoadGrad(const float* p) const { return *p; }
};

// The sorted gradient as the GPU computes it (robe_sorted_gpu_kernels.cu.h): SortInputOf per element, a stable
// sort by position (what CUB's radix sort returns), run-length encoding and run starts, then per run the lanes'
// LanePartialSum and SegmentSumsWork's butterfly. Fills r's sorted_memory_grad and sparse arrays.
void EmulateSortedGradient(const Problem& pr, Result* r) {
  const HashParams& p = pr.params;
  const int64_t n = pr.rows * p.output_dim;
  const int32_t features = static_cast<int32_t>(pr.features);
  std::vector<uint64_t> keys(n), values(n);
  for (int64_t e = 0; e < n; ++e) {
    gpu::SortInputOf<uint64_t>(p, pr.ids.data(), pr.offsets.data(), features, e, &keys[e], &values[e]);
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return keys[x] < keys[y]; });
  std::vector<uint64_t> sorted_values(n), unique, run_lengths, run_starts;
  for (int64_t k = 0; k < n; ++k) {
    sorted_values[k] = values[order[k]];
    if (k == 0 || keys[order[k]] != keys[order[k - 1]]) {
      unique.push_back(keys[order[k]]);
      run_starts.push_back(static_cast<uint64_t>(k));
      run_lengths.push_back(0);
    }
    ++run_lengths.back();
  }
  const int64_t runs = static_cast<int64_t>(unique.size());
  r->sorted_memory_grad.assign(p.memory_size, 0.0f);
  r->sparse_positions.assign(runs, 0);
  r->sparse_values.assign(runs, 0.0f);
  for (int64_t k = 0; k < runs; ++k) {
    const int64_t begin = static_cast<int64_t>(run_starts[k]), end = begin + static_cast<int64_t>(run_lengths[k]);
    float lane_sums[32];
    for (int32_t lane = 0; lane < 32; ++lane) {
      lane_sums[lane] = gpu::LanePartialSum(HostSumLane(), sorted_values.data(), pr.grad.data(), begin, end, lane);
    }
    // The butterfly of SegmentSumsWork: every lane adds the value of lane ^ mask, all lanes at once.
    for (int32_t mask = 16; mask >= 1; mask /= 2) {
      float next[32];
      for (int32_t lane = 0; lane < 32; ++lane) next[lane] = lane_sums[lane] + lane_sums[lane ^ mask];
      std::memcpy(lane_sums, next, sizeof(next));
    }
    r->sorted_memory_grad[unique[k]] = lane_sums[0];
    r->sparse_positions[k] = static_cast<int64_t>(unique[k]);
    r->sparse_values[k] = lane_sums[0];
  }
}

// dst = the warp-row lookup (kScatter false, dst [rows * D]) or scatter (true, dst [M], zeroed here) of the
// problem, as `variant` launches it. Returns false when the variant falls back to the tiled kernel for p.
template <bool kScatter>
bool EmulateWarpRows(const Problem& pr, gpu::KernelVariant variant, const float* src, float* dst) {
  const HashParams& p = pr.params;
  const int32_t features = static_cast<int32_t>(pr.features);
  if (!gpu::WarpRowsSupported(p, features)) return false;
  if (kScatter) std::fill(dst, dst + p.memory_size, 0.0f);
  if (pr.rows == 0) return true;
  const int grid = gpu::WarpRowsGrid(pr.rows, variant == gpu::KernelVariant::kWarpRowsTwoBlocks ? 2 : 4096);
  const int64_t warps = static_cast<int64_t>(grid) * gpu::kWarpsPerBlock;
  std::vector<uint32_t> terms(gpu::kWarpRowsTermsPerElement * p.output_dim);
  for (int32_t i = 0; i < p.output_dim; ++i) gpu::FillWarpRowTerm(p, i, terms.data());
  const tfcompress::robe::FastModulo feature_modulo = tfcompress::robe::FastModulo::Make(features);
  const tfcompress::robe::FastModulo row_of_vector =
      tfcompress::robe::FastModulo::Make(static_cast<uint64_t>(gpu::WarpRowsVectorsPerRow(p)));
  std::mutex atomic_mutex;
  for (int64_t warp_index = 0; warp_index < warps; ++warp_index) {
    if (warp_index * 32 >= pr.rows) break;  // such warps skip the row loop: no shuffles, no memory
    HostWarp warp;
    std::vector<std::thread> lanes;
    for (int32_t lane = 0; lane < 32; ++lane) {
      lanes.emplace_back([&, lane] {
        gpu::VisitWarpRowsForm(p, [&](auto vector, auto one_chunk) {
          gpu::WarpRowsWork<decltype(vector)::value, decltype(one_chunk)::value, kScatter>(
              HostLane{&warp, lane, &atomic_mutex}, p, pr.ids.data(), pr.offsets.data(), features, feature_modulo,
              row_of_vector, pr.rows, terms.data(), src, dst, lane, warp_index, warps);
          return 0;
        });
      });
    }
    for (std::thread& t : lanes) t.join();
  }
  return true;
}

// The reference-free CPU run of the shared arithmetic (the Python script compares it with NumPy), with the GPU's
// warp-row kernels and sorted gradient emulated (their own code, shuffles through 32 threads).
Result RunHost(const Problem& p) {
  Result r;
  r.first_bad_row = FirstBadRowOnHost(p);
  if (r.first_bad_row >= 0) return r;
  const HashParams& hp = p.params;
  const int64_t n = p.rows * hp.output_dim;
  r.positions.assign(n, 0);
  r.signs.assign(n, 0.0f);
  r.embeddings.assign(1, std::vector<float>(n));
  r.memory_grads.assign(1, std::vector<float>(hp.memory_size, 0.0f));
  for (int64_t row = 0; row < p.rows; ++row) {
    const int64_t a = p.ids[row] + p.offsets[row % p.features];
    for (int32_t i = 0; i < hp.output_dim; ++i) {
      const int64_t e = row * hp.output_dim + i;
      r.positions[e] = tfcompress::robe::IndexOf(hp, a, i);
      r.signs[e] = hp.is_signed ? tfcompress::robe::SignOf(hp, a, i) : 1.0f;
      r.embeddings[0][e] = r.signs[e] * p.memory[r.positions[e]];
      r.memory_grads[0][r.positions[e]] += r.signs[e] * p.grad[e];
    }
  }
  // The sorted gradient emulated twice: the same bits both times (the summation order is fixed).
  EmulateSortedGradient(p, &r);
  Result again;
  EmulateSortedGradient(p, &again);
  r.sorted_repeat_identical =
      std::memcmp(r.sorted_memory_grad.data(), again.sorted_memory_grad.data(), 4 * r.sorted_memory_grad.size()) == 0 &&
      r.sparse_positions == again.sparse_positions &&
      std::memcmp(r.sparse_values.data(), again.sparse_values.data(), 4 * r.sparse_values.size()) == 0;
  // The warp-row variants, emulated (the tiled kernels' arithmetic is the reference loop above).
  int emulated = 0;
  for (gpu::KernelVariant variant : {gpu::KernelVariant::kWarpRows, gpu::KernelVariant::kWarpRowsTwoBlocks}) {
    std::vector<float> embeddings(n), memory_grad(hp.memory_size);
    if (EmulateWarpRows<false>(p, variant, p.memory.data(), embeddings.data()) &&
        EmulateWarpRows<true>(p, variant, p.grad.data(), memory_grad.data())) {
      r.embeddings.push_back(std::move(embeddings));
      r.memory_grads.push_back(std::move(memory_grad));
      ++emulated;
    }
  }
  std::printf("mode=host rows=%lld emulated_warp_row_variants=%d\n", static_cast<long long>(p.rows), emulated);
  return r;
}

template <typename T>
T* DeviceAlloc(int64_t count) {
  T* device = nullptr;
  Check(cudaMalloc(&device, std::max<size_t>(1, static_cast<size_t>(count)) * sizeof(T)), "cudaMalloc");
  return device;
}

template <typename T>
T* ToDevice(const std::vector<T>& host) {
  T* device = DeviceAlloc<T>(static_cast<int64_t>(host.size()));
  if (!host.empty()) Check(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "H2D");
  return device;
}

template <typename T>
void ToHost(const T* device, std::vector<T>* host) {
  if (!host->empty()) {
    Check(cudaMemcpy(host->data(), device, host->size() * sizeof(T), cudaMemcpyDeviceToHost), "D2H");
  }
}

// Median milliseconds of `repeats` runs of launch().
template <typename Launch>
float MedianMs(int64_t repeats, Launch launch) {
  cudaEvent_t start, stop;
  Check(cudaEventCreate(&start), "cudaEventCreate");
  Check(cudaEventCreate(&stop), "cudaEventCreate");
  launch();  // warm-up
  Check(cudaDeviceSynchronize(), "warm-up");
  std::vector<float> times;
  for (int64_t k = 0; k < repeats; ++k) {
    Check(cudaEventRecord(start), "cudaEventRecord");
    launch();
    Check(cudaEventRecord(stop), "cudaEventRecord");
    Check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    Check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Bench inputs made on the device: a float in [-1, 1) from a hash of the index (no host arrays of rows * D).
__global__ void FillKernel(float* out, int64_t count, uint32_t salt) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < count;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(k) * 2654435761u ^ salt ^ static_cast<uint32_t>(k >> 32);
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    out[k] = static_cast<float>(x >> 8) * (2.0f / 16777216.0f) - 1.0f;
  }
}

// mismatches += (a[k] != b[k]) bit for bit.
__global__ void CountMismatchesKernel(const float* a, const float* b, int64_t count, unsigned long long* mismatches) {
  unsigned long long local = 0;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < count;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    local += __float_as_uint(a[k]) != __float_as_uint(b[k]);
  }
  if (local) atomicAdd(mismatches, local);
}

unsigned long long CountMismatches(const float* a, const float* b, int64_t count) {
  unsigned long long* d = DeviceAlloc<unsigned long long>(1);
  Check(cudaMemset(d, 0, sizeof(unsigned long long)), "cudaMemset");
  CountMismatchesKernel<<<gpu::GridSize(count, 4096), gpu::kThreadsPerBlock>>>(a, b, count, d);
  unsigned long long h = 0;
  Check(cudaMemcpy(&h, d, sizeof(h), cudaMemcpyDeviceToHost), "D2H");
  cudaFree(d);
  return h;
}

// max |a - b| / max |b| over M (host side: M is small).
double RelativeError(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, scale = 0;
  for (size_t k = 0; k < b.size(); ++k) {
    diff = std::max(diff, std::fabs(static_cast<double>(a[k]) - b[k]));
    scale = std::max(scale, std::fabs(static_cast<double>(b[k])));
  }
  return scale > 0 ? diff / scale : diff;
}

Result RunDevice(const Problem& p) {
  Result r;
  r.bench = p.bench;
  const HashParams& hp = p.params;
  const int32_t features = static_cast<int32_t>(p.features);
  const int64_t n = p.rows * hp.output_dim;
  int64_t* ids = ToDevice(p.ids);
  int64_t* offsets = ToDevice(p.offsets);
  int64_t* cardinalities = ToDevice(p.cardinalities);
  unsigned long long* first_bad = DeviceAlloc<unsigned long long>(1);
  Check(gpu::LaunchFindFirstBadId(ids, cardinalities, features, p.rows, first_bad, 0), "id check kernel");
  unsigned long long bad = 0;
  Check(cudaMemcpy(&bad, first_bad, sizeof(bad), cudaMemcpyDeviceToHost), "D2H");
  if (bad != ~0ull) {
    r.first_bad_row = static_cast<int64_t>(bad);
    return r;
  }
  float* memory = p.bench ? DeviceAlloc<float>(hp.memory_size) : ToDevice(p.memory);
  float* grad = p.bench ? DeviceAlloc<float>(n) : ToDevice(p.grad);
  if (p.bench) {
    FillKernel<<<4096, 256>>>(memory, hp.memory_size, 1u);
    FillKernel<<<4096, 256>>>(grad, n, 2u);
    Check(cudaGetLastError(), "fill kernels");
  }
  std::vector<float*> embeddings(gpu::kNumKernelVariants), memory_grads(gpu::kNumKernelVariants);
  for (int v = 0; v < gpu::kNumKernelVariants; ++v) {
    embeddings[v] = DeviceAlloc<float>(n);
    memory_grads[v] = DeviceAlloc<float>(hp.memory_size);
  }
  float* sorted_grads[2] = {DeviceAlloc<float>(hp.memory_size), DeviceAlloc<float>(hp.memory_size)};
  const int64_t max_runs = gpu::MaxRuns(hp, n);
  int64_t* sparse_positions[2] = {DeviceAlloc<int64_t>(max_runs), DeviceAlloc<int64_t>(max_runs)};
  float* sparse_values[2] = {DeviceAlloc<float>(max_runs), DeviceAlloc<float>(max_runs)};
  int64_t* sparse_count = DeviceAlloc<int64_t>(2);
  size_t scratch_bytes = 0;
  Check(gpu::SortedGradientScratchBytes(hp, p.rows, &scratch_bytes), "sorted gradient scratch size");
  void* scratch = nullptr;
  Check(cudaMalloc(&scratch, std::max<size_t>(1, scratch_bytes)), "cudaMalloc scratch");

  std::string timings;
  char line[256];
  // The two-block variant exists to check the grid-stride path on small cases; a bench batch would take seconds.
  auto skipped = [&](int v) { return p.bench && v == static_cast<int>(gpu::KernelVariant::kWarpRowsTwoBlocks); };
  for (int v = 0; v < gpu::kNumKernelVariants; ++v) {
    if (skipped(v)) continue;
    const auto variant = static_cast<gpu::KernelVariant>(v);
    const float lookup_ms = MedianMs(p.repeats, [&] {
      Check(gpu::LaunchLookup(hp, ids, offsets, features, p.rows, memory, embeddings[v], 0, variant), "lookup");
    });
    const float scatter_ms = MedianMs(p.repeats, [&] {
      Check(gpu::LaunchScatter(hp, ids, offsets, features, p.rows, grad, memory_grads[v], 0, variant), "scatter");
    });
    std::snprintf(line, sizeof(line), " lookup_%s_ms=%.4f scatter_%s_ms=%.4f", gpu::KernelVariantName(variant),
                  lookup_ms, gpu::KernelVariantName(variant), scatter_ms);
    timings += line;
  }
  // The deterministic scatter and the sparse gradient, each run twice into separate outputs for the bit check.
  float sorted_ms = 0, sparse_ms = 0;
  for (int k = 0; k < 2; ++k) {
    const float ms = MedianMs(p.repeats, [&] {
      Check(gpu::LaunchSortedGradient(hp, ids, offsets, features, p.rows, grad, scratch, sorted_grads[k], nullptr,
                                      nullptr, nullptr, 0),
            "sorted scatter");
    });
    const float sparse = MedianMs(p.repeats, [&] {
      Check(gpu::LaunchSortedGradient(hp, ids, offsets, features, p.rows, grad, scratch, nullptr,
                                      sparse_positions[k], sparse_values[k], sparse_count + k, 0),
            "sparse gradient");
    });
    if (k == 0) sorted_ms = ms, sparse_ms = sparse;
  }
  std::snprintf(line, sizeof(line), " scatter_sorted_ms=%.4f sparse_sorted_ms=%.4f", sorted_ms, sparse_ms);
  timings += line;
  Check(cudaDeviceSynchronize(), "kernels");

  int64_t counts[2] = {0, 0};
  Check(cudaMemcpy(counts, sparse_count, sizeof(counts), cudaMemcpyDeviceToHost), "D2H");
  bool identical = counts[0] == counts[1] &&
                   CountMismatches(sorted_grads[0], sorted_grads[1], hp.memory_size) == 0 &&
                   CountMismatches(sparse_values[0], sparse_values[1], counts[0]) == 0 &&
                   CountMismatches(reinterpret_cast<const float*>(sparse_positions[0]),
                                   reinterpret_cast<const float*>(sparse_positions[1]), 2 * counts[0]) == 0;
  r.sorted_repeat_identical = identical ? 1 : 0;

  std::vector<float> sorted_host(hp.memory_size);
  ToHost(sorted_grads[0], &sorted_host);
  if (p.bench) {
    // Every lookup variant against the tiled kernel bit for bit; every atomic scatter against the sorted one.
    unsigned long long lookup_mismatches = 0;
    double scatter_error = 0;
    std::vector<float> host_grad(hp.memory_size);
    for (int v = 0; v < gpu::kNumKernelVariants; ++v) {
      if (skipped(v)) continue;
      if (v > 0) lookup_mismatches += CountMismatches(embeddings[v], embeddings[0], n);
      ToHost(memory_grads[v], &host_grad);
      scatter_error = std::max(scatter_error, RelativeError(host_grad, sorted_host));
    }
    std::snprintf(line, sizeof(line), " lookup_mismatches=%llu scatter_relative_error=%.3g sorted_identical=%d",
                  lookup_mismatches, scatter_error, identical ? 1 : 0);
    timings += line;
    if (lookup_mismatches != 0 || scatter_error > 1e-5 || !identical) r.first_bad_row = -2;  // reported as FAIL
  } else {
    r.positions.assign(n, 0);
    r.signs.assign(n, 0.0f);
    int64_t* positions = DeviceAlloc<int64_t>(n);
    float* signs = DeviceAlloc<float>(n);
    Check(gpu::LaunchPositions(hp, ids, offsets, features, p.rows, positions, signs, 0), "positions kernel");
    ToHost(positions, &r.positions);
    ToHost(signs, &r.signs);
    cudaFree(positions);
    cudaFree(signs);
    for (int v = 0; v < gpu::kNumKernelVariants; ++v) {
      r.embeddings.emplace_back(n);
      ToHost(embeddings[v], &r.embeddings.back());
      r.memory_grads.emplace_back(hp.memory_size);
      ToHost(memory_grads[v], &r.memory_grads.back());
    }
    r.sorted_memory_grad = sorted_host;
    r.sparse_positions.resize(counts[0]);
    r.sparse_values.resize(counts[0]);
    ToHost(sparse_positions[0], &r.sparse_positions);
    ToHost(sparse_values[0], &r.sparse_values);
    // The GPU's sums must have the bits of the host emulation (same code, same order): a stronger check than 1e-5.
    Result emulated;
    EmulateSortedGradient(p, &emulated);
    const bool equals_emulation =
        emulated.sparse_positions == r.sparse_positions &&
        std::memcmp(emulated.sparse_values.data(), r.sparse_values.data(), 4 * r.sparse_values.size()) == 0 &&
        std::memcmp(emulated.sorted_memory_grad.data(), sorted_host.data(), 4 * sorted_host.size()) == 0;
    if (!equals_emulation) r.sorted_repeat_identical = 0;
  }

  // The copy bandwidth on this GPU in this run: grad -> embeddings[0] (rows * D floats), read + write counted.
  float copy_ms = 0;
  if (n > 0) {
    copy_ms = MedianMs(p.repeats, [&] {
      Check(cudaMemcpyAsync(embeddings[0], grad, sizeof(float) * n, cudaMemcpyDeviceToDevice, 0), "D2D copy");
    });
  }
  int device = 0;
  cudaDeviceProp props;
  Check(cudaGetDevice(&device), "cudaGetDevice");
  Check(cudaGetDeviceProperties(&props, device), "cudaGetDeviceProperties");
  // Bytes as the harness has always counted them: ids + one float read and one written per element (the scatter
  // also zeroes M first). The DRAM-only view: what must cross DRAM when M stays in L2 (ids in + embeddings out;
  // ids + gradient in for the scatter).
  const double elements = static_cast<double>(n);
  const double lookup_bytes = 8.0 * p.rows + 8.0 * elements;
  const double scatter_bytes = 8.0 * p.rows + 12.0 * elements + 4.0 * hp.memory_size;
  const double dram_bytes = 8.0 * p.rows + 4.0 * elements;
  std::printf("mode=device gpu=\"%s\" rows=%lld D=%d Z=%d M=%lld%s lookup_bytes=%.0f scatter_bytes=%.0f "
              "dram_bytes=%.0f copy_ms=%.4f copy_gbs=%.1f\n",
              props.name, static_cast<long long>(p.rows), hp.output_dim, hp.chunk_size,
              static_cast<long long>(hp.memory_size), timings.c_str(), lookup_bytes, scatter_bytes, dram_bytes,
              copy_ms, copy_ms > 0 ? 8.0 * elements / copy_ms / 1e6 : 0.0);
  for (void* ptr : {static_cast<void*>(ids), static_cast<void*>(offsets), static_cast<void*>(cardinalities),
                    static_cast<void*>(first_bad), static_cast<void*>(memory), static_cast<void*>(grad),
                    static_cast<void*>(sorted_grads[0]), static_cast<void*>(sorted_grads[1]),
                    static_cast<void*>(sparse_positions[0]), static_cast<void*>(sparse_positions[1]),
                    static_cast<void*>(sparse_values[0]), static_cast<void*>(sparse_values[1]),
                    static_cast<void*>(sparse_count), scratch}) {
    cudaFree(ptr);
  }
  for (int v = 0; v < gpu::kNumKernelVariants; ++v) {
    cudaFree(embeddings[v]);
    cudaFree(memory_grads[v]);
  }
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// Bag problems.

struct BagProblem {
  tfcompress::robe::RobeBag bag;  // host pointers into the vectors below
  int64_t repeats = 1;
  bool weighted = false;
  std::vector<int64_t> ids, row_splits;
  std::vector<float> weights, memory, grad;
};

struct BagResult {
  int64_t first_bad_id = -1;
  std::vector<float> embeddings, memory_grad, weights_grad;
};

BagProblem ReadBagProblem(const char* path) {
  std::FILE* file = std::fopen(path, "rb");
  if (file == nullptr) Fail("cannot open the input file");
  int64_t h[20];
  if (std::fread(h, sizeof(int64_t), 20, file) != 20 || h[0] != kBagMagic) Fail("bad bag input header");
  const int64_t n = h[1], rows = h[2];
  if (n < 0 || rows < 0 || h[3] < 1 || h[4] < 1 || h[4] > h[3] || h[5] < h[4] || h[14] < 0 || h[14] > 2 ||
      h[16] < 0 || h[17] < 1) {
    Fail("bad bag sizes");
  }
  BagProblem p;
  p.repeats = std::max<int64_t>(1, h[13]);
  p.weighted = h[15] != 0;
  ReadVector(file, &p.ids, n);
  ReadVector(file, &p.row_splits, rows + 1);
  ReadVector(file, &p.weights, n);
  ReadVector(file, &p.memory, h[5]);
  ReadVector(file, &p.grad, rows * h[3]);
  std::fclose(file);
  if (p.row_splits[0] != 0 || p.row_splits[rows] != n) Fail("bad row_splits ends");
  for (int64_t b = 0; b < rows; ++b) {
    if (p.row_splits[b + 1] < p.row_splits[b]) Fail("row_splits not non-decreasing");
  }
  tfcompress::robe::RobeBag& bag = p.bag;
  bag.params = tfcompress::robe::MakeHashParams(h[7], h[8], h[9], h[10], h[11], h[12], h[5],
                                                static_cast<int32_t>(h[3]), static_cast<int32_t>(h[4]), h[6] != 0);
  bag.ids = p.ids.data();
  bag.row_splits = p.row_splits.data();
  bag.weights = p.weighted ? p.weights.data() : nullptr;
  bag.table_offset = h[16];
  bag.cardinality = h[17];
  bag.num_ids = n;
  bag.num_rows = rows;
  bag.combiner = static_cast<tfcompress::robe::Combiner>(h[14]);
  return p;
}

void WriteBagResult(const char* path, const BagResult& r) {
  std::FILE* file = std::fopen(path, "wb");
  if (file == nullptr) Fail("cannot open the output file");
  std::fwrite(&r.first_bad_id, sizeof(int64_t), 1, file);
  WriteVector(file, r.embeddings);
  WriteVector(file, r.memory_grad);
  WriteVector(file, r.weights_grad);
  std::fclose(file);
}

void AllocateBag(const BagProblem& p, BagResult* r) {
  r->embeddings.assign(p.bag.num_rows * p.bag.params.output_dim, 0.0f);
  r->memory_grad.assign(p.bag.params.memory_size, 0.0f);
  r->weights_grad.assign(p.bag.num_ids, 0.0f);
}

BagResult RunBagHost(const BagProblem& p) {
  BagResult r;
  const tfcompress::robe::RobeBag& bag = p.bag;
  for (int64_t k = 0; k < bag.num_ids; ++k) {
    if (static_cast<uint64_t>(bag.ids[k]) >= static_cast<uint64_t>(bag.cardinality)) {
      r.first_bad_id = k;
      return r;
    }
  }
  AllocateBag(p, &r);
  const int32_t d = bag.params.output_dim;
  std::vector<float> denominators(bag.num_rows);
  for (int64_t b = 0; b < bag.num_rows; ++b) {
    denominators[b] = gpu::BagRowDenominator(bag, b);
    for (int32_t i = 0; i < d; ++i) r.embeddings[b * d + i] = gpu::BagForwardElement(bag, p.memory.data(), b, i);
  }
  for (int64_t k = 0; k < bag.num_ids; ++k) {
    const int64_t b = gpu::BagRowOf(bag, k);
    const int64_t a = gpu::BagOffsetId(bag, k);
    for (int32_t i = 0; i < d; ++i) {
      const float value = gpu::BagIdGradOf(bag, p.grad.data(), denominators.data(), b, k, i);
      r.memory_grad[tfcompress::robe::IndexOf(bag.params, a, i)] +=
          bag.params.is_signed ? value * tfcompress::robe::SignOf(bag.params, a, i) : value;
    }
    if (p.weighted) {
      r.weights_grad[k] = gpu::BagWeightGradOf(bag, p.memory.data(), p.grad.data(), r.embeddings.data(),
                                               denominators[b], b, k);
    }
  }
  std::printf("mode=host bag ids=%lld rows=%lld\n", static_cast<long long>(bag.num_ids),
              static_cast<long long>(bag.num_rows));
  return r;
}

BagResult RunBagDevice(const BagProblem& p) {
  BagResult r;
  tfcompress::robe::RobeBag bag = p.bag;  // its pointers are replaced by device copies
  int64_t* ids = ToDevice(p.ids);
  int64_t* row_splits = ToDevice(p.row_splits);
  float* weights = ToDevice(p.weights);
  unsigned long long* first_bad = nullptr;
  Check(cudaMalloc(&first_bad, sizeof(unsigned long long)), "cudaMalloc");
  Check(gpu::LaunchBagFindFirstBadId(ids, bag.num_ids, bag.cardinality, first_bad, 0), "bag id check kernel");
  unsigned long long bad = 0;
  Check(cudaMemcpy(&bad, first_bad, sizeof(bad), cudaMemcpyDeviceToHost), "D2H");
  if (bad != ~0ull) {
    r.first_bad_id = static_cast<int64_t>(bad);
    return r;
  }
  AllocateBag(p, &r);
  bag.ids = ids;
  bag.row_splits = row_splits;
  bag.weights = p.weighted ? weights : nullptr;
  float* memory = ToDevice(p.memory);
  float* grad = ToDevice(p.grad);
  float* embeddings = ToDevice(r.embeddings);
  float* memory_grad = ToDevice(r.memory_grad);
  float* weights_grad = ToDevice(r.weights_grad);
  float* denominators = ToDevice(std::vector<float>(bag.num_rows));
  const float forward_ms = MedianMs(p.repeats, [&] {
    Check(gpu::LaunchBagForward(bag, memory, embeddings, 0), "bag forward kernel");
  });
  const float backward_ms = MedianMs(p.repeats, [&] {
    Check(gpu::LaunchBagRowDenominators(bag, denominators, 0), "bag denominators kernel");
    Check(gpu::LaunchBagScatter(bag, grad, denominators, memory_grad, 0), "bag scatter kernel");
    if (p.weighted) {
      Check(gpu::LaunchBagWeightsGrad(bag, memory, grad, embeddings, denominators, weights_grad, 0),
            "bag weights gradient kernel");
    }
  });
  Check(cudaDeviceSynchronize(), "kernels");
  ToHost(embeddings, &r.embeddings);
  ToHost(memory_grad, &r.memory_grad);
  ToHost(weights_grad, &r.weights_grad);
  std::printf("mode=device bag ids=%lld rows=%lld forward_ms=%.4f backward_ms=%.4f\n",
              static_cast<long long>(bag.num_ids), static_cast<long long>(bag.num_rows), forward_ms, backward_ms);
  for (void* ptr : {static_cast<void*>(ids), static_cast<void*>(row_splits), static_cast<void*>(weights),
                    static_cast<void*>(first_bad), static_cast<void*>(memory), static_cast<void*>(grad),
                    static_cast<void*>(embeddings), static_cast<void*>(memory_grad),
                    static_cast<void*>(weights_grad), static_cast<void*>(denominators)}) {
    cudaFree(ptr);
  }
  return r;
}

int64_t PeekMagic(const char* path) {
  std::FILE* file = std::fopen(path, "rb");
  if (file == nullptr) Fail("cannot open the input file");
  int64_t magic = 0;
  if (std::fread(&magic, sizeof(int64_t), 1, file) != 1) Fail("empty input");
  std::fclose(file);
  return magic;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 || (std::strcmp(argv[1], "host") != 0 && std::strcmp(argv[1], "device") != 0)) {
    std::fprintf(stderr, "usage: %s host|device INPUT OUTPUT\n", argv[0]);
    return 1;
  }
  const bool host = std::strcmp(argv[1], "host") == 0;
  if (PeekMagic(argv[2]) == kBagMagic) {
    const BagProblem problem = ReadBagProblem(argv[2]);
    WriteBagResult(argv[3], host ? RunBagHost(problem) : RunBagDevice(problem));
    return 0;
  }
  const Problem problem = ReadProblem(argv[2]);
  if (host && problem.bench) Fail("bench inputs need the device mode");
  const Result result = host ? RunHost(problem) : RunDevice(problem);
  WriteResult(argv[3], result);
  return 0;
}
