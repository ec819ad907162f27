// The relevancy-screening slot rule (docs/attention.md) and softmax helpers, shared by the CPU and
// CUDA kernels of screened attention and of the RelRNN/RelLSTM step.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/bit_cast.h>

#include <cmath>
#include <cstdint>

namespace screening_attn {

// Slot that key e (relevancy r_e) goes to, or -1 if e is dropped. Empty slots hold key < 0:
// the first empty slot wins whatever r_e is; otherwise the smallest stored score (lowest slot
// number on ties; a NaN score counts as smallest and, as r_e > NaN is false, is never replaced)
// is replaced only if r_e is strictly larger.
template <typename acc_t, typename index_t>
C10_HOST_DEVICE inline int screen_slot(const index_t* slot_key, const acc_t* slot_score, int rho,
                                       acc_t r_e) {
  int m = -1;
  for (int i = 0; i < rho; ++i) {
    if (slot_key[i] < 0) return i;
    const acc_t s = slot_score[i];
    if (m < 0 || (s != s && slot_score[m] == slot_score[m]) || s < slot_score[m]) m = i;
  }
  return (m >= 0 && r_e > slot_score[m]) ? m : -1;
}

// exp(x) for -87 <= x <= 88 in float (no range guard: the caller keeps x there), relative
// error < 1e-7, branch-free so that loops over it vectorize.
C10_HOST_DEVICE inline float exp_in_range(float x) {
  // n = round(x / ln2) by the 1.5 * 2^23 trick (no floor call: keeps the loop vectorizable).
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  // x - n ln2 in two parts (Cody-Waite) so the reduced argument stays accurate.
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t two_n = (static_cast<int32_t>(n) + 127) << 23;  // 2^n in the exponent bits
  return p * c10::bit_cast<float>(two_n);
}

C10_HOST_DEVICE inline double exp_in_range(double x) { return std::exp(x); }

// exp(x) for x <= 0 in float, relative error < 1e-7, branch-free so that loops over it
// vectorize (build with -fno-trapping-math so GCC may if-convert the selects). The scan's
// softmax calls it (window + relevant) times per query.
C10_HOST_DEVICE inline float exp_nonpositive(float x) {
  const bool tiny = x < -87.0f;  // exp(-87) ~ 1.6e-38: below it 2^n leaves the normal floats
  const float e = exp_in_range(tiny ? -87.0f : x);
  return tiny ? 0.0f : e;
}

C10_HOST_DEVICE inline double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace screening_attn
