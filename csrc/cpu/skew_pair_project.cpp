// skew_pair_project on the CPU.
//
// A shared weight (F, E) is used by all 2P products, so they go through as few GEMM calls as possible:
// each call of a BLAS GEMM packs its weight operand again (7 MB for 2304 x 768 in fp32), which dominates
// when N is small (measured: one GEMM per pair ran at half the eager loop's speed for N = 32, P = 6). The
// rows ha[i_k] of all pairs are read as one virtual (P N, E) matrix in row tiles of at most kTileBytes
// (one pair per tile from kInPlaceRows samples on): a tile whose rows lie consecutively in the stack is a
// view of it; any other tile is gathered into a workspace of that size (never the whole (P, N, E)
// gather). One GEMM per tile writes the tile's rows of the output. The backward works the same way on
// the layers in use: per tile, the sum over a layer's pairs of their output gradients (added in pair
// order), one GEMM for d_h of those layers and one for their term of d_weight, which adds the tiles in
// order, so the gradients are the same bits on every run (no floating-point atomics). Each GEMM runs as
// single-threaded GEMMs on blocks of columns, one per thread (see gemm_by_columns).
//
// Weights per pair (P, F, E) need one GEMM per pair anyway: those run as single-threaded GEMMs on views
// of the stacks inside one at::parallel_for over (pair, side, row block) tasks, so that a few pairs of a
// small batch still keep every thread busy. Their backward groups the pairs by layer (a stable counting
// sort: pairs of one layer keep their order k) and adds the contributions of a layer's pairs one after
// another in that order; no reduction is split across threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../skew_pair_project.h"

namespace stepfusion {
namespace {

// Rows of one task; smaller blocks would spend more time in GEMM call overhead than they gain.
constexpr int64_t kMinBlockRows = 64;
// Workspace of one row tile of the shared-weight path: large enough that a GEMM call's packing of the
// weight is spread over hundreds of rows, small next to the outputs and the weight's gradient.
constexpr int64_t kTileBytes = int64_t{2} << 20;
// Samples per pair from which the forward reads each pair's rows in place instead of gathering tiles.
constexpr int64_t kInPlaceRows = 256;

// Splits `rows` into blocks so that `units` x blocks is at least the number of threads.
int64_t block_rows_for(int64_t rows, int64_t units) {
  const int64_t threads = at::get_num_threads();
  const int64_t blocks_wanted = std::max<int64_t>(1, (threads + units - 1) / std::max<int64_t>(units, 1));
  const int64_t block = (rows + blocks_wanted - 1) / blocks_wanted;
  return std::max<int64_t>(std::min(rows, kMinBlockRows), std::max<int64_t>(block, 1));
}

// Rows of a tile whose rows take `row_bytes` of workspace in all.
int64_t tile_rows_for(int64_t rows, int64_t row_bytes) {
  return std::min(rows, std::max(kMinBlockRows, kTileBytes / std::max<int64_t>(row_bytes, 1)));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs body(unit, first row, rows) over units x blocks of `rows` (blocks from block_rows_for) inside one
// at::parallel_for, with autograd below the op in every worker; task t is unit t / blocks, block t % blocks.
template <typename Body>
void parallel_over_row_blocks(int64_t units, int64_t rows, Body body) {
  const int64_t block = block_rows_for(rows, units);
  const int64_t blocks = ceil_div(rows, block);
  at::parallel_for(0, units * blocks, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set in every worker
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = (task % blocks) * block;
      body(task / blocks, first, std::min(block, rows - first));
    }
  });
}

void check_cpu_dtype(const at::Tensor& ha) {
  const auto t = ha.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
              "skew_pair_project (cpu backend): ha must be float32, float64 or bfloat16, got ", t);
}

// The weight (F, E) and bias (F,) (undefined when absent) used by pair k on one side.
struct SideParams {
  at::Tensor weight;
  at::Tensor bias;
  bool per_pair;
  at::Tensor weight_of(int64_t k) const { return per_pair ? weight.select(0, k) : weight; }
  at::Tensor bias_of(int64_t k) const {
    if (!bias.defined()) return bias;
    return per_pair ? bias.select(0, k) : bias;
  }
};

std::pair<SideParams, SideParams> side_params(const at::Tensor& weight_a, const std::optional<at::Tensor>& bias_a,
                                              const std::optional<at::Tensor>& weight_b,
                                              const std::optional<at::Tensor>& bias_b, bool per_pair) {
  SideParams a{weight_a.contiguous(), bias_a.has_value() ? bias_a->contiguous() : at::Tensor(), per_pair};
  if (!weight_b.has_value()) return {a, a};
  SideParams b{weight_b->contiguous(), bias_b.has_value() ? bias_b->contiguous() : at::Tensor(), per_pair};
  return {a, b};
}

