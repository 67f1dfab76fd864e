// Registration and shape functions of the pooled (bag) ROBE-Z ops: a hashed lookup of every id of a ragged batch
// and a per-row sum / mean / sqrtn in one kernel (tf.nn.safe_embedding_lookup_sparse's contract once the caller has
// dropped ids < 0 and weights <= 0). Kernels: robe_bag_kernels.cc (CPU), robe_bag_kernels.cu.cc (GPU).
//
// One table of a shared ROBE array per op: its ids are offset by `table_offset` before hashing, exactly as column f
// of RobeLookup is offset by the running sum of the cardinalities before it. Inputs of every bag op:
//
//   ids         i64[N]      the bag's ids, rows laid end to end; each in [0, cardinality)
//   row_splits  i64[B + 1]  row b holds ids[row_splits[b] : row_splits[b + 1]]; 0 = first, N = last, non-decreasing
//   weights     f32[N]      per-id weights when `weighted`, else an empty f32[0]
//
// Attrs:
//   table_offset    int        added to each id before hashing (a = id + table_offset)
//   cardinality     int        ids must lie in [0, cardinality)
//   output_dim, chunk_size, hash_constants, signed: as RobeLookup (robe_ops.cc)
//   combiner        string     'sum': sum_k w_k e_k; 'mean': that / sum_k w_k; 'sqrtn': that / sqrt(sum_k w_k^2)
//                              (a zero denominator gives zeros, like tf.math.divide_no_nan); empty rows are zeros
//   weighted        bool       whether `weights` holds per-id weights (else every weight is 1)

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

#define ROBE_BAG_ATTRS                                      \
  Attr("table_offset: int >= 0")                            \
      .Attr("cardinality: int >= 1")                        \
      .Attr("output_dim: int >= 1")                         \
      .Attr("chunk_size: int >= 1")                         \
      .Attr("hash_constants: list(int) >= 6")               \
      .Attr("signed: bool = false")                         \
      .Attr("combiner: {'sum', 'mean', 'sqrtn'} = 'sum'")   \
      .Attr("weighted: bool = false")

// ids, row_splits and weights (inputs first, first + 1, first + 2) are vectors; returns B = len(row_splits) - 1.
Status BagRows(InferenceContext* c, int first, DimensionHandle* rows) {
  int64_t output_dim, chunk_size;
  TF_RETURN_IF_ERROR(c->GetAttr("output_dim", &output_dim));
  TF_RETURN_IF_ERROR(c->GetAttr("chunk_size", &chunk_size));
  if (chunk_size > output_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk_size must be in [1, output_dim=", output_dim, "], got ", chunk_size));
  }
  ShapeHandle ids, row_splits, weights;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first), 1, &ids));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first + 1), 1, &row_splits));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first + 2), 1, &weights));
  bool weighted;
  TF_RETURN_IF_ERROR(c->GetAttr("weighted", &weighted));
  DimensionHandle merged;
  if (weighted) TF_RETURN_IF_ERROR(c->Merge(c->Dim(ids, 0), c->Dim(weights, 0), &merged));
  return c->Subtract(c->Dim(row_splits, 0), 1, rows);
}

Status BagLookupShape(InferenceContext* c) {
  ShapeHandle handle_or_memory;
  TF_RETURN_IF_ERROR(c->WithRankAtMost(c->input(0), 1, &handle_or_memory));
  DimensionHandle rows;
  TF_RETURN_IF_ERROR(BagRows(c, 1, &rows));
  int64_t output_dim;
  TF_RETURN_IF_ERROR(c->GetAttr("output_dim", &output_dim));
  c->set_output(0, c->Matrix(rows, output_dim));
  return absl::OkStatus();
}

// Gradient ops: grad [B, D], ids, row_splits, weights, memory_size (scalar).
Status CheckBagGradInputs(InferenceContext* c) {
  DimensionHandle rows;
  TF_RETURN_IF_ERROR(BagRows(c, 1, &rows));
  int64_t output_dim;
  TF_RETURN_IF_ERROR(c->GetAttr("output_dim", &output_dim));
  ShapeHandle grad, merged, memory_size;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &grad));
  TF_RETURN_IF_ERROR(c->Merge(grad, c->Matrix(rows, output_dim), &merged));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 0, &memory_size));
  return absl::OkStatus();
}

Status BagDenseGradShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckBagGradInputs(c));
  DimensionHandle memory_size;
  TF_RETURN_IF_ERROR(c->MakeDimForScalarInput(4, &memory_size));
  c->set_output(0, c->Vector(memory_size));
  return absl::OkStatus();
}

