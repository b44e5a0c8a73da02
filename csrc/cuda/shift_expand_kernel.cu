// shift_expand on CUDA. One warp per row: the row's channels are spread over the 32 lanes in chunks
// of VEC (16-byte loads when every pointer and D allow it) and the LayerNorm sums are warp shuffles.
//
// Forward: one kernel; every input is read once. The lanes park h in the warp's slice of dynamic
// shared memory (D floats) so that mean and the biased variance take two passes over it without
// going back to global memory.
//
// Backward: one kernel for the rows; a warp owns a tile of consecutive rows of one sample and adds
// the tile's contributions to the gate/weight/bias and global gradients into its own float32 slice
// (in shared memory when it fits, else straight in the tile's slice of the global partial buffer).
// The host sums the slices in a fixed order. Each lane only ever touches its own channels, and no
// floating-point atomics are used, so the gradients are the same bits on every run.
//
// All arithmetic is float32; all offsets are int64_t.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>

#include "convert.cuh"
#include "shift_expand_kernel.h"

namespace stepfusion {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxWarpsPerBlock = 8;
// Dynamic shared memory a block gets without opting in.
constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr int64_t kMaxBlocks = INT_MAX;

// VEC consecutive elements moved as one (16-byte when VEC * sizeof(T) == 16) load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_chunk(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_float(pack.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_chunk(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pack.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// float buffers (shared or global scratch): float4 accesses when VEC allows, which also keeps the
// 32 lanes' shared-memory accesses free of bank conflicts.
template <int VEC>
__device__ __forceinline__ void load_floats(const float* p, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      const float4 q = *reinterpret_cast<const float4*>(p + j);
      out[j] = q.x;
      out[j + 1] = q.y;
      out[j + 2] = q.z;
      out[j + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = p[j];
  }
}

template <int VEC>
__device__ __forceinline__ void store_floats(float* p, const float (&in)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) *reinterpret_cast<float4*>(p + j) = make_float4(in[j], in[j + 1], in[j + 2], in[j + 3]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = in[j];
  }
}

template <int VEC>
__device__ __forceinline__ void fill(float (&out)[VEC], float value) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = value;
}

// The butterfly leaves the same sum in every lane (each step adds the same two values, a + b == b + a).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The per-channel terms of one chunk of VEC channels of one row (see the SPEC for the math).
template <int VEC>
struct ChunkTerms {
  float x[VEC];
  float tanh_local[VEC];     // tanh(scale_local), 0 when absent
  float expand_global[VEC];  // 1 + tanh(scale_global[b]), 1 when absent
  float gate[VEC];           // 1 when absent
  float s[VEC];              // (1 + tanh_local) * expand_global
  float u[VEC];              // (s - 1) * x + shift_local + shift_global[b]
  float h[VEC];              // x + gate * u
};

// row_offset = row * D, sample_offset = b * D, d the chunk's first channel. Unused terms are
// dropped by the compiler after inlining.
template <typename T, int VEC>
__device__ __forceinline__ void compute_chunk(const ShiftExpandInputs<T>& in, int64_t row_offset, int64_t sample_offset,
                                              int64_t d, ChunkTerms<VEC>& c) {
  load_chunk<T, VEC>(in.x + row_offset + d, c.x);
  fill(c.tanh_local, 0.f);
  if (in.scale_local != nullptr) {
    load_chunk<T, VEC>(in.scale_local + row_offset + d, c.tanh_local);
#pragma unroll
    for (int j = 0; j < VEC; ++j) c.tanh_local[j] = tanhf(c.tanh_local[j]);
  }
  fill(c.expand_global, 1.f);
  if (in.scale_global != nullptr) {
    load_chunk<T, VEC>(in.scale_global + sample_offset + d, c.expand_global);
#pragma unroll
    for (int j = 0; j < VEC; ++j) c.expand_global[j] = 1.f + tanhf(c.expand_global[j]);
  }
  float shift[VEC];
  fill(shift, 0.f);
  if (in.shift_local != nullptr) load_chunk<T, VEC>(in.shift_local + row_offset + d, shift);
  if (in.shift_global != nullptr) {
    float shift_global[VEC];
    load_chunk<T, VEC>(in.shift_global + sample_offset + d, shift_global);
#pragma unroll
    for (int j = 0; j < VEC; ++j) shift[j] += shift_global[j];
  }
  fill(c.gate, 1.f);
  if (in.gate != nullptr) load_chunk<T, VEC>(in.gate + d, c.gate);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    c.s[j] = (1.f + c.tanh_local[j]) * c.expand_global[j];
    c.u[j] = (c.s[j] - 1.f) * c.x[j] + shift[j];
    c.h[j] = c.x[j] + c.gate[j] * c.u[j];
  }
}

