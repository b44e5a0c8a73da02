// guidance_attention on the CPU, flash-attention style: programs own a block of kQueryBlock queries of
// one (batch, head), walk only the key tiles that intersect the band of the block (then the global
// tokens as one more tile), keep a running max / sum per row (online softmax) and never build the
// (Lq, Lk) score matrix. Each (query block x key tile) block goes as small register-blocked matrix
// products into per-thread scratch (scores against a transposed key tile, then P V), each group of rows
// restricted to the part of the band it needs; the tiles are transposed once per call and shared by every
// block that visits them. Each row's softmax and gradients take exactly its allowed keys (weights of 0
// elsewhere in the tile).
// The backward recomputes the probabilities from the saved row logsumexp, block by block as the forward.
// With few (batch, head) pairs per thread it runs two passes: one over query blocks for dq (and per-block
// partials of the global gradients, added afterwards in a fixed order), one over key blocks for dk and dv
// that recomputes the blocks of the queries whose band reaches it. With enough of them, one pass per
// (batch, head) does both from each block, adding every term in the same order. No thread ever writes
// another's rows, so the gradients are bitwise reproducible for any number of threads.
// Inputs are converted to the accumulation type (fp32, fp64 for fp64) once, up front.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../guidance_attention.h"
#include "vec.h"

