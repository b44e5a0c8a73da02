// skew_pair_project on CUDA: one grouped GEMM kernel (see skew_pair_project_kernel.h) for the
// forward and for both products of the backward.
//
// A block computes one tile of one problem's output; the grid is problems x row tiles x column
// tiles, flattened, column tiles fastest. The block walks the problem's terms in their listed order
// and, within a term, the depth in steps of BK: the next step's operand tiles are read from global
// memory into registers while the current step is multiplied out of shared memory. Every output
// element is accumulated by one thread, in float32, in one fixed order, and written once, so the
// results are the same bits on every run (no atomics anywhere).
//
// Tiles keep the operand's own global layout in shared memory (no transpose on the way in), each
// line padded against bank conflicts; the tensor-core path loads them as row_major or col_major
// fragments accordingly. Lines and depth outside a matrix are zero-filled, so no size needs to be a
// multiple of a tile; 16-byte loads are used wherever a chunk is whole and its address aligned.
//
// float16/bfloat16: nvcuda::wmma 16x16x16 with float accumulators (sm_80 or newer for bfloat16).
// float32: FMA micro-tiles, deliberately not tf32, so that float32 results keep float32 accuracy.
// All offsets are int64_t.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cuda_pipeline_primitives.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "convert.cuh"
#include "skew_pair_project_kernel.h"

namespace stepfusion {
namespace {

constexpr int kWarpSize = 32;
constexpr int kBytesPerChunk = 16;
// Dynamic shared memory a block gets without opting in.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// 16 bytes of consecutive elements, moved as one load or store.
template <typename T>
struct alignas(kBytesPerChunk) Chunk {
  static constexpr int kSize = kBytesPerChunk / static_cast<int>(sizeof(T));
  T v[kSize];
};

// The terms of a problem (see SkewTerms).
__device__ __forceinline__ int64_t term_count(const SkewTerms& terms, int64_t problem) {
  return terms.offsets != nullptr ? terms.offsets[problem + 1] - terms.offsets[problem] : terms.per_problem;
}

__device__ __forceinline__ int64_t term_at(const SkewTerms& terms, int64_t problem, int64_t t) {
  return terms.first + (terms.offsets != nullptr ? terms.entries[terms.offsets[problem] + t]
                                                 : problem * terms.problem_step + t * terms.term_step);
}

// The operand matrix of term (side, pair). The ternaries keep the parameter arrays out of local memory.
template <typename T>
__device__ __forceinline__ const T* operand_matrix(const SkewOperand<T>& op, const int64_t* pairs, int side,
                                                   int64_t pair) {
  const int64_t index = op.by_layer ? pairs[2 * pair + side] : pair;
  return (side ? op.base[1] : op.base[0]) + index * (side ? op.stride[1] : op.stride[0]);
}

// One operand tile in shared memory: EXTENT lines of the operand's row (or column) index by BK of
// depth. DEPTH_CONTIGUOUS: depth is the contiguous index in global memory (element (i, d) at
// i * ld + d) and the tile is stored [EXTENT][BK + PAD]; else (element (i, d) at d * ld + i) it is
// stored [BK][EXTENT + PAD]. Each thread moves kPerThread 16-byte chunks.
template <typename T, bool DEPTH_CONTIGUOUS, int EXTENT, int BK, int PAD, int THREADS>
struct TileLoader {
  static constexpr int kVec = Chunk<T>::kSize;
  static constexpr int kLine = DEPTH_CONTIGUOUS ? BK : EXTENT;  // contiguous elements of a line
  static constexpr int kLines = DEPTH_CONTIGUOUS ? EXTENT : BK;
  static constexpr int kStride = kLine + PAD;  // shared-memory distance between lines
  static constexpr int kChunksPerLine = kLine / kVec;
  static constexpr int kPerThread = kLines * kChunksPerLine / THREADS;
  static constexpr int kSize = kLines * kStride;
  static_assert(kLine % kVec == 0, "a tile line must be whole 16-byte chunks");
  static_assert(kLines * kChunksPerLine % THREADS == 0, "the chunks of a tile must split evenly over the threads");

  Chunk<T> chunks[kPerThread];

  // Chunk i of this thread: its global line and position and its offset in the shared tile.
  struct Place {
    int64_t line;
    int64_t pos;
    int offset;
  };

