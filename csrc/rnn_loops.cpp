// The sequence ops rel_rnn, rel_lstm and their backwards (schemas in csrc/rnn.cpp): the buffers,
// the products outside the time loop (the input part up front, the backward's weight gradients
// per chunk) and the loops over time. On the CPU the steps run in csrc/cpu/rnn.cpp's sequence
// loops (cpu/rnn_seq.h: one parallel region over blocks of rows, no dispatcher call per step).
// Elsewhere (CUDA; the CPU too when asked, see row_loops) the loops below call the step ops
// through the dispatcher and the per-step products through ATen (step_mm). Fakes and autograd:
// screening_attn/rnn/_ops.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string_view>

#include "cpu/rnn_seq.h"
#include "screening_attn/rnn.h"
#include "screening_attn/rnn_checks.h"

namespace screening_attn {

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensors7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensors9 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensors10 =
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensors11 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                             Tensor, Tensor>;

// The step ops, called through the dispatcher (so that the loops run on any device).

void attend_step(const Tensor& query, const Tensor& hidden, const Tensor& uah, const Tensor& v,
                 const Tensor& slot_index, const Tensor& slot_score, const Tensor& relevancy,
                 const Tensor& s, const Tensor& alpha, const Tensor& cand, int64_t t,
                 int64_t window, double attn, const OptTensor& key_exp) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("screening_attn::rnn_attend_step", "")
          .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      int64_t, int64_t, double, const OptTensor&)>();
  const SlotsFromLoop trusted;
  op.call(query, hidden, uah, v, slot_index, slot_score, relevancy, s, alpha, cand, t, window, attn,
          key_exp);
}

void attend_step_backward(const Tensor& grad_s, const Tensor& query, const Tensor& hidden,
                          const Tensor& uah, const Tensor& v, const Tensor& alpha,
                          const Tensor& cand, const Tensor& grad_hidden, const Tensor& grad_uah,
                          const Tensor& grad_v, const Tensor& grad_query, int64_t t, int64_t window,
                          double attn, const OptTensor& key_exp) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("screening_attn::rnn_attend_step_backward", "")
          .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, int64_t, int64_t, double, const OptTensor&)>();
  const SlotsFromLoop trusted;
  op.call(grad_s, query, hidden, uah, v, alpha, cand, grad_hidden, grad_uah, grad_v, grad_query, t,
          window, attn, key_exp);
}

void key_exp_op(const Tensor& uah, const Tensor& key_exp) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("screening_attn::rnn_key_exp", "")
                       .typed<void(const Tensor&, const Tensor&)>();
  op.call(uah, key_exp);
}

// The CPU step kernels' cache of e^{2 uah} (rnn_key_exp), shaped like uah; none on other
// devices (their kernels take tanh per term).
OptTensor key_exp_buffer(const Tensor& uah) {
  return uah.device().is_cpu() ? OptTensor(at::empty(uah.sizes(), uah.options())) : std::nullopt;
}

// The forward's E as a record: the buffer, or an empty tensor where there is none.
Tensor key_exp_record(const OptTensor& kexp, const Tensor& uah) {
  return kexp ? *kexp : at::empty({0}, uah.options());
}

// The backward's E: the forward's record (checked against uah), or where it is empty on the CPU,
// recomputed from uah in one pass.
OptTensor backward_key_exp(const Tensor& key_exp, const Tensor& uah) {
  if (key_exp.numel() == 0) {
    OptTensor kexp = key_exp_buffer(uah);
    if (kexp) key_exp_op(uah, *kexp);
    return kexp;
  }
  TORCH_CHECK_VALUE(uah.device().is_cpu(), "key_exp must be empty on ", uah.device());
  check_key_exp(uah, key_exp);
  return key_exp;
}

void activation(const Tensor& pre, const OptTensor& modrelu_b, c10::string_view nonlinearity,
                const Tensor& h) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("screening_attn::rnn_activation", "")
          .typed<void(const Tensor&, const OptTensor&, c10::string_view, const Tensor&)>();
  op.call(pre, modrelu_b, nonlinearity, h);
}

void activation_backward(const Tensor& grad_h, const Tensor& h, c10::string_view nonlinearity,
                         const Tensor& grad_pre, const Tensor& grad_b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("screening_attn::rnn_activation_backward", "")
                       .typed<void(const Tensor&, const Tensor&, c10::string_view, const Tensor&,
                                   const Tensor&)>();
  op.call(grad_h, h, nonlinearity, grad_pre, grad_b);
}

