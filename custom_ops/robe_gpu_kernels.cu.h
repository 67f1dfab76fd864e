// CUDA kernels of the ROBE-Z ops, free of TensorFlow so that two builds share them:
//   - robe_kernels.cu.cc wraps them as the GPU functors of the TensorFlow op library;
//   - cuda_harness/robe_harness.cu runs them standalone (plain CUDA runtime) against the NumPy reference.
// The index arithmetic comes from robe_hash.h, the same code the CPU kernels run.
//
// Layout of the lookup and scatter kernels: a block owns a tile of rows. Phase 1 computes each (row, chunk)
// hash once into shared memory; phase 2 walks the tile's elements with consecutive threads on consecutive
// elements, so the embeddings (lookup) or upstream gradients (scatter) are read/written coalesced and every chunk
// is a contiguous run of memory. The scatter adds with atomicAdd: race-free but, unlike the CPU kernel, the
// summation order (so the last bits of each sum) can vary from run to run.

#ifndef TFCOMPRESS_CUSTOM_OPS_ROBE_GPU_KERNELS_CU_H_
#define TFCOMPRESS_CUSTOM_OPS_ROBE_GPU_KERNELS_CU_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "robe_hash.h"

namespace tfcompress {
namespace robe {
namespace gpu {

constexpr int kThreadsPerBlock = 256;
// Elements per tile: a few per thread, enough rows per tile to amortize the __syncthreads.
constexpr int kElementsPerTile = 1024;
// Shared memory the tiled kernels may use (the default per-block limit without opting in).
constexpr int kMaxSharedBytes = 48 * 1024;

// Smallest row index whose id lies outside [0, cardinality of its feature); *first_bad starts at ~0ull.
__global__ void FindFirstBadIdKernel(const int64_t* ids, const int64_t* cardinalities, int32_t num_features,
                                     int64_t rows, unsigned long long* first_bad) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (static_cast<uint64_t>(ids[r]) >= static_cast<uint64_t>(cardinalities[r % num_features])) {
      atomicMin(first_bad, static_cast<unsigned long long>(r));
    }
  }
}

// Rows per tile and the dynamic shared memory the tiled kernel needs for them; rows_per_tile == 0 means the
// per-element kernel must be used (very wide embeddings).
struct TileShape {
  int32_t rows_per_tile;
  size_t shared_bytes;
};

inline TileShape PickTileShape(const HashParams& p) {
  int32_t rows = kElementsPerTile / p.output_dim;
  if (rows < 1) rows = 1;
  for (; rows >= 1; rows /= 2) {
    // chunk terms [C] + element terms [D] + chunk starts [rows * C] + sign row terms [rows], all int64
    const size_t bytes = sizeof(int64_t) * (p.num_chunks + (p.is_signed ? p.output_dim : 0) +
                                            static_cast<size_t>(rows) * p.num_chunks + rows);
    if (bytes <= kMaxSharedBytes) return {rows, bytes};
  }
  return {0, 0};
}

// kScatter == false: dst[r, i] = sign * src[idx(a_r, i)]           (src = memory, dst = embeddings)
// kScatter == true:  dst[idx(a_r, i)] += sign * src[r, i] (atomic)  (src = upstream grad, dst = zeroed memory grad)
template <bool kScatter>
__global__ void RobeTileKernel(HashParams p, const int64_t* ids, const int64_t* offsets, int32_t num_features,
                               int64_t rows, int32_t rows_per_tile, const float* __restrict__ src,
                               float* __restrict__ dst) {
  extern __shared__ int64_t shared[];
  int64_t* chunk_terms = shared;
  int64_t* element_terms = chunk_terms + p.num_chunks;  // ElementTermModPrime values (int64 slots keep alignment)
  int64_t* starts = element_terms + (p.is_signed ? p.output_dim : 0);
  int64_t* sign_terms = starts + static_cast<int64_t>(rows_per_tile) * p.num_chunks;

  for (int32_t c = threadIdx.x; c < p.num_chunks; c += blockDim.x) chunk_terms[c] = IndexTerm(c, p.r2, p.r1);
  if (p.is_signed) {
    for (int32_t i = threadIdx.x; i < p.output_dim; i += blockDim.x) {
      element_terms[i] = ElementTermModPrime(i, p.s2, p.s1);
    }
  }
  __syncthreads();

  const int64_t tiles = (rows + rows_per_tile - 1) / rows_per_tile;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * rows_per_tile;
    const int32_t tile_rows = static_cast<int32_t>(rows - row0 < rows_per_tile ? rows - row0 : rows_per_tile);
    // Phase 1: one hash per (row, chunk).
    for (int32_t k = threadIdx.x; k < tile_rows * p.num_chunks; k += blockDim.x) {
      const int32_t local_row = k / p.num_chunks;
      const int32_t c = k - local_row * p.num_chunks;
      const int64_t r = row0 + local_row;
      const int64_t a = ids[r] + offsets[r % num_features];
      starts[k] = ChunkStart(p, RowTerm(a, p.r3), chunk_terms[c]);
      if (p.is_signed && c == 0) sign_terms[local_row] = RowTerm(a, p.s3);
    }
    __syncthreads();
    // Phase 2: one element per thread, consecutive threads on consecutive elements.
    const int32_t tile_elements = tile_rows * p.output_dim;
    for (int32_t k = threadIdx.x; k < tile_elements; k += blockDim.x) {
      const int32_t local_row = k / p.output_dim;
      const int32_t i = k - local_row * p.output_dim;
      const int32_t c = i / p.chunk_size;
      const int64_t position = starts[local_row * p.num_chunks + c] + (i - c * p.chunk_size);
      const float sign = p.is_signed ? SignFromBit(SignBit(static_cast<int32_t>(sign_terms[local_row]),
                                                           static_cast<int32_t>(element_terms[i])))
                                     : 1.0f;
      const int64_t element = row0 * p.output_dim + k;
      if (kScatter) {
        atomicAdd(dst + position, sign * src[element]);
      } else {
        dst[element] = sign * src[position];
      }
    }
    __syncthreads();  // the next tile overwrites starts
  }
}

