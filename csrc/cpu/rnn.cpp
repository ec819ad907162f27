// CPU kernels of the RelRNN / RelLSTM step ops (design and costs: docs/kernels/cpu-cuda.md;
// schemas: csrc/rnn.cpp), and the CPU time loops of the sequence ops, which call the row kernels
// directly (at the end, cpu/rnn_seq.h; the ops themselves: csrc/rnn_loops.cpp). Every step op is
// parallel over the B batch rows (at::parallel_for); a row's work is sequential and vectorized over
// the Hd features, and the row kernels are compiled for AVX-512 and AVX2 too
// (SCREENING_ATTN_CLONES, vec.h). The element math (scores, activations, LSTM cell) is shared with
// the CUDA kernels (include/screening_attn/rnn.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string_view>
#include <vector>

#include "rnn_seq.h"
#include "vec.h"

#include "screening_attn/rnn.h"
#include "screening_attn/rnn_checks.h"

namespace screening_attn {

namespace {

// Rows per task: a thread wake-up costs a few microseconds, a row ~`work` element operations.
int64_t grain_for(int64_t work) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work)); }

// Every filled slot must hold a step older than step t's window (else a candidate would repeat).
// Checked before the row loops: an exception must not cross the target_clones functions.
void check_slots(const at::Tensor& slots, const char* name, int64_t t, int64_t window) {
  const at::Tensor c = slots.contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  const int64_t oldest_window_step = t - std::min(t, window);
  for (int64_t i = 0; i < c.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] < oldest_window_step, name, " holds step ", p[i],
                      ", which is not older than the window of step ", t, " (window ", window, ")");
  }
}

// Σ_{d < n} f(d) over explicit 64-byte lane vectors, then a tree over the lanes: GCC's epilogue
// for `omp simd reduction` adds the lanes one at a time, which costs as much as the loop at
// Hd = 128.
template <typename T, typename F>
SCREENING_ATTN_INLINE T lane_sum(int64_t n, F&& f) {
  constexpr int L = 64 / sizeof(T);
  alignas(64) T acc[L] = {};
  int64_t d = 0;
  for (; d + L <= n; d += L) {
#pragma omp simd
    for (int i = 0; i < L; ++i) acc[i] += f(d + i);
  }
  T tail = 0;
  for (; d < n; ++d) tail += f(d);
  // The tree over the lanes (lane i + lane i + L/2, then i + L/4, ...), in registers: halves of
  // 32, then 16 bytes, then shuffles. Written as a loop over the array, GCC took its last levels
  // through the stack, one scalar at a time (1.5 ms more per 70 ms RelRNN forward, same bits).
  typedef T V32 __attribute__((vector_size(32)));
  typedef T V16 __attribute__((vector_size(16)));
  V32 lo, hi;
  std::memcpy(&lo, acc, 32);
  std::memcpy(&hi, acc + L / 2, 32);
  lo += hi;
  V16 a, b;
  std::memcpy(&a, &lo, 16);
  std::memcpy(&b, reinterpret_cast<const char*>(&lo) + 16, 16);
  a += b;
  if constexpr (sizeof(T) == 4) {
    typedef int32_t I16 __attribute__((vector_size(16)));
    a += __builtin_shuffle(a, I16{2, 3, 0, 1});
    a += __builtin_shuffle(a, I16{1, 0, 3, 2});
    return a[0] + tail;
  } else {
    return (a[0] + a[1]) + tail;
  }
}

// One attention step, all rows. hidden, uah: (T', B, Hd), row b of step j at (j B + b) Hd.
// kexp: e^{2 uah} as rnn_key_exp writes it (a NaN first element marks a row out of range), or
// null: then every term takes tanh.
template <typename T>
struct Step {
  const T* hidden;
  const T* uah;
  const T* kexp;
  const T* v;    // (Hd)
  const T* vm2;  // -2 v
  const T* v4;   // 4 v
  const T* q;    // (B, Hd) queries, row stride ldq
  int64_t ldq, B, Hd, t, window, rho;
  T attn, vsum;  // vsum = Σ v
  const T* h(int64_t j, int64_t b) const { return hidden + (j * B + b) * Hd; }
  const T* k(int64_t j, int64_t b) const { return uah + (j * B + b) * Hd; }
  // The exponentials of key j for row b, or null where its terms take tanh.
  const T* ek(int64_t j, int64_t b) const {
    const T* e = kexp + (j * B + b) * Hd;
    return e[0] == e[0] ? e : nullptr;
  }
};

// g = e^{-2q} of a query row; false (take tanh) if some |q_d| > kExpLimit.
// (An int count: GCC does not vectorize a bool reduction.)
template <typename T>
SCREENING_ATTN_INLINE bool query_exps(const T* q, T* g, int64_t n) {
  int64_t in_range = 0;
#pragma omp simd reduction(+ : in_range)
  for (int64_t d = 0; d < n; ++d) {
    g[d] = exp_twice(-q[d]);
    in_range += in_exp_range(q[d]) ? 1 : 0;
  }
  return in_range == n;
}

