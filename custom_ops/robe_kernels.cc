// Op kernels of the ROBE-Z ops (registered in robe_ops.cc) and their kernel registrations: attr parsing, argument
// checks and output allocation. The computation is in the functors: robe_cpu_functors.cc on the CPU (TensorFlow's
// intra-op thread pool), robe_kernels.cu.cc on the GPU.

#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "robe_cpu_functors.h"
#include "robe_functor.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#include "unsupported/Eigen/CXX11/Tensor"
#endif

namespace tfcompress {

#if GOOGLE_CUDA
// Defined in robe_kernels.cu.cc; declared here so the GPU kernel registrations below instantiate them.
namespace functor {
using GPUDevice = Eigen::GpuDevice;
template <>
absl::Status RobeValidateIdsFunctor<GPUDevice>::operator()(tensorflow::OpKernelContext* ctx, const RobeBatch& batch);
template <>
void RobeLookupFunctor<GPUDevice>::operator()(tensorflow::OpKernelContext* ctx, const RobeBatch& batch,
                                              const float* memory, float* embeddings);
template <>
void RobeScatterGradFunctor<GPUDevice>::operator()(tensorflow::OpKernelContext* ctx, const RobeBatch& batch,
                                                   const float* grad, ScatterAlgorithm algorithm,
                                                   float* memory_grad);
}  // namespace functor
#endif

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Attributes shared by every op: parsed and validated once, when the kernel is constructed.

class RobeAttrs {
 public:
  explicit RobeAttrs(OpKernelConstruction* ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("cardinalities", &cardinalities_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("output_dim", &output_dim_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("chunk_size", &chunk_size_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("hash_constants", &hash_constants_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("signed", &signed_));
    // D is bounded so that i * S2 < 2^63 in the element term (and the [rows, D] shape stays sane).
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
    OP_REQUIRES(ctx, !cardinalities_.empty(), InvalidArgument("cardinalities must not be empty"));
    offsets_.resize(cardinalities_.size());
    int64_t total = 0;
    for (size_t f = 0; f < cardinalities_.size(); ++f) {
      OP_REQUIRES(ctx, cardinalities_[f] >= 1,
                  InvalidArgument("cardinalities[", f, "] must be >= 1, got ", cardinalities_[f]));
      offsets_[f] = total;
      // a = id + offset < sum of cardinalities must fit int64 (robe_hash.py's contract: non-negative int64 a).
      OP_REQUIRES(ctx, cardinalities_[f] <= std::numeric_limits<int64_t>::max() - total,
                  InvalidArgument("the sum of cardinalities overflows int64 at feature ", f));
      total += cardinalities_[f];
    }
  }

  int64_t num_features() const { return static_cast<int64_t>(cardinalities_.size()); }
  int64_t output_dim() const { return output_dim_; }
  int64_t chunk_size() const { return chunk_size_; }
  const std::vector<int64_t>& offsets() const { return offsets_; }
  const std::vector<int64_t>& cardinalities() const { return cardinalities_; }

  robe::HashParams Params(int64_t memory_size) const {
    const auto& k = hash_constants_;
    return robe::MakeHashParams(k[0], k[1], k[2], k[3], k[4], k[5], memory_size, static_cast<int32_t>(output_dim_),
                                static_cast<int32_t>(chunk_size_), signed_);
  }

 private:
  std::vector<int64_t> cardinalities_;
  std::vector<int64_t> offsets_;
  std::vector<int64_t> hash_constants_;
  int64_t output_dim_ = 0;
  int64_t chunk_size_ = 0;
  bool signed_ = false;
};

// ids must be a [B, F] int64 matrix (F = number of tables). Their values are checked by RobeValidateIdsFunctor.
absl::Status CheckIdsShape(const RobeAttrs& attrs, const Tensor& ids) {
  if (ids.dims() != 2 || ids.dim_size(1) != attrs.num_features()) {
    return InvalidArgument("ids must have shape [batch, ", attrs.num_features(), "] (one column per table), got ",
                           ids.shape().DebugString());
  }
  return absl::OkStatus();
}

// ROBE arrays beyond 2^48 floats (1 PiB) are not a thing; the bound keeps every byte count far from overflow.
constexpr int64_t kMaxMemorySize = int64_t{1} << 48;

// memory_size (a host scalar input of the gradient and positions ops) must hold at least one chunk.
absl::Status ReadMemorySize(const RobeAttrs& attrs, const Tensor& t, int64_t* memory_size) {
  if (!tensorflow::TensorShapeUtils::IsScalar(t.shape())) {
    return InvalidArgument("memory_size must be a scalar, got shape ", t.shape().DebugString());
  }
  *memory_size = t.scalar<int64_t>()();
  if (*memory_size < attrs.chunk_size() || *memory_size > kMaxMemorySize) {
    return InvalidArgument("memory_size must be in [chunk_size=", attrs.chunk_size(), " (one chunk), 2^48], got ",
                           *memory_size);
  }
  return absl::OkStatus();
}

// The upstream gradient must be [B, F, D] for ids [B, F].
absl::Status CheckGradShape(const RobeAttrs& attrs, const Tensor& grad, const Tensor& ids) {
  if (grad.dims() != 3 || grad.dim_size(0) != ids.dim_size(0) || grad.dim_size(1) != ids.dim_size(1) ||
      grad.dim_size(2) != attrs.output_dim()) {
    return InvalidArgument("grad must have shape [", ids.dim_size(0), ", ", ids.dim_size(1), ", ",
                           attrs.output_dim(), "] (ids' shape + output_dim), got ", grad.shape().DebugString());
  }
  return absl::OkStatus();
}

// [B, F, D] for ids [B, F], built with overflow checks instead of TensorShape's CHECK.
absl::Status EmbeddingShape(const RobeAttrs& attrs, const Tensor& ids, TensorShape* shape) {
  return TensorShape::BuildTensorShape({ids.dim_size(0), ids.dim_size(1), attrs.output_dim()}, shape);
}

functor::RobeBatch MakeBatch(const RobeAttrs& attrs, const robe::HashParams& params, const Tensor& ids) {
  functor::RobeBatch batch;
  batch.params = params;
  batch.ids = ids.flat<int64_t>().data();
  batch.offsets = attrs.offsets().data();
  batch.cardinalities = attrs.cardinalities().data();
  batch.num_features = static_cast<int32_t>(attrs.num_features());
  batch.rows = ids.NumElements();
  return batch;
}

// ---------------------------------------------------------------------------------------------------------------
// Op kernels.

// The forward lookup from a memory tensor, shared by the tensor and the resource-variable forms of the op.
template <typename Device>
void LookupFromMemory(OpKernelContext* ctx, const RobeAttrs& attrs, const Tensor& memory, const Tensor& ids) {
  OP_REQUIRES(ctx, memory.dtype() == tensorflow::DT_FLOAT,
              InvalidArgument("memory must be float32, got ", tensorflow::DataTypeString(memory.dtype())));
  OP_REQUIRES(ctx, memory.dims() == 1,
              InvalidArgument("memory must be a vector, got shape ", memory.shape().DebugString()));
  OP_REQUIRES(ctx, memory.NumElements() >= attrs.chunk_size(),
              InvalidArgument("memory must hold at least one chunk (chunk_size=", attrs.chunk_size(), "), got ",
                              memory.NumElements(), " elements"));
  OP_REQUIRES_OK(ctx, CheckIdsShape(attrs, ids));
  const functor::RobeBatch batch = MakeBatch(attrs, attrs.Params(memory.NumElements()), ids);
  if constexpr (std::is_same_v<Device, CPUDevice>) {
    // CPU: the ids are checked inside the lookup pass; only a batch with a bad id pays for the search that names it.
    TensorShape shape;
    OP_REQUIRES_OK(ctx, EmbeddingShape(attrs, ids, &shape));
    Tensor* embeddings = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &embeddings));
    if (ids.NumElements() == 0) return;
    if (functor::RobeLookupFunctor<CPUDevice>::LookupCheckingIds(ctx, batch, memory.flat<float>().data(),
                                                                  embeddings->flat<float>().data())) {
      OP_REQUIRES_OK(ctx, functor::RobeValidateIdsFunctor<CPUDevice>()(ctx, batch));
      // Unreachable (both checks use the same rule), but never hand out the garbage output.
      ctx->CtxFailure(__FILE__, __LINE__, absl::InternalError("an id was out of range but none was found"));
    }
  } else {
    OP_REQUIRES_OK(ctx, functor::RobeValidateIdsFunctor<Device>()(ctx, batch));
    TensorShape shape;
    OP_REQUIRES_OK(ctx, EmbeddingShape(attrs, ids, &shape));
    Tensor* embeddings = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &embeddings));
    if (ids.NumElements() == 0) return;
    functor::RobeLookupFunctor<Device>()(ctx, batch, memory.flat<float>().data(), embeddings->flat<float>().data());
  }
}

