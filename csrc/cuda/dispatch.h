// Host-side helpers shared by the CUDA implementations: the CUDA element type behind an ATen dtype,
// the dtype dispatch of every GPU kernel (float32, float16, bfloat16) and the input check that goes
// with it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace stepfusion {

// The CUDA element type of an ATen scalar type (the same bits).
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

#define STEPFUSION_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)             \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// `name` of `op` must be a CUDA tensor of a dtype the GPU kernels take.
inline void check_cuda_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, " (cuda backend): ", name, " must be a CUDA tensor, got ", t.device());
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op, " (cuda backend): ", name,
              " must be float32, float16 or bfloat16, got ", type);
}

}  // namespace stepfusion
