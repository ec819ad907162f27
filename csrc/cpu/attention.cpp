// CPU kernels of screened attention (design and costs: docs/kernels/cpu-cuda.md), with grouped
// heads, key padding and a stream's initial state (docs/streaming.md).
//
// Within one (b, KV head) the queries go in blocks of kBlockQ. A block's candidate keys are the
// relevant set at its start plus the key range [t0-ν+1, t1) (a key screened in during the block
// comes from that range), so its logits are two GEMMs per query head of the group, and the
// output two more. Only the slot logits, the per-query softmax, the relevancy sums and the slot
// rule run in the sequential scan; the range logits and the outputs are separate block tasks.
// Parallel over B·Hkv; with fewer (b, KV head) rows than threads, over blocks too (a pipeline:
// range logits, scan, outputs). The backward replays the sets from the spans in segments of
// kSegmentQ queries, parallel over rows and segments, and sums the segments' dK/dV rows in
// segment order. The order of every sum is fixed by blocks and segments, never by the threads:
// the same bits for any thread count; no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "vec.h"

#include "screening_attn/checks.h"
#include "screening_attn/screening.h"

namespace screening_attn {
namespace {

constexpr int64_t kBlockQ = 64;
// Queries per backward segment. Fixed, not a function of the thread count: the segments decide
// the order in which dK/dV contributions are summed.
constexpr int64_t kSegmentQ = 8 * kBlockQ;

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

// Runs f(task) for task in [0, n) on at::parallel_for's threads, each taking the next task not
// yet taken (a scan task is much longer than a block task); inline on one thread.
template <typename F>
void run_tasks(int64_t n, const F& f) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    const SequentialBlas sequential;
    for (int64_t t = next++; t < n; t = next++) f(t);
  });
}

// Scratch memory aligned to 64 bytes; resize() only grows and keeps nothing. Every buffer a GEMM
// reads or writes is one, so a block's operands are aligned alike whichever thread or path runs
// it (BLAS kernels may sum differently for differently aligned data).
template <typename T>
class Scratch {
 public:
  T* data() const { return p_.get(); }
  void resize(int64_t n) {
    if (n <= cap_) return;
    const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
    p_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(p_ != nullptr, "screened attention: out of memory (", bytes, " bytes of scratch)");
    cap_ = n;
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> p_;
  int64_t cap_ = 0;
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

// One block of kBlockQ queries, positions [t0, t1), and its key range [w0, t1).
struct Block {
  int64_t t0, t1, nq, w0, W;
};

Block block_at(int64_t P, int64_t S, int64_t nu, int64_t bi) {
  const int64_t t0 = P + bi * kBlockQ, t1 = std::min(S, t0 + kBlockQ);
  const int64_t w0 = std::max<int64_t>(0, t0 - nu + 1);
  return {t0, t1, t1 - t0, w0, t1 - w0};
}

// The forward's shapes, common to the groups of a call. A block's logits (and probabilities)
// are G matrices of kBlockQ rows: nr slot columns, then the range's W <= ld - nr columns.
template <typename T>
struct Fwd {
  int64_t nu, rho, nr, ld, nb;  // nr = ρ_live slot columns; nb blocks
  int64_t block;                // elements of one block's logits, rounded up to 64 bytes
  T scale;
  Fwd(const Group<T>& x, int64_t nu_, int64_t rho_, int64_t nr_, T scale_)
      : nu(nu_), rho(rho_), nr(nr_), scale(scale_) {
    ld = std::max<int64_t>(0, nr + std::min(x.n, kBlockQ) + std::min(x.S, nu) - 1);
    nb = (x.n + kBlockQ - 1) / kBlockQ;
    block = (x.G * kBlockQ * ld + 15) / 16 * 16;
  }
};

// The logits of a block's range columns (they do not depend on the scan): Sm[:, nr:].
template <typename T>
__attribute__((noinline)) void prep_block(const Group<T>& x, const Fwd<T>& f, int64_t bi, T* Sm) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const Block b = block_at(x.P, x.S, f.nu, bi);
  const int64_t D = x.D, ld = f.ld, nr = f.nr;
  for (int64_t g = 0; g < x.G; ++g) {
    T* Sg = Sm + g * kBlockQ * ld;
    gemm(mat(Sg + nr, b.nq, b.W, ld), mat(x.qhead(g) + (b.t0 - x.P) * D, b.nq, D, D),
         mat(x.kseq() + b.w0 * D, b.W, D, D).t(), f.scale, 0);
    for (int64_t j = b.w0; j < b.t1; ++j)  // a padded key is never a candidate
      if (!x.real(j))
        for (int64_t i = 0; i < b.nq; ++i) Sg[i * ld + nr + j - b.w0] = -kInf;
  }
}

// The sequential part of one group's forward, block after block: slot logits, softmax,
// relevancy, slot rule, spans. Outputs: lse (G, n); relevancy (S, from rel0 for the P earlier
// positions), span (R0 + S, 2) in call query numbers; out (G, n, Dv) of the blocks that take the
// exact path. Initial slots: slot s < R0 holds buffer row s if slot_index0[s] >= 0.
template <typename T>
struct Scan {
  Group<T> x;
  const Fwd<T>& f;
  T *out, *lse, *rel;
  int32_t* span;
  std::vector<T> slot_logit, slot_p, slot_score, gain;
  std::vector<int64_t> slot_key, slot_col;
  std::vector<int32_t> real_before;  // real positions before each position
  BadRows bad_v;
  int64_t filled = 0;
  Scratch<T> Kr, Vr;

