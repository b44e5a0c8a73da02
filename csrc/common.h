// Small helpers shared by every op's CPU and CUDA host code.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace stepfusion {

// A contiguous copy of an optional argument (or an undefined tensor when it is absent).
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& arg) {
  return arg.has_value() ? arg->contiguous() : at::Tensor();
}

// Gradient of an absent optional argument: an empty tensor (the Python layer maps it to None).
inline at::Tensor absent_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace stepfusion
