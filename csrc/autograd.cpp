// Autograd of the C++ ops, for every device (the Autograd dispatch key): each forward op becomes a
// torch::autograd::Function that runs the op below autograd and, in the backward, its <op>_backward op.
// This is the contract the Python layer used to register with torch.library.register_autograd (the
// Triton ops still do); in C++ the autograd wrapper costs a few microseconds per call instead of about
// a hundred (forward + backward), which is most of a small call's host time.
//
// The backward ops themselves are not differentiable: they get autograd's not-implemented kernel, so a
// double backward through a kernel backend raises ("the derivative for ... is not implemented")
// instead of silently treating the first gradient as a constant. backend="reference" has one.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace stepfusion {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;

// The typed dispatcher handle of stepfusion::<name>, looked up once per op.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Optional arguments are saved as undefined tensors when absent, and come back as nullopt.
at::Tensor saved_form(const OptionalTensor& arg) { return arg.value_or(at::Tensor()); }
OptionalTensor optional_form(const at::Tensor& saved) {
  return saved.defined() ? OptionalTensor(saved) : std::nullopt;
}

// The backward ops return an empty tensor as the gradient of an absent optional argument; autograd
// wants an undefined one there.
at::Tensor grad_for(const at::Tensor& grad, const at::Tensor& input) { return input.defined() ? grad : at::Tensor(); }

class ShiftExpand : public torch::autograd::Function<ShiftExpand> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptionalTensor& scale_local,
                               const OptionalTensor& shift_local, const OptionalTensor& scale_global,
                               const OptionalTensor& shift_global, const OptionalTensor& gate,
                               const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
    static const auto forward_op = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
        const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, double)>("stepfusion::shift_expand");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd] =
        forward_op.call(x, scale_local, shift_local, scale_global, shift_global, gate, weight, bias, eps);
    ctx->save_for_backward({x, saved_form(scale_local), saved_form(shift_local), saved_form(scale_global),
                            saved_form(shift_global), saved_form(gate), saved_form(weight), saved_form(bias), mean,
                            rstd});
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor>;
    static const auto backward_op =
        op<Grads(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                 const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                 const OptionalTensor&, const at::Tensor&, const at::Tensor&)>("stepfusion::shift_expand_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Grads result = backward_op.call(grads[0], saved[0], optional_form(saved[1]), optional_form(saved[2]),
                                          optional_form(saved[3]), optional_form(saved[4]), optional_form(saved[5]),
                                          optional_form(saved[6]), optional_form(saved[7]), saved[8], saved[9]);
    return {std::get<0>(result),
            grad_for(std::get<1>(result), saved[1]),
            grad_for(std::get<2>(result), saved[2]),
            grad_for(std::get<3>(result), saved[3]),
            grad_for(std::get<4>(result), saved[4]),
            grad_for(std::get<5>(result), saved[5]),
            grad_for(std::get<6>(result), saved[6]),
            grad_for(std::get<7>(result), saved[7]),
            at::Tensor()};  // eps
  }
};

class GuidanceAttention : public torch::autograd::Function<GuidanceAttention> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptionalTensor& k_global, const OptionalTensor& v_global, int64_t window,
                               double scale) {
    static const auto forward_op =
        op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const OptionalTensor&, const OptionalTensor&, int64_t, double)>(
            "stepfusion::guidance_attention");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = forward_op.call(q, k, v, k_global, v_global, window, scale);
    ctx->save_for_backward({q, k, v, saved_form(k_global), saved_form(v_global), out, lse});
    ctx->saved_data["window"] = window;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
    static const auto backward_op =
        op<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                 const OptionalTensor&, const at::Tensor&, const at::Tensor&, int64_t, double)>(
            "stepfusion::guidance_attention_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Grads result = backward_op.call(grads[0], saved[0], saved[1], saved[2], optional_form(saved[3]),
                                          optional_form(saved[4]), saved[5], saved[6],
                                          ctx->saved_data["window"].toInt(), ctx->saved_data["scale"].toDouble());
    return {std::get<0>(result),
            std::get<1>(result),
            std::get<2>(result),
            grad_for(std::get<3>(result), saved[3]),
            grad_for(std::get<4>(result), saved[4]),
            at::Tensor(),   // window
            at::Tensor()};  // scale
  }
};

