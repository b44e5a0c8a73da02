// cohort_mutual_loss CUDA kernels. Forward: one block per batch row n; the block's threads stride over
// the C classes and loop over the S students, so each row reads every student's row a few times from
// L1/L2 and the whole op is O(S N C). Every block-wide sum is a fixed shuffle tree (deterministic), and
// the per-row results are reduced over n by the host in a fixed order (no atomics).
// The math (teacher mixture q, spread J, divergence from the mixture) is described in
// csrc/cpu/cohort_mutual_loss.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "convert.cuh"
#include "cohort_mutual_loss_kernel.h"

namespace stepfusion {
namespace cohort_cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kWarp = 32;

struct Pair {
  float a;
  float b;
};

struct AddPairs {
  __device__ __forceinline__ Pair operator()(Pair x, Pair y) const { return {x.a + y.a, x.b + y.b}; }
  __device__ __forceinline__ Pair identity() const { return {0.0f, 0.0f}; }
};

// Online (max, sum of exp(x - max)) pairs, combined exactly as a two-pass log-sum-exp would.
struct CombineLse {
  __device__ __forceinline__ Pair operator()(Pair x, Pair y) const {
    if (x.a == -INFINITY) return y;
    if (y.a == -INFINITY) return x;
    const float max = fmaxf(x.a, y.a);
    return {max, x.b * expf(x.a - max) + y.b * expf(y.a - max)};
  }
  __device__ __forceinline__ Pair identity() const { return {-INFINITY, 0.0f}; }
};

// Adds one element x to an online (max, sum) pair with a single exp.
__device__ __forceinline__ Pair push_lse(Pair pair, float x) {
  if (x > pair.a) return {x, pair.b * expf(pair.a - x) + 1.0f};
  return {pair.a, pair.b + expf(x - pair.a)};
}

template <typename Combine>
__device__ __forceinline__ Pair warp_reduce(Pair value, Combine combine) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    value = combine(value, {__shfl_xor_sync(0xffffffffu, value.a, offset),
                            __shfl_xor_sync(0xffffffffu, value.b, offset)});
  }
  return value;
}

// A block-wide reduction of one pair per thread, in a fixed tree (the same bits on every run); every
// thread gets the result. blockDim.x is a multiple of 32 and at most kMaxThreads; the combine's identity
// pads the missing warps. Ends with a barrier, so `scratch` may be reused at once.
template <typename Combine>
__device__ Pair block_reduce(Pair value, Pair* scratch, Combine combine) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  value = warp_reduce(value, combine);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = warp_reduce(lane < static_cast<int>(blockDim.x) / kWarp ? scratch[lane] : combine.identity(), combine);
    if (lane == 0) scratch[kMaxThreads / kWarp] = value;
  }
  __syncthreads();
  const Pair result = scratch[kMaxThreads / kWarp];
  __syncthreads();
  return result;
}

template <typename scalar_t>
__global__ void kl_forward_kernel(const scalar_t* __restrict__ outputs, const float* __restrict__ weights,
                                  float total_weight, float* __restrict__ mixture, float* __restrict__ lse,
                                  float* __restrict__ divergence, float* __restrict__ spread, int64_t students,
                                  int64_t batch, int64_t classes) {
  __shared__ Pair scratch[kMaxThreads / kWarp + 1];
  const int64_t n = blockIdx.x;
  // Every student's log-sum-exp over the row (written to lse, read back after the barrier below).
  for (int64_t j = 0; j < students; ++j) {
    const scalar_t* z = outputs + (j * batch + n) * classes;
    Pair local = CombineLse().identity();
    for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) local = push_lse(local, to_float(z[c]));
    const Pair total = block_reduce(local, scratch, CombineLse());
    if (threadIdx.x == 0) lse[j * batch + n] = total.a + logf(total.b);
  }
  __syncthreads();  // lse of this row visible to every thread of the block
  // The mixture q = sum_j w_j p_j / W; each thread owns the classes c = threadIdx.x + k * blockDim.x.
  for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
    float weighted = 0.0f;
    for (int64_t j = 0; j < students; ++j) {
      const float w = weights[j];
      if (w > 0.0f) weighted += w * expf(to_float(outputs[(j * batch + n) * classes + c]) - lse[j * batch + n]);
    }
    mixture[n * classes + c] = weighted / total_weight;
  }
  // Per student, from the differences d_c = log q_c - log p_ic (log q clamped below, so that q = 0 adds
  // 0, not 0 * -inf): KL(q || p_i) = sum_c q_c d_c + (p_ic - q_c), and for a teacher its share of the
  // spread, w_i KL(p_i || q) = w_i sum_c (q_c - p_ic) - p_ic d_c (the added terms, of sum 0, cancel the
  // rounding of the log-sum-exps; see csrc/cpu/cohort_mutual_loss.cpp).
  float spread_sum = 0.0f;
  for (int64_t i = 0; i < students; ++i) {
    const scalar_t* z = outputs + (i * batch + n) * classes;
    const float lse_i = lse[i * batch + n];
    const float w = weights[i];
    Pair local{0.0f, 0.0f};  // (KL(q || p_i), KL(p_i || q)) of this thread's classes
    for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
      const float q = mixture[n * classes + c];  // written by this thread above
      const float log_p = to_float(z[c]) - lse_i;
      const float p = expf(log_p);
      const float d = logf(fmaxf(q, FLT_MIN)) - log_p;
      local.a += q * d + (p - q);
      if (w > 0.0f) local.b += (q - p) - p * d;
    }
    const Pair total = block_reduce(local, scratch, AddPairs());
    if (threadIdx.x == 0) divergence[n * students + i] = total.a;
    if (w > 0.0f) spread_sum += w * total.b;  // not 0 * NaN from a student that does not teach
  }
  if (threadIdx.x == 0) spread[n] = spread_sum;
}

