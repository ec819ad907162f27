// CPU kernels of screened attention (design and costs: docs/kernels/cpu-cuda.md).
//
// Parallel over B·H; within one (b, h) the queries go in blocks of kBlockQ. A block's candidate
// keys are the relevant set at its start plus the key range [t0-ν+1, t1) (a key screened in
// during the block comes from that range), so its logits are two GEMMs, and the output two more.
// Only the per-query softmax, the relevancy sums and the slot rule run in the sequential scan.
// The backward replays the sets from the spans, block by block; dK and dV rows are accumulated
// by one thread per (b, h), in a fixed order: deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

#include "screening_attn/checks.h"
#include "screening_attn/screening.h"

namespace screening_attn {
namespace {

constexpr int64_t kBlockQ = 64;

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

// Slots that can ever fill: only keys 0 .. T-ν leave the window.
int64_t live_slots(int64_t T, int64_t window, int64_t relevant) {
  return std::min(relevant, std::max<int64_t>(0, T - window + 1));
}

template <typename T>
struct Row {  // one (b, h): pointers into the (B, H, T, ·) tensors
  const T *q, *k, *v;
  int64_t D, Dv;
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
// logits `ss` gathered from the relevant set (-inf for an empty slot). Writes the probabilities
// to `pw` / `ps`, adds the window ones to `rel` (the keys' relevancy), returns the log-sum-exp.
template <typename T>
SCREENING_ATTN_INLINE T softmax_query_impl(const T* sw, T* pw, int64_t nw, const T* ss, T* ps,
                                           int64_t ns, T* rel) {
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
    rel[i] += pw[i];
  }
#pragma omp simd
  for (int64_t i = 0; i < ns; ++i) ps[i] *= inv;
  return m + std::log(z);
}

// The scan's hot loop, compiled for AVX-512 and AVX2 too and picked at load time (ifunc).

SCREENING_ATTN_CLONES float softmax_query(const float* sw, float* pw, int64_t nw, const float* ss,
                                          float* ps, int64_t ns, float* rel) {
  return softmax_query_impl(sw, pw, nw, ss, ps, ns, rel);
}

double softmax_query(const double* sw, double* pw, int64_t nw, const double* ss, double* ps,
                     int64_t ns, double* rel) {
  return softmax_query_impl(sw, pw, nw, ss, ps, ns, rel);
}

// Backward: p[c] = exp(logit[c] - lse) where column c (key[c], in the relevant set over queries
// [start[c], end[c])) is a candidate of query t, else 0. In place on `p`.
template <typename T>
SCREENING_ATTN_INLINE void candidate_probs_impl(T* p, int64_t n, const int32_t* key,
                                                const int32_t* start, const int32_t* end, int32_t t,
                                                int32_t nu, T lse) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const bool cand = (key[c] <= t && key[c] > t - nu) || (start[c] <= t && t < end[c]);
    const T e = exp_nonpositive(p[c] - lse);
    p[c] = cand ? e : T(0);
  }
}

SCREENING_ATTN_CLONES void candidate_probs(float* p, int64_t n, const int32_t* key,
                                           const int32_t* start, const int32_t* end, int32_t t,
                                           int32_t nu, float lse) {
  candidate_probs_impl(p, n, key, start, end, t, nu, lse);
}

void candidate_probs(double* p, int64_t n, const int32_t* key, const int32_t* start,
                     const int32_t* end, int32_t t, int32_t nu, double lse) {
  candidate_probs_impl(p, n, key, start, end, t, nu, lse);
}

// One query block's candidate columns: [rows gathered from the relevant set | keys w0 .. t1-1].
template <typename T>
struct Columns {
  const T *kr, *vr, *k, *v;  // gathered rows; the (T, ·) keys and values of this (b, h)
  int64_t nr, w0, D, Dv;
  const T* key(int64_t c) const { return c < nr ? kr + c * D : k + (w0 + c - nr) * D; }
  const T* value(int64_t c) const { return c < nr ? vr + c * Dv : v + (w0 + c - nr) * Dv; }
};

