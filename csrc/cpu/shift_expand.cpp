// shift_expand on the CPU: one pass per row (rows in parallel), at::vec for the channel loops.
// The backward writes per-tile partial sums (a tile is up to kTileRows rows of one sample) and adds
// them in a fixed order, so the gate/weight/bias and global gradients are bitwise reproducible
// whatever the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "../shift_expand.h"
#include "vec.h"

namespace stepfusion {
namespace {

using at::vec::Vectorized;

constexpr int64_t kTileRows = 32;

// tanh through one fast exp (vec.h): Sleef's vector tanh costs several exps, and its 1-ulp exp alone was
// about half of the forward's time. |error| stays within about 1e-6 of 1, which is what s = 1 + tanh and
// 1 - tanh^2 need; float64 keeps the exact tanh.
template <typename acc_t>
inline Vectorized<acc_t> tanh_via_exp(const Vectorized<acc_t>& z) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return z.tanh();
  } else {
    using Vec = Vectorized<acc_t>;
    const Vec decay = fast_exp(z.abs() * Vec(acc_t(-2)));  // in (0, 1]: never overflows
    const Vec magnitude = (Vec(acc_t(1)) - decay) / (Vec(acc_t(1)) + decay);
    return Vec::blendv(magnitude, Vec(acc_t(0)) - magnitude, z < Vec(acc_t(0)));
  }
}

// A row as acc_t: the row itself when the dtypes agree, else converted into scratch.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_as_acc(const scalar_t* row, acc_t* scratch, int64_t dim) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    at::vec::convert(row, scratch, dim);
    return scratch;
  }
}

// The inputs of one row, as acc_t pointers (nullptr where the argument is absent).
template <typename acc_t>
struct RowInputs {
  const acc_t* x;
  const acc_t* scale_local;
  const acc_t* shift_local;
  const acc_t* expand_global;  // 1 + tanh(scale_global[b])
  const acc_t* shift_global;
  const acc_t* gate;
};

// Scratch rows of one thread: converted inputs and the intermediate per-channel values.
template <typename acc_t>
struct RowScratch {
  explicit RowScratch(int64_t dim) : storage(11 * dim), dim(dim) {}
  acc_t* slot(int i) { return storage.data() + i * dim; }
  std::vector<acc_t> storage;
  int64_t dim;
};

template <typename scalar_t, typename acc_t>
struct Rows {
  const scalar_t* base;  // nullptr when absent
  int64_t dim;
  const acc_t* get(int64_t row, acc_t* scratch) const {
    return base == nullptr ? nullptr : row_as_acc<scalar_t, acc_t>(base + row * dim, scratch, dim);
  }
};

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

// s = (1 + tanh(scale_local)) * expand_global,  u = (s - 1) * x + t,  h = x + gate * u.
// Writes h (and, when asked, s, u and tanh(scale_local)) for one row.
template <typename acc_t>
inline void compute_h(const RowInputs<acc_t>& in, int64_t dim, acc_t* h, acc_t* s_out, acc_t* u_out,
                      acc_t* tanh_local_out) {
  using Vec = Vectorized<acc_t>;
  const Vec one(acc_t(1));
  for_each_vector<acc_t>(dim, [&](int64_t d, int64_t n) {
    const Vec x = load(in.x, d, n);
    Vec s = one;
    if (in.scale_local != nullptr) {
      const Vec tanh_local = tanh_via_exp(load(in.scale_local, d, n));
      if (tanh_local_out != nullptr) tanh_local.store(tanh_local_out + d, n);
      s = one + tanh_local;
    }
    if (in.expand_global != nullptr) s = s * load(in.expand_global, d, n);
    Vec t(acc_t(0));
    if (in.shift_local != nullptr) t = load(in.shift_local, d, n);
    if (in.shift_global != nullptr) t = t + load(in.shift_global, d, n);
    const Vec u = (s - one) * x + t;
    const Vec hv = in.gate != nullptr ? x + load(in.gate, d, n) * u : x + u;
    hv.store(h + d, n);
    if (s_out != nullptr) s.store(s_out + d, n);
    if (u_out != nullptr) u.store(u_out + d, n);
  });
}

