// Launchers of the cohort_mutual_loss CUDA kernels. No torch headers here or in the .cu (fast compile):
// the host side (cohort_mutual_loss.cpp) checks the arguments, allocates and passes raw pointers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace stepfusion {
namespace cohort_cuda {

enum class Dtype { kFloat, kHalf, kBFloat16 };

// outputs (S, N, C) contiguous of `dtype`; every other buffer is float32. lse (S, N) is written for kind
// "kl" only. divergence (N, S) and spread (N,) are the per-row results that the host reduces over n.
struct ForwardArgs {
  const void* outputs;
  const float* weights;
  float total_weight;
  float* mixture;
  float* lse;
  float* divergence;
  float* spread;
  int64_t students;
  int64_t batch;
  int64_t classes;
  bool is_kl;
};

// grad (S, N, C) of `dtype`: coefficient[i] * (exp(outputs - lse[i, n]) - mixture[n]) for "kl",
// coefficient[i] * (outputs - mixture[n]) for "mse".
struct BackwardArgs {
  const void* outputs;
  const float* mixture;
  const float* lse;
  const float* coefficient;
  void* grad;
  int64_t students;
  int64_t batch;
  int64_t classes;
  bool is_kl;
};

// Both return without launching anything when there is no work; the caller checks the launch.
void launch_forward(Dtype dtype, const ForwardArgs& args, cudaStream_t stream);
void launch_backward(Dtype dtype, const BackwardArgs& args, cudaStream_t stream);

}  // namespace cohort_cuda
}  // namespace stepfusion