void lstm_cell(const Tensor& gates, const Tensor& cell_prev, const Tensor& cell, const Tensor& h) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("screening_attn::lstm_cell", "")
                       .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  op.call(gates, cell_prev, cell, h);
}

void lstm_cell_backward(const Tensor& grad_h, const Tensor& gates, const Tensor& cell,
                        const Tensor& cell_prev, const Tensor& grad_cell,
                        const Tensor& grad_gates) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("screening_attn::lstm_cell_backward", "")
                       .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, const Tensor&)>();
  op.call(grad_h, gates, cell, cell_prev, grad_cell, grad_gates);
}

// Steps per chunk of the backward: its weight gradients are products over the chunk.
constexpr int64_t kChunk = 64;

// out = a @ b into a preallocated (possibly row-strided) view.
void mm_into(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }

bool rows_contiguous(const Tensor& t) { return t.stride(1) == 1 && t.stride(0) >= t.size(1); }

// out = a @ b, or out += a @ b: the per-step products of the loops below (B rows). float32 on the
// CPU goes to torch's brgemm: at B = 16, Hd = 128 it takes ~30% less time than at::mm (MKL) on
// our machine and has almost no per-call overhead. It is single-threaded, so products too large
// to run on one thread at B rows keep at::mm. b must be row-major: transposes are made once.
void step_mm(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const bool small = m * n * k <= (int64_t{1} << 22) || at::get_num_threads() == 1;
  if (out.device().is_cpu() && out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
      b.scalar_type() == at::kFloat && m > 0 && n > 0 && k > 0 && small && rows_contiguous(out) &&
      rows_contiguous(a) && rows_contiguous(b) && brgemm_works()) {
    at::native::cpublas::brgemm(m, n, k, a.stride(0), b.stride(0), out.stride(0), accumulate,
                                a.const_data_ptr<float>(), b.const_data_ptr<float>(),
                                out.mutable_data_ptr<float>(), false);
  } else if (accumulate) {
    const_cast<Tensor&>(out).addmm_(a, b);
  } else {
    at::mm_out(const_cast<Tensor&>(out), a, b);
  }
}

// The op (screening_attn::rnn_step_mm) lets the benchmark time the loops' products alone.
void rnn_step_mm(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  TORCH_CHECK_VALUE(out.dim() == 2 && a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) &&
                        out.size(0) == a.size(0) && out.size(1) == b.size(1),
                    "rnn_step_mm: out (m, n), a (m, k), b (k, n) expected, got ", out.sizes(), ", ",
                    a.sizes(), ", ", b.sizes());
  check_same_dtype_device(out, "out", a, "a");
  check_same_dtype_device(out, "out", b, "b");
  step_mm(out, a, b, accumulate);
}

// Shared by both networks.

void check_sequence(const Tensor& x, const Tensor& h0, int64_t Hd, int64_t window, int64_t relevant,
                    std::initializer_list<std::pair<const Tensor*, const char*>> weights) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) >= 1,
                    "x must have shape (T >= 1, B, input_size), got ", x.sizes());
  TORCH_CHECK_VALUE(window >= 1, "window must be >= 1, got ", window);
  TORCH_CHECK_VALUE(relevant >= 0, "relevant must be >= 0, got ", relevant);
  TORCH_CHECK_VALUE(h0.dim() == 2 && h0.size(0) == x.size(1) && h0.size(1) == Hd,
                    "h0 must have shape (B, hidden_size) = (", x.size(1), ", ", Hd, "), got ",
                    h0.sizes());
  check_same_dtype_device(x, "x", h0, "h0");
  for (const auto& [w, name] : weights) check_same_dtype_device(x, "x", *w, name);
}

// A sequence backward's inputs against the records its forward returned: the (T, B, Hd) ones
// shaped like h, pq of width pq_blocks·Hd.
void check_records(const Tensor& grad_h, const Tensor& x, const Tensor& h,
                   std::initializer_list<std::pair<const Tensor&, const char*>> like_h,
                   const Tensor& pq, int64_t pq_blocks, const Tensor& alpha, const Tensor& cand,
                   const char* forward_op) {
  TORCH_CHECK_VALUE(h.dim() == 3, "h must be (T, B, Hd), got ", h.sizes());
  const int64_t T = h.size(0), B = h.size(1), Hd = h.size(2);
  check_same_shape(h, "h", grad_h, "grad_h");
  check_same_dtype_device(h, "h", grad_h, "grad_h");
  for (const auto& [t, name] : like_h) check_same_shape(h, "h", t, name);
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) == T && x.size(1) == B,
                    "x must have shape (T, B, input_size) with (T, B) = (", T, ", ", B, ")");
  TORCH_CHECK_VALUE(pq.dim() == 3 && pq.size(0) == T && pq.size(2) == pq_blocks * Hd &&
                        alpha.dim() == 3 && cand.dim() == 3,
                    "pq, alpha and cand must come from ", forward_op);
}

