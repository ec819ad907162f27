// CPU kernels of screened attention (design and costs: docs/kernels/cpu-cuda.md), with grouped
// heads, key padding and a stream's initial state (docs/streaming.md).
//
// Parallel over B·Hkv; within one (b, KV head) the queries go in blocks of kBlockQ. A block's
// candidate keys are the relevant set at its start plus the key range [t0-ν+1, t1) (a key
// screened in during the block comes from that range), so its logits are two GEMMs per query
// head of the group, and the output two more. Only the per-query softmax, the relevancy sums and
// the slot rule run in the sequential scan. The backward replays the sets from the spans, block
// by block; dK and dV rows are accumulated by one thread per (b, KV head), in a fixed order:
// deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec.h"

#include "screening_attn/checks.h"
#include "screening_attn/screening.h"

namespace screening_attn {
namespace {

constexpr int64_t kBlockQ = 64;

// MKL's per-thread thread count (C interface), exported by libtorch_cpu when torch is built with
// MKL; weak, so the extension loads without it.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// The block GEMMs are small (kBlockQ x (ν+ρ) x D): threaded, they are slower than on one thread,
// and much slower on a loaded machine. Inside at::parallel_for's OpenMP team MKL runs them
// sequentially by itself, but a call with one (b, KV head) runs inline, outside any team: this
// keeps MKL on the calling thread there too, so more threads never make the kernel slower.
class SequentialBlas {
 public:
  SequentialBlas() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int prev_;
};

// A row-major (rows x cols) matrix view with leading dimension ld over raw memory.
template <typename T>
at::Tensor mat(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// c = beta c + alpha a b (beta = 0 ignores c's old content); skips empty products.
void gemm(at::Tensor c, const at::Tensor& a, const at::Tensor& b, double alpha, double beta) {
  if (c.numel() == 0) return;
  if (a.size(1) == 0) {  // e.g. no relevant set yet
    if (beta == 0) c.zero_();
    return;
  }
  c.addmm_(a, b, beta, alpha);
}

// A 0 weight times an Inf/NaN value is NaN inside a GEMM, so blocks whose operands hold one
// take an exact per-candidate path instead: NaN must reach only the outputs that depend on it.
// BadRows answers "does any row in [a, b) hold an Inf or NaN?" from prefix counts.
struct BadRows {
  std::vector<int32_t> prefix;  // prefix[j] = number of non-finite rows before row j

  // Rows of one or two (T, width) matrices (a row is bad if it is bad in either).
  template <typename T>
  BadRows(int64_t rows, const T* a, int64_t wa, const T* b = nullptr, int64_t wb = 0)
      : prefix(rows + 1, 0) {
    for (int64_t j = 0; j < rows; ++j) {
      T probe = 0;  // x * 0 is 0 for finite x and NaN for Inf or NaN
#pragma omp simd reduction(+ : probe)
      for (int64_t i = 0; i < wa; ++i) probe += a[j * wa + i] * T(0);
#pragma omp simd reduction(+ : probe)
      for (int64_t i = 0; i < wb; ++i) probe += b[j * wb + i] * T(0);
      prefix[j + 1] = prefix[j] + (probe == T(0) ? 0 : 1);
    }
  }
  bool any(int64_t begin, int64_t end) const { return prefix[end] - prefix[begin] > 0; }
  bool at(int64_t j) const { return any(j, j + 1); }
};

// One (b, KV head) of a call: the G query heads of the group, and a buffer of keys and values
// (docs/streaming.md): R0 initial slot keys, then the S = P + n sequence positions (P earlier
// ones from a stream's state, then the n new ones). Query i of the call sits at position P + i.
template <typename T>
struct Group {
  const T *q, *k, *v;  // q: G heads of (n, D), head stride n D; k, v: (R0 + S, ·) buffers
  const bool* valid;   // (S,) real tokens, or nullptr: all real
  int64_t G, n, P, R0, S, D, Dv;
  const T* kseq() const { return k + R0 * D; }
  const T* vseq() const { return v + R0 * Dv; }
  const T* qhead(int64_t g) const { return q + g * n * D; }
  bool real(int64_t pos) const { return valid == nullptr || valid[pos]; }
};

template <typename T>
void axpy(T a, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Softmax of one query over its candidates: `nw` window logits `sw` (contiguous) and `ns` slot
// logits `ss` gathered from the relevant set (-inf for an empty slot or a padded key). Writes the
// probabilities to `pw` / `ps`, adds the window ones to `gain`, returns the log-sum-exp.
template <typename T>
SCREENING_ATTN_INLINE T softmax_query_impl(const T* sw, T* pw, int64_t nw, const T* ss, T* ps,
                                           int64_t ns, T* gain) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < nw; ++i) m = std::max(m, sw[i]);
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < ns; ++i) m = std::max(m, ss[i]);
  T z = 0;
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < nw; ++i) {
    pw[i] = exp_nonpositive(sw[i] - m);
    z += pw[i];
  }
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < ns; ++i) {
    ps[i] = exp_nonpositive(ss[i] - m);
    z += ps[i];
  }
  const T inv = T(1) / z;
