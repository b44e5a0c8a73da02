// Grouped GEMMs on cuBLASLt for skew_pair_project, reading every operand in place.
//
// blaslt_grouped_gemm: pointer-array batches. Every problem p writes one output matrix D[p] as the sum
// of its terms, each op(A) @ op(B) with its own A and B pointers. The terms of every problem are added
// in their listed order, one batched call per "wave": wave w holds the w-th term of every problem that
// has one (beta 0, or 1 onto C, for wave 0; beta 1 onto D itself after), so sums over terms are
// deterministic and need no atomics. cuBLASLt algorithms with in-place (atomic) split-K reductions are
// excluded for the same reason.
//
// blaslt_strided_gemm: one strided batch (entry b reads A + b * stride_a, B + b * stride_b and writes
// D + b * stride_d; strides may be zero or negative), with the bias in cuBLASLt's epilogue, which
// pointer-array batches do not take.
//
// All matrices are column-major in cuBLAS terms (a row-major (rows, cols) matrix is a column-major
// (cols, rows) one); every problem has the same shape, transposes and leading dimensions.
#pragma once

#include <ATen/ATen.h>
#include <cublasLt.h>

#include <optional>
#include <vector>

namespace stepfusion {

struct BlasLtShape {
  cublasOperation_t trans_a;
  cublasOperation_t trans_b;
  int64_t m, n, k;         // D is m x n, op(A) m x k, op(B) k x n
  int64_t lda, ldb, ldd;   // C (when given) has D's layout
};

struct BlasLtTerm {
  const void* a;
  const void* b;
};

struct BlasLtProblem {
  void* d;
  const void* c;                  // added to the first term (beta = 1) when non-null
  std::vector<BlasLtTerm> terms;  // at least one
};

// Runs the problems on the current stream with A and B in the dtype `type` (float32: strict fp32, no
// TF32; float16 / bfloat16: tensor cores with fp32 accumulation) and C and D in `out_type` (default
// `type`; float32 partial sums of half-precision operands, for instance). Either every problem has a C
// or none has. Returns false, having launched nothing, when cuBLASLt has no algorithm for the shape
// (the caller then uses its own kernel).
bool blaslt_grouped_gemm(const BlasLtShape& shape, at::ScalarType type, const std::vector<BlasLtProblem>& problems,
                         const at::Device& device, std::optional<at::ScalarType> out_type = std::nullopt);

struct BlasLtStridedBatch {
  int32_t batch;
  const void* a;
  int64_t stride_a;  // in elements, like the other strides
  const void* b;
  int64_t stride_b;
  void* d;
  int64_t stride_d;
  const void* bias;  // m values per entry in D's dtype, added to every column of D; null for none
  int64_t stride_bias;
};

// D[b] = op(A[b]) @ op(B[b]) (+ bias[b]) for every entry b, on the current stream, all operands in `type`.
// Returns false, having launched nothing, when cuBLASLt refuses the layouts (a negative stride, say) or
// has no algorithm for them (the caller then runs the entries as pointer-array problems).
bool blaslt_strided_gemm(const BlasLtShape& shape, at::ScalarType type, const BlasLtStridedBatch& gemm,
                         const at::Device& device);

}  // namespace stepfusion