void check_weight(const Tensor& w, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, name,
                    " must have shape (", rows, ", ", cols, "), got ", w.sizes());
}

// The loop state: the relevant set (slot positions and scores) and every state's relevancy.
// Only min(relevant, T - window) slots can ever fill (states 0 .. T-1-window are screened), so
// the loop keeps that many and pads the result to `relevant` slots.
struct Screening {
  Tensor slot_index, slot_score, relevancy;
  int64_t window, relevant, live;

  Screening(int64_t T, int64_t B, int64_t window_, int64_t relevant_, const Tensor& like)
      : window(std::min(window_, T)),  // a window >= T never slides: same as T
        relevant(relevant_),
        live(std::min(relevant_, std::max<int64_t>(0, T - std::min(window_, T)))) {
    const auto acc = like.options().dtype(acc_type(like.scalar_type()));
    slot_index = at::full({B, live}, -1, like.options().dtype(at::kLong));
    slot_score = at::full({B, live}, -std::numeric_limits<double>::infinity(), acc);
    relevancy = at::zeros({T, B}, acc);
  }

  // (B, relevant) outputs: the live slots, then empty ones.
  std::pair<Tensor, Tensor> result() const {
    if (live == relevant) return {slot_index, slot_score};
    const int64_t B = slot_index.size(0);
    return {at::cat({slot_index, at::full({B, relevant - live}, -1, slot_index.options())}, 1),
            at::cat({slot_score,
                     at::full({B, relevant - live}, -std::numeric_limits<double>::infinity(),
                              slot_score.options())},
                    1)};
  }
};

// Records of the forward, for the backward: per step t >= 1 the softmax weights over
// [window columns | slots] and the slots attended (-1: empty).
struct Records {
  Tensor alpha, cand;
  Records(int64_t T, int64_t B, const Screening& sc, const Tensor& like) {
    alpha =
        at::empty({T, B, sc.window + sc.live}, like.options().dtype(acc_type(like.scalar_type())));
    cand = at::empty({T, B, sc.live}, like.options().dtype(at::kLong));
    alpha[0].zero_();  // step 0 does not attend
    cand[0].fill_(-1);
  }
};

// Whether the sequence ops run the CPU row-block loops (cpu/rnn_seq.h). Elsewhere, or on the CPU
// with SCREENING_ATTN_RNN_STEP_OPS=1 in the environment, the loops below call the step ops
// through the dispatcher per step: tests/mutants patch a step op and need the sequence ops to
// reach it, and test_rnn_kernels runs this device-generic loop on the CPU.
bool row_loops(const Tensor& x) {
  if (!x.device().is_cpu()) return false;
  const char* step_ops = std::getenv("SCREENING_ATTN_RNN_STEP_OPS");
  return step_ops == nullptr || std::string_view(step_ops) != "1";
}

// The CPU loops' view of a sequence's buffers (cpu/rnn_seq.h); the screening state and the
// network's own parts are added by the helpers below.
SeqBuffers seq_buffers(const Tensor& pq, const Tensor& s, const Tensor& h, const Tensor& uah,
                       const OptTensor& key_exp, const Tensor& v, const Tensor& Ws,
                       const Tensor& Ua, const Tensor& alpha, const Tensor& cand, int64_t window) {
  SeqBuffers b;
  b.pq = pq.contiguous();
  b.s = s.contiguous();
  b.h = h.contiguous();
  b.uah = uah.contiguous();
  b.key_exp = key_exp;
  b.v = v.contiguous();
  b.Ws = Ws.contiguous();
  b.Ua = Ua.contiguous();
  b.alpha = alpha.contiguous();
  b.cand = cand.contiguous();
  b.window = window;
  return b;
}

void rnn_buffers(SeqBuffers& b, c10::string_view nonlinearity, const OptTensor& modrelu_b,
                 double attn) {
  b.nonlinearity = parse_nonlinearity(nonlinearity);
  if (b.nonlinearity == kModRelu && modrelu_b) b.modrelu_b = modrelu_b->contiguous();
  b.attn = attn;
}

