// Input checks of the RelRNN / RelLSTM step ops (schemas in csrc/rnn.cpp), one helper per op,
// called by the CPU and the CUDA kernel, and the host-side helpers they share (parse_nonlinearity,
// rows_of). The sequence ops build their arguments themselves; these checks are for direct
// torch.ops callers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string_view>
#include <tuple>

#include "screening_attn/checks.h"
#include "screening_attn/rnn.h"

namespace screening_attn {

// True while the sequence ops' time loops (csrc/rnn_loops.cpp) call the step ops: they own the
// slot state (only the step kernel writes it), so the CUDA step skips its host-side validation,
// a device sync per step. Thread-local: autograd may run the backward loop on another thread.
inline thread_local bool slots_from_loop = false;

class SlotsFromLoop {  // sets slots_from_loop for its scope
 public:
  SlotsFromLoop() : prev_(slots_from_loop) { slots_from_loop = true; }
  ~SlotsFromLoop() { slots_from_loop = prev_; }
  SlotsFromLoop(const SlotsFromLoop&) = delete;
  SlotsFromLoop& operator=(const SlotsFromLoop&) = delete;

 private:
  bool prev_;
};

// The Nonlinearity of an activation's name (the ops take the name).
inline int parse_nonlinearity(std::string_view name) {
  if (name == "tanh") return kTanh;
  if (name == "relu") return kRelu;
  if (name == "sigmoid") return kSigmoid;
  if (name == "identity") return kIdentity;
  if (name == "modrelu") return kModRelu;
  C10_THROW_ERROR(ValueError, c10::str("nonlinearity must be one of ('tanh', 'relu', 'sigmoid', "
                                       "'identity', 'modrelu'), got '",
                                       name, "'"));
}

// A read-only (rows, cols) input as the kernels take it: any row stride, unit stride within a
// row (copied only if it has not).
inline at::Tensor rows_of(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// A (rows, cols) tensor whose rows may be strided but whose elements within a row are not.
inline void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name,
                    " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK_VALUE(cols <= 1 || t.stride(1) == 1, name,
                    " must be contiguous along its last dimension, got strides ", t.strides());
}

inline void check_dtype_device(const at::Tensor& t, const char* name, at::ScalarType dtype,
                               const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on the device of query (",
                    like.device(), "), got ", t.device());
}

// hidden and uah: (T', B, Hd) with T' >= t; v: Hd elements.
inline void check_memory(const at::Tensor& query, const at::Tensor& hidden, const at::Tensor& uah,
                         const at::Tensor& v, int64_t t) {
  TORCH_CHECK_TYPE(at::isFloatingType(query.scalar_type()),
                   "query must be a floating-point tensor, got ", query.scalar_type());
  TORCH_CHECK_VALUE(query.dim() == 2, "query must be 2-d (B, Hd), got ", query.sizes());
  const int64_t B = query.size(0), Hd = query.size(1);
  TORCH_CHECK_VALUE(t >= 1, "t must be >= 1 (step 0 does not attend), got ", t);
  TORCH_CHECK_VALUE(
      hidden.dim() == 3 && hidden.size(0) >= t && hidden.size(1) == B && hidden.size(2) == Hd,
      "hidden must have shape (T >= t, B, Hd) = (>= ", t, ", ", B, ", ", Hd, "), got ",
      hidden.sizes());
  check_same_shape(hidden, "hidden", uah, "uah");
  check_same_dtype_device(query, "query", hidden, "hidden");
  check_same_dtype_device(query, "query", uah, "uah");
  check_same_dtype_device(query, "query", v, "v");
  TORCH_CHECK_VALUE(v.numel() == Hd, "v must have Hd = ", Hd, " elements, got shape ", v.sizes());
}

