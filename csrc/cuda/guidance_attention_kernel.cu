// guidance_attention on CUDA, flash-attention style (FA2): no score matrix in global memory.
//
// Forward: one block per (batch*head, block of BM queries). It walks only the key blocks that
// intersect the band of its queries (first block = that of max(0, c_first - w), last = that of
// min(Lk - 1, c_last + w), c non-decreasing in i), then the G global tokens as extra key tiles, with
// an online softmax in the log2 domain; it writes out and the row logsumexp (natural log).
//
// Backward: delta_i = rowsum(dO_i * O_i) first; then one block per (batch*head, key block) computes
// dK, dV over the query blocks whose band reaches the key block (an interval: c is monotone, found by
// binary search), and one block per (batch*head, query block) computes dQ over the same key tiles as
// the forward. The dQ blocks also form the global tokens' dK_global / dV_global contributions of their
// queries and write them to their own float32 slice; the host adds the slices in a fixed order. No
// floating-point atomics: every gradient is the same bits on every run.
//
// Products run on tensor cores for float16/bfloat16 (nvcuda::wmma 16x16x16, float32 accumulate) and
// as exact float32 FMAs for float32 (no tf32, so float32 keeps ~1e-6 accuracy). Each product reads
// its operands from shared memory and keeps its float32 result there, so the softmax, the masking
// and the rescaling are plain row-wise loops over shared memory. All offsets are int64_t.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "convert.cuh"
#include "guidance_attention_kernel.h"

namespace stepfusion {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMma = 16;  // wmma tile edge
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// bfloat16 wmma needs sm_80; an older architecture listed in TORCH_CUDA_ARCH_LIST gets the FMA
// products for every dtype (correct, without tensor cores) instead of a build error.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kArchHasTensorCores = false;
#else
constexpr bool kArchHasTensorCores = true;
#endif
// Largest dynamic shared memory a tile configuration may take: fits sm_80's 163 KB opt-in limit.
constexpr size_t kSharedBudget = 160 * 1024;
// Dynamic shared memory a block gets without opting in.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// c_i = ((2 i + 1) Lk) // (2 Lq): the key position aligned with query i.
__host__ __device__ __forceinline__ int64_t band_center(int64_t i, int64_t len_q, int64_t len_k) {
  return ((2 * i + 1) * len_k) / (2 * len_q);
}

// The key blocks [first, last] (last < first: none) that queries [q0, q0 + rows) may see.
struct BlockRange {
  int64_t first;
  int64_t last;
  __device__ int64_t count() const { return last >= first ? last - first + 1 : 0; }
};

__device__ __forceinline__ BlockRange key_blocks(int64_t q0, int64_t rows, int64_t len_q, int64_t len_k,
                                                 int64_t window, int block) {
  if (len_k == 0) return {0, -1};
  if (window < 0) return {0, (len_k - 1) / block};
  const int64_t first = max(band_center(q0, len_q, len_k) - window, int64_t{0});
  const int64_t last = min(band_center(q0 + rows - 1, len_q, len_k) + window, len_k - 1);
  return {first / block, last / block};
}

// The query blocks [first, last] holding the queries that see a key of [k0, k0 + rows): query i sees
// key j iff c_i - w <= j <= c_i + w, and c_i is monotone, so those queries are an interval, found by
// binary search over c_i (exact integer arithmetic, no rounded closed form).
__device__ __forceinline__ BlockRange query_blocks(int64_t k0, int64_t rows, int64_t len_q, int64_t len_k,
                                                   int64_t window, int block) {
  if (window < 0) return {0, (len_q - 1) / block};
  int64_t lo = 0;
  int64_t hi = len_q;
  while (lo < hi) {  // first i with c_i + w >= k0
    const int64_t mid = lo + (hi - lo) / 2;
    if (band_center(mid, len_q, len_k) + window >= k0) hi = mid; else lo = mid + 1;
  }
  const int64_t first = lo;
  hi = len_q;
  while (lo < hi) {  // first i with c_i - w > k0 + rows - 1
    const int64_t mid = lo + (hi - lo) / 2;
    if (band_center(mid, len_q, len_k) - window > k0 + rows - 1) hi = mid; else lo = mid + 1;
  }
  if (lo <= first) return {0, -1};
  return {first / block, (lo - 1) / block};
}

// Shared-memory tile strides. float32 operand rows get one element of padding so that the FMA
// product's walk down a column of K or V hits 32 different banks; wmma needs row strides that are a
// multiple of 16 bytes (and 32-byte aligned 16x16 sub-tiles, which every multiple of 16 rows and
// columns is with these strides).
template <typename T>
struct Pads {
  static constexpr bool kTensorCores = !std::is_same_v<T, float>;
  static constexpr int kOperand = kTensorCores ? 8 : 1;  // q, k, v, dO tiles (T)
  static constexpr int kProb = kTensorCores ? 8 : 4;     // P and dS tiles (T)
  static constexpr int kAcc = 4;                         // float32 results
};

constexpr size_t round_up_128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Shared-memory pieces of a kernel working on BM queries x BN keys of head dim D.
template <typename T, int D, int BM, int BN>
struct Tiles {
  static constexpr int kLdOperand = D + Pads<T>::kOperand;
  static constexpr int kLdScore = BN + Pads<T>::kAcc;
  static constexpr int kLdProb = BN + Pads<T>::kProb;
  static constexpr int kLdAcc = D + Pads<T>::kAcc;
  static constexpr size_t operand_bytes(int rows) { return round_up_128(sizeof(T) * rows * kLdOperand); }
  static constexpr size_t score_bytes() { return round_up_128(sizeof(float) * BM * kLdScore); }
  static constexpr size_t prob_bytes() { return round_up_128(sizeof(T) * BM * kLdProb); }
  static constexpr size_t acc_bytes(int rows) { return round_up_128(sizeof(float) * rows * kLdAcc); }
  // Per query row: log2-domain lse and delta (float) and the band center (int64_t).
  static constexpr size_t row_bytes() { return round_up_128((2 * sizeof(float) + sizeof(int64_t)) * BM); }

