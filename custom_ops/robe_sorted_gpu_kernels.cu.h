// Sort-based ROBE-Z gradients on the GPU, free of TensorFlow (the harness runs them; the TF ops do not use them
// yet): a deterministic dense scatter and the sparse gradient (sorted unique positions + summed values), the GPU
// form of the CPU op RobeLookupSparseGrad (robe_cpu_functors.cc).
//
// Pipeline, for the n = rows * D gradient elements:
//   1. RobeSortInputsKernel: key = position idx(a_r, i), value = (element e << 1) | sign bit (SortInputOf).
//   2. cub::DeviceRadixSort::SortPairs over the bits the largest position needs. LSD radix sort is stable, so the
//      elements of one position stay in element order: the sorted arrays are a function of the input alone.
//   3. cub::DeviceRunLengthEncode::Encode (unique positions, run lengths) and cub::DeviceScan::ExclusiveSum (run
//      starts): integer results, so also exact.
//   4. RobeSegmentSumKernel (SegmentSumsWork): a warp per unique position, lane l adds elements l, l + 32, ... of the run in order,
//      then a fixed butterfly of __shfl_xor_sync. The summation order depends only on the run's length, never on
//      timing, so two runs give the same bits (unlike atomics, and unlike CUB's float scans, whose decoupled
//      look-back may combine tiles in either order).
// Dense form: M-grad zeroed, then one plain store per unique position. Sparse form: the run's position and sum.
// The harness's host mode runs steps 1 and 4 through the same functions (SortInputOf, LanePartialSum, and the
// butterfly on an array) with std::stable_sort and loops standing in for the CUB steps, so its result has the bits
// the GPU must produce.
//
// Cost: the sort moves (key + value) * 2 per pass over n elements; sorting chunk occurrences instead (rows * D / Z
// keys) and merging their intervals as the CPU op does would cut that by Z, and is the next step if the bench shows
// the sort dominating.

#ifndef TFCOMPRESS_CUSTOM_OPS_ROBE_SORTED_GPU_KERNELS_CU_H_
#define TFCOMPRESS_CUSTOM_OPS_ROBE_SORTED_GPU_KERNELS_CU_H_

#include <cuda_runtime.h>

#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>

#include "robe_gpu_kernels.cu.h"
#include "robe_hash.h"

