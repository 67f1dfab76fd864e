// Registration and shape functions of the ROBE-Z ops. Kernels: robe_kernels.cc, calling the functors of
// robe_cpu_functors.cc (CPU) and robe_kernels.cu.cc (GPU).
//
// Every op takes the raw per-feature ids i64[B, F] (column f holds ids of table f) and the layer's static
// description as attrs, so a kernel can validate each id against its own table and name the feature in the error:
//
//   cardinalities   list(int)  rows n_f of each of the F tables (offsets are their running sums)
//   output_dim      int        D
//   chunk_size      int        Z in [1, D]
//   hash_constants  list(int)  exactly 6 values in [0, P): R1, R2, R3 (chunk hash), S1, S2, S3 (sign hash)
//   signed          bool       multiply each element by its +-1 sign hash

#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfcompress {
namespace {

using Status = ::absl::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

#define ROBE_COMMON_ATTRS                       \
  Attr("cardinalities: list(int) >= 1")         \
      .Attr("output_dim: int >= 1")             \
      .Attr("chunk_size: int >= 1")             \
      .Attr("hash_constants: list(int) >= 6")   \
      .Attr("signed: bool = false")

// ids must be [B, F] with F = len(cardinalities); returns B. Attr ranges are checked here too so a bad graph
// fails when it is built, not only when it runs.
Status IdsBatchDim(InferenceContext* c, int ids_input, DimensionHandle* batch) {
  std::vector<int64_t> cardinalities;
  TF_RETURN_IF_ERROR(c->GetAttr("cardinalities", &cardinalities));
  int64_t output_dim, chunk_size;
  TF_RETURN_IF_ERROR(c->GetAttr("output_dim", &output_dim));
  TF_RETURN_IF_ERROR(c->GetAttr("chunk_size", &chunk_size));
  if (chunk_size > output_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk_size must be in [1, output_dim=", output_dim, "], got ", chunk_size));
  }
  ShapeHandle ids;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(ids_input), 2, &ids));
  DimensionHandle features;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(ids, 1), static_cast<int64_t>(cardinalities.size()), &features));
  *batch = c->Dim(ids, 0);
  return absl::OkStatus();
}

// [B, F, D] from the ids input.
Status EmbeddingShape(InferenceContext* c, int ids_input, ShapeHandle* out) {
  DimensionHandle batch;
  TF_RETURN_IF_ERROR(IdsBatchDim(c, ids_input, &batch));
  std::vector<int64_t> cardinalities;
  TF_RETURN_IF_ERROR(c->GetAttr("cardinalities", &cardinalities));
  int64_t output_dim;
  TF_RETURN_IF_ERROR(c->GetAttr("output_dim", &output_dim));
  *out = c->MakeShape({batch, c->MakeDim(static_cast<int64_t>(cardinalities.size())), c->MakeDim(output_dim)});
  return absl::OkStatus();
}

Status ResourceLookupShape(InferenceContext* c) {
  ShapeHandle handle, out;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 0, &handle));
  TF_RETURN_IF_ERROR(EmbeddingShape(c, 1, &out));
  c->set_output(0, out);
  return absl::OkStatus();
}

Status LookupShape(InferenceContext* c) {
  ShapeHandle memory;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 1, &memory));
  ShapeHandle out;
  TF_RETURN_IF_ERROR(EmbeddingShape(c, 1, &out));
  c->set_output(0, out);
  return absl::OkStatus();
}

// The upstream gradient must be [B, F, D] matching the ids; memory_size is a scalar.
Status CheckGradInputs(InferenceContext* c) {
  ShapeHandle expected, grad, merged, memory_size;
  TF_RETURN_IF_ERROR(EmbeddingShape(c, 1, &expected));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &grad));
  TF_RETURN_IF_ERROR(c->Merge(grad, expected, &merged));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 0, &memory_size));
  return absl::OkStatus();
}

Status DenseGradShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckGradInputs(c));
  DimensionHandle memory_size;
  TF_RETURN_IF_ERROR(c->MakeDimForScalarInput(2, &memory_size));
  c->set_output(0, c->Vector(memory_size));
  return absl::OkStatus();
}

Status SparseGradShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckGradInputs(c));
  c->set_output(0, c->Vector(InferenceContext::kUnknownDim));
  c->set_output(1, c->Vector(InferenceContext::kUnknownDim));
  return absl::OkStatus();
}

Status PositionsShape(InferenceContext* c) {
  ShapeHandle out, memory_size;
  TF_RETURN_IF_ERROR(EmbeddingShape(c, 0, &out));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &memory_size));
  c->set_output(0, out);
  c->set_output(1, out);
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("RobeLookup")
    .Input("memory: float")
    .Input("ids: int64")
    .Output("embeddings: float")
    .ROBE_COMMON_ATTRS
    // Read only by the registered Python gradient: "dense" -> RobeLookupGrad, "sparse" -> RobeLookupSparseGrad.
    .Attr("gradient: {'dense', 'sparse'} = 'dense'")
    .SetShapeFn(LookupShape)
    .Doc(R"doc(
ROBE-Z lookup: embeddings[b, f, i] = sign * memory[h(a, i // Z) + i % Z], a = ids[b, f] + offset_f.
The hash is computed once per chunk and each chunk is copied as one contiguous slice of memory.
)doc");

REGISTER_OP("RobeResourceLookup")
    .Input("memory: resource")
    .Input("ids: int64")
    .Output("embeddings: float")
    .ROBE_COMMON_ATTRS
    .Attr("gradient: {'dense', 'sparse'} = 'dense'")
    .SetShapeFn(ResourceLookupShape)
    .Doc(R"doc(
RobeLookup reading a float32 [M] resource variable in place (no copy of M, whatever the variable's access mode).
)doc");

REGISTER_OP("RobeLookupGrad")
    .Input("grad: float")
    .Input("ids: int64")
    .Input("memory_size: int64")
    .Output("memory_grad: float")
    .ROBE_COMMON_ATTRS
    .Attr("scatter_algorithm: {'auto', 'serial', 'partial_sums', 'destination_ranges'} = 'auto'")
    .SetShapeFn(DenseGradShape)
    .Doc(R"doc(
Dense gradient of RobeLookup: grad f32[B, F, D] scatter-added into a zeroed f32[memory_size]. Race-free and
deterministic on the CPU ('auto' picks per-thread partial sums for small arrays, destination ranges for large).
)doc");

REGISTER_OP("RobeLookupSparseGrad")
    .Input("grad: float")
    .Input("ids: int64")
    .Input("memory_size: int64")
    .Output("indices: int64")
    .Output("values: float")
    .ROBE_COMMON_ATTRS
    .SetShapeFn(SparseGradShape)
    .Doc(R"doc(
Coalesced sparse gradient of RobeLookup: the sorted, unique positions of memory that the batch touches and the
summed gradient at each (an IndexedSlices of a memory_size-long vector).
)doc");

REGISTER_OP("RobePositions")
    .Input("ids: int64")
    .Input("memory_size: int64")
    .Output("positions: int64")
    .Output("signs: float")
    .ROBE_COMMON_ATTRS
    .SetShapeFn(PositionsShape)
    .Doc(R"doc(
The ROBE-Z positions i64[B, F, D] and signs f32[B, F, D] (all +1 when not signed) that RobeLookup reads.
)doc");

}  // namespace tfcompress