  Scan(const Group<T>& x_, const Fwd<T>& f_, T* out_, T* lse_, T* rel_, int32_t* span_,
       const T* rel0, const int64_t* slot_index0, const T* slot_score0)
      : x(x_),
        f(f_),
        out(out_),
        lse(lse_),
        rel(rel_),
        span(span_),
        slot_logit(f.nr),
        slot_p(f.nr),
        slot_score(f.nr, -std::numeric_limits<T>::infinity()),
        gain(f.nu),
        slot_key(f.nr, -1),
        slot_col(f.nr, 0),
        real_before(x.S + 1, 0),
        bad_v(x.R0 + x.S, x.v, x.Dv) {
    const int64_t S = x.S, P = x.P, X = x.R0 + S;
    for (int64_t j = 0; j < S; ++j) real_before[j + 1] = real_before[j] + (x.real(j) ? 1 : 0);
    std::copy_n(rel0, P, rel);
    std::fill(rel + P, rel + S, T(0));
    std::fill(span, span + 2 * X, int32_t(-1));
    for (int64_t s = 0; s < std::min(x.R0, f.nr); ++s) {
      if (slot_index0[s] < 0) continue;
      slot_key[s] = s;
      slot_score[s] = slot_score0[s];
      span[2 * s] = 0;  // internal: the backward replays the set from here
      span[2 * s + 1] = static_cast<int32_t>(x.n);
      ++filled;
    }
    Kr.resize(f.nr * x.D);
    Vr.resize(f.nr * x.Dv);
  }

  // Block bi with its range logits in Sm: fills Sm's slot columns and the probabilities Pm
  // (zeros for non-candidates), and records the set at the block start (`keys`, nr buffer rows,
  // -1 empty) and whether the block took the exact path (its outputs then written here).
  __attribute__((noinline)) void block(int64_t bi, T* Sm, T* Pm, int64_t* keys,
                                       uint8_t* exact_out) {
    constexpr T kInf = std::numeric_limits<T>::infinity();
    const Block b = block_at(x.P, x.S, f.nu, bi);
    const int64_t D = x.D, Dv = x.Dv, nr = f.nr, ld = f.ld, G = x.G, n = x.n, P = x.P;
    const int64_t R0 = x.R0, nu = f.nu, t0 = b.t0, t1 = b.t1, w0 = b.w0, nc = nr + b.W;
    bool exact = bad_v.any(R0 + w0, R0 + t1);  // (covers the keys screened in during the block)
    for (int64_t s = 0; s < nr; ++s) {         // empty slots get zero rows: never candidates
      slot_col[s] = s;
      const int64_t key = keys[s] = slot_key[s];
      if (key >= 0) {
        std::copy_n(x.k + key * D, D, Kr.data() + s * D);
        exact = exact || bad_v.at(key);
      } else {
        std::fill_n(Kr.data() + s * D, D, T(0));
      }
    }
    if (exact)  // the values of the set, for the outputs computed here
      for (int64_t s = 0; s < nr; ++s) {
        if (slot_key[s] >= 0)
          std::copy_n(x.v + slot_key[s] * Dv, Dv, Vr.data() + s * Dv);
        else
          std::fill_n(Vr.data() + s * Dv, Dv, T(0));
      }
    const Columns<T> cols{Kr.data(), Vr.data(), x.kseq(), x.vseq(), nr, w0, D, Dv};
    for (int64_t g = 0; g < G; ++g) {
      T* Sg = Sm + g * kBlockQ * ld;
      gemm(mat(Sg, b.nq, nr, ld), mat(x.qhead(g) + (t0 - P) * D, b.nq, D, D),
           mat(Kr.data(), nr, D, D).t(), f.scale, 0);
      for (int64_t i = 0; i < b.nq; ++i) std::fill_n(Pm + (g * kBlockQ + i) * ld, nc, T(0));
    }

    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t - P, lo = std::max<int64_t>(0, t - nu + 1);
      const int64_t c0 = nr + lo - w0, nw = t - lo + 1;  // window columns [c0, c0 + nw)
      const bool any = real_before[t + 1] > real_before[lo] || filled > 0;
      // A real query with a candidate adds the group mean of its window weights to relevancy.
      const bool counts = any && x.real(t);
      std::fill_n(gain.data(), nw, T(0));
      for (int64_t g = 0; g < G; ++g) {
        const T* srow = Sm + (g * kBlockQ + t - t0) * ld;
        T* prow = Pm + (g * kBlockQ + t - t0) * ld;
        T* orow = out + (g * n + i) * Dv;
        if (!any) {  // no candidate: zeros, and an lse that makes every backward weight 0
          lse[g * n + i] = kInf;
          if (exact) std::fill_n(orow, Dv, T(0));
          continue;
        }
        for (int64_t s = 0; s < nr; ++s)
          slot_logit[s] = slot_key[s] >= 0 ? srow[slot_col[s]] : -kInf;
        lse[g * n + i] = softmax_query(srow + c0, prow + c0, nw, slot_logit.data(), slot_p.data(),
                                       nr, gain.data());
        for (int64_t s = 0; s < nr; ++s)
          if (slot_key[s] >= 0) prow[slot_col[s]] = slot_p[s];
        if (exact) {  // out_t as a sum over the candidates only
          std::fill_n(orow, Dv, T(0));
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
          const T g_ = static_cast<T>(G);
          for (int64_t j = 0; j < nw; ++j) rel[lo + j] += gain[j] / g_;
        }
      }

      const int64_t e = t - nu + 1;                  // leaves the window; its relevancy is final
      if (e < 0 || nr == 0 || !x.real(e)) continue;  // a padded key takes no slot
      const int s =
          screen_slot<T, int64_t>(slot_key.data(), slot_score.data(), static_cast<int>(nr), rel[e]);
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
    *exact_out = exact ? 1 : 0;
  }

