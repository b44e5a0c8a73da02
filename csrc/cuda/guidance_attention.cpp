// guidance_attention on CUDA: argument checks, allocation and dtype dispatch around the launchers of
// guidance_attention_kernel.cu. The global tokens' gradients come from the kernels as one float32
// partial per query block; they are added here with at::sum, which reduces in a fixed order on CUDA,
// so every gradient is bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>

#include "dispatch.h"
#include "../guidance_attention.h"
#include "guidance_attention_kernel.h"

namespace stepfusion {
namespace {

template <typename cuda_t>
void check_head_dim(int64_t head_dim) {
  TORCH_CHECK(guidance_attention_cuda_supports_head_dim(head_dim),
              "cuda backend supports head_dim in {16, 32, 64, 128}, got ", head_dim);
  const size_t needed = guidance_attention_cuda_shared_bytes<cuda_t>(head_dim);
  const size_t available = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(needed <= available, "guidance_attention (cuda backend): head_dim ", head_dim, " needs ", needed,
              " bytes of shared memory per block, this device allows ", available,
              "; use backend='triton' or a smaller head_dim");
}

// The kernels read rows with 16-byte loads: a contiguous tensor whose storage offset breaks that
// alignment (a slice) is copied.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<std::uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

at::Tensor aligned_contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? aligned_contiguous(*t) : at::Tensor();
}

// The kernels' view of the operands: contiguous, aligned; absent globals as undefined tensors.
struct Operands {
  at::Tensor q, k, v, k_global, v_global;

  template <typename cuda_t>
  GuidanceAttentionInputs<cuda_t> inputs(const GuidanceAttentionShape& shape, int64_t window, double scale) const {
    const auto ptr = [](const at::Tensor& t) {
      return t.defined() ? static_cast<const cuda_t*>(t.const_data_ptr()) : nullptr;
    };
    // A window of Lk or more already reaches every key; clamping keeps the kernels' band arithmetic
    // (c_i +- w) far from int64 overflow.
    const int64_t clamped_window = window < 0 ? -1 : std::min(window, shape.len_k);
    return {ptr(q),
            ptr(k),
            ptr(v),
            ptr(k_global),
            ptr(v_global),
            shape.batch * shape.heads,
            shape.len_q,
            shape.len_k,
            shape.globals,
            shape.head_dim,
            clamped_window,
            static_cast<float>(scale)};
  }
};

Operands operands_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& k_global, const std::optional<at::Tensor>& v_global) {
  return {aligned_contiguous(q), aligned_contiguous(k), aligned_contiguous(v),
          aligned_contiguous_or_undefined(k_global), aligned_contiguous_or_undefined(v_global)};
}

