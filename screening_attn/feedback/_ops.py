"""Registration glue of the CNN-F ops: fakes and autograd for the C++ ops
(``torch.ops.screening_attn.*``, schemas in csrc/feedback.cpp) and the Triton ops made here
with ``torch.library.custom_op`` (kernels in kernels/feedback.py).

Three families, each with the same ops in every implementation:

* the AdaReLU gate: ``ada_relu``, ``ada_relu_backward``, ``ada_relu_feedback``; linear in their
  gradient inputs, so double backward works;
* the instance-norm family: ``ins_norm``, ``ins_bias_ada_relu`` (bottom-up InsNorm -> Bias ->
  AdaReLU in one pass) and ``ins_norm_gate`` (top-down InsNorm -> AdaReLU feedback), each with
  its ``*_backward`` op; double backward raises;
* AdaPool: ``ada_pool2d``, ``ada_unpool2d`` (its feedback and its backward) and
  ``ada_pool2d_gather`` (the unpool's backward); each is the others' backward, so any order of
  derivatives works;
* CPU stage fusions: ``ins_bias_ada_relu_pool2d`` and ``ada_unpool_gate``, whose backward
  composes the ops above.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from screening_attn import _backend
from screening_attn._library import acc_dtype, no_double_backward

_LIB = "screening_attn"


def _fake_ada_relu(x: Tensor, hidden: Tensor | None, eta: float) -> tuple[Tensor, Tensor]:
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y, dtype=torch.bool)


def _fake_ada_relu_backward(grad_y: Tensor, mask: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    gx = torch.empty_like(grad_y, memory_format=torch.contiguous_format)
    return gx, torch.empty_like(gx)


def _fake_ada_relu_feedback(z: Tensor, mask: Tensor) -> Tensor:
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _register_autograd(fwd, bwd, feedback) -> None:
    """Autograd of one implementation's three ops (``fwd``, ``bwd``, ``feedback`` are the op
    overloads of that implementation)."""

    def setup_fwd(ctx, inputs, output):
        _, hidden, eta = inputs
        ctx.eta, ctx.gated = eta, hidden is not None
        ctx.save_for_backward(output[1])
        # No zero-filled gradient for the mask (nor, below, for rstd or the pool positions):
        # autograd would allocate and zero one per call for outputs that carry none.
        ctx.set_materialize_grads(False)

    def backward_fwd(ctx, grad_y, _grad_mask):
        if grad_y is None:  # undefined (not materialized): no gradient
            return None, None, None
        (mask,) = ctx.saved_tensors
        if not ctx.gated:
            return feedback(grad_y, mask), None, None
        grad_x, grad_hidden = bwd(grad_y, mask, ctx.eta)
        return grad_x, grad_hidden, None

    def setup_bwd(ctx, inputs, output):
        ctx.eta = inputs[2]
        ctx.save_for_backward(inputs[1])

    def backward_bwd(ctx, gg_x, gg_hidden):
        # grad_x = (1-eta) g [mask], grad_hidden = eta g [mask]: linear in g.
        (mask,) = ctx.saved_tensors
        gg = (1.0 - ctx.eta) * gg_x + ctx.eta * gg_hidden
        return feedback(gg, mask), None, None

    def setup_feedback(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def backward_feedback(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        return feedback(grad_out, mask), None

    torch.library.register_autograd(fwd, backward_fwd, setup_context=setup_fwd)
    torch.library.register_autograd(bwd, backward_bwd, setup_context=setup_bwd)
    torch.library.register_autograd(feedback, backward_feedback, setup_context=setup_feedback)


# --- Instance-norm family -------------------------------------------------------------------------
def _contiguous_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)


def _new_rstd(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1]), dtype=acc_dtype(x.dtype))


def _fake_ins_norm(x: Tensor, eps: float, centered: bool) -> tuple[Tensor, Tensor]:
    return _contiguous_like(x), _new_rstd(x)


def _fake_ins_norm_backward(grad_y: Tensor, x: Tensor, rstd: Tensor, centered: bool) -> Tensor:
    return _contiguous_like(x)


def _fake_ins_bias_ada_relu(
    x: Tensor, bias: Tensor | None, hidden: Tensor | None, eta: float, eps: float, centered: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _contiguous_like(x), _contiguous_like(x, torch.bool), _new_rstd(x)


def _fake_ins_bias_ada_relu_backward(
    grad_y: Tensor,
    x: Tensor,
    mask: Tensor,
    rstd: Tensor,
    eta: float,
    gated: bool,
    has_bias: bool,
    centered: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    gh = _contiguous_like(x) if gated else x.new_empty((0,))
    return _contiguous_like(x), gh, x.new_empty((x.shape[1] if has_bias else 0,))


def _fake_ins_norm_gate(
    z: Tensor, mask: Tensor, eps: float, centered: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _contiguous_like(z), _contiguous_like(z), _new_rstd(z)


def _fake_ins_norm_gate_backward(
    grad_zn: Tensor, grad_out: Tensor, z: Tensor, mask: Tensor, rstd: Tensor, centered: bool
) -> Tensor:
    return _contiguous_like(z)


class NormOps(NamedTuple):
    """One implementation's instance-norm family (op overloads or custom ops)."""

    ins_norm: object
    ins_norm_backward: object
    ins_bias_ada_relu: object
    ins_bias_ada_relu_backward: object
    ins_norm_gate: object
    ins_norm_gate_backward: object


