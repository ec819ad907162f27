// CPU kernels of the CNN-F ops. The gates are elementwise, at::parallel_for over elements; the
// instance norm and AdaPool ops work per (n, c) plane, at::parallel_for over planes with each
// plane in one task, so every result has the same bits for any thread count. Math from
// feedback.h; the per-plane loops are `omp simd` and compiled for AVX-512 and AVX2 too.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Vector arguments of the always-inline helpers (here and in feedback.h) never cross a call
// boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "screening_attn/checks.h"
#include "screening_attn/feedback.h"

namespace screening_attn {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task: enough to amortise a thread wake-up
// Hidden states at least this large are streamed past the cache (see Lanes::stream); smaller
// ones may still be in cache when the next forward reads them (a batch of 8 at 28x28: a
// non-temporal ada_unpool_gate was 15-60% slower there).
constexpr int64_t kStreamBytes = 2 << 20;

bool streams_output(const at::Tensor& t) { return t.nbytes() >= kStreamBytes; }

// Planes per task: at least kGrain elements.
int64_t plane_grain(int64_t plane_size) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, plane_size));
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// flatten: everything these entry points call, lambdas included, is compiled into each clone
// (a lambda left out of line would run the vector code at the baseline ISA).
#define SCREENING_ATTN_VECTOR_CLONES \
  __attribute__((flatten, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SCREENING_ATTN_VECTOR_CLONES __attribute__((flatten))
#endif
#define SCREENING_ATTN_INLINE __attribute__((always_inline)) inline

// GCC does not vectorize loads and stores of bool; the masks are read and written as bytes.
uint8_t* as_bytes(bool* p) { return reinterpret_cast<uint8_t*>(p); }
const uint8_t* as_bytes(const bool* p) { return reinterpret_cast<const uint8_t*>(p); }

// L lanes of T as a GCC vector, for the per-plane loops: the formulas of feedback.h run
// lane-wise on these. Left to `omp simd`, GCC vectorized those loops at the width of the uint8
// masks (xmm registers, bytes packed lane by lane) and reduced into one accumulator: the norm
// ops ran compute-bound at about 1.4 cycles per element, several times slower than these.
template <typename T, int L>
struct Lanes {
  static constexpr int kLanes = L;
  using Scalar = T;
  // Dependent element types: GCC ignores vector_size on a non-dependent typedef in a template.
  using IT = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  using BT = std::conditional_t<sizeof(T) != 0, uint8_t, void>;
  typedef T V __attribute__((vector_size(L * sizeof(T))));
  typedef IT I __attribute__((vector_size(L * sizeof(T))));  // compare results: -1 or 0
  typedef BT B __attribute__((vector_size(L)));

  static SCREENING_ATTN_INLINE V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static SCREENING_ATTN_INLINE void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static SCREENING_ATTN_INLINE V zeros() { return V{}; }
  static SCREENING_ATTN_INLINE V splat(T v) { return zeros() + v; }
  // Bytes (bool masks, pool positions) widened to lanes, and back (truncated).
  static SCREENING_ATTN_INLINE I load_bytes(const uint8_t* p) {
    I v;
    for (int l = 0; l < L; ++l) v[l] = p[l];
    return v;
  }
  static SCREENING_ATTN_INLINE void store_bytes(uint8_t* p, I v) {
    B b;
    for (int l = 0; l < L; ++l) b[l] = static_cast<uint8_t>(v[l]);
    std::memcpy(p, &b, L);
  }
  // A bool mask: open lanes (compare results, -1) stored as 1.
  static SCREENING_ATTN_INLINE void store_mask(uint8_t* p, I open) { store_bytes(p, open & 1); }
  static SCREENING_ATTN_INLINE I lane() {
    I v;
    for (int l = 0; l < L; ++l) v[l] = l;
    return v;
  }
  static SCREENING_ATTN_INLINE T sum(V v) {
    T s = 0;
    for (int l = 0; l < L; ++l) s += v[l];
    return s;
  }
  // Whether a plane of n elements at p is whole 64-byte lines, so that `stream` may write it.
  static SCREENING_ATTN_INLINE bool streams(const T* p, int64_t n) {
#if defined(__x86_64__)
    return sizeof(V) == 64 && reinterpret_cast<uintptr_t>(p) % 64 == 0 &&
           (n * static_cast<int64_t>(sizeof(T))) % 64 == 0;
#else
    return false;
#endif
  }
  // A non-temporal store of one whole line (SSE movntps / movntpd, in every clone): for the
  // gates' new hidden states, read only in the next cycle, long evicted by then. A normal
  // store first reads the line from memory, which costs as much as the write on this path.
  static SCREENING_ATTN_INLINE void stream(T* p, V v) {
#if defined(__x86_64__)
    for (size_t k = 0; k < sizeof(V) / 16; ++k) {
      if constexpr (sizeof(T) == 4) {
        __m128 part;
        std::memcpy(&part, reinterpret_cast<const char*>(&v) + 16 * k, 16);
        _mm_stream_ps(reinterpret_cast<float*>(p) + 4 * k, part);
      } else {
        __m128d part;
        std::memcpy(&part, reinterpret_cast<const char*>(&v) + 16 * k, 16);
        _mm_stream_pd(reinterpret_cast<double*>(p) + 2 * k, part);
      }
    }
#else
    store(p, v);
#endif
  }
};

// After a task's streamed stores: they are weakly ordered, so fence before the task ends.
SCREENING_ATTN_INLINE void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

template <typename T>
using Wide = Lanes<T, 64 / sizeof(T)>;  // 16 floats, 8 doubles: one AVX-512 register

// Planes of at least one vector run Wide<T> lanes, shorter ones one lane at a time.
template <typename T>
SCREENING_ATTN_INLINE bool wide_plane(int64_t n) {
  return n >= Wide<T>::kLanes;
}

// f(i) on the chunks [i, i + L) of [0, n), n >= L: the last chunk is [n - L, n), overlapping the
// one before; an elementwise f just rewrites equal values there, and no scalar tail remains.
template <typename W, class F>
SCREENING_ATTN_INLINE void for_chunks(int64_t n, F f) {
  constexpr int L = W::kLanes;
  int64_t i = 0;
  for (; i + L <= n; i += L) f(i);
  if (i < n) f(n - L);
}

// K sums over [0, n), n >= L, of the vectors f(i) returns per chunk (an std::array of K). The
// overlapping last chunk counts only its new lanes. Four accumulators per sum, so that the
// adds' latency does not bound the loop.
template <typename W, int K, class F>
SCREENING_ATTN_INLINE std::array<typename W::Scalar, K> plane_sums(int64_t n, F f) {
  using V = typename W::V;
  constexpr int L = W::kLanes;
  std::array<V, K> acc[4] = {};
  auto add = [&](std::array<V, K>& to, const std::array<V, K>& v) {
    for (int k = 0; k < K; ++k) to[k] += v[k];
  };
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    for (int u = 0; u < 4; ++u) add(acc[u], f(i + u * L));
  }
  for (; i + L <= n; i += L) add(acc[0], f(i));
  if (i < n) {
    const typename W::I fresh = W::lane() >= static_cast<typename W::IT>(i - (n - L));
    std::array<V, K> v = f(n - L);
    for (int k = 0; k < K; ++k) v[k] = fresh ? v[k] : W::zeros();
    add(acc[1], v);
  }
  std::array<typename W::Scalar, K> out;
  for (int k = 0; k < K; ++k) out[k] = W::sum((acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k]));
  return out;
}