// Work space of the attention rows for up to nmax candidates (window + ρ), allocated once per
// call or row block rather than per step: candidates' steps and columns, their scores (forward)
// or dα (backward), and 3 Hd values (e^{-2q}; backward also Σ de R and ½ attn dL/ds).
template <typename T>
struct Scratch {
  std::vector<int64_t> pos, col;
  std::vector<T> e, g;
  Scratch(int64_t nmax, int64_t Hd) : pos(nmax), col(nmax), e(nmax), g(3 * Hd) {}
};

template <typename T>
struct Forward {
  Step<T> st;
  int64_t* slots;  // (B, ρ)
  T* slot_score;   // (B, ρ)
  T* relevancy;    // (T', B)
  T* s;            // (B, Hd), row stride lds
  T* alpha;        // (B, window + ρ), row stride lda
  int64_t* cand;   // (B, ρ), row stride ldc
  int64_t lds, lda, ldc;
};

template <typename T>
struct Backward {
  Step<T> st;
  const T* gs;          // (B, Hd) dL/ds_t, row stride ldg
  const T* alpha;       // (B, window + ρ), row stride lda
  const int64_t* cand;  // (B, ρ)
  T* gh;                // (T', B, Hd) += dL/dh_j
  T* gk;                // (T', B, Hd) += dL/duah_j
  T* gv;                // (B, Hd) += dL/dv per row
  T* gq;                // (B, Hd) = dL/dquery, row stride ldgq
  int64_t ldg, lda, ldgq;
};

// Rows [begin, end) of step t: scores over the candidates, softmax, context,
// s_t = ½ (h_{t-1} + attn c_t), relevancy of the window, then the screening of step t-window
// (it has just left the window).
template <typename T>
SCREENING_ATTN_INLINE void attend_rows_impl(const Forward<T>& f, Scratch<T>& w, int64_t begin,
                                            int64_t end) {
  const Step<T>& st = f.st;
  const int64_t Hd = st.Hd, t = st.t, window = st.window, rho = st.rho;
  const int64_t nw = std::min(t, window);
  int64_t *pos = w.pos.data(), *col = w.col.data();
  T *e = w.e.data(), *g = w.g.data();
  const T *v = st.v, *vm2 = st.vm2;
  for (int64_t b = begin; b < end; ++b) {
    int64_t* slots = f.slots + b * rho;
    T* slot_score = f.slot_score + b * rho;
    T* alpha = f.alpha + b * f.lda;
    T* s = f.s + b * f.lds;
    const T* q = st.q + b * st.ldq;
    std::copy(slots, slots + rho, f.cand + b * f.ldc);  // the slots attended, for the backward
    const int64_t nc = step_candidates(slots, rho, t, nw, window, pos, col);
    const bool exps = st.kexp != nullptr && query_exps(q, g, Hd);
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < nc; ++c) {
      const T* ek = exps ? st.ek(pos[c], b) : nullptr;
      if (ek != nullptr) {  // Σ v (1 - 2R)
        e[c] =
            st.vsum + lane_sum<T>(Hd, [&](int64_t d) { return vm2[d] * exp_ratio(g[d], ek[d]); });
      } else {
        const T* k = st.k(pos[c], b);
        e[c] = lane_sum<T>(Hd, [&](int64_t d) { return score_term(q[d], k[d], v[d]); });
      }
      mx = std::max(mx, e[c]);
    }
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) e[c] = exp_nonpositive(e[c] - mx);  // one vector pass
    T z = 0;
    for (int64_t c = 0; c < nc; ++c) z += e[c];
    const T inv = T(1) / z;
    std::fill(alpha, alpha + window + rho, T(0));
    std::fill(s, s + Hd, T(0));
    for (int64_t c = 0; c < nc; ++c) {
      const T a = e[c] * inv;
      alpha[col[c]] = a;
      if (c < nw) f.relevancy[pos[c] * st.B + b] += a;
      const T* hc = st.h(pos[c], b);
#pragma omp simd
      for (int64_t d = 0; d < Hd; ++d) s[d] += a * hc[d];  // s = c_t for now
    }
    const T* h_prev = st.h(t - 1, b);
#pragma omp simd
    for (int64_t d = 0; d < Hd; ++d) s[d] = T(0.5) * (h_prev[d] + st.attn * s[d]);
    if (t >= window) {
      const int64_t leaving = t - window;
      const T r = f.relevancy[leaving * st.B + b];
      const int slot = screen_slot(slots, slot_score, static_cast<int>(rho), r);
      if (slot >= 0) {
        slots[slot] = leaving;
        slot_score[slot] = r;
      }
    }
  }
}

