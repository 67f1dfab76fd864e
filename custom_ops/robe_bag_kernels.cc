// Op kernels of the pooled (bag) ROBE-Z ops (registered in robe_bag_ops.cc) and their CPU computation.
//
// Forward: TensorFlow's intra-op pool shards the B output rows; a row hashes its ids in blocks (one hash per chunk),
// then adds w_k * e_k into the output row in id order (k ascending), then divides by the combiner's denominator.
// Nothing of size N x D is ever written, which is where the speed over gather + segment_sum comes from.
//
// Memory gradients: id k of row b contributes (grad[b] / denominator_b) * w_k. The dense gradient picks its scatter
// as the per-element op does: serial and per-thread partial sums scatter straight from grad [B, D]; destination
// ranges (an |M| large next to the batch) and the sparse gradient expand the per-id rows into an [N, D] temporary
// and hand it to the per-element op's code (RobeScatterGradFunctor, the sparse-gradient plan), so they keep those
// algorithms' determinism unchanged.

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "robe_bag_functor.h"
#include "robe_cpu_functors.h"
#include "robe_functor.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/work_sharder.h"

#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#include "unsupported/Eigen/CXX11/Tensor"
#endif

namespace tfcompress {

#if GOOGLE_CUDA
// Defined in robe_bag_kernels.cu.cc. `bag` holds device ids / weights and host row_splits (already validated).
namespace robe {
absl::Status BagForwardGpu(tensorflow::OpKernelContext* ctx, const RobeBag& bag, const float* memory,
                           float* embeddings);
absl::Status BagScatterGradGpu(tensorflow::OpKernelContext* ctx, const RobeBag& bag, const float* grad,
                               float* memory_grad);
}  // namespace robe
using GPUDevice = Eigen::GpuDevice;
#endif

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using robe::Combiner;
using robe::RobeBag;

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Attributes, parsed and validated once per kernel.

class BagAttrs {
 public:
  explicit BagAttrs(OpKernelConstruction* ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("table_offset", &table_offset_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("cardinality", &cardinality_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("output_dim", &output_dim_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("chunk_size", &chunk_size_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("hash_constants", &hash_constants_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("signed", &signed_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("weighted", &weighted_));
    std::string combiner;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("combiner", &combiner));
    combiner_ = combiner == "mean" ? Combiner::kMean : combiner == "sqrtn" ? Combiner::kSqrtn : Combiner::kSum;
    // The same bounds as RobeAttrs (robe_kernels.cc).
    OP_REQUIRES(ctx, output_dim_ >= 1 && output_dim_ <= (int64_t{1} << 24),
                InvalidArgument("output_dim must be in [1, 2^24], got ", output_dim_));
    OP_REQUIRES(ctx, chunk_size_ >= 1 && chunk_size_ <= output_dim_,
                InvalidArgument("chunk_size must be in [1, output_dim=", output_dim_, "], got ", chunk_size_));
    OP_REQUIRES(ctx, hash_constants_.size() == 6,
                InvalidArgument("hash_constants must hold exactly 6 values (R1, R2, R3, S1, S2, S3), got ",
                                hash_constants_.size()));
    for (size_t k = 0; k < hash_constants_.size(); ++k) {
      OP_REQUIRES(ctx, hash_constants_[k] >= 0 && hash_constants_[k] < robe::kPrime,
                  InvalidArgument("hash_constants[", k, "] must be in [0, ", robe::kPrime, "), got ",
                                  hash_constants_[k]));
    }
    OP_REQUIRES(ctx, table_offset_ >= 0, InvalidArgument("table_offset must be >= 0, got ", table_offset_));
    OP_REQUIRES(ctx, cardinality_ >= 1, InvalidArgument("cardinality must be >= 1, got ", cardinality_));
    OP_REQUIRES(ctx, cardinality_ <= std::numeric_limits<int64_t>::max() - table_offset_,
                InvalidArgument("table_offset + cardinality overflows int64: ", table_offset_, " + ",
                                cardinality_));
  }

  int64_t output_dim() const { return output_dim_; }
  int64_t chunk_size() const { return chunk_size_; }
  bool weighted() const { return weighted_; }
  const int64_t* table_offset() const { return &table_offset_; }
  const int64_t* cardinality() const { return &cardinality_; }

  robe::HashParams Params(int64_t memory_size) const {
    const auto& k = hash_constants_;
    return robe::MakeHashParams(k[0], k[1], k[2], k[3], k[4], k[5], memory_size, static_cast<int32_t>(output_dim_),
                                static_cast<int32_t>(chunk_size_), signed_);
  }

  RobeBag MakeBag(int64_t memory_size, const Tensor& ids, const Tensor& row_splits, const Tensor& weights) const {
    RobeBag bag;
    bag.params = Params(memory_size);
    bag.ids = ids.flat<int64_t>().data();
    bag.row_splits = row_splits.flat<int64_t>().data();
    bag.weights = weighted_ ? weights.flat<float>().data() : nullptr;
    bag.table_offset = table_offset_;
    bag.cardinality = cardinality_;
    bag.num_ids = ids.NumElements();
    bag.num_rows = row_splits.NumElements() - 1;
    bag.combiner = combiner_;
    return bag;
  }

  // The bag as a one-feature batch of the per-element functors (ids [N, 1] of one table at table_offset).
  functor::RobeBatch AsBatch(const RobeBag& bag) const {
    functor::RobeBatch batch;
    batch.params = bag.params;
    batch.ids = bag.ids;
    batch.offsets = &table_offset_;
    batch.cardinalities = &cardinality_;
    batch.num_features = 1;
    batch.rows = bag.num_ids;
    return batch;
  }

 private:
  std::vector<int64_t> hash_constants_;
  int64_t table_offset_ = 0;
  int64_t cardinality_ = 1;
  int64_t output_dim_ = 0;
  int64_t chunk_size_ = 0;
  bool signed_ = false;
  bool weighted_ = false;
  Combiner combiner_ = Combiner::kSum;
};

// ids [N], row_splits [B + 1] (0, non-decreasing, N) and weights ([N] when weighted, else empty), all host-side.
absl::Status CheckBagInputs(const BagAttrs& attrs, const Tensor& ids, const Tensor& row_splits,
                            const Tensor& weights) {
  if (ids.dims() != 1) {
    return InvalidArgument("ids must be a vector [N] (every row's ids end to end), got shape ",
                           ids.shape().DebugString());
  }
  if (row_splits.dims() != 1 || row_splits.NumElements() < 1) {
    return InvalidArgument("row_splits must be a vector [B + 1] with at least one element, got shape ",
                           row_splits.shape().DebugString());
  }
  const int64_t n = ids.NumElements();
  const auto splits = row_splits.flat<int64_t>();
  const int64_t rows = splits.size() - 1;
  if (splits(0) != 0) return InvalidArgument("row_splits[0] must be 0, got ", splits(0));
  for (int64_t b = 0; b < rows; ++b) {
    if (splits(b + 1) < splits(b)) {
      return InvalidArgument("row_splits must be non-decreasing, got row_splits[", b + 1, "] = ", splits(b + 1),
                             " < row_splits[", b, "] = ", splits(b));
    }
  }
  if (splits(rows) != n) {
    return InvalidArgument("row_splits[-1] must equal the number of ids (", n, "), got ", splits(rows));
  }
  if (attrs.weighted()) {
    if (weights.dims() != 1 || weights.NumElements() != n) {
      return InvalidArgument("weights must have shape [", n, "] (one per id), got ", weights.shape().DebugString());
    }
  } else if (weights.NumElements() != 0) {
    return InvalidArgument("weights must be empty when weighted=false, got shape ", weights.shape().DebugString());
  }
  return absl::OkStatus();
}

// The first id outside [0, cardinality), named with its position and row; OK when there is none.
absl::Status CheckBagIds(const RobeBag& bag) {
  for (int64_t k = 0; k < bag.num_ids; ++k) {
    if (static_cast<uint64_t>(bag.ids[k]) >= static_cast<uint64_t>(bag.cardinality)) {
      const int64_t row = std::upper_bound(bag.row_splits, bag.row_splits + bag.num_rows + 1, k) - bag.row_splits - 1;
      return InvalidArgument("id out of range: ids[", k, "] = ", bag.ids[k], " (row ", row, "), allowed [0, ",
                             bag.cardinality, ")");
    }
  }
  return absl::OkStatus();
}

absl::Status CheckMemory(const BagAttrs& attrs, const Tensor& memory) {
  if (memory.dtype() != tensorflow::DT_FLOAT) {
    return InvalidArgument("memory must be float32, got ", tensorflow::DataTypeString(memory.dtype()));
  }
  if (memory.dims() != 1) return InvalidArgument("memory must be a vector, got shape ", memory.shape().DebugString());
  if (memory.NumElements() < attrs.chunk_size()) {
    return InvalidArgument("memory must hold at least one chunk (chunk_size=", attrs.chunk_size(), "), got ",
                           memory.NumElements(), " elements");
  }
  return absl::OkStatus();
}

// The row's weight sums in id order, then the combiner's denominator (0: write zeros).
float RowDenominator(const RobeBag& bag, int64_t begin, int64_t end) {
  float sum_w = 0.0f, sum_w2 = 0.0f;
  if (bag.weights == nullptr) {
    // Every weight 1: the sums are the count, exact in float up to 2^24 ids per row (and rounded as the sum would
    // be beyond that).
    for (int64_t k = begin; k < end; ++k) sum_w += 1.0f;
    sum_w2 = sum_w;
  } else if (bag.combiner != Combiner::kSum) {
    for (int64_t k = begin; k < end; ++k) {
      sum_w += bag.weights[k];
      sum_w2 += bag.weights[k] * bag.weights[k];
    }
  }
  return robe::BagDenominator(bag.combiner, sum_w, sum_w2);
}

// scaled[i] = grad_b[i] / denominator_b for the bag row [row_begin, row_end) (grad_b itself for "sum", zeros where
// the denominator is 0): the row's gradient before the per-id weights, shared by the expanded and direct scatters
// so that both form the same terms.
void ScaledRowGrad(const RobeBag& bag, const float* g, int64_t row_begin, int64_t row_end, float* scaled) {
  const int32_t d = bag.params.output_dim;
  const float denominator = RowDenominator(bag, row_begin, row_end);
  for (int32_t i = 0; i < d; ++i) {
    scaled[i] = bag.combiner == Combiner::kSum ? g[i] : denominator == 0.0f ? 0.0f : g[i] / denominator;
  }
}

// Per-call hash terms (as robe_cpu_functors.cc's CallTerms).
struct BagTerms {
  std::vector<int64_t> chunk;
  std::vector<int32_t> element;

  explicit BagTerms(const robe::HashParams& p) : chunk(p.num_chunks), element(p.is_signed ? p.output_dim : 0) {
    for (int32_t c = 0; c < p.num_chunks; ++c) chunk[c] = robe::IndexTerm(c, p.r2, p.r1);
    for (size_t i = 0; i < element.size(); ++i) {
      element[i] = robe::ElementTermModPrime(static_cast<int64_t>(i), p.s2, p.s1);
    }
  }
};

// a = id + table_offset in unsigned arithmetic: a garbage id cannot overflow, and its chunk starts still lie in M.
inline int64_t OffsetId(const RobeBag& bag, int64_t k) {
  return static_cast<int64_t>(static_cast<uint64_t>(bag.ids[k]) + static_cast<uint64_t>(bag.table_offset));
}

// Output rows [begin, end) of the forward; returns true when some id is out of range (the caller then fails the
// op; every read stayed inside M). kZ > 0 fixes Z at compile time so each chunk's add becomes a few vector ops.
// A row's ids are hashed in blocks first (all chunk starts of the block), then added: the loads of a block are
// independent of each other, so the CPU keeps many cache misses on M in flight.
template <int kZ>
bool BagRowsCpu(const RobeBag& bag, const BagTerms& terms, const float* memory, int64_t begin, int64_t end,
                float* embeddings) {
  constexpr int32_t kStartsPerBlock = 512;
  const robe::HashParams& p = bag.params;
  const int32_t z = kZ > 0 ? kZ : p.chunk_size;
  const int32_t chunks = p.num_chunks;
  const int32_t d = p.output_dim;
  const int64_t ids_per_block = std::max<int64_t>(1, kStartsPerBlock / chunks);
  std::vector<int64_t> starts(ids_per_block * chunks);
  std::vector<int32_t> sign_terms(p.is_signed ? ids_per_block : 0);
  std::vector<float> signed_row(p.is_signed ? d : 0);
  bool any_bad = false;
  for (int64_t b = begin; b < end; ++b) {
    float* out = embeddings + b * d;
    std::fill(out, out + d, 0.0f);
    const int64_t row_begin = bag.row_splits[b], row_end = bag.row_splits[b + 1];
    for (int64_t block = row_begin; block < row_end; block += ids_per_block) {
      const int64_t n = std::min(row_end, block + ids_per_block) - block;
      for (int64_t j = 0; j < n; ++j) {
        any_bad |= static_cast<uint64_t>(bag.ids[block + j]) >= static_cast<uint64_t>(bag.cardinality);
        const int64_t a = OffsetId(bag, block + j);
        const int64_t row_term = robe::RowTerm(a, p.r3);
        for (int32_t c = 0; c < chunks; ++c) starts[j * chunks + c] = robe::ChunkStart(p, row_term, terms.chunk[c]);
        if (p.is_signed) sign_terms[j] = static_cast<int32_t>(robe::RowTerm(a, p.s3));
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t* s = starts.data() + j * chunks;
        const float w = bag.weights == nullptr ? 1.0f : bag.weights[block + j];
        if (p.is_signed) {
          // e_k = sign * M[position], then w * e_k: the reference's order of the two products.
          for (int32_t c = 0; c < chunks; ++c) {
            const int32_t width = robe::ChunkWidth(p, c);
            for (int32_t o = 0; o < width; ++o) signed_row[c * z + o] = memory[s[c] + o];
          }
          for (int32_t i = 0; i < d; ++i) {
            signed_row[i] *= robe::SignFromBit(robe::SignBit(sign_terms[j], terms.element[i]));
          }
          if (bag.weights == nullptr) {
            for (int32_t i = 0; i < d; ++i) out[i] += signed_row[i];
          } else {
            for (int32_t i = 0; i < d; ++i) out[i] += signed_row[i] * w;
          }
          continue;
        }
        const int32_t full_chunks = d / z;
        if (bag.weights == nullptr) {
          for (int32_t c = 0; c < full_chunks; ++c) {
            const float* src = memory + s[c];
            float* dst = out + c * z;
            for (int32_t o = 0; o < z; ++o) dst[o] += src[o];
          }
        } else {
          for (int32_t c = 0; c < full_chunks; ++c) {
            const float* src = memory + s[c];
            float* dst = out + c * z;
            for (int32_t o = 0; o < z; ++o) dst[o] += src[o] * w;
          }
        }
        if (full_chunks < chunks) {  // the shorter last chunk
          const float* src = memory + s[full_chunks];
          float* dst = out + full_chunks * z;
          for (int32_t o = 0; o < d - full_chunks * z; ++o) dst[o] += bag.weights == nullptr ? src[o] : src[o] * w;
        }
      }
    }
    if (bag.combiner != Combiner::kSum) {
      const float denominator = RowDenominator(bag, row_begin, row_end);
      if (denominator == 0.0f) {
        std::fill(out, out + d, 0.0f);
      } else {
        for (int32_t i = 0; i < d; ++i) out[i] /= denominator;
      }
    }
  }
  return any_bad;
}

using BagRowsFn = bool (*)(const RobeBag&, const BagTerms&, const float*, int64_t, int64_t, float*);

BagRowsFn PickBagRows(int32_t chunk_size) {
  switch (chunk_size) {
    case 1: return BagRowsCpu<1>;
    case 2: return BagRowsCpu<2>;
    case 4: return BagRowsCpu<4>;
    case 8: return BagRowsCpu<8>;
    case 16: return BagRowsCpu<16>;
    case 32: return BagRowsCpu<32>;
    default: return BagRowsCpu<0>;
  }
}

// The pool's cost units per output row (about one per cycle): per id a hash, a few ops per chunk and an add per
// element (more with signs).
int64_t CostPerRow(const RobeBag& bag) {
  const robe::HashParams& p = bag.params;
  const int64_t ids_per_row = bag.num_rows > 0 ? bag.num_ids / bag.num_rows + 1 : 1;
  return p.output_dim + ids_per_row * (10 + 4 * p.num_chunks + 2 * p.output_dim + (p.is_signed ? 6 * p.output_dim : 0));
}

template <typename Device>
void BagForward(OpKernelContext* ctx, const BagAttrs& attrs, const Tensor& memory, const Tensor& ids,
                const Tensor& row_splits, const Tensor& weights) {
  OP_REQUIRES_OK(ctx, CheckMemory(attrs, memory));
  OP_REQUIRES_OK(ctx, CheckBagInputs(attrs, ids, row_splits, weights));
  const RobeBag bag = attrs.MakeBag(memory.NumElements(), ids, row_splits, weights);
  Tensor* embeddings = nullptr;
  OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({bag.num_rows, attrs.output_dim()}), &embeddings));
  if (bag.num_rows == 0) return;
#if GOOGLE_CUDA
  if constexpr (std::is_same_v<Device, GPUDevice>) {
    OP_REQUIRES_OK(ctx, robe::BagForwardGpu(ctx, bag, memory.flat<float>().data(),
                                            embeddings->flat<float>().data()));
    return;
  }
#endif
  const BagTerms terms(bag.params);
  const BagRowsFn rows_fn = PickBagRows(bag.params.chunk_size);
  const float* m = memory.flat<float>().data();
  float* out = embeddings->flat<float>().data();
  std::atomic<bool> any_bad{false};
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(workers->num_threads, workers->workers, bag.num_rows, CostPerRow(bag),
                    [&](int64_t begin, int64_t end) {
                      if (rows_fn(bag, terms, m, begin, end, out)) any_bad.store(true, std::memory_order_relaxed);
                    });
  if (any_bad.load(std::memory_order_relaxed)) {
    OP_REQUIRES_OK(ctx, CheckBagIds(bag));
    ctx->CtxFailure(__FILE__, __LINE__, absl::InternalError("an id was out of range but none was found"));
  }
}

template <typename Device>
class RobeBagLookupOp : public OpKernel {
 public:
  explicit RobeBagLookupOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    BagForward<Device>(ctx, attrs_, ctx->input(0), ctx->input(1), ctx->input(2), ctx->input(3));
  }

 private:
  BagAttrs attrs_;
};

// Reads the variable in place under its shared lock, as RobeResourceLookup does (no copy of M).
template <typename Device>
class RobeResourceBagLookupOp : public OpKernel {
 public:
  explicit RobeResourceBagLookupOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<tensorflow::Var> variable;
    OP_REQUIRES_OK(ctx, tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, 0), &variable));
    tensorflow::tf_shared_lock lock(*variable->mu());
    OP_REQUIRES(ctx, variable->is_initialized,
                absl::FailedPreconditionError("the memory variable is not initialized"));
    BagForward<Device>(ctx, attrs_, *variable->tensor(), ctx->input(1), ctx->input(2), ctx->input(3));
  }

 private:
  BagAttrs attrs_;
};

