"""Registration glue of screened attention: fakes and autograd for the C++ ops
``torch.ops.screening_attn.screened_attention`` / ``screened_attention_backward`` (schemas in
csrc/attention.cpp, CPU kernel in csrc/cpu/attention.cpp)."""

from __future__ import annotations

import torch
from torch import Tensor

from screening_attn import _backend


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and relevancy: float64 for float64 inputs, else float32 (SPEC §1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(q: Tensor, k: Tensor, v: Tensor, window: int, relevant: int, scale: float):
    B, H, T, _ = q.shape
    acc = score_dtype(q.dtype)
    return (
        q.new_empty(B, H, T, v.shape[-1]),
        q.new_empty(B, H, T, dtype=acc),
        q.new_empty(B, H, relevant, dtype=torch.int64),
        q.new_empty(B, H, relevant, dtype=acc),
        q.new_empty(B, H, T, dtype=acc),
        q.new_empty(B, H, T, 2, dtype=torch.int32),
    )


def _fake_backward(grad_out, q, k, v, out, lse, span, window: int, scale: float):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, window, _, scale = inputs
    out, lse, *_, span = output
    ctx.window, ctx.scale = window, scale
    ctx.save_for_backward(q, k, v, out, lse, span)


def _backward(ctx, grad_out, *_side_outputs):
    # The state outputs carry no gradient (r is a statistic; the sets are piecewise constant).
    q, k, v, out, lse, span = ctx.saved_tensors
    dq, dk, dv = screened_attention_backward_cpp(
        grad_out, q, k, v, out, lse, span, ctx.window, ctx.scale
    )
    return dq, dk, dv, None, None, None


def _nothing_to_save(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "screened_attention: double backward is not implemented (the backward op is not "
        "differentiable); use backend='reference' for higher-order gradients"
    )


if _backend.C_ERROR is None:
    screened_attention_cpp = torch.ops.screening_attn.screened_attention.default
    screened_attention_backward_cpp = torch.ops.screening_attn.screened_attention_backward.default
    torch.library.register_fake(screened_attention_cpp)(_fake_forward)
    torch.library.register_fake(screened_attention_backward_cpp)(_fake_backward)
    torch.library.register_autograd(screened_attention_cpp, _backward, setup_context=_setup_context)
    torch.library.register_autograd(
        screened_attention_backward_cpp, _no_double_backward, setup_context=_nothing_to_save
    )