// Rows [begin, end) of the backward of step t, given gs = dL/ds_t: with gc = ½ attn gs,
// dα_c = gc·h_c, de_c = α_c (dα_c - Σ α dα); dh_{t-1} += ½ gs; then per candidate
// dq, dk_c += de_c v (1 - z_c²), dv += de_c z_c, dh_c += α_c gc. A row writes only its own
// rows of gh, gk (its candidates are distinct steps): no races, the same bits on any thread
// count.
template <typename T>
SCREENING_ATTN_INLINE void attend_backward_rows_impl(const Backward<T>& g, Scratch<T>& w,
                                                     int64_t begin, int64_t end) {
  const Step<T>& st = g.st;
  const int64_t Hd = st.Hd, B = st.B, t = st.t, window = st.window, rho = st.rho;
  const int64_t nw = std::min(t, window);
  int64_t *pos = w.pos.data(), *col = w.col.data();
  T *ga = w.e.data(), *gc = w.g.data() + 2 * Hd;
  T *g_exp = w.g.data(), *dr = g_exp + Hd;  // e^{-2q}; Σ de R over the exp-path candidates
  const T *v = st.v, *v4 = st.v4;
  for (int64_t b = begin; b < end; ++b) {
    const T* gs = g.gs + b * g.ldg;
    const T* alpha = g.alpha + b * g.lda;
    const T* q = st.q + b * st.ldq;
    T* gq = g.gq + b * g.ldgq;
    T* gv = g.gv + b * Hd;
    const int64_t nc = step_candidates(g.cand + b * rho, rho, t, nw, window, pos, col);
    T* gh_prev = g.gh + ((t - 1) * B + b) * Hd;
#pragma omp simd
    for (int64_t d = 0; d < Hd; ++d) {
      gc[d] = T(0.5) * st.attn * gs[d];
      gh_prev[d] += T(0.5) * gs[d];
      gq[d] = T(0);
    }
    T delta = 0;
    for (int64_t c = 0; c < nc; ++c) {
      const T* hc = st.h(pos[c], b);
      ga[c] = lane_sum<T>(Hd, [&](int64_t d) { return gc[d] * hc[d]; });
      delta += alpha[col[c]] * ga[c];
    }
    const bool exps = st.kexp != nullptr && query_exps(q, g_exp, Hd);
    if (exps) std::fill(dr, dr + Hd, T(0));
    T de_sum = 0;
    for (int64_t c = 0; c < nc; ++c) {
      const T a = alpha[col[c]], de = a * (ga[c] - delta);
      const int64_t off = (pos[c] * B + b) * Hd;
      T* dk = g.gk + off;
      T* dh = g.gh + off;
      const T* ek = exps ? st.ek(pos[c], b) : nullptr;
      if (ek != nullptr) {
        de_sum += de;
#pragma omp simd
        for (int64_t d = 0; d < Hd; ++d) {
          const T u = exp_term_backward(exp_ratio(g_exp[d], ek[d]), v4[d], de, &dr[d]);
          gq[d] += u;
          dk[d] += u;
          dh[d] += a * gc[d];
        }
      } else {
        const T* k = st.uah + off;
#pragma omp simd
        for (int64_t d = 0; d < Hd; ++d) {
          const T u = score_term_backward(q[d], k[d], v[d], de, &gv[d]);
          gq[d] += u;
          dk[d] += u;
          dh[d] += a * gc[d];
        }
      }
    }
    if (exps) {
#pragma omp simd
      for (int64_t d = 0; d < Hd; ++d) gv[d] += de_sum - T(2) * dr[d];  // Σ de z = Σ de (1 - 2R)
    }
  }
}

SCREENING_ATTN_CLONES void attend_rows(const Forward<float>& f, Scratch<float>& w, int64_t begin,
                                       int64_t end) {
  attend_rows_impl(f, w, begin, end);
}
void attend_rows(const Forward<double>& f, Scratch<double>& w, int64_t begin, int64_t end) {
  attend_rows_impl(f, w, begin, end);
}
SCREENING_ATTN_CLONES void attend_backward_rows(const Backward<float>& g, Scratch<float>& w,
                                                int64_t begin, int64_t end) {
  attend_backward_rows_impl(g, w, begin, end);
}
void attend_backward_rows(const Backward<double>& g, Scratch<double>& w, int64_t begin,
                          int64_t end) {
  attend_backward_rows_impl(g, w, begin, end);
}

// The Step of a call: v's multiples for the exp path (when key_exp is given) live in vbuf.
template <typename T>
Step<T> make_step(const at::Tensor& hidden, const at::Tensor& uah,
                  const std::optional<at::Tensor>& key_exp, const at::Tensor& v,
                  const at::Tensor& query, int64_t t, int64_t window, int64_t rho, double attn,
                  std::vector<T>& vbuf) {
  const int64_t B = query.size(0), Hd = query.size(1);
  const T* vp = v.const_data_ptr<T>();
  T vsum = 0;
  if (key_exp && Hd > 0) {
    vbuf.resize(2 * Hd);
    for (int64_t d = 0; d < Hd; ++d) {
      vbuf[d] = T(-2) * vp[d];
      vbuf[Hd + d] = T(4) * vp[d];
      vsum += vp[d];
    }
  }
  return {hidden.const_data_ptr<T>(),
          uah.const_data_ptr<T>(),
          key_exp && Hd > 0 ? key_exp->const_data_ptr<T>() : nullptr,
          vp,
          vbuf.data(),
          vbuf.data() + Hd,
          query.const_data_ptr<T>(),
          query.stride(0),
          B,
          Hd,
          t,
          window,
          rho,
          static_cast<T>(attn),
          vsum};
}