  // q, k, v tiles, scores, probabilities, output accumulator.
  static constexpr size_t forward_bytes() {
    return operand_bytes(BM) + 2 * operand_bytes(BN) + score_bytes() + prob_bytes() + acc_bytes(BM);
  }
  // q, dO, k, v tiles, scores and dP, P and dS, dK and dV accumulators, row values.
  static constexpr size_t key_grad_bytes() {
    return 2 * operand_bytes(BM) + 2 * operand_bytes(BN) + 2 * score_bytes() + 2 * prob_bytes() + 2 * acc_bytes(BN) +
           row_bytes();
  }
  // q, dO, k, v tiles, scores and dP, P and dS, dQ accumulator, global dK and dV tiles, row values.
  static constexpr size_t query_grad_bytes() {
    return 2 * operand_bytes(BM) + 2 * operand_bytes(BN) + 2 * score_bytes() + 2 * prob_bytes() + acc_bytes(BM) +
           2 * acc_bytes(BN) + row_bytes();
  }
};

// Block sizes. The forward uses 64 queries (4 threads per row for the softmax) and 64 keys when they
// fit, else 32; the backward uses square 64 or 32 tiles, whichever fits both of its kernels.
template <typename T, int D>
struct Config {
  static constexpr int kForwardM = 64;
  static constexpr int kForwardN = Tiles<T, D, 64, 64>::forward_bytes() <= kSharedBudget ? 64 : 32;
  static constexpr int kBackward =
      Tiles<T, D, 64, 64>::key_grad_bytes() <= kSharedBudget && Tiles<T, D, 64, 64>::query_grad_bytes() <= kSharedBudget
          ? 64
          : 32;
  using Forward = Tiles<T, D, kForwardM, kForwardN>;
  using Backward = Tiles<T, D, kBackward, kBackward>;
  static_assert(Forward::forward_bytes() <= kSharedBudget, "forward tiles exceed the shared-memory budget");
  static_assert(Backward::key_grad_bytes() <= kSharedBudget && Backward::query_grad_bytes() <= kSharedBudget,
                "backward tiles exceed the shared-memory budget");
};

// Hands out consecutive 128-byte aligned pieces of dynamic shared memory.
struct SharedCarver {
  unsigned char* next;
  template <typename U>
  __device__ __forceinline__ U* take(size_t bytes) {
    U* piece = reinterpret_cast<U*>(next);
    next += bytes;
    return piece;
  }
};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Rows [0, valid) of a ROWS x D tile copied from src (row-major, D contiguous) into dst (stride LD),
// rows from valid on zero-filled, in 16-byte chunks.
template <typename T, int ROWS, int D, int LD>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t valid) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kChunks = D / kVec;
  for (int chunk = threadIdx.x; chunk < ROWS * kChunks; chunk += kThreads) {
    const int row = chunk / kChunks;
    const int col = (chunk % kChunks) * kVec;
    Pack<T, kVec> pack;
    if (row < valid) {
      pack = *reinterpret_cast<const Pack<T, kVec>*>(src + static_cast<int64_t>(row) * D + col);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) pack.v[e] = from_float<T>(0.f);
    }
    if constexpr ((LD * sizeof(T)) % 16 == 0) {
      *reinterpret_cast<Pack<T, kVec>*>(dst + row * LD + col) = pack;
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) dst[row * LD + col + e] = pack.v[e];
    }
  }
}