void lstm_buffers(SeqBuffers& b, const Tensor& cell) {
  b.lstm = true;
  b.cell = cell.contiguous();
}

void screening_buffers(SeqBuffers& b, const Screening& sc) {
  b.slot_index = sc.slot_index;
  b.slot_score = sc.slot_score;
  b.relevancy = sc.relevancy;
}

// RelRNN
//
// pq (T, B, 2Hd) holds per step [pre_t | Q_{t+1}]: it starts as [U x_t + b | 0] (the input part
// of every step in one product up front; the CPU loops zero a step's query part when they reach
// it), and each step adds s_t [V; Va]ᵀ in one product.
// t = 0: pre_0 = U x_0 + V h0, h_0 = φ(pre_0), and pre_0 is also the first query's state (s_0).
// t >= 1: s_t from the attention step with the query Q_t = Va s_{t-1}; h_t = φ(pre_t).
// Every step: uah_t = Ua h_t, once per state.
// Saved for the backward: s (s[0] = h0, the input of V at t = 0), pq, uah, alpha, cand, and on
// the CPU E = e^{2 uah} (the backward's attention steps read it; kept, not recomputed).

Tensors10 rel_rnn(const Tensor& x_, const Tensor& h0_, const Tensor& U_weight,
                  const OptTensor& U_bias, const Tensor& V_weight, const Tensor& Ua_weight,
                  const Tensor& Va_weight, const Tensor& v, const OptTensor& modrelu_b,
                  int64_t window, int64_t relevant, c10::string_view nonlinearity, double attn) {
  const int64_t Hd = V_weight.dim() == 2 ? V_weight.size(0) : -1;
  check_sequence(x_, h0_, Hd, window, relevant,
                 {{&U_weight, "U_weight"},
                  {&V_weight, "V_weight"},
                  {&Ua_weight, "Ua_weight"},
                  {&Va_weight, "Va_weight"},
                  {&v, "v"}});
  const int64_t T = x_.size(0), B = x_.size(1), I = x_.size(2);
  check_weight(U_weight, "U_weight", Hd, I);
  check_weight(V_weight, "V_weight", Hd, Hd);
  check_weight(Ua_weight, "Ua_weight", Hd, Hd);
  check_weight(Va_weight, "Va_weight", Hd, Hd);
  TORCH_CHECK_VALUE(v.numel() == Hd, "v must have hidden_size = ", Hd, " elements, got ",
                    v.sizes());
  if (U_bias) {
    check_same_dtype_device(x_, "x", *U_bias, "U_bias");
    TORCH_CHECK_VALUE(U_bias->numel() == Hd, "U_bias must have hidden_size = ", Hd,
                      " elements, got ", U_bias->sizes());
  }
  check_modrelu_b(x_, modrelu_b, parse_nonlinearity(nonlinearity), Hd);
  const Tensor x = x_.contiguous(), h0 = h0_.contiguous();
  const auto opt = x.options();
  // The loops make ~10 views and in-place updates of their own buffers per step: skip the
  // autograd view and version bookkeeping (the op's autograd is registered around it).
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  Screening sc(T, B, window, relevant, x);
  Records rec(T, B, sc, x);
  Tensor h = at::empty({T, B, Hd}, opt), s = at::empty({T, B, Hd}, opt);
  Tensor uah = at::empty({T, B, Hd}, opt), pq = at::empty({T, B, 2 * Hd}, opt);
  Tensor ux = pq.view({T * B, 2 * Hd}).narrow(1, 0, Hd);
  if (U_bias) {
    at::addmm_out(ux, U_bias->reshape({Hd}), x.view({T * B, I}), U_weight.t());
  } else {
    at::mm_out(ux, x.view({T * B, I}), U_weight.t());
  }
  const Tensor W = at::cat({V_weight, Va_weight}, 0).t().contiguous();  // (Hd, 2Hd): s -> [P | Q]
  const Tensor UaT = Ua_weight.t().contiguous();

  s[0].copy_(h0);
  const OptTensor kexp = key_exp_buffer(uah);
  if (row_loops(x)) {
    SeqBuffers buf = seq_buffers(pq, s, h, uah, kexp, v, W, UaT, rec.alpha, rec.cand, sc.window);
    rnn_buffers(buf, nonlinearity, modrelu_b, attn);
    screening_buffers(buf, sc);
    seq_forward_cpu(buf);
  } else {
    pq.narrow(2, Hd, Hd).zero_();  // the CPU loops zero each step's query part in cache
    Tensor pre0 = pq[0].narrow(1, 0, Hd);
    pre0.addmm_(h0, V_weight.t());
    activation(pre0, modrelu_b, nonlinearity, h[0]);
    mm_into(pq[0].narrow(1, Hd, Hd), pre0, Va_weight.t());
    mm_into(uah[0], h[0], UaT);
    if (kexp) key_exp_op(uah[0], (*kexp)[0]);
    for (int64_t t = 1; t < T; ++t) {
      attend_step(pq[t - 1].narrow(1, Hd, Hd), h, uah, v, sc.slot_index, sc.slot_score,
                  sc.relevancy, s[t], rec.alpha[t], rec.cand[t], t, sc.window, attn, kexp);
      Tensor pq_t = pq[t];
      step_mm(pq_t, s[t], W, true);
      activation(pq_t.narrow(1, 0, Hd), modrelu_b, nonlinearity, h[t]);
      Tensor uah_t = uah[t];
      step_mm(uah_t, h[t], UaT, false);
      if (kexp) key_exp_op(uah_t, (*kexp)[t]);
    }
  }
  auto [index, score] = sc.result();
  return {h,  index, score,     sc.relevancy, s,
          pq, uah,   rec.alpha, rec.cand,     key_exp_record(kexp, uah)};
}