template <typename Device>
class RobeLookupOp : public OpKernel {
 public:
  explicit RobeLookupOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {}

  void Compute(OpKernelContext* ctx) override { LookupFromMemory<Device>(ctx, attrs_, ctx->input(0), ctx->input(1)); }

 private:
  RobeAttrs attrs_;
};

// Reads the variable in place under its shared lock, as ResourceGather does. Going through ReadVariableOp instead
// would copy all of M on every step once a sparse optimizer update has put the variable in copy-on-read mode.
template <typename Device>
class RobeResourceLookupOp : public OpKernel {
 public:
  explicit RobeResourceLookupOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<tensorflow::Var> variable;
    OP_REQUIRES_OK(ctx, tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, 0), &variable));
    tensorflow::tf_shared_lock lock(*variable->mu());
    OP_REQUIRES(ctx, variable->is_initialized,
                absl::FailedPreconditionError("the memory variable is not initialized"));
    LookupFromMemory<Device>(ctx, attrs_, *variable->tensor(), ctx->input(1));
  }

 private:
  RobeAttrs attrs_;
};

functor::ScatterAlgorithm ParseScatterAlgorithm(const std::string& name) {
  if (name == "serial") return functor::ScatterAlgorithm::kSerial;
  if (name == "partial_sums") return functor::ScatterAlgorithm::kPartialSums;
  if (name == "destination_ranges") return functor::ScatterAlgorithm::kDestinationRanges;
  return functor::ScatterAlgorithm::kAuto;
}