  static __device__ __forceinline__ Place place(int i, int64_t first, int64_t depth0) {
    const int chunk = threadIdx.x + i * THREADS;
    const int line = chunk / kChunksPerLine;
    const int pos = (chunk % kChunksPerLine) * kVec;
    return {(DEPTH_CONTIGUOUS ? first : depth0) + line, (DEPTH_CONTIGUOUS ? depth0 : first) + pos,
            line * kStride + pos};
  }

  // The 16-byte source of a chunk that lies wholly inside the matrix at an aligned address, else nullptr.
  static __device__ __forceinline__ const T* whole_chunk(const T* matrix, int64_t ld, const Place& where,
                                                         int64_t lines, int64_t length) {
    if (where.line >= lines || where.pos + kVec > length) return nullptr;
    const T* src = matrix + where.line * ld + where.pos;
    return reinterpret_cast<uintptr_t>(src) % kBytesPerChunk == 0 ? src : nullptr;
  }

  // A chunk read element by element, zero outside the matrix.
  static __device__ __forceinline__ Chunk<T> masked_chunk(const T* matrix, int64_t ld, const Place& where,
                                                          int64_t lines, int64_t length) {
    Chunk<T> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      out.v[j] = (where.line < lines && where.pos + j < length) ? matrix[where.line * ld + where.pos + j] : from_float<T>(0.f);
    }
    return out;
  }

  static __device__ __forceinline__ void put(T* tile, int offset, const Chunk<T>& chunk) {
    if constexpr (kStride % kVec == 0) {
      *reinterpret_cast<Chunk<T>*>(tile + offset) = chunk;
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) tile[offset + j] = chunk.v[j];
    }
  }

  // The extent of the matrix along the tile's lines and along its contiguous positions.
  static __device__ __forceinline__ int64_t line_bound(int64_t extent, int64_t depth) {
    return DEPTH_CONTIGUOUS ? extent : depth;
  }
  static __device__ __forceinline__ int64_t pos_bound(int64_t extent, int64_t depth) {
    return DEPTH_CONTIGUOUS ? depth : extent;
  }

  // Reads the tile whose first element is (first, depth0) of `matrix` (extent x depth elements)
  // into this thread's registers; store() then puts it in shared memory.
  __device__ __forceinline__ void load(const T* matrix, int64_t ld, int64_t first, int64_t extent, int64_t depth0,
                                       int64_t depth) {
    const int64_t lines = line_bound(extent, depth);
    const int64_t length = pos_bound(extent, depth);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const Place where = place(i, first, depth0);
      const T* src = whole_chunk(matrix, ld, where, lines, length);
      chunks[i] = src != nullptr ? *reinterpret_cast<const Chunk<T>*>(src) : masked_chunk(matrix, ld, where, lines, length);
    }
  }

  // Copies the same tile straight into shared memory: whole aligned chunks asynchronously (they
  // land after __pipeline_wait_prior), the others by plain stores.
  static __device__ __forceinline__ void load_async(T* tile, const T* matrix, int64_t ld, int64_t first,
                                                    int64_t extent, int64_t depth0, int64_t depth) {
    static_assert(kStride % kVec == 0, "asynchronous copies need 16-byte aligned tile lines");
    const int64_t lines = line_bound(extent, depth);
    const int64_t length = pos_bound(extent, depth);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const Place where = place(i, first, depth0);
      const T* src = whole_chunk(matrix, ld, where, lines, length);
      if (src != nullptr) {
        __pipeline_memcpy_async(tile + where.offset, src, kBytesPerChunk);
      } else {
        put(tile, where.offset, masked_chunk(matrix, ld, where, lines, length));
      }
    }
  }

  __device__ __forceinline__ void store(T* tile) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) put(tile, place(i, 0, 0).offset, chunks[i]);
  }

  // Element (i, d) of the tile in shared memory.
  static __device__ __forceinline__ float at(const T* tile, int i, int d) {
    return to_float(DEPTH_CONTIGUOUS ? tile[i * kStride + d] : tile[d * kStride + i]);
  }
};

// The output tile of a block and the (term, depth) steps that accumulate it.
struct BlockTask {
  int64_t problem;
  int64_t row0;
  int64_t col0;
  int64_t steps;  // terms x depth steps
};

template <typename T, int BM, int BN, int BK>
__device__ __forceinline__ BlockTask block_task(const SkewGemmArgs<T>& args) {
  const int64_t col_tiles = (args.cols + BN - 1) / BN;
  const int64_t row_tiles = (args.rows + BM - 1) / BM;
  int64_t block = blockIdx.x;
  BlockTask task;
  task.col0 = (block % col_tiles) * BN;
  block /= col_tiles;
  task.row0 = (block % row_tiles) * BM;
  task.problem = block / row_tiles;
  task.steps = term_count(args.terms, task.problem) * ((args.depth + BK - 1) / BK);
  return task;
}

