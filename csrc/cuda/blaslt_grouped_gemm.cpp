#include "blaslt_grouped_gemm.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>

#include <algorithm>
#include <cstdint>
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

Layout batched_layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld, int32_t batch) {
  cublasLtMatrixLayout_t raw = nullptr;
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&raw, type, rows, cols, ld));
  Layout layout(raw);
  const uint32_t mode = CUBLASLT_BATCH_MODE_POINTER_ARRAY;
  TORCH_CUDABLAS_CHECK(
      cublasLtMatrixLayoutSetAttribute(raw, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutSetAttribute(raw, CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, &mode, sizeof(mode)));
  return layout;
}

// Layouts and algorithm of one batch count (waves of equal size share them).
struct BatchPlan {
  Layout a, b, d;
  cublasLtMatmulAlgo_t algo;
};

// cuBLASLt's heuristic query costs far more host time than a launch, so its answer is kept per
// problem description (device, dtype, shape, batch count and the pointers' alignments).
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

}  // namespace

bool blaslt_grouped_gemm(const BlasLtShape& shape, at::ScalarType type, const std::vector<BlasLtProblem>& problems,
                         const at::Device& device) {
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
  uint32_t align_a = 256, align_b = 256, align_c = 256, align_d = 256;
  for (size_t wave = 0; wave < waves; ++wave) {
    std::vector<const void*> a, b, c, d;
    for (const BlasLtProblem& problem : problems) {
      if (problem.terms.size() <= wave) continue;
      a.push_back(problem.terms[wave].a);
      b.push_back(problem.terms[wave].b);
      c.push_back(wave == 0 && has_c ? problem.c : problem.d);
      d.push_back(problem.d);
      align_a = std::min(align_a, alignment_of(a.back()));
      align_b = std::min(align_b, alignment_of(b.back()));
      align_c = std::min(align_c, alignment_of(c.back()));
      align_d = std::min(align_d, alignment_of(d.back()));
    }
    batch_of_wave[wave] = static_cast<int32_t>(a.size());
    for (const auto* list : {&a, &b, &c, &d}) {
      for (const void* pointer : *list) pointers.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(pointer)));
    }
  }

  const cudaDataType_t dtype = data_type(type);
  MatmulDesc op;
  {
    cublasLtMatmulDesc_t raw = nullptr;
    TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&raw, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    op.reset(raw);
  }
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(op.get(), CUBLASLT_MATMUL_DESC_TRANSA, &shape.trans_a,
                                                      sizeof(shape.trans_a)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(op.get(), CUBLASLT_MATMUL_DESC_TRANSB, &shape.trans_b,
                                                      sizeof(shape.trans_b)));

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  Preference preference;
  {
    cublasLtMatmulPreference_t raw = nullptr;
    TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw));
    preference.reset(raw);
  }
  const uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_MASK & ~CUBLASLT_REDUCTION_SCHEME_INPLACE;
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> limits[] = {
      {CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reductions},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d}};
  for (const auto& [attribute, value] : limits) {
    TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.get(), attribute, &value, sizeof(value)));
  }
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      preference.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_size, sizeof(workspace_size)));

  // Plan every batch size before launching anything, so that a missing algorithm falls back whole.
  const bool a_plain = shape.trans_a == CUBLAS_OP_N;
  const bool b_plain = shape.trans_b == CUBLAS_OP_N;
  std::map<int32_t, BatchPlan> plans;
  for (int32_t batch : batch_of_wave) {
    if (plans.count(batch) != 0) continue;
    BatchPlan plan{batched_layout(dtype, a_plain ? shape.m : shape.k, a_plain ? shape.k : shape.m, shape.lda, batch),
                   batched_layout(dtype, b_plain ? shape.k : shape.n, b_plain ? shape.n : shape.k, shape.ldb, batch),
                   batched_layout(dtype, shape.m, shape.n, shape.ldd, batch),
                   {}};
    const std::vector<int64_t> key = {device.index(), static_cast<int64_t>(dtype), shape.trans_a, shape.trans_b,
                                      shape.m, shape.n, shape.k, shape.lda, shape.ldb, shape.ldd, batch,
                                      align_a, align_b, align_c, align_d, static_cast<int64_t>(workspace_size)};
    if (!algo_cache().find(key, &plan.algo)) {
      cublasLtMatmulHeuristicResult_t result{};
      int found = 0;
      const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, op.get(), plan.a.get(), plan.b.get(),
                                                                   plan.d.get(), plan.d.get(), preference.get(), 1,
                                                                   &result, &found);
      if (status == CUBLAS_STATUS_NOT_SUPPORTED || (status == CUBLAS_STATUS_SUCCESS && found == 0)) return false;
      TORCH_CUDABLAS_CHECK(status);
      plan.algo = result.algo;
      algo_cache().store(key, plan.algo);
    }
    plans.emplace(batch, std::move(plan));
  }

  at::Tensor staged = at::empty({static_cast<int64_t>(pointers.size())},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(staged.data_ptr<int64_t>(), pointers.data(), pointers.size() * sizeof(int64_t));
  at::Tensor arrays = staged.to(device, /*non_blocking=*/true);
  void** array_base = reinterpret_cast<void**>(arrays.mutable_data_ptr<int64_t>());

  const float alpha = 1.0f;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  size_t offset = 0;
  for (size_t wave = 0; wave < waves; ++wave) {
    const int32_t batch = batch_of_wave[wave];
    const BatchPlan& plan = plans.at(batch);
    const float beta = wave == 0 && !has_c ? 0.0f : 1.0f;
    void** a = array_base + offset;  // the batch's A, B, C and D pointer arrays, one after another
    TORCH_CUDABLAS_CHECK(cublasLtMatmul(handle, op.get(), &alpha, a, plan.a.get(), a + batch, plan.b.get(), &beta,
                                        a + 2 * batch, plan.d.get(), a + 3 * batch, plan.d.get(), &plan.algo,
                                        workspace, workspace_size, stream));
    offset += 4 * static_cast<size_t>(batch);
  }
  return true;
}

}  // namespace stepfusion