  // The final set: slots (ρ) and their scores.
  void finish(int64_t* slot_out, T* score_out) const {
    for (int64_t s = 0; s < f.rho; ++s) {
      slot_out[s] = s < f.nr ? slot_key[s] : -1;
      score_out[s] = s < f.nr ? slot_score[s] : -std::numeric_limits<T>::infinity();
    }
  }
};

// A block's outputs from its probabilities Pm and the set at its start (`keys`):
// out = Pm[:, :nr] V_set + Pm[:, nr:] V_range, two GEMMs per head (unless the scan took the
// exact path). Vr: nr x Dv scratch.
template <typename T>
__attribute__((noinline)) void finish_block(const Group<T>& x, const Fwd<T>& f, int64_t bi,
                                            const T* Pm, const int64_t* keys, bool exact, T* out,
                                            Scratch<T>& Vr) {
  if (exact) return;
  const Block b = block_at(x.P, x.S, f.nu, bi);
  const int64_t Dv = x.Dv, nr = f.nr, ld = f.ld;
  Vr.resize(nr * Dv);
  for (int64_t s = 0; s < nr; ++s) {
    if (keys[s] >= 0)
      std::copy_n(x.v + keys[s] * Dv, Dv, Vr.data() + s * Dv);
    else
      std::fill_n(Vr.data() + s * Dv, Dv, T(0));
  }
  for (int64_t g = 0; g < x.G; ++g) {
    const T* Pg = Pm + g * kBlockQ * ld;
    const at::Tensor Ob = mat(out + (g * x.n + b.t0 - x.P) * Dv, b.nq, Dv, Dv);
    gemm(Ob, mat(Pg, b.nq, nr, ld), mat(Vr.data(), nr, Dv, Dv), 1, 0);
    gemm(Ob, mat(Pg + nr, b.nq, b.W, ld), mat(x.vseq() + b.w0 * Dv, b.W, Dv, Dv), 1,
         nr > 0 ? 1 : 0);
  }
}

// The forward of (b, KV head) rows that are fewer than the threads, parallel over blocks too.
// Every thread runs the same loop and takes whichever task is ready: a row's scan (the critical
// path, so tried first; one thread at a time holds it and scans block after block), the range
// logits of the next block (at most kRing blocks ahead of the outputs: their ring slots), the
// outputs of a scanned block. No barrier between blocks: a thread the OS deschedules holds up
// only the task it has. Each block does the same arithmetic as on one thread, in buffers aligned
// alike: the same bits.
constexpr int64_t kRing = 16;

template <typename T>
class Pipeline {
 public:
  Pipeline(const std::vector<Group<T>>& xs, const Fwd<T>& f, std::vector<Scan<T>>& scans)
      : xs_(xs), f_(f), scans_(scans), R_(static_cast<int64_t>(xs.size())), rows_(new Row[R_]) {
    for (int64_t r = 0; r < R_; ++r) rows_[r].init(f.nb);
    Sring_.resize(R_ * kRing * f.block), Pring_.resize(R_ * kRing * f.block);
    keys_.resize(R_ * kRing * f.nr), exact_.resize(R_ * kRing);
  }

