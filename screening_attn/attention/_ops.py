"""Registration of screened attention's ops: fakes and autograd for the C++ ops
``torch.ops.screening_attn.screened_attention`` / ``screened_attention_backward`` (schemas in
csrc/attention.cpp, CPU kernel in csrc/cpu/attention.cpp), and the Triton ops
``screened_attention_triton`` / ``screened_attention_backward_triton``, stubs made here with
``torch.library.custom_op`` around the launchers of kernels/attention.py. Both forward ops
return ``(out, lse, relevant_index, relevant_score, relevancy, span)``."""

from __future__ import annotations

import torch
from torch import Tensor

from screening_attn import _backend
from screening_attn._library import acc_dtype as score_dtype
from screening_attn._library import no_double_backward
from screening_attn._validate import check_attention_inputs


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


def _fake_backward(grad_out, q, k, v, out, lse, span, window: int, scale: float, relevant=-1):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, window, relevant, scale = inputs
    out, lse, *_, span = output
    ctx.window, ctx.scale, ctx.relevant = window, scale, relevant
    ctx.save_for_backward(q, k, v, out, lse, span)
    ctx.set_materialize_grads(False)  # no zero tensors for the state outputs, never read


def _make_backward(backward_op, pass_relevant: bool = False):
    """Autograd backward of a forward op whose gradients come from ``backward_op``
    (``pass_relevant``: it also takes ρ, which sizes its buffers without a host sync)."""

    def backward(ctx, grad_out, *_side_outputs):
        # The state outputs carry no gradient (r is a statistic; the sets are piecewise constant).
        q, k, v, out, lse, span = ctx.saved_tensors
        if grad_out is None:  # only a state output was used: zero gradients, as before
            grad_out = torch.zeros_like(out)
        args = (grad_out, q, k, v, out, lse, span, ctx.window, ctx.scale)
        dq, dk, dv = backward_op(*args, *((ctx.relevant,) if pass_relevant else ()))
        return dq, dk, dv, None, None, None

    return backward


if _backend.C_ERROR is None:
    screened_attention_cpp = torch.ops.screening_attn.screened_attention.default
    screened_attention_backward_cpp = torch.ops.screening_attn.screened_attention_backward.default
    torch.library.register_fake(screened_attention_cpp)(_fake_forward)
    torch.library.register_fake(screened_attention_backward_cpp)(_fake_backward)
    torch.library.register_autograd(
        screened_attention_cpp,
        _make_backward(screened_attention_backward_cpp),
        setup_context=_setup_context,
    )
    no_double_backward(screened_attention_backward_cpp, "screened_attention")


if _backend.HAS_TRITON:
    # Stubs: the launchers (grid, block sizes, buffers) sit beside their kernels in
    # kernels/attention.py, imported on first call so that importing the package never
    # imports triton.

    @torch.library.custom_op("screening_attn::screened_attention_triton", mutates_args=())
    def screened_attention_triton(
        q: Tensor, k: Tensor, v: Tensor, window: int, relevant: int, scale: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        from screening_attn._kernels.attention import screened_attention_fwd

        check_attention_inputs(q, k, v, window, relevant, scale)
        return screened_attention_fwd(q, k, v, window, relevant, scale)

    @torch.library.custom_op("screening_attn::screened_attention_backward_triton", mutates_args=())
    def screened_attention_backward_triton(
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        span: Tensor,
        window: int,
        scale: float,
        relevant: int = -1,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # relevant: the forward's ρ; -1 (unknown) costs a host sync that reads it off `span`
        from screening_attn._kernels.attention import screened_attention_bwd

        check_attention_inputs(q, k, v, window, max(relevant, 0), scale)
        args = (grad_out, q, k, v, out, lse, span, window, scale)
        return screened_attention_bwd(*args, relevant=relevant)

    screened_attention_triton.register_fake(_fake_forward)
    screened_attention_backward_triton.register_fake(_fake_backward)
    torch.library.register_autograd(
        screened_attention_triton,
        _make_backward(screened_attention_backward_triton, pass_relevant=True),
        setup_context=_setup_context,
    )
    no_double_backward(screened_attention_backward_triton, "screened_attention")