std::vector<int64_t> pair_indices(const at::Tensor& pairs) {
  const at::Tensor flat = pairs.contiguous();
  const int64_t* p = flat.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + flat.numel());
}

// A virtual matrix of slots.size() x N rows whose slot s is the (N, width) block slots[s] of a contiguous
// (L N, width) matrix `rows_of`: the layers of the pairs (forward) or the layers in use (backward).
struct SlotRows {
  at::Tensor rows_of;
  std::vector<int64_t> slots;
  int64_t samples;

  // Calls body(slot, first sample, samples, row in tile) over the runs of one slot in rows [begin, end).
  template <typename Body>
  void for_each_run(int64_t begin, int64_t end, Body body) const {
    for (int64_t row = begin; row < end;) {
      const int64_t slot = row / samples, sample = row % samples;
      const int64_t count = std::min(samples - sample, end - row);
      body(slots[slot], sample, count, row - begin);
      row += count;
    }
  }

  // Rows [begin, end) as a view of `rows_of` when they lie there one after another, else undefined.
  at::Tensor view(int64_t begin, int64_t end) const {
    const int64_t first = begin / samples, last = (end - 1) / samples;
    for (int64_t slot = first; slot < last; ++slot)
      if (slots[slot + 1] != slots[slot] + 1) return at::Tensor();
    return rows_of.narrow(0, slots[first] * samples + begin % samples, end - begin);
  }

  // Rows [begin, end) copied into the first rows of `workspace` (same dtype and width), or their view.
  at::Tensor read(int64_t begin, int64_t end, const at::Tensor& workspace) const {
    const at::Tensor in_place = view(begin, end);
    if (in_place.defined()) return in_place;
    const at::Tensor tile = workspace.narrow(0, 0, end - begin);
    const int64_t row_bytes = rows_of.size(1) * rows_of.element_size();
    if (row_bytes == 0) return tile;  // E = 0: no data, and memcpy must not see the null pointers
    const char* source = static_cast<const char*>(rows_of.const_data_ptr());
    char* target = static_cast<char*>(tile.data_ptr());
    for_each_run(begin, end, [&](int64_t layer, int64_t sample, int64_t count, int64_t tile_row) {
      std::memcpy(target + tile_row * row_bytes, source + (layer * samples + sample) * row_bytes, count * row_bytes);
    });
    return tile;
  }

  // Writes rows [begin, end) of the virtual matrix, held in the first rows of `tile`, to their rows in `rows_of`.
  void write(int64_t begin, int64_t end, const at::Tensor& tile) const {
    const int64_t row_bytes = rows_of.size(1) * rows_of.element_size();
    const char* source = static_cast<const char*>(tile.const_data_ptr());
    char* target = static_cast<char*>(rows_of.data_ptr());
    for_each_run(begin, end, [&](int64_t layer, int64_t sample, int64_t count, int64_t tile_row) {
      std::memcpy(target + (layer * samples + sample) * row_bytes, source + tile_row * row_bytes, count * row_bytes);
    });
  }
};

// out = a @ b on the first product of a sum, out += a @ b on the next ones.
void accumulate_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// out = a @ b (+ bias), or out += a @ b when accumulating, as one single-threaded GEMM per block of
// columns of b and out inside at::parallel_for: each thread packs only its columns of b, so one call
// packs the weight once in all, and no GEMM waits at a barrier for a thread that a busy machine has
// descheduled, as the BLAS library's own threads do (measured: slower than this under load).
void gemm_by_columns(at::Tensor out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                     bool accumulate) {
  parallel_over_row_blocks(1, out.size(1), [&](int64_t, int64_t first, int64_t count) {
    at::Tensor out_block = out.narrow(1, first, count);
    const at::Tensor b_block = b.narrow(1, first, count);
    if (bias.defined()) {
      at::addmm_out(out_block, bias.narrow(0, first, count), a, b_block);
    } else {
      accumulate_product(out_block, a, b_block, accumulate);
    }
  });
}

// A contiguous (L, N, width) stack as an (L N, width) matrix (also for width 0).
at::Tensor as_rows(const at::Tensor& stack) { return stack.view({stack.size(0) * stack.size(1), stack.size(2)}); }