// Walks a block's (term, depth) steps in order: each call gives the next step's operand matrices
// and the depth offset of its tiles.
template <typename T, int BK>
struct StepWalker {
  struct Step {
    const T* a;
    const T* b;
    int64_t depth0;
  };
  int64_t term = 0;
  int64_t depth0 = 0;

  __device__ __forceinline__ Step next(const SkewGemmArgs<T>& args, int64_t problem) {
    const int64_t q = term_at(args.terms, problem, term);
    const int side = q >= args.num_pairs ? 1 : 0;
    const int64_t pair = q - side * args.num_pairs;
    const Step step{operand_matrix(args.a, args.pairs, side, pair), operand_matrix(args.b, args.pairs, side, pair),
                    depth0};
    depth0 += BK;
    if (depth0 >= args.depth) {
      depth0 = 0;
      ++term;
    }
    return step;
  }
};

// Runs the block's steps with one shared-memory stage (the FMA path): stage the step's tiles, then,
// while the next step's tiles are read into registers, multiply_step() consumes the staged ones.
// task.steps is the same for the whole block, so every thread reaches every barrier.
template <typename T, int BK, typename ALoader, typename BLoader, typename MultiplyStep>
__device__ __forceinline__ void accumulate_steps(const SkewGemmArgs<T>& args, const BlockTask& task, T* a_tile,
                                                 T* b_tile, MultiplyStep&& multiply_step) {
  ALoader a_loader;
  BLoader b_loader;
  StepWalker<T, BK> walker;
  const auto load_next = [&]() {
    const auto step = walker.next(args, task.problem);
    a_loader.load(step.a, args.a.ld, task.row0, args.rows, step.depth0, args.depth);
    b_loader.load(step.b, args.b.ld, task.col0, args.cols, step.depth0, args.depth);
  };
  if (task.steps > 0) load_next();
  for (int64_t step = 0; step < task.steps; ++step) {
    __syncthreads();  // the previous step's tiles are no longer read
    a_loader.store(a_tile);
    b_loader.store(b_tile);
    __syncthreads();
    if (step + 1 < task.steps) load_next();
    multiply_step();
  }
}

// The output matrix of a problem and its bias row (nullptr for none).
template <typename T>
struct OutputMatrix {
  T* c;
  const T* bias;
};

template <typename T>
__device__ __forceinline__ OutputMatrix<T> output_matrix(const SkewOutput<T>& out, int64_t problem) {
  const int side = problem >= out.split ? 1 : 0;
  const int64_t index = problem - side * out.split;
  const T* bias = side ? out.bias[1] : out.bias[0];
  const int64_t bias_stride = side ? out.bias_stride[1] : out.bias_stride[0];
  return {(side ? out.base[1] : out.base[0]) + index * out.stride,
          bias != nullptr ? bias + index * bias_stride : nullptr};
}

// Tensor cores (float16, bfloat16): WARPS_M x WARPS_N warps, each owning a (BM / WARPS_M) x
// (BN / WARPS_N) part of the block tile as 16x16 float accumulator fragments, and kStages
// shared-memory stages filled by asynchronous copies kStages - 1 steps ahead of the math.
template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, bool A_DEPTH_CONTIGUOUS, bool B_DEPTH_CONTIGUOUS>
struct WmmaConfig {
  static constexpr int kRows = BM;
  static constexpr int kCols = BN;
  static constexpr int kDepth = 32;
  static constexpr int kStages = 3;
  static constexpr int kWarpsN = WARPS_N;
  static constexpr int kWarps = WARPS_M * WARPS_N;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kWarpRows = BM / WARPS_M;
  static constexpr int kWarpCols = BN / WARPS_N;
  static constexpr int kFragRows = kWarpRows / 16;
  static constexpr int kFragCols = kWarpCols / 16;
  // 8 half-precision elements: 16 bytes, which keeps wmma's ldm a multiple of 8 and every fragment
  // pointer 32-byte aligned while shifting consecutive lines across the banks.
  static constexpr int kPad = 8;
  using ALoader = TileLoader<T, A_DEPTH_CONTIGUOUS, BM, kDepth, kPad, kThreads>;
  using BLoader = TileLoader<T, B_DEPTH_CONTIGUOUS, BN, kDepth, kPad, kThreads>;
  // The stages; after the last step they hold each warp's 16x16 float staging square instead.
  static constexpr size_t kSharedBytes = kStages * (ALoader::kSize + BLoader::kSize) * sizeof(T);
  static_assert(kWarpRows % 16 == 0 && kWarpCols % 16 == 0, "warp tiles must be whole fragments");
  static_assert(ALoader::kSize * sizeof(T) % 128 == 0, "stages must keep the 128-byte alignment");
  static_assert(BLoader::kSize * sizeof(T) % 128 == 0, "stages must keep the 128-byte alignment");
  static_assert(kWarps * 16 * 16 * sizeof(float) <= kSharedBytes, "the staging squares must fit in the stages");
};