namespace stepfusion {
namespace {

using at::vec::Vectorized;

constexpr int64_t kQueryBlock = 32;
constexpr int64_t kKeyTile = 64;

// tile_t[d][r] = rows[r][d] for r < count, 0 for count <= r < kWidth.
template <typename acc_t, int64_t kWidth>
inline void transpose_rows(const acc_t* rows, int64_t count, int64_t dim, acc_t* tile_t) {
  for (int64_t d = 0; d < dim; ++d) {
    acc_t* tile_row = tile_t + d * kWidth;
    for (int64_t r = 0; r < count; ++r) tile_row[r] = rows[r * dim + d];
    std::fill(tile_row + count, tile_row + kWidth, acc_t(0));
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

// c[r][x] (+)= sum_k a[r * a_row + k * a_step] * b[k * ldb + x] over k in [k_begin, k_end), for kRows rows r and
// kVectors vectors of columns x (c rows ldc apart). Register-blocked: each vector loaded from b feeds kRows FMAs
// and each element broadcast from a feeds kVectors, so loads do not bound the FMAs, and the kRows * kVectors
// independent accumulators cover the FMA latency. Each element adds its products in order of k, one FMA each
// (row_deltas relies on it).
template <typename acc_t, int kRows, int kVectors, bool kAccumulate>
inline void multiply_block(const acc_t* a, int64_t a_row, int64_t a_step, const acc_t* b, int64_t ldb, int64_t k_begin,
                           int64_t k_end, acc_t* c, int64_t ldc) {
  using Vec = Vectorized<acc_t>;
  Vec sums[kRows][kVectors];
  for (int r = 0; r < kRows; ++r) {
    for (int x = 0; x < kVectors; ++x) {
      sums[r][x] = kAccumulate ? Vec::loadu(c + r * ldc + x * Vec::size()) : Vec(acc_t(0));
    }
  }
  for (int64_t k = k_begin; k < k_end; ++k) {
    Vec columns[kVectors];
    for (int x = 0; x < kVectors; ++x) columns[x] = Vec::loadu(b + k * ldb + x * Vec::size());
    for (int r = 0; r < kRows; ++r) {
      const Vec element(a[r * a_row + k * a_step]);
      for (int x = 0; x < kVectors; ++x) sums[r][x] = at::vec::fmadd(element, columns[x], sums[r][x]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int x = 0; x < kVectors; ++x) sums[r][x].store(c + r * ldc + x * Vec::size());
  }
}

// The columns [0, width) of kRows rows of c (+)= a b as in multiply_block: blocks of two vectors, then one, then
// the scalar tail (a head dim that is not a whole number of vectors).
template <typename acc_t, int kRows, bool kAccumulate>
inline void multiply_rows(const acc_t* a, int64_t a_row, int64_t a_step, const acc_t* b, int64_t ldb, int64_t width,
                          int64_t k_begin, int64_t k_end, acc_t* c, int64_t ldc) {
  constexpr int64_t size = Vectorized<acc_t>::size();
  int64_t x = 0;
  for (; x + 2 * size <= width; x += 2 * size) {
    multiply_block<acc_t, kRows, 2, kAccumulate>(a, a_row, a_step, b + x, ldb, k_begin, k_end, c + x, ldc);
  }
  if (x + size <= width) {
    multiply_block<acc_t, kRows, 1, kAccumulate>(a, a_row, a_step, b + x, ldb, k_begin, k_end, c + x, ldc);
    x += size;
  }
  for (; x < width; ++x) {
    for (int r = 0; r < kRows; ++r) {
      acc_t sum = kAccumulate ? c[r * ldc + x] : acc_t(0);
      for (int64_t k = k_begin; k < k_end; ++k) sum = std::fma(a[r * a_row + k * a_step], b[k * ldb + x], sum);
      c[r * ldc + x] = sum;
    }
  }
}

// The part of a product c (+)= a b that a block of rows needs: the inner indices [k_begin, k_end) and the columns
// [x_begin, x_end) of c. Outside them the products are zero (a's entries there are 0) or not read.
struct BlockRange {
  int64_t k_begin, k_end, x_begin, x_end;
};

// c (+)= a b for `rows` rows of a and c, in blocks of kRowBlock rows (then single rows), each over the part
// range(r0, r1) of its rows [r0, r1).
constexpr int kRowBlock = 4;

template <typename acc_t, bool kAccumulate, typename Range>
void multiply(const acc_t* a, int64_t a_row, int64_t a_step, int64_t rows, const acc_t* b, int64_t ldb, Range range,
              acc_t* c, int64_t ldc) {
  int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock) {
    const BlockRange part = range(r, r + kRowBlock);
    multiply_rows<acc_t, kRowBlock, kAccumulate>(a + r * a_row, a_row, a_step, b + part.x_begin, ldb,
                                                 part.x_end - part.x_begin, part.k_begin, part.k_end,
                                                 c + r * ldc + part.x_begin, ldc);
  }
  for (; r < rows; ++r) {
    const BlockRange part = range(r, r + 1);
    multiply_rows<acc_t, 1, kAccumulate>(a + r * a_row, a_row, a_step, b + part.x_begin, ldb, part.x_end - part.x_begin,
                                         part.k_begin, part.k_end, c + r * ldc + part.x_begin, ldc);
  }
}

// The union [min first, max last) of the spans [first[r], last[r]) of rows [r0, r1).
inline std::pair<int64_t, int64_t> union_of(const std::vector<int64_t>& first, const std::vector<int64_t>& last,
                                            int64_t r0, int64_t r1) {
  return {*std::min_element(first.begin() + r0, first.begin() + r1),
          *std::max_element(last.begin() + r0, last.begin() + r1)};
}

// The rows [lo, hi) of [0, rows) whose span is not empty: an interval, as the spans move monotonically with the
// row (the band follows the non-decreasing centres).
inline std::pair<int64_t, int64_t> rows_with_pairs(const std::vector<int64_t>& first, const std::vector<int64_t>& last,
                                                   int64_t rows) {
  int64_t lo = 0, hi = rows;
  while (lo < hi && first[lo] >= last[lo]) ++lo;
  while (hi > lo && first[hi - 1] >= last[hi - 1]) --hi;
  return {lo, hi};
}

// One thread's block of up to kQueryBlock query rows against a tile of kKeyTile keys: the scores, the dO.v
// products, p and ds (rows kKeyTile apart); each query row's span [first, last) of the tile's keys and, for
// the key pass, each key's span [key_first, key_last) of the block's rows.
template <typename acc_t>
struct BlockScratch {
  BlockScratch()
      : scores(kQueryBlock * kKeyTile), dout_dot_v(kQueryBlock * kKeyTile), p(kQueryBlock * kKeyTile),
        ds(kQueryBlock * kKeyTile), first(kQueryBlock), last(kQueryBlock), key_first(kKeyTile), key_last(kKeyTile) {}
  std::vector<acc_t> scores, dout_dot_v, p, ds;
  std::vector<int64_t> first, last, key_first, key_last;
  // The scores (or dO.v products) of query rows [r0, r1): the whole head dim, the keys of their spans in whole
  // vectors (the tile width is a whole number of them), so that work outside the band is skipped at its edges.
  BlockRange scores_of(int64_t r0, int64_t r1, int64_t dim) const {
    constexpr int64_t size = Vectorized<acc_t>::size();
    const auto [span_first, span_last] = union_of(first, last, r0, r1);
    return {0, dim, span_first - span_first % size, (span_last + size - 1) / size * size};
  }
  // A product summed over the keys of query rows [r0, r1)'s spans, as P V or dS K: the whole head dim.
  BlockRange sum_over_keys(int64_t r0, int64_t r1, int64_t dim) const {
    const auto [span_first, span_last] = union_of(first, last, r0, r1);
    return {span_first, span_last, 0, dim};
  }
  // A product summed over the query rows that see keys [r0, r1), as dS^T Q or P^T dO: the whole head dim.
  BlockRange sum_over_queries(int64_t r0, int64_t r1, int64_t dim) const {
    const auto [span_first, span_last] = union_of(key_first, key_last, r0, r1);
    return {span_first, span_last, 0, dim};
  }
};

// The span of query i in the keys [tile, tile_end), as offsets from tile; first == last when empty.
template <typename acc_t>
std::pair<int64_t, int64_t> span_in_tile(const Operands<acc_t>& op, int64_t i, int64_t tile, int64_t tile_end) {
  const auto [first, last] = op.row_keys(i, tile, tile_end);
  const int64_t clamped_first = std::min(first, tile_end);
  return {clamped_first - tile, std::max(clamped_first, last) - tile};
}

// Folds row r's scores of one tile (its span [first, last) of `scores`, a row of kKeyTile) into the row's
// running softmax: rescales its accumulator by exp(old max - new max) and leaves the row's weights
// exp(scale s - new max) in p, 0 outside the span, for the block product P V that adds them to it.
template <typename acc_t>
inline void fold_row(const acc_t* scores, int64_t first, int64_t last, acc_t scale, int64_t dim, acc_t* p,
                     acc_t& row_max, acc_t& row_sum, acc_t* acc) {
  using Vec = Vectorized<acc_t>;
  const int64_t count = last - first;
  std::fill(p, p + first, acc_t(0));
  std::fill(p + last, p + kKeyTile, acc_t(0));
  acc_t* weights = p + first;
  at::vec::map([scale](Vec x) { return x * Vec(scale); }, weights, scores + first, count);
  const acc_t tile_max =
      at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, weights, count);
  const acc_t new_max = std::max(row_max, tile_max);
  const acc_t correction = std::exp(row_max - new_max);  // exp(-inf) = 0 on the first tile
  at::vec::map([new_max](Vec x) { return fast_exp(x - Vec(new_max)); }, weights, weights, count);
  row_sum = row_sum * correction + at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, weights, count);
  scale_row(correction, acc, dim);
  row_max = new_max;
}

// Per block of kQueryBlock queries and tile of kKeyTile keys: the scores S = Q K^T as a register-blocked matrix
// product into scratch, the online softmax row by row (fold_row), then acc += P V as another.
template <typename acc_t>
void forward_kernel(const Operands<acc_t>& op, const at::Tensor& k_tiles, const at::Tensor& k_global_tiles,
                    acc_t* out, acc_t* lse) {
  const GuidanceAttentionShape& shape = op.shape;
  const int64_t dim = shape.head_dim;
  const int64_t blocks = num_query_blocks(shape);
  at::parallel_for(0, shape.batch * shape.heads * blocks, 1, [&](int64_t begin, int64_t end) {
    RowState<acc_t> state(kQueryBlock, dim);
    BlockScratch<acc_t> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks;
      const int64_t q_begin = (task % blocks) * kQueryBlock;
      const int64_t q_end = std::min(shape.len_q, q_begin + kQueryBlock);
      const int64_t rows = q_end - q_begin;
      std::fill(state.max.begin(), state.max.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(state.sum.begin(), state.sum.end(), acc_t(0));
      std::fill(state.acc.begin(), state.acc.end(), acc_t(0));
      // Folds the keys of one tile (transposed in keys_t, value rows from `values`) into every row, each row
      // restricted to its span row_span(i) of the tile (offsets from the tile start, first == last when empty).
      auto fold_tile = [&](const acc_t* keys_t, const acc_t* values, auto row_span) {
        for (int64_t r = 0; r < rows; ++r) std::tie(scratch.first[r], scratch.last[r]) = row_span(q_begin + r);
        const auto [lo, hi] = rows_with_pairs(scratch.first, scratch.last, rows);
        if (lo >= hi) return;
        multiply<acc_t, false>(
            op.q_row(bh, q_begin + lo), dim, 1, hi - lo, keys_t, kKeyTile,
            [&, lo = lo](int64_t r0, int64_t r1) { return scratch.scores_of(lo + r0, lo + r1, dim); },
            scratch.scores.data() + lo * kKeyTile, kKeyTile);
        for (int64_t r = lo; r < hi; ++r) {
          fold_row(scratch.scores.data() + r * kKeyTile, scratch.first[r], scratch.last[r], op.scale, dim,
                   scratch.p.data() + r * kKeyTile, state.max[r], state.sum[r], state.acc.data() + r * dim);
        }
        multiply<acc_t, true>(
            scratch.p.data() + lo * kKeyTile, kKeyTile, 1, hi - lo, values, dim,
            [&, lo = lo](int64_t r0, int64_t r1) { return scratch.sum_over_keys(lo + r0, lo + r1, dim); },
            state.acc.data() + lo * dim, dim);
      };
      if (shape.len_k > 0) {
        // Key tiles aligned to kKeyTile, from the first to the last key the block's band reaches.
        const KeyRange band = guidance_key_range(q_begin, q_end, shape.len_q, shape.len_k, op.window);
        for (int64_t tile = band.first - band.first % kKeyTile; tile <= band.last; tile += kKeyTile) {
          const int64_t tile_end = std::min(shape.len_k, tile + kKeyTile);
          fold_tile(tile_of<acc_t>(k_tiles, bh, tile / kKeyTile), op.v_row(bh, tile),
                    [&](int64_t i) { return span_in_tile(op, i, tile, tile_end); });
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

// The backward of a row of (query, key) pairs from their scores q.k and products dO.v, recomputed from the
// row's saved lse and delta: p = exp(scale q.k - lse) and ds = scale p (dO.v - delta), the gradient of q.k, for
// the row's pairs [first, last); 0 for its other pairs in [0, width), so that block products over whole rows
// add nothing for them.
template <typename acc_t>
inline void pair_grads(const acc_t* q_dot_k, const acc_t* dout_dot_v, acc_t lse, acc_t delta, acc_t scale,
                       int64_t first, int64_t last, int64_t width, acc_t* p, acc_t* ds) {
  using Vec = Vectorized<acc_t>;
  std::fill(p, p + first, acc_t(0));
  std::fill(ds, ds + first, acc_t(0));
  at::vec::map([scale, lse](Vec dot) { return fast_exp(dot * Vec(scale) - Vec(lse)); }, p + first, q_dot_k + first,
               last - first);
  at::vec::map2([scale, delta](Vec pv, Vec dp) { return pv * (dp - Vec(delta)) * Vec(scale); }, ds + first,
                p + first, dout_dot_v + first, last - first);
  std::fill(p + last, p + width, acc_t(0));
  std::fill(ds + last, ds + width, acc_t(0));
}

// delta_i = dO_i . o_i = sum_j p_ij dp_ij, the row term of the softmax backward, summed over the head dim in
// the order of multiply_block's dot products dO . v (one FMA per element, first to last): where a row's
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

// The transposed tiles of kKeyTile keys and values (and global tokens) that both passes read.
struct BackwardTiles {
  at::Tensor k, v, k_global, v_global;
};

// p and ds of the query rows [q_begin, q_begin + rows) against one tile of keys, transposed in keys_t and
// values_t, each row restricted to its span row_span(i) of the tile (offsets from the tile start, first ==
// last when empty): the scores and dO.v products as register-blocked matrix products, then pair_grads. Leaves
// them in scratch and returns the rows [lo, hi) that have keys in the tile.
template <typename acc_t, typename RowSpan>
std::pair<int64_t, int64_t> block_grads(const Operands<acc_t>& op, int64_t bh, int64_t q_begin, int64_t rows,
                                        const acc_t* grad_out, const acc_t* lse, const acc_t* delta,
                                        const acc_t* keys_t, const acc_t* values_t, RowSpan row_span,
                                        BlockScratch<acc_t>& scratch) {
  const int64_t dim = op.shape.head_dim;
  for (int64_t r = 0; r < rows; ++r) std::tie(scratch.first[r], scratch.last[r]) = row_span(q_begin + r);
  const auto [lo, hi] = rows_with_pairs(scratch.first, scratch.last, rows);
  if (lo >= hi) return {lo, hi};
  const int64_t row_begin = bh * op.shape.len_q + q_begin;
  auto scores = [&, lo = lo](int64_t r0, int64_t r1) { return scratch.scores_of(lo + r0, lo + r1, dim); };
  multiply<acc_t, false>(op.q_row(bh, q_begin + lo), dim, 1, hi - lo, keys_t, kKeyTile, scores,
                         scratch.scores.data() + lo * kKeyTile, kKeyTile);
  multiply<acc_t, false>(grad_out + (row_begin + lo) * dim, dim, 1, hi - lo, values_t, kKeyTile, scores,
                         scratch.dout_dot_v.data() + lo * kKeyTile, kKeyTile);
  for (int64_t r = lo; r < hi; ++r) {
    pair_grads(scratch.scores.data() + r * kKeyTile, scratch.dout_dot_v.data() + r * kKeyTile, lse[row_begin + r],
               delta[row_begin + r], op.scale, scratch.first[r], scratch.last[r], kKeyTile,
               scratch.p.data() + r * kKeyTile, scratch.ds.data() + r * kKeyTile);
  }
  return {lo, hi};
}

// dq and this block's share of the global tokens' gradients for query block `block` of group bh: per tile of
// kKeyTile keys, p and ds (block_grads), then dQ += dS K; per chunk of global tokens the same, then
// dK_global += dS^T Q and dV_global += P^T dO into the block's partial. After each local tile with pairs,
// on_tile(tile, tile_end, lo, hi) may use the tile's p and ds, left in scratch for the rows [lo, hi).
template <typename acc_t, typename OnTile>
void query_block_grads(const Operands<acc_t>& op, const BackwardTiles& tiles, int64_t bh, int64_t block,
                       const acc_t* grad_out, const acc_t* lse, const acc_t* delta, acc_t* grad_q, acc_t* partial,
                       BlockScratch<acc_t>& scratch, OnTile on_tile) {
  const GuidanceAttentionShape& shape = op.shape;
  const int64_t dim = shape.head_dim;
  const int64_t q_begin = block * kQueryBlock;
  const int64_t q_end = std::min(shape.len_q, q_begin + kQueryBlock);
  const int64_t rows = q_end - q_begin;
  acc_t* grad_q_block = grad_q + (bh * shape.len_q + q_begin) * dim;
  std::fill(grad_q_block, grad_q_block + rows * dim, acc_t(0));
  // The keys of one tile (transposed in keys_t and values_t, rows from `keys`) for every row restricted to its
  // span row_span(i): adds dS K to dq, leaves p and ds in scratch and returns the rows [lo, hi) with pairs.
  auto visit_tile = [&](const acc_t* keys_t, const acc_t* values_t, const acc_t* keys, auto row_span) {
    const auto [lo, hi] = block_grads(op, bh, q_begin, rows, grad_out, lse, delta, keys_t, values_t, row_span, scratch);
    if (lo < hi) {
      multiply<acc_t, true>(
          scratch.ds.data() + lo * kKeyTile, kKeyTile, 1, hi - lo, keys, dim,
          [&, lo = lo](int64_t r0, int64_t r1) { return scratch.sum_over_keys(lo + r0, lo + r1, dim); },
          grad_q_block + lo * dim, dim);
    }
    return std::pair<int64_t, int64_t>{lo, hi};
  };
  if (shape.len_k > 0) {
    const KeyRange band = guidance_key_range(q_begin, q_end, shape.len_q, shape.len_k, op.window);
    for (int64_t tile = band.first - band.first % kKeyTile; tile <= band.last; tile += kKeyTile) {
      const int64_t tile_end = std::min(shape.len_k, tile + kKeyTile);
      const auto [lo, hi] =
          visit_tile(tile_of<acc_t>(tiles.k, bh, tile / kKeyTile), tile_of<acc_t>(tiles.v, bh, tile / kKeyTile),
                     op.k_row(bh, tile), [&](int64_t i) { return span_in_tile(op, i, tile, tile_end); });
      if (lo < hi) on_tile(tile, tile_end, lo, hi);
    }
  }
  // Every row sees every global token, so the block's share of their gradients sums over all its rows.
  auto all_rows = [rows, dim](int64_t, int64_t) { return BlockRange{0, rows, 0, dim}; };
  for (int64_t chunk = 0; chunk < shape.globals; chunk += kKeyTile) {
    const int64_t count = std::min(kKeyTile, shape.globals - chunk);
    visit_tile(tile_of<acc_t>(tiles.k_global, bh, chunk / kKeyTile), tile_of<acc_t>(tiles.v_global, bh, chunk / kKeyTile),
               op.kg_row(bh, chunk), [count](int64_t) { return std::pair<int64_t, int64_t>{0, count}; });
    multiply<acc_t, true>(scratch.ds.data(), 1, kKeyTile, count, op.q_row(bh, q_begin), dim, all_rows,
                          partial + chunk * dim, dim);
    multiply<acc_t, true>(scratch.p.data(), 1, kKeyTile, count, grad_out + (bh * shape.len_q + q_begin) * dim, dim,
                          all_rows, partial + (shape.globals + chunk) * dim, dim);
  }
}

// The queries that see each key of [k_begin, k_end), into seen_by.
template <typename acc_t>
void queries_seeing(const Operands<acc_t>& op, int64_t k_begin, int64_t k_end, std::vector<KeyRange>& seen_by) {
  for (int64_t j = k_begin; j < k_end; ++j) {
    seen_by[j - k_begin] = guidance_query_range(j, j + 1, op.shape.len_q, op.shape.len_k, op.window);
  }
}

// dK += dS^T Q and dV += P^T dO for `keys` keys (rows of grad_k_block, grad_v_block) from the p and ds that
// block_grads left in scratch for the query tile starting at `tile`, rows [lo, hi); each key sums over exactly
// the queries that see it (seen_by, an interval by the monotone centres).
template <typename acc_t>
void add_key_grads(const Operands<acc_t>& op, int64_t bh, int64_t tile, int64_t keys,
                   const std::vector<KeyRange>& seen_by, int64_t lo, int64_t hi, const acc_t* grad_out,
                   BlockScratch<acc_t>& scratch, acc_t* grad_k_block, acc_t* grad_v_block) {
  const int64_t dim = op.shape.head_dim;
  for (int64_t r = 0; r < keys; ++r) {
    scratch.key_first[r] = std::clamp(seen_by[r].first - tile, lo, hi);
    scratch.key_last[r] = std::clamp(seen_by[r].last + 1 - tile, scratch.key_first[r], hi);
  }
  const auto [key_lo, key_hi] = rows_with_pairs(scratch.key_first, scratch.key_last, keys);
  auto gradients = [&, key_lo = key_lo](int64_t r0, int64_t r1) {
    return scratch.sum_over_queries(key_lo + r0, key_lo + r1, dim);
  };
  multiply<acc_t, true>(scratch.ds.data() + key_lo, 1, kKeyTile, key_hi - key_lo, op.q_row(bh, tile), dim, gradients,
                        grad_k_block + key_lo * dim, dim);
  multiply<acc_t, true>(scratch.p.data() + key_lo, 1, kKeyTile, key_hi - key_lo,
                        grad_out + (bh * op.shape.len_q + tile) * dim, dim, gradients, grad_v_block + key_lo * dim, dim);
}

// The global tokens' partial of query block `block` of group bh (nullptr without global tokens).
template <typename acc_t>
acc_t* partial_of(const Operands<acc_t>& op, acc_t* global_partial, int64_t bh, int64_t block) {
  if (global_partial == nullptr) return nullptr;
  return global_partial + (bh * num_query_blocks(op.shape) + block) * 2 * op.shape.globals * op.shape.head_dim;
}

// The query pass: dq and the global partials, one task per (batch, head, query block).
template <typename acc_t>
void backward_query_kernel(const Operands<acc_t>& op, const BackwardTiles& tiles, const acc_t* grad_out,
                           const acc_t* lse, const acc_t* delta, acc_t* grad_q, acc_t* global_partial) {
  const int64_t blocks = num_query_blocks(op.shape);
  at::parallel_for(0, op.shape.batch * op.shape.heads * blocks, 1, [&](int64_t begin, int64_t end) {
    BlockScratch<acc_t> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, block = task % blocks;
      query_block_grads(op, tiles, bh, block, grad_out, lse, delta, grad_q, partial_of(op, global_partial, bh, block),
                        scratch, [](int64_t, int64_t, int64_t, int64_t) {});
    }
  });
}

// The key pass: dk and dv, one task per (batch, head, block of kKeyTile keys), recomputing p and ds of the
// query tiles whose band reaches the block (block_grads, in increasing query order).
template <typename acc_t>
void backward_key_kernel(const Operands<acc_t>& op, const BackwardTiles& tiles, const acc_t* grad_out,
                         const acc_t* lse, const acc_t* delta, acc_t* grad_k, acc_t* grad_v) {
  const GuidanceAttentionShape& shape = op.shape;
  const int64_t dim = shape.head_dim;
  const int64_t blocks = (shape.len_k + kKeyTile - 1) / kKeyTile;
  at::parallel_for(0, shape.batch * shape.heads * blocks, 1, [&](int64_t begin, int64_t end) {
    BlockScratch<acc_t> scratch;
    std::vector<KeyRange> seen_by(kKeyTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks;
      const int64_t k_begin = (task % blocks) * kKeyTile;
      const int64_t k_end = std::min(shape.len_k, k_begin + kKeyTile);
      const int64_t keys = k_end - k_begin;
      const acc_t* keys_t = tile_of<acc_t>(tiles.k, bh, task % blocks);
      const acc_t* values_t = tile_of<acc_t>(tiles.v, bh, task % blocks);
      acc_t* grad_k_block = grad_k + (bh * shape.len_k + k_begin) * dim;
      acc_t* grad_v_block = grad_v + (bh * shape.len_k + k_begin) * dim;
      std::fill(grad_k_block, grad_k_block + keys * dim, acc_t(0));
      std::fill(grad_v_block, grad_v_block + keys * dim, acc_t(0));
      const KeyRange queries = guidance_query_range(k_begin, k_end, shape.len_q, shape.len_k, op.window);
      if (queries.first > queries.last) continue;
      queries_seeing(op, k_begin, k_end, seen_by);
      for (int64_t tile = queries.first - queries.first % kQueryBlock; tile <= queries.last; tile += kQueryBlock) {
        const int64_t tile_end = std::min(shape.len_q, tile + kQueryBlock);
        const auto [lo, hi] = block_grads(op, bh, tile, tile_end - tile, grad_out, lse, delta, keys_t, values_t,
                                          [&](int64_t i) { return span_in_tile(op, i, k_begin, k_end); }, scratch);
        if (lo < hi) add_key_grads(op, bh, tile, keys, seen_by, lo, hi, grad_out, scratch, grad_k_block, grad_v_block);
      }
    }
  });
}

// dq, dk, dv and the global partials in one pass, one task per (batch, head): the query pass, each of its
// (query block x key tile) blocks also adding its dS^T Q and P^T dO to the tile's keys. Half the score and
// dO.v products of the two passes, but only B x H tasks. Every term is added in the same order as in the
// two passes (each key's over the query tiles in increasing order, through the same block_grads and
// add_key_grads), so the gradients have the same bits whichever runs.
template <typename acc_t>
void backward_fused_kernel(const Operands<acc_t>& op, const BackwardTiles& tiles, const acc_t* grad_out,
                           const acc_t* lse, const acc_t* delta, acc_t* grad_q, acc_t* grad_k, acc_t* grad_v,
                           acc_t* global_partial) {
  const GuidanceAttentionShape& shape = op.shape;
  const int64_t dim = shape.head_dim;
  at::parallel_for(0, shape.batch * shape.heads, 1, [&](int64_t begin, int64_t end) {
    BlockScratch<acc_t> scratch;
    std::vector<KeyRange> seen_by(kKeyTile);
    for (int64_t bh = begin; bh < end; ++bh) {
      acc_t* grad_k_group = grad_k + bh * shape.len_k * dim;
      acc_t* grad_v_group = grad_v + bh * shape.len_k * dim;
      std::fill(grad_k_group, grad_k_group + shape.len_k * dim, acc_t(0));
      std::fill(grad_v_group, grad_v_group + shape.len_k * dim, acc_t(0));
      for (int64_t block = 0; block < num_query_blocks(shape); ++block) {
        query_block_grads(op, tiles, bh, block, grad_out, lse, delta, grad_q, partial_of(op, global_partial, bh, block),
                          scratch, [&](int64_t tile, int64_t tile_end, int64_t lo, int64_t hi) {
                            queries_seeing(op, tile, tile_end, seen_by);
                            add_key_grads(op, bh, block * kQueryBlock, tile_end - tile, seen_by, lo, hi, grad_out,
                                          scratch, grad_k_group + tile * dim, grad_v_group + tile * dim);
                          });
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
                          at::Tensor(), at::Tensor()};
      if (k_global.has_value()) {
        tiles.k_global = transposed_tiles<scalar_t, kKeyTile>(in.k_global);
        tiles.v_global = transposed_tiles<scalar_t, kKeyTile>(in.v_global);
      }
      const scalar_t* dout_p = grad_out.data_ptr<scalar_t>();
      const scalar_t* lse_p = lse.data_ptr<scalar_t>();
      scalar_t* delta_p = delta.data_ptr<scalar_t>();
      row_deltas(dout_p, out.data_ptr<scalar_t>(), groups * shape.len_q, shape.head_dim, delta_p);
      scalar_t* partial_p = global_partial.defined() ? global_partial.data_ptr<scalar_t>() : nullptr;
      // One pass when the (batch, head) pairs alone keep every thread busy (two tasks each or more); the same
      // bits either way.
      if (groups >= 2 * at::get_num_threads()) {
        backward_fused_kernel<scalar_t>(op, tiles, dout_p, lse_p, delta_p, grad_q.data_ptr<scalar_t>(),
                                        grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), partial_p);
      } else {
        backward_query_kernel<scalar_t>(op, tiles, dout_p, lse_p, delta_p, grad_q.data_ptr<scalar_t>(), partial_p);
        backward_key_kernel<scalar_t>(op, tiles, dout_p, lse_p, delta_p, grad_k.data_ptr<scalar_t>(),
                                      grad_v.data_ptr<scalar_t>());
      }
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
