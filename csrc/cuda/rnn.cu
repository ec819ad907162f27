// CUDA kernels of the RelRNN / RelLSTM step ops (schemas: csrc/rnn.cpp; the time loops:
// csrc/rnn_loops.cpp; design: docs/kernels/cpu-cuda.md). The attention step runs one block per
// batch row: a CUB block reduction per candidate score, then block reductions for the softmax; the
// screening is done by thread 0 with screen_slot. Elementwise ops are grid-stride loops. All
// math (scores, activations, LSTM cell, candidates, slot rule) comes from
// include/screening_attn/rnn.h, shared with the CPU kernels; half and bfloat16 compute in float.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/max.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <limits>
#include <string_view>

#include "screening_attn/rnn.h"
#include "screening_attn/rnn_checks.h"

namespace screening_attn {

namespace {

constexpr int kThreads = 128;  // per block (one batch row); loops cover Hd > kThreads

int blocks_for(int64_t n) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)));
}

template <typename scalar_t>
struct Memory {  // (T', B, Hd) states h_j and Ua h_j; v (Hd)
  const scalar_t* hidden;
  const scalar_t* uah;
  const scalar_t* v;
  int64_t B, Hd;
  __device__ int64_t offset(int64_t j, int64_t b) const { return (j * B + b) * Hd; }
};

// Dynamic shared memory of one block: candidate steps and columns, then the scores/weights.
template <typename acc_t>
struct Shared {
  int64_t* pos;
  int64_t* col;
  acc_t* e;
  __device__ Shared(void* base, int64_t nmax) {
    pos = static_cast<int64_t*>(base);
    col = pos + nmax;
    e = reinterpret_cast<acc_t*>(col + nmax);
  }
};

