#include "blaslt_grouped_gemm.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace stepfusion {
namespace {

struct MatmulDescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* desc) const { cublasLtMatmulDescDestroy(desc); }
};
struct LayoutDeleter {
  void operator()(cublasLtMatrixLayoutOpaque_t* layout) const { cublasLtMatrixLayoutDestroy(layout); }
};
struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreferenceOpaque_t* preference) const { cublasLtMatmulPreferenceDestroy(preference); }
};
using MatmulDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, MatmulDescDeleter>;
using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LayoutDeleter>;
using Preference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PreferenceDeleter>;

cudaDataType_t data_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return CUDA_R_32F;
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    default:
      TORCH_CHECK(false, "blaslt_grouped_gemm: unsupported dtype ", type);
  }
}

// The largest power of two (at most 256, cuBLASLt's default assumption) dividing the address.
uint32_t alignment_of(const void* pointer) {
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

// The alignment every entry of a strided batch keeps: that of the first entry and of the step between
// entries (in either direction).
uint32_t alignment_of(const void* pointer, int64_t stride, at::ScalarType type) {
  const int64_t step = std::abs(stride) * static_cast<int64_t>(c10::elementSize(type));
  return std::min(alignment_of(pointer), alignment_of(reinterpret_cast<const void*>(static_cast<uintptr_t>(step))));
}

// The matrix layouts of one call: A and B (op(A) m x k, op(B) k x n) and D, with C sharing D's.
struct Layouts {
  Layout a, b, d;
};

Layout plain_layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t raw = nullptr;
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&raw, type, rows, cols, ld));
  return Layout(raw);
}

// `layout(type, rows, cols, ld, operand)` for operand 0 (A), 1 (B) and 2 (D) of the shape, in their
// stored (not transposed) extents.
template <typename MakeLayout>
Layouts layouts_of(const BlasLtShape& shape, cudaDataType_t type, cudaDataType_t out_type, MakeLayout layout) {
  const bool a_plain = shape.trans_a == CUBLAS_OP_N;
  const bool b_plain = shape.trans_b == CUBLAS_OP_N;
  return {layout(type, a_plain ? shape.m : shape.k, a_plain ? shape.k : shape.m, shape.lda, 0),
          layout(type, b_plain ? shape.k : shape.n, b_plain ? shape.n : shape.k, shape.ldb, 1),
          layout(out_type, shape.m, shape.n, shape.ldd, 2)};
}

MatmulDesc matmul_desc(const BlasLtShape& shape) {
  cublasLtMatmulDesc_t raw = nullptr;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&raw, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  MatmulDesc op(raw);
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(op.get(), CUBLASLT_MATMUL_DESC_TRANSA, &shape.trans_a,
                                                      sizeof(shape.trans_a)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(op.get(), CUBLASLT_MATMUL_DESC_TRANSB, &shape.trans_b,
                                                      sizeof(shape.trans_b)));
  return op;
}

// What cuBLASLt may assume of the operands (alignments in bytes of A, B, C and D) and use: the workspace,
// and no in-place (atomic) split-K reduction, whose sums would depend on the order blocks finish in.
Preference preference_for(const uint32_t (&alignments)[4], size_t workspace_size) {
  cublasLtMatmulPreference_t raw = nullptr;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw));
  Preference preference(raw);
  const uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_MASK & ~CUBLASLT_REDUCTION_SCHEME_INPLACE;
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> limits[] = {
      {CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reductions},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignments[0]},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignments[1]},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignments[2]},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignments[3]}};
  for (const auto& [attribute, value] : limits) {
    TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.get(), attribute, &value, sizeof(value)));
  }
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      preference.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_size, sizeof(workspace_size)));
  return preference;
}

// cuBLASLt's heuristic query costs far more host time than a launch, so its answer is kept per
// problem description (the caller's key: device, dtypes, shape, batch, strides, alignments, ...).
class AlgoCache {
 public:
  bool find(const std::vector<int64_t>& key, cublasLtMatmulAlgo_t* algo) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto found = algos_.find(key);
    if (found == algos_.end()) return false;
    *algo = found->second;
    return true;
  }
  void store(const std::vector<int64_t>& key, const cublasLtMatmulAlgo_t& algo) {
    const std::lock_guard<std::mutex> lock(mutex_);
    algos_[key] = algo;
  }

 private:
  std::mutex mutex_;
  std::map<std::vector<int64_t>, cublasLtMatmulAlgo_t> algos_;
};

AlgoCache& algo_cache() {
  static AlgoCache cache;
  return cache;
}

