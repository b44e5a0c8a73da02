// guidance_attention on the CPU, flash-attention style: programs own a block of kQueryBlock queries of
// one (batch, head), walk only the key tiles that intersect the band of the block (then the global
// tokens as one more tile), keep a running max / sum per row (online softmax) and never build the
// (Lq, Lk) score matrix. Dot products are computed tile-wide against a transposed tile (vector FMAs, no
// horizontal sums); the tiles are transposed once per call and shared by every block that visits them. The
// softmax and the gradients then take exactly each row's allowed keys, and sums of weighted rows
// (P V, dS K, ...) keep their accumulators in registers across the rows (no store per key).
// The backward recomputes the probabilities from the saved row logsumexp: one pass over query blocks
// for dq (and per-block partials of the global gradients, added afterwards in a fixed order), one pass
// over key blocks for dk and dv that visits the queries whose band reaches the block. No thread ever
// writes another's rows, so the gradients are bitwise reproducible for any number of threads.
// Inputs are converted to the accumulation type (fp32, fp64 for fp64) once, up front.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../guidance_attention.h"

namespace stepfusion {
namespace {

using at::vec::Vectorized;

constexpr int64_t kQueryBlock = 32;
constexpr int64_t kKeyTile = 64;

// out[r] = <row, column r of tile_t> for r < kWidth. tile_t is the transpose of kWidth rows (dim x kWidth,
// zero-padded), so the products broadcast one element of `row` against whole vectors of the tile: no
// horizontal reduction per pair, and kWidth / Vec::size() independent accumulators.
template <typename acc_t, int64_t kWidth>
inline void row_times_tile(const acc_t* row, const acc_t* tile_t, int64_t dim, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kVectors = kWidth / Vec::size();
  static_assert(kWidth % Vec::size() == 0, "tile width must be a whole number of vectors");
  Vec sums[kVectors];
  for (int64_t c = 0; c < kVectors; ++c) sums[c] = Vec(acc_t(0));
  for (int64_t d = 0; d < dim; ++d) {
    const Vec element(row[d]);
    const acc_t* tile_row = tile_t + d * kWidth;
    for (int64_t c = 0; c < kVectors; ++c) {
      sums[c] = at::vec::fmadd(element, Vec::loadu(tile_row + c * Vec::size()), sums[c]);
    }
  }
  for (int64_t c = 0; c < kVectors; ++c) sums[c].store(out + c * Vec::size());
}

// tile_t[d][r] = rows[r][d] for r < count, 0 for count <= r < kWidth.
template <typename acc_t, int64_t kWidth>
inline void transpose_rows(const acc_t* rows, int64_t count, int64_t dim, acc_t* tile_t) {
  for (int64_t d = 0; d < dim; ++d) {
    acc_t* tile_row = tile_t + d * kWidth;
    for (int64_t r = 0; r < count; ++r) tile_row[r] = rows[r * dim + d];
    std::fill(tile_row + count, tile_row + kWidth, acc_t(0));
  }
}

// acc[c] += sum_j weights[j] * rows[j * dim + c] for the kVectors vectors of columns from acc: the
// accumulators stay in registers across all the rows.
template <typename acc_t, int kVectors>
inline void add_weighted_rows_block(const acc_t* weights, int64_t count, const acc_t* rows, int64_t dim,
                                    acc_t* acc) {
  using Vec = Vectorized<acc_t>;
  Vec sums[kVectors];
  for (int c = 0; c < kVectors; ++c) sums[c] = Vec::loadu(acc + c * Vec::size());
  for (int64_t j = 0; j < count; ++j) {
    const Vec weight(weights[j]);
    const acc_t* row = rows + j * dim;
    for (int c = 0; c < kVectors; ++c) sums[c] = at::vec::fmadd(weight, Vec::loadu(row + c * Vec::size()), sums[c]);
  }
  for (int c = 0; c < kVectors; ++c) sums[c].store(acc + c * Vec::size());
}

// acc[0, dim) += sum_j weights[j] * rows[j], for `count` rows `dim` apart: blocks of 8, 4, 2 and 1 vectors of
// columns, then the scalar tail. One load and store of acc per call instead of one per row, whose
// store-to-load latency would otherwise chain every row's FMAs.
template <typename acc_t>
inline void add_weighted_rows(const acc_t* weights, int64_t count, const acc_t* rows, int64_t dim, acc_t* acc) {
  constexpr int64_t width = Vectorized<acc_t>::size();
  int64_t c = 0;
  for (; c + 8 * width <= dim; c += 8 * width) {
    add_weighted_rows_block<acc_t, 8>(weights, count, rows + c, dim, acc + c);
  }
  if (c + 4 * width <= dim) {
    add_weighted_rows_block<acc_t, 4>(weights, count, rows + c, dim, acc + c);
    c += 4 * width;
  }
  if (c + 2 * width <= dim) {
    add_weighted_rows_block<acc_t, 2>(weights, count, rows + c, dim, acc + c);
    c += 2 * width;
  }
  if (c + width <= dim) {
    add_weighted_rows_block<acc_t, 1>(weights, count, rows + c, dim, acc + c);
    c += width;
  }
  for (; c < dim; ++c) {
    acc_t sum = acc[c];
    for (int64_t j = 0; j < count; ++j) sum += weights[j] * rows[j * dim + c];
    acc[c] = sum;
  }
}

template <typename acc_t>
inline void scale_row(acc_t factor, acc_t* y, int64_t dim) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t width = Vec::size();
  int64_t d = 0;
  for (; d + width <= dim; d += width) (Vec::loadu(y + d) * Vec(factor)).store(y + d);
  for (; d < dim; ++d) y[d] *= factor;
}

// Every tile of kWidth rows of `rows` (B, H, count, dim; contiguous), transposed and zero-padded as in
// transpose_rows: (B * H, ceil(count / kWidth), dim, kWidth). Made once per call, in parallel; every block
// that visits a tile then reads it as it is.
template <typename acc_t, int64_t kWidth>
at::Tensor transposed_tiles(const at::Tensor& rows) {
  const int64_t groups = rows.size(0) * rows.size(1), count = rows.size(2), dim = rows.size(3);
  const int64_t tiles = (count + kWidth - 1) / kWidth;
  at::Tensor result = at::empty({groups, tiles, dim, kWidth}, rows.options());
  const acc_t* src = rows.data_ptr<acc_t>();
  acc_t* dst = result.data_ptr<acc_t>();
  at::parallel_for(0, groups * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / tiles, first = (task % tiles) * kWidth;
      transpose_rows<acc_t, kWidth>(src + (group * count + first) * dim, std::min(kWidth, count - first), dim,
                                    dst + task * dim * kWidth);
    }
  });
  return result;
}