  void run() {
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), R_ * f_.nb), 1,
                     [&](int64_t, int64_t) {
                       const SequentialBlas sequential;
                       try {
                         work();
                       } catch (...) {
                         failed_ = true;  // the others stop instead of waiting for this one
                         throw;
                       }
                     });
  }

 private:
  struct Row {
    std::atomic<int64_t> next_prep{0}, next_fin{0}, scanned{0};
    std::atomic<bool> scanning{false};
    std::unique_ptr<std::atomic<uint8_t>[]> prepped, done;  // per block
    void init(int64_t nb) {
      prepped.reset(new std::atomic<uint8_t>[nb]);
      done.reset(new std::atomic<uint8_t>[nb]);
      for (int64_t b = 0; b < nb; ++b) prepped[b] = done[b] = 0;
    }
  };

  int64_t slot(int64_t r, int64_t b) const { return r * kRing + b % kRing; }
  T* logits(int64_t k) { return Sring_.data() + k * f_.block; }
  T* probs(int64_t k) { return Pring_.data() + k * f_.block; }

  void work() {
    Scratch<T> Vr;
    int idle = 0;
    while (!failed_) {
      bool left = false, busy = false;
      for (int64_t r = 0; r < R_ && !busy; ++r) {
        if (rows_[r].next_fin.load(std::memory_order_relaxed) >= f_.nb) continue;
        left = true;
        busy = scan(r) || prep(r) || finish(r, Vr);
      }
      if (!left) return;
      idle = busy ? 0 : idle + 1;
      // Waiting for another thread's task (a block is ~0.1 ms): yield, and after a while sleep,
      // so that a waiting thread does not take the core of one that works.
      if (idle > 0 && idle < 64)
        std::this_thread::yield();
      else if (idle >= 64)
        std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  // Claims block b's range logits if b is the next to prepare and its ring slot is free.
  bool claim_prep(Row& w, int64_t b) {
    int64_t expected = b;
    return b < f_.nb && (b < kRing || w.done[b - kRing].load(std::memory_order_acquire)) &&
           w.next_prep.compare_exchange_strong(expected, b + 1);
  }

  void prep_now(int64_t r, int64_t b) {
    prep_block(xs_[r], f_, b, logits(slot(r, b)));
    rows_[r].prepped[b].store(1, std::memory_order_release);
  }

  bool prep(int64_t r) {
    const int64_t b = rows_[r].next_prep.load(std::memory_order_relaxed);
    if (!claim_prep(rows_[r], b)) return false;
    prep_now(r, b);
    return true;
  }

  bool scan(int64_t r) {
    Row& w = rows_[r];
    if (w.scanning.load(std::memory_order_relaxed) ||
        w.scanning.exchange(true, std::memory_order_acquire))
      return false;
    const int64_t s0 = w.scanned.load(std::memory_order_relaxed);
    int64_t s = s0;
    while (s < f_.nb && !failed_) {
      if (!w.prepped[s].load(std::memory_order_acquire)) {
        if (!claim_prep(w, s)) break;  // being prepared elsewhere, or its slot still in use
        prep_now(r, s);
      }
      const int64_t k = slot(r, s);
      scans_[r].block(s, logits(k), probs(k), keys_.data() + k * f_.nr, &exact_[k]);
      w.scanned.store(++s, std::memory_order_release);
    }
    w.scanning.store(false, std::memory_order_release);
    return s > s0;
  }

  bool finish(int64_t r, Scratch<T>& Vr) {
    Row& w = rows_[r];
    int64_t b = w.next_fin.load(std::memory_order_relaxed);
    if (b >= w.scanned.load(std::memory_order_acquire) ||
        !w.next_fin.compare_exchange_strong(b, b + 1))
      return false;
    const int64_t k = slot(r, b);
    finish_block(xs_[r], f_, b, probs(k), keys_.data() + k * f_.nr, exact_[k] != 0, scans_[r].out,
                 Vr);
    w.done[b].store(1, std::memory_order_release);
    return true;
  }

  const std::vector<Group<T>>& xs_;
  const Fwd<T>& f_;
  std::vector<Scan<T>>& scans_;
  const int64_t R_;
  std::unique_ptr<Row[]> rows_;
  Scratch<T> Sring_, Pring_;
  std::vector<int64_t> keys_;
  std::vector<uint8_t> exact_;
  std::atomic<bool> failed_{false};
};

// The backward goes by segments of kSegmentQ queries, positions [st0, st1): parallel over them
// even for one (b, KV head). A segment accumulates dK/dV into local rows, first those of the
// set at st0 (nm0 keys, all earlier than its first window), then positions [sw0, st1). Rows
// [st0, st1) get nothing from earlier segments: they are copied out (`direct`); the rest (the
// `partial` rows, before st0) are added to dK/dV afterwards, segment after segment. The order of
// every sum is thus fixed by the segments, not by the threads: the same bits for any count.
struct Segment {
  int64_t st0, st1, sw0, nm0;
  int64_t partial_rows() const { return nm0 + st0 - sw0; }
  int64_t rows() const { return nm0 + st1 - sw0; }
};

// One group's read-only facts for its segment tasks: non-finite rows, and the set at each
// segment start (sorted buffer rows: members[offset[s], offset[s + 1])).
template <typename T>
struct BwdGroup {
  BadRows bad_kv;
  std::vector<BadRows> bad_qg;
  std::vector<int64_t> members, offset;
  int64_t nseg;

  BwdGroup(const Group<T>& x, const T* dout, const int32_t* span)
      : bad_kv(x.R0 + x.S, x.k, x.D, x.v, x.Dv), nseg((x.n + kSegmentQ - 1) / kSegmentQ) {
    for (int64_t g = 0; g < x.G; ++g)
      bad_qg.emplace_back(x.n, x.qhead(g), x.D, dout + g * x.n * x.Dv, x.Dv);
    // Key j is in the set of the queries i in [span_j.start, span_j.end) (call query numbers):
    // one pass over the keys in order lists each segment's set sorted, as the replay keeps it.
    std::vector<std::vector<int64_t>> sets(nseg);
    for (int64_t j = 0; j < x.R0 + x.S; ++j) {
      const int64_t a = span[2 * j], e = std::min<int64_t>(span[2 * j + 1], x.n);
      if (a < 0) continue;
      for (int64_t s = (a + kSegmentQ - 1) / kSegmentQ; s * kSegmentQ < e; ++s)
        sets[s].push_back(j);
    }
    offset.assign(1, 0);
    for (const auto& m : sets) {
      members.insert(members.end(), m.begin(), m.end());
      offset.push_back(static_cast<int64_t>(members.size()));
    }
  }

  Segment segment(const Group<T>& x, int64_t nu, int64_t s) const {
    const int64_t st0 = x.P + s * kSegmentQ, st1 = std::min(x.S, st0 + kSegmentQ);
    return {st0, st1, std::max<int64_t>(0, st0 - nu + 1), offset[s + 1] - offset[s]};
  }
};

// Per-thread buffers of the backward.
template <typename T>
struct BwdScratch {
  Scratch<T> Pm, dS, Kr, Vr, dKr, dVr, lk, lv;  // lk, lv: a segment's local dK, dV rows
  std::vector<T> delta = std::vector<T>(kBlockQ);
  std::vector<int64_t> members, mrow;  // the set during the segment, and each key's local row
  std::vector<int32_t> col_key, col_row, col_win, col_start, col_end;
};

// Gradients of segment s of one group: dq (G, n, D) rows and dk (R0 + S, D), dv (R0 + S, Dv)
// rows [R0 + st0, R0 + st1) written; the partial rows left in w.lk, w.lv (the first
// partial_rows()). The sets are replayed from the forward's span, block by block.
template <typename T>
__attribute__((noinline)) void backward_segment(const Group<T>& x, const BwdGroup<T>& pre,
                                                int64_t seg, const T* o, const T* dout,
                                                const T* lse, const int32_t* span, T* dq, T* dk,
                                                T* dv, int64_t nu, T scale, BwdScratch<T>& w) {
  const int64_t D = x.D, Dv = x.Dv, G = x.G, n = x.n, P = x.P, R0 = x.R0;
  const Segment sg = pre.segment(x, nu, seg);
  const int64_t nm0 = sg.nm0, sw0 = sg.sw0;
  const int64_t* m0 = pre.members.data() + pre.offset[seg];
  w.members.assign(m0, m0 + nm0);
  w.mrow.resize(nm0);
  for (int64_t r = 0; r < nm0; ++r) w.mrow[r] = r;
  w.lk.resize(sg.rows() * D);
  w.lv.resize(sg.rows() * Dv);
  T *lk = w.lk.data(), *lv = w.lv.data();
  std::fill_n(lk, sg.rows() * D, T(0));
  std::fill_n(lv, sg.rows() * Dv, T(0));
  std::vector<int64_t>& members = w.members;
  T* delta = w.delta.data();

  for (int64_t t0 = sg.st0; t0 < sg.st1; t0 += kBlockQ) {
    const int64_t t1 = std::min(sg.st1, t0 + kBlockQ), nq = t1 - t0;
    const int64_t w0 = std::max<int64_t>(0, t0 - nu + 1), W = t1 - w0;
    const int64_t nr = static_cast<int64_t>(members.size()), nc = nr + W, ld = nc;
    const int64_t wrow = nm0 + w0 - sw0;  // local row of position w0
    w.Pm.resize(kBlockQ * ld);  // resize() stops growing once ρ and the window are reached
    w.dS.resize(kBlockQ * ld);
    w.Kr.resize(nr * D), w.dKr.resize(nr * D), w.Vr.resize(nr * Dv), w.dVr.resize(nr * Dv);
    T *Pm = w.Pm.data(), *dS = w.dS.data();
    for (int64_t s = 0; s < nr; ++s) {
      std::copy_n(x.k + members[s] * D, D, w.Kr.data() + s * D);
      std::copy_n(x.v + members[s] * Dv, Dv, w.Vr.data() + s * Dv);
    }
    const Columns<T> cols{w.Kr.data(), w.Vr.data(), x.kseq(), x.vseq(), nr, w0, D, Dv};
    bool exact =
        pre.bad_kv.any(R0 + w0, R0 + t1) ||
        std::any_of(members.begin(), members.end(), [&](int64_t j) { return pre.bad_kv.at(j); });
    for (int64_t g = 0; g < G; ++g) exact = exact || pre.bad_qg[g].any(t0 - P, t1 - P);
    // Column c holds buffer row col_key[c] (local row col_row[c]); it is a candidate of the
    // query at position t if its position col_win[c] is a real one in t's window, or its span
    // holds the query. (Keys of the set at t0 are <= t0 - ν: never in a window here.)
    w.col_key.resize(nc), w.col_row.resize(nc), w.col_win.resize(nc);
    w.col_start.resize(nc), w.col_end.resize(nc);
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t j = c < nr ? members[c] : R0 + w0 + c - nr;
      const bool seq_real = j >= R0 && x.real(j - R0);
      w.col_key[c] = static_cast<int32_t>(j);
      w.col_row[c] = static_cast<int32_t>(c < nr ? w.mrow[c] : wrow + c - nr);
      w.col_win[c] = seq_real ? static_cast<int32_t>(j - R0) : std::numeric_limits<int32_t>::min();
      w.col_start[c] = span[2 * j];
      w.col_end[c] = span[2 * j + 1];
    }
    auto is_candidate = [&](int64_t t, int64_t c) {
      const int64_t i = t - P;
      return (w.col_win[c] <= t && w.col_win[c] > t - nu) ||
             (w.col_start[c] <= i && i < w.col_end[c]);
    };
    const at::Tensor Krm = mat(w.Kr.data(), nr, D, D), Kwm = mat(x.kseq() + w0 * D, W, D, D);
    const at::Tensor Vrm = mat(w.Vr.data(), nr, Dv, Dv), Vwm = mat(x.vseq() + w0 * Dv, W, Dv, Dv);
    const at::Tensor PR = mat(Pm, nq, nr, ld), PW = mat(Pm + nr, nq, W, ld);
    const at::Tensor dSR = mat(dS, nq, nr, ld), dSW = mat(dS + nr, nq, W, ld);
    for (int64_t g = 0; g < G; ++g) {
      const T *qg = x.qhead(g), *og = o + g * n * Dv, *dog = dout + g * n * Dv;
      const T* lg = lse + g * n;
      T* dqg = dq + g * n * D;
      const at::Tensor Qb = mat(qg + (t0 - P) * D, nq, D, D);
      const at::Tensor dOb = mat(dog + (t0 - P) * Dv, nq, Dv, Dv);
      // P = exp(logit - lse) on the candidates, 0 elsewhere
      gemm(PR, Qb, Krm.t(), scale, 0);
      gemm(PW, Qb, Kwm.t(), scale, 0);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i = t - P;
        candidate_probs(Pm + (t - t0) * ld, nc, w.col_win.data(), w.col_start.data(),
                        w.col_end.data(), static_cast<int32_t>(t), static_cast<int32_t>(i),
                        static_cast<int32_t>(nu), lg[i]);
        delta[t - t0] = dot(og + i * Dv, dog + i * Dv, Dv);
      }
      if (exact) {  // per candidate, so an Inf/NaN reaches only the gradients that depend on it
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i = t - P;
          const T *prow = Pm + (t - t0) * ld, *qrow = qg + i * D;
          const T* grow = dog + i * Dv;
          T* dqrow = dqg + i * D;
          std::fill_n(dqrow, D, T(0));
          for (int64_t c = 0; c < nc; ++c) {
            if (!is_candidate(t, c)) continue;
            const int64_t r = w.col_row[c];
            const T ds = prow[c] * (dot(grow, cols.value(c), Dv) - delta[t - t0]);
            axpy(scale * ds, cols.key(c), dqrow, D);
            axpy(scale * ds, qrow, lk + r * D, D);
            axpy(prow[c], grow, lv + r * Dv, Dv);
          }
        }
        continue;
      }
      // dS = P (dO V^T - delta); dQ = scale dS K; dK += scale dS^T Q; dV += P^T dO
      gemm(dSR, dOb, Vrm.t(), 1, 0);
      gemm(dSW, dOb, Vwm.t(), 1, 0);
      for (int64_t i = 0; i < nq; ++i) {
        const T* prow = Pm + i * ld;
        T* srow = dS + i * ld;
        const T d = delta[i];
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) srow[c] = prow[c] * (srow[c] - d);
      }
      const at::Tensor dQb = mat(dqg + (t0 - P) * D, nq, D, D);
      gemm(dQb, dSR, Krm, scale, 0);
      gemm(dQb, dSW, Kwm, scale, nr > 0 ? 1 : 0);
      gemm(mat(lk + wrow * D, W, D, D), dSW.t(), Qb, scale, 1);
      gemm(mat(lv + wrow * Dv, W, Dv, Dv), PW.t(), dOb, 1, 1);
      if (nr > 0) {  // the slot rows' gradients, summed over the group, scattered once below
        gemm(mat(w.dKr.data(), nr, D, D), dSR.t(), Qb, scale, g > 0 ? 1 : 0);
        gemm(mat(w.dVr.data(), nr, Dv, Dv), PR.t(), dOb, 1, g > 0 ? 1 : 0);
      }
    }
    if (!exact && nr > 0) {
      for (int64_t s = 0; s < nr; ++s) {
        axpy(T(1), w.dKr.data() + s * D, lk + w.mrow[s] * D, D);
        axpy(T(1), w.dVr.data() + s * Dv, lv + w.mrow[s] * Dv, Dv);
      }
    }
    // Replay the screening of this block's steps: key e entered after query i iff its span
    // starts at i+1, evicting the key whose span ends at i+1, if any.
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t - P, e = t - nu + 1;
      if (e < 0 || span[2 * (R0 + e)] != i + 1) continue;
      auto gone = std::find_if(members.begin(), members.end(),
                               [&](int64_t j) { return span[2 * j + 1] == i + 1; });
      if (gone != members.end()) {
        w.mrow.erase(w.mrow.begin() + (gone - members.begin()));
        members.erase(gone);
      }
      members.push_back(R0 + e);
      w.mrow.push_back(nm0 + e - sw0);
    }
  }
  const int64_t np = sg.partial_rows(), nd = sg.st1 - sg.st0;
  std::copy_n(lk + np * D, nd * D, dk + (R0 + sg.st0) * D);
  std::copy_n(lv + np * Dv, nd * Dv, dv + (R0 + sg.st0) * Dv);
}