template <typename T, typename Config, bool A_DEPTH_CONTIGUOUS, bool B_DEPTH_CONTIGUOUS>
__global__ void __launch_bounds__(Config::kThreads) skew_gemm_wmma_kernel(const SkewGemmArgs<T> args) {
  namespace wmma = nvcuda::wmma;
  constexpr int BK = Config::kDepth;
  constexpr int kStages = Config::kStages;
  using ALoader = typename Config::ALoader;
  using BLoader = typename Config::BLoader;
  // A is rows x depth: row_major when depth is contiguous. B is depth x cols: col_major when depth is.
  using ALayout = std::conditional_t<A_DEPTH_CONTIGUOUS, wmma::row_major, wmma::col_major>;
  using BLayout = std::conditional_t<B_DEPTH_CONTIGUOUS, wmma::col_major, wmma::row_major>;
  using AccumulatorFragment = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  extern __shared__ __align__(128) unsigned char shared_storage[];
  T* const a_stages = reinterpret_cast<T*>(shared_storage);
  T* const b_stages = a_stages + kStages * ALoader::kSize;

  const BlockTask task = block_task<T, Config::kRows, Config::kCols, BK>(args);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int warp_row = (warp / Config::kWarpsN) * Config::kWarpRows;
  const int warp_col = (warp % Config::kWarpsN) * Config::kWarpCols;
  // A warp whose whole part of the tile lies outside the output (small N or F) skips the math.
  const bool warp_active = task.row0 + warp_row < args.rows && task.col0 + warp_col < args.cols;

  AccumulatorFragment acc[Config::kFragRows][Config::kFragCols];
#pragma unroll
  for (int i = 0; i < Config::kFragRows; ++i) {
#pragma unroll
    for (int j = 0; j < Config::kFragCols; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  StepWalker<T, BK> walker;
  const auto issue_next = [&](int stage) {
    const auto step = walker.next(args, task.problem);
    ALoader::load_async(a_stages + stage * ALoader::kSize, step.a, args.a.ld, task.row0, args.rows, step.depth0,
                        args.depth);
    BLoader::load_async(b_stages + stage * BLoader::kSize, step.b, args.b.ld, task.col0, args.cols, step.depth0,
                        args.depth);
  };
  // One commit group per step (empty past the last step), so that waiting for all but the newest
  // kStages - 2 groups always means: step `step` has landed.
#pragma unroll
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (stage < task.steps) issue_next(stage);
    __pipeline_commit();
  }
  for (int64_t step = 0; step < task.steps; ++step) {
    __pipeline_wait_prior(kStages - 2);
    // Makes step `step` visible to every thread, and guarantees that every thread is done with
    // step - 1, whose stage the copies issued next overwrite.
    __syncthreads();
    if (step + kStages - 1 < task.steps) issue_next(static_cast<int>((step + kStages - 1) % kStages));
    __pipeline_commit();
    if (!warp_active) continue;
    const T* a_tile = a_stages + (step % kStages) * ALoader::kSize;
    const T* b_tile = b_stages + (step % kStages) * BLoader::kSize;
#pragma unroll
    for (int d = 0; d < BK; d += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a_frag[Config::kFragRows];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b_frag[Config::kFragCols];
#pragma unroll
      for (int i = 0; i < Config::kFragRows; ++i) {
        const int row = warp_row + i * 16;
        wmma::load_matrix_sync(a_frag[i],
                               A_DEPTH_CONTIGUOUS ? a_tile + row * ALoader::kStride + d
                                                  : a_tile + d * ALoader::kStride + row,
                               ALoader::kStride);
      }
#pragma unroll
      for (int j = 0; j < Config::kFragCols; ++j) {
        const int col = warp_col + j * 16;
        wmma::load_matrix_sync(b_frag[j],
                               B_DEPTH_CONTIGUOUS ? b_tile + col * BLoader::kStride + d
                                                  : b_tile + d * BLoader::kStride + col,
                               BLoader::kStride);
      }
#pragma unroll
      for (int i = 0; i < Config::kFragRows; ++i) {
#pragma unroll
        for (int j = 0; j < Config::kFragCols; ++j) wmma::mma_sync(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
      }
    }
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // every warp is done with the stages before they become staging squares

  if (!warp_active) return;
  // Fragment element order is opaque: each fragment goes through the warp's staging square, from
  // which the lanes add the bias, round once to T and write the elements inside the output.
  const OutputMatrix<T> out = output_matrix(args.out, task.problem);
  float* stage = reinterpret_cast<float*>(shared_storage) + warp * 16 * 16;
#pragma unroll
  for (int i = 0; i < Config::kFragRows; ++i) {
#pragma unroll
    for (int j = 0; j < Config::kFragCols; ++j) {
      const int64_t frag_row0 = task.row0 + warp_row + i * 16;
      const int64_t frag_col0 = task.col0 + warp_col + j * 16;
      if (frag_row0 >= args.rows || frag_col0 >= args.cols) continue;  // warp-uniform
      wmma::store_matrix_sync(stage, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int e = lane; e < 16 * 16; e += kWarpSize) {
        const int64_t row = frag_row0 + e / 16;
        const int64_t col = frag_col0 + e % 16;
        if (row < args.rows && col < args.cols) {
          const float bias = out.bias != nullptr ? to_float(out.bias[col]) : 0.f;
          out.c[row * args.cols + col] = from_float<T>(stage[e] + bias);
        }
      }
      __syncwarp();  // the staging square is rewritten by the next fragment
    }
  }
}

// FMA (float32): a 16 x 16 grid of threads, each owning TM x TN outputs strided by 16 rows and 16
// columns, which keeps the shared-memory reads of a warp free of bank conflicts in both layouts.
template <int TM, int TN>
struct FmaConfig {
  static constexpr int kGrid = 16;
  static constexpr int kThreads = kGrid * kGrid;
  static constexpr int kRows = kGrid * TM;
  static constexpr int kCols = kGrid * TN;
  static constexpr int kDepth = 16;
  static constexpr int kTileRows = TM;
  static constexpr int kTileCols = TN;
  // One float of padding makes the depth-contiguous line stride odd (conflict-free column reads);
  // the other layout is read along its lines and keeps 16-byte stores with four.
  template <bool DEPTH_CONTIGUOUS>
  static constexpr int pad() {
    return DEPTH_CONTIGUOUS ? 1 : 4;
  }
};

template <typename Config, bool A_DEPTH_CONTIGUOUS, bool B_DEPTH_CONTIGUOUS>
__global__ void __launch_bounds__(Config::kThreads) skew_gemm_fma_kernel(const SkewGemmArgs<float> args) {
  constexpr int BK = Config::kDepth;
  constexpr int TM = Config::kTileRows;
  constexpr int TN = Config::kTileCols;
  constexpr int G = Config::kGrid;
  using ALoader = TileLoader<float, A_DEPTH_CONTIGUOUS, Config::kRows, BK,
                             Config::template pad<A_DEPTH_CONTIGUOUS>(), Config::kThreads>;
  using BLoader = TileLoader<float, B_DEPTH_CONTIGUOUS, Config::kCols, BK,
                             Config::template pad<B_DEPTH_CONTIGUOUS>(), Config::kThreads>;

  __shared__ __align__(128) float a_tile[ALoader::kSize];
  __shared__ __align__(128) float b_tile[BLoader::kSize];

  const BlockTask task = block_task<float, Config::kRows, Config::kCols, BK>(args);
  const int tx = threadIdx.x % G;
  const int ty = threadIdx.x / G;

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  }

  accumulate_steps<float, BK, ALoader, BLoader>(args, task, a_tile, b_tile, [&]() {
#pragma unroll
    for (int d = 0; d < BK; ++d) {
      float a_val[TM];
      float b_val[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a_val[i] = ALoader::at(a_tile, ty + i * G, d);
#pragma unroll
      for (int j = 0; j < TN; ++j) b_val[j] = BLoader::at(b_tile, tx + j * G, d);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a_val[i], b_val[j], acc[i][j]);
      }
    }
  });

  const OutputMatrix<float> out = output_matrix(args.out, task.problem);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = task.row0 + ty + i * G;
    if (row >= args.rows) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = task.col0 + tx + j * G;
      if (col < args.cols) out.c[row * args.cols + col] = acc[i][j] + (out.bias != nullptr ? out.bias[col] : 0.f);
    }
  }
}

