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
  // The stream form (docs/streaming.md): k, v are (B, Hkv, R0 + P + n, ·) buffers of R0 initial
  // slot keys, P earlier positions and the n new ones; relevancy0 (B, Hkv, P), slot_index0 and
  // slot_score0 (B, Hkv, R0) (slot s holds buffer row s if slot_index0 >= 0); key_padding_mask
  // (B, P + n) bool. relevant_index holds buffer rows, relevancy (B, Hkv, P + n) and span
  // (B, Hkv, R0 + P + n, 2) count queries of this call. With no state it is the op above, with
  // Hkv dividing H and padding.
  m.def(
      "screened_attention_stream(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask,"
      " Tensor relevancy0, Tensor slot_index0, Tensor slot_score0, int window, int relevant,"
      " float scale) -> (Tensor out, Tensor lse, Tensor relevant_index, Tensor relevant_score,"
      " Tensor relevancy, Tensor span)");
  m.def(
      "screened_attention_stream_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v,"
      " Tensor out, Tensor lse, Tensor span, Tensor? key_padding_mask, int initial_slots,"
      " int window, float scale) -> (Tensor, Tensor, Tensor)");
}
