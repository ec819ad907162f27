// CPU kernels of AdaPool: ada_pool2d, ada_unpool2d, ada_pool2d_gather, and the top-down fusion
// ada_unpool_gate (AdaPool's feedback, then AdaReLU's) with its backward (docs/feedback.md).
// at::parallel_for over (n, c) planes, each plane in one task, so every result has the same bits
// for any thread count; the plane passes are in feedback_pool.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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

template <typename T>
SCREENING_ATTN_INLINE void pool_range_impl(const PoolArgs<T>& a, PoolOp op, int64_t p0,
                                           int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    switch (op) {
      case PoolOp::kForward: pool_plane<T, PoolOp::kForward>(a, p, a.x + p * a.g.H * a.g.W); break;
      case PoolOp::kUnpool: pool_plane<T, PoolOp::kUnpool>(a, p, a.y + p * a.g.H * a.g.W); break;
      case PoolOp::kGather: pool_plane<T, PoolOp::kGather>(a, p, a.x + p * a.g.H * a.g.W); break;
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
  if (is_half(x_)) {
    auto [y, amax, amin] = ada_pool2d_cpu(as_float(x_), as_float(hidden_), k);
    return {y.to(x_.scalar_type()), amax, amin};
  }
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
  if (is_half(z_)) {
    return ada_unpool2d_cpu(as_float(z_), as_float(hidden_), amax_, amin_, k, height, width)
        .to(z_.scalar_type());
  }
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
  if (is_half(grad_)) {
    return ada_pool2d_gather_cpu(as_float(grad_), as_float(hidden_), amax_, amin_, k)
        .to(grad_.scalar_type());
  }
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

SCREENING_ATTN_VECTOR_CLONES void unpool_gate_range(const PoolArgs<float>& pa, const uint8_t* mask,
                                                    float* out, bool stream, int64_t p0,
                                                    int64_t p1) {
  unpool_gate_range_impl(pa, mask, out, stream, p0, p1);
}

SCREENING_ATTN_VECTOR_CLONES void unpool_gate_range(const PoolArgs<double>& pa, const uint8_t* mask,
                                                    double* out, bool stream, int64_t p0,
                                                    int64_t p1) {
  unpool_gate_range_impl(pa, mask, out, stream, p0, p1);
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

std::tuple<at::Tensor, at::Tensor> ada_unpool_gate_cpu(
    const at::Tensor& z_, const std::optional<at::Tensor>& hidden_, const at::Tensor& amax_,
    const at::Tensor& amin_, const at::Tensor& mask_, int64_t k, int64_t height, int64_t width) {
  check_ada_unpool2d(z_, "z", hidden_, amax_, amin_, k, height, width);
  const std::vector<int64_t> full{z_.size(0), z_.size(1), height, width};
  TORCH_CHECK_TYPE(mask_.scalar_type() == at::kBool, "mask must be a bool tensor, got ",
                   mask_.scalar_type());
  TORCH_CHECK_VALUE(mask_.sizes() == at::IntArrayRef(full) && mask_.device() == z_.device(),
                    "mask must have the unpooled shape ", at::IntArrayRef(full), " on ",
                    z_.device(), ", got ", mask_.sizes(), " on ", mask_.device());
  if (is_half(z_)) {
    auto [u, out] =
        ada_unpool_gate_cpu(as_float(z_), as_float(hidden_), amax_, amin_, mask_, k, height, width);
    return {u.to(z_.scalar_type()), out.to(z_.scalar_type())};
  }
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
    at::parallel_for(
        0, z.size(0) * z.size(1), plane_grain(height * width),
        [&](int64_t p0, int64_t p1) { unpool_gate_range(pa, mp, op, streams_output(u), p0, p1); });
  });
  return {u, out};
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
  if (is_half(like)) {
    return ada_unpool_gate_backward_cpu(as_float(grad_u_), as_float(grad_out_), as_float(hidden_),
                                        amax_, amin_, mask_, k)
        .to(like.scalar_type());
  }
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
    at::parallel_for(
        0, like.size(0) * like.size(1), plane_grain(pa.g.H * pa.g.W),
        [&](int64_t p0, int64_t p1) { unpool_gate_backward_range(pa, gup, gop, mp, p0, p1); });
  });
  return gz;
}

}  // namespace

TORCH_LIBRARY_IMPL(screening_attn, CPU, m) {
  m.impl("ada_pool2d", &ada_pool2d_cpu);
  m.impl("ada_unpool2d", &ada_unpool2d_cpu);
  m.impl("ada_pool2d_gather", &ada_pool2d_gather_cpu);
  m.impl("ada_unpool_gate", &ada_unpool_gate_cpu);
  m.impl("ada_unpool_gate_backward", &ada_unpool_gate_backward_cpu);
}

}  // namespace screening_attn