template <typename W, class F>
SCREENING_ATTN_INLINE typename W::Scalar plane_sum(int64_t n, F f) {
  return plane_sums<W, 1>(n, [&](int64_t i) { return std::array<typename W::V, 1>{f(i)}; })[0];
}

// The gates' elementwise passes over a task's [begin, end): vector lanes as the per-plane
// loops below (a range shorter than one vector runs one lane at a time).
// has_hidden is a template argument: as a runtime bool, `has_hidden ? vector : vector` in
// ada_relu_value compiled lane by lane, with branches, 14x slower.
template <typename W, bool kHidden, typename T = typename W::Scalar>
SCREENING_ATTN_INLINE void ada_relu_lanes(const T* x, const T* h, T* y, uint8_t* mask, T eta,
                                          int64_t n) {
  const typename W::V e = W::splat(eta);
  for_chunks<W>(n, [&](int64_t i) {
    typename W::I open;
    W::store(y + i, ada_relu_value(W::load(x + i), W::load(h + i), e, kHidden, &open));
    W::store_mask(mask + i, open);
  });
}

template <typename W, typename T = typename W::Scalar>
SCREENING_ATTN_INLINE void ada_relu_lanes(const T* x, const T* h, T* y, uint8_t* mask, T eta,
                                          bool has_hidden, int64_t n) {
  if (has_hidden) {
    ada_relu_lanes<W, true>(x, h, y, mask, eta, n);
  } else {
    ada_relu_lanes<W, false>(x, h, y, mask, eta, n);
  }
}

template <typename W, typename T = typename W::Scalar>
SCREENING_ATTN_INLINE void ada_relu_grad_lanes(const T* g, const uint8_t* mask, T* gx, T* gh,
                                               T eta, int64_t n) {
  const typename W::V e = W::splat(eta);
  for_chunks<W>(n, [&](int64_t i) {
    typename W::V a, b;
    ada_relu_grad(W::load(g + i), W::load_bytes(mask + i) != 0, e, &a, &b);
    W::store(gx + i, a);
    W::store(gh + i, b);
  });
}

template <typename W, typename T = typename W::Scalar>
SCREENING_ATTN_INLINE void gate_lanes(const T* z, const uint8_t* mask, T* out, int64_t n) {
  for_chunks<W>(n, [&](int64_t i) {
    W::store(out + i, gate<typename W::V>(W::load(z + i), W::load_bytes(mask + i) != 0));
  });
}

#define SCREENING_ATTN_GATE_RANGES(T)                                                          \
  SCREENING_ATTN_VECTOR_CLONES void ada_relu_range(const T* x, const T* h, T* y, uint8_t* m,    \
                                                   T eta, bool has_hidden, int64_t begin,       \
                                                   int64_t end) {                               \
    if (wide_plane<T>(end - begin)) {                                                          \
      ada_relu_lanes<Wide<T>>(x + begin, h + begin, y + begin, m + begin, eta, has_hidden,     \
                              end - begin);                                                    \
    } else {                                                                                   \
      ada_relu_lanes<Lanes<T, 1>>(x + begin, h + begin, y + begin, m + begin, eta, has_hidden, \
                                  end - begin);                                                \
    }                                                                                          \
  }                                                                                            \
  SCREENING_ATTN_VECTOR_CLONES void ada_relu_grad_range(const T* g, const uint8_t* m, T* gx,    \
                                                        T* gh, T eta, int64_t begin,            \
                                                        int64_t end) {                          \
    if (wide_plane<T>(end - begin)) {                                                          \
      ada_relu_grad_lanes<Wide<T>>(g + begin, m + begin, gx + begin, gh + begin, eta,          \
                                   end - begin);                                               \
    } else {                                                                                   \
      ada_relu_grad_lanes<Lanes<T, 1>>(g + begin, m + begin, gx + begin, gh + begin, eta,      \
                                       end - begin);                                           \
    }                                                                                          \
  }                                                                                            \
  SCREENING_ATTN_VECTOR_CLONES void gate_range(const T* z, const uint8_t* m, T* out,            \
                                               int64_t begin, int64_t end) {                    \
    if (wide_plane<T>(end - begin)) {                                                          \
      gate_lanes<Wide<T>>(z + begin, m + begin, out + begin, end - begin);                     \
    } else {                                                                                   \
      gate_lanes<Lanes<T, 1>>(z + begin, m + begin, out + begin, end - begin);                 \
    }                                                                                          \
  }

SCREENING_ATTN_GATE_RANGES(float)
SCREENING_ATTN_GATE_RANGES(double)
#undef SCREENING_ATTN_GATE_RANGES

std::tuple<at::Tensor, at::Tensor> ada_relu_cpu(const at::Tensor& x_,
                                                const std::optional<at::Tensor>& hidden_,
                                                double eta) {
  check_ada_relu(x_, hidden_);
  const bool has_hidden = hidden_.has_value();
  const at::Tensor x = x_.contiguous();
  const at::Tensor hidden = has_hidden ? hidden_->contiguous() : x;
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = at::empty_like(x, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ada_relu_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* hp = hidden.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    uint8_t* mp = as_bytes(mask.mutable_data_ptr<bool>());
    const auto e = static_cast<scalar_t>(eta);
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      ada_relu_range(xp, hp, yp, mp, e, has_hidden, begin, end);
    });
  });
  return {y, mask};
}

std::tuple<at::Tensor, at::Tensor> ada_relu_backward_cpu(const at::Tensor& grad_,
                                                         const at::Tensor& mask_, double eta) {
  check_ada_relu_backward(grad_, mask_);
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor gx = at::empty_like(grad);
  at::Tensor gh = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "ada_relu_backward_cpu", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const uint8_t* mp = as_bytes(mask.const_data_ptr<bool>());
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    scalar_t* ghp = gh.mutable_data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eta);
    at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
      ada_relu_grad_range(gp, mp, gxp, ghp, e, begin, end);
    });
  });
  return {gx, gh};
}

at::Tensor ada_relu_feedback_cpu(const at::Tensor& z_, const at::Tensor& mask_) {
  check_ada_relu_backward(z_, mask_);
  const at::Tensor z = z_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor out = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ada_relu_feedback_cpu", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const uint8_t* mp = as_bytes(mask.const_data_ptr<bool>());
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, z.numel(), kGrain, [&](int64_t begin, int64_t end) {
      gate_range(zp, mp, op, begin, end);
    });
  });
  return out;
}

// --- Instance norm family -----------------------------------------------------------------------
// One task = whole planes. Per plane: a reduction pass (two when centered: the mean, then the
// squared deviations, as torch.var), then one elementwise pass; the plane (3 KB for 28 x 28
// float32) is in L1 for the second read.