// Tile `index` of group bh of a transposed_tiles tensor (nullptr when there is none).
template <typename acc_t>
const acc_t* tile_of(const at::Tensor& tiles, int64_t bh, int64_t index) {
  if (!tiles.defined()) return nullptr;
  return tiles.data_ptr<acc_t>() + (bh * tiles.size(1) + index) * tiles.size(2) * tiles.size(3);
}

// The operands of one call, in the accumulation type and contiguous, with their row pointers.
template <typename acc_t>
struct Operands {
  const acc_t* q;
  const acc_t* k;
  const acc_t* v;
  const acc_t* k_global;  // nullptr when absent
  const acc_t* v_global;
  GuidanceAttentionShape shape;
  int64_t window;
  acc_t scale;

  const acc_t* q_row(int64_t bh, int64_t i) const { return q + (bh * shape.len_q + i) * shape.head_dim; }
  const acc_t* k_row(int64_t bh, int64_t j) const { return k + (bh * shape.len_k + j) * shape.head_dim; }
  const acc_t* v_row(int64_t bh, int64_t j) const { return v + (bh * shape.len_k + j) * shape.head_dim; }
  const acc_t* kg_row(int64_t bh, int64_t g) const { return k_global + (bh * shape.globals + g) * shape.head_dim; }
  const acc_t* vg_row(int64_t bh, int64_t g) const { return v_global + (bh * shape.globals + g) * shape.head_dim; }
  // The allowed keys of query i inside the tile [tile_begin, tile_end), as [first, last).
  std::pair<int64_t, int64_t> row_keys(int64_t i, int64_t tile_begin, int64_t tile_end) const {
    if (window < 0) return {tile_begin, tile_end};
    const int64_t centre = guidance_center(i, shape.len_q, shape.len_k);
    return {std::max(tile_begin, centre - window), std::min(tile_end, centre + window + 1)};
  }
};

