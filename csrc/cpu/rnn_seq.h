// The CPU sequence ops' time loops (kernels in csrc/cpu/rnn.cpp; the ops, their buffers and the
// products outside the loops in csrc/rnn_loops.cpp). A batch row's states, attention, screening
// and gradients never touch another row's, so the rows are independent not only within a step
// but over the whole loop: one at::parallel_for over blocks of rows runs every step of its
// block, its rows of each per-step product included (one GEMM per block on the block's
// thread), with no synchronisation and no dispatcher call per step (docs/kernels/cpu-cuda.md).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace screening_attn {

// Whether torch's small-matrix GEMM (at::native::cpublas::brgemm: oneDNN's ukernel) runs float32
// in this build; asked once, with a 1 x 1 product.
bool brgemm_works();

// The buffers of one sequence (csrc/rnn_loops.cpp's rel_rnn / rel_lstm): every tensor
// contiguous, (T, B, ·) ones indexed [t][b]. P = 2Hd (RelRNN: [pre | Q]) or 5Hd (RelLSTM:
// [gates | Q]).
struct SeqBuffers {
  bool lstm = false;
  int nonlinearity = 0;                 // RelRNN's φ (a Nonlinearity)
  at::Tensor pq;                        // (T, B, P)
  at::Tensor s, h, uah, cell;           // (T, B, Hd); cell: RelLSTM only
  std::optional<at::Tensor> key_exp;    // (T, B, Hd) e^{2 uah} (rnn_key_exp), or none: tanh terms
  at::Tensor v;                         // (Hd)
  std::optional<at::Tensor> modrelu_b;  // (Hd), RelRNN with modrelu
  at::Tensor Ws;                        // forward (Hd, P): s -> pq; backward (P, Hd): gpq -> gs
  at::Tensor Ua;                        // forward Uaᵀ, backward Ua (Hd, Hd)
  at::Tensor slot_index, slot_score;    // (B, live) the relevant set (forward)
  at::Tensor relevancy;                 // (T, B) (forward)
  at::Tensor alpha, cand;               // (T, B, window + live), (T, B, live): the records
  int64_t window = 1;
  double attn = 1.0;
};

// Forward steps 0 .. T-1 of every row, given s_0 = h0 and pq holding the input part (its query
// part is zeroed here, step by step).
void seq_forward_cpu(const SeqBuffers& a);

// Gradient buffers of the backward: gH, gK (T, B, Hd) dL/dh, dL/duah; g (n, B, P) the chunk of
// steps t0 .. t0+n-1; carry, gs, gv (B, Hd); gb (B, Hd): RelRNN; gcell (B, Hd): RelLSTM.
struct SeqGrads {
  at::Tensor gH, gK, g, carry, gs, gv, gb, gcell;
};

// Backward steps t1-1 down to max(t0, t_stop) of every row (the chunk [t0, t1)); step t0's
// dL/dQ goes to carry. RelRNN stops at t_stop = 1 (the caller does step 0), RelLSTM at 0.
void seq_backward_cpu(const SeqBuffers& a, const SeqGrads& g, int64_t t0, int64_t t1,
                      int64_t t_stop);

}  // namespace screening_attn
