// cohort_mutual_loss on the CPU: one pass per batch row n (rows in parallel), at::vec over the classes.
// Every row builds its teacher mixture once and then one divergence per student, so the cost is
// O(S N C). Per-row results go to an (N, S) buffer that a sequential loop adds in row order, so the
// penalty has the same bits whatever the number of threads (no atomics, no thread-count-dependent split).
//
// For kind="kl", with q = sum_j w_j p_j / W (p_j = softmax(outputs[j, n])), the row term of student i is
//   sum_j w_j KL(p_j || p_i) = J + W KL(q || p_i),   J = sum_j w_j KL(p_j || q),
// and for kind="mse", with mu = sum_j w_j f_j / W,
//   sum_j w_j ||f_j - f_i||^2 = J + W ||f_i - mu||^2,   J = sum_j w_j ||f_j - mu||^2.
// Both split into a "spread" J of the teachers (one per row) and a "divergence" of each student from the
// mixture: penalty_i = scale * sum_n (divergence[n, i] + J_n / W), scale = 1/N (kl) or 1/(N C) (mse).
// Each KL is summed over the classes from the per-class differences d_c = log q_c - log p_ic, in the form
// of the KL of unnormalised measures, which adds sum_c (p_ic - q_c) = 0:
//   KL(q || p_i) = sum_c q_c d_c + (p_ic - q_c),   KL(p_i || q) = sum_c (q_c - p_ic) - p_ic d_c.
// When the students nearly agree (small logits, early in training) a KL is a small number, and written as
// an entropy minus a cross-entropy (terms of size log C) it is lost to rounding; even summed from d it
// carries the rounding of each log-sum-exp, an error that does not average out over the classes. The
// added terms cancel that error to first order: any factor by which a computed p (or q) misses a sum of 1
// changes the sum by only its square. No log of a mixture entry that may have underflowed to 0 is ever taken
// (log q is clamped below, and q d counts as 0 there), and the backward needs only q (or mu) and each
// student's log-sum-exp, saved by the forward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../cohort_mutual_loss.h"
#include "vec.h"

namespace stepfusion {
namespace {

using at::vec::Vectorized;

// sum over the classes of term(c, n) (a vector); the lanes past the end of a tail are dropped.
template <typename acc_t, typename Term>
inline acc_t sum_over(int64_t classes, Term term) {
  using Vec = Vectorized<acc_t>;
  Vec total(acc_t(0));
  for_each_vector<acc_t>(classes, [&](int64_t c, int64_t n) {
    const Vec value = term(c, n);
    total = total + (n == Vec::size() ? value : Vec::set(Vec(acc_t(0)), value, n));
  });
  return at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, total);
}

// A row as acc_t: the row itself when the dtypes agree, else converted into scratch.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_as_acc(const scalar_t* row, acc_t* scratch, int64_t classes) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    at::vec::convert(row, scratch, classes);
    return scratch;
  }
}