enum class Gate {
  kNone,      // ins_norm: y = x r
  kReLU,      // ins_bias_ada_relu without hidden: y = relu(x r + b)
  kAda,       // ins_bias_ada_relu with hidden
  kFeedback,  // ins_norm_gate: zn = x r, out = zn [mask]
};

template <typename T>
struct NormFwd {
  const T* x;
  const T* bias;     // (C,) or nullptr
  const T* hidden;   // like x, kAda only
  const uint8_t* gate;  // like x, kFeedback only (bool data: 0 or 1)
  T* y;              // y, or zn for kFeedback
  T* out;            // kFeedback only
  uint8_t* mask;        // kReLU, kAda (bool data)
  T* rstd;           // (N C,)
  int64_t channels, count;
  T eta, eps;
  bool centered;
  bool stream_y;     // kFeedback: stream zn (the gate's new hidden) where its planes allow
};

template <typename W, typename T = typename W::Scalar>
SCREENING_ATTN_INLINE T plane_rstd(const T* x, int64_t n, bool centered, T eps) {
  using V = typename W::V;
  T s;
  if (!centered) {
    s = plane_sum<W>(n, [&](int64_t i) {
      const V v = W::load(x + i);
      return v * v;
    });
  } else {
    const T mean = plane_sum<W>(n, [&](int64_t i) { return W::load(x + i); }) / static_cast<T>(n);
    s = plane_sum<W>(n, [&](int64_t i) {
      const V d = W::load(x + i) - mean;
      return d * d;
    });
  }
  return ins_rstd<T>(s, n, centered, eps);
}

// Plane p; y goes to `y_plane` (the plane of a.y, or a scratch plane when a pool follows).
template <typename T, Gate G, typename W>
SCREENING_ATTN_INLINE void norm_forward_plane(const NormFwd<T>& a, int64_t p, T* y_plane) {
  using V = typename W::V;
  using I = typename W::I;
  const int64_t n = a.count;
  const int64_t off = p * n;
  const T* __restrict__ x = a.x + off;
  T* __restrict__ y = y_plane;
  const T r = plane_rstd<W>(x, n, a.centered, a.eps);
  a.rstd[p] = r;
  if constexpr (G == Gate::kNone) {
    for_chunks<W>(n, [&](int64_t i) { W::store(y + i, W::load(x + i) * r); });
  } else if constexpr (G == Gate::kFeedback) {
    const uint8_t* __restrict__ g = a.gate + off;
    T* __restrict__ out = a.out + off;
    const bool stream = a.stream_y && W::streams(y, n);
    for_chunks<W>(n, [&](int64_t i) {
      const V u = W::load(x + i) * r;
      if (stream) {
        W::stream(y + i, u);
      } else {
        W::store(y + i, u);
      }
      W::store(out + i, gate<V>(u, W::load_bytes(g + i) != 0));
    });
  } else {
    const T b = a.bias != nullptr ? a.bias[p % a.channels] : T(0);
    const T* __restrict__ h = G == Gate::kAda ? a.hidden + off : x;
    uint8_t* __restrict__ m = a.mask + off;
    const V eta = W::splat(a.eta);
    for_chunks<W>(n, [&](int64_t i) {
      I open;
      W::store(y + i, ada_relu_value<V>(W::load(x + i) * r + b, W::load(h + i), eta,
                                        G == Gate::kAda, &open));
      W::store_mask(m + i, open);
    });
  }
}

template <typename T, Gate G>
SCREENING_ATTN_INLINE void norm_forward_plane(const NormFwd<T>& a, int64_t p, T* y_plane) {
  if (wide_plane<T>(a.count)) {
    norm_forward_plane<T, G, Wide<T>>(a, p, y_plane);
  } else {
    norm_forward_plane<T, G, Lanes<T, 1>>(a, p, y_plane);
  }
}

template <typename T>
SCREENING_ATTN_INLINE void norm_forward_range_impl(const NormFwd<T>& a, Gate g, int64_t p0,
                                                   int64_t p1) {
  switch (g) {
    case Gate::kNone:
      for (int64_t p = p0; p < p1; ++p) norm_forward_plane<T, Gate::kNone>(a, p, a.y + p * a.count);
      break;
    case Gate::kReLU:
      for (int64_t p = p0; p < p1; ++p) norm_forward_plane<T, Gate::kReLU>(a, p, a.y + p * a.count);
      break;
    case Gate::kAda:
      for (int64_t p = p0; p < p1; ++p) norm_forward_plane<T, Gate::kAda>(a, p, a.y + p * a.count);
      break;
    case Gate::kFeedback:
      for (int64_t p = p0; p < p1; ++p) norm_forward_plane<T, Gate::kFeedback>(a, p, a.y + p * a.count);
      stream_fence();
      break;
  }
}

SCREENING_ATTN_VECTOR_CLONES void norm_forward_range(const NormFwd<float>& a, Gate g, int64_t p0,
                                                     int64_t p1) {
  norm_forward_range_impl(a, g, p0, p1);
}

SCREENING_ATTN_VECTOR_CLONES void norm_forward_range(const NormFwd<double>& a, Gate g,
                                                     int64_t p0, int64_t p1) {
  norm_forward_range_impl(a, g, p0, p1);
}

template <typename T>
void norm_forward(const NormFwd<T>& a, Gate g, int64_t planes) {
  at::parallel_for(0, planes, plane_grain(a.count),
                   [&](int64_t p0, int64_t p1) { norm_forward_range(a, g, p0, p1); });
}

// Backward of every member: the upstream gradient of u = x r (+ b) is
//   gu = g0 + scale1 * g1 [mask]      (each term optional)
// and the gated AdaReLU also gets grad_hidden = eta g1 [mask]. Pass 1 reduces sum(gu x),
// sum(gu) (the bias gradient of the plane) and sum(x) (the mean, when centered); pass 2 writes.
template <typename T>
struct NormBwd {
  const T* g0;       // added as is, or nullptr
  const T* g1;       // gated by mask and scaled by scale1, or nullptr
  const uint8_t* mask;  // with g1 (bool data)
  const T* x;
  const T* rstd;
  T* gx;
  T* gh;         // eta g1 [mask], or nullptr
  T* bias_part;  // (N C,) per-plane sum(gu), or nullptr
  int64_t count;
  T scale1, eta;
  bool centered;
};

// Plane p; `g1` is its plane of a.g1, or a scratch plane (nullptr without G1).
template <typename T, bool G0, bool G1, bool GH, typename W>
SCREENING_ATTN_INLINE void norm_backward_plane(const NormBwd<T>& a, int64_t p, const T* g1_plane) {
  using V = typename W::V;
  const int64_t n = a.count;
  const int64_t off = p * n;
  const T* __restrict__ x = a.x + off;
  const T* __restrict__ g0 = G0 ? a.g0 + off : x;
  const T* __restrict__ g1 = G1 ? g1_plane : x;
  const uint8_t* __restrict__ m = G1 ? a.mask + off : nullptr;
  const T scale1 = a.scale1;
  auto gated = [&](int64_t i) { return gate<V>(W::load(g1 + i), W::load_bytes(m + i) != 0); };
  auto gu = [&](int64_t i) {
    V v = W::zeros();
    if constexpr (G0) v += W::load(g0 + i);
    if constexpr (G1) v += scale1 * gated(i);
    return v;
  };
  const auto [s_gx, s_g, s_x] = plane_sums<W, 3>(n, [&](int64_t i) {
    const V u = gu(i), xv = W::load(x + i);
    return std::array<V, 3>{u * xv, u, xv};
  });
  const T r = a.rstd[p];
  const T mean = a.centered ? s_x / static_cast<T>(n) : T(0);
  const V coef = W::splat(ins_grad_coef<T>(r, s_gx, n, a.centered));
  T* __restrict__ gx = a.gx + off;
  T* __restrict__ gh = GH ? a.gh + off : gx;
  const T eta = a.eta;
  for_chunks<W>(n, [&](int64_t i) {
    W::store(gx + i, ins_grad<V>(gu(i), W::load(x + i), W::splat(r), coef, W::splat(mean)));
    if constexpr (GH) W::store(gh + i, eta * gated(i));
  });
  if (a.bias_part != nullptr) a.bias_part[p] = s_g;
}

