"""The instance-norm family: ``ins_norm``, ``ins_bias_ada_relu`` (bottom-up InsNorm -> Bias ->
AdaReLU in one pass) and ``ins_norm_gate`` (top-down InsNorm -> AdaReLU feedback), each with its
``*_backward`` op. Fakes, autograd (double backward raises) and the Triton custom ops."""

from __future__ import annotations

from typing import Generic, NamedTuple

import torch
from torch import Tensor

from screening_attn import _backend
from screening_attn._library import Op, OpT, acc_dtype, no_double_backward


class NormOps(NamedTuple, Generic[OpT]):
    """One implementation's instance-norm family (C++ op overloads or Triton custom ops), or
    their fakes."""

    ins_norm: OpT
    ins_norm_backward: OpT
    ins_bias_ada_relu: OpT
    ins_bias_ada_relu_backward: OpT
    ins_norm_gate: OpT
    ins_norm_gate_backward: OpT


def contiguous_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)


def new_rstd(x: Tensor) -> Tensor:
    """The `(N, C)` reciprocal norms the forward ops return, in the accumulator dtype."""
    return x.new_empty((x.shape[0], x.shape[1]), dtype=acc_dtype(x.dtype))


def _fake_ins_norm(x: Tensor, eps: float, centered: bool) -> tuple[Tensor, Tensor]:
    return contiguous_like(x), new_rstd(x)


def _fake_ins_norm_backward(grad_y: Tensor, x: Tensor, rstd: Tensor, centered: bool) -> Tensor:
    return contiguous_like(x)