template <typename scalar_t>
void forward_one(const Row<scalar_t>& x, scalar_t* out, scalar_t* lse, int64_t* slot_out,
                 scalar_t* score_out, scalar_t* rel, int32_t* span, int64_t T, int64_t nu,
                 int64_t rho, int64_t rho_live, scalar_t scale) {
  constexpr scalar_t kInf = std::numeric_limits<scalar_t>::infinity();
  const int64_t D = x.D, Dv = x.Dv, nr = rho_live;
  const int64_t ld = nr + std::min(T, kBlockQ + nu - 1);
  std::vector<scalar_t> S(kBlockQ * ld), P(kBlockQ * ld), Kr(nr * D), Vr(nr * Dv);
  std::vector<scalar_t> slot_logit(nr), slot_p(nr), slot_score(nr, -kInf);
  std::vector<int64_t> slot_key(nr, -1), slot_col(nr, 0);
  std::fill(rel, rel + T, scalar_t(0));
  std::fill(span, span + 2 * T, int32_t(-1));
  const BadRows bad_v(T, x.v, Dv);

  for (int64_t t0 = 0; t0 < T; t0 += kBlockQ) {
    const int64_t t1 = std::min(T, t0 + kBlockQ), nq = t1 - t0;
    const int64_t w0 = std::max<int64_t>(0, t0 - nu + 1), W = t1 - w0, nc = nr + W;
    bool exact = bad_v.any(w0, t1);     // (covers the keys screened in during the block too)
    for (int64_t s = 0; s < nr; ++s) {  // empty slots get zero rows: never candidates
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
    const Columns<scalar_t> cols{Kr.data(), Vr.data(), x.k, x.v, nr, w0, D, Dv};
    const at::Tensor Qb = mat(x.q + t0 * D, nq, D, D);
    gemm(mat(S.data(), nq, nr, ld), Qb, mat(Kr.data(), nr, D, D).t(), scale, 0);
    gemm(mat(S.data() + nr, nq, W, ld), Qb, mat(x.k + w0 * D, W, D, D).t(), scale, 0);
    for (int64_t i = 0; i < nq; ++i) std::fill_n(P.data() + i * ld, nc, scalar_t(0));

    for (int64_t t = t0; t < t1; ++t) {
      const scalar_t* srow = S.data() + (t - t0) * ld;
      scalar_t* prow = P.data() + (t - t0) * ld;
      const int64_t lo = std::max<int64_t>(0, t - nu + 1);
      const int64_t c0 = nr + lo - w0, nw = t - lo + 1;  // window columns [c0, c0 + nw)
      for (int64_t s = 0; s < nr; ++s) slot_logit[s] = slot_key[s] >= 0 ? srow[slot_col[s]] : -kInf;
      lse[t] =
          softmax_query(srow + c0, prow + c0, nw, slot_logit.data(), slot_p.data(), nr, rel + lo);
      for (int64_t s = 0; s < nr; ++s)
        if (slot_key[s] >= 0) prow[slot_col[s]] = slot_p[s];
      if (exact) {  // out_t as a sum over the candidates only
        scalar_t* orow = out + t * Dv;
        std::fill_n(orow, Dv, scalar_t(0));
        for (int64_t c = c0; c < c0 + nw; ++c) axpy(prow[c], cols.value(c), orow, Dv);
        for (int64_t s = 0; s < nr; ++s)
          if (slot_key[s] >= 0) axpy(slot_p[s], cols.value(slot_col[s]), orow, Dv);
      }

      const int64_t e = t - nu + 1;  // leaves the window; its relevancy is final
      if (e < 0 || nr == 0) continue;
      const int s = screen_slot<scalar_t, int64_t>(slot_key.data(), slot_score.data(),
                                                   static_cast<int>(nr), rel[e]);
      if (s < 0) continue;
      if (slot_key[s] >= 0) span[2 * slot_key[s] + 1] = static_cast<int32_t>(t + 1);
      slot_key[s] = e;
      slot_score[s] = rel[e];
      slot_col[s] = nr + e - w0;
      span[2 * e] = static_cast<int32_t>(t + 1);
      span[2 * e + 1] = static_cast<int32_t>(T);
    }
    if (!exact) {
      const at::Tensor Ob = mat(out + t0 * Dv, nq, Dv, Dv);
      gemm(Ob, mat(P.data(), nq, nr, ld), mat(Vr.data(), nr, Dv, Dv), 1, 0);
      gemm(Ob, mat(P.data() + nr, nq, W, ld), mat(x.v + w0 * Dv, W, Dv, Dv), 1, nr > 0 ? 1 : 0);
    }
  }
  for (int64_t s = 0; s < rho; ++s) {
    slot_out[s] = s < nr ? slot_key[s] : -1;
    score_out[s] = s < nr ? slot_score[s] : -kInf;
  }
}

template <typename scalar_t>
void backward_one(const Row<scalar_t>& x, const scalar_t* o, const scalar_t* dout,
                  const scalar_t* lse, const int32_t* span, scalar_t* dq, scalar_t* dk,
                  scalar_t* dv, int64_t T, int64_t nu, scalar_t scale) {
  const int64_t D = x.D, Dv = x.Dv;
  std::vector<scalar_t> P, dS, delta(kBlockQ), Kr, Vr, dKr, dVr;
  std::vector<int64_t> members;  // the relevant set at the block start, replayed from spans
  std::vector<int32_t> col_key, col_start, col_end;
  std::fill(dk, dk + T * D, scalar_t(0));
  std::fill(dv, dv + T * Dv, scalar_t(0));
  const BadRows bad_kv(T, x.k, D, x.v, Dv), bad_qg(T, x.q, D, dout, Dv);

  for (int64_t t0 = 0; t0 < T; t0 += kBlockQ) {
    const int64_t t1 = std::min(T, t0 + kBlockQ), nq = t1 - t0;
    const int64_t w0 = std::max<int64_t>(0, t0 - nu + 1), W = t1 - w0;
    const int64_t nr = static_cast<int64_t>(members.size()), nc = nr + W, ld = nc;
    P.resize(kBlockQ * ld);  // resize() stops growing once ρ and the window are reached
    dS.resize(kBlockQ * ld);
    Kr.resize(nr * D), dKr.resize(nr * D), Vr.resize(nr * Dv), dVr.resize(nr * Dv);
    for (int64_t s = 0; s < nr; ++s) {
      std::copy_n(x.k + members[s] * D, D, Kr.data() + s * D);
      std::copy_n(x.v + members[s] * Dv, Dv, Vr.data() + s * Dv);
    }
    const Columns<scalar_t> cols{Kr.data(), Vr.data(), x.k, x.v, nr, w0, D, Dv};
    const bool exact =
        bad_qg.any(t0, t1) || bad_kv.any(w0, t1) ||
        std::any_of(members.begin(), members.end(), [&](int64_t j) { return bad_kv.at(j); });
    // Column c holds key col_key[c]; it is a candidate of query t if in t's window or in the
    // relevant set then. (Keys of the set at t0 are <= t0 - ν: never in a window here.)
    col_key.resize(nc), col_start.resize(nc), col_end.resize(nc);
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t j = c < nr ? members[c] : w0 + c - nr;
      col_key[c] = static_cast<int32_t>(j);
      col_start[c] = span[2 * j];
      col_end[c] = span[2 * j + 1];
    }
    auto is_candidate = [&](int64_t t, int64_t c) {
      return (col_key[c] <= t && col_key[c] > t - nu) || (col_start[c] <= t && t < col_end[c]);
    };
    const at::Tensor Qb = mat(x.q + t0 * D, nq, D, D), dOb = mat(dout + t0 * Dv, nq, Dv, Dv);
    const at::Tensor Krm = mat(Kr.data(), nr, D, D), Kwm = mat(x.k + w0 * D, W, D, D);
    const at::Tensor Vrm = mat(Vr.data(), nr, Dv, Dv), Vwm = mat(x.v + w0 * Dv, W, Dv, Dv);
    const at::Tensor PR = mat(P.data(), nq, nr, ld), PW = mat(P.data() + nr, nq, W, ld);
    const at::Tensor dSR = mat(dS.data(), nq, nr, ld), dSW = mat(dS.data() + nr, nq, W, ld);
    // P = exp(logit - lse) on the candidates, 0 elsewhere
    gemm(PR, Qb, Krm.t(), scale, 0);
    gemm(PW, Qb, Kwm.t(), scale, 0);
    for (int64_t t = t0; t < t1; ++t) {
      candidate_probs(P.data() + (t - t0) * ld, nc, col_key.data(), col_start.data(),
                      col_end.data(), static_cast<int32_t>(t), static_cast<int32_t>(nu), lse[t]);
      delta[t - t0] = dot(o + t * Dv, dout + t * Dv, Dv);
    }
    if (exact) {  // per candidate, so an Inf/NaN reaches only the gradients that depend on it
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t *prow = P.data() + (t - t0) * ld, *qrow = x.q + t * D;
        const scalar_t* grow = dout + t * Dv;
        scalar_t* dqrow = dq + t * D;
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
    } else {
      // dS = P (dO V^T - delta); dQ = scale dS K; dK += scale dS^T Q; dV += P^T dO
      gemm(dSR, dOb, Vrm.t(), 1, 0);
      gemm(dSW, dOb, Vwm.t(), 1, 0);
      for (int64_t i = 0; i < nq; ++i) {
        const scalar_t* prow = P.data() + i * ld;
        scalar_t* srow = dS.data() + i * ld;
        const scalar_t d = delta[i];
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) srow[c] = prow[c] * (srow[c] - d);
      }
      const at::Tensor dQb = mat(dq + t0 * D, nq, D, D);
      gemm(dQb, dSR, Krm, scale, 0);
      gemm(dQb, dSW, Kwm, scale, nr > 0 ? 1 : 0);
      gemm(mat(dk + w0 * D, W, D, D), dSW.t(), Qb, scale, 1);
      gemm(mat(dv + w0 * Dv, W, Dv, Dv), PW.t(), dOb, 1, 1);
      if (nr > 0) {
        gemm(mat(dKr.data(), nr, D, D), dSR.t(), Qb, scale, 0);
        gemm(mat(dVr.data(), nr, Dv, Dv), PR.t(), dOb, 1, 0);
        for (int64_t s = 0; s < nr; ++s) {
          axpy(scalar_t(1), dKr.data() + s * D, dk + members[s] * D, D);
          axpy(scalar_t(1), dVr.data() + s * Dv, dv + members[s] * Dv, Dv);
        }
      }
    }
    // Replay the screening of this block's steps: key e entered after query t iff its span
    // starts at t+1, evicting the key whose span ends at t+1, if any.
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t - nu + 1;
      if (e < 0 || span[2 * e] != t + 1) continue;
      auto gone = std::find_if(members.begin(), members.end(),
                               [&](int64_t j) { return span[2 * j + 1] == t + 1; });
      if (gone != members.end()) members.erase(gone);
      members.push_back(e);
    }
  }
}

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                     int64_t relevant) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be 4-d (B, H, T, D), got ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4 && v.dim() == 4, "k and v must be 4-d");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                   "the CPU kernel takes float32 or float64, got ", q.scalar_type());
  check_same_dtype_device(q, "q", k, "k");
  check_same_dtype_device(q, "q", v, "v");
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), ", got ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.sizes().slice(0, 3) == q.sizes().slice(0, 3),
                    "v must match q in (B, H, T), got ", v.sizes());
  TORCH_CHECK_VALUE(window >= 1, "window must be >= 1, got ", window);
  TORCH_CHECK_VALUE(relevant >= 0, "relevant must be >= 0, got ", relevant);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
