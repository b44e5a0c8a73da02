// Launcher of the skew_pair_project CUDA kernels. Plain C++ and CUDA runtime types only, so that the
// kernels (skew_pair_project_kernel.cu, nvcc, no torch headers) and the torch glue
// (skew_pair_project.cpp) compile apart. T is float, __half or __nv_bfloat16.
//
// Forward and backward are all one kernel: a grouped GEMM over `problems` output matrices,
// C[g] (rows x cols, row-major) = sum over the terms q of problem g, in their listed order, of
// A(q) @ B(q) (+ a bias row), each term a depth-long product. A term q in [0, 2P) names a side
// (q >= P: side B) and a pair k = q mod P; the operands of a term are found in place from the side
// and the pair, so no operand is ever gathered into a copy.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace stepfusion {

struct SkewPairDevice {
  int sm_count;
};

// Where the operands of a product sit in memory (the "depth" index is the reduction index).
enum class SkewGemmKind {
  kForward,       // A (rows x depth) and B^T (cols x depth) both depth-contiguous: h @ W^T
  kGradFeatures,  // A depth-contiguous, B (depth x cols) cols-contiguous: grad_p @ W
  kGradWeight,    // A^T (depth x rows) rows-contiguous, B (depth x cols) cols-contiguous: grad_p^T @ h
};

// One operand of term (side, k): the matrix at base[side] + index * stride[side], with
// index = pairs[k][side] (by_layer) or k; stride 0 shares one matrix between the pairs. ld is the
// distance between consecutive lines of the operand's non-contiguous index.
template <typename T>
struct SkewOperand {
  const T* base[2];
  int64_t stride[2];
  int64_t ld;
  bool by_layer;
};

// The outputs: problem g < split writes side 0, the others side 1, at base[side] + index * stride
// with index = g - side * split; its bias row (cols values, nullptr for none) at
// bias[side] + index * bias_stride[side].
template <typename T>
struct SkewOutput {
  T* base[2];
  int64_t stride;
  const T* bias[2];
  int64_t bias_stride[2];
  int64_t split;
};

// The terms of problem g, in the order they are added: with offsets (CSR, problems + 1 entries)
// they are first + entries[offsets[g]], ..., first + entries[offsets[g + 1] - 1]; without, they
// are first + g * problem_step + t * term_step for t = 0 .. per_problem - 1.
struct SkewTerms {
  int64_t first;
  const int64_t* offsets;
  const int64_t* entries;
  int64_t per_problem;
  int64_t problem_step;
  int64_t term_step;
};

template <typename T>
struct SkewGemmArgs {
  SkewOperand<T> a;
  SkewOperand<T> b;
  SkewOutput<T> out;
  SkewTerms terms;
  const int64_t* pairs;  // (P, 2), contiguous
  int64_t num_pairs;     // P
  int64_t problems;
  int64_t rows;
  int64_t cols;
  int64_t depth;
};

// Every element of every problem's output is written (zeros, plus the bias, for a problem with no
// terms or depth 0). Nothing is launched when problems, rows or cols is 0. Returns
// cudaErrorInvalidConfiguration when the grid would exceed 2^31 - 1 blocks.
template <typename T>
cudaError_t launch_skew_pair_gemm(SkewGemmKind kind, const SkewGemmArgs<T>& args, const SkewPairDevice& device,
                                  cudaStream_t stream);

}  // namespace stepfusion