// Loads the chunk of an optional per-channel vector, or `absent` when it is not given.
template <typename T, int VEC>
__device__ __forceinline__ void load_or_fill(const T* p, int64_t d, float absent, float (&out)[VEC]) {
  if (p != nullptr) {
    load_chunk<T, VEC>(p + d, out);
  } else {
    fill(out, absent);
  }
}

// A warp per row; blockDim.x = 32 * warps, dynamic shared memory = warps * D floats.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxWarpsPerBlock* kWarpSize)
    shift_expand_forward_kernel(const ShiftExpandInputs<T> in, T* __restrict__ y, float* __restrict__ mean_out,
                                float* __restrict__ rstd_out, const float eps) {
  extern __shared__ float4 shared_storage[];  // float4: 16-byte alignment for the float4 accesses
  const int warps_per_block = blockDim.x / kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t dim = in.dim;
  const int64_t rows = in.batch * in.length;
  const int64_t lane_begin = static_cast<int64_t>(lane) * VEC;
  constexpr int64_t kStride = kWarpSize * VEC;
  // D % VEC == 0, so a chunk that starts inside the row ends inside it.
  float* h_row = reinterpret_cast<float*>(shared_storage) + static_cast<int64_t>(warp) * dim;

  // The row loop is warp-uniform, so every lane reaches the shuffles.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps_per_block + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t row_offset = row * dim;
    const int64_t sample_offset = (row / in.length) * dim;

    float sum = 0.f;
    for (int64_t d = lane_begin; d < dim; d += kStride) {
      ChunkTerms<VEC> c;
      compute_chunk<T, VEC>(in, row_offset, sample_offset, d, c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += c.h[j];
      store_floats<VEC>(h_row + d, c.h);
    }
    // Each lane reads back only the channels it wrote itself: no __syncwarp needed.
    const float mean = warp_sum(sum) / static_cast<float>(dim);

    float squares = 0.f;
    for (int64_t d = lane_begin; d < dim; d += kStride) {
      float h[VEC];
      load_floats<VEC>(h_row + d, h);
#pragma unroll
      for (int j = 0; j < VEC; ++j) squares += (h[j] - mean) * (h[j] - mean);
    }
    const float rstd = 1.f / sqrtf(warp_sum(squares) / static_cast<float>(dim) + eps);

    for (int64_t d = lane_begin; d < dim; d += kStride) {
      float h[VEC], weight[VEC], bias[VEC], out[VEC];
      load_floats<VEC>(h_row + d, h);
      load_or_fill<T, VEC>(in.weight, d, 1.f, weight);
      load_or_fill<T, VEC>(in.bias, d, 0.f, bias);
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = (h[j] - mean) * rstd * weight[j] + bias[j];
      store_chunk<T, VEC>(y + row_offset + d, out);
    }
    if (lane == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

// Adds a chunk to the [slot][D] accumulator `sums`; a slot of -1 is an absent argument (nothing to add).
template <int VEC>
__device__ __forceinline__ void accumulate(float* sums, int slot, int64_t dim, int64_t d, const float (&value)[VEC]) {
  if (slot < 0) return;
  float* p = sums + slot * dim + d;
  float acc[VEC];
  load_floats<VEC>(p, acc);
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] += value[j];
  store_floats<VEC>(p, acc);
}

// A warp per tile (rows_per_tile consecutive rows of one sample). `sums` is the warp's
// [slot][D] accumulator: in shared memory (then copied to the tile's slice of `partial`) or the
// tile's slice of `partial` itself.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxWarpsPerBlock* kWarpSize)
    shift_expand_backward_kernel(const ShiftExpandInputs<T> in, const ShiftExpandRowGrads<T> g,
                                 const ShiftExpandSumSlots slots, const int64_t rows_per_tile,
                                 const int64_t tiles_per_sample, const bool sums_in_shared,
                                 float* __restrict__ partial) {
  extern __shared__ float4 shared_storage[];
  const int warps_per_block = blockDim.x / kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t dim = in.dim;
  const int64_t length = in.length;
  const int64_t tiles = in.batch * tiles_per_sample;
  const int64_t lane_begin = static_cast<int64_t>(lane) * VEC;
  constexpr int64_t kStride = kWarpSize * VEC;
  const int64_t slice = slots.count * dim;
  const float inv_dim = 1.f / static_cast<float>(dim);

  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * warps_per_block + warp; tile < tiles;
       tile += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t b = tile / tiles_per_sample;
    const int64_t l_begin = (tile % tiles_per_sample) * rows_per_tile;
    const int64_t l_end = l_begin + rows_per_tile < length ? l_begin + rows_per_tile : length;
    const int64_t sample_offset = b * dim;
    float* tile_partial = partial + tile * slice;
    float* sums = sums_in_shared ? reinterpret_cast<float*>(shared_storage) + static_cast<int64_t>(warp) * slice
                                 : tile_partial;

    float zeros[VEC];
    fill(zeros, 0.f);
    for (int slot = 0; slot < slots.count; ++slot) {
      for (int64_t d = lane_begin; d < dim; d += kStride) store_floats<VEC>(sums + slot * dim + d, zeros);
    }

    for (int64_t l = l_begin; l < l_end; ++l) {
      const int64_t row = b * length + l;
      const int64_t row_offset = row * dim;
      const float mean = g.mean[row];
      const float rstd = g.rstd[row];

      // Pass 1: the LayerNorm backward's row sums of dxhat and dxhat * xhat.
      float sum_dxhat = 0.f, sum_dxhat_xhat = 0.f;
      for (int64_t d = lane_begin; d < dim; d += kStride) {
        ChunkTerms<VEC> c;
        compute_chunk<T, VEC>(in, row_offset, sample_offset, d, c);
        float dy[VEC], weight[VEC];
        load_chunk<T, VEC>(g.grad_y + row_offset + d, dy);
        load_or_fill<T, VEC>(in.weight, d, 1.f, weight);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          // Rounded products (no FMA contraction), the same in both passes: with dim == 1 the
          // centred dxhat - c1 is then exactly zero, as the gradient is.
          const float dxhat = __fmul_rn(dy[j], weight[j]);
          sum_dxhat += dxhat;
          sum_dxhat_xhat += dxhat * ((c.h[j] - mean) * rstd);
        }
      }
      const float c1 = warp_sum(sum_dxhat) * inv_dim;
      const float c2 = warp_sum(sum_dxhat_xhat) * inv_dim;

      // Pass 2: dh = rstd * (dxhat - c1 - xhat * c2), then the chain through
      // h = x + gate * ((s - 1) * x + t). The row's inputs are re-read (from L1/L2) rather than
      // parked in shared memory, which is kept for the tile sums.
      for (int64_t d = lane_begin; d < dim; d += kStride) {
        ChunkTerms<VEC> c;
        compute_chunk<T, VEC>(in, row_offset, sample_offset, d, c);
        float dy[VEC], weight[VEC];
        load_chunk<T, VEC>(g.grad_y + row_offset + d, dy);
        load_or_fill<T, VEC>(in.weight, d, 1.f, weight);
        float grad_x[VEC], dh_u[VEC], dy_xhat[VEC], dh_gated[VEC], d_expand_global[VEC], grad_scale[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float xhat = (c.h[j] - mean) * rstd;
          const float dh = rstd * (__fmul_rn(dy[j], weight[j]) - c1 - xhat * c2);
          dh_gated[j] = dh * c.gate[j];
          grad_x[j] = dh + dh_gated[j] * (c.s[j] - 1.f);
          dh_u[j] = dh * c.u[j];
          dy_xhat[j] = dy[j] * xhat;
          const float ds = dh_gated[j] * c.x[j];  // dL/ds
          d_expand_global[j] = ds * (1.f + c.tanh_local[j]);
          grad_scale[j] = ds * (1.f - c.tanh_local[j] * c.tanh_local[j]) * c.expand_global[j];
        }
        store_chunk<T, VEC>(g.grad_x + row_offset + d, grad_x);
        if (g.grad_scale_local != nullptr) store_chunk<T, VEC>(g.grad_scale_local + row_offset + d, grad_scale);
        if (g.grad_shift_local != nullptr) store_chunk<T, VEC>(g.grad_shift_local + row_offset + d, dh_gated);
        accumulate<VEC>(sums, slots.gate, dim, d, dh_u);
        accumulate<VEC>(sums, slots.weight, dim, d, dy_xhat);
        accumulate<VEC>(sums, slots.bias, dim, d, dy);
        accumulate<VEC>(sums, slots.shift_global, dim, d, dh_gated);
        accumulate<VEC>(sums, slots.scale_global, dim, d, d_expand_global);
      }
    }

    if (sums_in_shared) {
      for (int slot = 0; slot < slots.count; ++slot) {
        for (int64_t d = lane_begin; d < dim; d += kStride) {
          float acc[VEC];
          load_floats<VEC>(sums + slot * dim + d, acc);
          store_floats<VEC>(tile_partial + slot * dim + d, acc);
        }
      }
    }
  }
}

