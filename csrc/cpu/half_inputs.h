// Half inputs (float16, bfloat16) of the CNN-F CPU kernels, computed in float32
// (docs/numerics.md): an op checks its arguments as given, converts its half tensors to float32,
// runs its float32 kernel and rounds its floating outputs once, to the input dtype; the
// statistics (rstd) stay float32. The conversions are ATen's vectorized copies, one extra pass
// over each half tensor: the per-plane kernels stay one code path per ISA.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace screening_attn {

inline bool is_half(const at::Tensor& t) {
  return t.defined() && (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16);
}

// t in float32 if it is half, else t itself (masks, positions, statistics, float32 and float64).
inline at::Tensor as_float(const at::Tensor& t) { return is_half(t) ? t.to(at::kFloat) : t; }

inline std::optional<at::Tensor> as_float(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(as_float(*t)) : std::nullopt;
}

}  // namespace screening_attn
