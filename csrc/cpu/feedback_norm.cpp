// CPU kernels of the instance-norm family: ins_norm, ins_bias_ada_relu, ins_norm_gate, the
// bottom-up stage that ends in a pool (ins_bias_ada_relu_pool2d), and their backwards
// (docs/feedback.md). at::parallel_for over (n, c) planes, each plane in one task, so every
// result has the same bits for any thread count. Per plane: a reduction pass (two when centered:
// the mean, then the squared deviations, as torch.var), then one elementwise pass, the plane
// (3 KB for 28 x 28 float32) still in L1. The passes run on the lanes of vec.h (compiled per
// ISA), with the math of feedback.h, shared with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "feedback_pool.h"
#include "vec.h"

#include "half_inputs.h"
#include "screening_attn/checks.h"
#include "screening_attn/feedback.h"

namespace screening_attn {
namespace {

// The forward's arguments; the Gate says which of them are used.
template <typename T>
struct NormFwd {
  const T* x;
  const T* bias;        // (C,) or nullptr
  const T* hidden;      // like x, kAda only
  const uint8_t* gate;  // like x, kFeedback only (bool data: 0 or 1)
  T* y;                 // y, or zn for kFeedback
  T* out;               // kFeedback only
  uint8_t* mask;        // kReLU, kAda (bool data)
  T* rstd;              // (N C,)
  int64_t channels, count;
  T eta, eps;
  bool centered;
  bool stream_y;  // kFeedback: stream zn (the gate's new hidden) where its planes allow
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
      for (int64_t p = p0; p < p1; ++p)
        norm_forward_plane<T, Gate::kFeedback>(a, p, a.y + p * a.count);
      stream_fence();
      break;
  }
}

SCREENING_ATTN_VECTOR_CLONES void norm_forward_range(const NormFwd<float>& a, Gate g, int64_t p0,
                                                     int64_t p1) {
  norm_forward_range_impl(a, g, p0, p1);
}

SCREENING_ATTN_VECTOR_CLONES void norm_forward_range(const NormFwd<double>& a, Gate g, int64_t p0,
                                                     int64_t p1) {
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
  const T* g0;          // added as is, or nullptr
  const T* g1;          // gated by mask and scaled by scale1, or nullptr
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
SCREENING_ATTN_INLINE void norm_backward_plane(const NormBwd<T>& a, int64_t p, const T* g1_plane) {
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
SCREENING_ATTN_INLINE void norm_backward_range_impl(const NormBwd<T>& a, int64_t p0, int64_t p1) {
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
  if (is_half(x_)) {
    auto [y, rstd] = ins_norm_cpu(as_float(x_), eps, centered);
    return {y.to(x_.scalar_type()), rstd};
  }
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
  if (is_half(x_)) {
    return ins_norm_backward_cpu(as_float(grad_), as_float(x_), rstd_, centered)
        .to(x_.scalar_type());
  }
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
  if (is_half(x_)) {
    auto [y, mask, rstd] =
        ins_bias_ada_relu_cpu(as_float(x_), as_float(bias_), as_float(hidden_), eta, eps, centered);
    return {y.to(x_.scalar_type()), mask, rstd};
  }
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

// Per-plane partial sums (N, C) -> (C,).
template <typename T>
void sum_bias_parts(const T* part, T* out, int64_t batch, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) out[c] = bias_grad<T>(part, batch, channels, c);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ins_norm_gate_cpu(const at::Tensor& z_,
                                                                 const at::Tensor& mask_,
                                                                 double eps, bool centered) {
  check_ins_norm(z_, "z", centered);
  check_mask(mask_, z_, "z");
  if (is_half(z_)) {
    auto [zn, out, rstd] = ins_norm_gate_cpu(as_float(z_), mask_, eps, centered);
    return {zn.to(z_.scalar_type()), out.to(z_.scalar_type()), rstd};
  }
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
  if (is_half(z_)) {
    return ins_norm_gate_backward_cpu(as_float(grad_zn_), as_float(grad_out_), as_float(z_), mask_,
                                      rstd_, centered)
        .to(z_.scalar_type());
  }
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
                                                             const PoolArgs<float>& pa, int64_t p0,
                                                             int64_t p1) {
  unpool_norm_backward_range_impl(a, pa, p0, p1);
}

SCREENING_ATTN_VECTOR_CLONES void unpool_norm_backward_range(const NormBwd<double>& a,
                                                             const PoolArgs<double>& pa, int64_t p0,
                                                             int64_t p1) {
  unpool_norm_backward_range_impl(a, pa, p0, p1);
}

template <typename T>
void unpool_norm_backward(const NormBwd<T>& a, const PoolArgs<T>& pa, int64_t planes) {
  at::parallel_for(0, planes, plane_grain(a.count),
                   [&](int64_t p0, int64_t p1) { unpool_norm_backward_range(a, pa, p0, p1); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ins_bias_ada_relu_pool2d_cpu(
    const at::Tensor& x_, const std::optional<at::Tensor>& bias_,
    const std::optional<at::Tensor>& hidden_, const std::optional<at::Tensor>& pool_hidden_,
    double eta, double eps, bool centered, int64_t k) {
  check_ins_bias_ada_relu(x_, bias_, hidden_, centered);
  check_ada_pool2d(x_, pool_hidden_, k);
  if (is_half(x_)) {
    auto [y, mask, rstd, amax, amin] =
        ins_bias_ada_relu_pool2d_cpu(as_float(x_), as_float(bias_), as_float(hidden_),
                                     as_float(pool_hidden_), eta, eps, centered, k);
    return {y.to(x_.scalar_type()), mask, rstd, amax, amin};
  }
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

// The pooled stage's gradient, unpooled per plane (ins_bias_ada_relu_pool2d's backward).
struct PooledGrad {
  std::optional<at::Tensor> hidden;
  at::Tensor argmax, argmin;
  int64_t k;
};

// (grad_x, grad_hidden, grad_bias) of ins_bias_ada_relu; with `pooled`, `grad` is the gradient
// of the pooled output, unpooled plane by plane into an L1 scratch plane (never into memory).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ins_bias_ada_relu_backward_impl(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& mask_, const at::Tensor& rstd_,
    double eta, bool gated, bool has_bias, bool centered, const PooledGrad* pooled) {
  if (is_half(x_)) {
    std::optional<PooledGrad> as_float_pooled;
    if (pooled != nullptr) {
      as_float_pooled =
          PooledGrad{as_float(pooled->hidden), pooled->argmax, pooled->argmin, pooled->k};
    }
    auto [gx, gh, gb] = ins_bias_ada_relu_backward_impl(
        as_float(grad_), as_float(x_), mask_, rstd_, eta, gated, has_bias, centered,
        pooled != nullptr ? &*as_float_pooled : nullptr);
    const auto dtype = x_.scalar_type();
    return {gx.to(dtype), gh.to(dtype), gb.to(dtype)};
  }
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

}  // namespace

TORCH_LIBRARY_IMPL(screening_attn, CPU, m) {
  m.impl("ins_norm", &ins_norm_cpu);
  m.impl("ins_norm_backward", &ins_norm_backward_cpu);
  m.impl("ins_bias_ada_relu", &ins_bias_ada_relu_cpu);
  m.impl("ins_bias_ada_relu_backward", &ins_bias_ada_relu_backward_cpu);
  m.impl("ins_norm_gate", &ins_norm_gate_cpu);
  m.impl("ins_norm_gate_backward", &ins_norm_gate_backward_cpu);
  m.impl("ins_bias_ada_relu_pool2d", &ins_bias_ada_relu_pool2d_cpu);
  m.impl("ins_bias_ada_relu_pool2d_backward", &ins_bias_ada_relu_pool2d_backward_cpu);
}

}  // namespace screening_attn
