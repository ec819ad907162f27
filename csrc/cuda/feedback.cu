// CUDA kernels of the CNN-F ops, math from feedback.h, half/bfloat16 computed in float (opmath):
// the gates are grid-stride elementwise loops; the instance-norm family runs one block per
// (n, c) plane (CUB block reductions, then an elementwise pass; no atomics, so results are
// deterministic); AdaPool one thread per pooled output (forward, gather) or per output element
// (unpool, coalesced writes).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cub/block/block_reduce.cuh>

#include "screening_attn/checks.h"
#include "screening_attn/feedback.h"

namespace screening_attn {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  // Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)));
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
                                         scalar_t* __restrict__ gh, at::opmath_type<scalar_t> eta,
                                         int64_t n) {
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
                                         const bool* __restrict__ mask, scalar_t* __restrict__ out,
                                         int64_t n) {
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
        y.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<bool>(),
        static_cast<at::opmath_type<scalar_t>>(eta), has_hidden, n);
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

// Instance-norm family: one block per (n, c) plane

constexpr int kPlaneThreads = 256;

template <typename acc_t>
using PlaneReduce = cub::BlockReduce<acc_t, kPlaneThreads>;

// Sum of v over the block, returned to every thread (temp storage reused: sync before and after).
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, typename PlaneReduce<acc_t>::TempStorage& temp,
                           acc_t* shared_total) {
  const acc_t total = PlaneReduce<acc_t>(temp).Sum(v);
  if (threadIdx.x == 0) *shared_total = total;
  __syncthreads();
  const acc_t out = *shared_total;
  __syncthreads();
  return out;
}

template <typename scalar_t, Gate G>
__global__ void __launch_bounds__(kPlaneThreads)
    ins_norm_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ bias,
                            const scalar_t* __restrict__ hidden, const bool* __restrict__ gate_in,
                            scalar_t* __restrict__ y, scalar_t* __restrict__ out,
                            bool* __restrict__ mask, at::opmath_type<scalar_t>* __restrict__ rstd,
                            int64_t channels, int64_t n, at::opmath_type<scalar_t> eta,
                            at::opmath_type<scalar_t> eps, bool centered) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ typename PlaneReduce<acc_t>::TempStorage temp;
  __shared__ acc_t total;
  const int64_t p = blockIdx.x;
  const int64_t off = p * n;
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < n; i += kPlaneThreads) {
    const acc_t v = static_cast<acc_t>(x[off + i]);
    s += centered ? v : v * v;
  }
  s = block_sum<acc_t>(s, temp, &total);
  if (centered) {
    const acc_t mean = s / static_cast<acc_t>(n);
    s = 0;
    for (int64_t i = threadIdx.x; i < n; i += kPlaneThreads) {
      const acc_t d = static_cast<acc_t>(x[off + i]) - mean;
      s += d * d;
    }
    s = block_sum<acc_t>(s, temp, &total);
  }
  const acc_t r = ins_rstd<acc_t>(s, n, centered, eps);
  if (threadIdx.x == 0) rstd[p] = r;
  const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[p % channels]) : acc_t(0);
  for (int64_t i = threadIdx.x; i < n; i += kPlaneThreads) {
    const acc_t u = static_cast<acc_t>(x[off + i]) * r;
    if constexpr (G == Gate::kNone) {
      y[off + i] = static_cast<scalar_t>(u);
    } else if constexpr (G == Gate::kFeedback) {
      y[off + i] = static_cast<scalar_t>(u);
      out[off + i] = static_cast<scalar_t>(gate<acc_t>(u, gate_in[off + i]));
    } else {
      const acc_t h = G == Gate::kAda ? static_cast<acc_t>(hidden[off + i]) : acc_t(0);
      bool open;
      y[off + i] =
          static_cast<scalar_t>(ada_relu_value<acc_t>(u + b, h, eta, G == Gate::kAda, &open));
      mask[off + i] = open;
    }
  }
}