// Reverse time. gH, gK: dL/dh_j, dL/duah_j (T, B, Hd), complete for step t once the steps after
// it are done. g[t] = [dL/dpre_t | dL/dQ_{t+1}] lives in a buffer of kChunk steps: when a chunk
// is done, its weight gradients (pairing g[t] with s_t) and dL/dx are products over the whole
// chunk. So the backward allocates two (T, B, Hd) buffers, not four.
Tensors9 rel_rnn_backward(const Tensor& grad_h, const Tensor& x_, const Tensor& h0,
                          const Tensor& U_weight, const Tensor& V_weight, const Tensor& Ua_weight,
                          const Tensor& Va_weight, const Tensor& v, const Tensor& h,
                          const Tensor& s, const Tensor& pq, const Tensor& uah, const Tensor& alpha,
                          const Tensor& cand, const Tensor& key_exp, int64_t window,
                          c10::string_view nonlinearity, double attn) {
  check_records(grad_h, x_, h, {{s, "s"}, {uah, "uah"}}, pq, 2, alpha, cand, "rel_rnn");
  const int64_t T = h.size(0), B = h.size(1), Hd = h.size(2);
  const int64_t I = x_.size(2);
  window = std::min(window, T);
  const Tensor x = x_.contiguous();
  const auto opt = h.options();
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in rel_rnn
  Tensor gH = at::empty({T, B, Hd}, opt);
  gH.copy_(grad_h);
  Tensor gK = at::zeros({T, B, Hd}, opt);
  const int64_t K = std::min(T, kChunk);
  Tensor chunk = at::empty({K, B, 2 * Hd}, opt);
  Tensor carry = at::zeros({B, Hd}, opt);  // dL/dQ_{t0} of the chunk below, from step t0
  Tensor gs = at::empty({B, Hd}, opt), gv = at::zeros({B, Hd}, opt), gb = at::zeros({B, Hd}, opt);
  const Tensor W = at::cat({V_weight, Va_weight}, 0);  // (2Hd, Hd): [gpre | gQ] -> gs
  const Tensor Ua = Ua_weight.contiguous();
  Tensor grad_x = at::empty({T, B, I}, opt), grad_U = at::zeros({Hd, I}, opt);
  Tensor grad_U_bias = at::zeros({Hd}, opt), grad_W = at::zeros({2 * Hd, Hd}, opt);
  Tensor grad_h0, grad_V0, grad_Va0;
  const OptTensor kexp = backward_key_exp(key_exp, uah);

  const bool rows = row_loops(h);
  std::optional<SeqBuffers> buf;
  if (rows) {
    buf = seq_buffers(pq, s, h, uah, kexp, v, W, Ua, alpha, cand, window);
    rnn_buffers(*buf, nonlinearity, std::nullopt, attn);
  }

  for (int64_t t1 = T; t1 > 0; t1 -= K) {
    const int64_t t0 = std::max<int64_t>(0, t1 - K), n = t1 - t0;
    Tensor g = chunk.narrow(0, 0, n);         // g[t - t0]
    g[n - 1].narrow(1, Hd, Hd).copy_(carry);  // dL/dQ_{t1} (0 for the last step: no query)
    int64_t t_top = t1 - 1;                   // the steps left to the loop below
    if (rows) {                               // steps t1-1 .. max(t0, 1)
      seq_backward_cpu(*buf, {gH, gK, g, carry, gs, gv, gb, {}}, t0, t1, 1);
      t_top = t0 == 0 ? 0 : t0 - 1;
    }
    for (int64_t t = t_top; t >= t0; --t) {
      Tensor gH_t = gH[t], g_t = g[t - t0];
      step_mm(gH_t, gK[t], Ua, true);  // uah_t = Ua h_t
      Tensor gpre = g_t.narrow(1, 0, Hd);
      activation_backward(gH_t, h[t], nonlinearity, gpre, gb);
      if (t == 0) {
        const Tensor gq1 = g_t.narrow(1, Hd, Hd);
        // pre_0 is also the state of the first query. Row-wise products through step_mm, as the
        // loop's: at::mm's rows at B = 5 changed with the thread count.
        step_mm(gpre, gq1, Va_weight.contiguous(), true);
        grad_h0 = at::empty({B, Hd}, opt);
        step_mm(grad_h0, gpre, V_weight.contiguous(), false);
        grad_V0 = at::mm(gpre.t(), h0);
        grad_Va0 = at::mm(gq1.t(), pq[0].narrow(1, 0, Hd));
        break;
      }
      step_mm(gs, g_t, W, false);
      attend_step_backward(gs, pq[t - 1].narrow(1, Hd, Hd), h, uah, v, alpha[t], cand[t], gH, gK,
                           gv, t > t0 ? g[t - 1 - t0].narrow(1, Hd, Hd) : carry, t, window, attn,
                           kexp);
    }
    const Tensor flat = g.view({n * B, 2 * Hd}), gpre = flat.narrow(1, 0, Hd);
    const Tensor xc = x.narrow(0, t0, n).view({n * B, I});
    mm_into(grad_x.narrow(0, t0, n).view({n * B, I}), gpre, U_weight);
    grad_U.addmm_(gpre.t(), xc);
    grad_U_bias.add_(gpre.sum(0));
    const int64_t skip = t0 == 0 ? B : 0;  // step 0's V and Va inputs are h0 and pre_0
    grad_W.addmm_(flat.narrow(0, skip, n * B - skip).t(),
                  s.narrow(0, t0, n).view({n * B, Hd}).narrow(0, skip, n * B - skip));
  }
  Tensor grad_V = grad_W.narrow(0, 0, Hd).add(grad_V0);
  Tensor grad_Va = grad_W.narrow(0, Hd, Hd).add(grad_Va0);
  Tensor grad_Ua = at::mm(gK.view({T * B, Hd}).t(), h.reshape({T * B, Hd}));
  return {grad_x,   grad_h0, grad_U,  grad_U_bias,
          grad_V,   grad_Ua, grad_Va, gv.sum(0).view(v.sizes()),
          gb.sum(0)};
}