#pragma omp simd
  for (int64_t i = 0; i < nw; ++i) {
    pw[i] *= inv;
    gain[i] += pw[i];
  }
#pragma omp simd
  for (int64_t i = 0; i < ns; ++i) ps[i] *= inv;
  return m + std::log(z);
}

// The scan's hot loop, compiled for AVX-512 and AVX2 too and picked at load time (ifunc).

SCREENING_ATTN_CLONES float softmax_query(const float* sw, float* pw, int64_t nw, const float* ss,
                                          float* ps, int64_t ns, float* gain) {
  return softmax_query_impl(sw, pw, nw, ss, ps, ns, gain);
}

double softmax_query(const double* sw, double* pw, int64_t nw, const double* ss, double* ps,
                     int64_t ns, double* gain) {
  return softmax_query_impl(sw, pw, nw, ss, ps, ns, gain);
}

// Backward: p[c] = exp(logit[c] - lse) where column c is a candidate of the query at position t
// (call query i): win[c] (its position, INT32_MIN if padded or not a sequence key) in the window,
// or [start[c], end[c]) holding i; else 0. In place on `p`.
template <typename T>
SCREENING_ATTN_INLINE void candidate_probs_impl(T* p, int64_t n, const int32_t* win,
                                                const int32_t* start, const int32_t* end, int32_t t,
                                                int32_t i, int32_t nu, T lse) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const bool cand = (win[c] <= t && win[c] > t - nu) || (start[c] <= i && i < end[c]);
    const T e = exp_nonpositive(p[c] - lse);
    p[c] = cand ? e : T(0);
  }
}

SCREENING_ATTN_CLONES void candidate_probs(float* p, int64_t n, const int32_t* win,
                                           const int32_t* start, const int32_t* end, int32_t t,
                                           int32_t i, int32_t nu, float lse) {
  candidate_probs_impl(p, n, win, start, end, t, i, nu, lse);
}

void candidate_probs(double* p, int64_t n, const int32_t* win, const int32_t* start,
                     const int32_t* end, int32_t t, int32_t i, int32_t nu, double lse) {
  candidate_probs_impl(p, n, win, start, end, t, i, nu, lse);
}

// One query block's candidate columns: [rows gathered from the relevant set | positions w0 ..].
template <typename T>
struct Columns {
  const T *kr, *vr, *k, *v;  // gathered rows; the sequence keys and values of this group
  int64_t nr, w0, D, Dv;
  const T* key(int64_t c) const { return c < nr ? kr + c * D : k + (w0 + c - nr) * D; }
  const T* value(int64_t c) const { return c < nr ? vr + c * Dv : v + (w0 + c - nr) * Dv; }
};