inline void check_attend_step(const at::Tensor& query, const at::Tensor& hidden,
                              const at::Tensor& uah, const at::Tensor& v,
                              const at::Tensor& slot_index, const at::Tensor& slot_score,
                              const at::Tensor& relevancy, const at::Tensor& s,
                              const at::Tensor& alpha, const at::Tensor& cand, int64_t t,
                              int64_t window) {
  check_memory(query, hidden, uah, v, t);
  TORCH_CHECK_VALUE(window >= 1, "window must be >= 1, got ", window);
  const int64_t B = query.size(0), Hd = query.size(1);
  const at::ScalarType acc = acc_type(query.scalar_type());
  TORCH_CHECK_VALUE(slot_index.dim() == 2 && slot_index.size(0) == B,
                    "slot_index must have shape (B, relevant) with B = ", B, ", got ",
                    slot_index.sizes());
  const int64_t rho = slot_index.size(1);
  check_dtype_device(slot_index, "slot_index", at::kLong, query);
  check_dtype_device(slot_score, "slot_score", acc, query);
  check_dtype_device(relevancy, "relevancy", acc, query);
  check_dtype_device(s, "s", query.scalar_type(), query);
  check_dtype_device(alpha, "alpha", acc, query);
  check_dtype_device(cand, "cand", at::kLong, query);
  check_same_shape(slot_index, "slot_index", slot_score, "slot_score");
  TORCH_CHECK_VALUE(slot_index.is_contiguous() && slot_score.is_contiguous(),
                    "slot_index and slot_score must be contiguous");
  TORCH_CHECK_VALUE(relevancy.dim() == 2 && relevancy.size(0) >= t && relevancy.size(1) == B &&
                        relevancy.is_contiguous(),
                    "relevancy must be a contiguous (T >= t, B) tensor, got shape ",
                    relevancy.sizes());
  check_rows(s, "s", B, Hd);
  check_rows(alpha, "alpha", B, window + rho);
  check_rows(cand, "cand", B, rho);
}

inline void check_attend_step_backward(const at::Tensor& grad_s, const at::Tensor& query,
                                       const at::Tensor& hidden, const at::Tensor& uah,
                                       const at::Tensor& v, const at::Tensor& alpha,
                                       const at::Tensor& cand, const at::Tensor& grad_hidden,
                                       const at::Tensor& grad_uah, const at::Tensor& grad_v,
                                       const at::Tensor& grad_query, int64_t t, int64_t window) {
  check_memory(query, hidden, uah, v, t);
  TORCH_CHECK_VALUE(window >= 1, "window must be >= 1, got ", window);
  const int64_t B = query.size(0), Hd = query.size(1);
  check_same_dtype_device(query, "query", grad_s, "grad_s");
  check_same_shape(query, "query", grad_s, "grad_s");
  check_dtype_device(alpha, "alpha", acc_type(query.scalar_type()), query);
  check_dtype_device(cand, "cand", at::kLong, query);
  TORCH_CHECK_VALUE(cand.dim() == 2 && cand.size(0) == B,
                    "cand must have shape (B, relevant) with B = ", B, ", got ", cand.sizes());
  const int64_t rho = cand.size(1);
  TORCH_CHECK_VALUE(alpha.dim() == 2 && alpha.size(0) == B && alpha.size(1) == window + rho,
                    "alpha must have shape (B, window + relevant) = (", B, ", ", window + rho,
                    "), got ", alpha.sizes());
  check_same_shape(hidden, "hidden", grad_hidden, "grad_hidden");
  check_same_shape(hidden, "hidden", grad_uah, "grad_uah");
  check_same_dtype_device(query, "query", grad_hidden, "grad_hidden");
  check_same_dtype_device(query, "query", grad_uah, "grad_uah");
  check_same_dtype_device(query, "query", grad_v, "grad_v");
  check_same_dtype_device(query, "query", grad_query, "grad_query");
  TORCH_CHECK_VALUE(grad_hidden.is_contiguous() && grad_uah.is_contiguous(),
                    "grad_hidden and grad_uah must be contiguous");
  TORCH_CHECK_VALUE(
      grad_v.is_contiguous() && grad_v.dim() == 2 && grad_v.size(0) == B && grad_v.size(1) == Hd,
      "grad_v must be a contiguous (B, Hd) tensor, got shape ", grad_v.sizes());
  check_rows(grad_query, "grad_query", B, Hd);
}

// key_exp = e^{2 uah} (rnn_key_exp; the step ops' optional cache): uah's shape, dtype and device,
// contiguous.
inline void check_key_exp(const at::Tensor& uah, const at::Tensor& key_exp) {
  TORCH_CHECK_TYPE(at::isFloatingType(uah.scalar_type()),
                   "uah must be a floating-point tensor, got ", uah.scalar_type());
  TORCH_CHECK_VALUE(uah.dim() >= 1, "uah must have shape (..., Hd), got a 0-d tensor");
  check_same_shape(uah, "uah", key_exp, "key_exp");
  check_same_dtype_device(uah, "uah", key_exp, "key_exp");
  TORCH_CHECK_VALUE(key_exp.is_contiguous(), "key_exp must be contiguous");
}

