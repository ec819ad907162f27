"""Registration glue of screened attention: fakes and autograd for the C++ ops
``torch.ops.screening_attn.screened_attention`` / ``screened_attention_backward`` (schemas in
csrc/attention.cpp, CPU kernel in csrc/cpu/attention.cpp), and the Triton ops
``screened_attention_triton`` / ``screened_attention_backward_triton`` made here with
``torch.library.custom_op`` (kernels in kernels/attention.py). Both forward ops return
``(out, lse, relevant_index, relevant_score, relevancy, span)``."""

from __future__ import annotations

import torch
from torch import Tensor

from screening_attn import _backend
from screening_attn._library import acc_dtype as score_dtype
from screening_attn._library import no_double_backward


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
    ctx.set_materialize_grads(False)  # no zero tensors for the state outputs, never read


def _make_backward(backward_op):
    """Autograd backward of a forward op whose gradients come from ``backward_op``."""

    def backward(ctx, grad_out, *_side_outputs):
        # The state outputs carry no gradient (r is a statistic; the sets are piecewise constant).
        q, k, v, out, lse, span = ctx.saved_tensors
        if grad_out is None:  # only a state output was used: zero gradients, as before
            grad_out = torch.zeros_like(out)
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, span, ctx.window, ctx.scale)
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