// One batch row of kind="kl": writes lse[:, n], the mixture q, divergence[n, :] = KL(q || p_i), and
// returns J. `row` holds converted inputs; `scratch` holds exp(z - max) of the current student, then log q.
// In the divergences p is exp(log p), so that it follows every rounding of log p (that of log-sum-exp and
// of each z - lse): the terms p - q then cancel it to first order. (p = exp(z - max) / s, the first loop's,
// would save an exp per class and student but lose that: 10x to 50x the error when the students nearly agree.)
template <typename scalar_t, typename acc_t>
acc_t kl_row(const scalar_t* outputs, const acc_t* weights, acc_t total_weight, const CohortShape& shape, int64_t n,
             acc_t* row, acc_t* scratch, acc_t* mixture, acc_t* lse, acc_t* divergence) {
  using Vec = Vectorized<acc_t>;
  const int64_t classes = shape.classes;
  const auto add = [](Vec a, Vec b) { return a + b; };
  std::fill(mixture, mixture + classes, acc_t(0));
  for (int64_t j = 0; j < shape.students; ++j) {
    const acc_t* z = row_as_acc<scalar_t, acc_t>(outputs + (j * shape.batch + n) * classes, row, classes);
    const acc_t max = at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, z, classes);
    Vec sum_exp(acc_t(0));
    for_each_vector<acc_t>(classes, [&](int64_t c, int64_t count) {
      Vec e = (load(z, c, count) - Vec(max)).exp();
      if (count < Vec::size()) e = Vec::set(Vec(acc_t(0)), e, count);
      e.store(scratch + c, count);
      sum_exp = sum_exp + e;
    });
    const acc_t s = at::vec::vec_reduce_all<acc_t>(add, sum_exp);
    lse[j * shape.batch + n] = max + std::log(s);
    if (weights[j] > 0) {  // a student of weight 0 does not teach: a NaN there stays out of q
      const Vec scale(weights[j] / s);
      for_each_vector<acc_t>(classes, [&](int64_t c, int64_t count) {
        (load(mixture, c, count) + scale * load(scratch, c, count)).store(mixture + c, count);
      });
    }
  }
  // q = m / W, and log q clamped below, so that an underflowed q gives q d = 0, not 0 * -inf.
  const Vec inv_total(acc_t(1) / total_weight);
  const Vec tiny(std::numeric_limits<acc_t>::min());
  for_each_vector<acc_t>(classes, [&](int64_t c, int64_t count) {
    const Vec q = load(mixture, c, count) * inv_total;
    q.store(mixture + c, count);
    at::vec::maximum(q, tiny).log().store(scratch + c, count);
  });
  acc_t spread = 0;
  for (int64_t i = 0; i < shape.students; ++i) {
    const acc_t* z = row_as_acc<scalar_t, acc_t>(outputs + (i * shape.batch + n) * classes, row, classes);
    const Vec lse_i(lse[i * shape.batch + n]);
    const bool teaches = weights[i] > 0;
    Vec to_q(acc_t(0)), from_q(acc_t(0));  // lane sums of the terms of KL(q || p_i) and KL(p_i || q)
    for_each_vector<acc_t>(classes, [&](int64_t c, int64_t count) {
      const Vec log_p = load(z, c, count) - lse_i;
      const Vec p = log_p.exp(), q = load(mixture, c, count), d = load(scratch, c, count) - log_p;
      Vec term = q * d + (p - q);
      if (count < Vec::size()) term = Vec::set(Vec(acc_t(0)), term, count);
      to_q = to_q + term;
      if (teaches) {
        term = (q - p) - p * d;
        if (count < Vec::size()) term = Vec::set(Vec(acc_t(0)), term, count);
        from_q = from_q + term;
      }
    });
    divergence[n * shape.students + i] = at::vec::vec_reduce_all<acc_t>(add, to_q);
    if (teaches) spread += weights[i] * at::vec::vec_reduce_all<acc_t>(add, from_q);
  }
  return spread;
}

