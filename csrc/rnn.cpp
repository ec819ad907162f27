// Schemas of the RelRNN / RelLSTM ops (docs/rnn.md). Step ops (kernels: csrc/cpu/rnn.cpp,
// csrc/cuda/rnn.cu) do everything between a step's matrix products, for all batch rows at once;
// their state lives in tensors they update in place (declared `Tensor(a!)`). The sequence ops
// run the loop over time, device-generic: csrc/rnn_loops.cpp. Fakes and autograd:
// screening_attn/rnn/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(screening_attn, m) {
  // ---- step ops: one time step t >= 1 of every batch row. hidden, uah: (T', B, Hd), the states
  // h_j and Ua h_j of steps j < t (read only); query (B, Hd) = Va s_{t-1}. Window: steps
  // t - min(t, window) .. t-1; relevant set: slot_index (B, ρ) (-1: empty), slot_score (B, ρ).
  // Writes s (B, Hd) = ½ (h_{t-1} + attn c_t), the weights alpha (B, window + ρ) over
  // [window | slots] (0 where no candidate), cand (B, ρ) = the slots attended; adds the window's
  // weights to relevancy (T', B); then screens step t - window into the slots. key_exp: None, or
  // e^{2 uah} as rnn_key_exp writes it (the CPU kernels then compute the scores from it).
  m.def(
      "rnn_attend_step(Tensor query, Tensor hidden, Tensor uah, Tensor v, Tensor(a!) slot_index,"
      " Tensor(b!) slot_score, Tensor(c!) relevancy, Tensor(d!) s, Tensor(e!) alpha,"
      " Tensor(f!) cand, int t, int window, float attn, Tensor? key_exp=None) -> ()");
  // Given grad_s = dL/ds_t: adds to grad_hidden, grad_uah (T', B, Hd) and grad_v (B, Hd, per
  // row); writes grad_query (B, Hd) = dL/dquery.
  m.def(
      "rnn_attend_step_backward(Tensor grad_s, Tensor query, Tensor hidden, Tensor uah, Tensor v,"
      " Tensor alpha, Tensor cand, Tensor(a!) grad_hidden, Tensor(b!) grad_uah,"
      " Tensor(c!) grad_v, Tensor(d!) grad_query, int t, int window, float attn,"
      " Tensor? key_exp=None) -> ()");
  // key_exp = e^{2 uah} per element, uah (..., Hd): the CPU step kernels take it as key_exp
  // (each term then costs a division, not a tanh); a row (last dimension) with some |uah| > 20,
  // where the exponentials leave the normal floats, gets a NaN first element and its terms take
  // tanh. CPU only: the CUDA step kernels ignore key_exp.
  m.def("rnn_key_exp(Tensor uah, Tensor(a!) key_exp) -> ()");
  // h = φ(pre); (B, Hd) each.
  m.def("rnn_activation(Tensor pre, Tensor? modrelu_b, str nonlinearity, Tensor(a!) h) -> ()");
  // grad_pre = dL/dpre from h = φ(pre) alone (modrelu too); adds dL/dmodrelu_b per row to
  // grad_b (B, Hd) for modrelu.
  m.def(
      "rnn_activation_backward(Tensor grad_h, Tensor h, str nonlinearity, Tensor(a!) grad_pre,"
      " Tensor(b!) grad_b) -> ()");
  // gates (B, 4Hd): in, the [f | i | o | g] pre-activations; out, the gates f, i, o = σ(·),
  // g = tanh(·). cell = f cell_prev + i g, h = o tanh(cell).
  m.def("lstm_cell(Tensor(a!) gates, Tensor cell_prev, Tensor(b!) cell, Tensor(c!) h) -> ()");
  // grad_cell: in, dL/dcell_t from step t+1; out, dL/dcell_{t-1}. Writes grad_gates (B, 4Hd).
  m.def(
      "lstm_cell_backward(Tensor grad_h, Tensor gates, Tensor cell, Tensor cell_prev,"
      " Tensor(a!) grad_cell, Tensor(b!) grad_gates) -> ()");

  // out (m, n) = a (m, k) @ b (k, n), or += with accumulate: the sequence ops' per-step
  // products, on the routine they use (the benchmark times them alone).
  m.def("rnn_step_mm(Tensor(a!) out, Tensor a, Tensor b, bool accumulate) -> ()");

  // ---- sequence ops: x (T, B, I), h0 (B, Hd). Return h (T, B, Hd), the state
  // (relevant_index (B, ρ), relevant_score (B, ρ), relevancy (T, B)) and the records the backward
  // needs (key_exp: e^{2 uah} on the CPU, which the backward reuses; empty elsewhere). Backward:
  // gradients of every input, screening decisions fixed.
  m.def(
      "rel_rnn(Tensor x, Tensor h0, Tensor U_weight, Tensor? U_bias, Tensor V_weight,"
      " Tensor Ua_weight, Tensor Va_weight, Tensor v, Tensor? modrelu_b, int window,"
      " int relevant, str nonlinearity, float attn) -> (Tensor h, Tensor relevant_index,"
      " Tensor relevant_score, Tensor relevancy, Tensor s, Tensor pq, Tensor uah, Tensor alpha,"
      " Tensor cand, Tensor key_exp)");
  m.def(
      "rel_rnn_backward(Tensor grad_h, Tensor x, Tensor h0, Tensor U_weight, Tensor V_weight,"
      " Tensor Ua_weight, Tensor Va_weight, Tensor v, Tensor h, Tensor s, Tensor pq,"
      " Tensor uah, Tensor alpha, Tensor cand, Tensor key_exp, int window,"
      " str nonlinearity, float attn) -> (Tensor grad_x, Tensor grad_h0, Tensor grad_U_weight,"
      " Tensor grad_U_bias, Tensor grad_V_weight, Tensor grad_Ua_weight, Tensor grad_Va_weight,"
      " Tensor grad_v, Tensor grad_modrelu_b)");
  m.def(
      "rel_lstm(Tensor x, Tensor h0, Tensor W, Tensor bias, Tensor Ua_weight, Tensor Va_weight,"
      " Tensor v, int window, int relevant) -> (Tensor h, Tensor relevant_index,"
      " Tensor relevant_score, Tensor relevancy, Tensor cell, Tensor s, Tensor pq, Tensor uah,"
      " Tensor alpha, Tensor cand, Tensor key_exp)");
  m.def(
      "rel_lstm_backward(Tensor grad_h, Tensor x, Tensor W, Tensor Ua_weight, Tensor Va_weight,"
      " Tensor v, Tensor h, Tensor cell, Tensor s, Tensor pq, Tensor uah,"
      " Tensor alpha, Tensor cand, Tensor key_exp, int window) -> (Tensor grad_x,"
      " Tensor grad_h0, Tensor grad_W,"
      " Tensor grad_bias, Tensor grad_Ua_weight, Tensor grad_Va_weight, Tensor grad_v)");
}