// The dynamic shared memory of a step over nmax candidates. Checked for the most a step of this
// window can hold (window + rho, so that a sequence fails at its first step, not midway) with the
// kernel's static shared memory (CUB's temp storage, broadcasts) against the device's opt-in limit;
// past the default 48 KB the kernel opts in.
template <typename acc_t, typename Kernel>
size_t shared_bytes(Kernel kernel, int64_t nmax, int64_t window, int64_t rho, int64_t Hd) {
  constexpr size_t per = 2 * sizeof(int64_t) + sizeof(acc_t);
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t limit = static_cast<size_t>(optin), fixed = attr.sharedSizeBytes;
  const size_t most = static_cast<size_t>(window + rho) * per;
  TORCH_CHECK_VALUE(fixed + most <= limit, "the CUDA RelRNN/RelLSTM step holds its window + ",
                    "relevant = ", window + rho, " candidates (Hd = ", Hd,
                    ") in shared memory: ", most, " B, plus ", fixed, " B of the kernel's own, ",
                    "exceed the ", limit, " B a block may use on this device; at most ",
                    (limit - fixed) / per, " candidates fit: use a smaller window + relevant, ",
                    "or the CPU kernels");
  const size_t bytes = static_cast<size_t>(nmax) * per;
  if (fixed + bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  return bytes;
}

// Every filled slot of a direct call must hold a step older than step t's window (as the CPU
// kernel's check): validated here on the host, at the cost of one device sync, since a failed
// assert inside the kernel would poison the CUDA context. The time loops own their slot state
// (only the step kernel writes it) and skip the sync (SlotsFromLoop).
void check_slots_on_host(const at::Tensor& slots, const char* name, int64_t t, int64_t window) {
  if (slots.numel() == 0 || slots_from_loop) return;
  const int64_t newest = slots.max().item<int64_t>();
  TORCH_CHECK_VALUE(newest < t - std::min(t, window), name, " holds step ", newest,
                    ", which is not older than the window of step ", t, " (window ", window, ")");
}

// One block per row b: scores, softmax, context, s_t, relevancy, screening (as attend_row in
// csrc/cpu/rnn.cpp).
template <typename scalar_t>
__global__ void attend_step_kernel(Memory<scalar_t> m, const scalar_t* __restrict__ query,
                                   int64_t ldq, int64_t* __restrict__ slot_index,
                                   at::opmath_type<scalar_t>* __restrict__ slot_score, int64_t rho,
                                   at::opmath_type<scalar_t>* __restrict__ relevancy,
                                   scalar_t* __restrict__ s, int64_t lds,
                                   at::opmath_type<scalar_t>* __restrict__ alpha, int64_t lda,
                                   int64_t* __restrict__ cand, int64_t ldc, int64_t t,
                                   int64_t window, at::opmath_type<scalar_t> attn) {
  using acc_t = at::opmath_type<scalar_t>;
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ acc_t bcast;
  __shared__ int64_t n_cand;
  extern __shared__ __align__(sizeof(int64_t)) unsigned char smem[];
  const int64_t b = blockIdx.x, Hd = m.Hd, nw = t < window ? t : window;
  Shared<acc_t> sh(smem, nw + rho);
  int64_t* slots = slot_index + b * rho;
  acc_t* arow = alpha + b * lda;
  for (int64_t c = threadIdx.x; c < window + rho; c += blockDim.x) arow[c] = acc_t(0);
  if (threadIdx.x == 0) {
    for (int64_t i = 0; i < rho; ++i) cand[b * ldc + i] = slots[i];
    n_cand = step_candidates(slots, rho, t, nw, window, sh.pos, sh.col);  // >= 0: host-checked
  }
  __syncthreads();
  const int64_t nc = n_cand;
  const scalar_t* q = query + b * ldq;
  for (int64_t c = 0; c < nc; ++c) {
    const scalar_t* k = m.uah + m.offset(sh.pos[c], b);
    acc_t part = 0;
    for (int64_t d = threadIdx.x; d < Hd; d += blockDim.x) {
      part += score_term<acc_t>(q[d], k[d], m.v[d]);
    }
    const acc_t e = Reduce(temp).Sum(part);
    if (threadIdx.x == 0) sh.e[c] = e;
    __syncthreads();  // temp is reused
  }
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = threadIdx.x; c < nc; c += blockDim.x) mx = mx > sh.e[c] ? mx : sh.e[c];
  mx = Reduce(temp).Reduce(mx, [](acc_t a, acc_t b) { return a > b ? a : b; });
  if (threadIdx.x == 0) bcast = mx;
  __syncthreads();
  mx = bcast;
  acc_t z = 0;
  for (int64_t c = threadIdx.x; c < nc; c += blockDim.x) {
    sh.e[c] = exp_nonpositive(sh.e[c] - mx);
    z += sh.e[c];
  }
  __syncthreads();  // temp and bcast are reused
  z = Reduce(temp).Sum(z);
  if (threadIdx.x == 0) bcast = acc_t(1) / z;
  __syncthreads();
  const acc_t inv = bcast;
  for (int64_t c = threadIdx.x; c < nc; c += blockDim.x) {
    const acc_t a = sh.e[c] * inv;
    sh.e[c] = a;
    arow[sh.col[c]] = a;
    if (c < nw) relevancy[sh.pos[c] * m.B + b] += a;
  }
  __syncthreads();
  const scalar_t* h_prev = m.hidden + m.offset(t - 1, b);
  for (int64_t d = threadIdx.x; d < Hd; d += blockDim.x) {
    acc_t ctx = 0;
    for (int64_t c = 0; c < nc; ++c) {
      ctx += sh.e[c] * static_cast<acc_t>(m.hidden[m.offset(sh.pos[c], b) + d]);
    }
    s[b * lds + d] =
        static_cast<scalar_t>(acc_t(0.5) * (static_cast<acc_t>(h_prev[d]) + attn * ctx));
  }
  if (threadIdx.x == 0 && t >= window) {  // step t - window has left the window
    const int64_t leaving = t - window;
    const acc_t r = relevancy[leaving * m.B + b];
    const int slot = screen_slot(slots, slot_score + b * rho, static_cast<int>(rho), r);
    if (slot >= 0) {
      slots[slot] = leaving;
      slot_score[b * rho + slot] = r;
    }
  }
}

