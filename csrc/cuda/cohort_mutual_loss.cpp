// cohort_mutual_loss on CUDA, host side: argument checks, allocation and launches on the current
// stream. The kernels (one block per batch row) live in cohort_mutual_loss_kernel.cu, free of torch
// headers. The per-row results are reduced over n here with at::sum on fixed shapes (deterministic).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cohort_mutual_loss.h"
#include "cohort_mutual_loss_kernel.h"

namespace stepfusion {
namespace {

cohort_cuda::Dtype kernel_dtype(const at::Tensor& outputs) {
  const at::ScalarType t = outputs.scalar_type();
  TORCH_CHECK_VALUE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                    "cohort_mutual_loss (cuda backend): outputs must be float32, float16 or bfloat16, got ", t);
  return t == at::kFloat ? cohort_cuda::Dtype::kFloat
                         : (t == at::kHalf ? cohort_cuda::Dtype::kHalf : cohort_cuda::Dtype::kBFloat16);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cohort_mutual_loss_cuda(const at::Tensor& outputs_in,
                                                                       const at::Tensor& teacher_weights,
                                                                       c10::string_view kind_name) {
  const CohortKind kind = parse_cohort_kind(std::string(kind_name));
  const CohortShape shape = check_cohort_mutual_loss(outputs_in, teacher_weights);
  const cohort_cuda::Dtype dtype = kernel_dtype(outputs_in);
  const c10::cuda::CUDAGuard guard(outputs_in.device());
  const double total_weight = checked_total_weight(teacher_weights);  // one device-to-host copy
  const at::Tensor outputs = outputs_in.contiguous();
  const at::Tensor weights = teacher_weights.detach().to(at::kFloat).contiguous();
  const auto float_options = outputs.options().dtype(at::kFloat);

  // Without students there is no mixture: zeros rather than uninitialised memory.
  at::Tensor mixture = shape.students == 0 ? at::zeros({shape.batch, shape.classes}, float_options)
                                           : at::empty({shape.batch, shape.classes}, float_options);
  at::Tensor lse = empty_cohort_lse(shape, kind, float_options);
  at::Tensor divergence = at::empty({shape.batch, shape.students}, float_options);
  at::Tensor spread = at::empty({shape.batch}, float_options);
  const cohort_cuda::ForwardArgs args{outputs.data_ptr(),
                                      weights.data_ptr<float>(),
                                      static_cast<float>(total_weight),
                                      mixture.data_ptr<float>(),
                                      kind == CohortKind::kKL ? lse.data_ptr<float>() : nullptr,
                                      divergence.data_ptr<float>(),
                                      spread.data_ptr<float>(),
                                      shape.students,
                                      shape.batch,
                                      shape.classes,
                                      kind == CohortKind::kKL};
  cohort_cuda::launch_forward(dtype, args, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // penalty_i = scale * sum_n (divergence[n, i] + J_n / W).
  const at::Tensor penalty = (divergence.sum(0) + spread.sum() / total_weight) * cohort_scale(shape, kind);
  return {penalty.to(outputs.scalar_type()), mixture, lse};
}

at::Tensor cohort_mutual_loss_backward_cuda(const at::Tensor& grad_penalty, const at::Tensor& outputs_in,
                                            const at::Tensor& mixture_in, const at::Tensor& lse_in,
                                            c10::string_view kind_name) {
  const CohortKind kind = parse_cohort_kind(std::string(kind_name));
  check_cohort_backward(grad_penalty, outputs_in, mixture_in, lse_in, kind);
  const cohort_cuda::Dtype dtype = kernel_dtype(outputs_in);
  const c10::cuda::CUDAGuard guard(outputs_in.device());
  const CohortShape shape{outputs_in.size(0), outputs_in.size(1), outputs_in.size(2)};
  const at::Tensor outputs = outputs_in.contiguous();
  const at::Tensor mixture = mixture_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  // d penalty_i / d outputs[i, n] = scale * (p_i - q) for kl, scale * 2 (f_i - mu) for mse.
  const double factor = cohort_scale(shape, kind) * (kind == CohortKind::kMSE ? 2.0 : 1.0);
  const at::Tensor coefficient = (grad_penalty.to(at::kFloat) * factor).contiguous();
  at::Tensor grad_outputs = at::empty_like(outputs);
  const cohort_cuda::BackwardArgs args{outputs.data_ptr(),
                                       mixture.data_ptr<float>(),
                                       kind == CohortKind::kKL ? lse.data_ptr<float>() : nullptr,
                                       coefficient.data_ptr<float>(),
                                       grad_outputs.data_ptr(),
                                       shape.students,
                                       shape.batch,
                                       shape.classes,
                                       kind == CohortKind::kKL};
  cohort_cuda::launch_backward(dtype, args, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(stepfusion, CUDA, m) {
  m.impl("cohort_mutual_loss", &cohort_mutual_loss_cuda);
  m.impl("cohort_mutual_loss_backward", &cohort_mutual_loss_backward_cuda);
}

}  // namespace stepfusion