template <typename acc_t>
inline acc_t row_mean(const acc_t* values, int64_t dim) {
  using Vec = Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, values, dim) / acc_t(dim);
}

struct Globals {
  at::Tensor expand;  // (B, D) acc: 1 + tanh(scale_global), undefined when absent
  at::Tensor shift;   // (B, D) acc: shift_global, undefined when absent
};

Globals prepare_globals(const std::optional<at::Tensor>& scale_global, const std::optional<at::Tensor>& shift_global,
                        at::ScalarType acc_type) {
  Globals globals;
  if (scale_global.has_value()) globals.expand = scale_global->to(acc_type).tanh().add_(1).contiguous();
  if (shift_global.has_value()) globals.shift = shift_global->to(acc_type).contiguous();
  return globals;
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cpu_dtype(const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
              "shift_expand (cpu backend): x must be float32, float64 or bfloat16, got ", t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shift_expand_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& scale_local, const std::optional<at::Tensor>& shift_local,
    const std::optional<at::Tensor>& scale_global, const std::optional<at::Tensor>& shift_global,
    const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  const ShiftExpandShape shape =
      check_shift_expand(x_in, scale_local, shift_local, scale_global, shift_global, gate, weight, bias);
  check_cpu_dtype(x_in);
  const at::ScalarType acc_type = acc_type_of(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale_l = contiguous_or_undefined(scale_local);
  const at::Tensor shift_l = contiguous_or_undefined(shift_local);
  const at::Tensor gate_c = gate.has_value() ? gate->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor weight_c = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor bias_c = bias.has_value() ? bias->to(acc_type).contiguous() : at::Tensor();
  const Globals globals = prepare_globals(scale_global, shift_global, acc_type);

  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({shape.batch, shape.length}, x.options().dtype(acc_type));
  at::Tensor rstd = at::empty({shape.batch, shape.length}, x.options().dtype(acc_type));
  // D == 0: no channels to normalise; the statistics are defined as zeros rather than left unwritten.
  if (shape.rows() == 0 || shape.dim == 0) return {y, mean.zero_(), rstd.zero_()};

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "shift_expand_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    const int64_t dim = shape.dim;
    const Rows<scalar_t, acc_t> x_rows{x.data_ptr<scalar_t>(), dim};
    const Rows<scalar_t, acc_t> scale_rows{data_or_null<scalar_t>(scale_l), dim};
    const Rows<scalar_t, acc_t> shift_rows{data_or_null<scalar_t>(shift_l), dim};
    const acc_t* expand_global = data_or_null<acc_t>(globals.expand);
    const acc_t* shift_global = data_or_null<acc_t>(globals.shift);
    const acc_t* gate_p = data_or_null<acc_t>(gate_c);
    const acc_t* weight_p = data_or_null<acc_t>(weight_c);
    const acc_t* bias_p = data_or_null<acc_t>(bias_c);
    scalar_t* y_p = y.data_ptr<scalar_t>();
    acc_t* mean_p = mean.data_ptr<acc_t>();
    acc_t* rstd_p = rstd.data_ptr<acc_t>();
    const acc_t eps_acc = static_cast<acc_t>(eps);

    at::parallel_for(0, shape.rows(), 1, [&](int64_t begin, int64_t end) {
      RowScratch<acc_t> scratch(dim);
      acc_t* h = scratch.slot(0);
      acc_t* y_acc = scratch.slot(1);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / shape.length;
        const RowInputs<acc_t> in{x_rows.get(row, scratch.slot(2)), scale_rows.get(row, scratch.slot(3)),
                                  shift_rows.get(row, scratch.slot(4)),
                                  expand_global ? expand_global + b * dim : nullptr,
                                  shift_global ? shift_global + b * dim : nullptr, gate_p};
        compute_h<acc_t>(in, dim, h, nullptr, nullptr, nullptr);
        const acc_t mu = row_mean(h, dim);
        const acc_t var = at::vec::map_reduce_all<acc_t>(
                              [mu](Vec v) { return (v - Vec(mu)) * (v - Vec(mu)); },
                              [](Vec a, Vec b) { return a + b; }, h, dim) /
                          acc_t(dim);
        const acc_t inv_std = acc_t(1) / std::sqrt(var + eps_acc);
        mean_p[row] = mu;
        rstd_p[row] = inv_std;
        scalar_t* y_row = y_p + row * dim;
        acc_t* out = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(y_row) : y_acc;
        for_each_vector<acc_t>(dim, [&](int64_t d, int64_t n) {
          Vec v = (load(h, d, n) - Vec(mu)) * Vec(inv_std);
          if (weight_p != nullptr) v = v * load(weight_p, d, n);
          if (bias_p != nullptr) v = v + load(bias_p, d, n);
          v.store(out + d, n);
        });
        if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(y_acc, y_row, dim);
      }
    });
  });
  return {y, mean, rstd};
}