void rnn_attend_step_cpu(const at::Tensor& query_, const at::Tensor& hidden_,
                         const at::Tensor& uah_, const at::Tensor& v_, const at::Tensor& slot_index,
                         const at::Tensor& slot_score, const at::Tensor& relevancy,
                         const at::Tensor& s, const at::Tensor& alpha, const at::Tensor& cand,
                         int64_t t, int64_t window, double attn,
                         const std::optional<at::Tensor>& key_exp) {
  check_attend_step(query_, hidden_, uah_, v_, slot_index, slot_score, relevancy, s, alpha, cand, t,
                    window);
  check_key_exp_arg(key_exp, uah_);
  check_slots(slot_index, "slot_index", t, window);
  const at::Tensor query = rows_of(query_);
  const at::Tensor hidden = hidden_.contiguous(), uah = uah_.contiguous(), v = v_.contiguous();
  const int64_t B = query.size(0), Hd = query.size(1), rho = slot_index.size(1);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "rnn_attend_step_cpu", [&] {
    using T = scalar_t;
    std::vector<T> vbuf;
    const Forward<T> f{make_step<T>(hidden, uah, key_exp, v, query, t, window, rho, attn, vbuf),
                       slot_index.mutable_data_ptr<int64_t>(),
                       slot_score.mutable_data_ptr<T>(),
                       relevancy.mutable_data_ptr<T>(),
                       s.mutable_data_ptr<T>(),
                       alpha.mutable_data_ptr<T>(),
                       cand.mutable_data_ptr<int64_t>(),
                       s.stride(0),
                       alpha.stride(0),
                       cand.stride(0)};
    at::parallel_for(0, B, grain_for((std::min(t, window) + rho) * Hd),
                     [&](int64_t begin, int64_t end) {
                       Scratch<T> w(window + rho, Hd);
                       attend_rows(f, w, begin, end);
                     });
  });
}

void rnn_attend_step_backward_cpu(const at::Tensor& grad_s_, const at::Tensor& query_,
                                  const at::Tensor& hidden_, const at::Tensor& uah_,
                                  const at::Tensor& v_, const at::Tensor& alpha_,
                                  const at::Tensor& cand_, const at::Tensor& grad_hidden,
                                  const at::Tensor& grad_uah, const at::Tensor& grad_v,
                                  const at::Tensor& grad_query, int64_t t, int64_t window,
                                  double attn, const std::optional<at::Tensor>& key_exp) {
  check_attend_step_backward(grad_s_, query_, hidden_, uah_, v_, alpha_, cand_, grad_hidden,
                             grad_uah, grad_v, grad_query, t, window);
  check_key_exp_arg(key_exp, uah_);
  check_slots(cand_, "cand", t, window);
  const at::Tensor query = rows_of(query_);
  const at::Tensor grad_s = rows_of(grad_s_);
  const at::Tensor alpha = rows_of(alpha_);
  const at::Tensor cand = cand_.contiguous();
  const at::Tensor hidden = hidden_.contiguous(), uah = uah_.contiguous(), v = v_.contiguous();
  const int64_t B = query.size(0), Hd = query.size(1), rho = cand.size(1);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "rnn_attend_step_backward_cpu", [&] {
    using T = scalar_t;
    std::vector<T> vbuf;
    const Backward<T> g{make_step<T>(hidden, uah, key_exp, v, query, t, window, rho, attn, vbuf),
                        grad_s.const_data_ptr<T>(),
                        alpha.const_data_ptr<T>(),
                        cand.const_data_ptr<int64_t>(),
                        grad_hidden.mutable_data_ptr<T>(),
                        grad_uah.mutable_data_ptr<T>(),
                        grad_v.mutable_data_ptr<T>(),
                        grad_query.mutable_data_ptr<T>(),
                        grad_s.stride(0),
                        alpha.stride(0),
                        grad_query.stride(0)};
    at::parallel_for(0, B, grain_for((std::min(t, window) + rho) * Hd),
                     [&](int64_t begin, int64_t end) {
                       Scratch<T> w(window + rho, Hd);
                       attend_backward_rows(g, w, begin, end);
                     });
  });
}

// e^{2 uah} for the attention steps (rnn_key_exp)

// One row of n keys; a row with a key out of range gets a NaN first element (Step::ek).
template <typename T>
SCREENING_ATTN_INLINE void key_exp_row_impl(const T* k, T* e, int64_t n) {
  int64_t in_range = 0;
#pragma omp simd reduction(+ : in_range)
  for (int64_t d = 0; d < n; ++d) {
    e[d] = exp_twice(k[d]);
    in_range += in_exp_range(k[d]) ? 1 : 0;
  }
  if (in_range != n) e[0] = std::numeric_limits<T>::quiet_NaN();
}