// One block per row b (as attend_backward_row in csrc/cpu/rnn.cpp): a block reduction per
// candidate for dα_c = gc·h_c; then each thread owns features d and walks the candidates, so
// every write (a distinct candidate step per row) is its own: no atomics, deterministic.
template <typename scalar_t>
__global__ void attend_step_backward_kernel(
    Memory<scalar_t> m, const scalar_t* __restrict__ grad_s, int64_t ldg,
    const scalar_t* __restrict__ query, int64_t ldq,
    const at::opmath_type<scalar_t>* __restrict__ alpha, int64_t lda,
    const int64_t* __restrict__ cand, int64_t rho, scalar_t* __restrict__ grad_hidden,
    scalar_t* __restrict__ grad_uah, scalar_t* __restrict__ grad_v,
    scalar_t* __restrict__ grad_query, int64_t ldgq, int64_t t, int64_t window,
    at::opmath_type<scalar_t> attn) {
  using acc_t = at::opmath_type<scalar_t>;
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ acc_t delta;
  __shared__ int64_t n_cand;
  extern __shared__ __align__(sizeof(int64_t)) unsigned char smem[];
  const int64_t b = blockIdx.x, Hd = m.Hd, nw = t < window ? t : window;
  Shared<acc_t> sh(smem, nw + rho);  // sh.e holds dα
  const acc_t* arow = alpha + b * lda;
  if (threadIdx.x == 0) {
    n_cand = step_candidates(cand + b * rho, rho, t, nw, window, sh.pos, sh.col);  // >= 0
  }
  __syncthreads();
  const int64_t nc = n_cand;
  const scalar_t* gs = grad_s + b * ldg;
  for (int64_t c = 0; c < nc; ++c) {
    const scalar_t* hc = m.hidden + m.offset(sh.pos[c], b);
    acc_t part = 0;
    for (int64_t d = threadIdx.x; d < Hd; d += blockDim.x) {
      part += acc_t(0.5) * attn * static_cast<acc_t>(gs[d]) * static_cast<acc_t>(hc[d]);
    }
    const acc_t ga = Reduce(temp).Sum(part);
    if (threadIdx.x == 0) sh.e[c] = ga;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    acc_t acc = 0;
    for (int64_t c = 0; c < nc; ++c) acc += arow[sh.col[c]] * sh.e[c];
    delta = acc;
  }
  __syncthreads();
  const scalar_t* q = query + b * ldq;
  scalar_t* gh_prev = grad_hidden + m.offset(t - 1, b);
  for (int64_t d = threadIdx.x; d < Hd; d += blockDim.x) {
    const acc_t gsd = static_cast<acc_t>(gs[d]), gc = acc_t(0.5) * attn * gsd;
    gh_prev[d] = static_cast<scalar_t>(static_cast<acc_t>(gh_prev[d]) + acc_t(0.5) * gsd);
    acc_t gq = 0, gv = 0;
    for (int64_t c = 0; c < nc; ++c) {
      const acc_t a = arow[sh.col[c]];
      const int64_t off = m.offset(sh.pos[c], b) + d;
      const acc_t u =
          score_term_backward<acc_t>(q[d], m.uah[off], m.v[d], a * (sh.e[c] - delta), &gv);
      gq += u;
      grad_uah[off] = static_cast<scalar_t>(static_cast<acc_t>(grad_uah[off]) + u);
      grad_hidden[off] = static_cast<scalar_t>(static_cast<acc_t>(grad_hidden[off]) + a * gc);
    }
    grad_query[b * ldgq + d] = static_cast<scalar_t>(gq);
    grad_v[b * Hd + d] = static_cast<scalar_t>(static_cast<acc_t>(grad_v[b * Hd + d]) + gv);
  }
}

template <int NL, typename scalar_t>
__global__ void activation_kernel(const scalar_t* __restrict__ pre, int64_t ldp,
                                  const scalar_t* __restrict__ mb, scalar_t* __restrict__ h,
                                  int64_t ldh, int64_t B, int64_t Hd) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * Hd;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / Hd, d = i % Hd;
    const acc_t bd = NL == kModRelu ? static_cast<acc_t>(mb[d]) : acc_t(0);
    h[b * ldh + d] = static_cast<scalar_t>(activate<NL, acc_t>(pre[b * ldp + d], bd));
  }
}

template <int NL, typename scalar_t>
__global__ void activation_backward_kernel(const scalar_t* __restrict__ g, int64_t ldg,
                                           const scalar_t* __restrict__ h, int64_t ldh,
                                           scalar_t* __restrict__ gpre, int64_t ldp,
                                           scalar_t* __restrict__ gb, int64_t B, int64_t Hd) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * Hd;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / Hd, d = i % Hd;
    acc_t gbd = 0;
    gpre[b * ldp + d] =
        static_cast<scalar_t>(activate_backward<NL, acc_t>(g[b * ldg + d], h[b * ldh + d], &gbd));
    if (NL == kModRelu) gb[i] = static_cast<scalar_t>(static_cast<acc_t>(gb[i]) + gbd);
  }
}