namespace tfcompress {
namespace robe {
namespace gpu {

// Keys (positions) and packed values (element << 1 | sign bit) are uint32 when both fit, else uint64.
inline bool SortFitsUint32(const HashParams& p, int64_t rows) {
  const int64_t largest_position = (p.memory_size - p.chunk_size < kPrime - 1 ? p.memory_size - p.chunk_size
                                                                               : kPrime - 1) +
                                   p.chunk_size - 1;
  return largest_position < (int64_t{1} << 32) && rows * p.output_dim < (int64_t{1} << 31);
}

inline int PositionBits(const HashParams& p) {
  const int64_t largest = (p.memory_size - p.chunk_size < kPrime - 1 ? p.memory_size - p.chunk_size : kPrime - 1) +
                          p.chunk_size - 1;
  int bits = 1;
  while (bits < 63 && (largest >> bits) != 0) ++bits;
  return bits;
}

// Sort input of element e: key = idx(a_r, i), value = (e << 1) | (sign(a_r, i) == -1).
template <typename Index>
ROBE_HOST_DEVICE void SortInputOf(const HashParams& p, const int64_t* ids, const int64_t* offsets,
                                  int32_t num_features, int64_t e, Index* key, Index* value) {
  const int64_t r = e / p.output_dim;
  const int32_t i = static_cast<int32_t>(e - r * p.output_dim);
  const int64_t a = ids[r] + offsets[r % num_features];
  *key = static_cast<Index>(IndexOf(p, a, i));
  const Index negative = p.is_signed && SignOf(p, a, i) < 0.0f ? 1 : 0;
  *value = (static_cast<Index>(e) << 1) | negative;
}

template <typename Index>
__global__ void RobeSortInputsKernel(HashParams p, const int64_t* ids, const int64_t* offsets, int32_t num_features,
                                     int64_t rows, Index* keys, Index* values) {
  const int64_t total = rows * p.output_dim;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    SortInputOf(p, ids, offsets, num_features, e, keys + e, values + e);
  }
}

// The warp shuffle of the segment sums on the GPU (the harness's CPU emulation has its own, like DeviceLane).
struct DeviceSumLane {
#if defined(__CUDACC__)
  __device__ __forceinline__ float ShuffleXor(float value, int32_t mask) const {
    return __shfl_xor_sync(0xffffffffu, value, mask);
  }
  __device__ __forceinline__ float LoadGrad(const float* p) const { return __ldg(p); }
#endif
};

// Lane `lane`'s share of one run [begin, end) of the sorted values: elements lane, lane + 32, ... in order.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Index, class Lane>
ROBE_HOST_DEVICE float LanePartialSum(const Lane& io, const Index* sorted_values, const float* grad, int64_t begin,
                                      int64_t end, int32_t lane) {
  float sum = 0.0f;
  for (int64_t j = begin + lane; j < end; j += 32) {
    const Index packed = sorted_values[j];
    const float g = io.LoadGrad(grad + static_cast<int64_t>(packed >> 1));
    sum += (packed & 1) ? -g : g;
  }
  return sum;
}

// Warp `warp_index` of `warps`, lane `lane`: for each run k < runs it owns, the sum of sign * grad[e] over the
// run's elements: LanePartialSum, then the butterfly sum += shfl_xor(sum, 16, 8, 4, 2, 1), an order that depends
// only on the run's length. dense != nullptr: dense[unique[k]] = sum (dense zeroed before). sparse_* != nullptr:
// sparse_positions[k] = unique[k], sparse_values[k] = sum. (The harness's emulation runs LanePartialSum for the 32
// lanes and the same butterfly on an array.)
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Index, class Lane>
ROBE_HOST_DEVICE void SegmentSumsWork(const Lane& io, const Index* unique, const Index* run_lengths,
                                      const Index* run_starts, int64_t runs, const Index* sorted_values,
                                      const float* grad, float* dense, int64_t* sparse_positions,
                                      float* sparse_values, int32_t lane, int64_t warp_index, int64_t warps) {
  for (int64_t k = warp_index; k < runs; k += warps) {
    const int64_t begin = static_cast<int64_t>(run_starts[k]);
    float sum = LanePartialSum(io, sorted_values, grad, begin, begin + static_cast<int64_t>(run_lengths[k]), lane);
#pragma unroll
    for (int32_t mask = 16; mask >= 1; mask /= 2) sum += io.ShuffleXor(sum, mask);
    if (lane == 0) {
      const int64_t position = static_cast<int64_t>(unique[k]);
      if (dense != nullptr) dense[position] = sum;
      if (sparse_positions != nullptr) {
        sparse_positions[k] = position;
        sparse_values[k] = sum;
      }
    }
  }
}

template <typename Index>
__global__ void RobeSegmentSumKernel(const Index* unique, const Index* run_lengths, const Index* run_starts,
                                     const Index* num_runs, const Index* sorted_values, const float* grad,
                                     float* dense, int64_t* sparse_positions, float* sparse_values) {
  SegmentSumsWork<Index>(DeviceSumLane(), unique, run_lengths, run_starts, static_cast<int64_t>(*num_runs),
                         sorted_values, grad, dense, sparse_positions, sparse_values,
                         static_cast<int32_t>(threadIdx.x & 31),
                         static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32,
                         static_cast<int64_t>(gridDim.x) * (blockDim.x / 32));
}

__global__ void WidenCountKernel(const uint32_t* count, int64_t* wide) { *wide = static_cast<int64_t>(*count); }

// Device scratch of the sorted gradients, carved from one allocation.
// Unique positions are at most min(n, |M|): the run arrays need no more.
inline int64_t MaxRuns(const HashParams& p, int64_t n) { return n < p.memory_size ? n : p.memory_size; }

template <typename Index>
struct SortedScratch {
  Index* keys_in;
  Index* keys_out;
  Index* values_in;
  Index* values_out;
  Index* unique;
  Index* run_lengths;
  Index* run_starts;
  Index* num_runs;
  void* cub_temp;
  size_t cub_temp_bytes;
};

inline size_t AlignUp(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Bytes of scratch for n elements (the CUB temporaries queried for this n), or 0 with an error.
template <typename Index>
cudaError_t SortedScratchBytesAs(int64_t n, int64_t max_runs, int position_bits, size_t* bytes, size_t* cub_bytes) {
  size_t sort_bytes = 0, encode_bytes = 0, scan_bytes = 0;
  cudaError_t status = cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const Index*>(nullptr),
                                                       static_cast<Index*>(nullptr), static_cast<const Index*>(nullptr),
                                                       static_cast<Index*>(nullptr), n, 0, position_bits);
  if (status != cudaSuccess) return status;
  status = cub::DeviceRunLengthEncode::Encode(nullptr, encode_bytes, static_cast<const Index*>(nullptr),
                                              static_cast<Index*>(nullptr), static_cast<Index*>(nullptr),
                                              static_cast<Index*>(nullptr), n);
  if (status != cudaSuccess) return status;
  status = cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const Index*>(nullptr),
                                         static_cast<Index*>(nullptr), max_runs);
  if (status != cudaSuccess) return status;
  size_t cub = sort_bytes;
  if (encode_bytes > cub) cub = encode_bytes;
  if (scan_bytes > cub) cub = scan_bytes;
  *cub_bytes = cub;
  *bytes = 4 * AlignUp(sizeof(Index) * static_cast<size_t>(n > 0 ? n : 1)) +
           3 * AlignUp(sizeof(Index) * static_cast<size_t>(max_runs > 0 ? max_runs : 1)) + AlignUp(sizeof(Index)) +
           AlignUp(cub);
  return cudaSuccess;
}

template <typename Index>
SortedScratch<Index> CarveScratch(void* scratch, int64_t n, int64_t max_runs, size_t cub_bytes) {
  char* at = static_cast<char*>(scratch);
  const size_t array = AlignUp(sizeof(Index) * static_cast<size_t>(n > 0 ? n : 1));
  const size_t run_array = AlignUp(sizeof(Index) * static_cast<size_t>(max_runs > 0 ? max_runs : 1));
  SortedScratch<Index> s;
  Index** arrays[] = {&s.keys_in, &s.keys_out, &s.values_in, &s.values_out};
  for (Index** a : arrays) {
    *a = reinterpret_cast<Index*>(at);
    at += array;
  }
  Index** run_arrays[] = {&s.unique, &s.run_lengths, &s.run_starts};
  for (Index** a : run_arrays) {
    *a = reinterpret_cast<Index*>(at);
    at += run_array;
  }
  s.num_runs = reinterpret_cast<Index*>(at);
  at += AlignUp(sizeof(Index));
  s.cub_temp = at;
  s.cub_temp_bytes = cub_bytes;
  return s;
}

// The scratch size LaunchSortedGradient needs for this call.
inline cudaError_t SortedGradientScratchBytes(const HashParams& p, int64_t rows, size_t* bytes) {
  size_t cub_bytes = 0;
  const int64_t n = rows * p.output_dim;
  const int64_t runs = MaxRuns(p, n);
  return SortFitsUint32(p, rows) ? SortedScratchBytesAs<uint32_t>(n, runs, PositionBits(p), bytes, &cub_bytes)
                                 : SortedScratchBytesAs<uint64_t>(n, runs, PositionBits(p), bytes, &cub_bytes);
}

template <typename Index>
cudaError_t LaunchSortedGradientAs(const HashParams& p, const int64_t* ids, const int64_t* offsets,
                                   int32_t num_features, int64_t rows, const float* grad, void* scratch,
                                   float* dense, int64_t* sparse_positions, float* sparse_values,
                                   int64_t* sparse_count, cudaStream_t stream) {
  const int64_t n = rows * p.output_dim;
  const int bits = PositionBits(p);
  const int64_t max_runs = MaxRuns(p, n);
  size_t bytes = 0, cub_bytes = 0;
  cudaError_t status = SortedScratchBytesAs<Index>(n, max_runs, bits, &bytes, &cub_bytes);
  if (status != cudaSuccess) return status;
  SortedScratch<Index> s = CarveScratch<Index>(scratch, n, max_runs, cub_bytes);
  if (dense != nullptr) {
    status = cudaMemsetAsync(dense, 0, sizeof(float) * p.memory_size, stream);
    if (status != cudaSuccess) return status;
  }
  status = cudaMemsetAsync(s.num_runs, 0, sizeof(Index), stream);
  if (status != cudaSuccess) return status;
  if (n > 0) {
    RobeSortInputsKernel<Index><<<GridSize(n, 65535), kThreadsPerBlock, 0, stream>>>(
        p, ids, offsets, num_features, rows, s.keys_in, s.values_in);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    size_t temp = s.cub_temp_bytes;
    status = cub::DeviceRadixSort::SortPairs(s.cub_temp, temp, s.keys_in, s.keys_out, s.values_in, s.values_out, n,
                                             0, bits, stream);
    if (status != cudaSuccess) return status;
    temp = s.cub_temp_bytes;
    status = cub::DeviceRunLengthEncode::Encode(s.cub_temp, temp, s.keys_out, s.unique, s.run_lengths, s.num_runs,
                                                n, stream);
    if (status != cudaSuccess) return status;
    temp = s.cub_temp_bytes;
    status = cub::DeviceScan::ExclusiveSum(s.cub_temp, temp, s.run_lengths, s.run_starts, max_runs, stream);
    if (status != cudaSuccess) return status;
    // Enough warps to cover every run of a typical batch in one step; the kernel strides over the rest.
    RobeSegmentSumKernel<Index><<<GridSize(n, 8192), kThreadsPerBlock, 0, stream>>>(
        s.unique, s.run_lengths, s.run_starts, s.num_runs, s.values_out, grad, dense, sparse_positions,
        sparse_values);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  if (sparse_count != nullptr) {
    if (sizeof(Index) == sizeof(int64_t)) {
      return cudaMemcpyAsync(sparse_count, s.num_runs, sizeof(int64_t), cudaMemcpyDeviceToDevice, stream);
    }
    // Widen the uint32 count on the device (no host round trip).
    WidenCountKernel<<<1, 1, 0, stream>>>(reinterpret_cast<const uint32_t*>(s.num_runs), sparse_count);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

// Deterministic dense scatter (dense = M-grad [|M|]) and/or sparse gradient (sparse_positions / sparse_values with
// room for MaxRuns = min(rows * D, |M|) entries, *sparse_count = the number of unique positions, on the device). `scratch` holds
// SortedGradientScratchBytes bytes. Pass nullptr for the outputs not wanted.
inline cudaError_t LaunchSortedGradient(const HashParams& p, const int64_t* ids, const int64_t* offsets,
                                        int32_t num_features, int64_t rows, const float* grad, void* scratch,
                                        float* dense, int64_t* sparse_positions, float* sparse_values,
                                        int64_t* sparse_count, cudaStream_t stream) {
  return SortFitsUint32(p, rows)
             ? LaunchSortedGradientAs<uint32_t>(p, ids, offsets, num_features, rows, grad, scratch, dense,
                                                sparse_positions, sparse_values, sparse_count, stream)
             : LaunchSortedGradientAs<uint64_t>(p, ids, offsets, num_features, rows, grad, scratch, dense,
                                                sparse_positions, sparse_values, sparse_count, stream);
}

}  // namespace gpu
}  // namespace robe
}  // namespace tfcompress

#endif  // TFCOMPRESS_CUSTOM_OPS_ROBE_SORTED_GPU_KERNELS_CU_H_
