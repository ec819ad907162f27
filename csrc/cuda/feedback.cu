// CUDA kernels of the CNN-F ops: grid-stride elementwise loops, math from feedback.h,
// half/bfloat16 computed in float.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "screening_attn/checks.h"
#include "screening_attn/feedback.h"

namespace screening_attn {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  // Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads,
                                                                 65535)));
}

template <typename scalar_t>
__global__ void ada_relu_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ h,
                                scalar_t* __restrict__ y, bool* __restrict__ mask,
                                at::opmath_type<scalar_t> eta, bool has_hidden, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    bool open;
    y[i] = static_cast<scalar_t>(ada_relu_value<acc_t>(
        static_cast<acc_t>(x[i]), static_cast<acc_t>(h[i]), eta, has_hidden, &open));
    mask[i] = open;
  }
}

template <typename scalar_t>
__global__ void ada_relu_backward_kernel(const scalar_t* __restrict__ g,
                                         const bool* __restrict__ mask, scalar_t* __restrict__ gx,
                                         scalar_t* __restrict__ gh,
                                         at::opmath_type<scalar_t> eta, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    acc_t a, b;
    ada_relu_grad<acc_t>(static_cast<acc_t>(g[i]), mask[i], eta, &a, &b);
    gx[i] = static_cast<scalar_t>(a);
    gh[i] = static_cast<scalar_t>(b);
  }
}

template <typename scalar_t>
__global__ void ada_relu_feedback_kernel(const scalar_t* __restrict__ z,
                                         const bool* __restrict__ mask,
                                         scalar_t* __restrict__ out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = static_cast<scalar_t>(gate<acc_t>(static_cast<acc_t>(z[i]), mask[i]));
  }
}

std::tuple<at::Tensor, at::Tensor> ada_relu_cuda(const at::Tensor& x_,
                                                 const std::optional<at::Tensor>& hidden_,
                                                 double eta) {
  check_ada_relu(x_, hidden_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const bool has_hidden = hidden_.has_value();
  const at::Tensor x = x_.contiguous();
  const at::Tensor hidden = has_hidden ? hidden_->contiguous() : x;
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = at::empty_like(x, x.options().dtype(at::kBool));
  const int64_t n = x.numel();
  if (n == 0) return {y, mask};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ada_relu_cuda", [&] {
    ada_relu_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), hidden.const_data_ptr<scalar_t>(),
        y.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<bool>(), static_cast<at::opmath_type<scalar_t>>(eta),
        has_hidden, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mask};
}

std::tuple<at::Tensor, at::Tensor> ada_relu_backward_cuda(const at::Tensor& grad_,
                                                          const at::Tensor& mask_, double eta) {
  check_ada_relu_backward(grad_, mask_);
  const c10::cuda::CUDAGuard guard(grad_.device());
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor gx = at::empty_like(grad);
  at::Tensor gh = at::empty_like(grad);
  const int64_t n = grad.numel();
  if (n == 0) return {gx, gh};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "ada_relu_backward_cuda", [&] {
        ada_relu_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
            gx.mutable_data_ptr<scalar_t>(), gh.mutable_data_ptr<scalar_t>(),
            static_cast<at::opmath_type<scalar_t>>(eta), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {gx, gh};
}

at::Tensor ada_relu_feedback_cuda(const at::Tensor& z_, const at::Tensor& mask_) {
  check_ada_relu_backward(z_, mask_);
  const c10::cuda::CUDAGuard guard(z_.device());
  const at::Tensor z = z_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor out = at::empty_like(z);
  const int64_t n = z.numel();
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, z.scalar_type(), "ada_relu_feedback_cuda", [&] {
        ada_relu_feedback_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
            z.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
            out.mutable_data_ptr<scalar_t>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(screening_attn, CUDA, m) {
  m.impl("ada_relu", &ada_relu_cuda);
  m.impl("ada_relu_backward", &ada_relu_backward_cuda);
  m.impl("ada_relu_feedback", &ada_relu_feedback_cuda);
}

}  // namespace screening_attn
