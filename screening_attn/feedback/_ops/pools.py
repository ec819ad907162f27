"""AdaPool: ``ada_pool2d``, ``ada_unpool2d`` (its feedback and its backward) and
``ada_pool2d_gather`` (the unpool's backward). Fakes, autograd (each op is the others' backward,
so any order of derivatives works) and the Triton custom ops."""

from __future__ import annotations

from typing import Generic, NamedTuple

import torch
from torch import Tensor

from screening_attn import _backend
from screening_attn._library import Op, OpT


class PoolOps(NamedTuple, Generic[OpT]):
    """One implementation's AdaPool ops (C++ op overloads or Triton custom ops), or their fakes."""

    ada_pool2d: OpT
    ada_unpool2d: OpT
    ada_pool2d_gather: OpT


def pooled_shape(x: Tensor, k: int) -> tuple[int, int, int, int]:
    return (x.shape[0], x.shape[1], x.shape[2] // k, x.shape[3] // k)


def _fake_ada_pool2d(x: Tensor, hidden: Tensor | None, kernel_size: int):
    shape = pooled_shape(x, kernel_size)
    positions = x.new_empty(shape, dtype=torch.uint8)
    return x.new_empty(shape), positions, torch.empty_like(positions)


def _fake_ada_unpool2d(
    z: Tensor,
    hidden: Tensor | None,
    argmax: Tensor,
    argmin: Tensor,
    kernel_size: int,
    height: int,
    width: int,
) -> Tensor:
    return z.new_empty((z.shape[0], z.shape[1], height, width))


def _fake_ada_pool2d_gather(
    grad: Tensor, hidden: Tensor | None, argmax: Tensor, argmin: Tensor, kernel_size: int
) -> Tensor:
    return grad.new_empty(pooled_shape(grad, kernel_size))


_FAKES = PoolOps(_fake_ada_pool2d, _fake_ada_unpool2d, _fake_ada_pool2d_gather)


def _register_autograd(o: PoolOps[Op]) -> None:
    """Autograd of one implementation's AdaPool ops. The gates come from ``hidden``'s signs,
    piecewise constant: ``hidden`` gets no gradient."""

    def setup_pool(ctx, inputs, output):
        x, hidden, k = inputs
        ctx.k, ctx.size = k, (x.shape[2], x.shape[3])
        ctx.save_for_backward(hidden, output[1], output[2])
        ctx.set_materialize_grads(False)

    def backward_pool(ctx, grad_y, _grad_argmax, _grad_argmin):
        if grad_y is None:
            return None, None, None
        hidden, argmax, argmin = ctx.saved_tensors
        return o.ada_unpool2d(grad_y, hidden, argmax, argmin, ctx.k, *ctx.size), None, None

    def setup_unpool(ctx, inputs, output):
        _, hidden, argmax, argmin, k, _, _ = inputs
        ctx.k = k
        ctx.save_for_backward(hidden, argmax, argmin)

    def backward_unpool(ctx, grad_out):
        hidden, argmax, argmin = ctx.saved_tensors
        gz = o.ada_pool2d_gather(grad_out, hidden, argmax, argmin, ctx.k)
        return gz, None, None, None, None, None, None

    def setup_gather(ctx, inputs, output):
        grad, hidden, argmax, argmin, k = inputs
        ctx.k, ctx.size = k, (grad.shape[2], grad.shape[3])
        ctx.save_for_backward(hidden, argmax, argmin)

    def backward_gather(ctx, grad_gz):
        hidden, argmax, argmin = ctx.saved_tensors
        gg = o.ada_unpool2d(grad_gz, hidden, argmax, argmin, ctx.k, *ctx.size)
        return gg, None, None, None, None

    torch.library.register_autograd(o.ada_pool2d, backward_pool, setup_context=setup_pool)
    torch.library.register_autograd(o.ada_unpool2d, backward_unpool, setup_context=setup_unpool)
    torch.library.register_autograd(
        o.ada_pool2d_gather, backward_gather, setup_context=setup_gather
    )


CPP: PoolOps[Op] | None = None
TRITON: PoolOps[Op] | None = None

if _backend.C_ERROR is None:
    CPP = PoolOps(*(getattr(torch.ops.screening_attn, name).default for name in PoolOps._fields))
    for _op, _fake in zip(CPP, _FAKES):
        torch.library.register_fake(_op)(_fake)
    _register_autograd(CPP)

if _backend.HAS_TRITON:

    @torch.library.custom_op("screening_attn::ada_pool2d_triton", mutates_args=())
    def ada_pool2d_triton(
        x: Tensor, hidden: Tensor | None, kernel_size: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        from screening_attn._kernels import feedback as kernels

        return kernels.ada_pool2d(x, hidden, kernel_size)

    @torch.library.custom_op("screening_attn::ada_unpool2d_triton", mutates_args=())
    def ada_unpool2d_triton(
        z: Tensor,
        hidden: Tensor | None,
        argmax: Tensor,
        argmin: Tensor,
        kernel_size: int,
        height: int,
        width: int,
    ) -> Tensor:
        from screening_attn._kernels import feedback as kernels

        return kernels.ada_unpool2d(z, hidden, argmax, argmin, kernel_size, height, width)

    @torch.library.custom_op("screening_attn::ada_pool2d_gather_triton", mutates_args=())
    def ada_pool2d_gather_triton(
        grad: Tensor, hidden: Tensor | None, argmax: Tensor, argmin: Tensor, kernel_size: int
    ) -> Tensor:
        from screening_attn._kernels import feedback as kernels

        return kernels.ada_pool2d_gather(grad, hidden, argmax, argmin, kernel_size)

    TRITON = PoolOps(ada_pool2d_triton, ada_unpool2d_triton, ada_pool2d_gather_triton)
    for _op, _fake in zip(TRITON, _FAKES):
        torch.library.register_fake(_op)(_fake)
    _register_autograd(TRITON)