// One batch row of kind="mse": writes the mixture mu, divergence[n, :] = ||f_i - mu||^2, returns J.
template <typename scalar_t, typename acc_t>
acc_t mse_row(const scalar_t* outputs, const acc_t* weights, acc_t total_weight, const CohortShape& shape, int64_t n,
              acc_t* row, acc_t* mixture, acc_t* divergence) {
  using Vec = Vectorized<acc_t>;
  const int64_t classes = shape.classes;
  std::fill(mixture, mixture + classes, acc_t(0));
  for (int64_t j = 0; j < shape.students; ++j) {
    if (weights[j] == 0) continue;
    const acc_t* f = row_as_acc<scalar_t, acc_t>(outputs + (j * shape.batch + n) * classes, row, classes);
    const Vec w(weights[j]);
    for_each_vector<acc_t>(classes, [&](int64_t c, int64_t count) {
      (load(mixture, c, count) + w * load(f, c, count)).store(mixture + c, count);
    });
  }
  const Vec inv_total(acc_t(1) / total_weight);
  for_each_vector<acc_t>(classes, [&](int64_t c, int64_t count) {
    (load(mixture, c, count) * inv_total).store(mixture + c, count);
  });
  acc_t spread = 0;
  for (int64_t i = 0; i < shape.students; ++i) {
    const acc_t* f = row_as_acc<scalar_t, acc_t>(outputs + (i * shape.batch + n) * classes, row, classes);
    const acc_t distance = sum_over<acc_t>(classes, [&](int64_t c, int64_t count) {
      const Vec d = load(f, c, count) - load(mixture, c, count);
      return d * d;
    });
    divergence[n * shape.students + i] = distance;
    if (weights[i] > 0) spread += weights[i] * distance;  // not 0 * NaN from a student that does not teach
  }
  return spread;
}

void check_cpu_dtype(const at::Tensor& outputs) {
  const auto t = outputs.scalar_type();
  TORCH_CHECK_VALUE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
                    "cohort_mutual_loss (cpu backend): outputs must be float32, float64 or bfloat16, got ", t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cohort_mutual_loss_cpu(const at::Tensor& outputs_in,
                                                                      const at::Tensor& teacher_weights,
                                                                      c10::string_view kind_name) {
  const CohortKind kind = parse_cohort_kind(std::string(kind_name));
  const CohortShape shape = check_cohort_mutual_loss(outputs_in, teacher_weights);
  check_cpu_dtype(outputs_in);
  const double total_weight = checked_total_weight(teacher_weights);
  const at::ScalarType acc_type = cohort_acc_type(outputs_in.scalar_type());
  const auto acc_options = outputs_in.options().dtype(acc_type);
  const at::Tensor outputs = outputs_in.contiguous();
  const at::Tensor weights = teacher_weights.detach().to(acc_type).contiguous();

  at::Tensor mixture = at::empty({shape.batch, shape.classes}, acc_options);
  at::Tensor lse = empty_cohort_lse(shape, kind, acc_options);
  at::Tensor divergence = at::empty({shape.batch, shape.students}, acc_options);
  at::Tensor spread = at::empty({shape.batch}, acc_options);
  at::Tensor penalty_acc = at::zeros({shape.students}, acc_options);
  // Without students there is no mixture: zeros rather than uninitialised memory.
  if (shape.students == 0) mixture.zero_();
  if (shape.students > 0 && shape.batch > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, outputs.scalar_type(), "cohort_mutual_loss_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* outputs_p = outputs.data_ptr<scalar_t>();
      const acc_t* weights_p = weights.data_ptr<acc_t>();
      const acc_t total = static_cast<acc_t>(total_weight);
      acc_t* mixture_p = mixture.data_ptr<acc_t>();
      acc_t* divergence_p = divergence.data_ptr<acc_t>();
      acc_t* spread_p = spread.data_ptr<acc_t>();
      acc_t* lse_p = kind == CohortKind::kKL ? lse.data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, shape.batch, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> scratch(2 * shape.classes);
        for (int64_t n = begin; n < end; ++n) {
          acc_t* mixture_row = mixture_p + n * shape.classes;
          spread_p[n] = kind == CohortKind::kKL
                            ? kl_row<scalar_t, acc_t>(outputs_p, weights_p, total, shape, n, scratch.data(),
                                                      scratch.data() + shape.classes, mixture_row, lse_p, divergence_p)
                            : mse_row<scalar_t, acc_t>(outputs_p, weights_p, total, shape, n, scratch.data(),
                                                       mixture_row, divergence_p);
        }
      });
      // Rows added in order 0..N-1: the same bits for any number of threads.
      acc_t* penalty_p = penalty_acc.data_ptr<acc_t>();
      acc_t spread_total = 0;
      for (int64_t n = 0; n < shape.batch; ++n) {
        spread_total += spread_p[n];
        for (int64_t i = 0; i < shape.students; ++i) penalty_p[i] += divergence_p[n * shape.students + i];
      }
      const acc_t scale = static_cast<acc_t>(cohort_scale(shape, kind));
      const acc_t shared = spread_total / total;
      for (int64_t i = 0; i < shape.students; ++i) penalty_p[i] = scale * (penalty_p[i] + shared);
    });
  }
  return {penalty_acc.to(outputs.scalar_type()), mixture, lse};
}