template <typename T, bool G0, bool G1, bool GH>
SCREENING_ATTN_INLINE void norm_backward_plane(const NormBwd<T>& a, int64_t p,
                                               const T* g1_plane) {
  if (wide_plane<T>(a.count)) {
    norm_backward_plane<T, G0, G1, GH, Wide<T>>(a, p, g1_plane);
  } else {
    norm_backward_plane<T, G0, G1, GH, Lanes<T, 1>>(a, p, g1_plane);
  }
}

// Plane p of the backward; `g1_plane` is its plane of a.g1, or a scratch plane.
template <typename T>
SCREENING_ATTN_INLINE void norm_backward_plane(const NormBwd<T>& a, int64_t p, const T* g1_plane) {
  const bool g0 = a.g0 != nullptr, g1 = a.g1 != nullptr, gh = a.gh != nullptr;
  if (g0 && !g1) {
    norm_backward_plane<T, true, false, false>(a, p, nullptr);
  } else if (!g0 && g1 && !gh) {
    norm_backward_plane<T, false, true, false>(a, p, g1_plane);
  } else if (!g0 && g1 && gh) {
    norm_backward_plane<T, false, true, true>(a, p, g1_plane);
  } else {
    TORCH_INTERNAL_ASSERT(g0 && g1 && !gh);
    norm_backward_plane<T, true, true, false>(a, p, g1_plane);
  }
}

template <typename T>
SCREENING_ATTN_INLINE void norm_backward_range_impl(const NormBwd<T>& a, int64_t p0,
                                                    int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    norm_backward_plane(a, p, a.g1 != nullptr ? a.g1 + p * a.count : nullptr);
  }
}

SCREENING_ATTN_VECTOR_CLONES void norm_backward_range(const NormBwd<float>& a, int64_t p0,
                                                      int64_t p1) {
  norm_backward_range_impl(a, p0, p1);
}

SCREENING_ATTN_VECTOR_CLONES void norm_backward_range(const NormBwd<double>& a, int64_t p0,
                                                      int64_t p1) {
  norm_backward_range_impl(a, p0, p1);
}

template <typename T>
void norm_backward(const NormBwd<T>& a, int64_t planes) {
  at::parallel_for(0, planes, plane_grain(a.count),
                   [&](int64_t p0, int64_t p1) { norm_backward_range(a, p0, p1); });
}

at::Tensor new_rstd(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(1)}, x.options());  // CPU: float or double, as x
}

std::tuple<at::Tensor, at::Tensor> ins_norm_cpu(const at::Tensor& x_, double eps, bool centered) {
  check_ins_norm(x_, "x", centered);
  const at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = new_rstd(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ins_norm_cpu", [&] {
    NormFwd<scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.y = y.mutable_data_ptr<scalar_t>();
    a.rstd = rstd.mutable_data_ptr<scalar_t>();
    a.channels = x.size(1);
    a.count = x.size(2) * x.size(3);
    a.eps = static_cast<scalar_t>(eps);
    a.centered = centered;
    norm_forward(a, Gate::kNone, rstd.numel());
  });
  return {y, rstd};
}

at::Tensor ins_norm_backward_cpu(const at::Tensor& grad_, const at::Tensor& x_,
                                 const at::Tensor& rstd_, bool centered) {
  check_ins_backward(grad_, "grad_y", x_, rstd_, centered);
  const at::Tensor grad = grad_.contiguous(), x = x_.contiguous(), rstd = rstd_.contiguous();
  at::Tensor gx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ins_norm_backward_cpu", [&] {
    NormBwd<scalar_t> a{};
    a.g0 = grad.const_data_ptr<scalar_t>();
    a.x = x.const_data_ptr<scalar_t>();
    a.rstd = rstd.const_data_ptr<scalar_t>();
    a.gx = gx.mutable_data_ptr<scalar_t>();
    a.count = x.size(2) * x.size(3);
    a.scale1 = 1;
    a.centered = centered;
    norm_backward(a, rstd.numel());
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ins_bias_ada_relu_cpu(
    const at::Tensor& x_, const std::optional<at::Tensor>& bias_,
    const std::optional<at::Tensor>& hidden_, double eta, double eps, bool centered) {
  check_ins_bias_ada_relu(x_, bias_, hidden_, centered);
  const at::Tensor x = x_.contiguous();
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  const at::Tensor hidden = hidden_.has_value() ? hidden_->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = at::empty_like(x, x.options().dtype(at::kBool));
  at::Tensor rstd = new_rstd(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ins_bias_ada_relu_cpu", [&] {
    NormFwd<scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.bias = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    a.hidden = hidden.defined() ? hidden.const_data_ptr<scalar_t>() : nullptr;
    a.y = y.mutable_data_ptr<scalar_t>();
    a.mask = as_bytes(mask.mutable_data_ptr<bool>());
    a.rstd = rstd.mutable_data_ptr<scalar_t>();
    a.channels = x.size(1);
    a.count = x.size(2) * x.size(3);
    a.eta = static_cast<scalar_t>(eta);
    a.eps = static_cast<scalar_t>(eps);
    a.centered = centered;
    norm_forward(a, hidden.defined() ? Gate::kAda : Gate::kReLU, rstd.numel());
  });
  return {y, mask, rstd};
}

// Per-plane partial sums (N, C) -> (C,), summed over N in order: deterministic.
template <typename T>
void sum_bias_parts(const T* part, T* out, int64_t batch, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    T s = 0;
    for (int64_t b = 0; b < batch; ++b) s += part[b * channels + c];
    out[c] = s;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ins_norm_gate_cpu(const at::Tensor& z_,
                                                                 const at::Tensor& mask_,
                                                                 double eps, bool centered) {
  check_ins_norm(z_, "z", centered);
  check_mask(mask_, z_, "z");
  const at::Tensor z = z_.contiguous(), mask = mask_.contiguous();
  at::Tensor zn = at::empty_like(z);
  at::Tensor out = at::empty_like(z);
  at::Tensor rstd = new_rstd(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ins_norm_gate_cpu", [&] {
    NormFwd<scalar_t> a{};
    a.x = z.const_data_ptr<scalar_t>();
    a.gate = as_bytes(mask.const_data_ptr<bool>());
    a.y = zn.mutable_data_ptr<scalar_t>();
    a.out = out.mutable_data_ptr<scalar_t>();
    a.rstd = rstd.mutable_data_ptr<scalar_t>();
    a.channels = z.size(1);
    a.count = z.size(2) * z.size(3);
    a.eps = static_cast<scalar_t>(eps);
    a.centered = centered;
    a.stream_y = streams_output(zn);
    norm_forward(a, Gate::kFeedback, rstd.numel());
  });
  return {zn, out, rstd};
}