// The cached or queried algorithm for the call; false when cuBLASLt has none (or rejects the layouts).
bool find_algo(const std::vector<int64_t>& key, cublasLtMatmulDesc_t op, const Layouts& layouts,
               cublasLtMatmulPreference_t preference, cublasLtMatmulAlgo_t* algo) {
  if (algo_cache().find(key, algo)) return true;
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(at::cuda::getCurrentCUDABlasLtHandle(), op, layouts.a.get(), layouts.b.get(),
                                     layouts.d.get(), layouts.d.get(), preference, 1, &result, &found);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE ||
      (status == CUBLAS_STATUS_SUCCESS && found == 0)) {
    return false;
  }
  TORCH_CUDABLAS_CHECK(status);
  *algo = result.algo;
  algo_cache().store(key, *algo);
  return true;
}

std::vector<int64_t> shape_key(const at::Device& device, cudaDataType_t type, cudaDataType_t out_type,
                               const BlasLtShape& shape, size_t workspace_size) {
  return {device.index(), static_cast<int64_t>(type), static_cast<int64_t>(out_type), shape.trans_a, shape.trans_b,
          shape.m, shape.n, shape.k, shape.lda, shape.ldb, shape.ldd, static_cast<int64_t>(workspace_size)};
}

}  // namespace

bool blaslt_grouped_gemm(const BlasLtShape& shape, at::ScalarType type, const std::vector<BlasLtProblem>& problems,
                         const at::Device& device, std::optional<at::ScalarType> out_type) {
  const bool has_c = !problems.empty() && problems.front().c != nullptr;
  size_t waves = 0;
  for (const BlasLtProblem& problem : problems) {
    TORCH_CHECK(!problem.terms.empty(), "blaslt_grouped_gemm: every problem needs a term");
    TORCH_CHECK((problem.c != nullptr) == has_c, "blaslt_grouped_gemm: C given for some problems only");
    waves = std::max(waves, problem.terms.size());
  }
  if (waves == 0) return true;

  // The pointer arrays of every wave, (A, B, C, D) arrays of its batch size, in one host buffer;
  // the alignment cuBLASLt may assume is the smallest over every pointer of an operand.
  std::vector<int32_t> batch_of_wave(waves);
  std::vector<int64_t> pointers;
  uint32_t alignments[4] = {256, 256, 256, 256};  // A, B, C, D
  for (size_t wave = 0; wave < waves; ++wave) {
    std::vector<const void*> lists[4];
    for (const BlasLtProblem& problem : problems) {
      if (problem.terms.size() <= wave) continue;
      const void* operands[4] = {problem.terms[wave].a, problem.terms[wave].b,
                                 wave == 0 && has_c ? problem.c : problem.d, problem.d};
      for (int operand = 0; operand < 4; ++operand) {
        lists[operand].push_back(operands[operand]);
        alignments[operand] = std::min(alignments[operand], alignment_of(operands[operand]));
      }
    }
    batch_of_wave[wave] = static_cast<int32_t>(lists[0].size());
    for (const auto& list : lists) {
      for (const void* pointer : list) pointers.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(pointer)));
    }
  }

  const cudaDataType_t dtype = data_type(type);
  const cudaDataType_t out_dtype = data_type(out_type.value_or(type));
  const MatmulDesc op = matmul_desc(shape);
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  const size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  const Preference preference = preference_for(alignments, workspace_size);

  // Plan every batch size before launching anything, so that a missing algorithm falls back whole.
  struct BatchPlan {
    Layouts layouts;
    cublasLtMatmulAlgo_t algo;
  };
  std::map<int32_t, BatchPlan> plans;
  for (int32_t batch : batch_of_wave) {
    if (plans.count(batch) != 0) continue;
    BatchPlan plan{layouts_of(shape, dtype, out_dtype,
                              [batch](cudaDataType_t t, int64_t rows, int64_t cols, int64_t ld, int) {
                                Layout layout = plain_layout(t, rows, cols, ld);
                                const uint32_t mode = CUBLASLT_BATCH_MODE_POINTER_ARRAY;
                                TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutSetAttribute(
                                    layout.get(), CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
                                TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutSetAttribute(
                                    layout.get(), CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, &mode, sizeof(mode)));
                                return layout;
                              }),
                   {}};
    std::vector<int64_t> key = shape_key(device, dtype, out_dtype, shape, workspace_size);
    key.insert(key.end(), {batch, alignments[0], alignments[1], alignments[2], alignments[3]});
    if (!find_algo(key, op.get(), plan.layouts, preference.get(), &plan.algo)) return false;
    plans.emplace(batch, std::move(plan));
  }

  at::Tensor staged = at::empty({static_cast<int64_t>(pointers.size())},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(staged.data_ptr<int64_t>(), pointers.data(), pointers.size() * sizeof(int64_t));
  at::Tensor arrays = staged.to(device, /*non_blocking=*/true);
  void** array_base = reinterpret_cast<void**>(arrays.mutable_data_ptr<int64_t>());

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const float alpha = 1.0f;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  size_t offset = 0;
  for (size_t wave = 0; wave < waves; ++wave) {
    const int32_t batch = batch_of_wave[wave];
    const BatchPlan& plan = plans.at(batch);
    const float beta = wave == 0 && !has_c ? 0.0f : 1.0f;
    void** a = array_base + offset;  // the batch's A, B, C and D pointer arrays, one after another
    TORCH_CUDABLAS_CHECK(cublasLtMatmul(handle, op.get(), &alpha, a, plan.layouts.a.get(), a + batch,
                                        plan.layouts.b.get(), &beta, a + 2 * batch, plan.layouts.d.get(),
                                        a + 3 * batch, plan.layouts.d.get(), &plan.algo, workspace, workspace_size,
                                        stream));
    offset += 4 * static_cast<size_t>(batch);
  }
  return true;
}