# --- Triton ops ---
def _triton_setup(q: Tensor) -> tuple[bool, int, int]:
    """(NATIVE, BLOCK_M, BLOCK_N) for the Triton kernels, or a ValueError saying why they
    can't run on ``q``'s device."""
    from screening_attn._kernels import attention as kern

    interpret = q.device.type == "cpu"
    if interpret and not _backend.triton_interpret():
        raise ValueError(
            "screened_attention_triton on CPU tensors runs only under the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing triton)"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    native = not interpret and q.dtype in (torch.float16, torch.bfloat16)
    return native, *kern.block_sizes(interpret)


def _store_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the kernels write their results in: the interpreter's float32 -> bfloat16
    conversion truncates (a GPU rounds to nearest), so there bf16 results go through float32
    and torch rounds them."""
    return torch.float32 if dtype == torch.bfloat16 and device.type == "cpu" else dtype


def _tl_dtypes(dtype: torch.dtype, native: bool):
    import triton.language as tl

    acc = tl.float64 if dtype == torch.float64 else tl.float32
    mm = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype] if native else acc
    return mm, acc


if _backend.HAS_TRITON:

    @torch.library.custom_op("screening_attn::screened_attention_triton", mutates_args=())
    def screened_attention_triton(
        q: Tensor, k: Tensor, v: Tensor, window: int, relevant: int, scale: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        from screening_attn._kernels import attention as kern
        from screening_attn.attention.reference import check_inputs

        check_inputs(q, k, v, window, relevant, scale)
        native, bm, bn = _triton_setup(q)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        Dv, N, acc = v.shape[-1], B * H, score_dtype(q.dtype)
        out = torch.empty(B, H, T, Dv, dtype=_store_dtype(q.dtype, q.device), device=q.device)
        lse = torch.empty(B, H, T, dtype=acc, device=q.device)
        index = torch.full((B, H, relevant), -1, dtype=torch.int64, device=q.device)
        score = torch.full((B, H, relevant), float("-inf"), dtype=acc, device=q.device)
        relevancy = torch.zeros(B, H, T, dtype=acc, device=q.device)
        span = torch.full((B, H, T, 2), -1, dtype=torch.int32, device=q.device)
        if N == 0 or T == 0:
            return out.to(q.dtype), lse, index, score, relevancy, span

        mm, acc_tl = _tl_dtypes(q.dtype, native)
        nb = -(-T // bm)
        window = min(window, T + 1)  # the same op for any ν > T (and an int32 argument)
        live = min(relevant, max(0, T - window + 1))  # only keys 0 .. T-ν ever leave
        sw = max(live, 1)
        r_pad = -(-live // bn) * bn
        ncol = r_pad + -(-min(bm + window - 1, T) // bn) * bn + 1  # + a column of -inf
        snap = torch.empty(N, nb, sw, dtype=torch.int32, device=q.device)
        scratch = torch.empty(N, bm, ncol, dtype=acc, device=q.device)
        block_d, block_dv = kern.pow2(D, 16), kern.pow2(Dv, 16)
        block_w = kern.pow2(min(window, T))
        kern.screen_scan_kernel[(N,)](
            q, k, lse, relevancy, span, index, score, snap, scratch,
            T, D, window, live, relevant, nb, sw, r_pad, ncol, scale,
            MM=mm, ACC=acc_tl, NATIVE=native, HAS_SLOTS=live > 0, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_D=block_d, BLOCK_W=block_w, BLOCK_L=kern.pow2(block_w + live),
        )  # fmt: skip
        kern.attend_fwd_kernel[(nb, N)](
            q, k, v, lse, span, snap, out,
            T, D, Dv, window, live, nb, sw, scale,
            MM=mm, ACC=acc_tl, NATIVE=native, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
            BLOCK_DV=block_dv,
        )  # fmt: skip
        return out.to(q.dtype), lse, index, score, relevancy, span

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
    ) -> tuple[Tensor, Tensor, Tensor]:
        from screening_attn._kernels import attention as kern
        from screening_attn.attention.reference import check_inputs

        check_inputs(q, k, v, window, 0, scale)
        B, H, T, _ = q.shape
        for name, x, shape, dtype in [
            ("grad_out", grad_out, v.shape, q.dtype),
            ("out", out, v.shape, q.dtype),
            ("lse", lse, (B, H, T), score_dtype(q.dtype)),
            ("span", span, (B, H, T, 2), torch.int32),
        ]:
            if x.shape != shape or x.dtype != dtype or x.device != q.device:
                raise ValueError(
                    f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {q.device}, "
                    f"got {x.dtype} {tuple(x.shape)} on {x.device}"
                )
        native, bm, bn = _triton_setup(q)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        grad_out, out = grad_out.contiguous(), out.contiguous()
        lse, span = lse.contiguous(), span.contiguous()
        B, H, T, D = q.shape
        Dv, N = v.shape[-1], B * H
        store = _store_dtype(q.dtype, q.device)
        dq, dk, dv = (torch.empty_like(x, dtype=store) for x in (q, k, v))
        if N == 0 or T == 0:
            return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)

        mm, acc_tl = _tl_dtypes(q.dtype, native)
        nb = -(-T // bm)
        window = min(window, T + 1)
        # Sets never shrink (a key leaves only when another takes its slot), so the largest
        # one is the last: the keys whose span runs to the end. One host sync, to size `snap`.
        cap = int(((span[..., 0] >= 0) & (span[..., 0] < T) & (span[..., 1] == T)).sum(-1).max())
        sw = max(cap, 1)
        snap = torch.empty(N, nb, sw, dtype=torch.int32, device=q.device)
        if cap > 0:
            kern.replay_sets_kernel[(N,)](
                span, snap, T, window, cap, nb, sw, BLOCK_M=bm, BLOCK_R=kern.pow2(cap)
            )
        delta = torch.empty(N, T, dtype=score_dtype(q.dtype), device=q.device)
        block_d, block_dv = kern.pow2(D, 16), kern.pow2(Dv, 16)
        kern.attend_bwd_dq_kernel[(nb, N)](
            q, k, v, out, grad_out, lse, span, snap, dq, delta,
            T, D, Dv, window, cap, nb, sw, scale,
            MM=mm, ACC=acc_tl, NATIVE=native,
            DELTA_FROM_P=q.dtype in (torch.float16, torch.bfloat16),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DV=block_dv,
        )  # fmt: skip
        kern.attend_bwd_dkdv_kernel[(-(-T // bn), N)](
            q, k, v, grad_out, lse, delta, span, dk, dv,
            T, D, Dv, window, scale,
            MM=mm, ACC=acc_tl, NATIVE=native, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
            BLOCK_DV=block_dv,
        )  # fmt: skip
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)

    screened_attention_triton.register_fake(_fake_forward)
    screened_attention_backward_triton.register_fake(_fake_backward)
    torch.library.register_autograd(
        screened_attention_triton,
        _make_backward(screened_attention_backward_triton),
        setup_context=_setup_context,
    )
    no_double_backward(screened_attention_backward_triton, "screened_attention")
