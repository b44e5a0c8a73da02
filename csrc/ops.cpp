// Every schema of the stepfusion library, in one place. The kernels register their
// implementations in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; autograd and fake (meta)
// implementations are registered from Python (stepfusion_kernels/ops/<op>.py).
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
  m.def("guidance_attention(Tensor q, Tensor k, Tensor v, Tensor? k_global, Tensor? v_global, int window, float scale) -> (Tensor out, Tensor lse)");
  // Gradients of q, k, v, k_global, v_global; those of absent globals are empty tensors.
  m.def("guidance_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? k_global, Tensor? v_global, Tensor out, Tensor lse, int window, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_k_global, Tensor grad_v_global)");
}