// ---------------------------------------------------------------------------------------------------------------
// Gradients.

constexpr int64_t kMaxMemorySize = int64_t{1} << 48;  // as robe_kernels.cc

// Shared checks of the memory-gradient ops (inputs grad, ids, row_splits, weights, memory_size); fills the bag.
// check_ids: read the ids on the host (the GPU path checks them on the device instead).
absl::Status PrepareBagGrad(OpKernelContext* ctx, const BagAttrs& attrs, RobeBag* bag, bool check_ids = true) {
  const Tensor& grad = ctx->input(0);
  const Tensor& memory_size_tensor = ctx->input(4);
  if (!tensorflow::TensorShapeUtils::IsScalar(memory_size_tensor.shape())) {
    return InvalidArgument("memory_size must be a scalar, got shape ", memory_size_tensor.shape().DebugString());
  }
  const int64_t memory_size = memory_size_tensor.scalar<int64_t>()();
  if (memory_size < attrs.chunk_size() || memory_size > kMaxMemorySize) {
    return InvalidArgument("memory_size must be in [chunk_size=", attrs.chunk_size(), " (one chunk), 2^48], got ",
                           memory_size);
  }
  TF_RETURN_IF_ERROR(CheckBagInputs(attrs, ctx->input(1), ctx->input(2), ctx->input(3)));
  *bag = attrs.MakeBag(memory_size, ctx->input(1), ctx->input(2), ctx->input(3));
  if (grad.dims() != 2 || grad.dim_size(0) != bag->num_rows || grad.dim_size(1) != attrs.output_dim()) {
    return InvalidArgument("grad must have shape [", bag->num_rows, ", ", attrs.output_dim(),
                           "] (rows, output_dim), got ", grad.shape().DebugString());
  }
  return check_ids ? CheckBagIds(*bag) : absl::OkStatus();
}

