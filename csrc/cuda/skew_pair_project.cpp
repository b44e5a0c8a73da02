// skew_pair_project on CUDA: argument checks, allocation, dtype dispatch and the term lists around
// the grouped GEMM of skew_pair_project_kernel.cu. Three launches of it cover everything:
//   forward        2P problems (side, pair), one term each: pa[k] / pb[k] = h[layer] @ W(k)^T + b(k)
//   grad_ha, hb    LA + LB problems (one per layer), whose terms are the pairs using the layer,
//                  sorted stably by layer here with torch ops (a segment reduction, no atomics)
//   grad_weight    2 (shared) or 2P (per pair) problems, each summing grad_p^T @ h over its pairs;
//                  P or 1 problems of both sides' terms when weight_b is absent
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

#include <tuple>
#include <vector>

#include "../common.h"
#include "dispatch.h"
#include "../skew_pair_project.h"
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
    gemm.pairs = args.pairs.const_data_ptr<int64_t>();
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

  // Segments of grad_h: term q = side * P + k is keyed by its layer in the stacked [ha; hb] layers
  // (pairs[k][0], or LA + pairs[k][1]); a stable sort keeps each layer's terms in ascending q, and
  // layer l's terms are entries[offsets[l] .. offsets[l + 1]) (empty for a layer no pair uses).
  const at::Tensor layer_keys = at::cat({args.pairs.select(1, 0), args.pairs.select(1, 1) + LA});
  const auto sorted = at::sort(layer_keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor segment_entries = std::get<1>(sorted).contiguous();
  const at::Tensor segment_offsets =
      at::searchsorted(std::get<0>(sorted), at::arange(LA + LB + 1, args.pairs.options())).contiguous();

  const int64_t weight_stride = shape.per_pair ? F * E : 0;
  const SkewPairDevice device = current_device();
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
    features.pairs = args.pairs.const_data_ptr<int64_t>();
    features.num_pairs = P;
    features.problems = LA + LB;
    features.rows = N;
    features.cols = E;
    features.depth = F;
    launch(SkewGemmKind::kGradFeatures, features, device);

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
      weights.terms = shared_b ? SkewTerms{0, nullptr, nullptr, 2 * P, 0, 1} : SkewTerms{0, nullptr, nullptr, P, P, 1};
    }
    weights.out = {{mutable_data<cuda_t>(grad_weight_a), grad_weight_b_data},
                   weight_stride,
                   {nullptr, nullptr},
                   {0, 0},
                   shared_b ? weights.problems : weights.problems / 2};
    weights.pairs = args.pairs.const_data_ptr<int64_t>();
    weights.num_pairs = P;
    weights.rows = F;
    weights.cols = E;
    weights.depth = N;
    launch(SkewGemmKind::kGradWeight, weights, device);
  });

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