// out = x @ weight.T (+ bias) for the row tiles of a shared weight.
void project_shared(const at::Tensor& stack, const std::vector<int64_t>& layers, const SideParams& params,
                    const at::Tensor& out) {
  const int64_t samples = stack.size(1), in_f = stack.size(2);
  const SlotRows x{as_rows(stack), layers, samples};
  const at::Tensor out_rows = as_rows(out);
  const int64_t rows = out_rows.size(0);
  // From kInPlaceRows samples on, one pair's rows spread the weight's packing well enough: a tile per
  // pair, read in place, costs less than gathering several pairs.
  const int64_t tile = samples >= kInPlaceRows ? samples : tile_rows_for(rows, in_f * stack.element_size());
  const at::Tensor weight_t = params.weight.t();
  // Only tiles that are not views of the stack need it; P = 1 and runs of consecutive layers never do.
  at::Tensor workspace;
  for (int64_t begin = 0; begin < rows; begin += tile) {
    const int64_t end = std::min(rows, begin + tile);
    if (!workspace.defined() && !x.view(begin, end).defined()) workspace = at::empty({tile, in_f}, stack.options());
    const at::Tensor x_tile = x.read(begin, end, workspace);
    gemm_by_columns(out_rows.narrow(0, begin, end - begin), x_tile, weight_t, params.bias, false);
  }
}

