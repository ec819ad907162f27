// Elementwise math of the CNN-F gates (SPEC §3), shared by the CPU and CUDA kernels.
#pragma once

#include <c10/macros/Macros.h>

namespace screening_attn {

// AdaReLU: x' = x + eta (h - x), open where x' h > 0 (plain ReLU without feedback).
// y = x' * open, not `open ? x' : 0`, so a NaN input stays NaN as in the reference.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t ada_relu_value(acc_t x, acc_t h, acc_t eta, bool has_hidden,
                                            bool* open) {
  acc_t xr = has_hidden ? x + eta * (h - x) : x;
  *open = has_hidden ? xr * h > acc_t(0) : xr > acc_t(0);
  return xr * acc_t(*open);
}

// z [open]: the gate's feedback pass, and the backward of the ungated forward.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t gate(acc_t z, bool open) {
  return z * acc_t(open);
}

// Backward of the gated AdaReLU: d/dx = (1 - eta) g [open], d/dh = eta g [open].
template <typename acc_t>
C10_HOST_DEVICE inline void ada_relu_grad(acc_t g, bool open, acc_t eta, acc_t* gx, acc_t* gh) {
  acc_t gm = gate(g, open);
  *gx = gm * (acc_t(1) - eta);
  *gh = gm * eta;
}

}  // namespace screening_attn
