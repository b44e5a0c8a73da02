// Argument checks and shapes of shift_expand shared by the CPU and CUDA implementations.
// The Python layer raises friendly ValueErrors first; these checks guard direct calls of
// torch.ops.stepfusion.shift_expand so that no kernel ever reads out of bounds.
#pragma once

#include <ATen/ATen.h>

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

// A contiguous copy of an optional argument (or an undefined tensor when it is absent).
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& arg) {
  return arg.has_value() ? arg->contiguous() : at::Tensor();
}

// Gradient of an absent optional argument: an empty tensor (the Python layer maps it to None).
inline at::Tensor absent_grad(const at::Tensor& x) { return at::empty({0}, x.options()); }

}  // namespace stepfusion