SCREENING_ATTN_CLONES void key_exp_row(const float* k, float* e, int64_t n) {
  key_exp_row_impl(k, e, n);
}
void key_exp_row(const double* k, double* e, int64_t n) { key_exp_row_impl(k, e, n); }

void rnn_key_exp_cpu(const at::Tensor& uah_, const at::Tensor& key_exp) {
  check_key_exp(uah_, key_exp);
  const at::Tensor uah = uah_.contiguous();
  const int64_t Hd = uah.dim() == 0 ? 1 : uah.size(-1);
  if (uah.numel() == 0) return;
  const int64_t rows = uah.numel() / Hd;
  AT_DISPATCH_FLOATING_TYPES(uah.scalar_type(), "rnn_key_exp_cpu", [&] {
    using T = scalar_t;
    const T* k = uah.const_data_ptr<T>();
    T* e = key_exp.mutable_data_ptr<T>();
    at::parallel_for(0, rows, grain_for(8 * Hd), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) key_exp_row(k + r * Hd, e + r * Hd, Hd);
    });
  });
}

// RelRNN activation: h = φ(pre)

template <int NL, typename T>
SCREENING_ATTN_INLINE void activation_row_impl(const T* pre, const T* mb, T* h, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) h[d] = activate<NL>(pre[d], NL == kModRelu ? mb[d] : T(0));
}

template <int NL, typename T>
SCREENING_ATTN_INLINE void activation_backward_row_impl(const T* g, const T* h, T* gpre, T* gb,
                                                        int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) {
    T gbd = 0;
    gpre[d] = activate_backward<NL>(g[d], h[d], &gbd);
    if constexpr (NL == kModRelu) gb[d] += gbd;
  }
}

template <int NL>
SCREENING_ATTN_CLONES void activation_row(const float* pre, const float* mb, float* h, int64_t n) {
  activation_row_impl<NL>(pre, mb, h, n);
}
template <int NL>
void activation_row(const double* pre, const double* mb, double* h, int64_t n) {
  activation_row_impl<NL>(pre, mb, h, n);
}
template <int NL>
SCREENING_ATTN_CLONES void activation_backward_row(const float* g, const float* h, float* gpre,
                                                   float* gb, int64_t n) {
  activation_backward_row_impl<NL>(g, h, gpre, gb, n);
}
template <int NL>
void activation_backward_row(const double* g, const double* h, double* gpre, double* gb,
                             int64_t n) {
  activation_backward_row_impl<NL>(g, h, gpre, gb, n);
}

template <typename T>
const T* row(const at::Tensor& x, int64_t b) {
  return x.const_data_ptr<T>() + b * x.stride(0);
}
template <typename T>
T* mrow(const at::Tensor& x, int64_t b) {
  return x.mutable_data_ptr<T>() + b * x.stride(0);
}

void rnn_activation_cpu(const at::Tensor& pre_, const std::optional<at::Tensor>& modrelu_b,
                        c10::string_view nonlinearity, const at::Tensor& h) {
  const int nl = parse_nonlinearity(nonlinearity);
  check_activation(pre_, modrelu_b, nl, h);
  const at::Tensor pre = rows_of(pre_);
  const at::Tensor mb = nl == kModRelu ? modrelu_b->contiguous() : at::Tensor();
  const int64_t B = pre.size(0), Hd = pre.size(1);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "rnn_activation_cpu", [&] {
    using T = scalar_t;
    const T* mbp = mb.defined() ? mb.const_data_ptr<T>() : nullptr;
    dispatch_nonlinearity(nl, [&](auto NL) {
      at::parallel_for(0, B, grain_for(8 * Hd), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          activation_row<NL.value>(row<T>(pre, b), mbp, mrow<T>(h, b), Hd);
        }
      });
    });
  });
}

void rnn_activation_backward_cpu(const at::Tensor& grad_h_, const at::Tensor& h_,
                                 c10::string_view nonlinearity, const at::Tensor& grad_pre,
                                 const at::Tensor& grad_b) {
  const int nl = parse_nonlinearity(nonlinearity);
  check_activation_backward(grad_h_, h_, grad_pre, grad_b);
  const int64_t B = grad_h_.size(0), Hd = grad_h_.size(1);
  const at::Tensor g = rows_of(grad_h_);
  const at::Tensor h = rows_of(h_);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "rnn_activation_backward_cpu", [&] {
    using T = scalar_t;
    dispatch_nonlinearity(nl, [&](auto NL) {
      at::parallel_for(0, B, grain_for(8 * Hd), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          activation_backward_row<NL.value>(row<T>(g, b), row<T>(h, b), mrow<T>(grad_pre, b),
                                            mrow<T>(grad_b, b), Hd);
        }
      });
    });
  });
}

// RelLSTM cell

// One row: gates [f | i | o | g] pre-activations -> the gates, in place; cell, h.
template <typename T>
SCREENING_ATTN_INLINE void lstm_row_impl(T* gates, const T* c_prev, T* cell, T* h, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) {
    lstm_cell(gates[d], gates[n + d], gates[2 * n + d], gates[3 * n + d], c_prev[d], &gates[d],
              &gates[n + d], &gates[2 * n + d], &gates[3 * n + d], &cell[d], &h[d]);
  }
}