template <typename T>
int64_t tile_count(const SkewGemmArgs<T>& args, int rows_per_tile, int cols_per_tile) {
  return args.problems * ((args.rows + rows_per_tile - 1) / rows_per_tile) *
         ((args.cols + cols_per_tile - 1) / cols_per_tile);
}

template <typename T, typename Config, bool A_DEPTH_CONTIGUOUS, bool B_DEPTH_CONTIGUOUS>
cudaError_t launch_config(const SkewGemmArgs<T>& args, cudaStream_t stream) {
  const int64_t blocks = tile_count(args, Config::kRows, Config::kCols);
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  if constexpr (std::is_same_v<T, float>) {
    skew_gemm_fma_kernel<Config, A_DEPTH_CONTIGUOUS, B_DEPTH_CONTIGUOUS>
        <<<static_cast<unsigned>(blocks), Config::kThreads, 0, stream>>>(args);
  } else {
    const auto kernel = skew_gemm_wmma_kernel<T, Config, A_DEPTH_CONTIGUOUS, B_DEPTH_CONTIGUOUS>;
    if (Config::kSharedBytes > kDefaultSharedBytes) {
      const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                      static_cast<int>(Config::kSharedBytes));
      if (status != cudaSuccess) return status;
    }
    kernel<<<static_cast<unsigned>(blocks), Config::kThreads, Config::kSharedBytes, stream>>>(args);
  }
  return cudaGetLastError();
}

