// Launchers of the shift_expand CUDA kernels. Plain C++ and CUDA runtime types only, so that the
// kernels (shift_expand_kernel.cu, nvcc, no torch headers) and the torch glue (shift_expand.cpp)
// compile apart. T is float, __half or __nv_bfloat16; every launcher is instantiated for those three.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace stepfusion {

// What the launchers need to know about the device (taken from torch's cached device properties).
struct ShiftExpandDevice {
  int sm_count;
  size_t shared_per_block_optin;  // cudaDeviceProp::sharedMemPerBlockOptin
};

// The inputs of shift_expand: contiguous, dtype T; nullptr for an absent optional argument.
template <typename T>
struct ShiftExpandInputs {
  const T* x;             // (B, L, D)
  const T* scale_local;   // (B, L, D)
  const T* shift_local;   // (B, L, D)
  const T* scale_global;  // (B, D)
  const T* shift_global;  // (B, D)
  const T* gate;          // (D,)
  const T* weight;        // (D,)
  const T* bias;          // (D,)
  int64_t batch;
  int64_t length;
  int64_t dim;
};

// The forward keeps one row of h (D floats) in shared memory per warp, so D is bounded by the
// largest dynamic shared memory a block may opt in to.
int64_t shift_expand_cuda_max_dim(const ShiftExpandDevice& device);

// y (B, L, D) in T; mean and rstd (B, L) in float32. Needs rows > 0 and 0 < D <= max_dim.
template <typename T>
cudaError_t launch_shift_expand_forward(const ShiftExpandInputs<T>& inputs, T* y, float* mean, float* rstd,
                                        float eps, const ShiftExpandDevice& device, cudaStream_t stream);

// The backward's row tensors: grad_y, mean and rstd in; the per-position gradients out
// (grad_scale_local / grad_shift_local nullptr when that argument is absent).
template <typename T>
struct ShiftExpandRowGrads {
  const T* grad_y;
  const float* mean;
  const float* rstd;
  T* grad_x;
  T* grad_scale_local;
  T* grad_shift_local;
};

// The backward writes float32 partial sums laid out [B][tiles_per_sample][slot][D]: the partial of
// slot `gate` is sum(dh * u), `weight` sum(dy * xhat), `bias` sum(dy), `shift_global` sum(dh * gate),
// `scale_global` sum(dh * gate * x * (1 + tanh(scale_local))) over the rows of one tile. A slot is -1
// (and takes no room) when its argument is absent.
struct ShiftExpandSumSlots {
  int gate = -1;
  int weight = -1;
  int bias = -1;
  int shift_global = -1;
  int scale_global = -1;
  int count = 0;
};

inline ShiftExpandSumSlots shift_expand_sum_slots(bool has_gate, bool has_weight, bool has_bias,
                                                  bool has_shift_global, bool has_scale_global) {
  ShiftExpandSumSlots slots;
  if (has_gate) slots.gate = slots.count++;
  if (has_weight) slots.weight = slots.count++;
  if (has_bias) slots.bias = slots.count++;
  if (has_shift_global) slots.shift_global = slots.count++;
  if (has_scale_global) slots.scale_global = slots.count++;
  return slots;
}

// How the backward splits its rows: a tile is rows_per_tile consecutive rows of one sample, owned by
// one warp; the partial buffer holds batch * tiles_per_sample * slots.count * dim floats.
struct ShiftExpandBackwardPlan {
  int vector_width;          // channels per load (16 bytes of T when every pointer allows it, else 1)
  int warps_per_block;
  size_t shared_bytes;       // dynamic shared memory per block (0 when the sums live in global memory)
  bool sums_in_shared;       // tile sums accumulate in shared memory, else in the tile's global slice
  int64_t rows_per_tile;
  int64_t tiles_per_sample;
  int64_t blocks;
};

// Needs rows > 0 and D > 0. The plan depends only on the shapes, the present arguments, the
// pointer alignment and the device, so repeated calls give the same partial sums bit for bit.
template <typename T>
cudaError_t plan_shift_expand_backward(const ShiftExpandInputs<T>& inputs, const ShiftExpandRowGrads<T>& rows,
                                       const ShiftExpandSumSlots& slots, const ShiftExpandDevice& device,
                                       ShiftExpandBackwardPlan* plan);

// partial: batch * plan.tiles_per_sample * slots.count * dim floats (every one is written).
template <typename T>
cudaError_t launch_shift_expand_backward(const ShiftExpandInputs<T>& inputs, const ShiftExpandRowGrads<T>& rows,
                                         const ShiftExpandSumSlots& slots, const ShiftExpandBackwardPlan& plan,
                                         float* partial, cudaStream_t stream);

}  // namespace stepfusion
