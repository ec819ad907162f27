// Input checks for direct torch.ops callers (the Python API validates first, with more detail).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace screening_attn {

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), b_name, " must have the shape of ", a_name, " ",
                    a.sizes(), ", got ", b.sizes());
}

inline void check_same_dtype_device(const at::Tensor& a, const char* a_name,
                                    const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), b_name, " must have the dtype of ", a_name,
                   " (", a.scalar_type(), "), got ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), b_name, " must be on the device of ", a_name, " (",
                    a.device(), "), got ", b.device());
}

inline void check_mask(const at::Tensor& mask, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask must be a bool tensor, got ",
                   mask.scalar_type());
  check_same_shape(like, like_name, mask, "mask");
  TORCH_CHECK_VALUE(mask.device() == like.device(), "mask must be on the device of ", like_name);
}

// One helper per op, called by its CPU and its CUDA kernel.
inline void check_ada_relu(const at::Tensor& x, const std::optional<at::Tensor>& hidden) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ",
                   x.scalar_type());
  if (hidden.has_value()) {
    check_same_dtype_device(x, "x", *hidden, "hidden");
    check_same_shape(x, "x", *hidden, "hidden");
  }
}

inline void check_ada_relu_backward(const at::Tensor& grad, const at::Tensor& mask) {
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()),
                   "grad must be a floating-point tensor, got ", grad.scalar_type());
  check_mask(mask, grad, "grad");
}

}  // namespace screening_attn