// RelLSTM
//
// W = [Wf; Wi; Wo; Wg] (4Hd, Hd + I) acting on [s_t, x_t], bias (4Hd). pq (T, B, 5Hd) holds per
// step [gates_t | Q_{t+1}]: it starts as [W_x x_t + bias | 0] (one product up front; the query
// part zeroed as for RelRNN), each step
// adds s_t [W_s; Va]ᵀ (s_0 = h0), and the cell turns the gate pre-activations into the gates
// f, i, o, g in place. Saved: cell, s, pq, uah, alpha, cand, E (as for RelRNN).

Tensors11 rel_lstm(const Tensor& x_, const Tensor& h0_, const Tensor& W_, const Tensor& bias,
                   const Tensor& Ua_weight, const Tensor& Va_weight, const Tensor& v,
                   int64_t window, int64_t relevant) {
  const int64_t Hd = Ua_weight.dim() == 2 ? Ua_weight.size(0) : -1;
  check_sequence(x_, h0_, Hd, window, relevant,
                 {{&W_, "W"},
                  {&bias, "bias"},
                  {&Ua_weight, "Ua_weight"},
                  {&Va_weight, "Va_weight"},
                  {&v, "v"}});
  const int64_t T = x_.size(0), B = x_.size(1), I = x_.size(2);
  check_weight(W_, "W", 4 * Hd, Hd + I);
  check_weight(Ua_weight, "Ua_weight", Hd, Hd);
  check_weight(Va_weight, "Va_weight", Hd, Hd);
  TORCH_CHECK_VALUE(bias.numel() == 4 * Hd, "bias must have 4 hidden_size = ", 4 * Hd,
                    " elements, got ", bias.sizes());
  TORCH_CHECK_VALUE(v.numel() == Hd, "v must have hidden_size = ", Hd, " elements, got ",
                    v.sizes());
  const Tensor x = x_.contiguous(), h0 = h0_.contiguous();
  const auto opt = x.options();
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in rel_rnn

  Screening sc(T, B, window, relevant, x);
  Records rec(T, B, sc, x);
  Tensor h = at::empty({T, B, Hd}, opt), cell = at::empty({T, B, Hd}, opt);
  Tensor s = at::empty({T, B, Hd}, opt), uah = at::empty({T, B, Hd}, opt);
  Tensor pq = at::empty({T, B, 5 * Hd}, opt);
  Tensor xg = pq.view({T * B, 5 * Hd}).narrow(1, 0, 4 * Hd);
  at::addmm_out(xg, bias.reshape({4 * Hd}), x.view({T * B, I}), W_.narrow(1, Hd, I).t());
  const Tensor Wc = at::cat({W_.narrow(1, 0, Hd), Va_weight}, 0).t().contiguous();  // (Hd, 5Hd)
  const Tensor UaT = Ua_weight.t().contiguous();
  const Tensor cell_init = at::zeros({B, Hd}, opt);

  const OptTensor kexp = key_exp_buffer(uah);
  s[0].copy_(h0);
  if (row_loops(x)) {
    SeqBuffers buf = seq_buffers(pq, s, h, uah, kexp, v, Wc, UaT, rec.alpha, rec.cand, sc.window);
    lstm_buffers(buf, cell);
    screening_buffers(buf, sc);
    seq_forward_cpu(buf);
  } else {
    pq.narrow(2, 4 * Hd, Hd).zero_();  // as in rel_rnn
    for (int64_t t = 0; t < T; ++t) {
      if (t > 0) {
        attend_step(pq[t - 1].narrow(1, 4 * Hd, Hd), h, uah, v, sc.slot_index, sc.slot_score,
                    sc.relevancy, s[t], rec.alpha[t], rec.cand[t], t, sc.window, 1.0, kexp);
      }
      Tensor pq_t = pq[t];
      step_mm(pq_t, s[t], Wc, true);
      lstm_cell(pq_t.narrow(1, 0, 4 * Hd), t > 0 ? cell[t - 1] : cell_init, cell[t], h[t]);
      Tensor uah_t = uah[t];
      step_mm(uah_t, h[t], UaT, false);
      if (kexp) key_exp_op(uah_t, (*kexp)[t]);
    }
  }
  auto [index, score] = sc.result();
  return {h,
          index,
          score,
          sc.relevancy,
          cell,
          s,
          pq,
          uah,
          rec.alpha,
          rec.cand,
          key_exp_record(kexp, uah)};
}

