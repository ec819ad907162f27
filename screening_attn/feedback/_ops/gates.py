"""The AdaReLU gate ops: ``ada_relu``, ``ada_relu_backward``, ``ada_relu_feedback``. Fakes,
autograd (linear in the gradient, so double backward works) and the Triton custom ops."""

from __future__ import annotations

from typing import Generic, NamedTuple

import torch
from torch import Tensor

from screening_attn import _backend
from screening_attn._library import Op, OpT


class GateOps(NamedTuple, Generic[OpT]):
    """One implementation's gate ops (C++ op overloads or Triton custom ops), or their fakes."""

    ada_relu: OpT
    ada_relu_backward: OpT
    ada_relu_feedback: OpT


def _fake_ada_relu(x: Tensor, hidden: Tensor | None, eta: float) -> tuple[Tensor, Tensor]:
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y, dtype=torch.bool)


def _fake_ada_relu_backward(grad_y: Tensor, mask: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    gx = torch.empty_like(grad_y, memory_format=torch.contiguous_format)
    return gx, torch.empty_like(gx)


def _fake_ada_relu_feedback(z: Tensor, mask: Tensor) -> Tensor:
    return torch.empty_like(z, memory_format=torch.contiguous_format)


_FAKES = GateOps(_fake_ada_relu, _fake_ada_relu_backward, _fake_ada_relu_feedback)


def _register_autograd(o: GateOps[Op]) -> None:
    """Autograd of one implementation's three ops."""

    def setup_fwd(ctx, inputs, output):
        _, hidden, eta = inputs
        ctx.eta, ctx.gated = eta, hidden is not None
        ctx.save_for_backward(output[1])
        # No zero-filled gradient for the mask (nor, in the other modules, for rstd or the pool
        # positions): autograd would allocate and zero one per call for outputs that carry none.
        ctx.set_materialize_grads(False)

    def backward_fwd(ctx, grad_y, _grad_mask):
        if grad_y is None:  # undefined (not materialized): no gradient
            return None, None, None
        (mask,) = ctx.saved_tensors
        if not ctx.gated:
            return o.ada_relu_feedback(grad_y, mask), None, None
        grad_x, grad_hidden = o.ada_relu_backward(grad_y, mask, ctx.eta)
        return grad_x, grad_hidden, None

    def setup_bwd(ctx, inputs, output):
        ctx.eta = inputs[2]
        ctx.save_for_backward(inputs[1])

    def backward_bwd(ctx, gg_x, gg_hidden):
        # grad_x = (1-eta) g [mask], grad_hidden = eta g [mask]: linear in g.
        (mask,) = ctx.saved_tensors
        gg = (1.0 - ctx.eta) * gg_x + ctx.eta * gg_hidden
        return o.ada_relu_feedback(gg, mask), None, None

    def setup_feedback(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def backward_feedback(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        return o.ada_relu_feedback(grad_out, mask), None

    torch.library.register_autograd(o.ada_relu, backward_fwd, setup_context=setup_fwd)
    torch.library.register_autograd(o.ada_relu_backward, backward_bwd, setup_context=setup_bwd)
    torch.library.register_autograd(
        o.ada_relu_feedback, backward_feedback, setup_context=setup_feedback
    )


CPP: GateOps[Op] | None = None
TRITON: GateOps[Op] | None = None

if _backend.C_ERROR is None:
    CPP = GateOps(*(getattr(torch.ops.screening_attn, name).default for name in GateOps._fields))
    for _op, _fake in zip(CPP, _FAKES):
        torch.library.register_fake(_op)(_fake)
    _register_autograd(CPP)

if _backend.HAS_TRITON:

    @torch.library.custom_op("screening_attn::ada_relu_triton", mutates_args=())
    def ada_relu_triton(x: Tensor, hidden: Tensor | None, eta: float) -> tuple[Tensor, Tensor]:
        from screening_attn._kernels import feedback as kernels

        return kernels.ada_relu(x, hidden, eta)

    @torch.library.custom_op("screening_attn::ada_relu_backward_triton", mutates_args=())
    def ada_relu_backward_triton(grad_y: Tensor, mask: Tensor, eta: float) -> tuple[Tensor, Tensor]:
        from screening_attn._kernels import feedback as kernels

        return kernels.ada_relu_backward(grad_y, mask, eta)

    @torch.library.custom_op("screening_attn::ada_relu_feedback_triton", mutates_args=())
    def ada_relu_feedback_triton(z: Tensor, mask: Tensor) -> Tensor:
        from screening_attn._kernels import feedback as kernels

        return kernels.ada_relu_feedback(z, mask)

    TRITON = GateOps(ada_relu_triton, ada_relu_backward_triton, ada_relu_feedback_triton)
    for _op, _fake in zip(TRITON, _FAKES):
        torch.library.register_fake(_op)(_fake)
    _register_autograd(TRITON)
