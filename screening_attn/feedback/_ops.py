"""Registration glue of the CNN-F ops: fakes and autograd for the C++ ops
(``torch.ops.screening_attn.ada_relu*``, schemas in csrc/feedback.cpp) and the Triton ops made
here with ``torch.library.custom_op`` (kernels in kernels/feedback.py).

Each forward op has its own backward op; all three ops are linear in their gradient inputs, so
double backward is implemented too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from screening_attn import _backend

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

    def backward_fwd(ctx, grad_y, _grad_mask):
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


# --- C++ ops (CPU, and CUDA when compiled) -------------------------------------------------------
if _backend.C_ERROR is None:
    ada_relu_cpp = torch.ops.screening_attn.ada_relu.default
    ada_relu_backward_cpp = torch.ops.screening_attn.ada_relu_backward.default
    ada_relu_feedback_cpp = torch.ops.screening_attn.ada_relu_feedback.default
    torch.library.register_fake(ada_relu_cpp)(_fake_ada_relu)
    torch.library.register_fake(ada_relu_backward_cpp)(_fake_ada_relu_backward)
    torch.library.register_fake(ada_relu_feedback_cpp)(_fake_ada_relu_feedback)
    _register_autograd(ada_relu_cpp, ada_relu_backward_cpp, ada_relu_feedback_cpp)


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