// expanded[k] = (grad[b] / denominator_b) * w_k for every id k of row b: the per-id gradient of the bag, in the
// order of operations the reference's gradient uses (divide_no_nan's, then the weight product's).
absl::Status ExpandBagGrad(OpKernelContext* ctx, const RobeBag& bag, const float* grad, Tensor* expanded_tensor) {
  const int64_t d = bag.params.output_dim;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({bag.num_ids, d}), expanded_tensor));
  float* expanded = expanded_tensor->flat<float>().data();
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  const int64_t ids_per_row = bag.num_rows > 0 ? bag.num_ids / bag.num_rows + 1 : 1;
  tensorflow::Shard(workers->num_threads, workers->workers, bag.num_rows, 2 * d * ids_per_row + d,
                    [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(d);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row_begin = bag.row_splits[b], row_end = bag.row_splits[b + 1];
      if (row_begin == row_end) continue;
      ScaledRowGrad(bag, grad + b * d, row_begin, row_end, scaled.data());
      for (int64_t k = row_begin; k < row_end; ++k) {
        float* dst = expanded + k * d;
        if (bag.weights == nullptr) {
          std::memcpy(dst, scaled.data(), sizeof(float) * d);
        } else {
          const float w = bag.weights[k];
          for (int64_t i = 0; i < d; ++i) dst[i] = scaled[i] * w;
        }
      }
    }
  });
  return absl::OkStatus();
}