std::tuple<at::Tensor, at::Tensor> guidance_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                           const at::Tensor& v_in,
                                                           const std::optional<at::Tensor>& k_global,
                                                           const std::optional<at::Tensor>& v_global, int64_t window,
                                                           double scale) {
  const GuidanceAttentionShape shape = check_guidance_attention(q_in, k_in, v_in, k_global, v_global, window);
  check_cuda_input("guidance_attention", "q", q_in);
  const c10::cuda::CUDAGuard device_guard(q_in.device());

  at::Tensor out = at::empty({shape.batch, shape.heads, shape.len_q, shape.head_dim}, q_in.options());
  at::Tensor lse = at::empty({shape.batch, shape.heads, shape.len_q}, q_in.options().dtype(at::kFloat));
  if (shape.batch * shape.heads * shape.len_q == 0) return {out, lse};

  const Operands operands = operands_of(q_in, k_in, v_in, k_global, v_global);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  STEPFUSION_DISPATCH_CUDA_TYPES(q_in.scalar_type(), "guidance_attention_cuda", [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    check_head_dim<cuda_t>(shape.head_dim);
    C10_CUDA_CHECK(launch_guidance_attention_forward<cuda_t>(operands.inputs<cuda_t>(shape, window, scale),
                                                             static_cast<cuda_t*>(out.mutable_data_ptr()),
                                                             lse.mutable_data_ptr<float>(), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> guidance_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& k_global, const std::optional<at::Tensor>& v_global, const at::Tensor& out_in,
    const at::Tensor& lse_in, int64_t window, double scale) {
  const GuidanceAttentionShape shape = check_guidance_attention_backward(grad_out_in, q_in, k_in, v_in, k_global,
                                                                         v_global, out_in, lse_in, window);
  check_cuda_input("guidance_attention", "q", q_in);
  const c10::cuda::CUDAGuard device_guard(q_in.device());

  const at::TensorOptions options = q_in.options();
  const bool has_globals = k_global.has_value();
  const std::vector<int64_t> key_shape{shape.batch, shape.heads, shape.len_k, shape.head_dim};
  const std::vector<int64_t> global_shape{shape.batch, shape.heads, shape.globals, shape.head_dim};
  at::Tensor grad_q = at::empty({shape.batch, shape.heads, shape.len_q, shape.head_dim}, options);
  // Without queries no key receives a gradient: zeros, not uninitialised memory.
  if (shape.batch * shape.heads * shape.len_q == 0) {
    return {grad_q, at::zeros(key_shape, options), at::zeros(key_shape, options),
            has_globals ? at::zeros(global_shape, options) : at::empty({0}, options),
            has_globals ? at::zeros(global_shape, options) : at::empty({0}, options)};
  }

  const Operands operands = operands_of(q_in, k_in, v_in, k_global, v_global);
  const at::Tensor grad_out = aligned_contiguous(grad_out_in);
  const at::Tensor out = aligned_contiguous(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_k = at::empty(key_shape, options);
  at::Tensor grad_v = at::empty(key_shape, options);
  const at::TensorOptions float_options = options.dtype(at::kFloat);
  at::Tensor delta = at::empty({shape.batch * shape.heads * shape.len_q}, float_options);
  at::Tensor grad_k_global_partial;
  at::Tensor grad_v_global_partial;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  STEPFUSION_DISPATCH_CUDA_TYPES(q_in.scalar_type(), "guidance_attention_backward_cuda", [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    check_head_dim<cuda_t>(shape.head_dim);
    if (has_globals) {
      const int64_t query_blocks = guidance_attention_cuda_backward_query_blocks<cuda_t>(shape.len_q, shape.head_dim);
      const std::vector<int64_t> partial_shape{shape.batch * shape.heads, query_blocks, shape.globals,
                                               shape.head_dim};
      grad_k_global_partial = at::empty(partial_shape, float_options);
      grad_v_global_partial = at::empty(partial_shape, float_options);
    }
    const auto mutable_or_null = [](at::Tensor& t) {
      return t.defined() && t.numel() > 0 ? t.mutable_data_ptr<float>() : nullptr;
    };
    const GuidanceAttentionGrads<cuda_t> grads{static_cast<const cuda_t*>(grad_out.const_data_ptr()),
                                               static_cast<const cuda_t*>(out.const_data_ptr()),
                                               lse.const_data_ptr<float>(),
                                               delta.mutable_data_ptr<float>(),
                                               static_cast<cuda_t*>(grad_q.mutable_data_ptr()),
                                               static_cast<cuda_t*>(grad_k.mutable_data_ptr()),
                                               static_cast<cuda_t*>(grad_v.mutable_data_ptr()),
                                               mutable_or_null(grad_k_global_partial),
                                               mutable_or_null(grad_v_global_partial)};
    C10_CUDA_CHECK(launch_guidance_attention_backward<cuda_t>(operands.inputs<cuda_t>(shape, window, scale), grads,
                                                              stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  if (!has_globals) return {grad_q, grad_k, grad_v, at::empty({0}, options), at::empty({0}, options)};
  // sum over the query blocks; .to copies for float16/bfloat16 and keeps the fresh sum for float32.
  const auto global_grad = [&](const at::Tensor& partial) {
    return partial.sum(1).view(global_shape).to(q_in.scalar_type());
  };
  return {grad_q, grad_k, grad_v, global_grad(grad_k_global_partial), global_grad(grad_v_global_partial)};
}

}  // namespace

TORCH_LIBRARY_IMPL(stepfusion, CUDA, m) {
  m.impl("guidance_attention", &guidance_attention_cuda);
  m.impl("guidance_attention_backward", &guidance_attention_backward_cuda);
}

}  // namespace stepfusion
