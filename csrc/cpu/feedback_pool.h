// The AdaPool passes over one (n, c) plane on the CPU: forward (pool), unpool and gather, for
// the pool ops (feedback_pool.cpp) and the stage that ends in a pool (feedback_norm.cpp). CPU
// only; math from feedback.h. A plane is done row of windows by row of windows, each window
// scanned in row-major order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "vec.h"  // first: its -Wpsabi pragma also covers feedback.h

#include "screening_attn/feedback.h"

namespace screening_attn {

struct PoolGeometry {
  int64_t H, W, Ho, Wo;
  int k;
};

inline PoolGeometry pool_geometry(int64_t H, int64_t W, int64_t k) {
  return {H, W, H / k, W / k, static_cast<int>(k)};
}

template <typename T>
struct PoolArgs {
  const T* x;       // forward: the input (H x W planes); gather: the gradient
  const T* z;       // unpool: the pooled signal
  const T* hidden;  // pooled, or nullptr
  const uint8_t* amax_in;
  const uint8_t* amin_in;
  T* y;  // forward / gather: pooled output; unpool: H x W output
  uint8_t* amax;
  uint8_t* amin;
  PoolGeometry g;
};

enum class PoolOp { kForward, kUnpool, kGather };

// Scalar scans, any k: one row of windows (pooled row i of plane p), outputs [j0, j1).
template <typename T>
struct Extremes {
  T vmax, vmin;
  int am, an;
  explicit Extremes(T v) : vmax(v), vmin(v), am(0), an(0) {}
  void see(T v, int pos) {
    if (pool_beats_max<T>(v, vmax)) vmax = v, am = pos;
    if (pool_beats_min<T>(v, vmin)) vmin = v, an = pos;
  }
};

// Pointers of one row of windows: `x` is the first input line of the row (forward: the input,
// gather: the gradient, unpool: the output), the others point at the row's pooled outputs.
template <typename T>
struct PoolRow {
  const T* x;
  T* out;  // unpool: the first output line
  const T* z;
  const T* h;  // nullptr before any feedback
  const uint8_t* amax_in;
  const uint8_t* amin_in;
  T* y;
  uint8_t* amax;
  uint8_t* amin;
};

template <typename T>
void forward_row_scalar(const PoolRow<T>& r, int k, int64_t W, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    Extremes<T> e(r.x[j * k]);
    for (int q = 1; q < k * k; ++q) e.see(r.x[pool_offset(q, k, W) + j * k], q);
    r.y[j] = ada_pool_value<T>(e.vmax, e.vmin, r.h ? r.h[j] : T(0), r.h != nullptr);
    r.amax[j] = static_cast<uint8_t>(e.am);
    r.amin[j] = static_cast<uint8_t>(e.an);
  }
}

template <typename T>
void unpool_row_scalar(const PoolRow<T>& r, int k, int64_t W, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    for (int q = 0; q < k * k; ++q) {
      r.out[pool_offset(q, k, W) + j * k] = ada_unpool_value<T>(
          r.z[j], r.h ? r.h[j] : T(0), r.h != nullptr, q, r.amax_in[j], r.amin_in[j]);
    }
  }
}

template <typename T>
void gather_row_scalar(const PoolRow<T>& r, int k, int64_t W, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    const T* w = r.x + j * k;
    r.y[j] = ada_pool_gather_value<T>(w[pool_offset(r.amax_in[j], k, W)],
                                      w[pool_offset(r.amin_in[j], k, W)], r.h ? r.h[j] : T(0),
                                      r.h != nullptr);
  }
}

// k = 2, L windows at a time: the formulas of feedback.h, lane-wise, as compares and selects.
// Branches would be mispredicted (the argmax of data is random) and rows are short (14 windows
// for 28 x 28), too short for the auto-vectorizer, which left them to a branchy scalar loop 20x
// slower. A row is covered by chunks of L; the last chunk overlaps the previous one (it rewrites
// equal values) so no scalar tail remains.
template <typename T, int L>
struct PoolLanes : Lanes<T, L> {
  using Base = Lanes<T, L>;
  using Base::load;
  using Base::store;
  using Base::zeros;
  using typename Base::I;
  using typename Base::V;
  static SCREENING_ATTN_INLINE V number(I mask) { return as_number<V>(mask); }
  // Even and odd elements of the 2 L values at p: the left and right columns of L windows.
  static SCREENING_ATTN_INLINE void columns(const T* p, V& left, V& right) {
    const V lo = load(p), hi = load(p + L);
    I even, odd;
    for (int l = 0; l < L; ++l) even[l] = 2 * l, odd[l] = 2 * l + 1;
    left = __builtin_shuffle(lo, hi, even);
    right = __builtin_shuffle(lo, hi, odd);
  }
  // The inverse: interleave left and right into the 2 L values at p.
  static SCREENING_ATTN_INLINE void store_columns(T* p, V left, V right) {
    I first, second;
    for (int l = 0; l < L; ++l) {
      first[l] = (l % 2) * L + l / 2;
      second[l] = (l % 2) * L + (L + l) / 2;
    }
    store(p, __builtin_shuffle(left, right, first));
    store(p + L, __builtin_shuffle(left, right, second));
  }
  static SCREENING_ATTN_INLINE V gate(V z, V h, bool gated, bool positive) {
    if (!gated) return positive ? z : zeros();
    return z * number(positive ? h > T(0) : h < T(0));  // z [h > 0] or z [h < 0]
  }