// Scatters the gradient of bag rows [begin, end) into dst (an |M| array) straight from grad [B, D], without the
// [N, D] expansion: rows in order, each row's ids in order, each id's chunks in order. That is the order in which
// the per-element serial scatter walks the expanded rows, and each term is the same product
// sign * ((grad_b / denominator_b) * w_k), so the serial result equals the expanded one bit for bit.
void ScatterBagRows(const RobeBag& bag, const BagTerms& terms, const float* grad, int64_t begin, int64_t end,
                    float* dst) {
  const robe::HashParams& p = bag.params;
  const int32_t d = p.output_dim;
  std::vector<float> scaled(d), term(d);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t row_begin = bag.row_splits[b], row_end = bag.row_splits[b + 1];
    if (row_begin == row_end) continue;
    ScaledRowGrad(bag, grad + b * d, row_begin, row_end, scaled.data());
    for (int64_t k = row_begin; k < row_end; ++k) {
      const int64_t a = OffsetId(bag, k);
      const int64_t row_term = robe::RowTerm(a, p.r3);
      const float* values = scaled.data();
      if (bag.weights != nullptr || p.is_signed) {
        const float w = bag.weights == nullptr ? 1.0f : bag.weights[k];
        for (int32_t i = 0; i < d; ++i) term[i] = bag.weights == nullptr ? scaled[i] : scaled[i] * w;
        if (p.is_signed) {
          const int32_t sign_term = static_cast<int32_t>(robe::RowTerm(a, p.s3));
          for (int32_t i = 0; i < d; ++i) {
            term[i] = robe::SignFromBit(robe::SignBit(sign_term, terms.element[i])) * term[i];
          }
        }
        values = term.data();
      }
      for (int32_t c = 0; c < p.num_chunks; ++c) {
        float* chunk_dst = dst + robe::ChunkStart(p, row_term, terms.chunk[c]);
        const float* src = values + c * p.chunk_size;
        const int32_t width = robe::ChunkWidth(p, c);
        for (int32_t o = 0; o < width; ++o) chunk_dst[o] += src[o];
      }
    }
  }
}

