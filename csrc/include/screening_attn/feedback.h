// Elementwise and per-plane math of the CNN-F ops (docs/feedback.md), shared by the CPU and CUDA
// kernels. The Triton kernels (kernels/feedback.py) write the same formulas.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace screening_attn {

// The gate formulas below are written once for two kinds of `acc_t`: a scalar (CUDA, and the
// CPU's short planes), with bool conditions, and a GCC vector of lanes (the CPU's per-plane
// loops), where a comparison gives an integer vector of -1 / 0 (`M`). `zero + 1` and comparisons
// with a literal 0 broadcast for vectors and are plain arithmetic for scalars. They are always
// inlined: the CPU callers are compiled per ISA (target_clones), and a vector argument passed
// across a call would change ABI between them.
#define SCREENING_ATTN_LANEWISE C10_HOST_DEVICE inline __attribute__((always_inline))

// 1 or 0 as a number, written as a select: GCC vectorizes it, not a bool -> float conversion.
template <typename acc_t, typename M>
SCREENING_ATTN_LANEWISE acc_t as_number(M b) {
  const acc_t zero = acc_t();
  return b ? zero + 1 : zero;
}

// Gates

// AdaReLU: x' = x + eta (h - x), open where x' h > 0 (plain ReLU without feedback).
// y = x' * open, not `open ? x' : 0`, so a NaN input stays NaN as in the reference.
template <typename acc_t, typename M>
SCREENING_ATTN_LANEWISE acc_t ada_relu_value(acc_t x, acc_t h, acc_t eta, bool has_hidden,
                                             M* open) {
  const acc_t xr = has_hidden ? x + eta * (h - x) : x;
  *open = has_hidden ? xr * h > 0 : xr > 0;
  return xr * as_number<acc_t>(*open);
}

// z [open]: the gate's feedback pass, and the backward of the ungated forward.
template <typename acc_t, typename M>
SCREENING_ATTN_LANEWISE acc_t gate(acc_t z, M open) {
  return z * as_number<acc_t>(open);
}

// Backward of the gated AdaReLU: d/dx = (1 - eta) g [open], d/dh = eta g [open].
template <typename acc_t, typename M>
SCREENING_ATTN_LANEWISE void ada_relu_grad(acc_t g, M open, acc_t eta, acc_t* gx, acc_t* gh) {
  const acc_t gm = gate<acc_t>(g, open);
  *gx = gm * (1 - eta);
  *gh = gm * eta;
}

// Instance norm over one (n, c) plane of `count` elements.
// Forward: u = x r (+ bias), r = 1 / sqrt(power + eps), power = sum(x^2) / count, or with
// `centered` the unbiased variance sum((x - mean)^2) / (count - 1) (x itself is not shifted).

// What the norm kernels apply after u = x r (+ bias), a template argument of the CPU and CUDA
// kernels. The values are fixed: the Python IntEnum `Gate` of kernels/feedback.py mirrors them
// (the Triton kernels' GATE).
enum class Gate {
  kNone = 0,      // ins_norm: y = x r
  kReLU = 1,      // ins_bias_ada_relu without hidden: y = relu(x r + b)
  kAda = 2,       // ins_bias_ada_relu with hidden
  kFeedback = 3,  // ins_norm_gate: zn = x r, out = zn [mask]
};

template <typename acc_t>
C10_HOST_DEVICE inline acc_t ins_divisor(int64_t count, bool centered) {
  return static_cast<acc_t>(centered ? count - 1 : count);
}

// `power_sum` is sum(x^2), or sum((x - mean)^2) when centered.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t ins_rstd(acc_t power_sum, int64_t count, bool centered, acc_t eps) {
#if defined(__CUDA_ARCH__)
  return acc_t(1) / ::sqrt(power_sum / ins_divisor<acc_t>(count, centered) + eps);
#else
  return acc_t(1) / std::sqrt(power_sum / ins_divisor<acc_t>(count, centered) + eps);