// 16 bytes of T per load when D is a multiple of that and every given pointer is 16-byte aligned
// (row and sample offsets are then multiples of 16 bytes too), else one element.
template <typename T>
constexpr int kWideVector = static_cast<int>(16 / sizeof(T));

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
int vector_width(const ShiftExpandInputs<T>& in, std::initializer_list<const void*> others) {
  bool wide = in.dim % kWideVector<T> == 0 && aligned16(in.x) && aligned16(in.scale_local) &&
              aligned16(in.shift_local) && aligned16(in.scale_global) && aligned16(in.shift_global) &&
              aligned16(in.gate) && aligned16(in.weight) && aligned16(in.bias);
  for (const void* p : others) wide = wide && aligned16(p);
  return wide ? kWideVector<T> : 1;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The forward's shared memory per warp is D floats: as many warps (up to 8) as fit in the default
// 48 KB, else one warp per block and an opt-in to a larger allowance (up to the device limit).
int forward_warps_per_block(int64_t dim, int64_t rows) {
  const int64_t bytes_per_warp = dim * static_cast<int64_t>(sizeof(float));
  const int64_t fit = static_cast<int64_t>(kDefaultSharedBytes) / bytes_per_warp;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({fit, kMaxWarpsPerBlock, rows})));
}

template <typename T, int VEC>
cudaError_t launch_forward(const ShiftExpandInputs<T>& in, T* y, float* mean, float* rstd, float eps,
                           cudaStream_t stream) {
  const int64_t rows = in.batch * in.length;
  const int warps = forward_warps_per_block(in.dim, rows);
  const size_t shared_bytes = static_cast<size_t>(warps) * static_cast<size_t>(in.dim) * sizeof(float);
  if (shared_bytes > kDefaultSharedBytes) {
    const cudaError_t status = cudaFuncSetAttribute(shift_expand_forward_kernel<T, VEC>,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    static_cast<int>(shared_bytes));
    if (status != cudaSuccess) return status;
  }
  const int64_t blocks = std::min(ceil_div(rows, warps), kMaxBlocks);
  shift_expand_forward_kernel<T, VEC><<<static_cast<unsigned>(blocks), warps * kWarpSize, shared_bytes, stream>>>(
      in, y, mean, rstd, eps);
  return cudaGetLastError();
}

}  // namespace

