// shift_expand on CUDA: argument checks, allocation and dtype dispatch around the launchers of
// shift_expand_kernel.cu. The backward's tile partial sums (see shift_expand_kernel.h) are added here
// with at::sum, which reduces in a fixed order on CUDA, so every gradient is bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "../shift_expand.h"
#include "shift_expand_kernel.h"

namespace stepfusion {
namespace {

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

void check_cuda_input(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "shift_expand (cuda backend): x must be a CUDA tensor, got ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "shift_expand (cuda backend): x must be float32, float16 or bfloat16, got ", t);
}

ShiftExpandDevice current_device() {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return {props->multiProcessorCount, props->sharedMemPerBlockOptin};
}

template <typename cuda_t>
const cuda_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<const cuda_t*>(t.const_data_ptr()) : nullptr;
}

template <typename cuda_t>
cuda_t* mutable_data_or_null(at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? static_cast<cuda_t*>(t.mutable_data_ptr()) : nullptr;
}

// The kernels' view of the arguments: contiguous tensors, absent ones as undefined tensors.
struct ContiguousArgs {
  at::Tensor x, scale_local, shift_local, scale_global, shift_global, gate, weight, bias;

  template <typename cuda_t>
  ShiftExpandInputs<cuda_t> inputs(const ShiftExpandShape& shape) const {
    return {data_or_null<cuda_t>(x),
            data_or_null<cuda_t>(scale_local),
            data_or_null<cuda_t>(shift_local),
            data_or_null<cuda_t>(scale_global),
            data_or_null<cuda_t>(shift_global),
            data_or_null<cuda_t>(gate),
            data_or_null<cuda_t>(weight),
            data_or_null<cuda_t>(bias),
            shape.batch,
            shape.length,
            shape.dim};
  }
};

ContiguousArgs contiguous_args(const at::Tensor& x, const std::optional<at::Tensor>& scale_local,
                               const std::optional<at::Tensor>& shift_local,
                               const std::optional<at::Tensor>& scale_global,
                               const std::optional<at::Tensor>& shift_global, const std::optional<at::Tensor>& gate,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  return {x.contiguous(),
          contiguous_or_undefined(scale_local),
          contiguous_or_undefined(shift_local),
          contiguous_or_undefined(scale_global),
          contiguous_or_undefined(shift_global),
          contiguous_or_undefined(gate),
          contiguous_or_undefined(weight),
          contiguous_or_undefined(bias)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shift_expand_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& scale_local, const std::optional<at::Tensor>& shift_local,
    const std::optional<at::Tensor>& scale_global, const std::optional<at::Tensor>& shift_global,
    const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  const ShiftExpandShape shape =
      check_shift_expand(x_in, scale_local, shift_local, scale_global, shift_global, gate, weight, bias);
  check_cuda_input(x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const ContiguousArgs args =
      contiguous_args(x_in, scale_local, shift_local, scale_global, shift_global, gate, weight, bias);

  at::Tensor y = at::empty_like(args.x);
  at::Tensor mean = at::empty({shape.batch, shape.length}, args.x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({shape.batch, shape.length}, args.x.options().dtype(at::kFloat));
  // D == 0: no channels to normalise; the statistics are defined as zeros rather than left unwritten.
  if (shape.rows() == 0 || shape.dim == 0) return {y, mean.zero_(), rstd.zero_()};

  const ShiftExpandDevice device = current_device();
  const int64_t max_dim = shift_expand_cuda_max_dim(device);
  TORCH_CHECK(shape.dim <= max_dim, "shift_expand: cuda backend supports D <= ", max_dim,
              " on this device (a row is held in shared memory), got D = ", shape.dim,
              "; use backend='triton' or 'cpu'");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  STEPFUSION_DISPATCH_CUDA_TYPES(args.x.scalar_type(), "shift_expand_cuda", [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    C10_CUDA_CHECK(launch_shift_expand_forward<cuda_t>(
        args.inputs<cuda_t>(shape), static_cast<cuda_t*>(y.mutable_data_ptr()), mean.mutable_data_ptr<float>(),
        rstd.mutable_data_ptr<float>(), static_cast<float>(eps), device, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
shift_expand_backward_cuda(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                           const std::optional<at::Tensor>& scale_local, const std::optional<at::Tensor>& shift_local,
                           const std::optional<at::Tensor>& scale_global,
                           const std::optional<at::Tensor>& shift_global, const std::optional<at::Tensor>& gate,
                           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  const ShiftExpandShape shape =
      check_shift_expand(x_in, scale_local, shift_local, scale_global, shift_global, gate, weight, bias);
  check_cuda_input(x_in);
  check_shift_expand_backward(grad_y_in, x_in, mean_in, rstd_in, at::kFloat);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const ContiguousArgs args =
      contiguous_args(x_in, scale_local, shift_local, scale_global, shift_global, gate, weight, bias);
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor& x = args.x;

  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_scale_local = scale_local.has_value() ? at::empty_like(x) : absent_grad(x);
  at::Tensor grad_shift_local = shift_local.has_value() ? at::empty_like(x) : absent_grad(x);
  const ShiftExpandSumSlots slots =
      shift_expand_sum_slots(gate.has_value(), weight.has_value(), bias.has_value(), shift_global.has_value(),
                             scale_global.has_value());

  // With no rows (L == 0) there are no tiles: the partial sums below are then sums of nothing, zeros.
  int64_t tiles_per_sample = 0;
  at::Tensor partial;
  if (shape.rows() > 0 && shape.dim > 0) {
    const ShiftExpandDevice device = current_device();
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    STEPFUSION_DISPATCH_CUDA_TYPES(x.scalar_type(), "shift_expand_backward_cuda", [&] {
      using cuda_t = typename CudaType<scalar_t>::type;
      const ShiftExpandInputs<cuda_t> inputs = args.inputs<cuda_t>(shape);
      const ShiftExpandRowGrads<cuda_t> rows{data_or_null<cuda_t>(grad_y),
                                             mean.const_data_ptr<float>(),
                                             rstd.const_data_ptr<float>(),
                                             mutable_data_or_null<cuda_t>(grad_x),
                                             mutable_data_or_null<cuda_t>(grad_scale_local),
                                             mutable_data_or_null<cuda_t>(grad_shift_local)};
      ShiftExpandBackwardPlan plan;
      C10_CUDA_CHECK(plan_shift_expand_backward<cuda_t>(inputs, rows, slots, device, &plan));
      tiles_per_sample = plan.tiles_per_sample;
      partial = at::empty({shape.batch * tiles_per_sample * slots.count * shape.dim}, x.options().dtype(at::kFloat));
      C10_CUDA_CHECK(launch_shift_expand_backward<cuda_t>(inputs, rows, slots, plan,
                                                          partial.mutable_data_ptr<float>(), stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    partial = at::empty({0}, x.options().dtype(at::kFloat));
  }

  at::Tensor sample_sums, channel_sums;  // (B, slot, D) and (slot, D)
  if (slots.count > 0) {
    sample_sums = partial.view({shape.batch, tiles_per_sample, slots.count, shape.dim}).sum(1);
    channel_sums = sample_sums.sum(0);
  }
  // A fresh contiguous tensor per gradient (never a view of the sums, nor of another gradient).
  const auto grad_of = [&](int slot, const at::Tensor& sums, int64_t slot_dim) {
    return slot < 0 ? absent_grad(x)
                    : sums.select(slot_dim, slot).to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true,
                                                     at::MemoryFormat::Contiguous);
  };
  at::Tensor grad_scale_global = absent_grad(x);
  if (scale_global.has_value()) {
    const at::Tensor tanh_global = scale_global->to(at::kFloat).tanh();
    grad_scale_global =
        (sample_sums.select(1, slots.scale_global) * (1 - tanh_global * tanh_global)).to(x.scalar_type());
  }
  return {grad_x,
          grad_scale_local,
          grad_shift_local,
          grad_scale_global,
          grad_of(slots.shift_global, sample_sums, 1),
          grad_of(slots.gate, channel_sums, 0),
          grad_of(slots.weight, channel_sums, 0),
          grad_of(slots.bias, channel_sums, 0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(stepfusion, CUDA, m) {
  m.impl("shift_expand", &shift_expand_cuda);
  m.impl("shift_expand_backward", &shift_expand_backward_cuda);
}

}  // namespace stepfusion
