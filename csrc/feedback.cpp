// Schemas of the CNN-F ops (docs/feedback.md). Kernels: csrc/cpu/feedback_gate.cpp,
// csrc/cpu/feedback_norm.cpp, csrc/cpu/feedback_pool.cpp, csrc/cuda/feedback.cu; fakes and
// autograd: screening_attn/feedback/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(screening_attn, m) {
  // y = AdaReLU(x; hidden, eta) and the bool gate mask. hidden=None: plain ReLU.
  m.def("ada_relu(Tensor x, Tensor? hidden, float eta) -> (Tensor, Tensor)");
  // (grad_x, grad_hidden) of the gated forward.
  m.def("ada_relu_backward(Tensor grad_y, Tensor mask, float eta) -> (Tensor, Tensor)");
  // z * mask: the gate's feedback pass, and the backward of the ungated forward.
  m.def("ada_relu_feedback(Tensor z, Tensor mask) -> Tensor");

  // Instance norm per (n, c) plane of x (N, C, H, W): (y, rstd), rstd (N, C) in float32
  // (float64 for float64 x), the saved statistic of the backward.
  m.def("ins_norm(Tensor x, float eps, bool centered) -> (Tensor, Tensor)");
  m.def("ins_norm_backward(Tensor grad_y, Tensor x, Tensor rstd, bool centered) -> Tensor");
  // Bottom-up InsNorm -> Bias -> AdaReLU in one pass: (y, mask, rstd).
  m.def(
      "ins_bias_ada_relu(Tensor x, Tensor? bias, Tensor? hidden, float eta, float eps, "
      "bool centered) -> (Tensor, Tensor, Tensor)");
  // (grad_x, grad_hidden, grad_bias); grad_hidden is empty unless gated, grad_bias (C,) is
  // empty unless has_bias.
  m.def(
      "ins_bias_ada_relu_backward(Tensor grad_y, Tensor x, Tensor mask, Tensor rstd, float eta, "
      "bool gated, bool has_bias, bool centered) -> (Tensor, Tensor, Tensor)");
  // Top-down InsNorm -> AdaReLU feedback: (zn, zn * mask, rstd); zn is the gate's new hidden.
  m.def(
      "ins_norm_gate(Tensor z, Tensor mask, float eps, bool centered) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ins_norm_gate_backward(Tensor grad_zn, Tensor grad_out, Tensor z, Tensor mask, "
      "Tensor rstd, bool centered) -> Tensor");

  // AdaPool, k x k windows with stride k: (y, argmax, argmin), positions uint8 window-local
  // (row * k + col), first element on ties. hidden=None: max-pool.
  m.def("ada_pool2d(Tensor x, Tensor? hidden, int kernel_size) -> (Tensor, Tensor, Tensor)");
  // Its feedback (unpool to the selected positions of a height x width plane) and backward.
  m.def(
      "ada_unpool2d(Tensor z, Tensor? hidden, Tensor argmax, Tensor argmin, int kernel_size, "
      "int height, int width) -> Tensor");
  // The unpool's backward: the gradient at the selected positions, pooled shape.
  m.def(
      "ada_pool2d_gather(Tensor grad, Tensor? hidden, Tensor argmax, Tensor argmin, "
      "int kernel_size) -> Tensor");

  // CPU-only stage fusions (other devices compose the ops above; see functional.py).
  // InsNorm -> Bias -> AdaReLU -> AdaPool: (y pooled, mask, rstd, argmax, argmin); the
  // full-resolution activation is not materialized. pool_hidden gates the pool.
  m.def(
      "ins_bias_ada_relu_pool2d(Tensor x, Tensor? bias, Tensor? hidden, Tensor? pool_hidden, "
      "float eta, float eps, bool centered, int kernel_size) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // AdaPool feedback then AdaReLU feedback: (u = unpool(z), u * mask).
  m.def(
      "ada_unpool_gate(Tensor z, Tensor? hidden, Tensor argmax, Tensor argmin, Tensor mask, "
      "int kernel_size, int height, int width) -> (Tensor, Tensor)");
  // Their backwards, without the full-resolution intermediates of the composed ones:
  // (grad_x, grad_hidden, grad_bias) from the pooled grad_y, as ins_bias_ada_relu_backward's;
  // grad_z = gather(grad_u + grad_out * mask), either gradient optional.
  m.def(
      "ins_bias_ada_relu_pool2d_backward(Tensor grad_y, Tensor x, Tensor mask, Tensor rstd, "
      "Tensor? pool_hidden, Tensor argmax, Tensor argmin, float eta, bool gated, bool has_bias, "
      "bool centered, int kernel_size) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ada_unpool_gate_backward(Tensor? grad_u, Tensor? grad_out, Tensor? hidden, Tensor argmax, "
      "Tensor argmin, Tensor mask, int kernel_size) -> Tensor");
}