at::Tensor ins_norm_gate_backward_cpu(const at::Tensor& grad_zn_, const at::Tensor& grad_out_,
                                      const at::Tensor& z_, const at::Tensor& mask_,
                                      const at::Tensor& rstd_, bool centered) {
  check_ins_norm_gate_backward(grad_zn_, grad_out_, z_, mask_, rstd_, centered);
  const at::Tensor gzn = grad_zn_.contiguous(), gout = grad_out_.contiguous();
  const at::Tensor z = z_.contiguous(), mask = mask_.contiguous(), rstd = rstd_.contiguous();
  at::Tensor gz = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ins_norm_gate_backward_cpu", [&] {
    NormBwd<scalar_t> a{};
    a.g0 = gzn.const_data_ptr<scalar_t>();
    a.g1 = gout.const_data_ptr<scalar_t>();
    a.mask = as_bytes(mask.const_data_ptr<bool>());
    a.x = z.const_data_ptr<scalar_t>();
    a.rstd = rstd.const_data_ptr<scalar_t>();
    a.gx = gz.mutable_data_ptr<scalar_t>();
    a.count = z.size(2) * z.size(3);
    a.scale1 = 1;
    a.centered = centered;
    norm_backward(a, rstd.numel());
  });
  return gz;
}

// --- AdaPool ------------------------------------------------------------------------------------
// Per plane, row of windows by row of windows, each window scanned in row-major order.

struct PoolGeometry {
  int64_t H, W, Ho, Wo;
  int k;
};