Status BagSparseGradShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckBagGradInputs(c));
  c->set_output(0, c->Vector(InferenceContext::kUnknownDim));
  c->set_output(1, c->Vector(InferenceContext::kUnknownDim));
  return absl::OkStatus();
}

// Weights gradient: grad [B, D], memory [M], ids, row_splits, weights, embeddings [B, D] -> [N].
Status BagWeightsGradShape(InferenceContext* c) {
  ShapeHandle memory, grad, embeddings, merged;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &memory));
  DimensionHandle rows;
  TF_RETURN_IF_ERROR(BagRows(c, 2, &rows));
  int64_t output_dim;
  TF_RETURN_IF_ERROR(c->GetAttr("output_dim", &output_dim));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &grad));
  TF_RETURN_IF_ERROR(c->Merge(grad, c->Matrix(rows, output_dim), &merged));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 2, &embeddings));
  TF_RETURN_IF_ERROR(c->Merge(embeddings, merged, &merged));
  c->set_output(0, c->Vector(c->Dim(c->input(2), 0)));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("RobeBagLookup")
    .Input("memory: float")
    .Input("ids: int64")
    .Input("row_splits: int64")
    .Input("weights: float")
    .Output("embeddings: float")
    .ROBE_BAG_ATTRS
    // Read only by the registered Python gradient: "dense" -> RobeBagLookupGrad, "sparse" -> RobeBagLookupSparseGrad.
    .Attr("gradient: {'dense', 'sparse'} = 'dense'")
    .SetShapeFn(BagLookupShape)
    .Doc(R"doc(
Pooled ROBE-Z lookup: embeddings[b] = combine over k in row b of w_k * e(ids[k] + table_offset), with e the
RobeLookup row. Summed in id order (k ascending), then divided by the combiner's denominator.
)doc");

REGISTER_OP("RobeResourceBagLookup")
    .Input("memory: resource")
    .Input("ids: int64")
    .Input("row_splits: int64")
    .Input("weights: float")
    .Output("embeddings: float")
    .ROBE_BAG_ATTRS
    .Attr("gradient: {'dense', 'sparse'} = 'dense'")
    .SetShapeFn(BagLookupShape)
    .Doc(R"doc(
RobeBagLookup reading a float32 [M] resource variable in place (as RobeResourceLookup).
)doc");

REGISTER_OP("RobeBagLookupGrad")
    .Input("grad: float")
    .Input("ids: int64")
    .Input("row_splits: int64")
    .Input("weights: float")
    .Input("memory_size: int64")
    .Output("memory_grad: float")
    .ROBE_BAG_ATTRS
    .Attr("scatter_algorithm: {'auto', 'serial', 'partial_sums', 'destination_ranges'} = 'auto'")
    .SetShapeFn(BagDenseGradShape)
    .Doc(R"doc(
Dense gradient of RobeBagLookup w.r.t. memory: id k of row b contributes (grad[b] / denominator_b) * w_k, scattered
as RobeLookupGrad scatters (race-free and deterministic on the CPU).
)doc");

REGISTER_OP("RobeBagLookupSparseGrad")
    .Input("grad: float")
    .Input("ids: int64")
    .Input("row_splits: int64")
    .Input("weights: float")
    .Input("memory_size: int64")
    .Output("indices: int64")
    .Output("values: float")
    .ROBE_BAG_ATTRS
    .SetShapeFn(BagSparseGradShape)
    .Doc(R"doc(
Coalesced sparse gradient of RobeBagLookup w.r.t. memory: sorted unique positions and their summed gradient.
)doc");

REGISTER_OP("RobeBagLookupWeightsGrad")
    .Input("grad: float")
    .Input("memory: float")
    .Input("ids: int64")
    .Input("row_splits: int64")
    .Input("weights: float")
    .Input("embeddings: float")
    .Output("weights_grad: float")
    .ROBE_BAG_ATTRS
    .SetShapeFn(BagWeightsGradShape)
    .Doc(R"doc(
Gradient of RobeBagLookup w.r.t. its weights (weighted only), given the forward output `embeddings`. For the
sum combiner g_b . e_k; for mean (g_b . e_k - g_b . out_b) / W_b; for sqrtn
(g_b . e_k - g_b . out_b * w_k / sqrt(Q_b)) / sqrt(Q_b), with W_b = sum of the row's weights, Q_b = sum of their
squares; 0 where the denominator is 0.
)doc");

}  // namespace tfcompress