// (G, T, Q, D) -> (G, Q, D): adds the T tiles of every group in tile order, so the result has the
// same bits whatever the number of threads (at::sum may split the reduced dimension across them).
at::Tensor sum_tiles(const at::Tensor& partial) {
  const int64_t groups = partial.size(0), tiles = partial.size(1);
  const int64_t width = partial.size(2) * partial.size(3);
  at::Tensor out = at::zeros({groups, partial.size(2), partial.size(3)}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "sum_tiles", [&] {
    const scalar_t* src = partial.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, groups * width, 256, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t group = j / width, column = j % width;
        const scalar_t* column_p = src + group * tiles * width + column;
        scalar_t total = 0;
        for (int64_t t = 0; t < tiles; ++t) total += column_p[t * width];
        dst[j] = total;
      }
    });
  });
  return out;
}

// Per-tile partial sums, indexed [tile][quantity][channel].
enum ChannelSum { kGateSum = 0, kWeightSum = 1, kBiasSum = 2, kChannelSums = 3 };
enum SampleSum { kExpandSum = 0, kShiftSum = 1, kSampleSums = 2 };

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
shift_expand_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                          const std::optional<at::Tensor>& scale_local, const std::optional<at::Tensor>& shift_local,
                          const std::optional<at::Tensor>& scale_global,
                          const std::optional<at::Tensor>& shift_global, const std::optional<at::Tensor>& gate,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  const ShiftExpandShape shape =
      check_shift_expand(x_in, scale_local, shift_local, scale_global, shift_global, gate, weight, bias);
  check_cpu_dtype(x_in);
  const at::ScalarType acc_type = acc_type_of(x_in.scalar_type());
  check_shift_expand_backward(grad_y_in, x_in, mean_in, rstd_in, acc_type);

  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor scale_l = contiguous_or_undefined(scale_local);
  const at::Tensor shift_l = contiguous_or_undefined(shift_local);
  const at::Tensor gate_c = gate.has_value() ? gate->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor weight_c = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  const Globals globals = prepare_globals(scale_global, shift_global, acc_type);

  const int64_t dim = shape.dim;
  const int64_t tiles_per_sample = (shape.length + kTileRows - 1) / kTileRows;
  const int64_t tiles = shape.batch * tiles_per_sample;
  const auto acc_options = x.options().dtype(acc_type);
  at::Tensor channel_partial = at::zeros({tiles, kChannelSums, dim}, acc_options);
  at::Tensor sample_partial = at::zeros({tiles, kSampleSums, dim}, acc_options);

  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_scale_local = scale_local.has_value() ? at::empty_like(x) : absent_grad(x);
  at::Tensor grad_shift_local = shift_local.has_value() ? at::empty_like(x) : absent_grad(x);

  if (shape.rows() > 0 && dim > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "shift_expand_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      using Vec = Vectorized<acc_t>;
      const Rows<scalar_t, acc_t> x_rows{x.data_ptr<scalar_t>(), dim};
      const Rows<scalar_t, acc_t> grad_rows{grad_y.data_ptr<scalar_t>(), dim};
      const Rows<scalar_t, acc_t> scale_rows{data_or_null<scalar_t>(scale_l), dim};
      const Rows<scalar_t, acc_t> shift_rows{data_or_null<scalar_t>(shift_l), dim};
      const acc_t* expand_global = data_or_null<acc_t>(globals.expand);
      const acc_t* shift_global = data_or_null<acc_t>(globals.shift);
      const acc_t* gate_p = data_or_null<acc_t>(gate_c);
      const acc_t* weight_p = data_or_null<acc_t>(weight_c);
      const acc_t* mean_p = mean.data_ptr<acc_t>();
      const acc_t* rstd_p = rstd.data_ptr<acc_t>();
      scalar_t* grad_x_p = grad_x.data_ptr<scalar_t>();
      scalar_t* grad_scale_p = scale_local.has_value() ? grad_scale_local.data_ptr<scalar_t>() : nullptr;
      scalar_t* grad_shift_p = shift_local.has_value() ? grad_shift_local.data_ptr<scalar_t>() : nullptr;
      acc_t* channel_p = channel_partial.data_ptr<acc_t>();
      acc_t* sample_p = sample_partial.data_ptr<acc_t>();

      // A row of an output: written in place when it holds acc_t, else in scratch and converted after.
      auto output_row = [dim](scalar_t* base, int64_t row, acc_t* scratch) -> acc_t* {
        if (base == nullptr) return nullptr;
        // (the cast only happens where scalar_t is acc_t; the branch is compiled for every dtype)
        return std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(base + row * dim) : scratch;
      };
      auto finish_row = [dim](const acc_t* values, scalar_t* base, int64_t row) {
        if constexpr (!std::is_same_v<scalar_t, acc_t>) {
          if (base != nullptr) at::vec::convert(values, base + row * dim, dim);
        }
      };

      at::parallel_for(0, tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
        RowScratch<acc_t> scratch(dim);
        acc_t* xhat = scratch.slot(0);
        acc_t* s_row = scratch.slot(1);
        acc_t* u_row = scratch.slot(2);
        acc_t* tanh_local = scratch.slot(3);
        for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
          const int64_t b = tile / tiles_per_sample;
          const int64_t l_begin = (tile % tiles_per_sample) * kTileRows;
          const int64_t l_end = std::min(shape.length, l_begin + kTileRows);
          acc_t* gate_sum = channel_p + (tile * kChannelSums + kGateSum) * dim;
          acc_t* weight_sum = channel_p + (tile * kChannelSums + kWeightSum) * dim;
          acc_t* bias_sum = channel_p + (tile * kChannelSums + kBiasSum) * dim;
          acc_t* expand_sum = sample_p + (tile * kSampleSums + kExpandSum) * dim;
          acc_t* shift_sum = sample_p + (tile * kSampleSums + kShiftSum) * dim;
          const acc_t* expand_g = expand_global ? expand_global + b * dim : nullptr;
          for (int64_t l = l_begin; l < l_end; ++l) {
            const int64_t row = b * shape.length + l;
            // Converted inputs live in slots 4..7, converted outputs in slots 8..10.
            const RowInputs<acc_t> in{x_rows.get(row, scratch.slot(5)), scale_rows.get(row, scratch.slot(6)),
                                      shift_rows.get(row, scratch.slot(7)), expand_g,
                                      shift_global ? shift_global + b * dim : nullptr, gate_p};
            compute_h<acc_t>(in, dim, xhat, s_row, u_row, in.scale_local ? tanh_local : nullptr);
            const acc_t mu = mean_p[row];
            const acc_t inv_std = rstd_p[row];
            const acc_t* dy = grad_rows.get(row, scratch.slot(4));
            // xhat in place of h; sums of dxhat and dxhat * xhat for the LayerNorm backward.
            Vec sum_dxhat(acc_t(0)), sum_dxhat_xhat(acc_t(0));
            for_each_vector<acc_t>(dim, [&](int64_t d, int64_t n) {
              const Vec xh = (load(xhat, d, n) - Vec(mu)) * Vec(inv_std);
              xh.store(xhat + d, n);
              const Vec g = load(dy, d, n);
              // loadu with a count zero-fills the tail lanes, so they add nothing to the sums.
              const Vec dxh = weight_p ? g * load(weight_p, d, n) : g;
              sum_dxhat = sum_dxhat + dxh;
              sum_dxhat_xhat = sum_dxhat_xhat + dxh * xh;
              (load(weight_sum, d, n) + g * xh).store(weight_sum + d, n);
              (load(bias_sum, d, n) + g).store(bias_sum + d, n);
            });
            const acc_t c1 = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, sum_dxhat) /
                             acc_t(dim);
            const acc_t c2 = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, sum_dxhat_xhat) /
                             acc_t(dim);
            // dh = rstd * (dxhat - c1 - xhat * c2); then the chain through h = x + gate * ((s - 1) x + t),
            // every row output and partial sum in one pass.
            acc_t* grad_x_row = output_row(grad_x_p, row, scratch.slot(8));
            acc_t* grad_shift_row = output_row(grad_shift_p, row, scratch.slot(9));
            acc_t* grad_scale_row = output_row(grad_scale_p, row, scratch.slot(10));
            const Vec one(acc_t(1));
            for_each_vector<acc_t>(dim, [&](int64_t d, int64_t n) {
              const Vec g = load(dy, d, n);
              const Vec dxh = weight_p ? g * load(weight_p, d, n) : g;
              const Vec dh = Vec(inv_std) * (dxh - Vec(c1) - load(xhat, d, n) * Vec(c2));
              (load(gate_sum, d, n) + dh * load(u_row, d, n)).store(gate_sum + d, n);
              const Vec dh_gated = gate_p ? dh * load(gate_p, d, n) : dh;
              (load(shift_sum, d, n) + dh_gated).store(shift_sum + d, n);
              const Vec ds = dh_gated * load(in.x, d, n);
              if (expand_g != nullptr) {
                const Vec expand_local = in.scale_local ? one + load(tanh_local, d, n) : one;
                (load(expand_sum, d, n) + ds * expand_local).store(expand_sum + d, n);
              }
              (dh + dh_gated * (load(s_row, d, n) - one)).store(grad_x_row + d, n);
              if (grad_shift_row != nullptr) dh_gated.store(grad_shift_row + d, n);
              if (grad_scale_row != nullptr) {
                const Vec a = load(tanh_local, d, n);
                Vec grad_scale = ds * (one - a * a);
                if (expand_g != nullptr) grad_scale = grad_scale * load(expand_g, d, n);
                grad_scale.store(grad_scale_row + d, n);
              }
            });
            finish_row(grad_x_row, grad_x_p, row);
            finish_row(grad_shift_row, grad_shift_p, row);
            finish_row(grad_scale_row, grad_scale_p, row);
          }
        }
      });
    });
  }

  // Fixed-order reductions of the tile partials (deterministic, independent of the thread count).
  const auto grad_of = [&](const std::optional<at::Tensor>& arg, const at::Tensor& value) {
    // A copy: the sums are views of one buffer, and the outputs of an op may not alias each other.
    return arg.has_value() ? value.to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true) : absent_grad(x);
  };
  const at::Tensor channel_sums = sum_tiles(channel_partial.view({1, tiles, kChannelSums, dim}))[0];
  const at::Tensor sample_sums = sum_tiles(sample_partial.view({shape.batch, tiles_per_sample, kSampleSums, dim}));
  at::Tensor grad_scale_global = absent_grad(x);
  if (scale_global.has_value()) {
    const at::Tensor tanh_global = globals.expand - 1;
    grad_scale_global = (sample_sums.select(1, kExpandSum) * (1 - tanh_global * tanh_global)).to(x.scalar_type());
  }
  return {grad_x,
          grad_scale_local,
          grad_shift_local,
          grad_scale_global,
          grad_of(shift_global, sample_sums.select(1, kShiftSum)),
          grad_of(gate, channel_sums.select(0, kGateSum)),
          grad_of(weight, channel_sums.select(0, kWeightSum)),
          grad_of(bias, channel_sums.select(0, kBiasSum))};
}

}  // namespace

TORCH_LIBRARY_IMPL(stepfusion, CPU, m) {
  m.impl("shift_expand", &shift_expand_cpu);
  m.impl("shift_expand_backward", &shift_expand_backward_cpu);
}

}  // namespace stepfusion
