// Input checks for direct torch.ops callers (the Python API validates first, with more detail).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

namespace screening_attn {

// The dtype of the kernels' statistics and softmax weights (rstd, alpha, relevancy): float64 for
// float64 inputs, else float32 (half and bfloat16 compute in float), as _library.acc_dtype.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), b_name, " must have the shape of ", a_name, " ",
                    a.sizes(), ", got ", b.sizes());
}

inline void check_same_dtype_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                                    const char* b_name) {
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

inline void check_floating_4d(const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), name,
                   " must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4, name, " must be 4-d (N, C, H, W), got shape ", x.sizes());
}

// The instance norm's plane: H W >= 1, and >= 2 for the unbiased variance.
inline void check_ins_norm(const at::Tensor& x, const char* name, bool centered) {
  check_floating_4d(x, name);
  TORCH_CHECK_VALUE(!centered || x.size(2) * x.size(3) >= 2, name,
                    " needs at least 2 elements in H x W for centered=True, got shape ", x.sizes());
}

inline void check_ins_bias_ada_relu(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& hidden, bool centered) {
  check_ins_norm(x, "x", centered);
  if (bias.has_value()) {
    check_same_dtype_device(x, "x", *bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == x.size(1),
                      "bias must have shape (C,) = (", x.size(1), ",), got ", bias->sizes());
  }
  if (hidden.has_value()) {
    check_same_dtype_device(x, "x", *hidden, "hidden");
    check_same_shape(x, "x", *hidden, "hidden");
  }
}

// rstd: one value per (n, c) plane of `like`, in the accumulation type (double for double).
inline void check_rstd(const at::Tensor& rstd, const at::Tensor& like) {
  const auto acc = acc_type(like.scalar_type());
  TORCH_CHECK_TYPE(rstd.scalar_type() == acc, "rstd must be ", acc, ", got ", rstd.scalar_type());
  TORCH_CHECK_VALUE(rstd.dim() == 2 && rstd.size(0) == like.size(0) && rstd.size(1) == like.size(1),
                    "rstd must have shape (N, C) = (", like.size(0), ", ", like.size(1), "), got ",
                    rstd.sizes());
  TORCH_CHECK_VALUE(rstd.device() == like.device(), "rstd must be on the device of x");
}

inline void check_ins_backward(const at::Tensor& grad, const char* grad_name, const at::Tensor& x,
                               const at::Tensor& rstd, bool centered) {
  check_ins_norm(x, "x", centered);
  check_same_dtype_device(x, "x", grad, grad_name);
  check_same_shape(x, "x", grad, grad_name);
  check_rstd(rstd, x);
}

// ins_norm_gate's backward: both output gradients shaped like z, the forward's mask.
inline void check_ins_norm_gate_backward(const at::Tensor& grad_zn, const at::Tensor& grad_out,
                                         const at::Tensor& z, const at::Tensor& mask,
                                         const at::Tensor& rstd, bool centered) {
  check_ins_backward(grad_zn, "grad_zn", z, rstd, centered);
  check_same_dtype_device(z, "x", grad_out, "grad_out");
  check_same_shape(z, "x", grad_out, "grad_out");
  check_mask(mask, z, "x");
}

// AdaPool: k x k windows, stride k; positions are window-local uint8, so k * k <= 256.
inline void check_pool_kernel_size(int64_t k) {
  TORCH_CHECK_VALUE(k >= 1 && k <= 16, "kernel_size must be in [1, 16], got ", k);
}

inline void check_pool_hidden(const std::optional<at::Tensor>& hidden, const at::Tensor& like,
                              const char* like_name, at::IntArrayRef pooled) {
  if (!hidden.has_value()) return;
  check_same_dtype_device(like, like_name, *hidden, "hidden");
  TORCH_CHECK_VALUE(hidden->sizes() == pooled, "hidden must have the pooled shape ", pooled,
                    ", got ", hidden->sizes());
}

inline void check_pool_positions(const at::Tensor& pos, const char* name, const at::Tensor& like,
                                 const char* like_name, at::IntArrayRef pooled) {
  TORCH_CHECK_TYPE(pos.scalar_type() == at::kByte, name, " must be a uint8 tensor, got ",
                   pos.scalar_type());
  TORCH_CHECK_VALUE(pos.sizes() == pooled, name, " must have the pooled shape ", pooled, ", got ",
                    pos.sizes());
  TORCH_CHECK_VALUE(pos.device() == like.device(), name, " must be on the device of ", like_name);
}

inline void check_ada_pool2d(const at::Tensor& x, const std::optional<at::Tensor>& hidden,
                             int64_t k) {
  check_floating_4d(x, "x");
  check_pool_kernel_size(k);
  TORCH_CHECK_VALUE(x.size(2) >= k && x.size(3) >= k, "x must be at least ", k, "x", k,
                    " (kernel_size) in H and W, got shape ", x.sizes());
  check_pool_hidden(hidden, x, "x", {x.size(0), x.size(1), x.size(2) / k, x.size(3) / k});
}

// z: pooled (N, C, Ho, Wo); the plane it unpools to is height x width, Ho = height / k.
inline void check_ada_unpool2d(const at::Tensor& z, const char* z_name,
                               const std::optional<at::Tensor>& hidden, const at::Tensor& argmax,
                               const at::Tensor& argmin, int64_t k, int64_t height, int64_t width) {
  check_floating_4d(z, z_name);
  check_pool_kernel_size(k);
  TORCH_CHECK_VALUE(height / k == z.size(2) && width / k == z.size(3), z_name, " of shape ",
                    z.sizes(), " is not the ", k, "x", k, " pooling of a ", height, "x", width,
                    " plane");
  check_pool_hidden(hidden, z, z_name, z.sizes());
  check_pool_positions(argmax, "argmax", z, z_name, z.sizes());
  check_pool_positions(argmin, "argmin", z, z_name, z.sizes());
}

// The gather (the unpool's backward) from a full-resolution `grad`: returns the pooled shape.
inline std::vector<int64_t> check_ada_pool2d_gather(const at::Tensor& grad, const char* grad_name,
                                                    const std::optional<at::Tensor>& hidden,
                                                    const at::Tensor& argmax,
                                                    const at::Tensor& argmin, int64_t k) {
  check_floating_4d(grad, grad_name);
  check_pool_kernel_size(k);
  const std::vector<int64_t> pooled{grad.size(0), grad.size(1), grad.size(2) / k, grad.size(3) / k};
  check_pool_hidden(hidden, grad, grad_name, pooled);
  check_pool_positions(argmax, "argmax", grad, grad_name, pooled);
  check_pool_positions(argmin, "argmin", grad, grad_name, pooled);
  return pooled;
}

}  // namespace screening_attn