// Splits [0, n) into `parts` contiguous, nearly equal ranges; returns the start of range k (as the per-element
// scatter does).
int64_t PartStart(int64_t n, int64_t parts, int64_t k) { return n / parts * k + std::min(k, n % parts); }

// Below this many gradient elements one thread is faster than waking the pool (robe_cpu_functors.cc's value).
constexpr int64_t kMinElementsPerShard = 1 << 15;

// The dense memory gradient without the [N, D] expansion when the scatter is serial or per-thread partial sums
// (`algorithm` already resolved: never kAuto or kDestinationRanges here). Partial sums: shard k owns bag rows
// [PartStart(k), PartStart(k+1)) and buffer k, fixed before the pool runs, so the result never depends on
// scheduling.
void BagScatterDirect(OpKernelContext* ctx, const RobeBag& bag, const float* grad, int64_t shards,
                      float* memory_grad) {
  const BagTerms terms(bag.params);
  const int64_t memory_size = bag.params.memory_size;
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  const int64_t threads = std::max(1, workers->num_threads);
  if (shards <= 1) {
    tensorflow::Shard(threads, workers->workers, memory_size, 1, [&](int64_t begin, int64_t end) {
      std::fill(memory_grad + begin, memory_grad + end, 0.0f);
    });
    ScatterBagRows(bag, terms, grad, 0, bag.num_rows, memory_grad);
    return;
  }
  Tensor partials;
  OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({(shards - 1) * memory_size}), &partials));
  float* extra = partials.flat<float>().data();
  auto buffer = [&](int64_t k) { return k == 0 ? memory_grad : extra + (k - 1) * memory_size; };
  const int64_t elements = bag.num_ids * bag.params.output_dim;
  tensorflow::Shard(threads, workers->workers, shards, elements / shards * 6 + memory_size,
                    [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float* dst = buffer(k);
      std::fill(dst, dst + memory_size, 0.0f);
      ScatterBagRows(bag, terms, grad, PartStart(bag.num_rows, shards, k), PartStart(bag.num_rows, shards, k + 1),
                     dst);
    }
  });
  tensorflow::Shard(threads, workers->workers, memory_size, shards, [&](int64_t begin, int64_t end) {
    for (int64_t k = 1; k < shards; ++k) {
      const float* src = buffer(k);
      for (int64_t j = begin; j < end; ++j) memory_grad[j] += src[j];
    }
  });
}

