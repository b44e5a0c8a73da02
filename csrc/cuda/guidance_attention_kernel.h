// Launchers of the guidance_attention CUDA kernels. Plain C++ and CUDA runtime types only, so that the
// kernels (guidance_attention_kernel.cu, nvcc, no torch headers) and the torch glue
// (guidance_attention.cpp) compile apart. T is float, __half or __nv_bfloat16; every function is
// instantiated for those three.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace stepfusion {

// The operands of guidance_attention: contiguous, dtype T, 16-byte aligned; k_global/v_global are
// nullptr when absent (globals == 0). batch_heads = B * H; every tensor is (batch_heads, L, head_dim).
template <typename T>
struct GuidanceAttentionInputs {
  const T* q;         // (BH, Lq, Dh)
  const T* k;         // (BH, Lk, Dh)
  const T* v;         // (BH, Lk, Dh)
  const T* k_global;  // (BH, G, Dh)
  const T* v_global;  // (BH, G, Dh)
  int64_t batch_heads;
  int64_t len_q;
  int64_t len_k;
  int64_t globals;
  int64_t head_dim;
  int64_t window;  // -1 (every key) or 0 <= window <= len_k (larger windows clamped by the caller)
  float scale;
};

// The head dims the kernels are compiled for: 16, 32, 64 and 128.
bool guidance_attention_cuda_supports_head_dim(int64_t head_dim);

// Dynamic shared memory (bytes) the largest of the forward and backward kernels needs for this head
// dim, to compare with cudaDeviceProp::sharedMemPerBlockOptin.
template <typename T>
size_t guidance_attention_cuda_shared_bytes(int64_t head_dim);

// out (BH, Lq, Dh) in T; lse (BH, Lq) float32, natural log of the sum of exp(scaled allowed scores).
// Needs batch_heads > 0, len_q > 0, len_k > 0 or globals > 0, and a supported head dim.
template <typename T>
cudaError_t launch_guidance_attention_forward(const GuidanceAttentionInputs<T>& inputs, T* out, float* lse,
                                              cudaStream_t stream);

// The number of query blocks the backward splits len_q into: the second dimension of the global
// tokens' partial gradients below.
template <typename T>
int64_t guidance_attention_cuda_backward_query_blocks(int64_t len_q, int64_t head_dim);

// The backward's tensors. delta is float32 scratch of batch_heads * len_q. grad_k/grad_v are unused
// when len_k == 0. Each query block writes the global tokens' gradient contributions of its queries
// to its own slice of grad_k_global_partial / grad_v_global_partial (float32, laid out
// (BH, query_blocks, G, Dh); nullptr when globals == 0); the caller sums over query_blocks.
template <typename T>
struct GuidanceAttentionGrads {
  const T* grad_out;  // (BH, Lq, Dh)
  const T* out;       // (BH, Lq, Dh)
  const float* lse;   // (BH, Lq)
  float* delta;       // (BH, Lq) scratch: rowsum(grad_out * out)
  T* grad_q;
  T* grad_k;
  T* grad_v;
  float* grad_k_global_partial;
  float* grad_v_global_partial;
};

// Same requirements as the forward. Every element of grad_q, grad_k, grad_v and of the partials is
// written (zeros for keys that no query sees).
template <typename T>
cudaError_t launch_guidance_attention_backward(const GuidanceAttentionInputs<T>& inputs,
                                               const GuidanceAttentionGrads<T>& grads, cudaStream_t stream);

}  // namespace stepfusion