def _register_norm(o: NormOps) -> None:
    """Fakes are registered by the caller; this adds autograd to one implementation."""

    def setup_ins(ctx, inputs, output):
        x, _, centered = inputs
        ctx.centered = centered
        ctx.save_for_backward(x, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def backward_ins(ctx, grad_y, _grad_rstd):
        if grad_y is None:
            return None, None, None
        x, rstd = ctx.saved_tensors
        return o.ins_norm_backward(grad_y, x, rstd, ctx.centered), None, None

    def setup_fused(ctx, inputs, output):
        x, bias, hidden, eta, _, centered = inputs
        ctx.eta, ctx.centered = eta, centered
        ctx.gated, ctx.has_bias = hidden is not None, bias is not None
        ctx.save_for_backward(x, output[1], output[2])
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)

    def backward_fused(ctx, grad_y, _grad_mask, _grad_rstd):
        if grad_y is None:
            return None, None, None, None, None, None
        x, mask, rstd = ctx.saved_tensors
        gx, gh, gb = o.ins_bias_ada_relu_backward(
            grad_y, x, mask, rstd, ctx.eta, ctx.gated, ctx.has_bias, ctx.centered
        )
        return gx, gb if ctx.has_bias else None, gh if ctx.gated else None, None, None, None

    def setup_gate(ctx, inputs, output):
        z, mask, _, centered = inputs
        ctx.centered = centered
        ctx.save_for_backward(z, mask, output[2])
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)

    def backward_gate(ctx, grad_zn, grad_out, _grad_rstd):
        if grad_zn is None and grad_out is None:
            return None, None, None, None
        z, mask, rstd = ctx.saved_tensors
        if grad_zn is None or grad_out is None:  # one of the two was not used
            grad_zn, grad_out = (
                g if g is not None else torch.zeros_like(z) for g in (grad_zn, grad_out)
            )
        gz = o.ins_norm_gate_backward(grad_zn, grad_out, z, mask, rstd, ctx.centered)
        return gz, None, None, None

    torch.library.register_autograd(o.ins_norm, backward_ins, setup_context=setup_ins)
    torch.library.register_autograd(o.ins_bias_ada_relu, backward_fused, setup_context=setup_fused)
    torch.library.register_autograd(o.ins_norm_gate, backward_gate, setup_context=setup_gate)
    no_double_backward(o.ins_norm_backward, "ins_norm")
    no_double_backward(o.ins_bias_ada_relu_backward, "ins_bias_ada_relu")
    no_double_backward(o.ins_norm_gate_backward, "ins_norm_gate")


_NORM_FAKES = (
    _fake_ins_norm,
    _fake_ins_norm_backward,
    _fake_ins_bias_ada_relu,
    _fake_ins_bias_ada_relu_backward,
    _fake_ins_norm_gate,
    _fake_ins_norm_gate_backward,
)