int64_t shift_expand_cuda_max_dim(const ShiftExpandDevice& device) {
  return static_cast<int64_t>(std::max(device.shared_per_block_optin, kDefaultSharedBytes) / sizeof(float));
}

template <typename T>
cudaError_t launch_shift_expand_forward(const ShiftExpandInputs<T>& inputs, T* y, float* mean, float* rstd,
                                        float eps, const ShiftExpandDevice& device, cudaStream_t stream) {
  if (inputs.batch * inputs.length <= 0 || inputs.dim <= 0 || inputs.dim > shift_expand_cuda_max_dim(device)) {
    return cudaErrorInvalidValue;
  }
  if (vector_width(inputs, {y}) == kWideVector<T>) {
    return launch_forward<T, kWideVector<T>>(inputs, y, mean, rstd, eps, stream);
  }
  return launch_forward<T, 1>(inputs, y, mean, rstd, eps, stream);
}

namespace {

template <typename T, int VEC>
cudaError_t plan_backward(const ShiftExpandInputs<T>& in, const ShiftExpandSumSlots& slots,
                          const ShiftExpandDevice& device, ShiftExpandBackwardPlan* plan) {
  const int64_t rows = in.batch * in.length;
  const int64_t bytes_per_warp = static_cast<int64_t>(slots.count) * in.dim * static_cast<int64_t>(sizeof(float));
  // Shared-memory sums only while a warp's slice fits the default allowance: a larger slice would
  // leave too few warps per SM, and then the tile's global slice (L2-resident) is the better place.
  plan->vector_width = VEC;
  plan->sums_in_shared = slots.count > 0 && bytes_per_warp <= static_cast<int64_t>(kDefaultSharedBytes);
  plan->warps_per_block =
      plan->sums_in_shared
          ? static_cast<int>(std::min<int64_t>(static_cast<int64_t>(kDefaultSharedBytes) / bytes_per_warp,
                                               kMaxWarpsPerBlock))
          : kMaxWarpsPerBlock;
  plan->shared_bytes = plan->sums_in_shared ? static_cast<size_t>(plan->warps_per_block * bytes_per_warp) : 0;

  // About two tiles per warp the device holds at once: enough for load balance, while the partial
  // buffer (one [slot][D] slice per tile) stays small next to the row tensors.
  int blocks_per_sm = 0;
  const cudaError_t status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks_per_sm, shift_expand_backward_kernel<T, VEC>, plan->warps_per_block * kWarpSize, plan->shared_bytes);
  if (status != cudaSuccess) return status;
  const int64_t resident_warps =
      static_cast<int64_t>(std::max(blocks_per_sm, 1)) * plan->warps_per_block * std::max(device.sm_count, 1);
  const int64_t target_tiles = 2 * resident_warps;
  plan->rows_per_tile = std::min(std::max<int64_t>(ceil_div(rows, target_tiles), 1), in.length);
  plan->tiles_per_sample = ceil_div(in.length, plan->rows_per_tile);
  plan->blocks = std::min(ceil_div(in.batch * plan->tiles_per_sample, plan->warps_per_block), kMaxBlocks);
  return cudaSuccess;
}

}  // namespace

