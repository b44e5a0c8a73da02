// Every schema of the stepfusion library, in one place. The kernels register their
// implementations in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu, their autograd in csrc/autograd.cpp;
// fake (meta) implementations are registered from Python (stepfusion_kernels/ops/<op>.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing stepfusion_kernels._C runs the static registrations below; the module has no members.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(stepfusion, m) {
  // shift_expand returns y and the per-row LayerNorm statistics (mean, rstd) kept for the backward.
  m.def(
      "shift_expand(Tensor x, Tensor? scale_local, Tensor? shift_local, Tensor? scale_global, "
      "Tensor? shift_global, Tensor? gate, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor y, Tensor mean, Tensor rstd)");
  // Gradients in argument order (x, scale_local, shift_local, scale_global, shift_global, gate,
  // weight, bias); the gradient of an absent optional argument is an empty tensor.
  m.def(
      "shift_expand_backward(Tensor grad_y, Tensor x, Tensor? scale_local, Tensor? shift_local, "
      "Tensor? scale_global, Tensor? shift_global, Tensor? gate, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // guidance_attention returns out and the row logsumexp of the scaled scores (natural log; float32,
  // float64 for float64 inputs) kept for the backward.
  m.def(
      "guidance_attention(Tensor q, Tensor k, Tensor v, Tensor? k_global, Tensor? v_global, int window, "
      "float scale) -> (Tensor out, Tensor lse)");
  // Gradients of q, k, v, k_global, v_global; those of absent globals are empty tensors.
  m.def(
      "guidance_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? k_global, "
      "Tensor? v_global, Tensor out, Tensor lse, int window, float scale) -> (Tensor grad_q, Tensor grad_k, "
      "Tensor grad_v, Tensor grad_k_global, Tensor grad_v_global)");

  // skew_pair_project: pa[k] = ha[i_k] @ weight_a(k).T + bias_a(k), pb[k] likewise from hb[j_k];
  // weight_b = None shares weight_a and bias_a. Outputs (P, N, F) in ha's dtype.
  m.def(
      "skew_pair_project(Tensor ha, Tensor hb, Tensor pairs, Tensor weight_a, Tensor? bias_a, Tensor? weight_b, "
      "Tensor? bias_b) -> (Tensor pa, Tensor pb)");
  // When weight_b is None, grad_weight_a/grad_bias_a include the B-side contributions and
  // grad_weight_b/grad_bias_b are empty tensors (shape (0,)); an absent bias gives an empty grad.
  m.def(
      "skew_pair_project_backward(Tensor grad_pa, Tensor grad_pb, Tensor ha, Tensor hb, Tensor pairs, "
      "Tensor weight_a, Tensor? bias_a, Tensor? weight_b, Tensor? bias_b) -> (Tensor grad_ha, Tensor grad_hb, "
      "Tensor grad_weight_a, Tensor grad_bias_a, Tensor grad_weight_b, Tensor grad_bias_b)");

  // cohort_mutual_loss returns the (S,) penalty and, for the backward, the teacher mixture (N, C)
  // (sum_j w_j softmax(outputs[j]) / W for kind="kl", sum_j w_j outputs[j] / W for "mse") and the
  // per-student log-sum-exp (S, N) (kind="kl"; an empty tensor for "mse"), both fp32 (fp64 for fp64).
  m.def("cohort_mutual_loss(Tensor outputs, Tensor teacher_weights, str kind) "
        "-> (Tensor penalty, Tensor mixture, Tensor lse)");
  // The gradient of outputs only: the teachers are detached and teacher_weights gets none.
  m.def("cohort_mutual_loss_backward(Tensor grad_penalty, Tensor outputs, Tensor mixture, Tensor lse, str kind) "
        "-> Tensor");
}