template <int ROWS, int COLS, int LD>
__device__ __forceinline__ void zero_tile(float* tile) {
  for (int e = threadIdx.x; e < ROWS * COLS; e += kThreads) tile[(e / COLS) * LD + e % COLS] = 0.f;
}

// Rows [0, valid) of a float ROWS x D tile (stride LD), times factor, stored to dst (row-major) as T.
template <typename T, int ROWS, int D, int LD>
__device__ __forceinline__ void store_tile(T* dst, const float* tile, int64_t valid, float factor) {
  for (int e = threadIdx.x; e < ROWS * D; e += kThreads) {
    const int row = e / D;
    const int col = e % D;
    if (row < valid) dst[static_cast<int64_t>(row) * D + col] = from_float<T>(tile[row * LD + col] * factor);
  }
}

// C (M x N, float, stride ldc) = [C +] A B with A (M x K) and B (K x N) tiles of T in shared memory.
// A_T: A is stored K x M (A(m, k) = A[k * lda + m]); B_T: B is stored N x K (B(k, n) = B[n * ldb + k]).
// Tensor cores: the 16x16 output tiles are dealt round robin to the warps. float32: every thread
// owns a kRows x kCols grid of outputs (rows kThreadRows apart, columns kThreadCols apart, so that a
// warp reads consecutive columns) and accumulates them with FMAs in ascending k, loading
// kRows + kCols operands per kRows * kCols FMAs.
template <typename T, int M, int N, int K, bool A_T, bool B_T>
__device__ __forceinline__ void block_gemm(float* C, int ldc, const T* A, int lda, const T* B, int ldb,
                                           bool accumulate) {
  if constexpr (Pads<T>::kTensorCores && kArchHasTensorCores) {
    namespace wmma = nvcuda::wmma;
    using ALayout = std::conditional_t<A_T, wmma::col_major, wmma::row_major>;
    using BLayout = std::conditional_t<B_T, wmma::col_major, wmma::row_major>;
    static_assert(M % kMma == 0 && N % kMma == 0 && K % kMma == 0, "tile sizes must be multiples of 16");
    constexpr int kTilesN = N / kMma;
    constexpr int kTiles = (M / kMma) * kTilesN;
    const int warp = threadIdx.x / kWarpSize;
    for (int t = warp; t < kTiles; t += kWarps) {
      const int m0 = (t / kTilesN) * kMma;
      const int n0 = (t % kTilesN) * kMma;
      wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc;
      if (accumulate) {
        wmma::load_matrix_sync(acc, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.f);
      }
#pragma unroll
      for (int k0 = 0; k0 < K; k0 += kMma) {
        wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, T, ALayout> a;
        wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, T, BLayout> b;
        wmma::load_matrix_sync(a, A_T ? A + k0 * lda + m0 : A + m0 * lda + k0, lda);
        wmma::load_matrix_sync(b, B_T ? B + n0 * ldb + k0 : B + k0 * ldb + n0, ldb);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(C + m0 * ldc + n0, acc, ldc, wmma::mem_row_major);
    }
  } else {
    constexpr int kOutputs = M * N / kThreads;
    constexpr int kCols = kOutputs < 4 ? kOutputs : 4;
    constexpr int kRows = kOutputs / kCols;
    constexpr int kThreadCols = N / kCols;
    constexpr int kThreadRows = kThreads / kThreadCols;
    static_assert(M * N % kThreads == 0 && N % kCols == 0 && kThreads % kThreadCols == 0 &&
                      kThreadRows * kRows == M,
                  "the output tile must split evenly over the threads");
    const int row0 = threadIdx.x / kThreadCols;
    const int col0 = threadIdx.x % kThreadCols;
    float acc[kRows][kCols];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        acc[i][j] = accumulate ? C[(row0 + i * kThreadRows) * ldc + col0 + j * kThreadCols] : 0.f;
      }
    }
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      float a[kRows];
      float b[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int m = row0 + i * kThreadRows;
        a[i] = to_float(A_T ? A[k * lda + m] : A[m * lda + k]);
      }
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int n = col0 + j * kThreadCols;
        b[j] = to_float(B_T ? B[n * ldb + k] : B[k * ldb + n]);
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
#pragma unroll
        for (int j = 0; j < kCols; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int j = 0; j < kCols; ++j) C[(row0 + i * kThreadRows) * ldc + col0 + j * kThreadCols] = acc[i][j];
    }
  }
}

// Reductions over the GROUP consecutive lanes that share a query row.
template <int GROUP>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int offset = GROUP / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <int GROUP>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = GROUP / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Where key tile t of a query block comes from: the local key blocks of the band first, then the
// global tokens. rows = the valid keys of the tile (at most BN).
template <typename T>
struct KeyTile {
  const T* k;
  const T* v;
  int64_t key0;  // first key (local) or first global token of the tile
  int64_t rows;
  bool global;
};