inline void check_key_exp_arg(const std::optional<at::Tensor>& key_exp, const at::Tensor& uah) {
  if (key_exp) check_key_exp(uah, *key_exp);
}

// Elementwise step ops: every tensor in `rows` is (B, width) with the dtype and device of the
// first one, which sets B.
inline int64_t check_elementwise(
    std::initializer_list<std::tuple<const at::Tensor*, const char*, int64_t>> rows) {
  const auto& [first, first_name, _] = *rows.begin();
  TORCH_CHECK_TYPE(at::isFloatingType(first->scalar_type()), first_name,
                   " must be a floating-point tensor, got ", first->scalar_type());
  TORCH_CHECK_VALUE(first->dim() == 2, first_name, " must be 2-d, got shape ", first->sizes());
  const int64_t B = first->size(0);
  for (const auto& [t, name, width] : rows) {
    check_same_dtype_device(*first, first_name, *t, name);
    check_rows(*t, name, B, width);
  }
  return B;
}

// modrelu_b: Hd elements, required for modrelu.
inline void check_modrelu_b(const at::Tensor& like, const std::optional<at::Tensor>& modrelu_b,
                            int nonlinearity, int64_t Hd) {
  TORCH_CHECK_VALUE(nonlinearity != kModRelu || modrelu_b.has_value(),
                    "nonlinearity 'modrelu' needs modrelu_b, got None");
  if (modrelu_b.has_value()) {
    check_same_dtype_device(like, "the activation's inputs", *modrelu_b, "modrelu_b");
    TORCH_CHECK_VALUE(modrelu_b->numel() == Hd, "modrelu_b must have Hd = ", Hd,
                      " elements, got shape ", modrelu_b->sizes());
  }
}

// h = φ(pre): both (B, Hd).
inline void check_activation(const at::Tensor& pre, const std::optional<at::Tensor>& modrelu_b,
                             int nonlinearity, const at::Tensor& h) {
  const int64_t Hd = pre.dim() == 2 ? pre.size(1) : 0;
  check_elementwise({{&pre, "pre", Hd}, {&h, "h", Hd}});
  check_modrelu_b(pre, modrelu_b, nonlinearity, Hd);
}

inline void check_activation_backward(const at::Tensor& grad_h, const at::Tensor& h,
                                      const at::Tensor& grad_pre, const at::Tensor& grad_b) {
  const int64_t Hd = grad_h.dim() == 2 ? grad_h.size(1) : 0;
  check_elementwise({{&grad_h, "grad_h", Hd},
                     {&h, "h", Hd},
                     {&grad_pre, "grad_pre", Hd},
                     {&grad_b, "grad_b", Hd}});
  TORCH_CHECK_VALUE(grad_b.is_contiguous(), "grad_b must be contiguous");
}

// gates: (B, 4 Hd) rows of [f | i | o | g]; cell_prev, cell, h: (B, Hd).
inline void check_lstm_cell(const at::Tensor& gates, const at::Tensor& cell_prev,
                            const at::Tensor& cell, const at::Tensor& h) {
  const int64_t Hd = cell.dim() == 2 ? cell.size(1) : 0;
  check_elementwise({{&gates, "gates", 4 * Hd},
                     {&cell_prev, "cell_prev", Hd},
                     {&cell, "cell", Hd},
                     {&h, "h", Hd}});
}

inline void check_lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& gates,
                                     const at::Tensor& cell, const at::Tensor& cell_prev,
                                     const at::Tensor& grad_cell, const at::Tensor& grad_gates) {
  const int64_t Hd = grad_h.dim() == 2 ? grad_h.size(1) : 0;
  check_elementwise({{&grad_h, "grad_h", Hd},
                     {&gates, "gates", 4 * Hd},
                     {&cell, "cell", Hd},
                     {&cell_prev, "cell_prev", Hd},
                     {&grad_cell, "grad_cell", Hd},
                     {&grad_gates, "grad_gates", 4 * Hd}});
}

}  // namespace screening_attn
