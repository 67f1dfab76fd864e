// GPU functions of the pooled (bag) ROBE-Z ops, called by the op kernels in robe_bag_kernels.cc. Compiled by nvcc
// into the op library only when TensorFlow is a CUDA build (custom_ops/build.py); the kernels live in
// robe_bag_gpu_kernels.cu.h, which the standalone harness (cuda_harness/) checks against NumPy without TensorFlow.
//
// row_splits arrive in host memory (the kernels' HostMemory registration): the op checks them on the host, and
// they are copied to the device here. Status: compile-checked only; this glue has not run on a GPU.

#if GOOGLE_CUDA

#define EIGEN_USE_GPU

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "robe_bag_functor.h"
#include "robe_bag_gpu_kernels.cu.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tfcompress {
namespace robe {

using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using GPUDevice = Eigen::GpuDevice;

namespace {

absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, " failed: ", cudaGetErrorString(error)));
}

// Copies the host row_splits to the device (into *device_splits) and checks every id on the device; on success
// *device_bag is `host_bag` with its row_splits on the device. The stream is synchronized before returning, so the
// host row_splits may be released afterwards.
absl::Status PrepareDeviceBag(OpKernelContext* ctx, const RobeBag& host_bag, Tensor* device_splits,
                              RobeBag* device_bag) {
  const GPUDevice& d = ctx->eigen_device<GPUDevice>();
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT64, TensorShape({host_bag.num_rows + 1}), device_splits));
  d.memcpyHostToDevice(device_splits->flat<int64_t>().data(), host_bag.row_splits,
                       sizeof(int64_t) * (host_bag.num_rows + 1));
  Tensor flag;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT64, TensorShape({1}), &flag));
  auto* first_bad = reinterpret_cast<unsigned long long*>(flag.flat<int64_t>().data());
  TF_RETURN_IF_ERROR(CudaStatus(
      gpu::LaunchBagFindFirstBadId(host_bag.ids, host_bag.num_ids, host_bag.cardinality, first_bad, d.stream()),
      "the bag id check kernel"));
  unsigned long long bad = 0;
  d.memcpyDeviceToHost(&bad, first_bad, sizeof(bad));
  d.synchronize();
  if (bad != ~0ull) {
    int64_t value = 0;
    d.memcpyDeviceToHost(&value, host_bag.ids + bad, sizeof(value));
    d.synchronize();
    const int64_t k = static_cast<int64_t>(bad);
    const int64_t row =
        std::upper_bound(host_bag.row_splits, host_bag.row_splits + host_bag.num_rows + 1, k) - host_bag.row_splits - 1;
    return absl::InvalidArgumentError(absl::StrCat("id out of range: ids[", k, "] = ", value, " (row ", row,
                                                   "), allowed [0, ", host_bag.cardinality, ")"));
  }
  *device_bag = host_bag;
  device_bag->row_splits = device_splits->flat<int64_t>().data();
  return absl::OkStatus();
}

}  // namespace

// `bag`: ids and weights on the device, row_splits on the host (validated).
absl::Status BagForwardGpu(OpKernelContext* ctx, const RobeBag& bag, const float* memory, float* embeddings) {
  Tensor device_splits;
  RobeBag device_bag;
  TF_RETURN_IF_ERROR(PrepareDeviceBag(ctx, bag, &device_splits, &device_bag));
  return CudaStatus(gpu::LaunchBagForward(device_bag, memory, embeddings, ctx->eigen_device<GPUDevice>().stream()),
                    "the bag forward kernel");
}

absl::Status BagScatterGradGpu(OpKernelContext* ctx, const RobeBag& bag, const float* grad, float* memory_grad) {
  Tensor device_splits, denominators;
  RobeBag device_bag;
  TF_RETURN_IF_ERROR(PrepareDeviceBag(ctx, bag, &device_splits, &device_bag));
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({std::max<int64_t>(1, bag.num_rows)}), &denominators));
  const cudaStream_t stream = ctx->eigen_device<GPUDevice>().stream();
  float* row_denominators = denominators.flat<float>().data();
  TF_RETURN_IF_ERROR(CudaStatus(gpu::LaunchBagRowDenominators(device_bag, row_denominators, stream),
                                "the bag denominators kernel"));
  return CudaStatus(gpu::LaunchBagScatter(device_bag, grad, row_denominators, memory_grad, stream),
                    "the bag scatter kernel");
}

}  // namespace robe
}  // namespace tfcompress

#endif  // GOOGLE_CUDA
