// The pooled (bag) ROBE-Z lookup (robe_bag_ops.cc): what its CPU code (robe_bag_kernels.cc) and its GPU functors
// (robe_bag_kernels.cu.cc, kernels in robe_bag_gpu_kernels.cu.h) share. No TensorFlow types beyond a forward
// declaration, as in robe_functor.h.

#ifndef TFCOMPRESS_CUSTOM_OPS_ROBE_BAG_FUNCTOR_H_
#define TFCOMPRESS_CUSTOM_OPS_ROBE_BAG_FUNCTOR_H_

#include <cstdint>

#include "robe_hash.h"

namespace tensorflow {
class OpKernelContext;
}  // namespace tensorflow

namespace tfcompress {
namespace robe {

// How a row's weighted sum is normalized (tf.nn.embedding_lookup_sparse's combiners).
enum class Combiner : int32_t {
  kSum = 0,    // no division
  kMean = 1,   // / sum of the row's weights
  kSqrtn = 2,  // / sqrt(sum of the row's squared weights)
};

// One call's inputs. Pointers live on the device of the functor that reads them.
struct RobeBag {
  HashParams params;
  const int64_t* ids;         // [num_ids]: row b holds ids[row_splits[b] : row_splits[b + 1]]
  const int64_t* row_splits;  // [num_rows + 1], validated: 0, non-decreasing, num_ids
  const float* weights;       // [num_ids], or nullptr for all-ones weights
  int64_t table_offset;       // a = id + table_offset
  int64_t cardinality;        // ids must lie in [0, cardinality)
  int64_t num_ids;
  int64_t num_rows;
  Combiner combiner;
};

// The combiner's divisor for a row from its weight sums (sum_w = sum of weights, sum_w2 = sum of squares, each
// accumulated in id order); 0 means "write zeros" (tf.math.divide_no_nan, and every empty row).
ROBE_HOST_DEVICE float BagDenominator(Combiner combiner, float sum_w, float sum_w2) {
  if (combiner == Combiner::kSum) return 1.0f;
  if (combiner == Combiner::kMean) return sum_w;
#if defined(__CUDA_ARCH__)
  return sqrtf(sum_w2);
#else
  return __builtin_sqrtf(sum_w2);
#endif
}

}  // namespace robe
}  // namespace tfcompress

#endif  // TFCOMPRESS_CUSTOM_OPS_ROBE_BAG_FUNCTOR_H_
