// CUDA kernels of the pooled (bag) ROBE-Z op, free of TensorFlow like robe_gpu_kernels.cu.h, so that two builds
// share them: robe_bag_kernels.cu.cc (the GPU functors of the op library) and cuda_harness/robe_harness.cu
// (standalone, against NumPy).
//
// The per-element arithmetic is written once as ROBE_HOST_DEVICE functions (BagForwardElement, BagRowDenominator,
// BagWeightGradOf); the kernels call them one thread per output element / id, and the harness's host mode calls
// the same functions in plain loops, so a machine without a GPU still checks everything but the launch.
//
// Layout: the forward gives each thread one element (b, i) of the output, consecutive threads on consecutive
// elements of a row; a thread walks its row's ids in id order (k ascending), so the forward's sums are in the same
// order as the CPU kernel's and equal it bit for bit. The Z threads of a chunk read one contiguous run of M, and
// every thread of a row reads the same ids[k] (one broadcast load). The memory gradient gives each thread one
// element (k, i) of the expanded per-id gradient and adds it with atomicAdd (not bitwise deterministic, as the
// per-element scatter); the weights gradient gives each thread one id.

#ifndef TFCOMPRESS_CUSTOM_OPS_ROBE_BAG_GPU_KERNELS_CU_H_
#define TFCOMPRESS_CUSTOM_OPS_ROBE_BAG_GPU_KERNELS_CU_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "robe_bag_functor.h"
#include "robe_hash.h"

namespace tfcompress {
namespace robe {
namespace gpu {

constexpr int kBagThreadsPerBlock = 256;

// a = id + table_offset in unsigned arithmetic (ids are validated before any kernel runs).
ROBE_HOST_DEVICE int64_t BagOffsetId(const RobeBag& bag, int64_t k) {
  return static_cast<int64_t>(static_cast<uint64_t>(bag.ids[k]) + static_cast<uint64_t>(bag.table_offset));
}

// a * b rounded once, never fused into an add: nvcc contracts a * b + c into one FMA by default, which would round
// the weighted terms differently from the CPU kernel (whose g++ build has no FMA).
ROBE_HOST_DEVICE float BagProduct(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// sign * M[idx(a, i)] for id k: element i of the ROBE-Z row of ids[k].
ROBE_HOST_DEVICE float BagElementOf(const RobeBag& bag, const float* memory, int64_t k, int32_t i) {
  const HashParams& p = bag.params;
  const int64_t a = BagOffsetId(bag, k);
  const float value = memory[IndexOf(p, a, i)];
  return p.is_signed ? value * SignOf(p, a, i) : value;
}

// The combiner's denominator of row b, its weight sums accumulated in id order as the CPU kernel does; 0 = zeros.
ROBE_HOST_DEVICE float BagRowDenominator(const RobeBag& bag, int64_t b) {
  if (bag.combiner == Combiner::kSum) return 1.0f;
  float sum_w = 0.0f, sum_w2 = 0.0f;
  for (int64_t k = bag.row_splits[b]; k < bag.row_splits[b + 1]; ++k) {
    const float w = bag.weights == nullptr ? 1.0f : bag.weights[k];
    sum_w += w;
    sum_w2 += bag.weights == nullptr ? 1.0f : BagProduct(w, w);
  }
  return BagDenominator(bag.combiner, sum_w, sum_w2);
}

// Output element (b, i): sum over the row's ids, in id order, of w_k * e_k[i], then divided by the denominator.
ROBE_HOST_DEVICE float BagForwardElement(const RobeBag& bag, const float* memory, int64_t b, int32_t i) {
  float sum = 0.0f;
  for (int64_t k = bag.row_splits[b]; k < bag.row_splits[b + 1]; ++k) {
    const float e = BagElementOf(bag, memory, k, i);
    sum += bag.weights == nullptr ? e : BagProduct(e, bag.weights[k]);
  }
  if (bag.combiner == Combiner::kSum) return sum;
  const float denominator = BagRowDenominator(bag, b);
  return denominator == 0.0f ? 0.0f : sum / denominator;
}

// The row holding id k: the last b with row_splits[b] <= k (binary search over the validated splits).
ROBE_HOST_DEVICE int64_t BagRowOf(const RobeBag& bag, int64_t k) {
  int64_t lo = 0, hi = bag.num_rows;  // invariant: row_splits[lo] <= k < row_splits[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (bag.row_splits[mid] <= k) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Element i of id k's gradient before the sign: (grad[b, i] / denominator_b) * w_k (0 where the denominator is 0).
ROBE_HOST_DEVICE float BagIdGradOf(const RobeBag& bag, const float* grad, const float* row_denominators, int64_t b,
                                   int64_t k, int32_t i) {
  const float g = grad[b * bag.params.output_dim + i];
  float scaled = g;
  if (bag.combiner != Combiner::kSum) scaled = row_denominators[b] == 0.0f ? 0.0f : g / row_denominators[b];
  return bag.weights == nullptr ? scaled : scaled * bag.weights[k];
}

// d loss / d w_k given grad [B, D], the forward output [B, D] and the row's denominator.
ROBE_HOST_DEVICE float BagWeightGradOf(const RobeBag& bag, const float* memory, const float* grad,
                                       const float* embeddings, float denominator, int64_t b, int64_t k) {
  const int32_t d = bag.params.output_dim;
  float g_dot_e = 0.0f, g_dot_out = 0.0f;
  for (int32_t i = 0; i < d; ++i) {
    g_dot_e += grad[b * d + i] * BagElementOf(bag, memory, k, i);
    g_dot_out += grad[b * d + i] * embeddings[b * d + i];
  }
  if (bag.combiner == Combiner::kSum) return g_dot_e;
  if (denominator == 0.0f) return 0.0f;
  if (bag.combiner == Combiner::kMean) return (g_dot_e - g_dot_out) / denominator;
  return (g_dot_e - g_dot_out * bag.weights[k] / denominator) / denominator;
}

#if defined(__CUDACC__)

__global__ void BagForwardKernel(RobeBag bag, const float* __restrict__ memory, float* __restrict__ embeddings) {
  const int64_t total = bag.num_rows * bag.params.output_dim;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / bag.params.output_dim;
    embeddings[e] = BagForwardElement(bag, memory, b, static_cast<int32_t>(e - b * bag.params.output_dim));
  }
}

__global__ void BagRowDenominatorKernel(RobeBag bag, float* row_denominators) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < bag.num_rows;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    row_denominators[b] = BagRowDenominator(bag, b);
  }
}

__global__ void BagScatterKernel(RobeBag bag, const float* __restrict__ grad, const float* row_denominators,
                                 float* __restrict__ memory_grad) {
  const HashParams& p = bag.params;
  const int64_t total = bag.num_ids * p.output_dim;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = e / p.output_dim;
    const int32_t i = static_cast<int32_t>(e - k * p.output_dim);
    const int64_t a = BagOffsetId(bag, k);
    const float value = BagIdGradOf(bag, grad, row_denominators, BagRowOf(bag, k), k, i);
    atomicAdd(memory_grad + IndexOf(p, a, i), p.is_signed ? value * SignOf(p, a, i) : value);
  }
}

__global__ void BagWeightsGradKernel(RobeBag bag, const float* __restrict__ memory, const float* __restrict__ grad,
                                     const float* __restrict__ embeddings, const float* row_denominators,
                                     float* __restrict__ weights_grad) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < bag.num_ids;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = BagRowOf(bag, k);
    weights_grad[k] = BagWeightGradOf(bag, memory, grad, embeddings, row_denominators[b], b, k);
  }
}

