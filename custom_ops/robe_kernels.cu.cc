// GPU specializations of the ROBE-Z functors (robe_functor.h). Compiled by nvcc into the op library only when
// TensorFlow is a CUDA build (custom_ops/build.py); the kernels themselves live in robe_gpu_kernels.cu.h, which the
// standalone harness (cuda_harness/) compiles and checks against NumPy without TensorFlow.
//
// Status: compile-checked with nvcc against the harness only. This TensorFlow glue has not run on a GPU.

#if GOOGLE_CUDA

#define EIGEN_USE_GPU

#include "absl/strings/str_cat.h"
#include "robe_functor.h"
#include "robe_gpu_kernels.cu.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tfcompress {
namespace functor {

using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using GPUDevice = Eigen::GpuDevice;

namespace {

// offsets [F] then cardinalities [F], copied to the device (the kernels index them per row).
absl::Status CopyTables(OpKernelContext* ctx, const RobeBatch& batch, Tensor* tables) {
  const int64_t features = batch.num_features;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT64, TensorShape({2 * features}), tables));
  const GPUDevice& d = ctx->eigen_device<GPUDevice>();
  int64_t* dst = tables->flat<int64_t>().data();
  // The sources are host vectors owned by the kernel object, alive for as long as the copy can take.
  d.memcpyHostToDevice(dst, batch.offsets, sizeof(int64_t) * features);
  d.memcpyHostToDevice(dst + features, batch.cardinalities, sizeof(int64_t) * features);
  return absl::OkStatus();
}

absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, " failed: ", cudaGetErrorString(error)));
}

}  // namespace

template <>
absl::Status RobeValidateIdsFunctor<GPUDevice>::operator()(OpKernelContext* ctx, const RobeBatch& batch) {
  if (batch.rows == 0) return absl::OkStatus();
  Tensor tables, flag;
  TF_RETURN_IF_ERROR(CopyTables(ctx, batch, &tables));
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT64, TensorShape({1}), &flag));
  const GPUDevice& d = ctx->eigen_device<GPUDevice>();
  auto* first_bad = reinterpret_cast<unsigned long long*>(flag.flat<int64_t>().data());
  TF_RETURN_IF_ERROR(CudaStatus(robe::gpu::LaunchFindFirstBadId(batch.ids, tables.flat<int64_t>().data() +
                                                                    batch.num_features,
                                                                batch.num_features, batch.rows, first_bad,
                                                                d.stream()),
                                "the id check kernel"));
  // One 8-byte copy and a stream sync per call: the price of naming the bad id, as the CPU kernel does.
  unsigned long long bad_row = 0;
  d.memcpyDeviceToHost(&bad_row, first_bad, sizeof(bad_row));
  d.synchronize();
  if (bad_row == ~0ull) return absl::OkStatus();
  int64_t value = 0;
  d.memcpyDeviceToHost(&value, batch.ids + bad_row, sizeof(value));
  d.synchronize();
  const int64_t f = static_cast<int64_t>(bad_row % batch.num_features);
  return absl::InvalidArgumentError(absl::StrCat("id out of range: feature ", f, ", value ", value, " (row ",
                                                 bad_row / batch.num_features, "), allowed [0, ",
                                                 batch.cardinalities[f], ")"));
}

template <>
void RobeLookupFunctor<GPUDevice>::operator()(OpKernelContext* ctx, const RobeBatch& batch, const float* memory,
                                              float* embeddings) {
  Tensor tables;
  OP_REQUIRES_OK(ctx, CopyTables(ctx, batch, &tables));
  const GPUDevice& d = ctx->eigen_device<GPUDevice>();
  OP_REQUIRES_OK(ctx, CudaStatus(robe::gpu::LaunchLookup(batch.params, batch.ids, tables.flat<int64_t>().data(),
                                                         batch.num_features, batch.rows, memory, embeddings,
                                                         d.stream()),
                                 "the ROBE-Z lookup kernel"));
}

template <>
void RobeScatterGradFunctor<GPUDevice>::operator()(OpKernelContext* ctx, const RobeBatch& batch, const float* grad,
                                                   ScatterAlgorithm /*algorithm: the GPU always uses atomics*/,
                                                   float* memory_grad) {
  Tensor tables;
  OP_REQUIRES_OK(ctx, CopyTables(ctx, batch, &tables));
  const GPUDevice& d = ctx->eigen_device<GPUDevice>();
  OP_REQUIRES_OK(ctx, CudaStatus(robe::gpu::LaunchScatter(batch.params, batch.ids, tables.flat<int64_t>().data(),
                                                          batch.num_features, batch.rows, grad, memory_grad,
                                                          d.stream()),
                                 "the ROBE-Z scatter kernel"));
}

}  // namespace functor
}  // namespace tfcompress

#endif  // GOOGLE_CUDA