# --- AdaPool -------------------------------------------------------------------------------------
def _pooled(x: Tensor, k: int) -> tuple[int, int, int, int]:
    return (x.shape[0], x.shape[1], x.shape[2] // k, x.shape[3] // k)


def _fake_ada_pool2d(x: Tensor, hidden: Tensor | None, kernel_size: int):
    shape = _pooled(x, kernel_size)
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
    return grad.new_empty(_pooled(grad, kernel_size))


class PoolOps(NamedTuple):
    ada_pool2d: object
    ada_unpool2d: object
    ada_pool2d_gather: object


def _register_pool(o: PoolOps) -> None:
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


_POOL_FAKES = (_fake_ada_pool2d, _fake_ada_unpool2d, _fake_ada_pool2d_gather)


# --- CPU stage fusions ----------------------------------------------------------------------------
# InsNorm -> Bias -> AdaReLU -> AdaPool bottom-up, AdaPool -> AdaReLU feedback top-down: C++ CPU
# kernels only (functional.py composes the ops above elsewhere). Their backward ops are fused
# the same way: the full-resolution intermediates of the composed backward (the unpooled
# gradient; the gated gradient and its sum) stay in a per-plane scratch, never in memory.
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
    shape = _pooled(x, kernel_size)
    positions = x.new_empty(shape, dtype=torch.uint8)
    mask = _contiguous_like(x, torch.bool)
    return x.new_empty(shape), mask, _new_rstd(x), positions, torch.empty_like(positions)


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
    return _fake_ins_bias_ada_relu_backward(grad_y, x, mask, rstd, eta, gated, has_bias, centered)


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
    return like.new_empty(_pooled(like, kernel_size))


def _register_stage_fusions(ops) -> None:
    """``ops``: ``torch.ops.screening_attn``, whose stage fusions and their backwards are CPU
    kernels."""
    norm_pool, norm_pool_bwd = ops.ins_bias_ada_relu_pool2d, ops.ins_bias_ada_relu_pool2d_backward
    unpool_gate, unpool_gate_bwd = ops.ada_unpool_gate, ops.ada_unpool_gate_backward

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
        gx, gh, gb = norm_pool_bwd(
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
        gz = unpool_gate_bwd(grad_u, grad_out, hidden, argmax, argmin, mask, ctx.k)
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
        u, out = unpool_gate(gg, hidden, argmax, argmin, mask, ctx.k, *ctx.size)
        return (u if ctx.wants[0] else None, out if ctx.wants[1] else None) + (None,) * 5

    for op, fake in (
        (norm_pool, _fake_ins_bias_ada_relu_pool2d),
        (norm_pool_bwd, _fake_ins_bias_ada_relu_pool2d_backward),
        (unpool_gate, _fake_ada_unpool_gate),
        (unpool_gate_bwd, _fake_ada_unpool_gate_backward),
    ):
        torch.library.register_fake(op.default)(fake)
    torch.library.register_autograd(
        norm_pool.default, backward_norm_pool, setup_context=setup_norm_pool
    )
    torch.library.register_autograd(
        unpool_gate.default, backward_unpool_gate, setup_context=setup_unpool_gate
    )
    torch.library.register_autograd(
        unpool_gate_bwd.default, backward_unpool_gate_bwd, setup_context=setup_unpool_gate_bwd
    )
    no_double_backward(norm_pool_bwd.default, "ins_bias_ada_relu_pool2d")


# --- C++ ops (CPU, and CUDA when compiled) -------------------------------------------------------
if _backend.C_ERROR is None:
    ada_relu_cpp = torch.ops.screening_attn.ada_relu.default
    ada_relu_backward_cpp = torch.ops.screening_attn.ada_relu_backward.default
    ada_relu_feedback_cpp = torch.ops.screening_attn.ada_relu_feedback.default
    torch.library.register_fake(ada_relu_cpp)(_fake_ada_relu)
    torch.library.register_fake(ada_relu_backward_cpp)(_fake_ada_relu_backward)
    torch.library.register_fake(ada_relu_feedback_cpp)(_fake_ada_relu_feedback)
    _register_autograd(ada_relu_cpp, ada_relu_backward_cpp, ada_relu_feedback_cpp)

    _cpp = torch.ops.screening_attn
    ins_bias_ada_relu_pool2d_cpp = _cpp.ins_bias_ada_relu_pool2d.default
    ada_unpool_gate_cpp = _cpp.ada_unpool_gate.default
    ins_bias_ada_relu_pool2d_backward_cpp = _cpp.ins_bias_ada_relu_pool2d_backward.default
    ada_unpool_gate_backward_cpp = _cpp.ada_unpool_gate_backward.default
    norm_cpp = NormOps(*(getattr(_cpp, name).default for name in NormOps._fields))
    pool_cpp = PoolOps(*(getattr(_cpp, name).default for name in PoolOps._fields))
    for _op, _fake in zip((*norm_cpp, *pool_cpp), (*_NORM_FAKES, *_POOL_FAKES)):
        torch.library.register_fake(_op)(_fake)
    _register_norm(norm_cpp)
    _register_pool(pool_cpp)
    _register_stage_fusions(_cpp)


# --- Triton ops ----------------------------------------------------------------------------------
if _backend.HAS_TRITON:

    @torch.library.custom_op(f"{_LIB}::ada_relu_triton", mutates_args=())
    def ada_relu_triton(x: Tensor, hidden: Tensor | None, eta: float) -> tuple[Tensor, Tensor]:
        from screening_attn._kernels import feedback as k

        x = x.contiguous()
        y = torch.empty_like(x)
        mask = torch.empty_like(x, dtype=torch.bool)
        n = x.numel()
        if n:
            h = x if hidden is None else hidden.contiguous()
            k.ada_relu_fwd_kernel[k.grid(n)](
                x,
                h,
                y,
                mask.view(torch.uint8),
                eta,
                n,
                HAS_HIDDEN=hidden is not None,
                BLOCK=k.BLOCK,
            )
        return y, mask

    @torch.library.custom_op(f"{_LIB}::ada_relu_backward_triton", mutates_args=())
    def ada_relu_backward_triton(grad_y: Tensor, mask: Tensor, eta: float) -> tuple[Tensor, Tensor]:
        from screening_attn._kernels import feedback as k

        grad_y, mask = grad_y.contiguous(), mask.contiguous()
        gx, gh = torch.empty_like(grad_y), torch.empty_like(grad_y)
        n = grad_y.numel()
        if n:
            k.ada_relu_bwd_kernel[k.grid(n)](
                grad_y, mask.view(torch.uint8), gx, gh, eta, n, BLOCK=k.BLOCK
            )
        return gx, gh

    @torch.library.custom_op(f"{_LIB}::ada_relu_feedback_triton", mutates_args=())
    def ada_relu_feedback_triton(z: Tensor, mask: Tensor) -> Tensor:
        from screening_attn._kernels import feedback as k

        z, mask = z.contiguous(), mask.contiguous()
        out = torch.empty_like(z)
        n = z.numel()
        if n:
            k.gate_kernel[k.grid(n)](z, mask.view(torch.uint8), out, n, BLOCK=k.BLOCK)
        return out

    ada_relu_triton.register_fake(_fake_ada_relu)
    ada_relu_backward_triton.register_fake(_fake_ada_relu_backward)
    ada_relu_feedback_triton.register_fake(_fake_ada_relu_feedback)
    _register_autograd(ada_relu_triton, ada_relu_backward_triton, ada_relu_feedback_triton)

    # Instance-norm family: one program per (n, c) plane.
    def _acc(x: Tensor):
        import triton.language as tl

        return tl.float64 if x.dtype == torch.float64 else tl.float32

    def _mask_bytes(mask: Tensor) -> Tensor:
        return mask.contiguous().view(torch.uint8)

    def _norm_forward(x, bias, hidden, gate, eta, eps, centered, mode):
        from screening_attn._kernels import feedback as k

        x = x.contiguous()
        y = torch.empty_like(x)
        out = torch.empty_like(x) if mode == 3 else y
        mask = torch.empty_like(x, dtype=torch.bool) if mode in (1, 2) else None
        rstd = _new_rstd(x)
        n = x.shape[2] * x.shape[3]
        if rstd.numel() and n:
            k.ins_norm_fwd_kernel[(rstd.numel(),)](
                x,
                x if bias is None else bias.contiguous(),
                x if hidden is None else hidden.contiguous(),
                y if gate is None else _mask_bytes(gate),
                y,
                out,
                y if mask is None else mask.view(torch.uint8),
                rstd,
                x.shape[1],
                n,
                eta,
                eps,
                GATE=mode,
                HAS_BIAS=bias is not None,
                CENTERED=centered,
                ACC=_acc(x),
                BLOCK=k.plane_block(n),
            )
        elif rstd.numel():  # empty planes: the mean of nothing is NaN, as in the reference
            rstd.fill_(float("nan"))
        return y, out, mask, rstd

    def _norm_backward(g0, g1, mask, x, rstd, scale1, eta, write_gh, write_gb, centered):
        from screening_attn._kernels import feedback as k

        x = x.contiguous()
        gx = torch.empty_like(x)
        gh = torch.empty_like(x) if write_gh else x.new_empty((0,))
        parts = x.new_empty(rstd.shape) if write_gb else None
        n = x.shape[2] * x.shape[3]
        if rstd.numel() and n:
            k.ins_norm_bwd_kernel[(rstd.numel(),)](
                x if g0 is None else g0.contiguous(),
                x if g1 is None else g1.contiguous(),
                x if mask is None else _mask_bytes(mask),
                x,
                rstd.contiguous(),
                gx,
                gx if not write_gh else gh,
                gx if parts is None else parts,
                n,
                scale1,
                eta,
                HAS_G0=g0 is not None,
                HAS_G1=g1 is not None,
                WRITE_GH=write_gh,
                WRITE_GB=write_gb,
                CENTERED=centered,
                ACC=_acc(x),
                BLOCK=k.plane_block(n),
            )
        elif parts is not None:
            parts.zero_()
        gb = parts.sum(0) if write_gb else x.new_empty((0,))  # (N, C) -> (C,), in order
        return gx, gh, gb

    @torch.library.custom_op(f"{_LIB}::ins_norm_triton", mutates_args=())
    def ins_norm_triton(x: Tensor, eps: float, centered: bool) -> tuple[Tensor, Tensor]:
        y, _, _, rstd = _norm_forward(x, None, None, None, 0.0, eps, centered, 0)
        return y, rstd

    @torch.library.custom_op(f"{_LIB}::ins_norm_backward_triton", mutates_args=())
    def ins_norm_backward_triton(grad_y: Tensor, x: Tensor, rstd: Tensor, centered: bool) -> Tensor:
        return _norm_backward(grad_y, None, None, x, rstd, 1.0, 0.0, False, False, centered)[0]

    @torch.library.custom_op(f"{_LIB}::ins_bias_ada_relu_triton", mutates_args=())
    def ins_bias_ada_relu_triton(
        x: Tensor,
        bias: Tensor | None,
        hidden: Tensor | None,
        eta: float,
        eps: float,
        centered: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        mode = 1 if hidden is None else 2
        y, _, mask, rstd = _norm_forward(x, bias, hidden, None, eta, eps, centered, mode)
        return y, mask, rstd

    @torch.library.custom_op(f"{_LIB}::ins_bias_ada_relu_backward_triton", mutates_args=())
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
        scale1 = 1.0 - eta if gated else 1.0
        return _norm_backward(None, grad_y, mask, x, rstd, scale1, eta, gated, has_bias, centered)

    @torch.library.custom_op(f"{_LIB}::ins_norm_gate_triton", mutates_args=())
    def ins_norm_gate_triton(
        z: Tensor, mask: Tensor, eps: float, centered: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        zn, out, _, rstd = _norm_forward(z, None, None, mask, 0.0, eps, centered, 3)
        return zn, out, rstd

    @torch.library.custom_op(f"{_LIB}::ins_norm_gate_backward_triton", mutates_args=())
    def ins_norm_gate_backward_triton(
        grad_zn: Tensor, grad_out: Tensor, z: Tensor, mask: Tensor, rstd: Tensor, centered: bool
    ) -> Tensor:
        return _norm_backward(grad_zn, grad_out, mask, z, rstd, 1.0, 0.0, False, False, centered)[0]

    norm_triton = NormOps(
        ins_norm_triton,
        ins_norm_backward_triton,
        ins_bias_ada_relu_triton,
        ins_bias_ada_relu_backward_triton,
        ins_norm_gate_triton,
        ins_norm_gate_backward_triton,
    )

    # AdaPool: one lane per pooled output (forward, gather) or per output element (unpool).
    _POOL_BLOCK = 256

    def _pool_grid(total: int):
        return ((total + _POOL_BLOCK - 1) // _POOL_BLOCK,)

    @torch.library.custom_op(f"{_LIB}::ada_pool2d_triton", mutates_args=())
    def ada_pool2d_triton(
        x: Tensor, hidden: Tensor | None, kernel_size: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        from screening_attn._kernels import feedback as k

        x = x.contiguous()
        shape = _pooled(x, kernel_size)
        y = x.new_empty(shape)
        argmax = x.new_empty(shape, dtype=torch.uint8)
        argmin = torch.empty_like(argmax)
        if y.numel():
            k.ada_pool_fwd_kernel[_pool_grid(y.numel())](
                x,
                x if hidden is None else hidden.contiguous(),
                y,
                argmax,
                argmin,
                y.numel(),
                x.shape[2],
                x.shape[3],
                shape[2],
                shape[3],
                HAS_HIDDEN=hidden is not None,
                K=kernel_size,
                BLOCK=_POOL_BLOCK,
            )
        return y, argmax, argmin

    @torch.library.custom_op(f"{_LIB}::ada_unpool2d_triton", mutates_args=())
    def ada_unpool2d_triton(
        z: Tensor,
        hidden: Tensor | None,
        argmax: Tensor,
        argmin: Tensor,
        kernel_size: int,
        height: int,
        width: int,
    ) -> Tensor:
        from screening_attn._kernels import feedback as k

        z = z.contiguous()
        out = z.new_empty((z.shape[0], z.shape[1], height, width))
        if out.numel():
            k.ada_unpool_kernel[_pool_grid(out.numel())](
                z,
                z if hidden is None else hidden.contiguous(),
                argmax.contiguous(),
                argmin.contiguous(),
                out,
                out.numel(),
                height,
                width,
                z.shape[2],
                z.shape[3],
                HAS_HIDDEN=hidden is not None,
                K=kernel_size,
                BLOCK=_POOL_BLOCK,
            )
        return out

    @torch.library.custom_op(f"{_LIB}::ada_pool2d_gather_triton", mutates_args=())
    def ada_pool2d_gather_triton(
        grad: Tensor, hidden: Tensor | None, argmax: Tensor, argmin: Tensor, kernel_size: int
    ) -> Tensor:
        from screening_attn._kernels import feedback as k

        grad = grad.contiguous()
        shape = _pooled(grad, kernel_size)
        gz = grad.new_empty(shape)
        if gz.numel():
            k.ada_pool_gather_kernel[_pool_grid(gz.numel())](
                grad,
                grad if hidden is None else hidden.contiguous(),
                argmax.contiguous(),
                argmin.contiguous(),
                gz,
                gz.numel(),
                grad.shape[2],
                grad.shape[3],
                shape[2],
                shape[3],
                HAS_HIDDEN=hidden is not None,
                K=kernel_size,
                BLOCK=_POOL_BLOCK,
            )
        return gz

    pool_triton = PoolOps(ada_pool2d_triton, ada_unpool2d_triton, ada_pool2d_gather_triton)

    for _op, _fake in zip((*norm_triton, *pool_triton), (*_NORM_FAKES, *_POOL_FAKES)):
        _op.register_fake(_fake)
    _register_norm(norm_triton)
    _register_pool(pool_triton)