template <typename T, int BN>
__device__ __forceinline__ KeyTile<T> key_tile(const GuidanceAttentionInputs<T>& in, int64_t bh,
                                               const BlockRange& local, int64_t t) {
  const int64_t D = in.head_dim;
  if (t < local.count()) {
    const int64_t key0 = (local.first + t) * BN;
    const int64_t offset = (bh * in.len_k + key0) * D;
    return {in.k + offset, in.v + offset, key0, min(static_cast<int64_t>(BN), in.len_k - key0), false};
  }
  const int64_t key0 = (t - local.count()) * BN;
  const int64_t offset = (bh * in.globals + key0) * D;
  return {in.k_global + offset, in.v_global + offset, key0, min(static_cast<int64_t>(BN), in.globals - key0), true};
}

__device__ __forceinline__ bool key_allowed(bool global, int64_t key, int64_t center, int64_t window) {
  return global || window < 0 || (key >= center - window && key <= center + window);
}

template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads)
    guidance_attention_forward_kernel(const GuidanceAttentionInputs<T> in, T* __restrict__ out,
                                      float* __restrict__ lse, int64_t q_blocks) {
  using L = Tiles<T, D, BM, BN>;
  constexpr int kRowThreads = kThreads / BM;
  constexpr int kColsPerThread = BN / kRowThreads;
  static_assert(kThreads % BM == 0 && kWarpSize % kRowThreads == 0, "a row's threads must share a warp");

  extern __shared__ __align__(128) unsigned char shared[];
  SharedCarver carve{shared};
  T* q_tile = carve.take<T>(L::operand_bytes(BM));
  T* k_tile = carve.take<T>(L::operand_bytes(BN));
  T* v_tile = carve.take<T>(L::operand_bytes(BN));
  float* score_tile = carve.take<float>(L::score_bytes());
  T* prob_tile = carve.take<T>(L::prob_bytes());
  float* out_tile = carve.take<float>(L::acc_bytes(BM));

  const int64_t bh = blockIdx.x / q_blocks;
  const int64_t q0 = (blockIdx.x % q_blocks) * BM;
  const int64_t q_rows = min(static_cast<int64_t>(BM), in.len_q - q0);
  load_tile<T, BM, D, L::kLdOperand>(q_tile, in.q + (bh * in.len_q + q0) * D, q_rows);
  zero_tile<BM, D, L::kLdAcc>(out_tile);

  // Each row of the tile is owned by kRowThreads consecutive lanes, which all keep its running max
  // (log2 domain) and sum in registers.
  const int row = threadIdx.x / kRowThreads;
  const int lane_in_row = threadIdx.x % kRowThreads;
  const int64_t query = q0 + row;
  const bool row_valid = row < q_rows;
  const int64_t center = band_center(query, in.len_q, in.len_k);
  const float scale_log2 = in.scale * kLog2e;
  float row_max = -INFINITY;
  float row_sum = 0.f;
  float* score_row = score_tile + row * L::kLdScore;
  T* prob_row = prob_tile + row * L::kLdProb;
  float* out_row = out_tile + row * L::kLdAcc;

  const BlockRange local = key_blocks(q0, q_rows, in.len_q, in.len_k, in.window, BN);
  const int64_t tiles = local.count() + (in.globals + BN - 1) / BN;
  for (int64_t t = 0; t < tiles; ++t) {
    const KeyTile<T> tile = key_tile<T, BN>(in, bh, local, t);
    // The previous tile's products are done with k, v and P (and, at t = 0, q and out are set).
    __syncthreads();
    load_tile<T, BN, D, L::kLdOperand>(k_tile, tile.k, tile.rows);
    load_tile<T, BN, D, L::kLdOperand>(v_tile, tile.v, tile.rows);
    __syncthreads();
    block_gemm<T, BM, BN, D, false, true>(score_tile, L::kLdScore, q_tile, L::kLdOperand, k_tile, L::kLdOperand,
                                          false);
    __syncthreads();

    float scores[kColsPerThread];
    float tile_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      const int col = lane_in_row + c * kRowThreads;
      const bool allowed =
          row_valid && col < tile.rows && key_allowed(tile.global, tile.key0 + col, center, in.window);
      scores[c] = allowed ? score_row[col] * scale_log2 : -INFINITY;
      tile_max = fmaxf(tile_max, scores[c]);
    }
    tile_max = group_max<kRowThreads>(tile_max);
    const float new_max = fmaxf(row_max, tile_max);
    // A row with no allowed key yet keeps max -inf; exponentiating against 0 then gives zeros, not NaNs.
    const float base = new_max == -INFINITY ? 0.f : new_max;
    const float rescale = exp2f(row_max - base);
    float tile_sum = 0.f;
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      const float p = exp2f(scores[c] - base);
      tile_sum += p;
      prob_row[lane_in_row + c * kRowThreads] = from_float<T>(p);
    }
    row_sum = row_sum * rescale + group_sum<kRowThreads>(tile_sum);
    row_max = new_max;
    for (int d = lane_in_row; d < D; d += kRowThreads) out_row[d] *= rescale;
    __syncthreads();
    block_gemm<T, BM, D, BN, false, false>(out_tile, L::kLdAcc, prob_tile, L::kLdProb, v_tile, L::kLdOperand, true);
  }
  __syncthreads();

  if (row_valid) {
    const int64_t row_offset = bh * in.len_q + query;
    const float inv_sum = row_sum > 0.f ? 1.f / row_sum : 0.f;
    for (int d = lane_in_row; d < D; d += kRowThreads) out[row_offset * D + d] = from_float<T>(out_row[d] * inv_sum);
    if (lane_in_row == 0) lse[row_offset] = row_sum > 0.f ? (row_max + log2f(row_sum)) * kLn2 : -INFINITY;
  }
}

