// The CPU kernels' vector toolkit. CPU only (GCC vector extensions, x86 intrinsics): the math
// shared with CUDA is in include/screening_attn/, not here.
//
// * SCREENING_ATTN_CLONES compiles a kernel entry point for AVX-512 and AVX2 too, picked at load
//   time (ifunc); SCREENING_ATTN_VECTOR_CLONES adds `flatten`, for entry points whose loops run
//   on the lanes below. Helpers are SCREENING_ATTN_INLINE, so every clone gets its own copy.
// * Lanes<T, L>: L lanes of T as a GCC vector (loads, stores, byte masks, sums, non-temporal
//   stores of whole 64-byte lines with stream_fence after them); Wide<T>: one 64-byte register.
// * Passes over a plane of n elements: for_chunks (elementwise), plane_sums / plane_sum
//   (reductions); wide_plane(n) says whether a plane fills one Wide<T>.
// * as_bytes: bool data as bytes; kGrain, plane_grain: the work of one task; kStreamBytes,
//   streams_output: which outputs are written past the cache.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Vector arguments of the always-inline helpers (here and in include/screening_attn/feedback.h)
// never cross a call boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SCREENING_ATTN_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SCREENING_ATTN_CLONES
#endif
// flatten: everything these entry points call, lambdas included, is compiled into each clone
// (a lambda left out of line would run the vector code at the baseline ISA).
#define SCREENING_ATTN_VECTOR_CLONES __attribute__((flatten)) SCREENING_ATTN_CLONES
#define SCREENING_ATTN_INLINE __attribute__((always_inline)) inline

namespace screening_attn {

constexpr int64_t kGrain = 32768;  // elements per task: enough to amortise a thread wake-up
// Hidden states at least this large are streamed past the cache (see Lanes::stream); smaller
// ones may still be in cache when the next forward reads them (a batch of 8 at 28x28: a
// non-temporal ada_unpool_gate was 15-60% slower there).
constexpr int64_t kStreamBytes = 2 << 20;

inline bool streams_output(const at::Tensor& t) { return t.nbytes() >= kStreamBytes; }

// Planes per task: at least kGrain elements.
inline int64_t plane_grain(int64_t plane_size) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, plane_size));
}

// GCC does not vectorize loads and stores of bool; the masks are read and written as bytes.
inline uint8_t* as_bytes(bool* p) { return reinterpret_cast<uint8_t*>(p); }
inline const uint8_t* as_bytes(const bool* p) { return reinterpret_cast<const uint8_t*>(p); }

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

}  // namespace screening_attn