template <typename T>
SCREENING_ATTN_INLINE void lstm_backward_row_impl(const T* gh, const T* gates, const T* cell,
                                                  const T* c_prev, T* gc, T* ga, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) {
    lstm_cell_backward(gh[d], gates[d], gates[n + d], gates[2 * n + d], gates[3 * n + d], cell[d],
                       c_prev[d], &gc[d], &ga[d], &ga[n + d], &ga[2 * n + d], &ga[3 * n + d]);
  }
}

SCREENING_ATTN_CLONES void lstm_row(float* gates, const float* c_prev, float* cell, float* h,
                                    int64_t n) {
  lstm_row_impl(gates, c_prev, cell, h, n);
}
void lstm_row(double* gates, const double* c_prev, double* cell, double* h, int64_t n) {
  lstm_row_impl(gates, c_prev, cell, h, n);
}
SCREENING_ATTN_CLONES void lstm_backward_row(const float* gh, const float* gates, const float* cell,
                                             const float* c_prev, float* gc, float* ga, int64_t n) {
  lstm_backward_row_impl(gh, gates, cell, c_prev, gc, ga, n);
}
void lstm_backward_row(const double* gh, const double* gates, const double* cell,
                       const double* c_prev, double* gc, double* ga, int64_t n) {
  lstm_backward_row_impl(gh, gates, cell, c_prev, gc, ga, n);
}

void lstm_cell_cpu(const at::Tensor& gates, const at::Tensor& cell_prev_, const at::Tensor& cell,
                   const at::Tensor& h) {
  check_lstm_cell(gates, cell_prev_, cell, h);
  const at::Tensor cp = rows_of(cell_prev_);
  const int64_t B = gates.size(0), Hd = gates.size(1) / 4;
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_cell_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, B, grain_for(32 * Hd), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        lstm_row(mrow<T>(gates, b), row<T>(cp, b), mrow<T>(cell, b), mrow<T>(h, b), Hd);
      }
    });
  });
}

void lstm_cell_backward_cpu(const at::Tensor& grad_h_, const at::Tensor& gates_,
                            const at::Tensor& cell_, const at::Tensor& cell_prev_,
                            const at::Tensor& grad_cell, const at::Tensor& grad_gates) {
  check_lstm_cell_backward(grad_h_, gates_, cell_, cell_prev_, grad_cell, grad_gates);
  const at::Tensor gh = rows_of(grad_h_);
  const at::Tensor gates = rows_of(gates_);
  const at::Tensor cell = rows_of(cell_);
  const at::Tensor cp = rows_of(cell_prev_);
  const int64_t B = gh.size(0), Hd = gh.size(1);
  AT_DISPATCH_FLOATING_TYPES(gh.scalar_type(), "lstm_cell_backward_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, B, grain_for(32 * Hd), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        lstm_backward_row(row<T>(gh, b), row<T>(gates, b), row<T>(cell, b), row<T>(cp, b),
                          mrow<T>(grad_cell, b), mrow<T>(grad_gates, b), Hd);
      }
    });
  });
}

// The sequence loops (rnn_seq.h)

// c (m x n, row stride ldc) = a (m x k, lda) b (k x n, ldb), or c += a b; on the calling thread.
// A row of c must come from its row of a alone, in an order that does not depend on which rows
// share the call (the blocks are per thread). brgemm's does not (checked for blocks of 1, 2, 3,
// 5 and 8 rows; tests/test_determinism.py); MKL's does (its float64 rows changed with the block
// size), so other dtypes, or float32 without brgemm, take a plain row-by-row loop (slower; the
// fast path is float32's).
template <typename T>
void rows_mm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
             T* c, int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    if (k > 0 && brgemm_works()) {
      at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, false);
      return;
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    if (!accumulate) std::fill(ci, ci + n, T(0));
    for (int64_t l = 0; l < k; ++l) {
      const T ail = a[i * lda + l];
      const T* bl = b + l * ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += ail * bl[j];
    }
  }
}

// Raw pointers of SeqBuffers.
template <typename T>
struct Seq {
  bool lstm;
  int64_t T_, B, Hd, P, qoff, live, A;  // A = window + live: alpha's row width
  T *pq, *s, *h, *uah, *cell, *kexp;
  const T *v, *mb, *Ws, *Ua;
  int64_t* slots;
  T *slot_score, *relevancy, *alpha;
  int64_t* cand;
  int64_t window;
  T attn, vsum;
  std::vector<T> vbuf;   // -2 v, 4 v: the exp path's multiples of v
  std::vector<T> zeros;  // (Hd): RelLSTM's cell before step 0