// Per-query outputs of one group: out (G, n, Dv), lse (G, n); per-group state: slots (ρ),
// relevancy (S, starting from rel0 for the P earlier positions), span (R0 + S, 2) in call query
// numbers. Initial slots: slot s < R0 holds buffer row s if slot_index0[s] >= 0.
template <typename scalar_t>
void forward_one(const Group<scalar_t>& x, scalar_t* out, scalar_t* lse, int64_t* slot_out,
                 scalar_t* score_out, scalar_t* rel, int32_t* span, const scalar_t* rel0,
                 const int64_t* slot_index0, const scalar_t* slot_score0, int64_t nu, int64_t rho,
                 int64_t rho_live, scalar_t scale) {
  constexpr scalar_t kInf = std::numeric_limits<scalar_t>::infinity();
  const int64_t D = x.D, Dv = x.Dv, nr = rho_live, G = x.G, n = x.n, P = x.P, R0 = x.R0;
  const int64_t S = x.S, X = R0 + S;
  const int64_t ld = std::max<int64_t>(0, nr + std::min(n, kBlockQ) + std::min(S, nu) - 1);
  std::vector<scalar_t> Sm(G * kBlockQ * ld), Pm(G * kBlockQ * ld), Kr(nr * D), Vr(nr * Dv);
  std::vector<scalar_t> slot_logit(nr), slot_p(nr), slot_score(nr, -kInf), gain(nu);
  std::vector<int64_t> slot_key(nr, -1), slot_col(nr, 0);
  std::vector<int32_t> real_before(S + 1, 0);  // real positions before each position
  for (int64_t j = 0; j < S; ++j) real_before[j + 1] = real_before[j] + (x.real(j) ? 1 : 0);
  std::copy_n(rel0, P, rel);
  std::fill(rel + P, rel + S, scalar_t(0));
  std::fill(span, span + 2 * X, int32_t(-1));
  int64_t filled = 0;
  for (int64_t s = 0; s < std::min(R0, nr); ++s) {
    if (slot_index0[s] < 0) continue;
    slot_key[s] = s;
    slot_score[s] = slot_score0[s];
    span[2 * s] = 0;  // internal: the backward replays the set from here
    span[2 * s + 1] = static_cast<int32_t>(n);
    ++filled;
  }
  const BadRows bad_v(X, x.v, Dv);

  for (int64_t t0 = P; t0 < S; t0 += kBlockQ) {
    const int64_t t1 = std::min(S, t0 + kBlockQ), nq = t1 - t0;
    const int64_t w0 = std::max<int64_t>(0, t0 - nu + 1), W = t1 - w0, nc = nr + W;
    bool exact = bad_v.any(R0 + w0, R0 + t1);  // (covers the keys screened in during the block)
    for (int64_t s = 0; s < nr; ++s) {         // empty slots get zero rows: never candidates
      slot_col[s] = s;
      const int64_t key = slot_key[s];
      if (key >= 0) {
        std::copy_n(x.k + key * D, D, Kr.data() + s * D);
        std::copy_n(x.v + key * Dv, Dv, Vr.data() + s * Dv);
        exact = exact || bad_v.at(key);
      } else {
        std::fill_n(Kr.data() + s * D, D, scalar_t(0));
        std::fill_n(Vr.data() + s * Dv, Dv, scalar_t(0));
      }
    }
    const Columns<scalar_t> cols{Kr.data(), Vr.data(), x.kseq(), x.vseq(), nr, w0, D, Dv};
    for (int64_t g = 0; g < G; ++g) {
      scalar_t* Sg = Sm.data() + g * kBlockQ * ld;
      const at::Tensor Qb = mat(x.qhead(g) + (t0 - P) * D, nq, D, D);
      gemm(mat(Sg, nq, nr, ld), Qb, mat(Kr.data(), nr, D, D).t(), scale, 0);
      gemm(mat(Sg + nr, nq, W, ld), Qb, mat(x.kseq() + w0 * D, W, D, D).t(), scale, 0);
      for (int64_t j = w0; j < t1; ++j)  // a padded key is never a candidate
        if (!x.real(j))
          for (int64_t i = 0; i < nq; ++i) Sg[i * ld + nr + j - w0] = -kInf;
      for (int64_t i = 0; i < nq; ++i)
        std::fill_n(Pm.data() + (g * kBlockQ + i) * ld, nc, scalar_t(0));
    }

    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t - P, lo = std::max<int64_t>(0, t - nu + 1);
      const int64_t c0 = nr + lo - w0, nw = t - lo + 1;  // window columns [c0, c0 + nw)
      const bool any = real_before[t + 1] > real_before[lo] || filled > 0;
      // A real query with a candidate adds the group mean of its window weights to relevancy.
      const bool counts = any && x.real(t);
      std::fill_n(gain.data(), nw, scalar_t(0));
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* srow = Sm.data() + (g * kBlockQ + t - t0) * ld;
        scalar_t* prow = Pm.data() + (g * kBlockQ + t - t0) * ld;
        scalar_t* orow = out + (g * n + i) * Dv;
        if (!any) {  // no candidate: zeros, and an lse that makes every backward weight 0
          lse[g * n + i] = kInf;
          if (exact) std::fill_n(orow, Dv, scalar_t(0));
          continue;
        }
        for (int64_t s = 0; s < nr; ++s)
          slot_logit[s] = slot_key[s] >= 0 ? srow[slot_col[s]] : -kInf;
        lse[g * n + i] = softmax_query(srow + c0, prow + c0, nw, slot_logit.data(), slot_p.data(),
                                       nr, gain.data());
        for (int64_t s = 0; s < nr; ++s)
          if (slot_key[s] >= 0) prow[slot_col[s]] = slot_p[s];
        if (exact) {  // out_t as a sum over the candidates only
          std::fill_n(orow, Dv, scalar_t(0));
          for (int64_t c = c0; c < c0 + nw; ++c)
            if (x.real(w0 + c - nr)) axpy(prow[c], cols.value(c), orow, Dv);
          for (int64_t s = 0; s < nr; ++s)
            if (slot_key[s] >= 0) axpy(slot_p[s], cols.value(slot_col[s]), orow, Dv);
        }
      }
      if (counts) {
        if (G == 1) {
          for (int64_t j = 0; j < nw; ++j) rel[lo + j] += gain[j];
        } else {
          const scalar_t g_ = static_cast<scalar_t>(G);
          for (int64_t j = 0; j < nw; ++j) rel[lo + j] += gain[j] / g_;
        }
      }

      const int64_t e = t - nu + 1;                  // leaves the window; its relevancy is final
      if (e < 0 || nr == 0 || !x.real(e)) continue;  // a padded key takes no slot
      const int s = screen_slot<scalar_t, int64_t>(slot_key.data(), slot_score.data(),
                                                   static_cast<int>(nr), rel[e]);
      if (s < 0) continue;
      if (slot_key[s] >= 0)
        span[2 * slot_key[s] + 1] = static_cast<int32_t>(i + 1);
      else
        ++filled;
      slot_key[s] = R0 + e;
      slot_score[s] = rel[e];
      slot_col[s] = nr + e - w0;
      span[2 * (R0 + e)] = static_cast<int32_t>(i + 1);
      span[2 * (R0 + e) + 1] = static_cast<int32_t>(n);
    }
    if (!exact) {
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* Pg = Pm.data() + g * kBlockQ * ld;
        const at::Tensor Ob = mat(out + (g * n + t0 - P) * Dv, nq, Dv, Dv);
        gemm(Ob, mat(Pg, nq, nr, ld), mat(Vr.data(), nr, Dv, Dv), 1, 0);
        gemm(Ob, mat(Pg + nr, nq, W, ld), mat(x.vseq() + w0 * Dv, W, Dv, Dv), 1, nr > 0 ? 1 : 0);
      }
    }
  }
  for (int64_t s = 0; s < rho; ++s) {
    slot_out[s] = s < nr ? slot_key[s] : -1;
    score_out[s] = s < nr ? slot_score[s] : -kInf;
  }
}