functor::ScatterAlgorithm ParseScatterAlgorithm(const std::string& name) {
  if (name == "serial") return functor::ScatterAlgorithm::kSerial;
  if (name == "partial_sums") return functor::ScatterAlgorithm::kPartialSums;
  if (name == "destination_ranges") return functor::ScatterAlgorithm::kDestinationRanges;
  return functor::ScatterAlgorithm::kAuto;
}

template <typename Device>
class RobeBagLookupGradOp : public OpKernel {
 public:
  explicit RobeBagLookupGradOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {
    std::string algorithm;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scatter_algorithm", &algorithm));
    algorithm_ = ParseScatterAlgorithm(algorithm);
  }

  void Compute(OpKernelContext* ctx) override {
    constexpr bool kOnCpu = std::is_same_v<Device, CPUDevice>;
    RobeBag bag;
    OP_REQUIRES_OK(ctx, PrepareBagGrad(ctx, attrs_, &bag, /*check_ids=*/kOnCpu));
    Tensor* memory_grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({bag.params.memory_size}), &memory_grad));
#if GOOGLE_CUDA
    if constexpr (!kOnCpu) {
      OP_REQUIRES_OK(ctx, robe::BagScatterGradGpu(ctx, bag, ctx->input(0).flat<float>().data(),
                                                  memory_grad->flat<float>().data()));
      return;
    }