// gu = g0 + scale1 g1 [mask]; dx = r gu - coef (x - mean); dhidden = eta g1 [mask] (if asked);
// the plane's sum(gu) to bias_part (if asked).
template <typename scalar_t>
__global__ void __launch_bounds__(kPlaneThreads)
    ins_norm_backward_kernel(const scalar_t* __restrict__ g0, const scalar_t* __restrict__ g1,
                             const bool* __restrict__ mask, const scalar_t* __restrict__ x,
                             const at::opmath_type<scalar_t>* __restrict__ rstd,
                             scalar_t* __restrict__ gx, scalar_t* __restrict__ gh,
                             at::opmath_type<scalar_t>* __restrict__ bias_part, int64_t n,
                             at::opmath_type<scalar_t> scale1, at::opmath_type<scalar_t> eta,
                             bool centered) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ typename PlaneReduce<acc_t>::TempStorage temp;
  __shared__ acc_t total;
  const int64_t p = blockIdx.x;
  const int64_t off = p * n;
  auto gu = [&](int64_t i) {
    acc_t v = g0 != nullptr ? static_cast<acc_t>(g0[off + i]) : acc_t(0);
    if (g1 != nullptr) v += scale1 * gate<acc_t>(static_cast<acc_t>(g1[off + i]), mask[off + i]);
    return v;
  };
  acc_t s_gx = 0, s_g = 0, s_x = 0;
  for (int64_t i = threadIdx.x; i < n; i += kPlaneThreads) {
    const acc_t v = static_cast<acc_t>(x[off + i]), u = gu(i);
    s_gx += u * v;
    s_g += u;
    s_x += v;
  }
  s_gx = block_sum<acc_t>(s_gx, temp, &total);
  if (bias_part != nullptr) {
    s_g = block_sum<acc_t>(s_g, temp, &total);
    if (threadIdx.x == 0) bias_part[p] = s_g;
  }
  const acc_t mean =
      centered ? block_sum<acc_t>(s_x, temp, &total) / static_cast<acc_t>(n) : acc_t(0);
  const acc_t r = rstd[p];
  const acc_t coef = ins_grad_coef<acc_t>(r, s_gx, n, centered);
  for (int64_t i = threadIdx.x; i < n; i += kPlaneThreads) {
    gx[off + i] = static_cast<scalar_t>(
        ins_grad<acc_t>(gu(i), static_cast<acc_t>(x[off + i]), r, coef, mean));
    if (gh != nullptr) {
      gh[off + i] =
          static_cast<scalar_t>(eta * gate<acc_t>(static_cast<acc_t>(g1[off + i]), mask[off + i]));
    }
  }
}

// (N, C) plane sums -> (C,), one thread per channel.
template <typename scalar_t>
__global__ void sum_bias_parts_kernel(const at::opmath_type<scalar_t>* __restrict__ part,
                                      scalar_t* __restrict__ out, int64_t batch, int64_t channels) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < channels;
       c += int64_t(gridDim.x) * blockDim.x) {
    out[c] = static_cast<scalar_t>(bias_grad<acc_t>(part, batch, channels, c));
  }
}

at::Tensor new_rstd(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_type(x.scalar_type())));
}

unsigned int plane_blocks(const at::Tensor& rstd) {
  TORCH_CHECK_VALUE(rstd.numel() <= 0x7fffffff,
                    "too many (n, c) planes for one grid: ", rstd.numel());
  return static_cast<unsigned int>(rstd.numel());
}

#define SCREENING_ATTN_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

