// CPU kernels of the CNN-F ops: elementwise, parallel over elements with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "screening_attn/checks.h"
#include "screening_attn/feedback.h"

namespace screening_attn {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task: enough to amortise a thread wake-up

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
    bool* mp = mask.mutable_data_ptr<bool>();
    const auto e = static_cast<scalar_t>(eta);
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        yp[i] = ada_relu_value<scalar_t>(xp[i], hp[i], e, has_hidden, &mp[i]);
      }
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
    const bool* mp = mask.const_data_ptr<bool>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    scalar_t* ghp = gh.mutable_data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eta);
    at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        ada_relu_grad<scalar_t>(gp[i], mp[i], e, &gxp[i], &ghp[i]);
      }
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
    const bool* mp = mask.const_data_ptr<bool>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, z.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) op[i] = gate<scalar_t>(zp[i], mp[i]);
    });
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