// Smallest k with ids[k] outside [0, cardinality); *first_bad starts at ~0ull.
__global__ void BagFindFirstBadIdKernel(const int64_t* ids, int64_t num_ids, int64_t cardinality,
                                        unsigned long long* first_bad) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < num_ids;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (static_cast<uint64_t>(ids[k]) >= static_cast<uint64_t>(cardinality)) {
      atomicMin(first_bad, static_cast<unsigned long long>(k));
    }
  }
}

inline int BagGridSize(int64_t work_items) {
  const int64_t blocks = (work_items + kBagThreadsPerBlock - 1) / kBagThreadsPerBlock;
  return static_cast<int>(blocks < 1 ? 1 : (blocks < 65535 ? blocks : 65535));
}

// Host-side launchers; every pointer in `bag` and every array argument is a device pointer.
inline cudaError_t LaunchBagForward(const RobeBag& bag, const float* memory, float* embeddings,
                                    cudaStream_t stream) {
  if (bag.num_rows == 0) return cudaSuccess;
  BagForwardKernel<<<BagGridSize(bag.num_rows * bag.params.output_dim), kBagThreadsPerBlock, 0, stream>>>(
      bag, memory, embeddings);
  return cudaGetLastError();
}

// row_denominators: a device scratch array of num_rows floats (filled here, read by the gradient kernels).
inline cudaError_t LaunchBagRowDenominators(const RobeBag& bag, float* row_denominators, cudaStream_t stream) {
  if (bag.num_rows == 0) return cudaSuccess;
  BagRowDenominatorKernel<<<BagGridSize(bag.num_rows), kBagThreadsPerBlock, 0, stream>>>(bag, row_denominators);
  return cudaGetLastError();
}

// Zeroes memory_grad [memory_size] and scatter-adds every id's gradient (after LaunchBagRowDenominators).
inline cudaError_t LaunchBagScatter(const RobeBag& bag, const float* grad, const float* row_denominators,
                                    float* memory_grad, cudaStream_t stream) {
  const cudaError_t zeroed = cudaMemsetAsync(memory_grad, 0, sizeof(float) * bag.params.memory_size, stream);
  if (zeroed != cudaSuccess || bag.num_ids == 0) return zeroed;
  BagScatterKernel<<<BagGridSize(bag.num_ids * bag.params.output_dim), kBagThreadsPerBlock, 0, stream>>>(
      bag, grad, row_denominators, memory_grad);
  return cudaGetLastError();
}

inline cudaError_t LaunchBagWeightsGrad(const RobeBag& bag, const float* memory, const float* grad,
                                        const float* embeddings, const float* row_denominators, float* weights_grad,
                                        cudaStream_t stream) {
  if (bag.num_ids == 0) return cudaSuccess;
  BagWeightsGradKernel<<<BagGridSize(bag.num_ids), kBagThreadsPerBlock, 0, stream>>>(
      bag, memory, grad, embeddings, row_denominators, weights_grad);
  return cudaGetLastError();
}

inline cudaError_t LaunchBagFindFirstBadId(const int64_t* ids, int64_t num_ids, int64_t cardinality,
                                           unsigned long long* first_bad, cudaStream_t stream) {
  const cudaError_t reset = cudaMemsetAsync(first_bad, 0xff, sizeof(unsigned long long), stream);
  if (reset != cudaSuccess || num_ids == 0) return reset;
  BagFindFirstBadIdKernel<<<BagGridSize(num_ids), kBagThreadsPerBlock, 0, stream>>>(ids, num_ids, cardinality,
                                                                                     first_bad);
  return cudaGetLastError();
}

#endif  // __CUDACC__

}  // namespace gpu
}  // namespace robe
}  // namespace tfcompress

#endif  // TFCOMPRESS_CUSTOM_OPS_ROBE_BAG_GPU_KERNELS_CU_H_