PoolGeometry pool_geometry(int64_t H, int64_t W, int64_t k) {
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
  using typename Base::I;
  using typename Base::V;
  using Base::load;
  using Base::store;
  using Base::zeros;
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
SCREENING_ATTN_INLINE void pool_plane(const PoolArgs<T>& a, int64_t p,
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

template <typename T>
SCREENING_ATTN_INLINE void pool_range_impl(const PoolArgs<T>& a, PoolOp op, int64_t p0,
                                           int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    switch (op) {
      case PoolOp::kForward:
        pool_plane<T, PoolOp::kForward>(a, p, a.x + p * a.g.H * a.g.W);
        break;
      case PoolOp::kUnpool:
        pool_plane<T, PoolOp::kUnpool>(a, p, a.y + p * a.g.H * a.g.W);
        break;
      case PoolOp::kGather:
        pool_plane<T, PoolOp::kGather>(a, p, a.x + p * a.g.H * a.g.W);
        break;
    }
  }
}

SCREENING_ATTN_VECTOR_CLONES void pool_range(const PoolArgs<float>& a, PoolOp op, int64_t p0,
                                             int64_t p1) {
  pool_range_impl(a, op, p0, p1);
}

SCREENING_ATTN_VECTOR_CLONES void pool_range(const PoolArgs<double>& a, PoolOp op, int64_t p0,
                                             int64_t p1) {
  pool_range_impl(a, op, p0, p1);
}

template <typename T>
void run_pool(const PoolArgs<T>& a, PoolOp op, int64_t planes) {
  at::parallel_for(0, planes, plane_grain(a.g.H * a.g.W),
                   [&](int64_t p0, int64_t p1) { pool_range(a, op, p0, p1); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ada_pool2d_cpu(
    const at::Tensor& x_, const std::optional<at::Tensor>& hidden_, int64_t k) {
  check_ada_pool2d(x_, hidden_, k);
  const at::Tensor x = x_.contiguous();
  const at::Tensor hidden = hidden_.has_value() ? hidden_->contiguous() : at::Tensor();
  const PoolGeometry g = pool_geometry(x.size(2), x.size(3), k);
  at::Tensor y = at::empty({x.size(0), x.size(1), g.Ho, g.Wo}, x.options());
  at::Tensor amax = at::empty(y.sizes(), x.options().dtype(at::kByte));
  at::Tensor amin = at::empty(y.sizes(), x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ada_pool2d_cpu", [&] {
    PoolArgs<scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.hidden = hidden.defined() ? hidden.const_data_ptr<scalar_t>() : nullptr;
    a.y = y.mutable_data_ptr<scalar_t>();
    a.amax = amax.mutable_data_ptr<uint8_t>();
    a.amin = amin.mutable_data_ptr<uint8_t>();
    a.g = g;
    run_pool(a, PoolOp::kForward, x.size(0) * x.size(1));
  });
  return {y, amax, amin};
}

at::Tensor ada_unpool2d_cpu(const at::Tensor& z_, const std::optional<at::Tensor>& hidden_,
                            const at::Tensor& amax_, const at::Tensor& amin_, int64_t k,
                            int64_t height, int64_t width) {
  check_ada_unpool2d(z_, "z", hidden_, amax_, amin_, k, height, width);
  const at::Tensor z = z_.contiguous(), amax = amax_.contiguous(), amin = amin_.contiguous();
  const at::Tensor hidden = hidden_.has_value() ? hidden_->contiguous() : at::Tensor();
  at::Tensor out = at::empty({z.size(0), z.size(1), height, width}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ada_unpool2d_cpu", [&] {
    PoolArgs<scalar_t> a{};
    a.z = z.const_data_ptr<scalar_t>();
    a.hidden = hidden.defined() ? hidden.const_data_ptr<scalar_t>() : nullptr;
    a.amax_in = amax.const_data_ptr<uint8_t>();
    a.amin_in = amin.const_data_ptr<uint8_t>();
    a.y = out.mutable_data_ptr<scalar_t>();
    a.g = pool_geometry(height, width, k);
    run_pool(a, PoolOp::kUnpool, z.size(0) * z.size(1));
  });
  return out;
}

at::Tensor ada_pool2d_gather_cpu(const at::Tensor& grad_, const std::optional<at::Tensor>& hidden_,
                                 const at::Tensor& amax_, const at::Tensor& amin_, int64_t k) {
  const std::vector<int64_t> pooled =
      check_ada_pool2d_gather(grad_, "grad", hidden_, amax_, amin_, k);
  const at::Tensor grad = grad_.contiguous(), amax = amax_.contiguous(), amin = amin_.contiguous();
  const at::Tensor hidden = hidden_.has_value() ? hidden_->contiguous() : at::Tensor();
  at::Tensor gz = at::empty(pooled, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "ada_pool2d_gather_cpu", [&] {
    PoolArgs<scalar_t> a{};
    a.x = grad.const_data_ptr<scalar_t>();
    a.hidden = hidden.defined() ? hidden.const_data_ptr<scalar_t>() : nullptr;
    a.amax_in = amax.const_data_ptr<uint8_t>();
    a.amin_in = amin.const_data_ptr<uint8_t>();
    a.y = gz.mutable_data_ptr<scalar_t>();
    a.g = pool_geometry(grad.size(2), grad.size(3), k);
    run_pool(a, PoolOp::kGather, grad.size(0) * grad.size(1));
  });
  return gz;
}

// --- Stage fusions (CPU) --------------------------------------------------------------------------
// A CNN-F stage ending in a pool: InsNorm -> Bias -> AdaReLU -> AdaPool bottom-up. The gated
// plane goes to a per-task scratch plane (3 KB for 28 x 28, in L1) and is pooled from there: the
// full-resolution activation is never written to memory (nor read back by the pool).
template <typename T>
SCREENING_ATTN_INLINE void norm_pool_range_impl(const NormFwd<T>& a, const PoolArgs<T>& pa,
                                                int64_t p0, int64_t p1) {
  std::vector<T> scratch(static_cast<size_t>(a.count));
  for (int64_t p = p0; p < p1; ++p) {
    if (a.hidden != nullptr) {
      norm_forward_plane<T, Gate::kAda>(a, p, scratch.data());
    } else {
      norm_forward_plane<T, Gate::kReLU>(a, p, scratch.data());
    }
    pool_plane<T, PoolOp::kForward>(pa, p, scratch.data());
  }
}

SCREENING_ATTN_VECTOR_CLONES void norm_pool_range(const NormFwd<float>& a,
                                                  const PoolArgs<float>& pa, int64_t p0,
                                                  int64_t p1) {
  norm_pool_range_impl(a, pa, p0, p1);
}

SCREENING_ATTN_VECTOR_CLONES void norm_pool_range(const NormFwd<double>& a,
                                                  const PoolArgs<double>& pa, int64_t p0,
                                                  int64_t p1) {
  norm_pool_range_impl(a, pa, p0, p1);
}

// out = u [mask] from the unpooled plane u; `streamed`, if not null, gets u by non-temporal
// stores (u was unpooled into an L1 scratch plane, then).
template <typename W, typename T = typename W::Scalar>
SCREENING_ATTN_INLINE void gate_plane(const T* __restrict__ u, const uint8_t* __restrict__ m,
                                      T* __restrict__ streamed, T* __restrict__ o, int64_t n) {
  using V = typename W::V;
  for_chunks<W>(n, [&](int64_t i) {
    const V v = W::load(u + i);
    if (streamed != nullptr) W::stream(streamed + i, v);
    W::store(o + i, gate<V>(v, W::load_bytes(m + i) != 0));
  });
}

template <typename W, typename T = typename W::Scalar>
SCREENING_ATTN_INLINE void unpool_gate_plane(const PoolArgs<T>& pa, const uint8_t* mask, T* out,
                                             bool stream, T* scratch, int64_t p) {
  const int64_t n = pa.g.H * pa.g.W;
  T* u = pa.y + p * n;
  stream = stream && W::streams(u, n);
  pool_plane<T, PoolOp::kUnpool>(pa, p, stream ? scratch : u);
  gate_plane<W>(stream ? scratch : u, mask + p * n, stream ? u : nullptr, out + p * n, n);
}

// Top-down, AdaPool's feedback then AdaReLU's: u = unpool(z) (the gate's new hidden) and
// out = u [mask], gated while the plane of u is in cache.
template <typename T>
SCREENING_ATTN_INLINE void unpool_gate_range_impl(const PoolArgs<T>& pa, const uint8_t* mask,
                                                  T* out, bool stream, int64_t p0, int64_t p1) {
  const int64_t n = pa.g.H * pa.g.W;
  std::vector<T> scratch(static_cast<size_t>(n));
  for (int64_t p = p0; p < p1; ++p) {
    if (wide_plane<T>(n)) {
      unpool_gate_plane<Wide<T>>(pa, mask, out, stream, scratch.data(), p);
    } else {
      unpool_gate_plane<Lanes<T, 1>>(pa, mask, out, stream, scratch.data(), p);
    }
  }
  stream_fence();
}

SCREENING_ATTN_VECTOR_CLONES void unpool_gate_range(const PoolArgs<float>& pa,
                                                    const uint8_t* mask, float* out, bool stream,
                                                    int64_t p0, int64_t p1) {
  unpool_gate_range_impl(pa, mask, out, stream, p0, p1);
}

SCREENING_ATTN_VECTOR_CLONES void unpool_gate_range(const PoolArgs<double>& pa,
                                                    const uint8_t* mask, double* out, bool stream,
                                                    int64_t p0, int64_t p1) {
  unpool_gate_range_impl(pa, mask, out, stream, p0, p1);
}

// Backward of the pooled stage: per plane, unpool the pooled gradient into scratch (L1), then
// the norm's backward from there.
template <typename T>
SCREENING_ATTN_INLINE void unpool_norm_backward_range_impl(const NormBwd<T>& a,
                                                           const PoolArgs<T>& pa, int64_t p0,
                                                           int64_t p1) {
  std::vector<T> scratch(static_cast<size_t>(a.count));
  for (int64_t p = p0; p < p1; ++p) {
    pool_plane<T, PoolOp::kUnpool>(pa, p, scratch.data());
    norm_backward_plane(a, p, scratch.data());
  }
}

SCREENING_ATTN_VECTOR_CLONES void unpool_norm_backward_range(const NormBwd<float>& a,
                                                             const PoolArgs<float>& pa,
                                                             int64_t p0, int64_t p1) {
  unpool_norm_backward_range_impl(a, pa, p0, p1);
}

SCREENING_ATTN_VECTOR_CLONES void unpool_norm_backward_range(const NormBwd<double>& a,
                                                             const PoolArgs<double>& pa,
                                                             int64_t p0, int64_t p1) {
  unpool_norm_backward_range_impl(a, pa, p0, p1);
}

template <typename T>
void unpool_norm_backward(const NormBwd<T>& a, const PoolArgs<T>& pa, int64_t planes) {
  at::parallel_for(0, planes, plane_grain(a.count), [&](int64_t p0, int64_t p1) {
    unpool_norm_backward_range(a, pa, p0, p1);
  });
}

// Backward of ada_unpool_gate: grad_z = gather(grad_u + grad_out [mask]); the full-resolution
// sum is formed per plane in scratch (L1) and gathered from there. Either gradient may be absent.
template <typename W, typename T = typename W::Scalar>
SCREENING_ATTN_INLINE void gated_sum_plane(const T* __restrict__ gu, const T* __restrict__ go,
                                           const uint8_t* __restrict__ m, T* __restrict__ s,
                                           int64_t n) {
  using V = typename W::V;
  for_chunks<W>(n, [&](int64_t i) {
    V v = W::zeros();
    if (gu != nullptr) v += W::load(gu + i);
    if (go != nullptr) v += gate<V>(W::load(go + i), W::load_bytes(m + i) != 0);
    W::store(s + i, v);
  });
}

template <typename T>
SCREENING_ATTN_INLINE void unpool_gate_backward_range_impl(const PoolArgs<T>& pa, const T* gu,
                                                           const T* go, const uint8_t* mask,
                                                           int64_t p0, int64_t p1) {
  const int64_t n = pa.g.H * pa.g.W;
  std::vector<T> scratch(static_cast<size_t>(n));
  for (int64_t p = p0; p < p1; ++p) {
    const T* gu_p = gu != nullptr ? gu + p * n : nullptr;
    const T* go_p = go != nullptr ? go + p * n : nullptr;
    if (wide_plane<T>(n)) {
      gated_sum_plane<Wide<T>>(gu_p, go_p, mask + p * n, scratch.data(), n);
    } else {
      gated_sum_plane<Lanes<T, 1>>(gu_p, go_p, mask + p * n, scratch.data(), n);
    }
    pool_plane<T, PoolOp::kGather>(pa, p, scratch.data());
  }
}

SCREENING_ATTN_VECTOR_CLONES void unpool_gate_backward_range(const PoolArgs<float>& pa,
                                                             const float* gu, const float* go,
                                                             const uint8_t* mask, int64_t p0,
                                                             int64_t p1) {
  unpool_gate_backward_range_impl(pa, gu, go, mask, p0, p1);
}

SCREENING_ATTN_VECTOR_CLONES void unpool_gate_backward_range(const PoolArgs<double>& pa,
                                                             const double* gu, const double* go,
                                                             const uint8_t* mask, int64_t p0,
                                                             int64_t p1) {
  unpool_gate_backward_range_impl(pa, gu, go, mask, p0, p1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ins_bias_ada_relu_pool2d_cpu(const at::Tensor& x_, const std::optional<at::Tensor>& bias_,
                             const std::optional<at::Tensor>& hidden_,
                             const std::optional<at::Tensor>& pool_hidden_, double eta,
                             double eps, bool centered, int64_t k) {
  check_ins_bias_ada_relu(x_, bias_, hidden_, centered);
  check_ada_pool2d(x_, pool_hidden_, k);
  const at::Tensor x = x_.contiguous();
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  const at::Tensor hidden = hidden_.has_value() ? hidden_->contiguous() : at::Tensor();
  const at::Tensor pool_hidden =
      pool_hidden_.has_value() ? pool_hidden_->contiguous() : at::Tensor();
  const PoolGeometry g = pool_geometry(x.size(2), x.size(3), k);
  at::Tensor mask = at::empty_like(x, x.options().dtype(at::kBool));
  at::Tensor rstd = new_rstd(x);
  at::Tensor y = at::empty({x.size(0), x.size(1), g.Ho, g.Wo}, x.options());
  at::Tensor amax = at::empty(y.sizes(), x.options().dtype(at::kByte));
  at::Tensor amin = at::empty(y.sizes(), x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ins_bias_ada_relu_pool2d_cpu", [&] {
    NormFwd<scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.bias = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    a.hidden = hidden.defined() ? hidden.const_data_ptr<scalar_t>() : nullptr;
    a.mask = as_bytes(mask.mutable_data_ptr<bool>());
    a.rstd = rstd.mutable_data_ptr<scalar_t>();
    a.channels = x.size(1);
    a.count = x.size(2) * x.size(3);
    a.eta = static_cast<scalar_t>(eta);
    a.eps = static_cast<scalar_t>(eps);
    a.centered = centered;
    PoolArgs<scalar_t> pa{};
    pa.hidden = pool_hidden.defined() ? pool_hidden.const_data_ptr<scalar_t>() : nullptr;
    pa.y = y.mutable_data_ptr<scalar_t>();
    pa.amax = amax.mutable_data_ptr<uint8_t>();
    pa.amin = amin.mutable_data_ptr<uint8_t>();
    pa.g = g;
    at::parallel_for(0, rstd.numel(), plane_grain(a.count),
                     [&](int64_t p0, int64_t p1) { norm_pool_range(a, pa, p0, p1); });
  });
  return {y, mask, rstd, amax, amin};
}

std::tuple<at::Tensor, at::Tensor> ada_unpool_gate_cpu(const at::Tensor& z_,
                                                       const std::optional<at::Tensor>& hidden_,
                                                       const at::Tensor& amax_,
                                                       const at::Tensor& amin_,
                                                       const at::Tensor& mask_, int64_t k,
                                                       int64_t height, int64_t width) {
  check_ada_unpool2d(z_, "z", hidden_, amax_, amin_, k, height, width);
  const std::vector<int64_t> full{z_.size(0), z_.size(1), height, width};
  TORCH_CHECK_TYPE(mask_.scalar_type() == at::kBool, "mask must be a bool tensor, got ",
                   mask_.scalar_type());
  TORCH_CHECK_VALUE(mask_.sizes() == at::IntArrayRef(full) && mask_.device() == z_.device(),
                    "mask must have the unpooled shape ", at::IntArrayRef(full), " on ",
                    z_.device(), ", got ", mask_.sizes(), " on ", mask_.device());
  const at::Tensor z = z_.contiguous(), amax = amax_.contiguous(), amin = amin_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  const at::Tensor hidden = hidden_.has_value() ? hidden_->contiguous() : at::Tensor();
  at::Tensor u = at::empty(full, z.options());
  at::Tensor out = at::empty(full, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ada_unpool_gate_cpu", [&] {
    PoolArgs<scalar_t> pa{};
    pa.z = z.const_data_ptr<scalar_t>();
    pa.hidden = hidden.defined() ? hidden.const_data_ptr<scalar_t>() : nullptr;
    pa.amax_in = amax.const_data_ptr<uint8_t>();
    pa.amin_in = amin.const_data_ptr<uint8_t>();
    pa.y = u.mutable_data_ptr<scalar_t>();
    pa.g = pool_geometry(height, width, k);
    const uint8_t* mp = as_bytes(mask.const_data_ptr<bool>());
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, z.size(0) * z.size(1), plane_grain(height * width),
                     [&](int64_t p0, int64_t p1) {
                       unpool_gate_range(pa, mp, op, streams_output(u), p0, p1);
                     });
  });
  return {u, out};
}

// The pooled stage's gradient, unpooled per plane (ins_bias_ada_relu_pool2d's backward).
struct PooledGrad {
  std::optional<at::Tensor> hidden;
  at::Tensor argmax, argmin;
  int64_t k;
};

// (grad_x, grad_hidden, grad_bias) of ins_bias_ada_relu; with `pooled`, `grad` is the gradient
// of the pooled output, unpooled plane by plane into an L1 scratch plane (never into memory).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ins_bias_ada_relu_backward_impl(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& mask_,
    const at::Tensor& rstd_, double eta, bool gated, bool has_bias, bool centered,
    const PooledGrad* pooled) {
  const at::Tensor grad = grad_.contiguous(), x = x_.contiguous(), rstd = rstd_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor gx = at::empty_like(x);
  at::Tensor gh = gated ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor part = has_bias ? at::empty({x.size(0), x.size(1)}, x.options()) : at::Tensor();
  at::Tensor gb = at::empty({has_bias ? x.size(1) : 0}, x.options());
  at::Tensor pool_hidden, amax, amin;
  if (pooled != nullptr) {
    pool_hidden = pooled->hidden.has_value() ? pooled->hidden->contiguous() : at::Tensor();
    amax = pooled->argmax.contiguous();
    amin = pooled->argmin.contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ins_bias_ada_relu_backward_cpu", [&] {
    NormBwd<scalar_t> a{};
    a.g1 = grad.const_data_ptr<scalar_t>();
    a.mask = as_bytes(mask.const_data_ptr<bool>());
    a.x = x.const_data_ptr<scalar_t>();
    a.rstd = rstd.const_data_ptr<scalar_t>();
    a.gx = gx.mutable_data_ptr<scalar_t>();
    a.gh = gated ? gh.mutable_data_ptr<scalar_t>() : nullptr;
    a.bias_part = has_bias ? part.mutable_data_ptr<scalar_t>() : nullptr;
    a.count = x.size(2) * x.size(3);
    a.scale1 = gated ? static_cast<scalar_t>(1.0 - eta) : scalar_t(1);
    a.eta = static_cast<scalar_t>(eta);
    a.centered = centered;
    if (pooled == nullptr) {
      norm_backward(a, rstd.numel());
    } else {
      PoolArgs<scalar_t> pa{};
      pa.z = grad.const_data_ptr<scalar_t>();
      pa.hidden = pool_hidden.defined() ? pool_hidden.const_data_ptr<scalar_t>() : nullptr;
      pa.amax_in = amax.const_data_ptr<uint8_t>();
      pa.amin_in = amin.const_data_ptr<uint8_t>();
      pa.g = pool_geometry(x.size(2), x.size(3), pooled->k);
      unpool_norm_backward(a, pa, rstd.numel());
    }
    if (has_bias) {
      sum_bias_parts(part.const_data_ptr<scalar_t>(), gb.mutable_data_ptr<scalar_t>(), x.size(0),
                     x.size(1));
    }
  });
  return {gx, gh, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ins_bias_ada_relu_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask, const at::Tensor& rstd,
    double eta, bool gated, bool has_bias, bool centered) {
  check_ins_backward(grad, "grad_y", x, rstd, centered);
  check_mask(mask, x, "x");
  return ins_bias_ada_relu_backward_impl(grad, x, mask, rstd, eta, gated, has_bias, centered,
                                         nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ins_bias_ada_relu_pool2d_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mask, const at::Tensor& rstd,
    const std::optional<at::Tensor>& pool_hidden, const at::Tensor& argmax,
    const at::Tensor& argmin, double eta, bool gated, bool has_bias, bool centered, int64_t k) {
  check_ins_norm(x, "x", centered);
  check_mask(mask, x, "x");
  check_rstd(rstd, x);
  check_ada_unpool2d(grad_y, "grad_y", pool_hidden, argmax, argmin, k, x.size(2), x.size(3));
  check_same_dtype_device(x, "x", grad_y, "grad_y");
  TORCH_CHECK_VALUE(grad_y.size(0) == x.size(0) && grad_y.size(1) == x.size(1),
                    "grad_y must have the batch and channels of x ", x.sizes(), ", got ",
                    grad_y.sizes());
  const PooledGrad pooled{pool_hidden, argmax, argmin, k};
  return ins_bias_ada_relu_backward_impl(grad_y, x, mask, rstd, eta, gated, has_bias, centered,
                                         &pooled);
}

at::Tensor ada_unpool_gate_backward_cpu(const std::optional<at::Tensor>& grad_u_,
                                        const std::optional<at::Tensor>& grad_out_,
                                        const std::optional<at::Tensor>& hidden_,
                                        const at::Tensor& amax_, const at::Tensor& amin_,
                                        const at::Tensor& mask_, int64_t k) {
  TORCH_CHECK_VALUE(grad_u_.has_value() || grad_out_.has_value(),
                    "ada_unpool_gate_backward needs grad_u or grad_out");
  const at::Tensor& like = grad_u_.has_value() ? *grad_u_ : *grad_out_;
  const char* like_name = grad_u_.has_value() ? "grad_u" : "grad_out";
  const std::vector<int64_t> pooled =
      check_ada_pool2d_gather(like, like_name, hidden_, amax_, amin_, k);
  if (grad_u_.has_value() && grad_out_.has_value()) {
    check_same_dtype_device(*grad_u_, "grad_u", *grad_out_, "grad_out");
    check_same_shape(*grad_u_, "grad_u", *grad_out_, "grad_out");
  }
  check_mask(mask_, like, like_name);
  const at::Tensor gu = grad_u_.has_value() ? grad_u_->contiguous() : at::Tensor();
  const at::Tensor go = grad_out_.has_value() ? grad_out_->contiguous() : at::Tensor();
  const at::Tensor amax = amax_.contiguous(), amin = amin_.contiguous(), mask = mask_.contiguous();
  const at::Tensor hidden = hidden_.has_value() ? hidden_->contiguous() : at::Tensor();
  at::Tensor gz = at::empty(pooled, like.options());
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "ada_unpool_gate_backward_cpu", [&] {
    PoolArgs<scalar_t> pa{};
    pa.hidden = hidden.defined() ? hidden.const_data_ptr<scalar_t>() : nullptr;
    pa.amax_in = amax.const_data_ptr<uint8_t>();
    pa.amin_in = amin.const_data_ptr<uint8_t>();
    pa.y = gz.mutable_data_ptr<scalar_t>();
    pa.g = pool_geometry(like.size(2), like.size(3), k);
    const scalar_t* gup = gu.defined() ? gu.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gop = go.defined() ? go.const_data_ptr<scalar_t>() : nullptr;
    const uint8_t* mp = as_bytes(mask.const_data_ptr<bool>());
    at::parallel_for(0, like.size(0) * like.size(1), plane_grain(pa.g.H * pa.g.W),
                     [&](int64_t p0, int64_t p1) {
                       unpool_gate_backward_range(pa, gup, gop, mp, p0, p1);
                     });
  });
  return gz;
}

}  // namespace