// delta_i = sum_d dO_id O_id in float32, one warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    guidance_attention_delta_kernel(const T* __restrict__ grad_out, const T* __restrict__ out,
                                    float* __restrict__ delta, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // uniform over the warp
  const int lane = threadIdx.x % kWarpSize;
  float acc = 0.f;
  for (int d = lane; d < D; d += kWarpSize) acc += to_float(grad_out[row * D + d]) * to_float(out[row * D + d]);
  acc = group_sum<kWarpSize>(acc);
  if (lane == 0) delta[row] = acc;
}

// Loads lse (to the log2 domain), delta and the band center of the rows [q0, q0 + rows) of a query
// block; rows beyond get values that make P = 0 (their scores are masked anyway).
template <int BM>
__device__ __forceinline__ void load_row_values(float* row_lse, float* row_delta, int64_t* row_center,
                                                const float* lse, const float* delta, int64_t row_offset,
                                                int64_t q0, int64_t rows, int64_t len_q, int64_t len_k) {
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const bool valid = r < rows;
    row_lse[r] = valid ? lse[row_offset + r] * kLog2e : 0.f;
    row_delta[r] = valid ? delta[row_offset + r] : 0.f;
    row_center[r] = band_center(q0 + r, len_q, len_k);
  }
}

// P = exp(scaled score - lse) on the allowed entries (0 elsewhere) and dS = P (dP - delta), both
// stored as T for the products that follow; dS leaves out the factor scale, applied once at the end.
template <typename T, int BM, int BN, int LD_SCORE, int LD_PROB>
__device__ __forceinline__ void probabilities_and_score_grads(T* prob_tile, T* dscore_tile, const float* score_tile,
                                                              const float* dprob_tile, const float* row_lse,
                                                              const float* row_delta, const int64_t* row_center,
                                                              int64_t q_rows, int64_t key0, int64_t k_rows,
                                                              bool global, int64_t window, float scale_log2) {
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN;
    const int c = e % BN;
    const bool allowed = r < q_rows && c < k_rows && key_allowed(global, key0 + c, row_center[r], window);
    const float p = allowed ? exp2f(score_tile[r * LD_SCORE + c] * scale_log2 - row_lse[r]) : 0.f;
    prob_tile[r * LD_PROB + c] = from_float<T>(p);
    dscore_tile[r * LD_PROB + c] = from_float<T>(p * (dprob_tile[r * LD_SCORE + c] - row_delta[r]));
  }
}