Tensors7 rel_lstm_backward(const Tensor& grad_h, const Tensor& x_, const Tensor& W_,
                           const Tensor& Ua_weight, const Tensor& Va_weight, const Tensor& v,
                           const Tensor& h, const Tensor& cell, const Tensor& s, const Tensor& pq,
                           const Tensor& uah, const Tensor& alpha, const Tensor& cand,
                           const Tensor& key_exp, int64_t window) {
  check_records(grad_h, x_, h, {{cell, "cell"}, {s, "s"}, {uah, "uah"}}, pq, 5, alpha, cand,
                "rel_lstm");
  const int64_t T = h.size(0), B = h.size(1), Hd = h.size(2);
  const int64_t I = x_.size(2);
  window = std::min(window, T);
  const Tensor x = x_.contiguous();
  const auto opt = h.options();
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in rel_rnn
  Tensor gH = at::empty({T, B, Hd}, opt);
  gH.copy_(grad_h);
  Tensor gK = at::zeros({T, B, Hd}, opt);
  const int64_t K = std::min(T, kChunk);
  Tensor chunk = at::empty({K, B, 5 * Hd}, opt);  // [dL/dgates_t | dL/dQ_{t+1}], as for RelRNN
  Tensor carry = at::zeros({B, Hd}, opt);
  Tensor gs = at::empty({B, Hd}, opt), gv = at::zeros({B, Hd}, opt);
  Tensor gcell = at::zeros({B, Hd}, opt);
  const Tensor cell_init = at::zeros({B, Hd}, opt);
  const Tensor Wc = at::cat({W_.narrow(1, 0, Hd), Va_weight}, 0);  // (5Hd, Hd)
  const Tensor Ua = Ua_weight.contiguous();
  const Tensor Wx = W_.narrow(1, Hd, I);
  Tensor grad_x = at::empty({T, B, I}, opt), grad_sq = at::zeros({5 * Hd, Hd}, opt);
  Tensor grad_Wx = at::zeros({4 * Hd, I}, opt), grad_bias = at::zeros({4 * Hd}, opt);
  const OptTensor kexp = backward_key_exp(key_exp, uah);

  const bool rows = row_loops(h);
  std::optional<SeqBuffers> buf;
  if (rows) {
    buf = seq_buffers(pq, s, h, uah, kexp, v, Wc, Ua, alpha, cand, window);
    lstm_buffers(*buf, cell);
  }

  for (int64_t t1 = T; t1 > 0; t1 -= K) {
    const int64_t t0 = std::max<int64_t>(0, t1 - K), n = t1 - t0;
    Tensor g = chunk.narrow(0, 0, n);
    g[n - 1].narrow(1, 4 * Hd, Hd).copy_(carry);
    if (rows) {  // every step of the chunk
      seq_backward_cpu(*buf, {gH, gK, g, carry, gs, gv, {}, gcell}, t0, t1, 0);
    }
    for (int64_t t = rows ? t0 - 1 : t1 - 1; t >= t0; --t) {
      Tensor gH_t = gH[t], g_t = g[t - t0];
      step_mm(gH_t, gK[t], Ua, true);
      lstm_cell_backward(gH_t, pq[t].narrow(1, 0, 4 * Hd), cell[t], t > 0 ? cell[t - 1] : cell_init,
                         gcell, g_t.narrow(1, 0, 4 * Hd));
      step_mm(gs, g_t, Wc, false);
      if (t > 0) {
        attend_step_backward(gs, pq[t - 1].narrow(1, 4 * Hd, Hd), h, uah, v, alpha[t], cand[t], gH,
                             gK, gv, t > t0 ? g[t - 1 - t0].narrow(1, 4 * Hd, Hd) : carry, t,
                             window, 1.0, kexp);
      }
    }
    const Tensor flat = g.view({n * B, 5 * Hd}), ggates = flat.narrow(1, 0, 4 * Hd);
    const Tensor xc = x.narrow(0, t0, n).view({n * B, I});
    grad_sq.addmm_(flat.t(), s.narrow(0, t0, n).view({n * B, Hd}));  // d[W_s; Va], s_0 = h0
    grad_Wx.addmm_(ggates.t(), xc);
    grad_bias.add_(ggates.sum(0));
    mm_into(grad_x.narrow(0, t0, n).view({n * B, I}), ggates, Wx);
  }
  Tensor grad_W = at::cat({grad_sq.narrow(0, 0, 4 * Hd), grad_Wx}, 1);
  Tensor grad_Ua = at::mm(gK.view({T * B, Hd}).t(), h.reshape({T * B, Hd}));
  return {grad_x,
          gs,
          grad_W,
          grad_bias,
          grad_Ua,
          grad_sq.narrow(0, 4 * Hd, Hd).clone(),
          gv.sum(0).view(v.sizes())};  // gs = dL/ds_0 = dL/dh0
}

}  // namespace

TORCH_LIBRARY_IMPL(screening_attn, CPU, m) {
  m.impl("rnn_step_mm", &rnn_step_mm);
  m.impl("rel_rnn", &rel_rnn);
  m.impl("rel_rnn_backward", &rel_rnn_backward);
  m.impl("rel_lstm", &rel_lstm);
  m.impl("rel_lstm_backward", &rel_lstm_backward);
}

#ifdef SCREENING_ATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(screening_attn, CUDA, m) {
  m.impl("rnn_step_mm", &rnn_step_mm);
  m.impl("rel_rnn", &rel_rnn);
  m.impl("rel_rnn_backward", &rel_rnn_backward);
  m.impl("rel_lstm", &rel_lstm);
  m.impl("rel_lstm_backward", &rel_lstm_backward);
}
#endif

}  // namespace screening_attn