class SkewPairProject : public torch::autograd::Function<SkewPairProject> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& ha, const at::Tensor& hb,
                               const at::Tensor& pairs, const at::Tensor& weight_a, const OptionalTensor& bias_a,
                               const OptionalTensor& weight_b, const OptionalTensor& bias_b) {
    static const auto forward_op =
        op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                                              const OptionalTensor&)>("stepfusion::skew_pair_project");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [pa, pb] = forward_op.call(ha, hb, pairs, weight_a, bias_a, weight_b, bias_b);
    ctx->save_for_backward({ha, hb, pairs, weight_a, saved_form(bias_a), saved_form(weight_b), saved_form(bias_b)});
    return {pa, pb};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
    static const auto backward_op =
        op<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                 const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&)>(
            "stepfusion::skew_pair_project_backward");
    const variable_list saved = ctx->get_saved_variables();
    const auto [grad_ha, grad_hb, grad_weight_a, grad_bias_a, grad_weight_b, grad_bias_b] =
        backward_op.call(grads[0], grads[1], saved[0], saved[1], saved[2], saved[3], optional_form(saved[4]),
                         optional_form(saved[5]), optional_form(saved[6]));
    return {grad_ha,
            grad_hb,
            at::Tensor(),  // pairs
            grad_weight_a,
            grad_for(grad_bias_a, saved[4]),
            grad_for(grad_weight_b, saved[5]),
            grad_for(grad_bias_b, saved[6])};
  }
};

class CohortMutualLoss : public torch::autograd::Function<CohortMutualLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& outputs, const at::Tensor& teacher_weights,
                               c10::string_view kind) {
    static const auto forward_op =
        op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, c10::string_view)>(
            "stepfusion::cohort_mutual_loss");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [penalty, mixture, lse] = forward_op.call(outputs, teacher_weights, kind);
    ctx->save_for_backward({outputs, mixture, lse});
    ctx->saved_data["kind"] = std::string(kind);
    ctx->mark_non_differentiable({mixture, lse});
    return {penalty, mixture, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, c10::string_view)>(
        "stepfusion::cohort_mutual_loss_backward");
    const variable_list saved = ctx->get_saved_variables();
    const std::string kind = ctx->saved_data["kind"].toStringRef();
    // The teachers are detached: teacher_weights gets no gradient (and kind is not a tensor).
    return {backward_op.call(grads[0], saved[0], saved[1], saved[2], kind), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> shift_expand_autograd(
    const at::Tensor& x, const OptionalTensor& scale_local, const OptionalTensor& shift_local,
    const OptionalTensor& scale_global, const OptionalTensor& shift_global, const OptionalTensor& gate,
    const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
  const variable_list result =
      ShiftExpand::apply(x, scale_local, shift_local, scale_global, shift_global, gate, weight, bias, eps);
  return {result[0], result[1], result[2]};
}

std::tuple<at::Tensor, at::Tensor> guidance_attention_autograd(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const OptionalTensor& k_global,
                                                               const OptionalTensor& v_global, int64_t window,
                                                               double scale) {
  const variable_list result = GuidanceAttention::apply(q, k, v, k_global, v_global, window, scale);
  return {result[0], result[1]};
}

std::tuple<at::Tensor, at::Tensor> skew_pair_project_autograd(const at::Tensor& ha, const at::Tensor& hb,
                                                              const at::Tensor& pairs, const at::Tensor& weight_a,
                                                              const OptionalTensor& bias_a,
                                                              const OptionalTensor& weight_b,
                                                              const OptionalTensor& bias_b) {
  const variable_list result = SkewPairProject::apply(ha, hb, pairs, weight_a, bias_a, weight_b, bias_b);
  return {result[0], result[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cohort_mutual_loss_autograd(const at::Tensor& outputs,
                                                                           const at::Tensor& teacher_weights,
                                                                           c10::string_view kind) {
  const variable_list result = CohortMutualLoss::apply(outputs, teacher_weights, kind);
  return {result[0], result[1], result[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(stepfusion, Autograd, m) {
  m.impl("shift_expand", &shift_expand_autograd);
  m.impl("guidance_attention", &guidance_attention_autograd);
  m.impl("skew_pair_project", &skew_pair_project_autograd);
  m.impl("cohort_mutual_loss", &cohort_mutual_loss_autograd);
  for (const char* name : {"shift_expand_backward", "guidance_attention_backward", "skew_pair_project_backward",
                           "cohort_mutual_loss_backward"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

}  // namespace stepfusion
