// Argument checks and shapes of shift_expand shared by the CPU and CUDA implementations.
// The Python layer raises friendly ValueErrors first; these checks guard direct calls of
// torch.ops.stepfusion.shift_expand so that no kernel ever reads out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace stepfusion {

struct ShiftExpandShape {
  int64_t batch;
  int64_t length;
  int64_t dim;
  int64_t rows() const { return batch * length; }
};

inline void check_optional(const std::optional<at::Tensor>& arg, const char* name, const at::Tensor& x,
                           at::IntArrayRef expected) {
  if (!arg.has_value()) return;
  const at::Tensor& t = *arg;
  TORCH_CHECK(t.sizes() == expected, "shift_expand: ", name, " must have shape ", expected, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "shift_expand: ", name, " must have dtype ", x.scalar_type(),
              " like x, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "shift_expand: ", name, " must be on ", x.device(), " like x, got ",
              t.device());
}

inline ShiftExpandShape check_shift_expand(const at::Tensor& x, const std::optional<at::Tensor>& scale_local,
                                           const std::optional<at::Tensor>& shift_local,
                                           const std::optional<at::Tensor>& scale_global,
                                           const std::optional<at::Tensor>& shift_global,
                                           const std::optional<at::Tensor>& gate,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 3, "shift_expand: x must have shape (B, L, D), got ", x.sizes());
  const ShiftExpandShape shape{x.size(0), x.size(1), x.size(2)};
  check_optional(scale_local, "scale_local", x, x.sizes());
  check_optional(shift_local, "shift_local", x, x.sizes());
  check_optional(scale_global, "scale_global", x, {shape.batch, shape.dim});
  check_optional(shift_global, "shift_global", x, {shape.batch, shape.dim});
  check_optional(gate, "gate", x, {shape.dim});
  check_optional(weight, "weight", x, {shape.dim});
  check_optional(bias, "bias", x, {shape.dim});
  return shape;
}

// The backward's own inputs: grad_y like x, and the forward's row statistics (B, L) of `stat_type`.
inline void check_shift_expand_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                                        const at::Tensor& rstd, at::ScalarType stat_type) {
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              "shift_expand_backward: grad_y must match x in shape, dtype and device, got ", grad_y.sizes(), " ",
              grad_y.scalar_type(), " on ", grad_y.device());
  const std::vector<int64_t> stat_shape{x.size(0), x.size(1)};
  for (const at::Tensor* stat : {&mean, &rstd}) {
    TORCH_CHECK(stat->sizes() == stat_shape && stat->scalar_type() == stat_type && stat->device() == x.device(),
                "shift_expand_backward: mean and rstd must be ", stat_type, " of shape ", at::IntArrayRef(stat_shape),
                " on ", x.device(), ", got ", stat->scalar_type(), " of shape ", stat->sizes(), " on ",
                stat->device());
  }
}

// A contiguous copy of an optional argument (or an undefined tensor when it is absent).
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& arg) {
  return arg.has_value() ? arg->contiguous() : at::Tensor();
}

// Gradient of an absent optional argument: an empty tensor (the Python layer maps it to None).
inline at::Tensor absent_grad(const at::Tensor& x) { return at::empty({0}, x.options()); }

}  // namespace stepfusion