struct Inputs {
  at::Tensor q, k, v, k_global, v_global;
};

Inputs to_acc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& k_global,
              const std::optional<at::Tensor>& v_global, at::ScalarType acc_type) {
  auto convert = [acc_type](const at::Tensor& t) { return t.to(acc_type).contiguous(); };
  Inputs in{convert(q), convert(k), convert(v), at::Tensor(), at::Tensor()};
  if (k_global.has_value()) {
    in.k_global = convert(*k_global);
    in.v_global = convert(*v_global);
  }
  return in;
}

template <typename acc_t>
Operands<acc_t> operands_of(const Inputs& in, const GuidanceAttentionShape& shape, int64_t window, double scale) {
  return {in.q.data_ptr<acc_t>(),
          in.k.data_ptr<acc_t>(),
          in.v.data_ptr<acc_t>(),
          in.k_global.defined() ? in.k_global.data_ptr<acc_t>() : nullptr,
          in.v_global.defined() ? in.v_global.data_ptr<acc_t>() : nullptr,
          shape,
          window,
          static_cast<acc_t>(scale)};
}

void check_cpu_dtype(const at::Tensor& q) {
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
              "guidance_attention (cpu backend): q must be float32, float64 or bfloat16, got ", t);
}

int64_t num_query_blocks(const GuidanceAttentionShape& shape) { return (shape.len_q + kQueryBlock - 1) / kQueryBlock; }

// Online softmax state of the rows of one query block.
template <typename acc_t>
struct RowState {
  RowState(int64_t rows, int64_t dim)
      : max(rows, -std::numeric_limits<acc_t>::infinity()), sum(rows, acc_t(0)), acc(rows * dim, acc_t(0)) {}
  std::vector<acc_t> max;
  std::vector<acc_t> sum;
  std::vector<acc_t> acc;  // rows x dim: sum_j exp(s_j - max) v_j
};

// Folds `count` keys into a row's running softmax, given their dot products with the row and their
// value rows (contiguous, `dim` apart).
template <typename acc_t>
inline void fold_scores(const acc_t* dots, int64_t count, const acc_t* values, acc_t scale, int64_t dim,
                        acc_t* weights, acc_t& row_max, acc_t& row_sum, acc_t* acc) {
  using Vec = Vectorized<acc_t>;
  if (count <= 0) return;
  at::vec::map([scale](Vec x) { return x * Vec(scale); }, weights, dots, count);
  const acc_t tile_max =
      at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, weights, count);
  const acc_t new_max = std::max(row_max, tile_max);
  const acc_t correction = std::exp(row_max - new_max);  // exp(-inf) = 0 on the first tile
  at::vec::map([new_max](Vec x) { return (x - Vec(new_max)).exp(); }, weights, weights, count);
  row_sum = row_sum * correction + at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, weights, count);
  scale_row(correction, acc, dim);
  add_weighted_rows(weights, count, values, dim, acc);
  row_max = new_max;
}

// Per-row products of one tile, for one thread.
template <typename acc_t>
struct TileScratch {
  TileScratch() : dots(kKeyTile), more_dots(kKeyTile), weights(kKeyTile), row_lse(kKeyTile), row_delta(kKeyTile) {}
  std::vector<acc_t> dots;
  std::vector<acc_t> more_dots;
  std::vector<acc_t> weights;
  std::vector<acc_t> row_lse;    // one row's lse and delta, repeated (the backward's vector operands)
  std::vector<acc_t> row_delta;
};