#endif
}

// Backward: with gu = dL/du and S = sum(gu x) over the plane,
//   dL/dx = r gu - coef (x - mean),   coef = r^3 S / divisor,   mean = 0 unless centered
// (d r / d power = -r^3 / 2; d power / d x_i = 2 (x_i - mean) / divisor; the mean's own
// derivative drops out because sum(x - mean) = 0).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t ins_grad_coef(acc_t rstd, acc_t sum_gu_x, int64_t count,
                                           bool centered) {
  return rstd * rstd * rstd * sum_gu_x / ins_divisor<acc_t>(count, centered);
}

template <typename acc_t>
SCREENING_ATTN_LANEWISE acc_t ins_grad(acc_t gu, acc_t x, acc_t rstd, acc_t coef, acc_t mean) {
  return rstd * gu - coef * (x - mean);
}

// The bias gradient of channel c from the backward's per-plane sums of gu, `part` (N, C): summed
// over N in order, so that it does not depend on how the planes were split among threads.
template <typename acc_t, typename part_t>
C10_HOST_DEVICE inline acc_t bias_grad(const part_t* part, int64_t batch, int64_t channels,
                                       int64_t c) {
  acc_t s = 0;
  for (int64_t b = 0; b < batch; ++b) s += part[b * channels + c];
  return s;
}

// AdaPool (k x k windows, stride k)
// Windows are scanned in row-major order; a candidate replaces the best so far only if strictly
// better, so ties keep the first element. NaN beats any number (and the first NaN stays), as
// torch.argmax / argmin do. Positions are stored window-local: p = row * k + col, in a uint8.

template <typename acc_t>
C10_HOST_DEVICE inline bool pool_beats_max(acc_t v, acc_t best) {
  return v > best || (v != v && best == best);
}

template <typename acc_t>
C10_HOST_DEVICE inline bool pool_beats_min(acc_t v, acc_t best) {
  return v < best || (v != v && best == best);
}

// Offset of window position `pos` from the window's first element, in a plane of width `W`.
C10_HOST_DEVICE inline int64_t pool_offset(int pos, int k, int64_t width) {
  return (pos / k) * width + pos % k;
}

// Forward output: [h > 0] max + [h < 0] min (0 where h = 0), or the max before any feedback.
// Products, not selects, so that a NaN window stays NaN as in the reference.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t ada_pool_value(acc_t vmax, acc_t vmin, acc_t h, bool has_hidden) {
  return has_hidden ? vmax * as_number<acc_t>(h > acc_t(0)) + vmin * as_number<acc_t>(h < acc_t(0))
                    : vmax;
}

// Unpool (the feedback, and the forward's backward): the value at window position `pos` of
// unpool(z [h > 0], argmax) + unpool(z [h < 0], argmin), or of unpool(z, argmax) before any
// feedback.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t ada_unpool_value(acc_t z, acc_t h, bool has_hidden, int pos,
                                              int argmax, int argmin) {
  if (!has_hidden) return pos == argmax ? z : acc_t(0);
  const acc_t to_max = pos == argmax ? z * as_number<acc_t>(h > acc_t(0)) : acc_t(0);
  const acc_t to_min = pos == argmin ? z * as_number<acc_t>(h < acc_t(0)) : acc_t(0);
  return to_max + to_min;
}

// Gather (the unpool's backward): dL/dz = g[argmax] [h > 0] + g[argmin] [h < 0], or g[argmax].
template <typename acc_t>
C10_HOST_DEVICE inline acc_t ada_pool_gather_value(acc_t g_at_max, acc_t g_at_min, acc_t h,
                                                   bool has_hidden) {
  return has_hidden
             ? g_at_max * as_number<acc_t>(h > acc_t(0)) + g_at_min * as_number<acc_t>(h < acc_t(0))
             : g_at_max;
}

}  // namespace screening_attn
