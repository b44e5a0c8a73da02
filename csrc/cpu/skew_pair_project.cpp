// skew_pair_project on the CPU: per-pair GEMMs on views of the layer stacks (ha[i_k] is read in
// place, never gathered), scheduled by one at::parallel_for over (pair, side, row block) tasks so
// that a few pairs of a small batch still keep every thread busy. Inside the parallel region each
// at::mm runs single-threaded, so a task's result does not depend on the number of threads.
//
// The backward groups the pairs by layer (a stable counting sort: pairs of one layer keep their
// order k) and adds the contributions of a layer's pairs one after another in that order, so the
// gradients are bitwise reproducible; no floating-point atomics, no reduction split across threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../skew_pair_project.h"

namespace stepfusion {
namespace {

// Rows of one task; smaller blocks would spend more time in GEMM call overhead than they gain.
constexpr int64_t kMinBlockRows = 64;

// Splits `rows` into blocks so that `units` x blocks is at least the number of threads.
int64_t block_rows_for(int64_t rows, int64_t units) {
  const int64_t threads = at::get_num_threads();
  const int64_t blocks_wanted = std::max<int64_t>(1, (threads + units - 1) / std::max<int64_t>(units, 1));
  const int64_t block = (rows + blocks_wanted - 1) / blocks_wanted;
  return std::max<int64_t>(std::min(rows, kMinBlockRows), std::max<int64_t>(block, 1));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
  const SideParams* params[2] = {&params_a, &params_b};
  at::Tensor outputs[2] = {at::empty({shape.pairs, shape.samples, shape.out_features}, ha_in.options()),
                           at::empty({shape.pairs, shape.samples, shape.out_features}, ha_in.options())};
  if (shape.pairs == 0 || shape.samples == 0 || shape.out_features == 0) return {outputs[0], outputs[1]};

  const std::vector<int64_t> index = pair_indices(pairs);
  const int64_t block = block_rows_for(shape.samples, 2 * shape.pairs);
  const int64_t blocks = ceil_div(shape.samples, block);
  // Task t = ((k * 2) + side) * blocks + row block.
  at::parallel_for(0, 2 * shape.pairs * blocks, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set in every worker
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row_block = task % blocks, side = (task / blocks) % 2, k = task / (2 * blocks);
      const int64_t row_begin = row_block * block, rows = std::min(block, shape.samples - row_begin);
      const at::Tensor x = stacks[side].select(0, index[2 * k + side]).narrow(0, row_begin, rows);
      at::Tensor out = outputs[side].select(0, k).narrow(0, row_begin, rows);
      const at::Tensor weight_t = params[side]->weight_of(k).t();
      const at::Tensor bias = params[side]->bias_of(k);
      if (bias.defined()) {
        at::addmm_out(out, bias, x, weight_t);
      } else {
        at::mm_out(out, x, weight_t);
      }
    }
  });
  return {outputs[0], outputs[1]};
}

