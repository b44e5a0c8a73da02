// Argument checks and shapes of cohort_mutual_loss shared by the CPU and CUDA implementations.
// The Python layer raises the same ValueErrors for shapes first; these checks guard direct calls of
// torch.ops.stepfusion.cohort_mutual_loss (and compiled graphs, where the Python checks do not run), so
// no kernel ever reads out of bounds or divides by a zero total weight. TORCH_CHECK_VALUE raises a
// Python ValueError.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

namespace stepfusion {

enum class CohortKind { kKL, kMSE };

struct CohortShape {
  int64_t students;
  int64_t batch;
  int64_t classes;
};

inline CohortKind parse_cohort_kind(const std::string& kind) {
  TORCH_CHECK_VALUE(kind == "kl" || kind == "mse", "cohort_mutual_loss: kind must be 'kl' or 'mse', got '", kind,
                    "'");
  return kind == "kl" ? CohortKind::kKL : CohortKind::kMSE;
}

inline CohortShape check_cohort_mutual_loss(const at::Tensor& outputs, const at::Tensor& teacher_weights) {
  TORCH_CHECK_VALUE(outputs.dim() == 3, "cohort_mutual_loss: outputs must have shape (S, N, C), got ",
                    outputs.sizes());
  const CohortShape shape{outputs.size(0), outputs.size(1), outputs.size(2)};
  TORCH_CHECK_VALUE(shape.classes > 0 || shape.students == 0,
                    "cohort_mutual_loss: outputs must have at least one class (C >= 1), got shape ", outputs.sizes());
  TORCH_CHECK_VALUE(teacher_weights.dim() == 1 && teacher_weights.size(0) == shape.students,
                    "cohort_mutual_loss: teacher_weights must have shape (", shape.students, ",) (one per student), got ",
                    teacher_weights.sizes());
  TORCH_CHECK_VALUE(teacher_weights.scalar_type() == outputs.scalar_type(),
                    "cohort_mutual_loss: teacher_weights must have dtype ", outputs.scalar_type(), " like outputs, got ",
                    teacher_weights.scalar_type());
  TORCH_CHECK(teacher_weights.device() == outputs.device(), "cohort_mutual_loss: teacher_weights must be on ",
              outputs.device(), " like outputs, got ", teacher_weights.device());
  return shape;
}

// The weights on the host in float64 (one device-to-host copy for CUDA tensors), checked finite and
// >= 0 with a positive sum when there is any student. Returns the total weight W.
inline double checked_total_weight(const at::Tensor& teacher_weights) {
  const at::Tensor host = teacher_weights.detach().to(at::kCPU, at::kDouble).contiguous();
  const double* weights = host.data_ptr<double>();
  double total = 0;
  for (int64_t j = 0; j < host.numel(); ++j) {
    TORCH_CHECK_VALUE(std::isfinite(weights[j]) && weights[j] >= 0,
                      "cohort_mutual_loss: teacher_weights must be finite and >= 0, got ", weights[j], " at index ", j);
    total += weights[j];
  }
  TORCH_CHECK_VALUE(host.numel() == 0 || total > 0, "cohort_mutual_loss: teacher_weights must have a positive sum, got ",
                    total);
  return total;
}

inline at::ScalarType cohort_acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The forward's saved intermediates: the teacher mixture (N, C) and, for kind="kl", the per-student
// log-sum-exp (S, N); for kind="mse" lse is an empty (0,) tensor.
inline at::Tensor empty_cohort_lse(const CohortShape& shape, CohortKind kind, const at::TensorOptions& acc_options) {
  return kind == CohortKind::kKL ? at::empty({shape.students, shape.batch}, acc_options) : at::empty({0}, acc_options);
}

// penalty_i = scale * sum_n (divergence[n, i] + spread[n] / W), scale = 1 / N (kl) or 1 / (N C) (mse); an
// empty batch gives zeros (C = 0 only comes with S = 0). Per-row values are reduced by the caller.
inline double cohort_scale(const CohortShape& shape, CohortKind kind) {
  if (shape.batch == 0 || shape.classes == 0) return 0.0;
  return kind == CohortKind::kKL ? 1.0 / static_cast<double>(shape.batch)
                                 : 1.0 / (static_cast<double>(shape.batch) * static_cast<double>(shape.classes));
}

inline void check_cohort_backward(const at::Tensor& grad_penalty, const at::Tensor& outputs, const at::Tensor& mixture,
                                  const at::Tensor& lse, CohortKind kind) {
  TORCH_CHECK_VALUE(outputs.dim() == 3, "cohort_mutual_loss_backward: outputs must have shape (S, N, C), got ",
                    outputs.sizes());
  const int64_t students = outputs.size(0), batch = outputs.size(1), classes = outputs.size(2);
  const at::ScalarType acc_type = cohort_acc_type(outputs.scalar_type());
  TORCH_CHECK_VALUE(grad_penalty.dim() == 1 && grad_penalty.size(0) == students,
                    "cohort_mutual_loss_backward: grad_penalty must have shape (", students, ",), got ",
                    grad_penalty.sizes());
  TORCH_CHECK_VALUE(mixture.dim() == 2 && mixture.size(0) == batch && mixture.size(1) == classes &&
                        mixture.scalar_type() == acc_type,
                    "cohort_mutual_loss_backward: mixture must be (N, C) of dtype ", acc_type, ", got ",
                    mixture.sizes(), " ", mixture.scalar_type());
  if (kind == CohortKind::kKL) {
    TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == students && lse.size(1) == batch &&
                          lse.scalar_type() == acc_type,
                      "cohort_mutual_loss_backward: lse must be (S, N) of dtype ", acc_type, ", got ", lse.sizes(),
                      " ", lse.scalar_type());
  }
  for (const at::Tensor* t : {&grad_penalty, &mixture, &lse}) {
    TORCH_CHECK(t->device() == outputs.device(), "cohort_mutual_loss_backward: every tensor must be on ",
                outputs.device(), ", got ", t->device());
  }
}

}  // namespace stepfusion
