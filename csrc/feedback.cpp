// Schemas of the CNN-F ops. Kernels: csrc/cpu/feedback.cpp, csrc/cuda/feedback.cu;
// fakes and autograd: screening_attn/feedback/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(screening_attn, m) {
  // y = AdaReLU(x; hidden, eta) and the bool gate mask. hidden=None: plain ReLU.
  m.def("ada_relu(Tensor x, Tensor? hidden, float eta) -> (Tensor, Tensor)");
  // (grad_x, grad_hidden) of the gated forward.
  m.def("ada_relu_backward(Tensor grad_y, Tensor mask, float eta) -> (Tensor, Tensor)");
  // z * mask: the gate's feedback pass, and the backward of the ungated forward.
  m.def("ada_relu_feedback(Tensor z, Tensor mask) -> Tensor");
}