  explicit Seq(const SeqBuffers& a)
      : lstm(a.lstm),
        T_(a.h.size(0)),
        B(a.h.size(1)),
        Hd(a.h.size(2)),
        P(a.pq.size(2)),
        qoff(a.pq.size(2) - a.h.size(2)),
        live(a.cand.size(2)),
        A(a.alpha.size(2)),
        pq(a.pq.mutable_data_ptr<T>()),
        s(a.s.mutable_data_ptr<T>()),
        h(a.h.mutable_data_ptr<T>()),
        uah(a.uah.mutable_data_ptr<T>()),
        cell(a.lstm ? a.cell.mutable_data_ptr<T>() : nullptr),
        kexp(a.key_exp && Hd > 0 ? a.key_exp->mutable_data_ptr<T>() : nullptr),
        v(a.v.const_data_ptr<T>()),
        mb(a.modrelu_b ? a.modrelu_b->const_data_ptr<T>() : nullptr),
        Ws(a.Ws.const_data_ptr<T>()),
        Ua(a.Ua.const_data_ptr<T>()),
        slots(a.slot_index.defined() ? a.slot_index.mutable_data_ptr<int64_t>() : nullptr),
        slot_score(a.slot_score.defined() ? a.slot_score.mutable_data_ptr<T>() : nullptr),
        relevancy(a.relevancy.defined() ? a.relevancy.mutable_data_ptr<T>() : nullptr),
        alpha(a.alpha.mutable_data_ptr<T>()),
        cand(a.cand.mutable_data_ptr<int64_t>()),
        window(a.window),
        attn(static_cast<T>(a.attn)),
        vsum(0),
        vbuf(2 * Hd),
        zeros(Hd, T(0)) {
    for (int64_t d = 0; d < Hd; ++d) {
      vbuf[d] = T(-2) * v[d];
      vbuf[Hd + d] = T(4) * v[d];
      vsum += v[d];
    }
  }

  // The attention of step t >= 1: its query Q_t is in pq[t-1].
  Step<T> step(int64_t t) const {
    return {
        h, uah,    kexp, v,    vbuf.data(), vbuf.data() + Hd, pq + (t - 1) * B * P + qoff, P, B, Hd,
        t, window, live, attn, vsum};
  }
  T* at(T* base, int64_t t, int64_t b) const { return base + (t * B + b) * Hd; }
};

// Forward steps of rows [b0, b1); cell(t, b): the elementwise part of row b
// (h_t from pq_t).
template <typename T, typename Cell>
void forward_block(const Seq<T>& a, int64_t b0, int64_t b1, const Cell& cell) {
  const int64_t m = b1 - b0, B = a.B, Hd = a.Hd, P = a.P;
  Scratch<T> w(a.window + a.live, Hd);
  for (int64_t t = 0; t < a.T_; ++t) {
    if (t > 0) {
      const Forward<T> f{a.step(t),
                         a.slots,
                         a.slot_score,
                         a.relevancy,
                         a.s + t * B * Hd,
                         a.alpha + t * B * a.A,
                         a.cand + t * B * a.live,
                         Hd,
                         a.A,
                         a.live};
      attend_rows(f, w, b0, b1);
    }
    T* pq = a.pq + (t * B + b0) * P;
    if (t > 0 || a.lstm) {
      // The query part starts at 0 here, in cache, rather than in a pass over all of pq.
      for (int64_t i = 0; i < m; ++i) std::fill_n(pq + i * P + a.qoff, Hd, T(0));
      rows_mm<T>(m, P, Hd, a.at(a.s, t, b0), Hd, a.Ws, P, pq, P, true);
    } else {  // RelRNN's step 0: pre_0 += V h0 (s_0 = h0), and Q_1 = Va pre_0
      rows_mm<T>(m, Hd, Hd, a.at(a.s, 0, b0), Hd, a.Ws, P, pq, P, true);
      rows_mm<T>(m, Hd, Hd, pq, P, a.Ws + Hd, P, pq + Hd, P, false);
    }
    for (int64_t b = b0; b < b1; ++b) cell(t, b);
    T* k = a.at(a.uah, t, b0);
    rows_mm<T>(m, Hd, Hd, a.at(a.h, t, b0), Hd, a.Ua, Hd, k, Hd, false);
    if (a.kexp != nullptr) {
      for (int64_t b = b0; b < b1; ++b) key_exp_row(a.at(a.uah, t, b), a.at(a.kexp, t, b), Hd);
    }
  }
}