bool blaslt_strided_gemm(const BlasLtShape& shape, at::ScalarType type, const BlasLtStridedBatch& gemm,
                         const at::Device& device) {
  if (gemm.batch == 0) return true;
  const cudaDataType_t dtype = data_type(type);
  const int64_t strides[3] = {gemm.stride_a, gemm.stride_b, gemm.stride_d};
  bool refused = false;  // a layout attribute cuBLASLt rejects (it documents no negative batch strides)
  const Layouts layouts =
      layouts_of(shape, dtype, dtype, [&](cudaDataType_t t, int64_t rows, int64_t cols, int64_t ld, int operand) {
        Layout layout = plain_layout(t, rows, cols, ld);
        TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout.get(), CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                                                              &gemm.batch, sizeof(gemm.batch)));
        refused = refused || cublasLtMatrixLayoutSetAttribute(layout.get(), CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                              &strides[operand],
                                                              sizeof(strides[operand])) != CUBLAS_STATUS_SUCCESS;
        return layout;
      });
  if (refused) return false;

  const MatmulDesc op = matmul_desc(shape);
  if (gemm.bias != nullptr) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    TORCH_CUDABLAS_CHECK(
        cublasLtMatmulDescSetAttribute(op.get(), CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    TORCH_CUDABLAS_CHECK(
        cublasLtMatmulDescSetAttribute(op.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, &gemm.bias, sizeof(gemm.bias)));
    if (cublasLtMatmulDescSetAttribute(op.get(), CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, &gemm.stride_bias,
                                       sizeof(gemm.stride_bias)) != CUBLAS_STATUS_SUCCESS) {
      return false;
    }
  }
  const uint32_t alignment_d = alignment_of(gemm.d, gemm.stride_d, type);
  const uint32_t alignments[4] = {alignment_of(gemm.a, gemm.stride_a, type),
                                  alignment_of(gemm.b, gemm.stride_b, type), alignment_d, alignment_d};
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  const size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  const Preference preference = preference_for(alignments, workspace_size);
  // The bias pointer's alignment steers the heuristic too (cuBLASLt reads it from the descriptor).
  std::vector<int64_t> key = shape_key(device, dtype, dtype, shape, workspace_size);
  key.insert(key.end(), {-1, gemm.batch, gemm.stride_a, gemm.stride_b, gemm.stride_d, gemm.bias != nullptr,
                         gemm.bias != nullptr ? alignment_of(gemm.bias, gemm.stride_bias, type) : 0,
                         gemm.stride_bias, alignments[0], alignments[1], alignment_d});
  cublasLtMatmulAlgo_t algo;
  if (!find_algo(key, op.get(), layouts, preference.get(), &algo)) return false;

  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t status =
      cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), op.get(), &alpha, gemm.a, layouts.a.get(), gemm.b,
                     layouts.b.get(), &beta, gemm.d, layouts.d.get(), gemm.d, layouts.d.get(), &algo, workspace,
                     workspace_size, at::cuda::getCurrentCUDAStream());
  // A refusal is the caller's cue to run the entries as pointer-array problems, which write all of D again.
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE) return false;
  TORCH_CUDABLAS_CHECK(status);
  return true;
}

}  // namespace stepfusion