// dK, dV of one block of BN local keys, over the query blocks whose band reaches it.
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads)
    guidance_attention_key_grad_kernel(const GuidanceAttentionInputs<T> in, const GuidanceAttentionGrads<T> grads,
                                       int64_t k_blocks) {
  using L = Tiles<T, D, BM, BN>;
  extern __shared__ __align__(128) unsigned char shared[];
  SharedCarver carve{shared};
  T* q_tile = carve.take<T>(L::operand_bytes(BM));
  T* dout_tile = carve.take<T>(L::operand_bytes(BM));
  T* k_tile = carve.take<T>(L::operand_bytes(BN));
  T* v_tile = carve.take<T>(L::operand_bytes(BN));
  float* score_tile = carve.take<float>(L::score_bytes());
  float* dprob_tile = carve.take<float>(L::score_bytes());
  T* prob_tile = carve.take<T>(L::prob_bytes());
  T* dscore_tile = carve.take<T>(L::prob_bytes());
  float* dk_tile = carve.take<float>(L::acc_bytes(BN));
  float* dv_tile = carve.take<float>(L::acc_bytes(BN));
  unsigned char* row_values = carve.take<unsigned char>(L::row_bytes());
  int64_t* row_center = reinterpret_cast<int64_t*>(row_values);
  float* row_lse = reinterpret_cast<float*>(row_center + BM);
  float* row_delta = row_lse + BM;

  const int64_t bh = blockIdx.x / k_blocks;
  const int64_t key0 = (blockIdx.x % k_blocks) * BN;
  const int64_t k_rows = min(static_cast<int64_t>(BN), in.len_k - key0);
  const int64_t key_offset = (bh * in.len_k + key0) * D;
  load_tile<T, BN, D, L::kLdOperand>(k_tile, in.k + key_offset, k_rows);
  load_tile<T, BN, D, L::kLdOperand>(v_tile, in.v + key_offset, k_rows);
  zero_tile<BN, D, L::kLdAcc>(dk_tile);
  zero_tile<BN, D, L::kLdAcc>(dv_tile);
  const float scale_log2 = in.scale * kLog2e;

  const BlockRange queries = query_blocks(key0, k_rows, in.len_q, in.len_k, in.window, BM);
  for (int64_t qb = queries.first; qb <= queries.last; ++qb) {
    const int64_t q0 = qb * BM;
    const int64_t q_rows = min(static_cast<int64_t>(BM), in.len_q - q0);
    const int64_t row_offset = bh * in.len_q + q0;
    // The previous query block's products are done with q, dO, P, dS and the row values.
    __syncthreads();
    load_tile<T, BM, D, L::kLdOperand>(q_tile, in.q + row_offset * D, q_rows);
    load_tile<T, BM, D, L::kLdOperand>(dout_tile, grads.grad_out + row_offset * D, q_rows);
    load_row_values<BM>(row_lse, row_delta, row_center, grads.lse, grads.delta, row_offset, q0, q_rows, in.len_q,
                        in.len_k);
    __syncthreads();
    block_gemm<T, BM, BN, D, false, true>(score_tile, L::kLdScore, q_tile, L::kLdOperand, k_tile, L::kLdOperand,
                                          false);
    block_gemm<T, BM, BN, D, false, true>(dprob_tile, L::kLdScore, dout_tile, L::kLdOperand, v_tile,
                                          L::kLdOperand, false);
    __syncthreads();
    probabilities_and_score_grads<T, BM, BN, L::kLdScore, L::kLdProb>(
        prob_tile, dscore_tile, score_tile, dprob_tile, row_lse, row_delta, row_center, q_rows, key0, k_rows,
        false, in.window, scale_log2);
    __syncthreads();
    block_gemm<T, BN, D, BM, true, false>(dv_tile, L::kLdAcc, prob_tile, L::kLdProb, dout_tile, L::kLdOperand,
                                          true);
    block_gemm<T, BN, D, BM, true, false>(dk_tile, L::kLdAcc, dscore_tile, L::kLdProb, q_tile, L::kLdOperand,
                                          true);
  }
  __syncthreads();
  store_tile<T, BN, D, L::kLdAcc>(grads.grad_k + key_offset, dk_tile, k_rows, in.scale);
  store_tile<T, BN, D, L::kLdAcc>(grads.grad_v + key_offset, dv_tile, k_rows, 1.f);
}