template <typename scalar_t>
__global__ void lstm_cell_kernel(scalar_t* __restrict__ gates, int64_t ldg,
                                 const scalar_t* __restrict__ c_prev, int64_t ldp,
                                 scalar_t* __restrict__ cell, int64_t ldc, scalar_t* __restrict__ h,
                                 int64_t ldh, int64_t B, int64_t Hd) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * Hd;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / Hd, d = i % Hd;
    scalar_t* gr = gates + b * ldg + d;
    acc_t f, in, o, g, c, hv;
    lstm_cell<acc_t>(gr[0], gr[Hd], gr[2 * Hd], gr[3 * Hd], c_prev[b * ldp + d], &f, &in, &o, &g,
                     &c, &hv);
    gr[0] = static_cast<scalar_t>(f);
    gr[Hd] = static_cast<scalar_t>(in);
    gr[2 * Hd] = static_cast<scalar_t>(o);
    gr[3 * Hd] = static_cast<scalar_t>(g);
    cell[b * ldc + d] = static_cast<scalar_t>(c);
    h[b * ldh + d] = static_cast<scalar_t>(hv);
  }
}

template <typename scalar_t>
__global__ void lstm_cell_backward_kernel(const scalar_t* __restrict__ gh, int64_t ldgh,
                                          const scalar_t* __restrict__ gates, int64_t ldg,
                                          const scalar_t* __restrict__ cell, int64_t ldc,
                                          const scalar_t* __restrict__ c_prev, int64_t ldp,
                                          scalar_t* __restrict__ gcell, int64_t ldgc,
                                          scalar_t* __restrict__ ggates, int64_t ldgg, int64_t B,
                                          int64_t Hd) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * Hd;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / Hd, d = i % Hd;
    const scalar_t* gr = gates + b * ldg + d;
    scalar_t* ga = ggates + b * ldgg + d;
    acc_t gc = gcell[b * ldgc + d], gf, gi, go, gg;
    lstm_cell_backward<acc_t>(gh[b * ldgh + d], gr[0], gr[Hd], gr[2 * Hd], gr[3 * Hd],
                              cell[b * ldc + d], c_prev[b * ldp + d], &gc, &gf, &gi, &go, &gg);
    gcell[b * ldgc + d] = static_cast<scalar_t>(gc);
    ga[0] = static_cast<scalar_t>(gf);
    ga[Hd] = static_cast<scalar_t>(gi);
    ga[2 * Hd] = static_cast<scalar_t>(go);
    ga[3 * Hd] = static_cast<scalar_t>(gg);
  }
}