template <typename T>
cudaError_t plan_shift_expand_backward(const ShiftExpandInputs<T>& inputs, const ShiftExpandRowGrads<T>& rows,
                                       const ShiftExpandSumSlots& slots, const ShiftExpandDevice& device,
                                       ShiftExpandBackwardPlan* plan) {
  if (inputs.batch * inputs.length <= 0 || inputs.dim <= 0) return cudaErrorInvalidValue;
  const int width =
      vector_width(inputs, {rows.grad_y, rows.grad_x, rows.grad_scale_local, rows.grad_shift_local});
  if (width == kWideVector<T>) return plan_backward<T, kWideVector<T>>(inputs, slots, device, plan);
  return plan_backward<T, 1>(inputs, slots, device, plan);
}

template <typename T>
cudaError_t launch_shift_expand_backward(const ShiftExpandInputs<T>& inputs, const ShiftExpandRowGrads<T>& rows,
                                         const ShiftExpandSumSlots& slots, const ShiftExpandBackwardPlan& plan,
                                         float* partial, cudaStream_t stream) {
  // The wide path also reads and writes partial in float4s: it must be 16-byte aligned.
  if (plan.blocks <= 0 || (plan.vector_width != 1 && !aligned16(partial))) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  const dim3 block(plan.warps_per_block * kWarpSize);
  if (plan.vector_width == kWideVector<T>) {
    shift_expand_backward_kernel<T, kWideVector<T>><<<grid, block, plan.shared_bytes, stream>>>(
        inputs, rows, slots, plan.rows_per_tile, plan.tiles_per_sample, plan.sums_in_shared, partial);
  } else {
    shift_expand_backward_kernel<T, 1><<<grid, block, plan.shared_bytes, stream>>>(
        inputs, rows, slots, plan.rows_per_tile, plan.tiles_per_sample, plan.sums_in_shared, partial);
  }
  return cudaGetLastError();
}

#define STEPFUSION_INSTANTIATE_SHIFT_EXPAND(T)                                                                     \
  template cudaError_t launch_shift_expand_forward<T>(const ShiftExpandInputs<T>&, T*, float*, float*, float,      \
                                                      const ShiftExpandDevice&, cudaStream_t);                     \
  template cudaError_t plan_shift_expand_backward<T>(const ShiftExpandInputs<T>&, const ShiftExpandRowGrads<T>&,   \
                                                     const ShiftExpandSumSlots&, const ShiftExpandDevice&,         \
                                                     ShiftExpandBackwardPlan*);                                    \
  template cudaError_t launch_shift_expand_backward<T>(const ShiftExpandInputs<T>&, const ShiftExpandRowGrads<T>&, \
                                                       const ShiftExpandSumSlots&, const ShiftExpandBackwardPlan&, \
                                                       float*, cudaStream_t);

STEPFUSION_INSTANTIATE_SHIFT_EXPAND(float)
STEPFUSION_INSTANTIATE_SHIFT_EXPAND(__half)
STEPFUSION_INSTANTIATE_SHIFT_EXPAND(__nv_bfloat16)

#undef STEPFUSION_INSTANTIATE_SHIFT_EXPAND

}  // namespace stepfusion