TORCH_LIBRARY_IMPL(screening_attn, CPU, m) {
  m.impl("ins_bias_ada_relu_pool2d", &ins_bias_ada_relu_pool2d_cpu);
  m.impl("ada_unpool_gate", &ada_unpool_gate_cpu);
  m.impl("ins_bias_ada_relu_pool2d_backward", &ins_bias_ada_relu_pool2d_backward_cpu);
  m.impl("ada_unpool_gate_backward", &ada_unpool_gate_backward_cpu);
  m.impl("ada_relu", &ada_relu_cpu);
  m.impl("ada_relu_backward", &ada_relu_backward_cpu);
  m.impl("ada_relu_feedback", &ada_relu_feedback_cpu);
  m.impl("ins_norm", &ins_norm_cpu);
  m.impl("ins_norm_backward", &ins_norm_backward_cpu);
  m.impl("ins_bias_ada_relu", &ins_bias_ada_relu_cpu);
  m.impl("ins_bias_ada_relu_backward", &ins_bias_ada_relu_backward_cpu);
  m.impl("ins_norm_gate", &ins_norm_gate_cpu);
  m.impl("ins_norm_gate_backward", &ins_norm_gate_backward_cpu);
  m.impl("ada_pool2d", &ada_pool2d_cpu);
  m.impl("ada_unpool2d", &ada_unpool2d_cpu);
  m.impl("ada_pool2d_gather", &ada_pool2d_gather_cpu);
}

}  // namespace screening_attn