screened_attention_cpu(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                       int64_t window, int64_t relevant, double scale) {
  check_attention(q_, k_, v_, window, relevant);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Dv = v.size(3);
  at::Tensor out = at::empty({B, H, T, Dv}, q.options());
  at::Tensor lse = at::empty({B, H, T}, q.options());
  at::Tensor index = at::empty({B, H, relevant}, q.options().dtype(at::kLong));
  at::Tensor score = at::empty({B, H, relevant}, q.options());
  at::Tensor rel = at::empty({B, H, T}, q.options());
  at::Tensor span = at::empty({B, H, T, 2}, q.options().dtype(at::kInt));
  window = std::min(window, T + 1);  // any larger window sees and screens the same keys
  const int64_t rho_live = live_slots(T, window, relevant);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "screened_attention_cpu", [&] {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const Row<scalar_t> x{q.const_data_ptr<scalar_t>() + n * T * D,
                              k.const_data_ptr<scalar_t>() + n * T * D,
                              v.const_data_ptr<scalar_t>() + n * T * Dv, D, Dv};
        forward_one<scalar_t>(x, out.mutable_data_ptr<scalar_t>() + n * T * Dv,
                              lse.mutable_data_ptr<scalar_t>() + n * T,
                              index.mutable_data_ptr<int64_t>() + n * relevant,
                              score.mutable_data_ptr<scalar_t>() + n * relevant,
                              rel.mutable_data_ptr<scalar_t>() + n * T,
                              span.mutable_data_ptr<int32_t>() + n * T * 2, T, window, relevant,
                              rho_live, static_cast<scalar_t>(scale));
      }
    });
  });
  return {out, lse, index, score, rel, span};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> screened_attention_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& span_, int64_t window,
    double scale) {
  check_attention(q_, k_, v_, window, 0);
  check_same_dtype_device(q_, "q", grad_out_, "grad_out");
  TORCH_CHECK_VALUE(grad_out_.sizes() == v_.sizes() && out_.sizes() == v_.sizes(),
                    "grad_out and out must have the shape of v ", v_.sizes());
  TORCH_CHECK_VALUE(span_.scalar_type() == at::kInt && span_.dim() == 4 && span_.size(3) == 2,
                    "span must be an int32 (B, H, T, 2) tensor");
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor go = grad_out_.contiguous(), o = out_.contiguous(), lse = lse_.contiguous();
  const at::Tensor span = span_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Dv = v.size(3);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  window = std::min(window, T + 1);  // keeps ν within int32, as the spans are
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "screened_attention_backward_cpu", [&] {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const Row<scalar_t> x{q.const_data_ptr<scalar_t>() + n * T * D,
                              k.const_data_ptr<scalar_t>() + n * T * D,
                              v.const_data_ptr<scalar_t>() + n * T * Dv, D, Dv};
        backward_one<scalar_t>(
            x, o.const_data_ptr<scalar_t>() + n * T * Dv,
            go.const_data_ptr<scalar_t>() + n * T * Dv, lse.const_data_ptr<scalar_t>() + n * T,
            span.const_data_ptr<int32_t>() + n * T * 2, dq.mutable_data_ptr<scalar_t>() + n * T * D,
            dk.mutable_data_ptr<scalar_t>() + n * T * D,
            dv.mutable_data_ptr<scalar_t>() + n * T * Dv, T, window, static_cast<scalar_t>(scale));
      }
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(screening_attn, CPU, m) {
  m.impl("screened_attention", &screened_attention_cpu);
  m.impl("screened_attention_backward", &screened_attention_backward_cpu);
}

}  // namespace screening_attn
