// CPU specializations of the ROBE-Z functors (robe_functor.h) and the CPU-only computations the kernels call, as
// TensorFlow declares its CPU functors apart from its op kernels (gather_functor.h / gather_op.cc). Defined in
// robe_cpu_functors.cc; the op kernels in robe_kernels.cc parse attrs, check arguments, allocate outputs and call
// these. Work is split over TensorFlow's intra-op thread pool (the same pool tf.gather uses).

#ifndef TFCOMPRESS_CUSTOM_OPS_ROBE_CPU_FUNCTORS_H_
#define TFCOMPRESS_CUSTOM_OPS_ROBE_CPU_FUNCTORS_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "robe_functor.h"

namespace Eigen {
struct ThreadPoolDevice;
}  // namespace Eigen

namespace tfcompress {

using CPUDevice = Eigen::ThreadPoolDevice;

namespace functor {

template <>
struct RobeValidateIdsFunctor<CPUDevice> {
  absl::Status operator()(tensorflow::OpKernelContext* ctx, const RobeBatch& batch);
};

template <>
struct RobeLookupFunctor<CPUDevice> {
  void operator()(tensorflow::OpKernelContext* ctx, const RobeBatch& batch, const float* memory, float* embeddings);

  // The lookup without the separate validation pass: checks the ids while it hashes them (one read of ids
  // instead of two) and returns true when some id is out of range. The embeddings are then meaningless but every
  // read stayed inside memory; the caller raises the error.
  static bool LookupCheckingIds(tensorflow::OpKernelContext* ctx, const RobeBatch& batch, const float* memory,
                                float* embeddings);
};

template <>
struct RobeScatterGradFunctor<CPUDevice> {
  void operator()(tensorflow::OpKernelContext* ctx, const RobeBatch& batch, const float* grad,
                  ScatterAlgorithm algorithm, float* memory_grad);
};

// Coalesced sparse gradient (CPU only): sort the chunk occurrences by start, merge their [start, start + width)
// intervals into disjoint covered runs, and sum each element's terms in (start, occurrence) order. Two steps, so
// that the kernel allocates the outputs once their length (`covered`) is known:
//   PlanSparseGrad (hash, sort, merge) -> the kernel allocates indices / values [covered] -> SparseGradValues.
struct SparseGradPlan {
  std::vector<int64_t> order;                         // occurrence ids (r * num_chunks + c) sorted by chunk start
  std::vector<int64_t> out_row;                       // [count]: output row of the first element of order[n]
  std::vector<std::pair<int64_t, int64_t>> runs;      // (run_start, run_end) in M
  std::vector<int64_t> run_first_entry;               // index in `order` where each run begins
  int64_t covered = 0;                                // elements of M covered by some chunk: the output length
};

// Fills plan from the batch's chunk starts; fails only when a temporary cannot be allocated.
absl::Status PlanSparseGrad(tensorflow::OpKernelContext* ctx, const RobeBatch& batch, SparseGradPlan* plan);

// indices[k] = the k-th covered position of M (ascending), values[k] = its summed gradient; both [plan.covered].
void SparseGradValues(tensorflow::OpKernelContext* ctx, const RobeBatch& batch, const SparseGradPlan& plan,
                      const float* grad, int64_t* indices, float* values);

// positions / signs [rows, D] of every element of the batch (RobePositions), with the one-shot helpers of
// robe_hash.h.
void ComputePositions(const RobeBatch& batch, int64_t* positions, float* signs);

}  // namespace functor
}  // namespace tfcompress

#endif  // TFCOMPRESS_CUSTOM_OPS_ROBE_CPU_FUNCTORS_H_
