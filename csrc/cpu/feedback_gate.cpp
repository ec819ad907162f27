// CPU kernels of the CNN-F gates: ada_relu, ada_relu_backward, ada_relu_feedback
// (docs/feedback.md). Elementwise: at::parallel_for over elements, kGrain per task, each task on
// the lanes of vec.h (compiled per ISA). Math from feedback.h, shared with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "vec.h"  // first: its -Wpsabi pragma also covers feedback.h

#include "half_inputs.h"
#include "screening_attn/checks.h"
#include "screening_attn/feedback.h"

namespace screening_attn {
namespace {

// The gates' elementwise passes over a task's [begin, end), on vector lanes as the per-plane
// loops of the norm and pool kernels (a range shorter than one vector runs one lane at a time).
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
SCREENING_ATTN_INLINE void ada_relu_grad_lanes(const T* g, const uint8_t* mask, T* gx, T* gh, T eta,
                                               int64_t n) {
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
  SCREENING_ATTN_VECTOR_CLONES void ada_relu_range(const T* x, const T* h, T* y, uint8_t* m,   \
                                                   T eta, bool has_hidden, int64_t begin,      \
                                                   int64_t end) {                              \
    if (wide_plane<T>(end - begin)) {                                                          \
      ada_relu_lanes<Wide<T>>(x + begin, h + begin, y + begin, m + begin, eta, has_hidden,     \
                              end - begin);                                                    \
    } else {                                                                                   \
      ada_relu_lanes<Lanes<T, 1>>(x + begin, h + begin, y + begin, m + begin, eta, has_hidden, \
                                  end - begin);                                                \
    }                                                                                          \
  }                                                                                            \
  SCREENING_ATTN_VECTOR_CLONES void ada_relu_grad_range(                                       \
      const T* g, const uint8_t* m, T* gx, T* gh, T eta, int64_t begin, int64_t end) {         \
    if (wide_plane<T>(end - begin)) {                                                          \
      ada_relu_grad_lanes<Wide<T>>(g + begin, m + begin, gx + begin, gh + begin, eta,          \
                                   end - begin);                                               \
    } else {                                                                                   \
      ada_relu_grad_lanes<Lanes<T, 1>>(g + begin, m + begin, gx + begin, gh + begin, eta,      \
                                       end - begin);                                           \
    }                                                                                          \
  }                                                                                            \
  SCREENING_ATTN_VECTOR_CLONES void gate_range(const T* z, const uint8_t* m, T* out,           \
                                               int64_t begin, int64_t end) {                   \
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
  if (is_half(x_)) {
    auto [y, mask] = ada_relu_cpu(as_float(x_), as_float(hidden_), eta);
    return {y.to(x_.scalar_type()), mask};
  }
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
  if (is_half(grad_)) {
    auto [gx, gh] = ada_relu_backward_cpu(as_float(grad_), mask_, eta);
    return {gx.to(grad_.scalar_type()), gh.to(grad_.scalar_type())};
  }
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
  if (is_half(z_)) return ada_relu_feedback_cpu(as_float(z_), mask_).to(z_.scalar_type());
  const at::Tensor z = z_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor out = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ada_relu_feedback_cpu", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const uint8_t* mp = as_bytes(mask.const_data_ptr<bool>());
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, z.numel(), kGrain,
                     [&](int64_t begin, int64_t end) { gate_range(zp, mp, op, begin, end); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(screening_attn, CPU, m) {
  m.impl("ada_relu", &ada_relu_cpu);
  m.impl("ada_relu_backward", &ada_relu_backward_cpu);
  m.impl("ada_relu_feedback", &ada_relu_feedback_cpu);
}

}  // namespace screening_attn