// Backward steps t1-1 .. t_end of rows [b0, b1) (chunk [t0, t1), see seq_backward_cpu);
// cell(t, b, g_t): the elementwise backward of row b, dL/dh_t -> g_t's row.
template <typename T, typename Cell>
void backward_block(const Seq<T>& a, const SeqGrads& gr, int64_t t0, int64_t t1, int64_t t_end,
                    int64_t b0, int64_t b1, const Cell& cell) {
  const int64_t m = b1 - b0, B = a.B, Hd = a.Hd, P = a.P;
  T* gH = gr.gH.mutable_data_ptr<T>();
  T* gK = gr.gK.mutable_data_ptr<T>();
  T* g = gr.g.mutable_data_ptr<T>();
  T* gs = gr.gs.mutable_data_ptr<T>();
  T* gv = gr.gv.mutable_data_ptr<T>();
  T* carry = gr.carry.mutable_data_ptr<T>();
  Scratch<T> w(a.window + a.live, Hd);
  for (int64_t t = t1 - 1; t >= t_end; --t) {
    rows_mm<T>(m, Hd, Hd, a.at(gK, t, b0), Hd, a.Ua, Hd, a.at(gH, t, b0), Hd, true);
    T* g_t = g + (t - t0) * B * P;
    for (int64_t b = b0; b < b1; ++b) cell(t, b, g_t + b * P);
    rows_mm<T>(m, Hd, P, g_t + b0 * P, P, a.Ws, Hd, gs + b0 * Hd, Hd, false);
    if (t == 0) continue;
    const bool in_chunk = t > t0;  // dL/dQ_t: into the chunk, or the carry for the next one
    const Backward<T> bw{a.step(t),
                         gs,
                         a.alpha + t * B * a.A,
                         a.cand + t * B * a.live,
                         gH,
                         gK,
                         gv,
                         in_chunk ? g + (t - 1 - t0) * B * P + a.qoff : carry,
                         Hd,
                         a.A,
                         in_chunk ? P : Hd};
    attend_backward_rows(bw, w, b0, b1);
  }
}

// Runs f(b0, b1) on blocks of rows, one per thread (rows are independent: any split gives the same
// bits).
template <typename F>
void for_row_blocks(int64_t B, const F& f) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { f(b0, b1); });
}

}  // namespace

bool brgemm_works() {
  static const bool works = [] {
    try {
      const float one = 1.0f;
      float c = 0.0f;
      at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, &one, &one, &c, false);
      return c == 1.0f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return works;
}

void seq_forward_cpu(const SeqBuffers& a) {
  AT_DISPATCH_FLOATING_TYPES(a.h.scalar_type(), "seq_forward_cpu", [&] {
    using T = scalar_t;
    const Seq<T> q(a);
    const int64_t B = q.B, Hd = q.Hd, P = q.P;
    if (a.lstm) {
      for_row_blocks(B, [&](int64_t b0, int64_t b1) {
        forward_block(q, b0, b1, [&](int64_t t, int64_t b) {
          const T* c_prev = t > 0 ? q.at(q.cell, t - 1, b) : q.zeros.data();
          lstm_row(q.pq + (t * B + b) * P, c_prev, q.at(q.cell, t, b), q.at(q.h, t, b), Hd);
        });
      });
      return;
    }
    dispatch_nonlinearity(a.nonlinearity, [&](auto NL) {
      for_row_blocks(B, [&](int64_t b0, int64_t b1) {
        forward_block(q, b0, b1, [&](int64_t t, int64_t b) {
          activation_row<NL.value>(q.pq + (t * B + b) * P, q.mb, q.at(q.h, t, b), Hd);
        });
      });
    });
  });
}

void seq_backward_cpu(const SeqBuffers& a, const SeqGrads& g, int64_t t0, int64_t t1,
                      int64_t t_stop) {
  const int64_t t_end = std::max(t0, t_stop);
  if (t_end >= t1) return;
  AT_DISPATCH_FLOATING_TYPES(a.h.scalar_type(), "seq_backward_cpu", [&] {
    using T = scalar_t;
    const Seq<T> q(a);
    const int64_t B = q.B, Hd = q.Hd, P = q.P;
    T* gH = g.gH.mutable_data_ptr<T>();
    if (a.lstm) {
      T* gcell = g.gcell.mutable_data_ptr<T>();
      for_row_blocks(B, [&](int64_t b0, int64_t b1) {
        backward_block(q, g, t0, t1, t_end, b0, b1, [&](int64_t t, int64_t b, T* g_row) {
          const T* c_prev = t > 0 ? q.at(q.cell, t - 1, b) : q.zeros.data();
          lstm_backward_row(q.at(gH, t, b), q.pq + (t * B + b) * P, q.at(q.cell, t, b), c_prev,
                            gcell + b * Hd, g_row, Hd);
        });
      });
      return;
    }
    T* gb = g.gb.mutable_data_ptr<T>();
    dispatch_nonlinearity(a.nonlinearity, [&](auto NL) {
      for_row_blocks(B, [&](int64_t b0, int64_t b1) {
        backward_block(q, g, t0, t1, t_end, b0, b1, [&](int64_t t, int64_t b, T* g_row) {
          activation_backward_row<NL.value>(q.at(gH, t, b), q.at(q.h, t, b), g_row, gb + b * Hd,
                                            Hd);
        });
      });
    });
  });
}

TORCH_LIBRARY_IMPL(screening_attn, CPU, m) {
  m.impl("rnn_attend_step", &rnn_attend_step_cpu);
  m.impl("rnn_attend_step_backward", &rnn_attend_step_backward_cpu);
  m.impl("rnn_key_exp", &rnn_key_exp_cpu);
  m.impl("rnn_activation", &rnn_activation_cpu);
  m.impl("rnn_activation_backward", &rnn_activation_backward_cpu);
  m.impl("lstm_cell", &lstm_cell_cpu);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cpu);
}

}  // namespace screening_attn
