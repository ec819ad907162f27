"""The CPU stage fusions: ``ins_bias_ada_relu_pool2d`` (InsNorm -> Bias -> AdaReLU -> AdaPool
bottom-up) and ``ada_unpool_gate`` (AdaPool -> AdaReLU feedback top-down), C++ CPU kernels only
(functional.py composes the ops of the other modules elsewhere). Their backward ops are fused the
same way: the full-resolution intermediates of the composed backward (the unpooled gradient; the
gated gradient and its sum) stay in a per-plane scratch, never in memory."""

from __future__ import annotations

from typing import Generic, NamedTuple

import torch
from torch import Tensor

from screening_attn import _backend
from screening_attn._library import Op, OpT, no_double_backward
from screening_attn.feedback._ops.norms import (
    contiguous_like,
    fake_ins_bias_ada_relu_backward,
    new_rstd,
)
from screening_attn.feedback._ops.pools import pooled_shape


class StageOps(NamedTuple, Generic[OpT]):
    """The C++ stage fusions and their backward ops, or their fakes."""

    ins_bias_ada_relu_pool2d: OpT
    ins_bias_ada_relu_pool2d_backward: OpT
    ada_unpool_gate: OpT
    ada_unpool_gate_backward: OpT


def _fake_ins_bias_ada_relu_pool2d(
    x: Tensor,
    bias: Tensor | None,
    hidden: Tensor | None,
    pool_hidden: Tensor | None,
    eta: float,
    eps: float,
    centered: bool,
    kernel_size: int,
):
    shape = pooled_shape(x, kernel_size)
    positions = x.new_empty(shape, dtype=torch.uint8)
    mask = contiguous_like(x, torch.bool)
    return x.new_empty(shape), mask, new_rstd(x), positions, torch.empty_like(positions)


def _fake_ins_bias_ada_relu_pool2d_backward(
    grad_y: Tensor,
    x: Tensor,
    mask: Tensor,
    rstd: Tensor,
    pool_hidden: Tensor | None,
    argmax: Tensor,
    argmin: Tensor,
    eta: float,
    gated: bool,
    has_bias: bool,
    centered: bool,
    kernel_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return fake_ins_bias_ada_relu_backward(grad_y, x, mask, rstd, eta, gated, has_bias, centered)


def _fake_ada_unpool_gate(
    z: Tensor,
    hidden: Tensor | None,
    argmax: Tensor,
    argmin: Tensor,
    mask: Tensor,
    kernel_size: int,
    height: int,
    width: int,
) -> tuple[Tensor, Tensor]:
    full = (z.shape[0], z.shape[1], height, width)
    return z.new_empty(full), z.new_empty(full)


def _fake_ada_unpool_gate_backward(
    grad_u: Tensor | None,
    grad_out: Tensor | None,
    hidden: Tensor | None,
    argmax: Tensor,
    argmin: Tensor,
    mask: Tensor,
    kernel_size: int,
) -> Tensor:
    like = grad_u if grad_u is not None else grad_out
    assert like is not None  # the autograd formula never calls the op with neither gradient
    return like.new_empty(pooled_shape(like, kernel_size))


_FAKES = StageOps(
    _fake_ins_bias_ada_relu_pool2d,
    _fake_ins_bias_ada_relu_pool2d_backward,
    _fake_ada_unpool_gate,
    _fake_ada_unpool_gate_backward,
)


def _register_autograd(o: StageOps[Op]) -> None:
    def setup_norm_pool(ctx, inputs, output):
        x, bias, hidden, pool_hidden, eta, _, centered, k = inputs
        ctx.eta, ctx.centered, ctx.k = eta, centered, k
        ctx.gated, ctx.has_bias = hidden is not None, bias is not None
        _, mask, rstd, argmax, argmin = output
        ctx.save_for_backward(x, mask, rstd, pool_hidden, argmax, argmin)
        ctx.mark_non_differentiable(rstd)
        ctx.set_materialize_grads(False)

    def backward_norm_pool(ctx, grad_y, *_):
        if grad_y is None:
            return (None,) * 8
        x, mask, rstd, pool_hidden, argmax, argmin = ctx.saved_tensors
        gx, gh, gb = o.ins_bias_ada_relu_pool2d_backward(
            grad_y, x, mask, rstd, pool_hidden, argmax, argmin,
            ctx.eta, ctx.gated, ctx.has_bias, ctx.centered, ctx.k,
        )  # fmt: skip
        bias_grad, hidden_grad = gb if ctx.has_bias else None, gh if ctx.gated else None
        return gx, bias_grad, hidden_grad, None, None, None, None, None

    def setup_unpool_gate(ctx, inputs, output):
        _, hidden, argmax, argmin, mask, k, _, _ = inputs
        ctx.k = k
        ctx.save_for_backward(hidden, argmax, argmin, mask)
        ctx.set_materialize_grads(False)

    def backward_unpool_gate(ctx, grad_u, grad_out):
        if grad_u is None and grad_out is None:
            return (None,) * 8
        hidden, argmax, argmin, mask = ctx.saved_tensors
        gz = o.ada_unpool_gate_backward(grad_u, grad_out, hidden, argmax, argmin, mask, ctx.k)
        return gz, None, None, None, None, None, None, None

    # The unpool-gate backward is linear in (grad_u, grad_out); its adjoint is the forward
    # op: (unpool(g), unpool(g) [mask]).
    def setup_unpool_gate_bwd(ctx, inputs, output):
        grad_u, grad_out, hidden, argmax, argmin, mask, k = inputs
        ctx.k, ctx.size = k, tuple((grad_u if grad_u is not None else grad_out).shape[2:])
        ctx.wants = (grad_u is not None, grad_out is not None)
        ctx.save_for_backward(hidden, argmax, argmin, mask)
        ctx.set_materialize_grads(False)

    def backward_unpool_gate_bwd(ctx, gg):
        if gg is None:
            return (None,) * 7
        hidden, argmax, argmin, mask = ctx.saved_tensors
        u, out = o.ada_unpool_gate(gg, hidden, argmax, argmin, mask, ctx.k, *ctx.size)
        return (u if ctx.wants[0] else None, out if ctx.wants[1] else None) + (None,) * 5

    torch.library.register_autograd(
        o.ins_bias_ada_relu_pool2d, backward_norm_pool, setup_context=setup_norm_pool
    )
    torch.library.register_autograd(
        o.ada_unpool_gate, backward_unpool_gate, setup_context=setup_unpool_gate
    )
    torch.library.register_autograd(
        o.ada_unpool_gate_backward, backward_unpool_gate_bwd, setup_context=setup_unpool_gate_bwd
    )
    no_double_backward(o.ins_bias_ada_relu_pool2d_backward, "ins_bias_ada_relu_pool2d")


CPP: StageOps[Op] | None = None

if _backend.C_ERROR is None:
    CPP = StageOps(*(getattr(torch.ops.screening_attn, name).default for name in StageOps._fields))
    for _op, _fake in zip(CPP, _FAKES):
        torch.library.register_fake(_op)(_fake)
    _register_autograd(CPP)