// Shared input checks of the two gradient ops; fills memory_size and batch.
template <typename Device>
absl::Status PrepareGrad(OpKernelContext* ctx, const RobeAttrs& attrs, int64_t* memory_size,
                         functor::RobeBatch* batch) {
  const Tensor& grad = ctx->input(0);
  const Tensor& ids = ctx->input(1);
  TF_RETURN_IF_ERROR(ReadMemorySize(attrs, ctx->input(2), memory_size));
  TF_RETURN_IF_ERROR(CheckIdsShape(attrs, ids));
  TF_RETURN_IF_ERROR(CheckGradShape(attrs, grad, ids));
  *batch = MakeBatch(attrs, attrs.Params(*memory_size), ids);
  return functor::RobeValidateIdsFunctor<Device>()(ctx, *batch);
}

template <typename Device>
class RobeLookupGradOp : public OpKernel {
 public:
  explicit RobeLookupGradOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {
    std::string algorithm;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scatter_algorithm", &algorithm));
    algorithm_ = ParseScatterAlgorithm(algorithm);
  }

  void Compute(OpKernelContext* ctx) override {
    int64_t memory_size = 0;
    functor::RobeBatch batch;
    OP_REQUIRES_OK(ctx, PrepareGrad<Device>(ctx, attrs_, &memory_size, &batch));
    Tensor* memory_grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({memory_size}), &memory_grad));
    functor::RobeScatterGradFunctor<Device>()(ctx, batch, ctx->input(0).flat<float>().data(), algorithm_,
                                              memory_grad->flat<float>().data());
  }

 private:
  RobeAttrs attrs_;
  functor::ScatterAlgorithm algorithm_;
};