void rnn_attend_step_cuda(const at::Tensor& query_, const at::Tensor& hidden_,
                          const at::Tensor& uah_, const at::Tensor& v_,
                          const at::Tensor& slot_index, const at::Tensor& slot_score,
                          const at::Tensor& relevancy, const at::Tensor& s, const at::Tensor& alpha,
                          const at::Tensor& cand, int64_t t, int64_t window, double attn,
                          const std::optional<at::Tensor>& key_exp) {
  check_attend_step(query_, hidden_, uah_, v_, slot_index, slot_score, relevancy, s, alpha, cand, t,
                    window);
  // key_exp is the CPU kernels' cache of e^{2 uah}: here every term takes the hardware tanhf.
  check_key_exp_arg(key_exp, uah_);
  const c10::cuda::CUDAGuard guard(query_.device());
  const at::Tensor query = rows_of(query_);
  const at::Tensor hidden = hidden_.contiguous(), uah = uah_.contiguous(), v = v_.contiguous();
  const int64_t B = query.size(0), Hd = query.size(1), rho = slot_index.size(1);
  if (B == 0) return;
  check_slots_on_host(slot_index, "slot_index", t, window);
  const int64_t nmax = std::min(t, window) + rho;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, query.scalar_type(), "rnn_attend_step_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Memory<scalar_t> m{hidden.const_data_ptr<scalar_t>(), uah.const_data_ptr<scalar_t>(),
                                 v.const_data_ptr<scalar_t>(), B, Hd};
        const size_t smem =
            shared_bytes<acc_t>(attend_step_kernel<scalar_t>, nmax, window, rho, Hd);
        attend_step_kernel<scalar_t><<<B, kThreads, smem, stream>>>(
            m, query.const_data_ptr<scalar_t>(), query.stride(0),
            slot_index.mutable_data_ptr<int64_t>(), slot_score.mutable_data_ptr<acc_t>(), rho,
            relevancy.mutable_data_ptr<acc_t>(), s.mutable_data_ptr<scalar_t>(), s.stride(0),
            alpha.mutable_data_ptr<acc_t>(), alpha.stride(0), cand.mutable_data_ptr<int64_t>(),
            cand.stride(0), t, window, static_cast<acc_t>(attn));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void rnn_attend_step_backward_cuda(const at::Tensor& grad_s_, const at::Tensor& query_,
                                   const at::Tensor& hidden_, const at::Tensor& uah_,
                                   const at::Tensor& v_, const at::Tensor& alpha_,
                                   const at::Tensor& cand_, const at::Tensor& grad_hidden,
                                   const at::Tensor& grad_uah, const at::Tensor& grad_v,
                                   const at::Tensor& grad_query, int64_t t, int64_t window,
                                   double attn, const std::optional<at::Tensor>& key_exp) {
  check_attend_step_backward(grad_s_, query_, hidden_, uah_, v_, alpha_, cand_, grad_hidden,
                             grad_uah, grad_v, grad_query, t, window);
  check_key_exp_arg(key_exp, uah_);  // unused, as in rnn_attend_step_cuda
  const c10::cuda::CUDAGuard guard(query_.device());
  const at::Tensor query = rows_of(query_), grad_s = rows_of(grad_s_), alpha = rows_of(alpha_);
  const at::Tensor cand = cand_.contiguous();
  const at::Tensor hidden = hidden_.contiguous(), uah = uah_.contiguous(), v = v_.contiguous();
  const int64_t B = query.size(0), Hd = query.size(1), rho = cand.size(1);
  if (B == 0) return;
  check_slots_on_host(cand, "cand", t, window);
  const int64_t nmax = std::min(t, window) + rho;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, query.scalar_type(), "rnn_attend_step_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Memory<scalar_t> m{hidden.const_data_ptr<scalar_t>(), uah.const_data_ptr<scalar_t>(),
                                 v.const_data_ptr<scalar_t>(), B, Hd};
        const size_t smem =
            shared_bytes<acc_t>(attend_step_backward_kernel<scalar_t>, nmax, window, rho, Hd);
        attend_step_backward_kernel<scalar_t><<<B, kThreads, smem, stream>>>(
            m, grad_s.const_data_ptr<scalar_t>(), grad_s.stride(0),
            query.const_data_ptr<scalar_t>(), query.stride(0), alpha.const_data_ptr<acc_t>(),
            alpha.stride(0), cand.const_data_ptr<int64_t>(), rho,
            grad_hidden.mutable_data_ptr<scalar_t>(), grad_uah.mutable_data_ptr<scalar_t>(),
            grad_v.mutable_data_ptr<scalar_t>(), grad_query.mutable_data_ptr<scalar_t>(),
            grad_query.stride(0), t, window, static_cast<acc_t>(attn));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void rnn_activation_cuda(const at::Tensor& pre_, const std::optional<at::Tensor>& modrelu_b,
                         c10::string_view nonlinearity, const at::Tensor& h) {
  const int nl = parse_nonlinearity(nonlinearity);
  check_activation(pre_, modrelu_b, nl, h);
  const c10::cuda::CUDAGuard guard(pre_.device());
  const at::Tensor pre = rows_of(pre_);
  const at::Tensor mb = nl == kModRelu ? modrelu_b->contiguous() : at::Tensor();
  const int64_t B = pre.size(0), Hd = pre.size(1);
  if (B * Hd == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, pre.scalar_type(), "rnn_activation_cuda", [&] {
        const scalar_t* mbp = mb.defined() ? mb.const_data_ptr<scalar_t>() : nullptr;
        dispatch_nonlinearity(nl, [&](auto NL) {
          activation_kernel<NL.value, scalar_t><<<blocks_for(B * Hd), kThreads, 0, stream>>>(
              pre.const_data_ptr<scalar_t>(), pre.stride(0), mbp, h.mutable_data_ptr<scalar_t>(),
              h.stride(0), B, Hd);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

void rnn_activation_backward_cuda(const at::Tensor& grad_h_, const at::Tensor& h_,
                                  c10::string_view nonlinearity, const at::Tensor& grad_pre,
                                  const at::Tensor& grad_b) {
  const int nl = parse_nonlinearity(nonlinearity);
  check_activation_backward(grad_h_, h_, grad_pre, grad_b);
  const c10::cuda::CUDAGuard guard(grad_h_.device());
  const at::Tensor g = rows_of(grad_h_), h = rows_of(h_);
  const int64_t B = g.size(0), Hd = g.size(1);
  if (B * Hd == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, g.scalar_type(), "rnn_activation_backward_cuda", [&] {
        dispatch_nonlinearity(nl, [&](auto NL) {
          activation_backward_kernel<NL.value, scalar_t>
              <<<blocks_for(B * Hd), kThreads, 0, stream>>>(
                  g.const_data_ptr<scalar_t>(), g.stride(0), h.const_data_ptr<scalar_t>(),
                  h.stride(0), grad_pre.mutable_data_ptr<scalar_t>(), grad_pre.stride(0),
                  grad_b.mutable_data_ptr<scalar_t>(), B, Hd);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

void lstm_cell_cuda(const at::Tensor& gates, const at::Tensor& cell_prev_, const at::Tensor& cell,
                    const at::Tensor& h) {
  check_lstm_cell(gates, cell_prev_, cell, h);
  const c10::cuda::CUDAGuard guard(gates.device());
  const at::Tensor cp = rows_of(cell_prev_);
  const int64_t B = cell.size(0), Hd = cell.size(1);
  if (B * Hd == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gates.scalar_type(), "lstm_cell_cuda", [&] {
        lstm_cell_kernel<scalar_t><<<blocks_for(B * Hd), kThreads, 0, stream>>>(
            gates.mutable_data_ptr<scalar_t>(), gates.stride(0), cp.const_data_ptr<scalar_t>(),
            cp.stride(0), cell.mutable_data_ptr<scalar_t>(), cell.stride(0),
            h.mutable_data_ptr<scalar_t>(), h.stride(0), B, Hd);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void lstm_cell_backward_cuda(const at::Tensor& grad_h_, const at::Tensor& gates_,
                             const at::Tensor& cell_, const at::Tensor& cell_prev_,
                             const at::Tensor& grad_cell, const at::Tensor& grad_gates) {
  check_lstm_cell_backward(grad_h_, gates_, cell_, cell_prev_, grad_cell, grad_gates);
  const c10::cuda::CUDAGuard guard(grad_h_.device());
  const at::Tensor gh = rows_of(grad_h_), gates = rows_of(gates_), cell = rows_of(cell_);
  const at::Tensor cp = rows_of(cell_prev_);
  const int64_t B = gh.size(0), Hd = gh.size(1);
  if (B * Hd == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gh.scalar_type(), "lstm_cell_backward_cuda", [&] {
        lstm_cell_backward_kernel<scalar_t><<<blocks_for(B * Hd), kThreads, 0, stream>>>(
            gh.const_data_ptr<scalar_t>(), gh.stride(0), gates.const_data_ptr<scalar_t>(),
            gates.stride(0), cell.const_data_ptr<scalar_t>(), cell.stride(0),
            cp.const_data_ptr<scalar_t>(), cp.stride(0), grad_cell.mutable_data_ptr<scalar_t>(),
            grad_cell.stride(0), grad_gates.mutable_data_ptr<scalar_t>(), grad_gates.stride(0), B,
            Hd);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(screening_attn, CUDA, m) {
  m.impl("rnn_attend_step", &rnn_attend_step_cuda);
  m.impl("rnn_attend_step_backward", &rnn_attend_step_backward_cuda);
  m.impl("rnn_activation", &rnn_activation_cuda);
  m.impl("rnn_activation_backward", &rnn_activation_backward_cuda);
  m.impl("lstm_cell", &lstm_cell_cuda);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cuda);
}

}  // namespace screening_attn