// out = a @ b on the first product of a sum, out += a @ b on the next ones.
void accumulate_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
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
  const SideParams* params[2] = {&params_a, &params_b};
  const int64_t layers[2] = {shape.layers_a, shape.layers_b};
  const int64_t rows = shape.samples, in_f = shape.in_features, out_f = shape.out_features;
  const auto options = ha_in.options();
  const at::ScalarType acc_type = ha_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  at::Tensor grad_stacks[2] = {at::zeros(stacks[0].sizes(), options), at::zeros(stacks[1].sizes(), options)};
  at::Tensor grad_weights[2] = {at::zeros(weight_a.sizes(), options),
                                shared ? at::empty({0}, options) : at::zeros(weight_a.sizes(), options)};
  const bool has_bias[2] = {bias_a.has_value(), bias_b.has_value()};
  const std::vector<int64_t> index = pair_indices(pairs);
  const int64_t num_pairs = shape.pairs;
  const bool work = num_pairs > 0 && rows > 0 && in_f > 0 && out_f > 0;

  // Per side and used layer u: the sum of the output gradients of the layer's pairs, (N, F), added in
  // pair order into an acc_type buffer; a layer with one pair uses that pair's gradient in place. With
  // one shared weight these sums are all that d_h and d_weight need.
  LayerSegments segs[2] = {segments_of(index, 0, layers[0]), segments_of(index, 1, layers[1])};
  std::vector<at::Tensor> layer_grads[2];
  if (!shape.per_pair && work) {
    for (int side = 0; side < 2; ++side) {
      const LayerSegments& seg = segs[side];
      const int64_t used = static_cast<int64_t>(seg.used.size());
      std::vector<int64_t> summed;  // the used layers (as u) that have several pairs
      for (int64_t u = 0; u < used; ++u) {
        const int64_t l = seg.used[u];
        if (seg.offsets[l + 1] - seg.offsets[l] == 1) {
          layer_grads[side].push_back(grads[side].select(0, seg.order[seg.offsets[l]]));
        } else {
          layer_grads[side].push_back(at::empty({rows, out_f}, options.dtype(acc_type)));
          summed.push_back(u);
        }
      }
      const int64_t units = static_cast<int64_t>(summed.size());
      const int64_t block = block_rows_for(rows, units);
      const int64_t blocks = ceil_div(rows, block);
      at::parallel_for(0, units * blocks, 1, [&](int64_t begin, int64_t end) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set in every worker
        for (int64_t task = begin; task < end; ++task) {
          const int64_t u = summed[task / blocks], row_begin = (task % blocks) * block;
          const int64_t n = std::min(block, rows - row_begin);
          const int64_t l = seg.used[u];
          at::Tensor sum = layer_grads[side][u].narrow(0, row_begin, n);
          for (int64_t s = seg.offsets[l]; s < seg.offsets[l + 1]; ++s) {
            const at::Tensor g = grads[side].select(0, seg.order[s]).narrow(0, row_begin, n);
            if (s == seg.offsets[l]) {
              sum.copy_(g);
            } else {
              sum.add_(g);
            }
          }
        }
      });
    }
  }

  if (work) {
    // d_h[l] = sum over the pairs k of layer l of grad[k] @ weight(k): tasks over (side, used layer, row block).
    for (int side = 0; side < 2; ++side) {
      const LayerSegments& seg = segs[side];
      const int64_t used = static_cast<int64_t>(seg.used.size());
      const int64_t block = block_rows_for(rows, used);
      const int64_t blocks = ceil_div(rows, block);
      const at::Tensor shared_weight = shape.per_pair ? at::Tensor() : params[side]->weight;
      at::parallel_for(0, used * blocks, 1, [&](int64_t begin, int64_t end) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set in every worker
        for (int64_t task = begin; task < end; ++task) {
          const int64_t u = task / blocks, row_begin = (task % blocks) * block;
          const int64_t n = std::min(block, rows - row_begin);
          const int64_t l = seg.used[u];
          at::Tensor out = grad_stacks[side].select(0, l).narrow(0, row_begin, n);
          if (!shape.per_pair) {
            const at::Tensor g = layer_grads[side][u].narrow(0, row_begin, n);
            at::mm_out(out, g.to(out.scalar_type()), shared_weight);
            continue;
          }
          for (int64_t s = seg.offsets[l]; s < seg.offsets[l + 1]; ++s) {
            const int64_t k = seg.order[s];
            const at::Tensor g = grads[side].select(0, k).narrow(0, row_begin, n);
            accumulate_product(out, g, params[side]->weight_of(k), s > seg.offsets[l]);
          }
        }
      });
    }

    // d_weight. Shared: sum over used layers l (A side, then the B side when B shares the weight) of
    // layer_grad[l].T @ h[l], in that order; tasks over (weight, row block of F) so every task owns
    // its rows of the result. Per pair: grad[k].T @ h[i_k] (+ the B side), tasks over (k, F block).
    const int weights = shared ? 1 : 2;
    const int64_t units = shape.per_pair ? weights * num_pairs : weights;
    const int64_t block = block_rows_for(out_f, units);
    const int64_t blocks = ceil_div(out_f, block);
    at::parallel_for(0, units * blocks, 1, [&](int64_t begin, int64_t end) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set in every worker
      for (int64_t task = begin; task < end; ++task) {
        const int64_t unit = task / blocks, f_begin = (task % blocks) * block;
        const int64_t f = std::min(block, out_f - f_begin);
        const int w = static_cast<int>(shape.per_pair ? unit / num_pairs : unit);
        const int64_t k = shape.per_pair ? unit % num_pairs : 0;
        at::Tensor out = (shape.per_pair ? grad_weights[w].select(0, k) : grad_weights[w]).narrow(0, f_begin, f);
        // The sides feeding weight w: A (and B when shared) for w = 0, B for w = 1.
        const int first_side = w, last_side = shared ? 1 : w;
        bool written = false;
        for (int side = first_side; side <= last_side; ++side) {
          if (shape.per_pair) {
            const at::Tensor g = grads[side].select(0, k).narrow(1, f_begin, f).t();
            const at::Tensor x = stacks[side].select(0, index[2 * k + side]);
            accumulate_product(out, g, x, written);
            written = true;
            continue;
          }
          const LayerSegments& seg = segs[side];
          for (size_t u = 0; u < seg.used.size(); ++u) {
            const at::Tensor g = layer_grads[side][u].narrow(1, f_begin, f).t().to(out.scalar_type());
            const at::Tensor x = stacks[side].select(0, seg.used[u]);
            accumulate_product(out, g, x, written);
            written = true;
          }
        }
      }
    });
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