template <typename scalar_t>
__global__ void mse_forward_kernel(const scalar_t* __restrict__ outputs, const float* __restrict__ weights,
                                   float total_weight, float* __restrict__ mixture, float* __restrict__ divergence,
                                   float* __restrict__ spread, int64_t students, int64_t batch, int64_t classes) {
  __shared__ Pair scratch[kMaxThreads / kWarp + 1];
  const int64_t n = blockIdx.x;
  // mu = sum_j w_j f_j / W, per class owned by this thread (read back by the same thread below).
  for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
    float weighted = 0.0f;
    for (int64_t j = 0; j < students; ++j) {
      const float w = weights[j];
      if (w > 0.0f) weighted += w * to_float(outputs[(j * batch + n) * classes + c]);
    }
    mixture[n * classes + c] = weighted / total_weight;
  }
  float weighted_distance = 0.0f;
  for (int64_t i = 0; i < students; ++i) {
    const scalar_t* f = outputs + (i * batch + n) * classes;
    float local = 0.0f;
    for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
      const float difference = to_float(f[c]) - mixture[n * classes + c];
      local += difference * difference;
    }
    const float distance = block_reduce({local, 0.0f}, scratch, AddPairs()).a;
    if (threadIdx.x == 0) divergence[n * students + i] = distance;
    if (weights[i] > 0.0f) weighted_distance += weights[i] * distance;  // not 0 * NaN from a non-teacher
  }
  if (threadIdx.x == 0) spread[n] = weighted_distance;
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ outputs, const float* __restrict__ mixture,
                                const float* __restrict__ lse, const float* __restrict__ coefficient,
                                scalar_t* __restrict__ grad, int64_t batch, int64_t classes, int64_t total, bool is_kl) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total; index += stride) {
    const int64_t row = index / classes;  // row = i * N + n
    const int64_t c = index - row * classes;
    const int64_t n = row % batch;
    const float z = to_float(outputs[index]);
    const float target = mixture[n * classes + c];
    const float value = is_kl ? expf(z - lse[row]) - target : z - target;
    grad[index] = from_float<scalar_t>(coefficient[row / batch] * value);
  }
}

// Threads per forward block: enough to cover C once, a multiple of a warp, at most kMaxThreads.
int forward_threads(int64_t classes) {
  int threads = kWarp;
  while (threads < kMaxThreads && threads < classes) threads *= 2;
  return threads;
}

template <typename scalar_t>
void forward(const ForwardArgs& args, cudaStream_t stream) {
  const auto* outputs = static_cast<const scalar_t*>(args.outputs);
  const dim3 grid(static_cast<unsigned>(args.batch));
  const int threads = forward_threads(args.classes);
  if (args.is_kl) {
    kl_forward_kernel<scalar_t><<<grid, threads, 0, stream>>>(outputs, args.weights, args.total_weight, args.mixture,
                                                              args.lse, args.divergence, args.spread, args.students,
                                                              args.batch, args.classes);
  } else {
    mse_forward_kernel<scalar_t><<<grid, threads, 0, stream>>>(outputs, args.weights, args.total_weight,
                                                               args.mixture, args.divergence, args.spread,
                                                               args.students, args.batch, args.classes);
  }
}

template <typename scalar_t>
void backward(const BackwardArgs& args, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t total = args.students * args.batch * args.classes;
  // A grid-stride loop: enough blocks to fill the GPU many times over, never more than the grid allows.
  const int64_t blocks = (total + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16);
  backward_kernel<scalar_t><<<grid, threads, 0, stream>>>(static_cast<const scalar_t*>(args.outputs), args.mixture,
                                                          args.lse, args.coefficient,
                                                          static_cast<scalar_t*>(args.grad), args.batch,
                                                          args.classes, total, args.is_kl);
}

}  // namespace

void launch_forward(Dtype dtype, const ForwardArgs& args, cudaStream_t stream) {
  if (args.students == 0 || args.batch == 0) return;
  switch (dtype) {
    case Dtype::kFloat: return forward<float>(args, stream);
    case Dtype::kHalf: return forward<__half>(args, stream);
    case Dtype::kBFloat16: return forward<__nv_bfloat16>(args, stream);
  }
}

void launch_backward(Dtype dtype, const BackwardArgs& args, cudaStream_t stream) {
  if (args.students * args.batch * args.classes == 0) return;
  switch (dtype) {
    case Dtype::kFloat: return backward<float>(args, stream);
    case Dtype::kHalf: return backward<__half>(args, stream);
    case Dtype::kBFloat16: return backward<__nv_bfloat16>(args, stream);
  }
}

}  // namespace cohort_cuda
}  // namespace stepfusion