// dQ of one block of BM queries over the key tiles of the forward; for the global tiles also this
// block's share of dK_global = sum_i dS_ig q_i scale and dV_global = sum_i P_ig dO_i.
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads)
    guidance_attention_query_grad_kernel(const GuidanceAttentionInputs<T> in, const GuidanceAttentionGrads<T> grads,
                                         int64_t q_blocks) {
  using L = Tiles<T, D, BM, BN>;
  extern __shared__ __align__(128) unsigned char shared[];
  SharedCarver carve{shared};
  T* q_tile = carve.take<T>(L::operand_bytes(BM));
  T* dout_tile = carve.take<T>(L::operand_bytes(BM));
  T* k_tile = carve.take<T>(L::operand_bytes(BN));
  T* v_tile = carve.take<T>(L::operand_bytes(BN));
  float* score_tile = carve.take<float>(L::score_bytes());
  float* dprob_tile = carve.take<float>(L::score_bytes());
  T* prob_tile = carve.take<T>(L::prob_bytes());
  T* dscore_tile = carve.take<T>(L::prob_bytes());
  float* dq_tile = carve.take<float>(L::acc_bytes(BM));
  float* dk_global_tile = carve.take<float>(L::acc_bytes(BN));
  float* dv_global_tile = carve.take<float>(L::acc_bytes(BN));
  unsigned char* row_values = carve.take<unsigned char>(L::row_bytes());
  int64_t* row_center = reinterpret_cast<int64_t*>(row_values);
  float* row_lse = reinterpret_cast<float*>(row_center + BM);
  float* row_delta = row_lse + BM;

  const int64_t bh = blockIdx.x / q_blocks;
  const int64_t qb = blockIdx.x % q_blocks;
  const int64_t q0 = qb * BM;
  const int64_t q_rows = min(static_cast<int64_t>(BM), in.len_q - q0);
  const int64_t row_offset = bh * in.len_q + q0;
  load_tile<T, BM, D, L::kLdOperand>(q_tile, in.q + row_offset * D, q_rows);
  load_tile<T, BM, D, L::kLdOperand>(dout_tile, grads.grad_out + row_offset * D, q_rows);
  load_row_values<BM>(row_lse, row_delta, row_center, grads.lse, grads.delta, row_offset, q0, q_rows, in.len_q,
                      in.len_k);
  zero_tile<BM, D, L::kLdAcc>(dq_tile);
  const float scale_log2 = in.scale * kLog2e;

  const BlockRange local = key_blocks(q0, q_rows, in.len_q, in.len_k, in.window, BN);
  const int64_t tiles = local.count() + (in.globals + BN - 1) / BN;
  for (int64_t t = 0; t < tiles; ++t) {
    const KeyTile<T> tile = key_tile<T, BN>(in, bh, local, t);
    // The previous tile's products and partial stores are done with k, v, P, dS and the global tiles.
    __syncthreads();
    load_tile<T, BN, D, L::kLdOperand>(k_tile, tile.k, tile.rows);
    load_tile<T, BN, D, L::kLdOperand>(v_tile, tile.v, tile.rows);
    __syncthreads();
    block_gemm<T, BM, BN, D, false, true>(score_tile, L::kLdScore, q_tile, L::kLdOperand, k_tile, L::kLdOperand,
                                          false);
    block_gemm<T, BM, BN, D, false, true>(dprob_tile, L::kLdScore, dout_tile, L::kLdOperand, v_tile,
                                          L::kLdOperand, false);
    __syncthreads();
    probabilities_and_score_grads<T, BM, BN, L::kLdScore, L::kLdProb>(
        prob_tile, dscore_tile, score_tile, dprob_tile, row_lse, row_delta, row_center, q_rows, tile.key0,
        tile.rows, tile.global, in.window, scale_log2);
    __syncthreads();
    block_gemm<T, BM, D, BN, false, false>(dq_tile, L::kLdAcc, dscore_tile, L::kLdProb, k_tile, L::kLdOperand, true);
    if (tile.global) {  // uniform over the block
      block_gemm<T, BN, D, BM, true, false>(dk_global_tile, L::kLdAcc, dscore_tile, L::kLdProb, q_tile,
                                            L::kLdOperand, false);
      block_gemm<T, BN, D, BM, true, false>(dv_global_tile, L::kLdAcc, prob_tile, L::kLdProb, dout_tile,
                                            L::kLdOperand, false);
      __syncthreads();
      const int64_t partial_offset = ((bh * q_blocks + qb) * in.globals + tile.key0) * D;
      for (int e = threadIdx.x; e < BN * D; e += kThreads) {
        const int r = e / D;
        const int d = e % D;
        if (r < tile.rows) {
          grads.grad_k_global_partial[partial_offset + r * D + d] = dk_global_tile[r * L::kLdAcc + d] * in.scale;
          grads.grad_v_global_partial[partial_offset + r * D + d] = dv_global_tile[r * L::kLdAcc + d];
        }
      }
    }
  }
  __syncthreads();
  store_tile<T, BM, D, L::kLdAcc>(grads.grad_q + row_offset * D, dq_tile, q_rows, in.scale);
}