at::Tensor cohort_mutual_loss_backward_cpu(const at::Tensor& grad_penalty, const at::Tensor& outputs_in,
                                           const at::Tensor& mixture_in, const at::Tensor& lse_in,
                                           c10::string_view kind_name) {
  const CohortKind kind = parse_cohort_kind(std::string(kind_name));
  check_cohort_backward(grad_penalty, outputs_in, mixture_in, lse_in, kind);
  check_cpu_dtype(outputs_in);
  const CohortShape shape{outputs_in.size(0), outputs_in.size(1), outputs_in.size(2)};
  const at::ScalarType acc_type = cohort_acc_type(outputs_in.scalar_type());
  const at::Tensor outputs = outputs_in.contiguous();
  const at::Tensor mixture = mixture_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  // d penalty_i / d outputs[i, n] = scale * (p_i - q) for kl, scale * 2 (f_i - mu) for mse.
  const double factor = cohort_scale(shape, kind) * (kind == CohortKind::kMSE ? 2.0 : 1.0);
  const at::Tensor coefficient = (grad_penalty.to(acc_type) * factor).contiguous();
  at::Tensor grad_outputs = at::empty_like(outputs);
  if (outputs.numel() == 0) return grad_outputs;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, outputs.scalar_type(), "cohort_mutual_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    const int64_t classes = shape.classes;
    const scalar_t* outputs_p = outputs.data_ptr<scalar_t>();
    const acc_t* mixture_p = mixture.data_ptr<acc_t>();
    const acc_t* lse_p = kind == CohortKind::kKL ? lse.data_ptr<acc_t>() : nullptr;
    const acc_t* coefficient_p = coefficient.data_ptr<acc_t>();
    scalar_t* grad_p = grad_outputs.data_ptr<scalar_t>();
    at::parallel_for(0, shape.students * shape.batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(2 * classes);
      acc_t* out_row = scratch.data() + classes;
      for (int64_t row_index = begin; row_index < end; ++row_index) {
        const int64_t i = row_index / shape.batch, n = row_index % shape.batch;
        const acc_t* z = row_as_acc<scalar_t, acc_t>(outputs_p + row_index * classes, scratch.data(), classes);
        const acc_t* target = mixture_p + n * classes;
        const Vec coef(coefficient_p[i]);
        if (kind == CohortKind::kKL) {
          const Vec lse_row(lse_p[row_index]);
          for_each_vector<acc_t>(classes, [&](int64_t c, int64_t count) {
            (coef * ((load(z, c, count) - lse_row).exp() - load(target, c, count))).store(out_row + c, count);
          });
        } else {
          for_each_vector<acc_t>(classes, [&](int64_t c, int64_t count) {
            (coef * (load(z, c, count) - load(target, c, count))).store(out_row + c, count);
          });
        }
        scalar_t* grad_row = grad_p + row_index * classes;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          std::copy(out_row, out_row + classes, grad_row);
        } else {
          at::vec::convert(out_row, grad_row, classes);
        }
      }
    });
  });
  return grad_outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(stepfusion, CPU, m) {
  m.impl("cohort_mutual_loss", &cohort_mutual_loss_cpu);
  m.impl("cohort_mutual_loss_backward", &cohort_mutual_loss_backward_cpu);
}

}  // namespace stepfusion
