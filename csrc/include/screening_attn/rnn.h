// Element math of the RelRNN / RelLSTM step (docs/rnn.md), shared by the CPU kernels
// (csrc/cpu/rnn.cpp) and the CUDA kernels (csrc/cuda/rnn.cu), so the CPU tests exercise it.
// acc_t is float or double (half inputs compute in float).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <type_traits>

#include "screening_attn/screening.h"

namespace screening_attn {

// Order of docs/rnn.md's list; parse_nonlinearity (rnn_checks.h) maps the names the ops take.
enum Nonlinearity : int { kTanh = 0, kRelu = 1, kSigmoid = 2, kIdentity = 3, kModRelu = 4 };

// Calls f(std::integral_constant<int, NL>) for the runtime code nl (host code: the kernels are
// compiled per nonlinearity).
template <typename F>
void dispatch_nonlinearity(int nl, F&& f) {
  switch (nl) {
    case kTanh: return f(std::integral_constant<int, kTanh>{});
    case kRelu: return f(std::integral_constant<int, kRelu>{});
    case kSigmoid: return f(std::integral_constant<int, kSigmoid>{});
    case kIdentity: return f(std::integral_constant<int, kIdentity>{});
    default: return f(std::integral_constant<int, kModRelu>{});
  }
}

// tanh. float on the host: Eigen's rational approximation (error < 7 ulp, < 4e-7 absolute),
// branch-free so that the score loop, which calls it (ν+ρ)·Hd times per row and step,
// vectorizes; glibc's tanhf does not. On the GPU the hardware-backed tanhf.
C10_HOST_DEVICE inline float tanh_(float x) {
#ifdef __CUDA_ARCH__
  return ::tanhf(x);
#else
  // Beyond kClamp, tanh is within 4e-7 of ±1.
  constexpr float kClamp = 7.90531110763549805f;
  const float xc = x > kClamp ? kClamp : (x < -kClamp ? -kClamp : x);  // NaN stays NaN
  const float x2 = xc * xc;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const float r = xc * p / q;
  return (x < 0.0004f && x > -0.0004f) ? x : r;  // tanh x = x in float there (and tanh 0 = 0)
#endif
}

C10_HOST_DEVICE inline double tanh_(double x) {
#ifdef __CUDA_ARCH__
  return ::tanh(x);
#else
  return std::tanh(x);
#endif
}

// 1 / (1 + exp(-x)), with the exponential of -|x| only (no overflow), branch-free.
C10_HOST_DEVICE inline float sigmoid_(float x) {
  const float e = exp_nonpositive(x > 0.0f ? -x : x);
  const float inv = 1.0f / (1.0f + e);
  return x > 0.0f ? inv : e * inv;
}

C10_HOST_DEVICE inline double sigmoid_(double x) {
#ifdef __CUDA_ARCH__
  return 1.0 / (1.0 + ::exp(-x));
#else
  return 1.0 / (1.0 + std::exp(-x));
#endif
}

// Candidates of one batch row at step t >= 1.

// The window t-nw .. t-1 (nw = min(t, window)), then the filled slots (slot < 0: empty). Writes
// each candidate's time step to pos and its column in the step's weight record to col (window:
// 0 .. nw-1; slot s: window + s). Returns their number, or -1 if a slot holds a step that is
// not older than the window (a bad state passed to the op by hand).
template <typename index_t>
C10_HOST_DEVICE inline int64_t step_candidates(const index_t* slots, int64_t rho, int64_t t,
                                               int64_t nw, int64_t window, int64_t* pos,
                                               int64_t* col) {
  int64_t nc = 0;
  for (int64_t k = 0; k < nw; ++k, ++nc) {
    pos[nc] = t - nw + k;
    col[nc] = k;
  }
  for (int64_t s = 0; s < rho; ++s) {
    const int64_t j = static_cast<int64_t>(slots[s]);
    if (j < 0) continue;
    if (j >= t - nw) return -1;
    pos[nc] = j;
    col[nc] = window + s;
    ++nc;
  }
  return nc;
}

// Additive attention score: e = Σ_d v_d tanh(q_d + k_d), with q = Va s and k = Ua h

// One term: z = tanh(q + k), returns v z.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t score_term(acc_t q, acc_t k, acc_t v) {
  return v * tanh_(q + k);
}

// Backward of one term given de (the score's gradient): returns d(q + k) = de v (1 - z²) and
// adds de z to *dv.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t score_term_backward(acc_t q, acc_t k, acc_t v, acc_t de, acc_t* dv) {
  const acc_t z = tanh_(q + k);
  *dv += de * z;
  return de * v * (acc_t(1) - z * z);
}

// The same terms from exponentials (CPU kernels; docs/kernels/cpu-cuda.md). With g = e^{-2q} per
// query and e = e^{2k} per key, both computed once, tanh(q + k) = 1 - 2R and
// 1 - tanh²(q + k) = 4R(1 - R), where R = g / (g + e) = 1 / (1 + e^{2(q+k)}): a step's
// (ν+ρ)·Hd terms then cost one division each instead of a tanh. |z - tanh| < 2.5e-7 in float.
// Only where |q|, |k| <= kExpLimit, so that g, e and R stay normal floats (R >= e^{-80}).
constexpr float kExpLimit = 20.0f;