// Gradients of one group: dq (G, n, D), dk (R0 + S, D), dv (R0 + S, Dv), the sets replayed
// from the forward's span.
template <typename scalar_t>
void backward_one(const Group<scalar_t>& x, const scalar_t* o, const scalar_t* dout,
                  const scalar_t* lse, const int32_t* span, scalar_t* dq, scalar_t* dk,
                  scalar_t* dv, int64_t nu, scalar_t scale) {
  const int64_t D = x.D, Dv = x.Dv, G = x.G, n = x.n, P = x.P, R0 = x.R0, S = x.S, X = R0 + S;
  std::vector<scalar_t> Pm, dS, delta(kBlockQ), Kr, Vr, dKr, dVr;
  std::vector<int64_t> members;  // buffer rows of the relevant set at the block start
  std::vector<int32_t> col_key, col_win, col_start, col_end;
  std::fill(dk, dk + X * D, scalar_t(0));
  std::fill(dv, dv + X * Dv, scalar_t(0));
  for (int64_t s = 0; s < R0; ++s)
    if (span[2 * s] == 0) members.push_back(s);  // the initial slots that hold a key
  const BadRows bad_kv(X, x.k, D, x.v, Dv);
  std::vector<BadRows> bad_qg;
  for (int64_t g = 0; g < G; ++g) bad_qg.emplace_back(n, x.qhead(g), D, dout + g * n * Dv, Dv);

  for (int64_t t0 = P; t0 < S; t0 += kBlockQ) {
    const int64_t t1 = std::min(S, t0 + kBlockQ), nq = t1 - t0;
    const int64_t w0 = std::max<int64_t>(0, t0 - nu + 1), W = t1 - w0;
    const int64_t nr = static_cast<int64_t>(members.size()), nc = nr + W, ld = nc;
    Pm.resize(kBlockQ * ld);  // resize() stops growing once ρ and the window are reached
    dS.resize(kBlockQ * ld);
    Kr.resize(nr * D), dKr.resize(nr * D), Vr.resize(nr * Dv), dVr.resize(nr * Dv);
    for (int64_t s = 0; s < nr; ++s) {
      std::copy_n(x.k + members[s] * D, D, Kr.data() + s * D);
      std::copy_n(x.v + members[s] * Dv, Dv, Vr.data() + s * Dv);
    }
    const Columns<scalar_t> cols{Kr.data(), Vr.data(), x.kseq(), x.vseq(), nr, w0, D, Dv};
    bool exact =
        bad_kv.any(R0 + w0, R0 + t1) ||
        std::any_of(members.begin(), members.end(), [&](int64_t j) { return bad_kv.at(j); });
    for (int64_t g = 0; g < G; ++g) exact = exact || bad_qg[g].any(t0 - P, t1 - P);
    // Column c holds buffer row col_key[c]; it is a candidate of the query at position t if
    // its position col_win[c] is a real one in t's window, or its span holds the query. (Keys
    // of the set at t0 are <= t0 - ν: never in a window here.)
    col_key.resize(nc), col_win.resize(nc), col_start.resize(nc), col_end.resize(nc);
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t j = c < nr ? members[c] : R0 + w0 + c - nr;
      const bool seq_real = j >= R0 && x.real(j - R0);
      col_key[c] = static_cast<int32_t>(j);
      col_win[c] = seq_real ? static_cast<int32_t>(j - R0) : std::numeric_limits<int32_t>::min();
      col_start[c] = span[2 * j];
      col_end[c] = span[2 * j + 1];
    }
    auto is_candidate = [&](int64_t t, int64_t c) {
      const int64_t i = t - P;
      return (col_win[c] <= t && col_win[c] > t - nu) || (col_start[c] <= i && i < col_end[c]);
    };
    const at::Tensor Krm = mat(Kr.data(), nr, D, D), Kwm = mat(x.kseq() + w0 * D, W, D, D);
    const at::Tensor Vrm = mat(Vr.data(), nr, Dv, Dv), Vwm = mat(x.vseq() + w0 * Dv, W, Dv, Dv);
    const at::Tensor PR = mat(Pm.data(), nq, nr, ld), PW = mat(Pm.data() + nr, nq, W, ld);
    const at::Tensor dSR = mat(dS.data(), nq, nr, ld), dSW = mat(dS.data() + nr, nq, W, ld);
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t *qg = x.qhead(g), *og = o + g * n * Dv, *dog = dout + g * n * Dv;
      const scalar_t* lg = lse + g * n;
      scalar_t* dqg = dq + g * n * D;
      const at::Tensor Qb = mat(qg + (t0 - P) * D, nq, D, D);
      const at::Tensor dOb = mat(dog + (t0 - P) * Dv, nq, Dv, Dv);
      // P = exp(logit - lse) on the candidates, 0 elsewhere
      gemm(PR, Qb, Krm.t(), scale, 0);
      gemm(PW, Qb, Kwm.t(), scale, 0);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i = t - P;
        candidate_probs(Pm.data() + (t - t0) * ld, nc, col_win.data(), col_start.data(),
                        col_end.data(), static_cast<int32_t>(t), static_cast<int32_t>(i),
                        static_cast<int32_t>(nu), lg[i]);
        delta[t - t0] = dot(og + i * Dv, dog + i * Dv, Dv);
      }
      if (exact) {  // per candidate, so an Inf/NaN reaches only the gradients that depend on it
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i = t - P;
          const scalar_t *prow = Pm.data() + (t - t0) * ld, *qrow = qg + i * D;
          const scalar_t* grow = dog + i * Dv;
          scalar_t* dqrow = dqg + i * D;
          std::fill_n(dqrow, D, scalar_t(0));
          for (int64_t c = 0; c < nc; ++c) {
            if (!is_candidate(t, c)) continue;
            const int64_t j = col_key[c];
            const scalar_t ds = prow[c] * (dot(grow, cols.value(c), Dv) - delta[t - t0]);
            axpy(scale * ds, cols.key(c), dqrow, D);
            axpy(scale * ds, qrow, dk + j * D, D);
            axpy(prow[c], grow, dv + j * Dv, Dv);
          }
        }
        continue;
      }
      // dS = P (dO V^T - delta); dQ = scale dS K; dK += scale dS^T Q; dV += P^T dO
      gemm(dSR, dOb, Vrm.t(), 1, 0);
      gemm(dSW, dOb, Vwm.t(), 1, 0);
      for (int64_t i = 0; i < nq; ++i) {
        const scalar_t* prow = Pm.data() + i * ld;
        scalar_t* srow = dS.data() + i * ld;
        const scalar_t d = delta[i];
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) srow[c] = prow[c] * (srow[c] - d);
      }
      const at::Tensor dQb = mat(dqg + (t0 - P) * D, nq, D, D);
      gemm(dQb, dSR, Krm, scale, 0);
      gemm(dQb, dSW, Kwm, scale, nr > 0 ? 1 : 0);
      gemm(mat(dk + (R0 + w0) * D, W, D, D), dSW.t(), Qb, scale, 1);
      gemm(mat(dv + (R0 + w0) * Dv, W, Dv, Dv), PW.t(), dOb, 1, 1);
      if (nr > 0) {  // the slot rows' gradients, summed over the group, scattered once below
        gemm(mat(dKr.data(), nr, D, D), dSR.t(), Qb, scale, g > 0 ? 1 : 0);
        gemm(mat(dVr.data(), nr, Dv, Dv), PR.t(), dOb, 1, g > 0 ? 1 : 0);
      }
    }
    if (!exact && nr > 0) {
      for (int64_t s = 0; s < nr; ++s) {
        axpy(scalar_t(1), dKr.data() + s * D, dk + members[s] * D, D);
        axpy(scalar_t(1), dVr.data() + s * Dv, dv + members[s] * Dv, Dv);
      }
    }
    // Replay the screening of this block's steps: key e entered after query i iff its span
    // starts at i+1, evicting the key whose span ends at i+1, if any.
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t - P, e = t - nu + 1;
      if (e < 0 || span[2 * (R0 + e)] != i + 1) continue;
      auto gone = std::find_if(members.begin(), members.end(),
                               [&](int64_t j) { return span[2 * j + 1] == i + 1; });
      if (gone != members.end()) members.erase(gone);
      members.push_back(R0 + e);
    }
  }
}

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Half inputs are computed in float32 (docs/backends.md): each (b, KV head) is converted into
// float buffers of its thread, reused from row to row, so no tensor-sized copy is made. For
// float32 and float64 the pointers pass through.
template <typename in_t>
struct Staging {
  using acc_t = at::opmath_type<in_t>;
  static constexpr bool kPass = std::is_same_v<in_t, acc_t>;
  std::vector<acc_t> buf[8];