template <typename acc_t>
void forward_kernel(const Operands<acc_t>& op, const at::Tensor& k_tiles, const at::Tensor& k_global_tiles,
                    acc_t* out, acc_t* lse) {
  const GuidanceAttentionShape& shape = op.shape;
  const int64_t dim = shape.head_dim;
  const int64_t blocks = num_query_blocks(shape);
  at::parallel_for(0, shape.batch * shape.heads * blocks, 1, [&](int64_t begin, int64_t end) {
    RowState<acc_t> state(kQueryBlock, dim);
    TileScratch<acc_t> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks;
      const int64_t q_begin = (task % blocks) * kQueryBlock;
      const int64_t q_end = std::min(shape.len_q, q_begin + kQueryBlock);
      std::fill(state.max.begin(), state.max.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(state.sum.begin(), state.sum.end(), acc_t(0));
      std::fill(state.acc.begin(), state.acc.end(), acc_t(0));
      // Folds the keys of the transposed tile `keys_t` into every row, each row restricted to its keys
      // [first, last) of the tile (offsets from the tile start).
      auto fold_tile = [&](const acc_t* keys_t, const acc_t* values, auto row_span) {
        for (int64_t i = q_begin; i < q_end; ++i) {
          const int64_t r = i - q_begin;
          const auto [first, last] = row_span(i);
          if (first >= last) continue;
          row_times_tile<acc_t, kKeyTile>(op.q_row(bh, i), keys_t, dim, scratch.dots.data());
          fold_scores(scratch.dots.data() + first, last - first, values + first * dim, op.scale, dim,
                      scratch.weights.data(), state.max[r], state.sum[r], state.acc.data() + r * dim);
        }
      };
      if (shape.len_k > 0) {
        // Key tiles aligned to kKeyTile, from the first to the last key the block's band reaches.
        const KeyRange band = guidance_key_range(q_begin, q_end, shape.len_q, shape.len_k, op.window);
        for (int64_t tile = band.first - band.first % kKeyTile; tile <= band.last; tile += kKeyTile) {
          const int64_t tile_end = std::min(shape.len_k, tile + kKeyTile);
          fold_tile(tile_of<acc_t>(k_tiles, bh, tile / kKeyTile), op.v_row(bh, tile), [&](int64_t i) {
            const auto [first, last] = op.row_keys(i, tile, tile_end);
            return std::pair<int64_t, int64_t>{first - tile, last - tile};
          });
        }
      }
      for (int64_t chunk = 0; chunk < shape.globals; chunk += kKeyTile) {
        const int64_t count = std::min(kKeyTile, shape.globals - chunk);
        fold_tile(tile_of<acc_t>(k_global_tiles, bh, chunk / kKeyTile), op.vg_row(bh, chunk),
                  [count](int64_t) { return std::pair<int64_t, int64_t>{0, count}; });
      }
      for (int64_t i = q_begin; i < q_end; ++i) {
        const int64_t r = i - q_begin;
        const int64_t row = bh * shape.len_q + i;
        acc_t* out_row = out + row * dim;
        std::copy(state.acc.data() + r * dim, state.acc.data() + (r + 1) * dim, out_row);
        scale_row(acc_t(1) / state.sum[r], out_row, dim);
        lse[row] = state.max[r] + std::log(state.sum[r]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> guidance_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v,
                                                          const std::optional<at::Tensor>& k_global,
                                                          const std::optional<at::Tensor>& v_global, int64_t window,
                                                          double scale) {
  const GuidanceAttentionShape shape = check_guidance_attention(q, k, v, k_global, v_global, window);
  check_cpu_dtype(q);
  const at::ScalarType acc_type = guidance_lse_type(q.scalar_type());
  const Inputs in = to_acc(q, k, v, k_global, v_global, acc_type);
  at::Tensor out = at::empty({shape.batch, shape.heads, shape.len_q, shape.head_dim}, in.q.options());
  at::Tensor lse = at::empty({shape.batch, shape.heads, shape.len_q}, in.q.options());
  if (shape.batch * shape.heads * shape.len_q > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc_type, "guidance_attention_cpu", [&] {
      const at::Tensor k_tiles = transposed_tiles<scalar_t, kKeyTile>(in.k);
      const at::Tensor k_global_tiles =
          in.k_global.defined() ? transposed_tiles<scalar_t, kKeyTile>(in.k_global) : at::Tensor();
      forward_kernel<scalar_t>(operands_of<scalar_t>(in, shape, window, scale), k_tiles, k_global_tiles,
                               out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
    });
  }
  return {out.to(q.scalar_type()), lse};
}

// The backward of `count` (query, key) pairs from their dot products q.k and dO.v, recomputed from the
// saved lse: p = exp(scale q.k - lse), ds = p (dO.v - delta); the gradient of q.k is scale * ds. lse and
// delta come as vectors (one per pair); ds overwrites q_dot_k, which is not needed past p.
template <typename acc_t>
inline void pair_grads(acc_t* q_dot_k, const acc_t* dout_dot_v, const acc_t* lse, const acc_t* delta, acc_t scale,
                       int64_t count, acc_t* p) {
  using Vec = Vectorized<acc_t>;
  at::vec::map2([scale](Vec dot, Vec l) { return (dot * Vec(scale) - l).exp(); }, p, q_dot_k, lse, count);
  at::vec::map3([](Vec pv, Vec dp, Vec dl) { return pv * (dp - dl); }, q_dot_k, p, dout_dot_v, delta, count);
}

// delta_i = dO_i . o_i = sum_j p_ij dp_ij, the row term of the softmax backward, summed over the head dim in
// the order of row_times_tile's dot products dO . v (one FMA per element, first to last): where a row's
// probability sits on one key (o = v), ds = p (dO . v - delta) is then exactly 0, as the math says.
template <typename acc_t>
void row_deltas(const acc_t* grad_out, const acc_t* out, int64_t rows, int64_t dim, acc_t* delta) {
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t sum = 0;
      for (int64_t d = 0; d < dim; ++d) sum = std::fma(grad_out[r * dim + d], out[r * dim + d], sum);
      delta[r] = sum;
    }
  });
}

// The transposed tiles the backward reads: keys and values by kKeyTile for the query pass, queries and
// grad_out by kQueryBlock for the key pass.
struct BackwardTiles {
  at::Tensor k, v, k_global, v_global, q, grad_out;
};

template <typename acc_t>
void backward_query_kernel(const Operands<acc_t>& op, const BackwardTiles& tiles, const acc_t* grad_out,
                           const acc_t* lse, const acc_t* delta, acc_t* grad_q, acc_t* global_partial) {
  const GuidanceAttentionShape& shape = op.shape;
  const int64_t dim = shape.head_dim;
  const int64_t blocks = num_query_blocks(shape);
  at::parallel_for(0, shape.batch * shape.heads * blocks, 1, [&](int64_t begin, int64_t end) {
    TileScratch<acc_t> scratch;
    // The global tokens' p and ds of every row of the block (kQueryBlock x kKeyTile), then one column.
    std::vector<acc_t> global_p(kQueryBlock * kKeyTile), global_ds(kQueryBlock * kKeyTile), column(kQueryBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks;
      const int64_t q_begin = (task % blocks) * kQueryBlock;
      const int64_t q_end = std::min(shape.len_q, q_begin + kQueryBlock);
      std::fill(grad_q + (bh * shape.len_q + q_begin) * dim, grad_q + (bh * shape.len_q + q_end) * dim, acc_t(0));
      // The keys of one tile (transposed in keys_t and values_t, rows from `keys`) for every row restricted
      // to its span: adds ds k to the row's dq; keep(r, p, ds) may keep row r's p and ds (from the row's first key).
      auto visit_tile = [&](const acc_t* keys_t, const acc_t* values_t, const acc_t* keys, auto row_span,
                            auto keep) {
        for (int64_t i = q_begin; i < q_end; ++i) {
          const auto [first, last] = row_span(i);
          if (first >= last) continue;
          const int64_t row = bh * shape.len_q + i;
          row_times_tile<acc_t, kKeyTile>(op.q_row(bh, i), keys_t, dim, scratch.dots.data());
          row_times_tile<acc_t, kKeyTile>(grad_out + row * dim, values_t, dim, scratch.more_dots.data());
          const int64_t count = last - first;
          std::fill(scratch.row_lse.begin(), scratch.row_lse.begin() + count, lse[row]);
          std::fill(scratch.row_delta.begin(), scratch.row_delta.begin() + count, delta[row]);
          acc_t* ds = scratch.dots.data() + first;
          pair_grads(ds, scratch.more_dots.data() + first, scratch.row_lse.data(), scratch.row_delta.data(), op.scale,
                     count, scratch.weights.data());
          add_weighted_rows(ds, count, keys + first * dim, dim, grad_q + row * dim);
          keep(i - q_begin, scratch.weights.data(), ds);
        }
      };
      if (shape.len_k > 0) {
        const KeyRange band = guidance_key_range(q_begin, q_end, shape.len_q, shape.len_k, op.window);
        for (int64_t tile = band.first - band.first % kKeyTile; tile <= band.last; tile += kKeyTile) {
          const int64_t tile_end = std::min(shape.len_k, tile + kKeyTile);
          visit_tile(
              tile_of<acc_t>(tiles.k, bh, tile / kKeyTile), tile_of<acc_t>(tiles.v, bh, tile / kKeyTile),
              op.k_row(bh, tile),
              [&](int64_t i) {
                const auto [first, last] = op.row_keys(i, tile, tile_end);
                return std::pair<int64_t, int64_t>{first - tile, last - tile};
              },
              [](int64_t, const acc_t*, const acc_t*) {});
        }
      }
      // This block's share of grad_k_global then grad_v_global, (2, G, Dh): every row sees every token, so
      // each token's gradient is a weighted sum of the block's q (or grad_out) rows, one column of ds (p).
      acc_t* partial = global_partial == nullptr ? nullptr : global_partial + task * 2 * shape.globals * dim;
      const int64_t rows = q_end - q_begin;
      for (int64_t chunk = 0; chunk < shape.globals; chunk += kKeyTile) {
        const int64_t count = std::min(kKeyTile, shape.globals - chunk);
        visit_tile(
            tile_of<acc_t>(tiles.k_global, bh, chunk / kKeyTile), tile_of<acc_t>(tiles.v_global, bh, chunk / kKeyTile),
            op.kg_row(bh, chunk), [count](int64_t) { return std::pair<int64_t, int64_t>{0, count}; },
            [&](int64_t r, const acc_t* p, const acc_t* ds) {
              std::copy(p, p + count, global_p.data() + r * kKeyTile);
              std::copy(ds, ds + count, global_ds.data() + r * kKeyTile);
            });
        for (int64_t t = 0; t < count; ++t) {
          for (int64_t r = 0; r < rows; ++r) column[r] = global_ds[r * kKeyTile + t] * op.scale;
          add_weighted_rows(column.data(), rows, op.q_row(bh, q_begin), dim, partial + (chunk + t) * dim);
          for (int64_t r = 0; r < rows; ++r) column[r] = global_p[r * kKeyTile + t];
          add_weighted_rows(column.data(), rows, grad_out + (bh * shape.len_q + q_begin) * dim, dim,
                            partial + (shape.globals + chunk + t) * dim);
        }
      }
      for (int64_t i = q_begin; i < q_end; ++i) scale_row(op.scale, grad_q + (bh * shape.len_q + i) * dim, dim);
    }
  });
}

template <typename acc_t>
void backward_key_kernel(const Operands<acc_t>& op, const BackwardTiles& tiles, const acc_t* grad_out,
                         const acc_t* lse, const acc_t* delta, acc_t* grad_k, acc_t* grad_v) {
  using Vec = Vectorized<acc_t>;
  const GuidanceAttentionShape& shape = op.shape;
  const int64_t dim = shape.head_dim;
  const int64_t blocks = (shape.len_k + kKeyTile - 1) / kKeyTile;
  at::parallel_for(0, shape.batch * shape.heads * blocks, 1, [&](int64_t begin, int64_t end) {
    // The products of one key with a tile of kQueryBlock queries and grad_out rows.
    std::vector<acc_t> dots(kQueryBlock), more_dots(kQueryBlock), weights(kQueryBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks;
      const int64_t k_begin = (task % blocks) * kKeyTile;
      const int64_t k_end = std::min(shape.len_k, k_begin + kKeyTile);
      std::fill(grad_k + (bh * shape.len_k + k_begin) * dim, grad_k + (bh * shape.len_k + k_end) * dim, acc_t(0));
      std::fill(grad_v + (bh * shape.len_k + k_begin) * dim, grad_v + (bh * shape.len_k + k_end) * dim, acc_t(0));
      // Only the query tiles whose band reaches this key block; within a tile, each key visits exactly
      // the queries that see it (an interval, by the monotone centres).
      const KeyRange queries = guidance_query_range(k_begin, k_end, shape.len_q, shape.len_k, op.window);
      if (queries.first > queries.last) continue;
      for (int64_t tile = queries.first - queries.first % kQueryBlock; tile <= queries.last; tile += kQueryBlock) {
        const int64_t tile_end = std::min(shape.len_q, tile + kQueryBlock);
        const acc_t* q_t = tile_of<acc_t>(tiles.q, bh, tile / kQueryBlock);
        const acc_t* dout_t = tile_of<acc_t>(tiles.grad_out, bh, tile / kQueryBlock);
        for (int64_t j = k_begin; j < k_end; ++j) {
          const KeyRange seen_by = guidance_query_range(j, j + 1, shape.len_q, shape.len_k, op.window);
          const int64_t first = std::max(seen_by.first, tile), last = std::min(seen_by.last + 1, tile_end);
          if (first >= last) continue;
          row_times_tile<acc_t, kQueryBlock>(op.k_row(bh, j), q_t, dim, dots.data());
          row_times_tile<acc_t, kQueryBlock>(op.v_row(bh, j), dout_t, dim, more_dots.data());
          const int64_t row_first = bh * shape.len_q + first;
          const int64_t count = last - first;
          acc_t* ds = dots.data() + (first - tile);
          pair_grads(ds, more_dots.data() + (first - tile), lse + row_first, delta + row_first, op.scale, count,
                     weights.data());
          at::vec::map([scale = op.scale](Vec x) { return x * Vec(scale); }, ds, ds, count);
          add_weighted_rows(ds, count, op.q_row(bh, first), dim, grad_k + (bh * shape.len_k + j) * dim);
          add_weighted_rows(weights.data(), count, grad_out + row_first * dim, dim,
                            grad_v + (bh * shape.len_k + j) * dim);
        }
      }
    }
  });
}

// (BH, T, 2, G, Dh) partials -> grad_k_global and grad_v_global (BH, G, Dh), adding the T query blocks
// in block order so that the result does not depend on the number of threads.
std::pair<at::Tensor, at::Tensor> sum_global_partials(const at::Tensor& partial) {
  const int64_t groups = partial.size(0), blocks = partial.size(1);
  const int64_t width = partial.size(2) * partial.size(3) * partial.size(4);
  at::Tensor total = at::empty({groups, partial.size(2), partial.size(3), partial.size(4)}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "guidance_attention_sum_global_partials", [&] {
    const scalar_t* src = partial.data_ptr<scalar_t>();
    scalar_t* dst = total.data_ptr<scalar_t>();
    at::parallel_for(0, groups * width, 256, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const int64_t group = e / width, column = e % width;
        const scalar_t* column_p = src + group * blocks * width + column;
        scalar_t sum = 0;
        for (int64_t t = 0; t < blocks; ++t) sum += column_p[t * width];
        dst[e] = sum;
      }
    });
  });
  return {total.select(1, 0), total.select(1, 1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> guidance_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& k_global, const std::optional<at::Tensor>& v_global, const at::Tensor& out_in,
    const at::Tensor& lse_in, int64_t window, double scale) {
  const GuidanceAttentionShape shape =
      check_guidance_attention_backward(grad_out_in, q, k, v, k_global, v_global, out_in, lse_in, window);
  check_cpu_dtype(q);
  const at::ScalarType acc_type = guidance_lse_type(q.scalar_type());
  const at::ScalarType dtype = q.scalar_type();
  const Inputs in = to_acc(q, k, v, k_global, v_global, acc_type);
  const at::Tensor grad_out = grad_out_in.to(acc_type).contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor out = out_in.to(acc_type).contiguous();
  const auto acc_options = in.q.options();
  const at::Tensor delta = at::empty({shape.batch, shape.heads, shape.len_q}, acc_options);
  at::Tensor grad_q = at::empty({shape.batch, shape.heads, shape.len_q, shape.head_dim}, acc_options);
  at::Tensor grad_k = at::empty({shape.batch, shape.heads, shape.len_k, shape.head_dim}, acc_options);
  at::Tensor grad_v = at::empty({shape.batch, shape.heads, shape.len_k, shape.head_dim}, acc_options);
  const int64_t groups = shape.batch * shape.heads;
  const int64_t blocks = num_query_blocks(shape);
  at::Tensor global_partial;
  if (k_global.has_value()) {
    global_partial = at::zeros({groups, blocks, 2, shape.globals, shape.head_dim}, acc_options);
  }
  if (groups > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc_type, "guidance_attention_backward_cpu", [&] {
      const Operands<scalar_t> op = operands_of<scalar_t>(in, shape, window, scale);
      BackwardTiles tiles{transposed_tiles<scalar_t, kKeyTile>(in.k), transposed_tiles<scalar_t, kKeyTile>(in.v),
                          at::Tensor(), at::Tensor(), transposed_tiles<scalar_t, kQueryBlock>(in.q),
                          transposed_tiles<scalar_t, kQueryBlock>(grad_out)};
      if (k_global.has_value()) {
        tiles.k_global = transposed_tiles<scalar_t, kKeyTile>(in.k_global);
        tiles.v_global = transposed_tiles<scalar_t, kKeyTile>(in.v_global);
      }
      const scalar_t* dout_p = grad_out.data_ptr<scalar_t>();
      const scalar_t* lse_p = lse.data_ptr<scalar_t>();
      scalar_t* delta_p = delta.data_ptr<scalar_t>();
      row_deltas(dout_p, out.data_ptr<scalar_t>(), groups * shape.len_q, shape.head_dim, delta_p);
      backward_query_kernel<scalar_t>(op, tiles, dout_p, lse_p, delta_p, grad_q.data_ptr<scalar_t>(),
                                      global_partial.defined() ? global_partial.data_ptr<scalar_t>() : nullptr);
      backward_key_kernel<scalar_t>(op, tiles, dout_p, lse_p, delta_p, grad_k.data_ptr<scalar_t>(),
                                    grad_v.data_ptr<scalar_t>());
    });
  }
  at::Tensor grad_k_global = at::empty({0}, q.options());
  at::Tensor grad_v_global = at::empty({0}, q.options());
  if (k_global.has_value()) {
    const auto [dk_global, dv_global] = sum_global_partials(global_partial);
    const std::vector<int64_t> global_shape{shape.batch, shape.heads, shape.globals, shape.head_dim};
    // Copies: the two sums are views of one buffer, and the outputs of an op may not alias each other.
    grad_k_global = dk_global.reshape(global_shape).to(dtype, /*non_blocking=*/false, /*copy=*/true);
    grad_v_global = dv_global.reshape(global_shape).to(dtype, /*non_blocking=*/false, /*copy=*/true);
  }
  return {grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), grad_k_global, grad_v_global};
}

}  // namespace

TORCH_LIBRARY_IMPL(stepfusion, CPU, m) {
  m.impl("guidance_attention", &guidance_attention_cpu);
  m.impl("guidance_attention_backward", &guidance_attention_backward_cpu);
}

}  // namespace stepfusion
