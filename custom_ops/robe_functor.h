// Functors of the ROBE-Z ops, in the layout of TensorFlow's own kernels (tensorflow/core/kernels/gather_functor.h):
// one template per op, the CPU specialization in robe_cpu_functors.cc (declared in robe_cpu_functors.h), the GPU one
// in robe_kernels.cu.cc; the op kernels that call them are in robe_kernels.cc. The index arithmetic itself lives in
// robe_hash.h so that the CPU, the GPU and the standalone CUDA harness share one copy.
//
// Shapes: ids i64[rows = B * F] (row-major [B, F]), embeddings / upstream gradients f32[rows, D].
// Ids reaching a functor are already validated (0 <= id < cardinality of its feature).

#ifndef TFCOMPRESS_CUSTOM_OPS_ROBE_FUNCTOR_H_
#define TFCOMPRESS_CUSTOM_OPS_ROBE_FUNCTOR_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "robe_hash.h"

namespace tensorflow {
class OpKernelContext;
}  // namespace tensorflow

namespace tfcompress {

// absl::InvalidArgumentError from pieces (TensorFlow's errors::InvalidArgument is deprecated).
template <typename... Args>
absl::Status InvalidArgument(const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(args...));
}

namespace functor {

// The per-call inputs every functor shares. `ids` lives on the functor's device; `offsets` and `cardinalities` are
// host vectors owned by the kernel (the GPU functors copy them to the device, F values per call).
struct RobeBatch {
  robe::HashParams params;
  const int64_t* ids;            // [rows]
  const int64_t* offsets;        // [num_features]: offset_t = n_0 + ... + n_{t-1}
  const int64_t* cardinalities;  // [num_features]
  int32_t num_features;
  int64_t rows;                  // B * F
};

// OK when every ids[r] lies in [0, cardinalities[r % F]); otherwise InvalidArgument naming the feature, the row
// and the value of the first bad id.
template <typename Device>
struct RobeValidateIdsFunctor {
  absl::Status operator()(tensorflow::OpKernelContext* ctx, const RobeBatch& batch);
};

// embeddings[r, i] = sign(a_r, i) * memory[idx(a_r, i)], a_r = ids[r] + offsets[r % F].
template <typename Device>
struct RobeLookupFunctor {
  void operator()(tensorflow::OpKernelContext* ctx, const RobeBatch& batch, const float* memory, float* embeddings);
};

// Which race-free scatter the CPU uses (the GPU always uses atomics).
enum class ScatterAlgorithm {
  kAuto,
  kSerial,             // one thread, rows in order
  kPartialSums,        // each thread scatters a slice of rows into its own |M| buffer, then the buffers are added
  kDestinationRanges,  // each thread owns a slice of M and scatters, in row order, every chunk that lands in it
};

// memory_grad[j] = sum over (r, i) with idx(a_r, i) == j of sign(a_r, i) * grad[r, i]. memory_grad has
// params.memory_size elements and is overwritten (the functor zeroes it).
template <typename Device>
struct RobeScatterGradFunctor {
  void operator()(tensorflow::OpKernelContext* ctx, const RobeBatch& batch, const float* grad,
                  ScatterAlgorithm algorithm, float* memory_grad);
};

}  // namespace functor
}  // namespace tfcompress

#endif  // TFCOMPRESS_CUSTOM_OPS_ROBE_FUNCTOR_H_