#endif
    // The per-element scatter's choice, on the same counts: serial and partial sums scatter straight from the
    // [B, D] gradient; destination ranges (|M| large next to the batch) go through the [N, D] expansion.
    const int64_t elements = bag.num_ids * bag.params.output_dim;
    const int64_t threads = std::max(1, ctx->device()->tensorflow_cpu_worker_threads()->num_threads);
    const int64_t shards = std::max<int64_t>(1, std::min<int64_t>(threads, elements / kMinElementsPerShard));
    functor::ScatterAlgorithm algorithm = algorithm_;
    if (algorithm == functor::ScatterAlgorithm::kAuto) {
      algorithm = shards == 1                                        ? functor::ScatterAlgorithm::kSerial
                  : (shards - 1) * bag.params.memory_size <= elements ? functor::ScatterAlgorithm::kPartialSums
                                                                     : functor::ScatterAlgorithm::kDestinationRanges;
    }
    const float* grad = ctx->input(0).flat<float>().data();
    if (algorithm == functor::ScatterAlgorithm::kSerial || algorithm == functor::ScatterAlgorithm::kPartialSums) {
      const int64_t direct_shards =
          algorithm == functor::ScatterAlgorithm::kSerial ? 1 : std::max<int64_t>(2, shards);
      BagScatterDirect(ctx, bag, grad, direct_shards, memory_grad->flat<float>().data());
      return;
    }
    Tensor expanded;
    OP_REQUIRES_OK(ctx, ExpandBagGrad(ctx, bag, grad, &expanded));
    functor::RobeScatterGradFunctor<CPUDevice>()(ctx, attrs_.AsBatch(bag), expanded.flat<float>().data(), algorithm,
                                                 memory_grad->flat<float>().data());
  }

 private:
  BagAttrs attrs_;
  functor::ScatterAlgorithm algorithm_;
};

class RobeBagLookupSparseGradOp : public OpKernel {
 public:
  explicit RobeBagLookupSparseGradOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    RobeBag bag;
    OP_REQUIRES_OK(ctx, PrepareBagGrad(ctx, attrs_, &bag));
    Tensor expanded;
    OP_REQUIRES_OK(ctx, ExpandBagGrad(ctx, bag, ctx->input(0).flat<float>().data(), &expanded));
    const functor::RobeBatch batch = attrs_.AsBatch(bag);
    functor::SparseGradPlan plan;
    OP_REQUIRES_OK(ctx, functor::PlanSparseGrad(ctx, batch, &plan));
    Tensor* indices = nullptr;
    Tensor* values = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({plan.covered}), &indices));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({plan.covered}), &values));
    functor::SparseGradValues(ctx, batch, plan, expanded.flat<float>().data(), indices->flat<int64_t>().data(),
                              values->flat<float>().data());
  }

 private:
  BagAttrs attrs_;
};