  static SCREENING_ATTN_INLINE void forward(const PoolRow<T>& r, int64_t W, int64_t j) {
    V v[4];
    columns(r.x + 2 * j, v[0], v[1]);
    columns(r.x + W + 2 * j, v[2], v[3]);
    V vmax = v[0], vmin = v[0];
    I am = I{}, an = I{};
    for (int q = 1; q < 4; ++q) {  // pool_beats_max / pool_beats_min
      const I nan = v[q] != v[q];
      const I up = (v[q] > vmax) | (nan & (vmax == vmax));
      const I down = (v[q] < vmin) | (nan & (vmin == vmin));
      vmax = up ? v[q] : vmax;
      am = up ? I{} + q : am;
      vmin = down ? v[q] : vmin;
      an = down ? I{} + q : an;
    }
    V y = vmax;
    if (r.h != nullptr) {  // ada_pool_value
      const V h = load(r.h + j);
      y = vmax * number(h > T(0)) + vmin * number(h < T(0));
    }
    store(r.y + j, y);
    Base::store_bytes(r.amax + j, am);
    Base::store_bytes(r.amin + j, an);
  }

  static SCREENING_ATTN_INLINE void unpool(const PoolRow<T>& r, int64_t W, int64_t j) {
    const bool gated = r.h != nullptr;
    const V z = load(r.z + j), h = gated ? load(r.h + j) : zeros();
    const I am = Base::load_bytes(r.amax_in + j), an = Base::load_bytes(r.amin_in + j);
    const V to_max = gate(z, h, gated, true), to_min = gate(z, h, gated, false);
    V v[4];
    for (int q = 0; q < 4; ++q) {  // ada_unpool_value
      v[q] = (am == q ? to_max : zeros());
      if (gated) v[q] += (an == q ? to_min : zeros());
    }
    store_columns(r.out + 2 * j, v[0], v[1]);
    store_columns(r.out + W + 2 * j, v[2], v[3]);
  }

  static SCREENING_ATTN_INLINE void gather(const PoolRow<T>& r, int64_t W, int64_t j) {
    const bool gated = r.h != nullptr;
    V g[4];
    columns(r.x + 2 * j, g[0], g[1]);
    columns(r.x + W + 2 * j, g[2], g[3]);
    const I am = Base::load_bytes(r.amax_in + j), an = Base::load_bytes(r.amin_in + j);
    V at_max = g[0], at_min = g[0];
    for (int q = 1; q < 4; ++q) {
      at_max = am == q ? g[q] : at_max;
      at_min = an == q ? g[q] : at_min;
    }
    V gz = at_max;
    if (gated) {  // ada_pool_gather_value
      const V h = load(r.h + j);
      gz = at_max * number(h > T(0)) + at_min * number(h < T(0));
    }
    store(r.y + j, gz);
  }

  template <PoolOp Op>
  static SCREENING_ATTN_INLINE void row(const PoolRow<T>& r, int64_t W, int64_t Wo) {
    for (int64_t j0 = 0; j0 < Wo; j0 += L) {
      const int64_t j = std::min(j0, Wo - L);  // Wo >= L
      if constexpr (Op == PoolOp::kForward) forward(r, W, j);
      if constexpr (Op == PoolOp::kUnpool) unpool(r, W, j);
      if constexpr (Op == PoolOp::kGather) gather(r, W, j);
    }
  }
};

template <typename T, PoolOp Op>
SCREENING_ATTN_INLINE void pool_row(const PoolRow<T>& r, int k, int64_t W, int64_t Wo) {
  constexpr int kWide = 32 / sizeof(T), kNarrow = 16 / sizeof(T);  // 8 and 4 floats
  if (k == 2 && Wo >= kWide) return PoolLanes<T, kWide>::template row<Op>(r, W, Wo);
  if (k == 2 && Wo >= kNarrow) return PoolLanes<T, kNarrow>::template row<Op>(r, W, Wo);
  if constexpr (Op == PoolOp::kForward) forward_row_scalar(r, k, W, 0, Wo);
  if constexpr (Op == PoolOp::kUnpool) unpool_row_scalar(r, k, W, 0, Wo);
  if constexpr (Op == PoolOp::kGather) gather_row_scalar(r, k, W, 0, Wo);
}

// Plane p. `plane` is H x W: forward and gather read it (a.x's, or a scratch plane), unpool
// writes it (a.y's, or a scratch plane).
template <typename T, PoolOp Op>
SCREENING_ATTN_INLINE void pool_plane(
    const PoolArgs<T>& a, int64_t p,
    std::conditional_t<Op == PoolOp::kUnpool, T*, const T*> plane) {
  const int k = a.g.k;
  const int64_t H = a.g.H, W = a.g.W, Ho = a.g.Ho, Wo = a.g.Wo;
  for (int64_t i = 0; i < Ho; ++i) {
    const int64_t o0 = (p * Ho + i) * Wo;
    PoolRow<T> r{};
    r.h = a.hidden != nullptr ? a.hidden + o0 : nullptr;
    if constexpr (Op == PoolOp::kUnpool) {
      r.out = plane + i * k * W;
      r.z = a.z + o0;
      r.amax_in = a.amax_in + o0;
      r.amin_in = a.amin_in + o0;
      for (int q = 0; q < k; ++q) std::fill(r.out + q * W + Wo * k, r.out + (q + 1) * W, T(0));
    } else {
      r.x = plane + i * k * W;
      r.y = a.y + o0;
      r.amax = a.amax != nullptr ? a.amax + o0 : nullptr;
      r.amin = a.amin != nullptr ? a.amin + o0 : nullptr;
      r.amax_in = a.amax_in != nullptr ? a.amax_in + o0 : nullptr;
      r.amin_in = a.amin_in != nullptr ? a.amin_in + o0 : nullptr;
    }
    pool_row<T, Op>(r, k, W, Wo);
  }
  if constexpr (Op == PoolOp::kUnpool) {  // rows past the last full window
    std::fill(plane + Ho * k * W, plane + H * W, T(0));
  }
}

}  // namespace screening_attn