template <typename scalar_t>
void launch_norm_forward(Gate g, const at::Tensor& x, const at::Tensor& bias,
                         const at::Tensor& hidden, const at::Tensor& gate_in, at::Tensor& y,
                         at::Tensor& out, at::Tensor& mask, at::Tensor& rstd, double eta,
                         double eps, bool centered) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(2) * x.size(3);
  if (rstd.numel() == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* hp = hidden.defined() ? hidden.const_data_ptr<scalar_t>() : nullptr;
  const bool* gp = gate_in.defined() ? gate_in.const_data_ptr<bool>() : nullptr;
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  scalar_t* op = out.defined() ? out.mutable_data_ptr<scalar_t>() : nullptr;
  bool* mp = mask.defined() ? mask.mutable_data_ptr<bool>() : nullptr;
  acc_t* rp = rstd.mutable_data_ptr<acc_t>();
  const auto e = static_cast<acc_t>(eta), ep = static_cast<acc_t>(eps);
  const unsigned int blocks = plane_blocks(rstd);
  switch (g) {
    case Gate::kNone:
      ins_norm_forward_kernel<scalar_t, Gate::kNone><<<blocks, kPlaneThreads, 0, stream>>>(
          xp, bp, hp, gp, yp, op, mp, rp, x.size(1), n, e, ep, centered);
      break;
    case Gate::kReLU:
      ins_norm_forward_kernel<scalar_t, Gate::kReLU><<<blocks, kPlaneThreads, 0, stream>>>(
          xp, bp, hp, gp, yp, op, mp, rp, x.size(1), n, e, ep, centered);
      break;
    case Gate::kAda:
      ins_norm_forward_kernel<scalar_t, Gate::kAda><<<blocks, kPlaneThreads, 0, stream>>>(
          xp, bp, hp, gp, yp, op, mp, rp, x.size(1), n, e, ep, centered);
      break;
    case Gate::kFeedback:
      ins_norm_forward_kernel<scalar_t, Gate::kFeedback><<<blocks, kPlaneThreads, 0, stream>>>(
          xp, bp, hp, gp, yp, op, mp, rp, x.size(1), n, e, ep, centered);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_norm_backward(const at::Tensor& g0, const at::Tensor& g1, const at::Tensor& mask,
                          const at::Tensor& x, const at::Tensor& rstd, at::Tensor& gx,
                          at::Tensor& gh, at::Tensor& part, double scale1, double eta,
                          bool centered) {
  using acc_t = at::opmath_type<scalar_t>;
  if (rstd.numel() == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  ins_norm_backward_kernel<scalar_t><<<plane_blocks(rstd), kPlaneThreads, 0, stream>>>(
      g0.defined() ? g0.const_data_ptr<scalar_t>() : nullptr,
      g1.defined() ? g1.const_data_ptr<scalar_t>() : nullptr,
      mask.defined() ? mask.const_data_ptr<bool>() : nullptr, x.const_data_ptr<scalar_t>(),
      rstd.const_data_ptr<acc_t>(), gx.mutable_data_ptr<scalar_t>(),
      gh.defined() && gh.numel() ? gh.mutable_data_ptr<scalar_t>() : nullptr,
      part.defined() ? part.mutable_data_ptr<acc_t>() : nullptr, x.size(2) * x.size(3),
      static_cast<acc_t>(scale1), static_cast<acc_t>(eta), centered);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> ins_norm_cuda(const at::Tensor& x_, double eps, bool centered) {
  check_ins_norm(x_, "x", centered);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty_like(x), rstd = new_rstd(x), none;
  SCREENING_ATTN_DISPATCH_FLOATS(x.scalar_type(), "ins_norm_cuda", [&] {
    launch_norm_forward<scalar_t>(Gate::kNone, x, none, none, none, y, none, none, rstd, 0.0, eps,
                                  centered);
  });
  return {y, rstd};
}

at::Tensor ins_norm_backward_cuda(const at::Tensor& grad_, const at::Tensor& x_,
                                  const at::Tensor& rstd_, bool centered) {
  check_ins_backward(grad_, "grad_y", x_, rstd_, centered);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor grad = grad_.contiguous(), x = x_.contiguous(), rstd = rstd_.contiguous();
  at::Tensor gx = at::empty_like(x), none;
  SCREENING_ATTN_DISPATCH_FLOATS(x.scalar_type(), "ins_norm_backward_cuda", [&] {
    launch_norm_backward<scalar_t>(grad, none, none, x, rstd, gx, none, none, 1.0, 0.0, centered);
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ins_bias_ada_relu_cuda(
    const at::Tensor& x_, const std::optional<at::Tensor>& bias_,
    const std::optional<at::Tensor>& hidden_, double eta, double eps, bool centered) {
  check_ins_bias_ada_relu(x_, bias_, hidden_, centered);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  const at::Tensor hidden = hidden_.has_value() ? hidden_->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(x), rstd = new_rstd(x), none;
  at::Tensor mask = at::empty_like(x, x.options().dtype(at::kBool));
  SCREENING_ATTN_DISPATCH_FLOATS(x.scalar_type(), "ins_bias_ada_relu_cuda", [&] {
    launch_norm_forward<scalar_t>(hidden.defined() ? Gate::kAda : Gate::kReLU, x, bias, hidden,
                                  none, y, none, mask, rstd, eta, eps, centered);
  });
  return {y, mask, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ins_bias_ada_relu_backward_cuda(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& mask_, const at::Tensor& rstd_,
    double eta, bool gated, bool has_bias, bool centered) {
  check_ins_backward(grad_, "grad_y", x_, rstd_, centered);
  check_mask(mask_, x_, "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor grad = grad_.contiguous(), x = x_.contiguous(), rstd = rstd_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor gx = at::empty_like(x), none;
  at::Tensor gh = gated ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor part = has_bias ? at::empty(rstd.sizes(), rstd.options()) : at::Tensor();
  at::Tensor gb = at::empty({has_bias ? x.size(1) : 0}, x.options());
  SCREENING_ATTN_DISPATCH_FLOATS(x.scalar_type(), "ins_bias_ada_relu_backward_cuda", [&] {
    launch_norm_backward<scalar_t>(none, grad, mask, x, rstd, gx, gh, part, gated ? 1.0 - eta : 1.0,
                                   eta, centered);
    if (has_bias && gb.numel() > 0) {
      sum_bias_parts_kernel<scalar_t>
          <<<blocks_for(gb.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              part.const_data_ptr<at::opmath_type<scalar_t>>(), gb.mutable_data_ptr<scalar_t>(),
              x.size(0), x.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, gh, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ins_norm_gate_cuda(const at::Tensor& z_,
                                                                  const at::Tensor& mask_,
                                                                  double eps, bool centered) {
  check_ins_norm(z_, "z", centered);
  check_mask(mask_, z_, "z");
  const c10::cuda::CUDAGuard guard(z_.device());
  const at::Tensor z = z_.contiguous(), mask = mask_.contiguous();
  at::Tensor zn = at::empty_like(z), out = at::empty_like(z), rstd = new_rstd(z), none;
  SCREENING_ATTN_DISPATCH_FLOATS(z.scalar_type(), "ins_norm_gate_cuda", [&] {
    launch_norm_forward<scalar_t>(Gate::kFeedback, z, none, none, mask, zn, out, none, rstd, 0.0,
                                  eps, centered);
  });
  return {zn, out, rstd};
}

at::Tensor ins_norm_gate_backward_cuda(const at::Tensor& grad_zn_, const at::Tensor& grad_out_,
                                       const at::Tensor& z_, const at::Tensor& mask_,
                                       const at::Tensor& rstd_, bool centered) {
  check_ins_norm_gate_backward(grad_zn_, grad_out_, z_, mask_, rstd_, centered);
  const c10::cuda::CUDAGuard guard(z_.device());
  const at::Tensor gzn = grad_zn_.contiguous(), gout = grad_out_.contiguous();
  const at::Tensor z = z_.contiguous(), mask = mask_.contiguous(), rstd = rstd_.contiguous();
  at::Tensor gz = at::empty_like(z), none;
  SCREENING_ATTN_DISPATCH_FLOATS(z.scalar_type(), "ins_norm_gate_backward_cuda", [&] {
    launch_norm_backward<scalar_t>(gzn, gout, mask, z, rstd, gz, none, none, 1.0, 0.0, centered);
  });
  return gz;
}

// AdaPool

template <typename scalar_t>
__global__ void ada_pool_forward_kernel(const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ hidden,
                                        scalar_t* __restrict__ y, uint8_t* __restrict__ amax,
                                        uint8_t* __restrict__ amin, int64_t total, int64_t H,
                                        int64_t W, int64_t Ho, int64_t Wo, int k) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < total;
       o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = o % Wo, i = (o / Wo) % Ho, p = o / (Wo * Ho);
    const scalar_t* w = x + p * H * W + i * k * W + j * k;
    acc_t vmax = static_cast<acc_t>(w[0]), vmin = vmax;
    int am = 0, an = 0;
    for (int q = 1; q < k * k; ++q) {
      const acc_t v = static_cast<acc_t>(w[pool_offset(q, k, W)]);
      if (pool_beats_max<acc_t>(v, vmax)) vmax = v, am = q;
      if (pool_beats_min<acc_t>(v, vmin)) vmin = v, an = q;
    }
    const bool gated = hidden != nullptr;
    y[o] = static_cast<scalar_t>(
        ada_pool_value<acc_t>(vmax, vmin, gated ? static_cast<acc_t>(hidden[o]) : acc_t(0), gated));
    amax[o] = static_cast<uint8_t>(am);
    amin[o] = static_cast<uint8_t>(an);
  }
}

template <typename scalar_t>
__global__ void ada_unpool_kernel(const scalar_t* __restrict__ z,
                                  const scalar_t* __restrict__ hidden,
                                  const uint8_t* __restrict__ amax,
                                  const uint8_t* __restrict__ amin, scalar_t* __restrict__ out,
                                  int64_t total, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                                  int k) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t col = e % W, row = (e / W) % H, p = e / (W * H);
    const int64_t i = row / k, j = col / k;
    acc_t v = 0;
    if (i < Ho && j < Wo) {
      const int64_t o = (p * Ho + i) * Wo + j;
      const bool gated = hidden != nullptr;
      const int pos = static_cast<int>((row - i * k) * k + (col - j * k));
      v = ada_unpool_value<acc_t>(static_cast<acc_t>(z[o]),
                                  gated ? static_cast<acc_t>(hidden[o]) : acc_t(0), gated, pos,
                                  amax[o], amin[o]);
    }
    out[e] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t>
__global__ void ada_pool_gather_kernel(const scalar_t* __restrict__ g,
                                       const scalar_t* __restrict__ hidden,
                                       const uint8_t* __restrict__ amax,
                                       const uint8_t* __restrict__ amin, scalar_t* __restrict__ gz,
                                       int64_t total, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                                       int k) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < total;
       o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = o % Wo, i = (o / Wo) % Ho, p = o / (Wo * Ho);
    const scalar_t* w = g + p * H * W + i * k * W + j * k;
    const bool gated = hidden != nullptr;
    gz[o] = static_cast<scalar_t>(
        ada_pool_gather_value<acc_t>(static_cast<acc_t>(w[pool_offset(amax[o], k, W)]),
                                     static_cast<acc_t>(w[pool_offset(amin[o], k, W)]),
                                     gated ? static_cast<acc_t>(hidden[o]) : acc_t(0), gated));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ada_pool2d_cuda(
    const at::Tensor& x_, const std::optional<at::Tensor>& hidden_, int64_t k) {
  check_ada_pool2d(x_, hidden_, k);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor hidden = hidden_.has_value() ? hidden_->contiguous() : at::Tensor();
  const int64_t Ho = x.size(2) / k, Wo = x.size(3) / k;
  at::Tensor y = at::empty({x.size(0), x.size(1), Ho, Wo}, x.options());
  at::Tensor amax = at::empty(y.sizes(), x.options().dtype(at::kByte));
  at::Tensor amin = at::empty(y.sizes(), x.options().dtype(at::kByte));
  const int64_t total = y.numel();
  if (total == 0) return {y, amax, amin};
  SCREENING_ATTN_DISPATCH_FLOATS(x.scalar_type(), "ada_pool2d_cuda", [&] {
    ada_pool_forward_kernel<scalar_t>
        <<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(),
            hidden.defined() ? hidden.const_data_ptr<scalar_t>() : nullptr,
            y.mutable_data_ptr<scalar_t>(), amax.mutable_data_ptr<uint8_t>(),
            amin.mutable_data_ptr<uint8_t>(), total, x.size(2), x.size(3), Ho, Wo,
            static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, amax, amin};
}

at::Tensor ada_unpool2d_cuda(const at::Tensor& z_, const std::optional<at::Tensor>& hidden_,
                             const at::Tensor& amax_, const at::Tensor& amin_, int64_t k,
                             int64_t height, int64_t width) {
  check_ada_unpool2d(z_, "z", hidden_, amax_, amin_, k, height, width);
  const c10::cuda::CUDAGuard guard(z_.device());
  const at::Tensor z = z_.contiguous(), amax = amax_.contiguous(), amin = amin_.contiguous();
  const at::Tensor hidden = hidden_.has_value() ? hidden_->contiguous() : at::Tensor();
  at::Tensor out = at::empty({z.size(0), z.size(1), height, width}, z.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  SCREENING_ATTN_DISPATCH_FLOATS(z.scalar_type(), "ada_unpool2d_cuda", [&] {
    ada_unpool_kernel<scalar_t>
        <<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            z.const_data_ptr<scalar_t>(),
            hidden.defined() ? hidden.const_data_ptr<scalar_t>() : nullptr,
            amax.const_data_ptr<uint8_t>(), amin.const_data_ptr<uint8_t>(),
            out.mutable_data_ptr<scalar_t>(), total, height, width, z.size(2), z.size(3),
            static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor ada_pool2d_gather_cuda(const at::Tensor& grad_, const std::optional<at::Tensor>& hidden_,
                                  const at::Tensor& amax_, const at::Tensor& amin_, int64_t k) {
  const std::vector<int64_t> pooled =
      check_ada_pool2d_gather(grad_, "grad", hidden_, amax_, amin_, k);
  const c10::cuda::CUDAGuard guard(grad_.device());
  const at::Tensor grad = grad_.contiguous(), amax = amax_.contiguous(), amin = amin_.contiguous();
  const at::Tensor hidden = hidden_.has_value() ? hidden_->contiguous() : at::Tensor();
  at::Tensor gz = at::empty(pooled, grad.options());
  const int64_t total = gz.numel();
  if (total == 0) return gz;
  SCREENING_ATTN_DISPATCH_FLOATS(grad.scalar_type(), "ada_pool2d_gather_cuda", [&] {
    ada_pool_gather_kernel<scalar_t>
        <<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            grad.const_data_ptr<scalar_t>(),
            hidden.defined() ? hidden.const_data_ptr<scalar_t>() : nullptr,
            amax.const_data_ptr<uint8_t>(), amin.const_data_ptr<uint8_t>(),
            gz.mutable_data_ptr<scalar_t>(), total, grad.size(2), grad.size(3), pooled[2],
            pooled[3], static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gz;
}

}  // namespace

TORCH_LIBRARY_IMPL(screening_attn, CUDA, m) {
  m.impl("ada_relu", &ada_relu_cuda);
  m.impl("ada_relu_backward", &ada_relu_backward_cuda);
  m.impl("ada_relu_feedback", &ada_relu_feedback_cuda);
  m.impl("ins_norm", &ins_norm_cuda);
  m.impl("ins_norm_backward", &ins_norm_backward_cuda);
  m.impl("ins_bias_ada_relu", &ins_bias_ada_relu_cuda);
  m.impl("ins_bias_ada_relu_backward", &ins_bias_ada_relu_backward_cuda);
  m.impl("ins_norm_gate", &ins_norm_gate_cuda);
  m.impl("ins_norm_gate_backward", &ins_norm_gate_backward_cuda);
  m.impl("ada_pool2d", &ada_pool2d_cuda);
  m.impl("ada_unpool2d", &ada_unpool2d_cuda);
  m.impl("ada_pool2d_gather", &ada_pool2d_gather_cuda);
}

}  // namespace screening_attn