// d embeddings[b] / d w_k, dotted with grad[b]: sum: g.e_k; mean: (g.e_k - g.out_b) / W_b;
// sqrtn: (g.e_k - g.out_b * w_k / sqrt(Q_b)) / sqrt(Q_b); 0 where the denominator is 0 (divide_no_nan).
class RobeBagLookupWeightsGradOp : public OpKernel {
 public:
  explicit RobeBagLookupWeightsGradOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {
    OP_REQUIRES(ctx, attrs_.weighted(),
                InvalidArgument("RobeBagLookupWeightsGrad needs weighted=true (an unweighted bag has no weights)"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& memory = ctx->input(1);
    const Tensor& embeddings = ctx->input(5);
    OP_REQUIRES_OK(ctx, CheckMemory(attrs_, memory));
    OP_REQUIRES_OK(ctx, CheckBagInputs(attrs_, ctx->input(2), ctx->input(3), ctx->input(4)));
    const RobeBag bag = attrs_.MakeBag(memory.NumElements(), ctx->input(2), ctx->input(3), ctx->input(4));
    const int64_t d = attrs_.output_dim();
    for (const Tensor* t : {&grad, &embeddings}) {
      OP_REQUIRES(ctx, t->dims() == 2 && t->dim_size(0) == bag.num_rows && t->dim_size(1) == d,
                  InvalidArgument(t == &grad ? "grad" : "embeddings", " must have shape [", bag.num_rows, ", ", d,
                                  "] (rows, output_dim), got ", t->shape().DebugString()));
    }
    OP_REQUIRES_OK(ctx, CheckBagIds(bag));
    Tensor* weights_grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({bag.num_ids}), &weights_grad));
    const BagTerms terms(bag.params);
    const float* m = memory.flat<float>().data();
    const float* g_all = grad.flat<float>().data();
    const float* out_all = embeddings.flat<float>().data();
    float* dw = weights_grad->flat<float>().data();
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    tensorflow::Shard(workers->num_threads, workers->workers, bag.num_rows, CostPerRow(bag),
                      [&](int64_t begin, int64_t end) {
      const robe::HashParams& p = bag.params;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t row_begin = bag.row_splits[b], row_end = bag.row_splits[b + 1];
        const float* g = g_all + b * d;
        float g_dot_out = 0.0f;
        for (int64_t i = 0; i < d; ++i) g_dot_out += g[i] * out_all[b * d + i];
        const float denominator = RowDenominator(bag, row_begin, row_end);
        for (int64_t k = row_begin; k < row_end; ++k) {
          const int64_t a = OffsetId(bag, k);
          const int64_t row_term = robe::RowTerm(a, p.r3);
          const int32_t sign_term = p.is_signed ? static_cast<int32_t>(robe::RowTerm(a, p.s3)) : 0;
          float g_dot_e = 0.0f;
          for (int32_t c = 0; c < p.num_chunks; ++c) {
            const int64_t start = robe::ChunkStart(p, row_term, terms.chunk[c]);
            const int32_t width = robe::ChunkWidth(p, c);
            for (int32_t o = 0; o < width; ++o) {
              const int32_t i = c * p.chunk_size + o;
              float e = m[start + o];
              if (p.is_signed) e *= robe::SignFromBit(robe::SignBit(sign_term, terms.element[i]));
              g_dot_e += g[i] * e;
            }
          }
          float value;
          if (bag.combiner == Combiner::kSum) {
            value = g_dot_e;
          } else if (denominator == 0.0f) {
            value = 0.0f;
          } else if (bag.combiner == Combiner::kMean) {
            value = (g_dot_e - g_dot_out) / denominator;
          } else {
            value = (g_dot_e - g_dot_out * bag.weights[k] / denominator) / denominator;
          }
          dw[k] = value;
        }
      }
    });
  }

 private:
  BagAttrs attrs_;
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("RobeBagLookup").Device(DEVICE_CPU), RobeBagLookupOp<CPUDevice>);
REGISTER_KERNEL_BUILDER(Name("RobeResourceBagLookup").Device(DEVICE_CPU), RobeResourceBagLookupOp<CPUDevice>);
REGISTER_KERNEL_BUILDER(Name("RobeBagLookupGrad").Device(DEVICE_CPU), RobeBagLookupGradOp<CPUDevice>);
REGISTER_KERNEL_BUILDER(Name("RobeBagLookupSparseGrad").Device(DEVICE_CPU), RobeBagLookupSparseGradOp);
REGISTER_KERNEL_BUILDER(Name("RobeBagLookupWeightsGrad").Device(DEVICE_CPU), RobeBagLookupWeightsGradOp);

#if GOOGLE_CUDA
// GPU: the forward and the dense scatter (robe_bag_kernels.cu.cc); row_splits and memory_size are read on the host.
// The sparse and weights gradients stay on the CPU; the placer moves them there.
REGISTER_KERNEL_BUILDER(Name("RobeBagLookup").Device(::tensorflow::DEVICE_GPU).HostMemory("row_splits"),
                        RobeBagLookupOp<GPUDevice>);
REGISTER_KERNEL_BUILDER(
    Name("RobeResourceBagLookup").Device(::tensorflow::DEVICE_GPU).HostMemory("memory").HostMemory("row_splits"),
    RobeResourceBagLookupOp<GPUDevice>);
REGISTER_KERNEL_BUILDER(
    Name("RobeBagLookupGrad").Device(::tensorflow::DEVICE_GPU).HostMemory("row_splits").HostMemory("memory_size"),
    RobeBagLookupGradOp<GPUDevice>);
#endif

}  // namespace tfcompress
