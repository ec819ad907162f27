// Schemas of screened attention (docs/attention.md). Kernels: csrc/cpu/attention.cpp; fakes and
// autograd: screening_attn/attention/_ops.py. All tensors are (B, H, T, ·).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(screening_attn, m) {
  // out, lse (the log-sum-exp of each query's logits, for the backward), and the state:
  // relevant_index (B,H,ρ) int64, relevant_score (B,H,ρ), relevancy (B,H,T), span (B,H,T,2) int32.
  m.def(
      "screened_attention(Tensor q, Tensor k, Tensor v, int window, int relevant, float scale)"
      " -> (Tensor out, Tensor lse, Tensor relevant_index, Tensor relevant_score,"
      " Tensor relevancy, Tensor span)");
  // Gradients for q, k, v with the candidate sets fixed (rebuilt from span).
  m.def(
      "screened_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,"
      " Tensor lse, Tensor span, int window, float scale) -> (Tensor, Tensor, Tensor)");
}