  const acc_t* in(int slot, const in_t* p, int64_t n) {
    if constexpr (kPass) {
      return p;
    } else {
      buf[slot].resize(n);
      for (int64_t i = 0; i < n; ++i) buf[slot][i] = static_cast<acc_t>(p[i]);
      return buf[slot].data();
    }
  }
  acc_t* out(int slot, in_t* p, int64_t n) {
    if constexpr (kPass) {
      return p;
    } else {
      buf[slot].resize(n);
      return buf[slot].data();
    }
  }
  void flush(int slot, in_t* p, int64_t n) {  // an `out` buffer back into p
    if constexpr (!kPass)
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<in_t>(buf[slot][i]);
  }
};

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                     int64_t relevant) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be 4-d (B, H, T, D), got ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4 && v.dim() == 4, "k and v must be 4-d");
  TORCH_CHECK_TYPE(
      q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble || is_half(q.scalar_type()),
      "the CPU kernel takes float16, bfloat16, float32 or float64, got ", q.scalar_type());
  check_same_dtype_device(q, "q", k, "k");
  check_same_dtype_device(q, "q", v, "v");
  const int64_t H = q.size(1), Hkv = k.size(1);
  TORCH_CHECK_VALUE(
      k.size(0) == q.size(0) && k.size(3) == q.size(3) && (Hkv == 0 ? H == 0 : H % Hkv == 0),
      "k must be (B, Hkv, ·, D) with the B, D of q ", q.sizes(), " and Hkv dividing H, got ",
      k.sizes());
  TORCH_CHECK_VALUE(v.sizes().slice(0, 3) == k.sizes().slice(0, 3),
                    "v must match k in (B, Hkv, ·), got ", v.sizes());
  TORCH_CHECK_VALUE(window >= 1, "window must be >= 1, got ", window);
  TORCH_CHECK_VALUE(relevant >= 0, "relevant must be >= 0, got ", relevant);
}