def _fake_ins_bias_ada_relu(
    x: Tensor, bias: Tensor | None, hidden: Tensor | None, eta: float, eps: float, centered: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return contiguous_like(x), contiguous_like(x, torch.bool), new_rstd(x)


def fake_ins_bias_ada_relu_backward(
    grad_y: Tensor,
    x: Tensor,
    mask: Tensor,
    rstd: Tensor,
    eta: float,
    gated: bool,
    has_bias: bool,
    centered: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Also the fake of the pooled stage's backward, which returns the same gradients."""
    gh = contiguous_like(x) if gated else x.new_empty((0,))
    return contiguous_like(x), gh, x.new_empty((x.shape[1] if has_bias else 0,))


def _fake_ins_norm_gate(
    z: Tensor, mask: Tensor, eps: float, centered: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return contiguous_like(z), contiguous_like(z), new_rstd(z)


def _fake_ins_norm_gate_backward(
    grad_zn: Tensor, grad_out: Tensor, z: Tensor, mask: Tensor, rstd: Tensor, centered: bool
) -> Tensor:
    return contiguous_like(z)


_FAKES = NormOps(
    _fake_ins_norm,
    _fake_ins_norm_backward,
    _fake_ins_bias_ada_relu,
    fake_ins_bias_ada_relu_backward,
    _fake_ins_norm_gate,
    _fake_ins_norm_gate_backward,
)


def _register_autograd(o: NormOps[Op]) -> None:
    """Autograd of one implementation's instance-norm family."""

    def setup_ins_norm(ctx, inputs, output):
        x, _, centered = inputs
        ctx.centered = centered
        ctx.save_for_backward(x, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def backward_ins_norm(ctx, grad_y, _grad_rstd):
        if grad_y is None:
            return None, None, None
        x, rstd = ctx.saved_tensors
        return o.ins_norm_backward(grad_y, x, rstd, ctx.centered), None, None

    def setup_ins_bias_ada_relu(ctx, inputs, output):
        x, bias, hidden, eta, _, centered = inputs
        ctx.eta, ctx.centered = eta, centered
        ctx.gated, ctx.has_bias = hidden is not None, bias is not None
        ctx.save_for_backward(x, output[1], output[2])
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)

    def backward_ins_bias_ada_relu(ctx, grad_y, _grad_mask, _grad_rstd):
        if grad_y is None:
            return None, None, None, None, None, None
        x, mask, rstd = ctx.saved_tensors
        gx, gh, gb = o.ins_bias_ada_relu_backward(
            grad_y, x, mask, rstd, ctx.eta, ctx.gated, ctx.has_bias, ctx.centered
        )
        return gx, gb if ctx.has_bias else None, gh if ctx.gated else None, None, None, None

    def setup_ins_norm_gate(ctx, inputs, output):
        z, mask, _, centered = inputs
        ctx.centered = centered
        ctx.save_for_backward(z, mask, output[2])
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)

    def backward_ins_norm_gate(ctx, grad_zn, grad_out, _grad_rstd):
        if grad_zn is None and grad_out is None:
            return None, None, None, None
        z, mask, rstd = ctx.saved_tensors
        if grad_zn is None or grad_out is None:  # one of the two was not used
            grad_zn, grad_out = (
                g if g is not None else torch.zeros_like(z) for g in (grad_zn, grad_out)
            )
        gz = o.ins_norm_gate_backward(grad_zn, grad_out, z, mask, rstd, ctx.centered)
        return gz, None, None, None

    torch.library.register_autograd(o.ins_norm, backward_ins_norm, setup_context=setup_ins_norm)
    torch.library.register_autograd(
        o.ins_bias_ada_relu, backward_ins_bias_ada_relu, setup_context=setup_ins_bias_ada_relu
    )
    torch.library.register_autograd(
        o.ins_norm_gate, backward_ins_norm_gate, setup_context=setup_ins_norm_gate
    )
    no_double_backward(o.ins_norm_backward, "ins_norm")
    no_double_backward(o.ins_bias_ada_relu_backward, "ins_bias_ada_relu")
    no_double_backward(o.ins_norm_gate_backward, "ins_norm_gate")


CPP: NormOps[Op] | None = None
TRITON: NormOps[Op] | None = None

if _backend.C_ERROR is None:
    CPP = NormOps(*(getattr(torch.ops.screening_attn, name).default for name in NormOps._fields))
    for _op, _fake in zip(CPP, _FAKES):
        torch.library.register_fake(_op)(_fake)
    _register_autograd(CPP)

if _backend.HAS_TRITON:

    @torch.library.custom_op("screening_attn::ins_norm_triton", mutates_args=())
    def ins_norm_triton(x: Tensor, eps: float, centered: bool) -> tuple[Tensor, Tensor]:
        from screening_attn._kernels import feedback as kernels

        return kernels.ins_norm(x, eps, centered)

    @torch.library.custom_op("screening_attn::ins_norm_backward_triton", mutates_args=())
    def ins_norm_backward_triton(grad_y: Tensor, x: Tensor, rstd: Tensor, centered: bool) -> Tensor:
        from screening_attn._kernels import feedback as kernels

        return kernels.ins_norm_backward(grad_y, x, rstd, centered)

    @torch.library.custom_op("screening_attn::ins_bias_ada_relu_triton", mutates_args=())
    def ins_bias_ada_relu_triton(
        x: Tensor,
        bias: Tensor | None,
        hidden: Tensor | None,
        eta: float,
        eps: float,
        centered: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        from screening_attn._kernels import feedback as kernels

        return kernels.ins_bias_ada_relu(x, bias, hidden, eta, eps, centered)

    @torch.library.custom_op("screening_attn::ins_bias_ada_relu_backward_triton", mutates_args=())
    def ins_bias_ada_relu_backward_triton(
        grad_y: Tensor,
        x: Tensor,
        mask: Tensor,
        rstd: Tensor,
        eta: float,
        gated: bool,
        has_bias: bool,
        centered: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        from screening_attn._kernels import feedback as kernels

        return kernels.ins_bias_ada_relu_backward(
            grad_y, x, mask, rstd, eta, gated, has_bias, centered
        )

    @torch.library.custom_op("screening_attn::ins_norm_gate_triton", mutates_args=())
    def ins_norm_gate_triton(
        z: Tensor, mask: Tensor, eps: float, centered: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        from screening_attn._kernels import feedback as kernels

        return kernels.ins_norm_gate(z, mask, eps, centered)

    @torch.library.custom_op("screening_attn::ins_norm_gate_backward_triton", mutates_args=())
    def ins_norm_gate_backward_triton(
        grad_zn: Tensor, grad_out: Tensor, z: Tensor, mask: Tensor, rstd: Tensor, centered: bool
    ) -> Tensor:
        from screening_attn._kernels import feedback as kernels

        return kernels.ins_norm_gate_backward(grad_zn, grad_out, z, mask, rstd, centered)

    TRITON = NormOps(
        ins_norm_triton,
        ins_norm_backward_triton,
        ins_bias_ada_relu_triton,
        ins_bias_ada_relu_backward_triton,
        ins_norm_gate_triton,
        ins_norm_gate_backward_triton,
    )
    for _op, _fake in zip(TRITON, _FAKES):
        torch.library.register_fake(_op)(_fake)
    _register_autograd(TRITON)