// Whether k takes the exponentials (false for NaN).
template <typename acc_t>
C10_HOST_DEVICE inline bool in_exp_range(acc_t k) {
  return k <= acc_t(kExpLimit) && k >= -acc_t(kExpLimit);
}

// e^{2k} for |k| <= kExpLimit (the argument is clamped there, NaN included, so that any k is
// safe to pass). The caller tests the range: folding it in as a NaN select kept GCC from
// vectorizing the loops.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t exp_twice(acc_t k) {
  constexpr acc_t lim = acc_t(2 * kExpLimit);
  const acc_t x = acc_t(2) * k;
  return exp_in_range(x >= -lim ? (x <= lim ? x : lim) : -lim);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t exp_ratio(acc_t g, acc_t e) {
  return g / (g + e);
}

// Backward of one term from R (see above); v4 = 4 v. Returns d(q + k) = de v (1 - z²) and adds
// de R to *dr: the caller adds Σ de - 2 Σ de R to dv (dv += de z, z = 1 - 2R).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t exp_term_backward(acc_t r, acc_t v4, acc_t de, acc_t* dr) {
  *dr += de * r;
  return de * v4 * (r - r * r);
}

// RelRNN activation h = φ(pre) and its backward (NL: a Nonlinearity)

// sign(z) as torch.sign: 0 at 0 (and for NaN).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sign_(acc_t z) {
  return acc_t(z > acc_t(0)) - acc_t(z < acc_t(0));
}

// relu that keeps NaN (as torch.relu).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t relu_(acc_t z) {
  return z < acc_t(0) ? acc_t(0) : z;
}

// b: modrelu's bias for this feature (ignored otherwise).
template <int NL, typename acc_t>
C10_HOST_DEVICE inline acc_t activate(acc_t z, acc_t b) {
  if constexpr (NL == kTanh) {
    return tanh_(z);
  } else if constexpr (NL == kRelu) {
    return relu_(z);
  } else if constexpr (NL == kSigmoid) {
    return sigmoid_(z);
  } else if constexpr (NL == kModRelu) {
    return sign_(z) * relu_(z < acc_t(0) ? b - z : z + b);  // sign(z) relu(|z| + b)
  } else {
    return z;
  }
}

// Gradient of pre from the gradient g of h = φ(pre), computed from h alone; for modrelu also
// writes d b to *gb. Where h != 0, modrelu is pre + sign(pre) b, so d pre = g and
// d b = g sign(h); where h = 0 (|pre| + b <= 0, or pre = 0) both are 0, as torch's rules give.
template <int NL, typename acc_t>
C10_HOST_DEVICE inline acc_t activate_backward(acc_t g, acc_t h, acc_t* gb) {
  if constexpr (NL == kTanh) {
    return g * (acc_t(1) - h * h);
  } else if constexpr (NL == kRelu) {
    return h <= acc_t(0) ? acc_t(0) : g;  // torch's threshold_backward on the output
  } else if constexpr (NL == kSigmoid) {
    return g * h * (acc_t(1) - h);
  } else if constexpr (NL == kModRelu) {
    *gb = g * sign_(h);
    return h != acc_t(0) ? g : acc_t(0);
  } else {
    return g;
  }
}

// RelLSTM cell

// Gate pre-activations a_f, a_i, a_o, a_g -> gates f, i, o = σ(a), g = tanh(a_g);
// c = f c_prev + i g; h = o tanh(c).
template <typename acc_t>
C10_HOST_DEVICE inline void lstm_cell(acc_t af, acc_t ai, acc_t ao, acc_t ag, acc_t c_prev,
                                      acc_t* f, acc_t* i, acc_t* o, acc_t* g, acc_t* c, acc_t* h) {
  *f = sigmoid_(af);
  *i = sigmoid_(ai);
  *o = sigmoid_(ao);
  *g = tanh_(ag);
  *c = *f * c_prev + *i * *g;
  *h = *o * tanh_(*c);
}

// Backward of one cell element. gh: dL/dh; *gc: in, dL/dc from the next step (already through
// its forget gate); out, dL/dc_prev. Writes the gradients of the four gate pre-activations.
template <typename acc_t>
C10_HOST_DEVICE inline void lstm_cell_backward(acc_t gh, acc_t f, acc_t i, acc_t o, acc_t g,
                                               acc_t c, acc_t c_prev, acc_t* gc, acc_t* gaf,
                                               acc_t* gai, acc_t* gao, acc_t* gag) {
  const acc_t tc = tanh_(c);
  const acc_t gct = *gc + gh * o * (acc_t(1) - tc * tc);
  *gaf = gct * c_prev * f * (acc_t(1) - f);
  *gai = gct * g * i * (acc_t(1) - i);
  *gao = gh * tc * o * (acc_t(1) - o);
  *gag = gct * i * (acc_t(1) - g * g);
  *gc = gct * f;
}

}  // namespace screening_attn
