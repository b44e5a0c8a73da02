// skew_pair_project on CUDA: argument checks, allocation, dtype dispatch and the term lists around
// the grouped GEMM. The products run on cuBLASLt's pointer-array batches (blaslt_grouped_gemm.h),
// which read every operand in place; the pointers come from `pairs` on the host (pairs kept on the
// CPU spare each call a device-to-host copy and its wait). Where cuBLASLt has no algorithm, or with
// STEPFUSION_SKEW_BLASLT=0, the hand-written grouped GEMM of skew_pair_project_kernel.cu runs instead.
// Either way three grouped GEMMs cover everything:
//   forward        2P problems (side, pair), one term each: pa[k] / pb[k] = h[layer] @ W(k)^T + b(k)
//   grad_ha, hb    LA + LB problems (one per layer), whose terms are the pairs using the layer,
//                  sorted stably by layer here with torch ops (a segment reduction, no atomics)
//   grad_weight    2 (shared) or 2P (per pair) problems, each summing grad_p^T @ h over its pairs;
//                  P or 1 problems of both sides' terms when weight_b is absent
// Opt-in variants of the cuBLASLt path, written for the H100's bfloat16 gap to one dense GEMM and off
// until measured on a GPU (read at every call, so that tests and benchmarks can compare them):
//   STEPFUSION_SKEW_FORWARD=strided  a forward side whose layers step evenly (SSFN's runs step by -1)
//                                    is one strided batch with the bias in cuBLASLt's epilogue, instead
//                                    of pointer arrays with the bias read as a C matrix
//   STEPFUSION_SKEW_FORWARD=pairs    every pair and side is a GEMM of its own, bias in the epilogue
//                                    (2P launches, each with a full (N, F) output to fill the GPU)
//   STEPFUSION_SKEW_WEIGHT_GROUPS=G  a shared weight's gradient sums its terms in G float32 partials
//                                    (G problems per wave instead of one, whose single (F, E) output
//                                    does not fill the GPU), then adds the partials in order; "auto"
//                                    sizes G to the GPU, unset or 1 keeps one sum in the weight's dtype
// The bias gradients are column sums of grad_p by at::sum (float32 accumulation), which reduces in
// a fixed order on CUDA, so every gradient is the same bits on every run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "../common.h"
#include "dispatch.h"
#include "../skew_pair_project.h"
#include "blaslt_grouped_gemm.h"
#include "skew_pair_project_kernel.h"