// The fallback for embeddings too wide for a tile in shared memory: one thread per element hashes its own chunk.
template <bool kScatter>
__global__ void RobeElementKernel(HashParams p, const int64_t* ids, const int64_t* offsets, int32_t num_features,
                                  int64_t rows, const float* __restrict__ src, float* __restrict__ dst) {
  const int64_t total = rows * p.output_dim;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / p.output_dim;
    const int32_t i = static_cast<int32_t>(e - r * p.output_dim);
    const int64_t a = ids[r] + offsets[r % num_features];
    const int64_t position = IndexOf(p, a, i);
    const float sign = p.is_signed ? SignOf(p, a, i) : 1.0f;
    if (kScatter) {
      atomicAdd(dst + position, sign * src[e]);
    } else {
      dst[e] = sign * src[position];
    }
  }
}

// positions[r, i] = idx(a_r, i), signs[r, i] = sign(a_r, i): the harness's check of the device arithmetic.
__global__ void RobePositionsKernel(HashParams p, const int64_t* ids, const int64_t* offsets, int32_t num_features,
                                    int64_t rows, int64_t* positions, float* signs) {
  const int64_t total = rows * p.output_dim;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / p.output_dim;
    const int32_t i = static_cast<int32_t>(e - r * p.output_dim);
    const int64_t a = ids[r] + offsets[r % num_features];
    positions[e] = IndexOf(p, a, i);
    signs[e] = p.is_signed ? SignOf(p, a, i) : 1.0f;
  }
}

inline int GridSize(int64_t work_items, int max_blocks) {
  const int64_t blocks = (work_items + kThreadsPerBlock - 1) / kThreadsPerBlock;
  return static_cast<int>(blocks < 1 ? 1 : (blocks < max_blocks ? blocks : max_blocks));
}

// Host-side launchers. `ids`, `offsets`, `src` and `dst` are device pointers; for the scatter, dst must be zeroed
// (LaunchScatter does it on the same stream). `max_blocks` caps the grid (grid-stride loops cover the rest).
template <bool kScatter>
cudaError_t LaunchRobe(const HashParams& p, const int64_t* ids, const int64_t* offsets, int32_t num_features,
                       int64_t rows, const float* src, float* dst, cudaStream_t stream, int max_blocks = 65535) {
  if (rows == 0) return cudaSuccess;
  const TileShape tile = PickTileShape(p);
  if (tile.rows_per_tile > 0) {
    const int64_t tiles = (rows + tile.rows_per_tile - 1) / tile.rows_per_tile;
    const int grid = static_cast<int>(tiles < max_blocks ? tiles : max_blocks);
    RobeTileKernel<kScatter><<<grid, kThreadsPerBlock, tile.shared_bytes, stream>>>(
        p, ids, offsets, num_features, rows, tile.rows_per_tile, src, dst);
  } else {
    RobeElementKernel<kScatter><<<GridSize(rows * p.output_dim, max_blocks), kThreadsPerBlock, 0, stream>>>(
        p, ids, offsets, num_features, rows, src, dst);
  }
  return cudaGetLastError();
}

inline cudaError_t LaunchLookup(const HashParams& p, const int64_t* ids, const int64_t* offsets,
                                int32_t num_features, int64_t rows, const float* memory, float* embeddings,
                                cudaStream_t stream) {
  return LaunchRobe<false>(p, ids, offsets, num_features, rows, memory, embeddings, stream);
}

inline cudaError_t LaunchScatter(const HashParams& p, const int64_t* ids, const int64_t* offsets,
                                 int32_t num_features, int64_t rows, const float* grad, float* memory_grad,
                                 cudaStream_t stream) {
  const cudaError_t zeroed = cudaMemsetAsync(memory_grad, 0, sizeof(float) * p.memory_size, stream);
  if (zeroed != cudaSuccess) return zeroed;
  return LaunchRobe<true>(p, ids, offsets, num_features, rows, grad, memory_grad, stream);
}

inline cudaError_t LaunchFindFirstBadId(const int64_t* ids, const int64_t* cardinalities, int32_t num_features,
                                        int64_t rows, unsigned long long* first_bad, cudaStream_t stream) {
  const cudaError_t reset = cudaMemsetAsync(first_bad, 0xff, sizeof(unsigned long long), stream);
  if (reset != cudaSuccess || rows == 0) return reset;
  FindFirstBadIdKernel<<<GridSize(rows, 4096), kThreadsPerBlock, 0, stream>>>(ids, cardinalities, num_features,
                                                                               rows, first_bad);
  return cudaGetLastError();
}

inline cudaError_t LaunchPositions(const HashParams& p, const int64_t* ids, const int64_t* offsets,
                                   int32_t num_features, int64_t rows, int64_t* positions, float* signs,
                                   cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  RobePositionsKernel<<<GridSize(rows * p.output_dim, 65535), kThreadsPerBlock, 0, stream>>>(
      p, ids, offsets, num_features, rows, positions, signs);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace robe
}  // namespace tfcompress

#endif  // TFCOMPRESS_CUSTOM_OPS_ROBE_GPU_KERNELS_CU_H_