// k, v hold R0 + S rows per (b, KV head) with S = P + n; the mask, if any, is (B, S) bool.
void check_stream(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                  int64_t R0, int64_t P) {
  TORCH_CHECK_VALUE(R0 >= 0 && P >= 0 && k.size(2) == R0 + P + q.size(2), "k must hold the R0=", R0,
                    " initial slots, P=", P, " earlier positions and the n=", q.size(2),
                    " new ones, got ", k.size(2), " rows");
  if (mask) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "key_padding_mask must be bool");
    TORCH_CHECK_VALUE(
        mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == P + q.size(2),
        "key_padding_mask must be (B, S) = (", q.size(0), ", ", P + q.size(2), "), got ",
        mask->sizes());
    TORCH_CHECK_VALUE(mask->device() == q.device(), "key_padding_mask must be on q's device");
  }
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The stream form (docs/streaming.md): rel0 (B, Hkv, P) the relevancy so far of the P earlier
// positions; slot_index0 (B, Hkv, R0) (>= 0: slot s holds buffer row s), slot_score0 its scores.
Outputs screened_attention_stream_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                      const at::Tensor& v_, const std::optional<at::Tensor>& mask_,
                                      const at::Tensor& rel0_, const at::Tensor& slot_index0_,
                                      const at::Tensor& slot_score0_, int64_t window,
                                      int64_t relevant, double scale) {
  check_attention(q_, k_, v_, window, relevant);
  const int64_t R0 = slot_index0_.size(-1), P = rel0_.size(-1);
  check_stream(q_, k_, mask_, R0, P);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const auto acc = acc_type(q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), D = q.size(3), Dv = v.size(3);
  const int64_t Hkv = k.size(1), G = Hkv > 0 ? H / Hkv : 1, S = P + n, X = R0 + S;
  const auto expect = [&](const at::Tensor& t, at::ScalarType dt, int64_t last, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == B && t.size(1) == Hkv && t.size(2) == last, name,
                      " must be (B, Hkv, ", last, "), got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
  };
  expect(rel0_, acc, P, "relevancy0");
  expect(slot_index0_, at::kLong, R0, "slot_index0");
  expect(slot_score0_, acc, R0, "slot_score0");
  TORCH_CHECK_VALUE(relevant >= R0, "relevant must be >= the ", R0, " initial slots");
  const at::Tensor rel0 = rel0_.contiguous(), slot_index0 = slot_index0_.contiguous();
  const at::Tensor slot_score0 = slot_score0_.contiguous();
  const at::Tensor mask = mask_ ? mask_->contiguous() : at::Tensor();
  at::Tensor out = at::empty({B, H, n, Dv}, q.options());
  at::Tensor lse = at::empty({B, H, n}, q.options().dtype(acc));
  at::Tensor index = at::empty({B, Hkv, relevant}, q.options().dtype(at::kLong));
  at::Tensor score = at::empty({B, Hkv, relevant}, q.options().dtype(acc));
  at::Tensor rel = at::empty({B, Hkv, S}, q.options().dtype(acc));
  at::Tensor span = at::empty({B, Hkv, X, 2}, q.options().dtype(at::kInt));
  window = std::min(window, S + 1);  // any larger window sees and screens the same keys
  // Slots that can ever fill: the initial ones, and one per key leaving the window.
  const int64_t rho_live = std::min(relevant, R0 + std::max<int64_t>(0, S - window + 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "screened_attention_stream_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
          const SequentialBlas sequential;
          Staging<scalar_t> st;
          for (int64_t r = begin; r < end; ++r) {  // r = b Hkv + kv head; its query heads r G ..
            const bool* valid =
                mask.defined() ? mask.const_data_ptr<bool>() + (r / Hkv) * S : nullptr;
            const Group<acc_t> x{st.in(0, q.const_data_ptr<scalar_t>() + r * G * n * D, G * n * D),
                                 st.in(1, k.const_data_ptr<scalar_t>() + r * X * D, X * D),
                                 st.in(2, v.const_data_ptr<scalar_t>() + r * X * Dv, X * Dv),
                                 valid,
                                 G,
                                 n,
                                 P,
                                 R0,
                                 S,
                                 D,
                                 Dv};
            scalar_t* o = out.mutable_data_ptr<scalar_t>() + r * G * n * Dv;
            forward_one<acc_t>(
                x, st.out(3, o, G * n * Dv), lse.mutable_data_ptr<acc_t>() + r * G * n,
                index.mutable_data_ptr<int64_t>() + r * relevant,
                score.mutable_data_ptr<acc_t>() + r * relevant,
                rel.mutable_data_ptr<acc_t>() + r * S, span.mutable_data_ptr<int32_t>() + r * X * 2,
                rel0.const_data_ptr<acc_t>() + r * P,
                slot_index0.const_data_ptr<int64_t>() + r * R0,
                slot_score0.const_data_ptr<acc_t>() + r * R0, window, relevant, rho_live,
                static_cast<acc_t>(scale));
            st.flush(3, o, G * n * Dv);
          }
        });
      });
  return {out, lse, index, score, rel, span};
}