namespace stepfusion {
namespace {

SkewPairDevice current_device() { return {at::cuda::getCurrentDeviceProperties()->multiProcessorCount}; }

template <typename cuda_t>
const cuda_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<const cuda_t*>(t.const_data_ptr()) : nullptr;
}

template <typename cuda_t>
cuda_t* mutable_data(at::Tensor& t) {
  return static_cast<cuda_t*>(t.mutable_data_ptr());
}

// The kernels' view of the arguments: contiguous tensors; weight_b and bias_b are those of side B
// (weight_a and bias_a again when weight_b is absent), bias_a/bias_b undefined when absent.
struct ContiguousArgs {
  at::Tensor ha, hb, pairs, weight_a, bias_a, weight_b, bias_b;
};

ContiguousArgs contiguous_args(const at::Tensor& ha, const at::Tensor& hb, const at::Tensor& pairs,
                               const at::Tensor& weight_a, const std::optional<at::Tensor>& bias_a,
                               const std::optional<at::Tensor>& weight_b, const std::optional<at::Tensor>& bias_b) {
  const at::Tensor weight_a_contiguous = weight_a.contiguous();
  const at::Tensor bias_a_contiguous = contiguous_or_undefined(bias_a);
  return {ha.contiguous(),
          hb.contiguous(),
          pairs.contiguous(),
          weight_a_contiguous,
          bias_a_contiguous,
          weight_b.has_value() ? weight_b->contiguous() : weight_a_contiguous,
          weight_b.has_value() ? contiguous_or_undefined(bias_b) : bias_a_contiguous};
}

// A fresh contiguous tensor of t's shape (empty_like would copy a non-contiguous t's strides).
at::Tensor empty_contiguous(const at::Tensor& t) { return at::empty(t.sizes(), t.options()); }

// ---- The cuBLASLt path. Row-major (rows, cols) matrices are column-major (cols, rows) to cuBLAS.

// cuBLASLt takes every problem with a nonzero reduction (E, F and N are checked nonzero by the callers'
// early returns or here), unless STEPFUSION_SKEW_BLASLT=0 asks for the hand-written kernel.
bool use_blaslt(const SkewPairProjectShape& shape) {
  const char* setting = std::getenv("STEPFUSION_SKEW_BLASLT");
  return (setting == nullptr || std::strcmp(setting, "0") != 0) && shape.in_features > 0 && shape.out_features > 0;
}

enum class ForwardPlan { kPointers, kStrided, kPairs };

ForwardPlan forward_plan() {
  const char* setting = std::getenv("STEPFUSION_SKEW_FORWARD");
  if (setting == nullptr || std::strcmp(setting, "pointers") == 0) return ForwardPlan::kPointers;
  if (std::strcmp(setting, "strided") == 0) return ForwardPlan::kStrided;
  TORCH_CHECK(std::strcmp(setting, "pairs") == 0,
              "STEPFUSION_SKEW_FORWARD must be \"pointers\", \"strided\" or \"pairs\", got \"", setting, "\"");
  return ForwardPlan::kPairs;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How many float32 partials a shared weight's gradient of `terms` terms sums in (1: none, one sum in the
// weight's dtype). "auto" asks for about two waves of (F, E) output tiles of 128 x 128 over the GPU.
int64_t weight_groups(const SkewPairProjectShape& shape, int64_t terms) {
  const char* setting = std::getenv("STEPFUSION_SKEW_WEIGHT_GROUPS");
  if (setting == nullptr) return 1;
  int64_t groups = 1;
  if (std::strcmp(setting, "auto") == 0) {
    const int64_t tiles = ceil_div(shape.out_features, 128) * ceil_div(shape.in_features, 128);
    groups = ceil_div(2 * current_device().sm_count, tiles);
  } else {
    char* end = nullptr;
    groups = std::strtoll(setting, &end, 10);
    TORCH_CHECK(end != setting && *end == '\0' && groups >= 1,
                "STEPFUSION_SKEW_WEIGHT_GROUPS must be a positive integer or \"auto\", got \"", setting, "\"");
  }
  return shape.per_pair ? 1 : std::min(groups, terms);  // a per-pair weight's sums have one or two terms
}

// Address of element `offset` of t's storage (t contiguous).
const void* element(const at::Tensor& t, int64_t offset) {
  return static_cast<const char*>(t.const_data_ptr()) + offset * t.element_size();
}
void* element(at::Tensor& t, int64_t offset) {
  return static_cast<char*>(t.mutable_data_ptr()) + offset * t.element_size();
}

// Rows per forward problem when there is a bias: the largest divisor of N in [128, 512] (N itself
// when N <= 512 or no such divisor exists). The bias enters as C = a (chunk, F) matrix of bias rows,
// since cuBLASLt's bias epilogue does not take pointer arrays; splitting each pair's N rows into
// problems of `chunk` rows keeps that matrix small enough to stay in L2 while every problem reads it.
int64_t bias_row_chunk(int64_t samples) {
  if (samples <= 512) return samples;
  for (int64_t rows = 512; rows >= 128; --rows) {
    if (samples % rows == 0) return rows;
  }
  return samples;
}

// The step between the layers a side reads when they step evenly (layer of pair k = layer of pair 0 +
// k * step, for every k; a single pair steps evenly by 0), else nothing.
std::optional<int64_t> even_step(const at::Tensor& pairs_host, int side) {
  const auto layers = pairs_host.accessor<int64_t, 2>();
  const int64_t step = pairs_host.size(0) > 1 ? layers[1][side] - layers[0][side] : 0;
  for (int64_t k = 1; k < pairs_host.size(0); ++k) {
    if (layers[k][side] - layers[k - 1][side] != step) return std::nullopt;
  }
  return step;
}

// Pairs [first_pair, first_pair + count) of one side as one strided batch: entry b reads layer
// `layer + b * step` of the stack and the pair's weight (or the shared one, stride 0), and adds the pair's
// bias (or the shared one) in the epilogue.
bool forward_strided(const ContiguousArgs& args, const SkewPairProjectShape& shape, int side, int64_t first_pair,
                     int64_t count, int64_t layer, int64_t step, at::Tensor& out) {
  const int64_t N = shape.samples, E = shape.in_features, F = shape.out_features;
  const at::Tensor& stack = side == 0 ? args.ha : args.hb;
  const at::Tensor& weight = side == 0 ? args.weight_a : args.weight_b;
  const at::Tensor& bias = side == 0 ? args.bias_a : args.bias_b;
  const int64_t slot = shape.per_pair ? first_pair : 0;
  const BlasLtStridedBatch gemm{static_cast<int32_t>(count),
                                element(weight, slot * F * E),
                                shape.per_pair ? F * E : 0,
                                element(stack, layer * N * E),
                                step * N * E,
                                element(out, first_pair * N * F),
                                N * F,
                                bias.defined() ? element(bias, slot * F) : nullptr,
                                shape.per_pair ? F : 0};
  return blaslt_strided_gemm({CUBLAS_OP_T, CUBLAS_OP_N, F, N, E, E, E, F}, stack.scalar_type(), gemm, stack.device());
}

// One side of the forward without pointer arrays, as STEPFUSION_SKEW_FORWARD asks: false (the side then
// goes to pointer arrays) where the plan does not apply or cuBLASLt refuses it.
bool forward_side_without_pointers(const ContiguousArgs& args, const SkewPairProjectShape& shape,
                                   const at::Tensor& pairs_host, int side, ForwardPlan plan, at::Tensor& out) {
  const auto layers = pairs_host.accessor<int64_t, 2>();
  if (plan == ForwardPlan::kStrided) {
    const std::optional<int64_t> step = even_step(pairs_host, side);
    return step && forward_strided(args, shape, side, 0, shape.pairs, layers[0][side], *step, out);
  }
  if (plan == ForwardPlan::kPairs) {
    for (int64_t k = 0; k < shape.pairs; ++k) {
      if (!forward_strided(args, shape, side, k, 1, layers[k][side], 0, out)) return false;
    }
    return true;
  }
  return false;
}

// pa[k] (N x F) = h[layer] (N x E) @ W(k)^T + b(k): in cuBLAS terms D (F x rows) = op(A) @ op(B) + C with
// A the weight (E x F) transposed, B the layer's rows (E x rows) and C the bias rows. A side that
// STEPFUSION_SKEW_FORWARD's plan covers goes first; only the others become pointer-array problems.
bool forward_blaslt(const ContiguousArgs& args, const SkewPairProjectShape& shape, const at::Tensor& pairs_host,
                    at::Tensor& pa, at::Tensor& pb) {
  const int64_t P = shape.pairs, N = shape.samples, E = shape.in_features, F = shape.out_features;
  const at::Tensor* stacks[2] = {&args.ha, &args.hb};
  const at::Tensor* weights[2] = {&args.weight_a, &args.weight_b};
  const at::Tensor biases[2] = {args.bias_a, args.bias_b};
  at::Tensor* outputs[2] = {&pa, &pb};
  const auto layers = pairs_host.accessor<int64_t, 2>();
  const ForwardPlan plan = forward_plan();
  std::vector<int> pointer_sides;
  for (int side = 0; side < 2; ++side) {
    if (!forward_side_without_pointers(args, shape, pairs_host, side, plan, *outputs[side])) {
      pointer_sides.push_back(side);
    }
  }
  if (pointer_sides.empty()) return true;

  bool has_bias = false;
  for (int side : pointer_sides) has_bias = has_bias || biases[side].defined();
  const int64_t chunk = has_bias ? bias_row_chunk(N) : N;
  const int64_t weight_count = shape.per_pair ? P : 1;
  at::Tensor bias_rows[2];  // (P or 1, chunk, F): zeros for a side without a bias
  if (has_bias) {
    for (int side : pointer_sides) {
      const at::Tensor bias = biases[side].defined() ? biases[side].reshape({weight_count, 1, F})
                                                     : at::zeros({weight_count, 1, F}, args.ha.options());
      bias_rows[side] = bias.expand({weight_count, chunk, F}).contiguous();
    }
  }
  std::vector<BlasLtProblem> problems;
  for (int side : pointer_sides) {
    for (int64_t k = 0; k < P; ++k) {
      const int64_t slot = shape.per_pair ? k : 0;
      for (int64_t row = 0; row < N; row += chunk) {
        problems.push_back({element(*outputs[side], (k * N + row) * F),
                            has_bias ? element(bias_rows[side], slot * chunk * F) : nullptr,
                            {{element(*weights[side], slot * F * E),
                              element(*stacks[side], (layers[k][side] * N + row) * E)}}});
      }
    }
  }
  return blaslt_grouped_gemm({CUBLAS_OP_T, CUBLAS_OP_N, F, chunk, E, E, E, F}, args.ha.scalar_type(), problems,
                             args.ha.device());
}

// grad_h[layer] (N x E) = sum over the layer's pairs, in ascending order, of grad_p[k] (N x F) @ W(k)
// (F x E); a layer no pair uses is zero.
bool grad_features_blaslt(const ContiguousArgs& args, const SkewPairProjectShape& shape,
                          const at::Tensor& pairs_host, const at::Tensor& grad_pa, const at::Tensor& grad_pb,
                          at::Tensor& grad_ha, at::Tensor& grad_hb) {
  const int64_t P = shape.pairs, N = shape.samples, E = shape.in_features, F = shape.out_features;
  const at::Tensor* grads[2] = {&grad_pa, &grad_pb};
  const at::Tensor* weights[2] = {&args.weight_a, &args.weight_b};
  at::Tensor* grad_stacks[2] = {&grad_ha, &grad_hb};
  const auto layers = pairs_host.accessor<int64_t, 2>();
  std::vector<BlasLtProblem> problems;
  std::vector<at::Tensor> unused_runs;  // runs of consecutive layers no pair uses: one memset each
  for (int side = 0; side < 2; ++side) {
    const int64_t stack_layers = grad_stacks[side]->size(0);
    std::vector<std::vector<BlasLtTerm>> terms(stack_layers);
    for (int64_t k = 0; k < P; ++k) {
      terms[layers[k][side]].push_back(
          {element(*weights[side], shape.per_pair ? k * F * E : 0), element(*grads[side], k * N * F)});
    }
    for (int64_t layer = 0; layer < stack_layers; ++layer) {
      if (!terms[layer].empty()) {
        problems.push_back({element(*grad_stacks[side], layer * N * E), nullptr, std::move(terms[layer])});
        continue;
      }
      int64_t end = layer + 1;
      while (end < stack_layers && terms[end].empty()) ++end;
      unused_runs.push_back(grad_stacks[side]->narrow(0, layer, end - layer));
      layer = end - 1;
    }
  }
  if (!blaslt_grouped_gemm({CUBLAS_OP_N, CUBLAS_OP_N, E, N, F, E, F, E}, args.ha.scalar_type(), problems,
                           args.ha.device())) {
    return false;
  }
  for (at::Tensor& run : unused_runs) run.zero_();
  return true;
}

// grad_W (F x E) = sum over its terms of grad_p[k]^T (F x N) @ h[layer] (N x E): one problem per
// weight (per pair's weight) and side, or with weight_b absent both sides' terms, A's first. With
// STEPFUSION_SKEW_WEIGHT_GROUPS, a shared weight's terms are split into G consecutive groups, one float32
// partial problem each, and the partials are added in group order.
bool grad_weights_blaslt(const ContiguousArgs& args, const SkewPairProjectShape& shape,
                         const at::Tensor& pairs_host, const at::Tensor& grad_pa, const at::Tensor& grad_pb,
                         bool shared_b, at::Tensor& grad_weight_a, at::Tensor& grad_weight_b) {
  const int64_t P = shape.pairs, N = shape.samples, E = shape.in_features, F = shape.out_features;
  const at::Tensor* stacks[2] = {&args.ha, &args.hb};
  const at::Tensor* grads[2] = {&grad_pa, &grad_pb};
  const auto layers = pairs_host.accessor<int64_t, 2>();
  const BlasLtShape gemm{CUBLAS_OP_N, CUBLAS_OP_T, E, F, N, E, F, E};
  struct WeightSum {
    at::Tensor* grad;  // grad_weight_a or grad_weight_b
    int64_t slot;      // the pair's weight, or 0 for a shared one
    std::vector<BlasLtTerm> terms;
  };
  std::vector<WeightSum> sums;
  for (int64_t slot = 0; slot < (shape.per_pair ? P : 1); ++slot) {
    std::vector<BlasLtTerm> terms[2];
    for (int side = 0; side < 2; ++side) {
      for (int64_t k = shape.per_pair ? slot : 0; k < (shape.per_pair ? slot + 1 : P); ++k) {
        terms[side].push_back({element(*stacks[side], layers[k][side] * N * E), element(*grads[side], k * N * F)});
      }
    }
    if (shared_b) terms[0].insert(terms[0].end(), terms[1].begin(), terms[1].end());
    sums.push_back({&grad_weight_a, slot, std::move(terms[0])});
    if (!shared_b) sums.push_back({&grad_weight_b, slot, std::move(terms[1])});
  }

  const int64_t groups = weight_groups(shape, static_cast<int64_t>(sums.front().terms.size()));
  std::vector<BlasLtProblem> problems;
  if (groups == 1) {
    for (WeightSum& sum : sums) {
      problems.push_back({element(*sum.grad, sum.slot * F * E), nullptr, std::move(sum.terms)});
    }
    return blaslt_grouped_gemm(gemm, args.ha.scalar_type(), problems, args.ha.device());
  }
  // A shared weight (weight_groups is 1 per pair): group g of a sum's T terms is terms [g T / G, (g + 1) T / G).
  at::Tensor partials =
      at::empty({static_cast<int64_t>(sums.size()), groups, F, E}, args.ha.options().dtype(at::kFloat));
  for (int64_t index = 0; index < static_cast<int64_t>(sums.size()); ++index) {
    const std::vector<BlasLtTerm>& terms = sums[index].terms;
    const int64_t count = static_cast<int64_t>(terms.size());
    for (int64_t group = 0; group < groups; ++group) {
      problems.push_back({element(partials, (index * groups + group) * F * E), nullptr,
                          {terms.begin() + group * count / groups, terms.begin() + (group + 1) * count / groups}});
    }
  }
  if (!blaslt_grouped_gemm(gemm, args.ha.scalar_type(), problems, args.ha.device(), at::kFloat)) return false;
  for (int64_t index = 0; index < static_cast<int64_t>(sums.size()); ++index) {
    sums[index].grad->copy_(partials.select(0, index).sum(0));
  }
  return true;
}

template <typename cuda_t>
void launch(SkewGemmKind kind, const SkewGemmArgs<cuda_t>& gemm, const SkewPairDevice& device) {
  C10_CUDA_CHECK(launch_skew_pair_gemm(kind, gemm, device, at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> skew_pair_project_cuda(const at::Tensor& ha_in, const at::Tensor& hb_in,
                                                          const at::Tensor& pairs_in, const at::Tensor& weight_a_in,
                                                          const std::optional<at::Tensor>& bias_a,
                                                          const std::optional<at::Tensor>& weight_b,
                                                          const std::optional<at::Tensor>& bias_b) {
  check_cuda_input("skew_pair_project", "ha", ha_in);
  const c10::cuda::CUDAGuard device_guard(ha_in.device());
  const SkewPairProjectShape shape =
      check_skew_pair_project(ha_in, hb_in, pairs_in, weight_a_in, bias_a, weight_b, bias_b);
  const int64_t P = shape.pairs, N = shape.samples, E = shape.in_features, F = shape.out_features;
  at::Tensor pa = at::empty({P, N, F}, ha_in.options());
  at::Tensor pb = at::empty({P, N, F}, ha_in.options());
  if (P == 0 || N == 0) return {pa, pb};

  const ContiguousArgs args = contiguous_args(ha_in, hb_in, pairs_in, weight_a_in, bias_a, weight_b, bias_b);
  if (use_blaslt(shape) && forward_blaslt(args, shape, args.pairs.to(at::kCPU), pa, pb)) return {pa, pb};
  const at::Tensor pairs_device = args.pairs.to(args.ha.device());  // the kernel reads the pairs on the GPU
  const int64_t weight_stride = shape.per_pair ? F * E : 0;
  const int64_t bias_stride = shape.per_pair ? F : 0;
  STEPFUSION_DISPATCH_CUDA_TYPES(args.ha.scalar_type(), "skew_pair_project_cuda", [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    SkewGemmArgs<cuda_t> gemm{};
    // Problem g < P is pa[g], problem P + k is pb[k]; its single term is g itself.
    gemm.a = {{data_or_null<cuda_t>(args.ha), data_or_null<cuda_t>(args.hb)}, {N * E, N * E}, E, true};
    gemm.b = {{data_or_null<cuda_t>(args.weight_a), data_or_null<cuda_t>(args.weight_b)},
              {weight_stride, weight_stride},
              E,
              false};
    gemm.out = {{mutable_data<cuda_t>(pa), mutable_data<cuda_t>(pb)},
                N * F,
                {data_or_null<cuda_t>(args.bias_a), data_or_null<cuda_t>(args.bias_b)},
                {bias_stride, bias_stride},
                P};
    gemm.terms = {0, nullptr, nullptr, 1, 1, 0};
    gemm.pairs = pairs_device.const_data_ptr<int64_t>();
    gemm.num_pairs = P;
    gemm.problems = 2 * P;
    gemm.rows = N;
    gemm.cols = F;
    gemm.depth = E;
    launch(SkewGemmKind::kForward, gemm, current_device());
  });
  return {pa, pb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> skew_pair_project_backward_cuda(
    const at::Tensor& grad_pa_in, const at::Tensor& grad_pb_in, const at::Tensor& ha_in, const at::Tensor& hb_in,
    const at::Tensor& pairs_in, const at::Tensor& weight_a_in, const std::optional<at::Tensor>& bias_a,
    const std::optional<at::Tensor>& weight_b, const std::optional<at::Tensor>& bias_b) {
  check_cuda_input("skew_pair_project", "ha", ha_in);
  const c10::cuda::CUDAGuard device_guard(ha_in.device());
  const SkewPairProjectShape shape =
      check_skew_pair_project(ha_in, hb_in, pairs_in, weight_a_in, bias_a, weight_b, bias_b);
  check_skew_pair_project_grads(grad_pa_in, grad_pb_in, ha_in, shape);
  const int64_t P = shape.pairs, N = shape.samples, E = shape.in_features, F = shape.out_features;
  const int64_t LA = shape.layers_a, LB = shape.layers_b;
  const bool shared_b = !weight_b.has_value();

  // Every problem of the launches below writes its whole output, so empty allocations suffice.
  at::Tensor grad_ha = empty_contiguous(ha_in);
  at::Tensor grad_hb = empty_contiguous(hb_in);
  at::Tensor grad_weight_a = empty_contiguous(weight_a_in);
  at::Tensor grad_weight_b = shared_b ? absent_grad(ha_in) : empty_contiguous(*weight_b);
  at::Tensor grad_bias_a = bias_a.has_value() ? empty_contiguous(*bias_a) : absent_grad(ha_in);
  at::Tensor grad_bias_b = bias_b.has_value() ? empty_contiguous(*bias_b) : absent_grad(ha_in);
  if (P == 0 || N == 0) {
    for (at::Tensor* grad : {&grad_ha, &grad_hb, &grad_weight_a, &grad_weight_b, &grad_bias_a, &grad_bias_b}) {
      grad->zero_();
    }
    return {grad_ha, grad_hb, grad_weight_a, grad_bias_a, grad_weight_b, grad_bias_b};
  }

  const ContiguousArgs args = contiguous_args(ha_in, hb_in, pairs_in, weight_a_in, bias_a, weight_b, bias_b);
  const at::Tensor grad_pa = grad_pa_in.contiguous();
  const at::Tensor grad_pb = grad_pb_in.contiguous();

  const bool blaslt = use_blaslt(shape);
  const at::Tensor pairs_host = blaslt ? args.pairs.to(at::kCPU) : at::Tensor();
  const bool features_done =
      blaslt && grad_features_blaslt(args, shape, pairs_host, grad_pa, grad_pb, grad_ha, grad_hb);
  const bool weights_done =
      blaslt && grad_weights_blaslt(args, shape, pairs_host, grad_pa, grad_pb, shared_b, grad_weight_a, grad_weight_b);
  if (!features_done || !weights_done) {
    const at::Tensor pairs_device = args.pairs.to(args.ha.device());  // the kernel reads the pairs on the GPU
    const int64_t weight_stride = shape.per_pair ? F * E : 0;
    const SkewPairDevice device = current_device();
    // Segments of grad_h: term q = side * P + k is keyed by its layer in the stacked [ha; hb] layers
    // (pairs[k][0], or LA + pairs[k][1]); a stable sort keeps each layer's terms in ascending q, and
    // layer l's terms are entries[offsets[l] .. offsets[l + 1]) (empty for a layer no pair uses).
    const at::Tensor layer_keys = at::cat({pairs_device.select(1, 0), pairs_device.select(1, 1) + LA});
    const auto sorted = at::sort(layer_keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor segment_entries = std::get<1>(sorted).contiguous();
    const at::Tensor segment_offsets =
        at::searchsorted(std::get<0>(sorted), at::arange(LA + LB + 1, pairs_device.options())).contiguous();
    STEPFUSION_DISPATCH_CUDA_TYPES(args.ha.scalar_type(), "skew_pair_project_backward_cuda", [&] {
      using cuda_t = typename CudaType<scalar_t>::type;
      const SkewOperand<cuda_t> grad_p_operand{
          {data_or_null<cuda_t>(grad_pa), data_or_null<cuda_t>(grad_pb)}, {N * F, N * F}, F, false};

      // grad_h[layer] (N x E) = sum over the layer's terms of grad_p[k] (N x F) @ W(k) (F x E).
      SkewGemmArgs<cuda_t> features{};
      features.a = grad_p_operand;
      features.b = {{data_or_null<cuda_t>(args.weight_a), data_or_null<cuda_t>(args.weight_b)},
                    {weight_stride, weight_stride},
                    E,
                    false};
      features.out = {{mutable_data<cuda_t>(grad_ha), mutable_data<cuda_t>(grad_hb)}, N * E, {nullptr, nullptr},
                      {0, 0}, LA};
      features.terms = {0, segment_offsets.const_data_ptr<int64_t>(), segment_entries.const_data_ptr<int64_t>(), 0, 0,
                        0};
      features.pairs = pairs_device.const_data_ptr<int64_t>();
      features.num_pairs = P;
      features.problems = LA + LB;
      features.rows = N;
      features.cols = E;
      features.depth = F;
      if (!features_done) launch(SkewGemmKind::kGradFeatures, features, device);

      // grad_W (F x E) = sum over its terms of grad_p[k]^T (F x N) @ h[layer] (N x E). Terms are
      // q = first + g * problem_step + t * term_step (see SkewTerms); with weight_b absent a problem
      // takes side A's terms, then side B's.
      SkewGemmArgs<cuda_t> weights{};
      weights.a = grad_p_operand;
      weights.b = {{data_or_null<cuda_t>(args.ha), data_or_null<cuda_t>(args.hb)}, {N * E, N * E}, E, true};
      cuda_t* grad_weight_b_data = shared_b ? nullptr : mutable_data<cuda_t>(grad_weight_b);
      if (shape.per_pair) {
        // Problem g: grad_weight_a[g] (terms g, and P + g when shared), or grad_weight_b[g - P].
        weights.problems = shared_b ? P : 2 * P;
        weights.terms = shared_b ? SkewTerms{0, nullptr, nullptr, 2, 1, P} : SkewTerms{0, nullptr, nullptr, 1, 1, 0};
      } else {
        // Problem 0: grad_weight_a (terms 0 .. P - 1, or 0 .. 2P - 1 when shared); problem 1: grad_weight_b.
        weights.problems = shared_b ? 1 : 2;
        weights.terms =
            shared_b ? SkewTerms{0, nullptr, nullptr, 2 * P, 0, 1} : SkewTerms{0, nullptr, nullptr, P, P, 1};
      }
      weights.out = {{mutable_data<cuda_t>(grad_weight_a), grad_weight_b_data},
                     weight_stride,
                     {nullptr, nullptr},
                     {0, 0},
                     shared_b ? weights.problems : weights.problems / 2};
      weights.pairs = pairs_device.const_data_ptr<int64_t>();
      weights.num_pairs = P;
      weights.rows = F;
      weights.cols = E;
      weights.depth = N;
      if (!weights_done) launch(SkewGemmKind::kGradWeight, weights, device);
    });
  }

  // Column sums of grad_p over the samples (and over the pairs for a shared bias), in float32.
  if (bias_a.has_value()) {
    const std::vector<int64_t> dims = shape.per_pair ? std::vector<int64_t>{1} : std::vector<int64_t>{0, 1};
    at::Tensor sum_a = at::sum(grad_pa, dims, /*keepdim=*/false, at::kFloat);
    if (shared_b) sum_a.add_(at::sum(grad_pb, dims, /*keepdim=*/false, at::kFloat));
    grad_bias_a.copy_(sum_a);
  }
  if (bias_b.has_value()) {
    const std::vector<int64_t> dims = shape.per_pair ? std::vector<int64_t>{1} : std::vector<int64_t>{0, 1};
    grad_bias_b.copy_(at::sum(grad_pb, dims, /*keepdim=*/false, at::kFloat));
  }
  return {grad_ha, grad_hb, grad_weight_a, grad_bias_a, grad_weight_b, grad_bias_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(stepfusion, CUDA, m) {
  m.impl("skew_pair_project", &skew_pair_project_cuda);
  m.impl("skew_pair_project_backward", &skew_pair_project_backward_cuda);
}

}  // namespace stepfusion