// 128 x 128 tiles when they alone fill the device, else 64 x 64 tiles (small N, P or F) for
// four times as many blocks.
template <typename T, bool A_DEPTH_CONTIGUOUS, bool B_DEPTH_CONTIGUOUS>
cudaError_t launch_layout(const SkewGemmArgs<T>& args, const SkewPairDevice& device, cudaStream_t stream) {
  constexpr bool kFma = std::is_same_v<T, float>;
  using Large = std::conditional_t<kFma, FmaConfig<8, 8>,
                                   WmmaConfig<T, 128, 128, 2, 4, A_DEPTH_CONTIGUOUS, B_DEPTH_CONTIGUOUS>>;
  using Small = std::conditional_t<kFma, FmaConfig<4, 4>,
                                   WmmaConfig<T, 64, 64, 2, 2, A_DEPTH_CONTIGUOUS, B_DEPTH_CONTIGUOUS>>;
  if (tile_count(args, Large::kRows, Large::kCols) >= device.sm_count) {
    return launch_config<T, Large, A_DEPTH_CONTIGUOUS, B_DEPTH_CONTIGUOUS>(args, stream);
  }
  return launch_config<T, Small, A_DEPTH_CONTIGUOUS, B_DEPTH_CONTIGUOUS>(args, stream);
}

}  // namespace

template <typename T>
cudaError_t launch_skew_pair_gemm(SkewGemmKind kind, const SkewGemmArgs<T>& args, const SkewPairDevice& device,
                                  cudaStream_t stream) {
  if (args.problems == 0 || args.rows == 0 || args.cols == 0) return cudaSuccess;
  switch (kind) {
    case SkewGemmKind::kForward:
      return launch_layout<T, true, true>(args, device, stream);
    case SkewGemmKind::kGradFeatures:
      return launch_layout<T, true, false>(args, device, stream);
    case SkewGemmKind::kGradWeight:
      return launch_layout<T, false, false>(args, device, stream);
  }
  return cudaErrorInvalidValue;
}

template cudaError_t launch_skew_pair_gemm<float>(SkewGemmKind, const SkewGemmArgs<float>&, const SkewPairDevice&,
                                                  cudaStream_t);
template cudaError_t launch_skew_pair_gemm<__half>(SkewGemmKind, const SkewGemmArgs<__half>&, const SkewPairDevice&,
                                                   cudaStream_t);
template cudaError_t launch_skew_pair_gemm<__nv_bfloat16>(SkewGemmKind, const SkewGemmArgs<__nv_bfloat16>&,
                                                          const SkewPairDevice&, cudaStream_t);

}  // namespace stepfusion