// Opts the kernel in to more than the default dynamic shared memory when it needs it.
template <typename Kernel>
cudaError_t prepare(Kernel kernel, size_t shared_bytes) {
  if (shared_bytes <= kDefaultSharedBytes) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int D>
cudaError_t launch_forward(const GuidanceAttentionInputs<T>& in, T* out, float* lse, cudaStream_t stream) {
  using C = Config<T, D>;
  const int64_t q_blocks = ceil_div(in.len_q, C::kForwardM);
  const int64_t blocks = in.batch_heads * q_blocks;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const auto kernel = guidance_attention_forward_kernel<T, D, C::kForwardM, C::kForwardN>;
  const size_t shared_bytes = C::Forward::forward_bytes();
  cudaError_t status = prepare(kernel, shared_bytes);
  if (status != cudaSuccess) return status;
  kernel<<<static_cast<unsigned>(blocks), kThreads, shared_bytes, stream>>>(in, out, lse, q_blocks);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_backward(const GuidanceAttentionInputs<T>& in, const GuidanceAttentionGrads<T>& grads,
                            cudaStream_t stream) {
  using C = Config<T, D>;
  constexpr int kTile = C::kBackward;
  const int64_t rows = in.batch_heads * in.len_q;
  const int64_t delta_blocks = ceil_div(rows, kWarps);
  const int64_t q_blocks = ceil_div(in.len_q, kTile);
  const int64_t k_blocks = ceil_div(in.len_k, kTile);
  if (delta_blocks > INT_MAX || in.batch_heads * q_blocks > INT_MAX || in.batch_heads * k_blocks > INT_MAX) {
    return cudaErrorInvalidConfiguration;
  }
  guidance_attention_delta_kernel<T, D><<<static_cast<unsigned>(delta_blocks), kThreads, 0, stream>>>(
      grads.grad_out, grads.out, grads.delta, rows);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;

  if (k_blocks > 0) {
    const auto kernel = guidance_attention_key_grad_kernel<T, D, kTile, kTile>;
    const size_t shared_bytes = C::Backward::key_grad_bytes();
    status = prepare(kernel, shared_bytes);
    if (status != cudaSuccess) return status;
    kernel<<<static_cast<unsigned>(in.batch_heads * k_blocks), kThreads, shared_bytes, stream>>>(in, grads,
                                                                                                 k_blocks);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }

  const auto kernel = guidance_attention_query_grad_kernel<T, D, kTile, kTile>;
  const size_t shared_bytes = C::Backward::query_grad_bytes();
  status = prepare(kernel, shared_bytes);
  if (status != cudaSuccess) return status;
  kernel<<<static_cast<unsigned>(in.batch_heads * q_blocks), kThreads, shared_bytes, stream>>>(in, grads, q_blocks);
  return cudaGetLastError();
}

// Calls body(std::integral_constant<int, D>{}) for a supported head dim D.
template <typename Body>
cudaError_t with_head_dim(int64_t head_dim, Body&& body) {
  switch (head_dim) {
    case 16:
      return body(std::integral_constant<int, 16>{});
    case 32:
      return body(std::integral_constant<int, 32>{});
    case 64:
      return body(std::integral_constant<int, 64>{});
    case 128:
      return body(std::integral_constant<int, 128>{});
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

bool guidance_attention_cuda_supports_head_dim(int64_t head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
}

template <typename T>
size_t guidance_attention_cuda_shared_bytes(int64_t head_dim) {
  size_t bytes = 0;
  with_head_dim(head_dim, [&](auto dim) {
    using C = Config<T, decltype(dim)::value>;
    bytes = std::max({C::Forward::forward_bytes(), C::Backward::key_grad_bytes(), C::Backward::query_grad_bytes()});
    return cudaSuccess;
  });
  return bytes;
}

template <typename T>
int64_t guidance_attention_cuda_backward_query_blocks(int64_t len_q, int64_t head_dim) {
  int64_t blocks = 0;
  with_head_dim(head_dim, [&](auto dim) {
    blocks = ceil_div(len_q, Config<T, decltype(dim)::value>::kBackward);
    return cudaSuccess;
  });
  return blocks;
}

template <typename T>
cudaError_t launch_guidance_attention_forward(const GuidanceAttentionInputs<T>& inputs, T* out, float* lse,
                                              cudaStream_t stream) {
  return with_head_dim(inputs.head_dim,
                       [&](auto dim) { return launch_forward<T, decltype(dim)::value>(inputs, out, lse, stream); });
}

template <typename T>
cudaError_t launch_guidance_attention_backward(const GuidanceAttentionInputs<T>& inputs,
                                               const GuidanceAttentionGrads<T>& grads, cudaStream_t stream) {
  return with_head_dim(inputs.head_dim,
                       [&](auto dim) { return launch_backward<T, decltype(dim)::value>(inputs, grads, stream); });
}

#define STEPFUSION_INSTANTIATE_GUIDANCE_ATTENTION(T)                                                          \
  template size_t guidance_attention_cuda_shared_bytes<T>(int64_t);                                          \
  template int64_t guidance_attention_cuda_backward_query_blocks<T>(int64_t, int64_t);                       \
  template cudaError_t launch_guidance_attention_forward<T>(const GuidanceAttentionInputs<T>&, T*, float*,    \
                                                            cudaStream_t);                                    \
  template cudaError_t launch_guidance_attention_backward<T>(const GuidanceAttentionInputs<T>&,               \
                                                             const GuidanceAttentionGrads<T>&, cudaStream_t);

STEPFUSION_INSTANTIATE_GUIDANCE_ATTENTION(float)
STEPFUSION_INSTANTIATE_GUIDANCE_ATTENTION(__half)
STEPFUSION_INSTANTIATE_GUIDANCE_ATTENTION(__nv_bfloat16)

#undef STEPFUSION_INSTANTIATE_GUIDANCE_ATTENTION

}  // namespace stepfusion