// Per-pair weights: tasks over (pair, side, row block), each one single-threaded GEMM on views.
void project_per_pair(const at::Tensor (&stacks)[2], const std::vector<int64_t>& index,
                      const SideParams* const (&params)[2], at::Tensor (&outputs)[2], int64_t num_pairs,
                      int64_t samples) {
  // Unit u = k * 2 + side.
  parallel_over_row_blocks(2 * num_pairs, samples, [&](int64_t unit, int64_t row_begin, int64_t rows) {
    const int64_t side = unit % 2, k = unit / 2;
    const at::Tensor x = stacks[side].select(0, index[2 * k + side]).narrow(0, row_begin, rows);
    at::Tensor out = outputs[side].select(0, k).narrow(0, row_begin, rows);
    const at::Tensor weight_t = params[side]->weight_of(k).t();
    const at::Tensor bias = params[side]->bias_of(k);
    if (bias.defined()) {
      at::addmm_out(out, bias, x, weight_t);
    } else {
      at::mm_out(out, x, weight_t);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> skew_pair_project_cpu(const at::Tensor& ha_in, const at::Tensor& hb_in,
                                                         const at::Tensor& pairs, const at::Tensor& weight_a,
                                                         const std::optional<at::Tensor>& bias_a,
                                                         const std::optional<at::Tensor>& weight_b,
                                                         const std::optional<at::Tensor>& bias_b) {
  const SkewPairProjectShape shape = check_skew_pair_project(ha_in, hb_in, pairs, weight_a, bias_a, weight_b, bias_b);
  // The inner at:: calls are plain kernels: autograd is handled once around the whole op.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_cpu_dtype(ha_in);
  const at::Tensor stacks[2] = {ha_in.contiguous(), hb_in.contiguous()};
  const auto [params_a, params_b] = side_params(weight_a, bias_a, weight_b, bias_b, shape.per_pair);
  const SideParams* const params[2] = {&params_a, &params_b};
  at::Tensor outputs[2] = {at::empty({shape.pairs, shape.samples, shape.out_features}, ha_in.options()),
                           at::empty({shape.pairs, shape.samples, shape.out_features}, ha_in.options())};
  if (shape.pairs == 0 || shape.samples == 0 || shape.out_features == 0) return {outputs[0], outputs[1]};

  const std::vector<int64_t> index = pair_indices(pairs);
  if (shape.per_pair) {
    project_per_pair(stacks, index, params, outputs, shape.pairs, shape.samples);
  } else {
    for (int side = 0; side < 2; ++side) {
      std::vector<int64_t> layers(shape.pairs);
      for (int64_t k = 0; k < shape.pairs; ++k) layers[k] = index[2 * k + side];
      project_shared(stacks[side], layers, *params[side], outputs[side]);
    }
  }
  return {outputs[0], outputs[1]};
}

// The pairs of every layer of one side, grouped by layer in the order k (a stable counting sort).
struct LayerSegments {
  std::vector<int64_t> offsets;  // layer l owns order[offsets[l] .. offsets[l + 1])
  std::vector<int64_t> order;    // pair indices k
  std::vector<int64_t> used;     // the layers hit by at least one pair, ascending
};

LayerSegments segments_of(const std::vector<int64_t>& index, int64_t side, int64_t layers) {
  const int64_t num_pairs = static_cast<int64_t>(index.size()) / 2;
  LayerSegments seg;
  seg.offsets.assign(layers + 1, 0);
  for (int64_t k = 0; k < num_pairs; ++k) ++seg.offsets[index[2 * k + side] + 1];
  for (int64_t l = 0; l < layers; ++l) seg.offsets[l + 1] += seg.offsets[l];
  seg.order.resize(num_pairs);
  std::vector<int64_t> cursor(seg.offsets.begin(), seg.offsets.end() - 1);
  for (int64_t k = 0; k < num_pairs; ++k) seg.order[cursor[index[2 * k + side]]++] = k;
  for (int64_t l = 0; l < layers; ++l)
    if (seg.offsets[l + 1] > seg.offsets[l]) seg.used.push_back(l);
  return seg;
}

// One side of the backward with a shared weight, over row tiles of the layers in use: per tile, the
// summed output gradients g of its layers (N rows a layer), d_h = g @ weight, and d_weight (+)= g.T @ h.
void backward_shared_side(const at::Tensor& stack, const at::Tensor& grad, const LayerSegments& seg,
                          const at::Tensor& weight, const at::Tensor& grad_stack, at::Tensor& grad_weight,
                          bool& grad_weight_written) {
  const int64_t samples = stack.size(1), in_f = stack.size(2), out_f = grad.size(2);
  const SlotRows h{as_rows(stack), seg.used, samples};
  const SlotRows d_h{as_rows(grad_stack), seg.used, samples};
  const int64_t rows = static_cast<int64_t>(seg.used.size()) * samples;
  const at::ScalarType dtype = stack.scalar_type();
  const at::ScalarType acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t tile = tile_rows_for(rows, (out_f + in_f) * stack.element_size());
  const at::Tensor grad_tile_space = at::empty({tile, out_f}, stack.options());
  // Holds d_h of a tile that is no view of grad_stack, then h of a tile that is no view of the stack.
  const at::Tensor rows_space = at::empty({tile, in_f}, stack.options());
  // bf16 sums over several pairs are added in fp32 and rounded once.
  const at::Tensor sum_space =
      dtype == acc_type ? at::Tensor() : at::empty({samples, out_f}, stack.options().dtype(acc_type));
  for (int64_t begin = 0; begin < rows; begin += tile) {
    const int64_t end = std::min(rows, begin + tile);
    const at::Tensor grad_tile = grad_tile_space.narrow(0, 0, end - begin);
    h.for_each_run(begin, end, [&](int64_t layer, int64_t sample, int64_t count, int64_t tile_row) {
      at::Tensor target = grad_tile.narrow(0, tile_row, count);
      const int64_t first = seg.offsets[layer], last = seg.offsets[layer + 1];
      at::Tensor sum = last - first > 1 && sum_space.defined() ? sum_space.narrow(0, 0, count) : target;
      for (int64_t s = first; s < last; ++s) {
        const at::Tensor g = grad.select(0, seg.order[s]).narrow(0, sample, count);
        if (s == first) {
          sum.copy_(g);
        } else {
          sum.add_(g);
        }
      }
      if (!sum.is_same(target)) target.copy_(sum);
    });
    const at::Tensor d_h_view = d_h.view(begin, end);
    gemm_by_columns(d_h_view.defined() ? d_h_view : rows_space.narrow(0, 0, end - begin), grad_tile, weight,
                    at::Tensor(), false);
    if (!d_h_view.defined()) d_h.write(begin, end, rows_space);
    gemm_by_columns(grad_weight, grad_tile.t(), h.read(begin, end, rows_space), at::Tensor(), grad_weight_written);
    grad_weight_written = true;
  }
}

// Per-pair weights: d_h over (side, used layer, row block) tasks, d_weight over (weight, pair, F block).
void backward_per_pair(const at::Tensor (&stacks)[2], const at::Tensor (&grads)[2], const LayerSegments (&segs)[2],
                       const std::vector<int64_t>& index, const SideParams* const (&params)[2], bool shared,
                       at::Tensor (&grad_stacks)[2], at::Tensor (&grad_weights)[2]) {
  const int64_t rows = stacks[0].size(1), out_f = grads[0].size(2);
  const int64_t num_pairs = static_cast<int64_t>(index.size()) / 2;
  for (int side = 0; side < 2; ++side) {
    const LayerSegments& seg = segs[side];
    const int64_t used = static_cast<int64_t>(seg.used.size());
    parallel_over_row_blocks(used, rows, [&](int64_t u, int64_t row_begin, int64_t n) {
      const int64_t l = seg.used[u];
      at::Tensor out = grad_stacks[side].select(0, l).narrow(0, row_begin, n);
      for (int64_t s = seg.offsets[l]; s < seg.offsets[l + 1]; ++s) {
        const int64_t k = seg.order[s];
        const at::Tensor g = grads[side].select(0, k).narrow(0, row_begin, n);
        accumulate_product(out, g, params[side]->weight_of(k), s > seg.offsets[l]);
      }
    });
  }

  // grad[k].T @ h[i_k] (+ the B side when B shares the weights); every task owns its rows of the result.
  const int weights = shared ? 1 : 2;
  parallel_over_row_blocks(weights * num_pairs, out_f, [&](int64_t unit, int64_t f_begin, int64_t f) {
    const int w = static_cast<int>(unit / num_pairs);
    const int64_t k = unit % num_pairs;
    at::Tensor out = grad_weights[w].select(0, k).narrow(0, f_begin, f);
    // The sides feeding weight w: A (and B when shared) for w = 0, B for w = 1.
    const int first_side = w, last_side = shared ? 1 : w;
    for (int side = first_side; side <= last_side; ++side) {
      const at::Tensor g = grads[side].select(0, k).narrow(1, f_begin, f).t();
      const at::Tensor x = stacks[side].select(0, index[2 * k + side]);
      accumulate_product(out, g, x, side > first_side);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> skew_pair_project_backward_cpu(
    const at::Tensor& grad_pa_in, const at::Tensor& grad_pb_in, const at::Tensor& ha_in, const at::Tensor& hb_in,
    const at::Tensor& pairs, const at::Tensor& weight_a, const std::optional<at::Tensor>& bias_a,
    const std::optional<at::Tensor>& weight_b, const std::optional<at::Tensor>& bias_b) {
  const SkewPairProjectShape shape = check_skew_pair_project(ha_in, hb_in, pairs, weight_a, bias_a, weight_b, bias_b);
  // The inner at:: calls are plain kernels: autograd is handled once around the whole op.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_skew_pair_project_grads(grad_pa_in, grad_pb_in, ha_in, shape);
  check_cpu_dtype(ha_in);
  const bool shared = !weight_b.has_value();
  const at::Tensor stacks[2] = {ha_in.contiguous(), hb_in.contiguous()};
  const at::Tensor grads[2] = {grad_pa_in.contiguous(), grad_pb_in.contiguous()};
  const auto [params_a, params_b] = side_params(weight_a, bias_a, weight_b, bias_b, shape.per_pair);
  const SideParams* const params[2] = {&params_a, &params_b};
  const auto options = ha_in.options();
  const at::ScalarType acc_type = ha_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  at::Tensor grad_stacks[2] = {at::zeros(stacks[0].sizes(), options), at::zeros(stacks[1].sizes(), options)};
  at::Tensor grad_weights[2] = {at::zeros(weight_a.sizes(), options),
                                shared ? at::empty({0}, options) : at::zeros(weight_a.sizes(), options)};
  const bool has_bias[2] = {bias_a.has_value(), bias_b.has_value()};
  const std::vector<int64_t> index = pair_indices(pairs);
  if (shape.pairs > 0 && shape.samples > 0 && shape.in_features > 0 && shape.out_features > 0) {
    const LayerSegments segs[2] = {segments_of(index, 0, shape.layers_a), segments_of(index, 1, shape.layers_b)};
    if (shape.per_pair) {
      backward_per_pair(stacks, grads, segs, index, params, shared, grad_stacks, grad_weights);
    } else {
      bool written[2] = {false, false};
      for (int side = 0; side < 2; ++side) {
        const int w = shared ? 0 : side;
        backward_shared_side(stacks[side], grads[side], segs[side], params[side]->weight, grad_stacks[side],
                             grad_weights[w], written[w]);
      }
    }
  }

  // d_bias: sums over rows (and pairs when shared) of the output gradients, accumulated in acc_type.
  const std::vector<int64_t> bias_dims = shape.per_pair ? std::vector<int64_t>{1} : std::vector<int64_t>{0, 1};
  auto bias_grad = [&](int w) -> at::Tensor {
    if (!has_bias[w]) return at::empty({0}, options);
    at::Tensor total = grads[w].sum(bias_dims, /*keepdim=*/false, acc_type);
    if (shared) total.add_(grads[1].sum(bias_dims, /*keepdim=*/false, acc_type));
    return total.to(ha_in.scalar_type());
  };
  return {grad_stacks[0], grad_stacks[1], grad_weights[0], bias_grad(0), grad_weights[1],
          shared ? at::empty({0}, options) : bias_grad(1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(stepfusion, CPU, m) {
  m.impl("skew_pair_project", &skew_pair_project_cpu);
  m.impl("skew_pair_project_backward", &skew_pair_project_backward_cpu);
}

}  // namespace stepfusion