class RobeLookupSparseGradOp : public OpKernel {
 public:
  explicit RobeLookupSparseGradOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    int64_t memory_size = 0;
    functor::RobeBatch batch;
    OP_REQUIRES_OK(ctx, PrepareGrad<CPUDevice>(ctx, attrs_, &memory_size, &batch));
    functor::SparseGradPlan plan;
    OP_REQUIRES_OK(ctx, functor::PlanSparseGrad(ctx, batch, &plan));
    Tensor* indices = nullptr;
    Tensor* values = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({plan.covered}), &indices));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({plan.covered}), &values));
    functor::SparseGradValues(ctx, batch, plan, ctx->input(0).flat<float>().data(), indices->flat<int64_t>().data(),
                              values->flat<float>().data());
  }

 private:
  RobeAttrs attrs_;
};

class RobePositionsOp : public OpKernel {
 public:
  explicit RobePositionsOp(OpKernelConstruction* ctx) : OpKernel(ctx), attrs_(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& ids = ctx->input(0);
    int64_t memory_size = 0;
    OP_REQUIRES_OK(ctx, ReadMemorySize(attrs_, ctx->input(1), &memory_size));
    OP_REQUIRES_OK(ctx, CheckIdsShape(attrs_, ids));
    const functor::RobeBatch batch = MakeBatch(attrs_, attrs_.Params(memory_size), ids);
    OP_REQUIRES_OK(ctx, functor::RobeValidateIdsFunctor<CPUDevice>()(ctx, batch));
    TensorShape shape;
    OP_REQUIRES_OK(ctx, EmbeddingShape(attrs_, ids, &shape));
    Tensor* positions = nullptr;
    Tensor* signs = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &positions));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, shape, &signs));
    functor::ComputePositions(batch, positions->flat<int64_t>().data(), signs->flat<float>().data());
  }

 private:
  RobeAttrs attrs_;
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("RobeLookup").Device(DEVICE_CPU), RobeLookupOp<CPUDevice>);
REGISTER_KERNEL_BUILDER(Name("RobeResourceLookup").Device(DEVICE_CPU), RobeResourceLookupOp<CPUDevice>);
REGISTER_KERNEL_BUILDER(Name("RobeLookupGrad").Device(DEVICE_CPU), RobeLookupGradOp<CPUDevice>);
REGISTER_KERNEL_BUILDER(Name("RobeLookupSparseGrad").Device(DEVICE_CPU), RobeLookupSparseGradOp);
REGISTER_KERNEL_BUILDER(Name("RobePositions").Device(DEVICE_CPU), RobePositionsOp);

#if GOOGLE_CUDA
// GPU: the forward lookup and the dense scatter (robe_kernels.cu.cc). memory_size is read on the host. The sparse
// gradient and the positions op stay on the CPU; the placer moves them there.
using functor::GPUDevice;
REGISTER_KERNEL_BUILDER(Name("RobeLookup").Device(::tensorflow::DEVICE_GPU), RobeLookupOp<GPUDevice>);
REGISTER_KERNEL_BUILDER(Name("RobeResourceLookup").Device(::tensorflow::DEVICE_GPU).HostMemory("memory"),
                        RobeResourceLookupOp<GPUDevice>);
REGISTER_KERNEL_BUILDER(Name("RobeLookupGrad").Device(::tensorflow::DEVICE_GPU).HostMemory("memory_size"),
                        RobeLookupGradOp<GPUDevice>);
#endif

}  // namespace tfcompress