// One call from the start, without padding: the stream form with an empty state.
Outputs screened_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               int64_t window, int64_t relevant, double scale) {
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), ", got ",
                    k.sizes());
  check_attention(q, k, v, window, relevant);
  TORCH_CHECK_VALUE(v.sizes().slice(0, 3) == q.sizes().slice(0, 3),
                    "v must match q in (B, H, T), got ", v.sizes());
  const at::Tensor none =
      at::empty({k.size(0), k.size(1), 0}, q.options().dtype(acc_type(q.scalar_type())));
  return screened_attention_stream_cpu(q, k, v, std::nullopt, none, none.to(at::kLong), none,
                                       window, relevant, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> screened_attention_stream_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& span_,
    const std::optional<at::Tensor>& mask_, int64_t initial_slots, int64_t window, double scale) {
  check_attention(q_, k_, v_, window, 0);
  check_same_dtype_device(q_, "q", grad_out_, "grad_out");
  const int64_t B = q_.size(0), H = q_.size(1), n = q_.size(2), Dv = v_.size(3);
  const int64_t R0 = initial_slots, P = k_.size(2) - R0 - n;
  check_stream(q_, k_, mask_, R0, P);
  TORCH_CHECK_VALUE(
      grad_out_.sizes() == at::IntArrayRef({B, H, n, Dv}) && out_.sizes() == grad_out_.sizes(),
      "grad_out and out must be (B, H, n, Dv), got ", grad_out_.sizes());
  TORCH_CHECK_VALUE(span_.scalar_type() == at::kInt && span_.dim() == 4 &&
                        span_.size(2) == k_.size(2) && span_.size(3) == 2,
                    "span must be an int32 (B, Hkv, R0 + S, 2) tensor");
  check_same_dtype_device(q_, "q", out_, "out");
  TORCH_CHECK_TYPE(lse_.scalar_type() == acc_type(q_.scalar_type()) &&
                       lse_.sizes() == at::IntArrayRef({B, H, n}),
                   "lse must be a (B, H, n) tensor of the accumulation dtype");
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor go = grad_out_.contiguous(), o = out_.contiguous(), lse = lse_.contiguous();
  const at::Tensor span = span_.contiguous();
  const at::Tensor mask = mask_ ? mask_->contiguous() : at::Tensor();
  const int64_t D = q.size(3), Hkv = k.size(1), G = Hkv > 0 ? H / Hkv : 1, S = P + n;
  const int64_t X = R0 + S;
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  window = std::min(window, S + 1);  // keeps ν within int32, as the spans are
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "screened_attention_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
          const SequentialBlas sequential;
          Staging<scalar_t> st;
          for (int64_t r = begin; r < end; ++r) {
            const bool* valid =
                mask.defined() ? mask.const_data_ptr<bool>() + (r / Hkv) * S : nullptr;
            const Group<acc_t> x{st.in(0, q.const_data_ptr<scalar_t>() + r * G * n * D, G * n * D),
                                 st.in(1, k.const_data_ptr<scalar_t>() + r * X * D, X * D),
                                 st.in(2, v.const_data_ptr<scalar_t>() + r * X * Dv, X * Dv),
                                 valid,
                                 G,
                                 n,
                                 P,
                                 R0,
                                 S,
                                 D,
                                 Dv};
            scalar_t* dq_r = dq.mutable_data_ptr<scalar_t>() + r * G * n * D;
            scalar_t* dk_r = dk.mutable_data_ptr<scalar_t>() + r * X * D;
            scalar_t* dv_r = dv.mutable_data_ptr<scalar_t>() + r * X * Dv;
            backward_one<acc_t>(
                x, st.in(3, o.const_data_ptr<scalar_t>() + r * G * n * Dv, G * n * Dv),
                st.in(4, go.const_data_ptr<scalar_t>() + r * G * n * Dv, G * n * Dv),
                lse.const_data_ptr<acc_t>() + r * G * n, span.const_data_ptr<int32_t>() + r * X * 2,
                st.out(5, dq_r, G * n * D), st.out(6, dk_r, X * D), st.out(7, dv_r, X * Dv), window,
                static_cast<acc_t>(scale));
            st.flush(5, dq_r, G * n * D);
            st.flush(6, dk_r, X * D);
            st.flush(7, dv_r, X * Dv);
          }
        });
      });
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> screened_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& span, int64_t window,
    double scale) {
  return screened_attention_stream_backward_cpu(grad_out, q, k, v, out, lse, span, std::nullopt, 0,
                                                window, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(screening_attn, CPU, m) {
  m.impl("screened_attention", &screened_attention_cpu);
  m.impl("screened_attention_backward", &screened_attention_backward_cpu);
  m.impl("screened_attention_stream", &screened_attention_stream_cpu);
  m.impl("screened_attention_stream_backward", &screened_attention_stream_backward_cpu);
}

}  // namespace screening_attn