// d[target rows] += the partial rows of segment `sg`, columns [c0, c1) of rows `width` long:
// the set's rows m0[r], then positions [sw0, st0).
template <typename T>
void add_partial(const Segment& sg, const int64_t* m0, int64_t R0, const T* part, int64_t width,
                 int64_t c0, int64_t c1, T* d) {
  for (int64_t r = 0; r < sg.partial_rows(); ++r) {
    const int64_t j = r < sg.nm0 ? m0[r] : R0 + sg.sw0 + r - sg.nm0;
    const T* src = part + r * width;
    T* dst = d + j * width;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
  }
}

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Half inputs are computed in float32 (docs/backends.md): each (b, KV head) is converted into
// float buffers (of its thread, reused from row to row; or of the row, when the rows are fewer
// than the threads), so no tensor-sized copy is made. For float32 and float64 the pointers pass
// through.
template <typename in_t>
struct Staging {
  using acc_t = at::opmath_type<in_t>;
  static constexpr bool kPass = std::is_same_v<in_t, acc_t>;
  Scratch<acc_t> buf[8];

  const acc_t* in(int slot, const in_t* p, int64_t n) {
    if constexpr (kPass) {
      return p;
    } else {
      buf[slot].resize(n);
      acc_t* b = buf[slot].data();
      for (int64_t i = 0; i < n; ++i) b[i] = static_cast<acc_t>(p[i]);
      return b;
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
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<in_t>(buf[slot].data()[i]);
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
  const int64_t rows = B * Hkv;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "screened_attention_stream_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // (b, KV head) row r: its inputs (through st) and outputs; its query heads are r G ..
        auto group = [&](int64_t r, Staging<scalar_t>& st) {
          const bool* valid =
              mask.defined() ? mask.const_data_ptr<bool>() + (r / Hkv) * S : nullptr;
          return Group<acc_t>{st.in(0, q.const_data_ptr<scalar_t>() + r * G * n * D, G * n * D),
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
        };
        auto out_of = [&](int64_t r) { return out.mutable_data_ptr<scalar_t>() + r * G * n * Dv; };
        auto scan = [&](int64_t r, const Group<acc_t>& x, const Fwd<acc_t>& f,
                        Staging<scalar_t>& st) {
          return Scan<acc_t>(
              x, f, st.out(3, out_of(r), G * n * Dv), lse.mutable_data_ptr<acc_t>() + r * G * n,
              rel.mutable_data_ptr<acc_t>() + r * S, span.mutable_data_ptr<int32_t>() + r * X * 2,
              rel0.const_data_ptr<acc_t>() + r * P, slot_index0.const_data_ptr<int64_t>() + r * R0,
              slot_score0.const_data_ptr<acc_t>() + r * R0);
        };
        auto finish = [&](int64_t r, const Scan<acc_t>& sc, Staging<scalar_t>& st) {
          sc.finish(index.mutable_data_ptr<int64_t>() + r * relevant,
                    score.mutable_data_ptr<acc_t>() + r * relevant);
          st.flush(3, out_of(r), G * n * Dv);
        };
        if (rows == 0) return;
        const auto scale_ = static_cast<acc_t>(scale);
        if (rows >= at::get_num_threads() || at::in_parallel_region()) {
          // enough (b, KV head) rows for the threads: each does its rows block after block
          at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
            const SequentialBlas sequential;
            Staging<scalar_t> st;
            Scratch<acc_t> Sm, Pm, Vr;
            std::vector<int64_t> keys;
            for (int64_t r = begin; r < end; ++r) {
              const Group<acc_t> x = group(r, st);
              const Fwd<acc_t> f(x, window, relevant, rho_live, scale_);
              Sm.resize(f.block), Pm.resize(f.block), keys.resize(f.nr);
              Scan<acc_t> sc = scan(r, x, f, st);
              for (int64_t bi = 0; bi < f.nb; ++bi) {
                uint8_t exact = 0;
                prep_block(x, f, bi, Sm.data());
                sc.block(bi, Sm.data(), Pm.data(), keys.data(), &exact);
                finish_block(x, f, bi, Pm.data(), keys.data(), exact != 0, sc.out, Vr);
              }
              finish(r, sc, st);
            }
          });
          return;
        }
        // Fewer rows than threads: parallel over blocks too (Pipeline).
        std::vector<Staging<scalar_t>> st(rows);
        std::vector<Group<acc_t>> xs;
        std::vector<Scan<acc_t>> scans;
        xs.reserve(rows), scans.reserve(rows);
        for (int64_t r = 0; r < rows; ++r) xs.push_back(group(r, st[r]));
        const Fwd<acc_t> f(xs[0], window, relevant, rho_live, scale_);  // the same for every row
        for (int64_t r = 0; r < rows; ++r) scans.push_back(scan(r, xs[r], f, st[r]));
        Pipeline<acc_t>(xs, f, scans).run();
        for (int64_t r = 0; r < rows; ++r) finish(r, scans[r], st[r]);
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
  const int64_t rows = B * Hkv;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "screened_attention_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto scale_ = static_cast<acc_t>(scale);
        // (b, KV head) row r: its inputs and (staged) gradients
        struct Row {
          Group<acc_t> x;
          const acc_t *o, *dout, *lse;
          const int32_t* span;
          acc_t *dq, *dk, *dv;
        };
        auto row = [&](int64_t r, Staging<scalar_t>& st) {
          const bool* valid =
              mask.defined() ? mask.const_data_ptr<bool>() + (r / Hkv) * S : nullptr;
          return Row{{st.in(0, q.const_data_ptr<scalar_t>() + r * G * n * D, G * n * D),
                      st.in(1, k.const_data_ptr<scalar_t>() + r * X * D, X * D),
                      st.in(2, v.const_data_ptr<scalar_t>() + r * X * Dv, X * Dv), valid, G, n, P,
                      R0, S, D, Dv},
                     st.in(3, o.const_data_ptr<scalar_t>() + r * G * n * Dv, G * n * Dv),
                     st.in(4, go.const_data_ptr<scalar_t>() + r * G * n * Dv, G * n * Dv),
                     lse.const_data_ptr<acc_t>() + r * G * n,
                     span.const_data_ptr<int32_t>() + r * X * 2,
                     st.out(5, dq.mutable_data_ptr<scalar_t>() + r * G * n * D, G * n * D),
                     st.out(6, dk.mutable_data_ptr<scalar_t>() + r * X * D, X * D),
                     st.out(7, dv.mutable_data_ptr<scalar_t>() + r * X * Dv, X * Dv)};
        };
        auto flush = [&](int64_t r, Staging<scalar_t>& st) {
          st.flush(5, dq.mutable_data_ptr<scalar_t>() + r * G * n * D, G * n * D);
          st.flush(6, dk.mutable_data_ptr<scalar_t>() + r * X * D, X * D);
          st.flush(7, dv.mutable_data_ptr<scalar_t>() + r * X * Dv, X * Dv);
        };
        // rows no segment writes directly: the initial slots and the P earlier positions
        auto zero_earlier = [&](const Row& a) {
          std::fill_n(a.dk, (R0 + P) * D, acc_t(0));
          std::fill_n(a.dv, (R0 + P) * Dv, acc_t(0));
        };
        auto segment = [&](const Row& a, const BwdGroup<acc_t>& pre, int64_t s,
                           BwdScratch<acc_t>& w) {
          backward_segment(a.x, pre, s, a.o, a.dout, a.lse, a.span, a.dq, a.dk, a.dv, window,
                           scale_, w);
        };
        if (rows == 0) return;
        const int64_t nseg = (n + kSegmentQ - 1) / kSegmentQ;
        if (rows >= at::get_num_threads() || at::in_parallel_region() || nseg <= 1) {
          // enough (b, KV head) rows for the threads: each does its rows segment after segment,
          // adding a segment's partial rows as soon as it is done (the same order as below)
          at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
            const SequentialBlas sequential;
            Staging<scalar_t> st;
            BwdScratch<acc_t> w;
            for (int64_t r = begin; r < end; ++r) {
              const Row a = row(r, st);
              const BwdGroup<acc_t> pre(a.x, a.dout, a.span);
              zero_earlier(a);
              for (int64_t s = 0; s < pre.nseg; ++s) {
                segment(a, pre, s, w);
                const Segment sg = pre.segment(a.x, window, s);
                const int64_t* m0 = pre.members.data() + pre.offset[s];
                add_partial(sg, m0, R0, w.lk.data(), D, 0, D, a.dk);
                add_partial(sg, m0, R0, w.lv.data(), Dv, 0, Dv, a.dv);
              }
              flush(r, st);
            }
          });
          return;
        }
        // Fewer rows than threads: every (row, segment) is a task; the partial rows are kept,
        // then added segment after segment, in parallel over columns.
        std::vector<Staging<scalar_t>> st(rows);
        std::vector<Row> as;
        std::vector<BwdGroup<acc_t>> pres;
        as.reserve(rows), pres.reserve(rows);
        for (int64_t r = 0; r < rows; ++r) {
          as.push_back(row(r, st[r]));
          pres.emplace_back(as[r].x, as[r].dout, as[r].span);
          zero_earlier(as[r]);
        }
        std::vector<int64_t> part_at(rows * nseg + 1, 0);  // first partial row of (r, s)
        for (int64_t u = 0; u < rows * nseg; ++u)
          part_at[u + 1] =
              part_at[u] + pres[u / nseg].segment(as[u / nseg].x, window, u % nseg).partial_rows();
        Scratch<acc_t> part_k, part_v;
        part_k.resize(part_at.back() * D), part_v.resize(part_at.back() * Dv);
        std::vector<BwdScratch<acc_t>> ws(at::get_num_threads());
        run_tasks(rows * nseg, [&](int64_t u) {
          const int64_t r = u / nseg, s = u % nseg;
          BwdScratch<acc_t>& w = ws[at::get_thread_num()];
          segment(as[r], pres[r], s, w);
          const int64_t np = part_at[u + 1] - part_at[u];
          std::copy_n(w.lk.data(), np * D, part_k.data() + part_at[u] * D);
          std::copy_n(w.lv.data(), np * Dv, part_v.data() + part_at[u] * Dv);
        });
        constexpr int64_t kCols = 16;  // columns per reduction task
        const int64_t ck = (D + kCols - 1) / kCols, cv = (Dv + kCols - 1) / kCols;
        run_tasks(rows * (ck + cv), [&](int64_t u) {
          const int64_t r = u / (ck + cv), c = u % (ck + cv);
          const bool key = c < ck;
          const int64_t width = key ? D : Dv, c0 = (key ? c : c - ck) * kCols;
          const acc_t* part = key ? part_k.data() : part_v.data();
          for (int64_t s = 0; s < nseg; ++s) {
            const Segment sg = pres[r].segment(as[r].x, window, s);
            add_partial(sg, pres[r].members.data() + pres[r].offset[s], R0,
                        part + part_at[r * nseg + s] * width, width, c0,
                        std::min(width, c0 + kCols), key ? as[r].dk : as[r].dv);
          }
        });
        for (int64_t r = 0; r < rows; ++r) flush(r, st[r]);
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
