// Standalone check of the ROBE-Z CUDA kernels (../robe_gpu_kernels.cu.h) without TensorFlow.
//
//   robe_harness host|device INPUT OUTPUT
//
// INPUT (written by run_harness.py, little-endian):
//   int64 header[16] = {magic 0x524f42455a, rows, F, D, Z, M, signed, R1, R2, R3, S1, S2, S3, repeats, 0, 0}
//   int64 cardinalities[F], int64 offsets[F], int64 ids[rows], float memory[M], float grad[rows * D]
// OUTPUT:
//   int64 first_bad_row (-1 when all ids are valid), int64 positions[rows * D], float signs[rows * D],
//   float embeddings[rows * D], float memory_grad[M]
// stdout: one line of key=value timings (device mode: medians over `repeats` of the lookup and the scatter, with
// the bytes each moves and the GPU's peak memory bandwidth).
//
// "host" runs the same robe_hash.h arithmetic on the CPU (so the file format and the header are checkable on a
// machine without a GPU); "device" runs the CUDA kernels. When an id is invalid only first_bad_row is meaningful.
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
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../robe_bag_gpu_kernels.cu.h"
#include "../robe_gpu_kernels.cu.h"

namespace {

using tfcompress::robe::HashParams;

constexpr int64_t kMagic = 0x524f42455a;
constexpr int64_t kBagMagic = 0x524f4245424147;

struct Problem {
  HashParams params;
  int64_t rows = 0, features = 0, repeats = 1;
  std::vector<int64_t> cardinalities, offsets, ids;
  std::vector<float> memory, grad;
};

struct Result {
  int64_t first_bad_row = -1;
  std::vector<int64_t> positions;
  std::vector<float> signs, embeddings, memory_grad;
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
  ReadVector(file, &p.cardinalities, p.features);
  ReadVector(file, &p.offsets, p.features);
  ReadVector(file, &p.ids, p.rows);
  ReadVector(file, &p.memory, h[5]);
  ReadVector(file, &p.grad, p.rows * h[3]);
  std::fclose(file);
  return p;
}

void WriteResult(const char* path, const Result& r) {
  std::FILE* file = std::fopen(path, "wb");
  if (file == nullptr) Fail("cannot open the output file");
  std::fwrite(&r.first_bad_row, sizeof(int64_t), 1, file);
  WriteVector(file, r.positions);
  WriteVector(file, r.signs);
  WriteVector(file, r.embeddings);
  WriteVector(file, r.memory_grad);
  std::fclose(file);
}

void Allocate(const Problem& p, Result* r) {
  const int64_t elements = p.rows * p.params.output_dim;
  r->positions.assign(elements, 0);
  r->signs.assign(elements, 0.0f);
  r->embeddings.assign(elements, 0.0f);
  r->memory_grad.assign(p.params.memory_size, 0.0f);
}

// The reference-free CPU run of the shared arithmetic (the Python script compares it with NumPy).
Result RunHost(const Problem& p) {
  Result r;
  for (int64_t row = 0; row < p.rows; ++row) {
    const int64_t f = row % p.features;
    if (static_cast<uint64_t>(p.ids[row]) >= static_cast<uint64_t>(p.cardinalities[f])) {
      r.first_bad_row = row;
      return r;
    }
  }
  Allocate(p, &r);
  const HashParams& hp = p.params;
  for (int64_t row = 0; row < p.rows; ++row) {
    const int64_t a = p.ids[row] + p.offsets[row % p.features];
    for (int32_t i = 0; i < hp.output_dim; ++i) {
      const int64_t e = row * hp.output_dim + i;
      r.positions[e] = tfcompress::robe::IndexOf(hp, a, i);
      r.signs[e] = hp.is_signed ? tfcompress::robe::SignOf(hp, a, i) : 1.0f;
      r.embeddings[e] = r.signs[e] * p.memory[r.positions[e]];
      r.memory_grad[r.positions[e]] += r.signs[e] * p.grad[e];
    }
  }
  std::printf("mode=host rows=%lld\n", static_cast<long long>(p.rows));
  return r;
}

template <typename T>
T* ToDevice(const std::vector<T>& host) {
  T* device = nullptr;
  Check(cudaMalloc(&device, std::max<size_t>(1, host.size()) * sizeof(T)), "cudaMalloc");
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
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

Result RunDevice(const Problem& p) {
  Result r;
  const HashParams& hp = p.params;
  const int32_t features = static_cast<int32_t>(p.features);
  int64_t* ids = ToDevice(p.ids);
  int64_t* offsets = ToDevice(p.offsets);
  int64_t* cardinalities = ToDevice(p.cardinalities);
  unsigned long long* first_bad = nullptr;
  Check(cudaMalloc(&first_bad, sizeof(unsigned long long)), "cudaMalloc");
  Check(tfcompress::robe::gpu::LaunchFindFirstBadId(ids, cardinalities, features, p.rows, first_bad, 0),
        "id check kernel");
  unsigned long long bad = 0;
  Check(cudaMemcpy(&bad, first_bad, sizeof(bad), cudaMemcpyDeviceToHost), "D2H");
  if (bad != ~0ull) {
    r.first_bad_row = static_cast<int64_t>(bad);
    return r;
  }
  Allocate(p, &r);
  float* memory = ToDevice(p.memory);
  float* grad = ToDevice(p.grad);
  float* embeddings = ToDevice(r.embeddings);
  float* memory_grad = ToDevice(r.memory_grad);
  int64_t* positions = ToDevice(r.positions);
  float* signs = ToDevice(r.signs);

  Check(tfcompress::robe::gpu::LaunchPositions(hp, ids, offsets, features, p.rows, positions, signs, 0),
        "positions kernel");
  const float lookup_ms = MedianMs(p.repeats, [&] {
    Check(tfcompress::robe::gpu::LaunchLookup(hp, ids, offsets, features, p.rows, memory, embeddings, 0),
          "lookup kernel");
  });
  const float scatter_ms = MedianMs(p.repeats, [&] {
    Check(tfcompress::robe::gpu::LaunchScatter(hp, ids, offsets, features, p.rows, grad, memory_grad, 0),
          "scatter kernel");
  });
  Check(cudaDeviceSynchronize(), "kernels");
  ToHost(positions, &r.positions);
  ToHost(signs, &r.signs);
  ToHost(embeddings, &r.embeddings);
  ToHost(memory_grad, &r.memory_grad);

  int device = 0, clock_khz = 0, bus_bits = 0;
  cudaDeviceProp props;
  Check(cudaGetDevice(&device), "cudaGetDevice");
  Check(cudaGetDeviceProperties(&props, device), "cudaGetDeviceProperties");
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device);
  cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device);
  // Bytes each kernel must move at least: ids + one float read and one written per element (the scatter also
  // zeroes M first and reads-modifies-writes it).
  const double elements = static_cast<double>(p.rows) * hp.output_dim;
  const double lookup_bytes = 8.0 * p.rows + 8.0 * elements;
  const double scatter_bytes = 8.0 * p.rows + 12.0 * elements + 4.0 * hp.memory_size;
  std::printf(
      "mode=device gpu=\"%s\" rows=%lld lookup_ms=%.4f scatter_ms=%.4f lookup_bytes=%.0f scatter_bytes=%.0f "
      "lookup_gbs=%.1f scatter_gbs=%.1f peak_gbs=%.1f lookups_per_s=%.4g\n",
      props.name, static_cast<long long>(p.rows), lookup_ms, scatter_ms, lookup_bytes, scatter_bytes,
      lookup_bytes / lookup_ms / 1e6, scatter_bytes / scatter_ms / 1e6, 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9,
      p.rows / (lookup_ms / 1e3));
  for (void* ptr : {static_cast<void*>(ids), static_cast<void*>(offsets), static_cast<void*>(cardinalities),
                    static_cast<void*>(first_bad), static_cast<void*>(memory), static_cast<void*>(grad),
                    static_cast<void*>(embeddings), static_cast<void*>(memory_grad), static_cast<void*>(positions),
                    static_cast<void*>(signs)}) {
    cudaFree(ptr);
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

namespace gpu = tfcompress::robe::gpu;

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
  const Result result = std::strcmp(argv[1], "host") == 0 ? RunHost(problem) : RunDevice(problem);
  WriteResult(argv[3], result);
  return 0;
}
