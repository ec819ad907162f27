"""Benchmark cases of ``screened_attention`` (docs/attention.md) and its peers.

``setup_attention(provider, mode, **shape)`` builds the inputs, checks the provider against the
reference once, and returns the zero-argument callable to time. Providers:

* ``reference``, ``cpu``, ``triton``: ``screened_attention(..., backend=provider)``;
* ``sdpa_dense``: ``F.scaled_dot_product_attention(is_causal=True)``, the O(T²) drop-in;
* ``sdpa_window``: sliding-window attention over ``ν+ρ`` keys (the screened op's key count)
  as blocked SDPA: one call of PyTorch's CPU flash-attention kernel per chunk of queries, each
  over its own key range with a band mask, with a matching chunked backward;
* ``flex_window``: FlexAttention with a sliding-window block mask, compiled with
  ``torch.compile`` outside the timed region (forward only on CPU: FlexAttention has no CPU
  backward).

The check runs the provider at the benchmark's own shape and compares its first positions
(``check_len``: 256, more for large ν+ρ) with the float64 reference run on that prefix alone:
every op here is causal, so the output's prefix depends only on the inputs' prefix, and with an
upstream gradient that is zero past the prefix the whole of ``dq, dk, dv`` is the prefix
problem's gradient (zero past it). So a provider is checked on its own code path at its own T
for the cost of one call, which is also its warm-up, while the slow reference only ever runs on
the prefix (once, shared by every T: the inputs' prefix is the same for every T).

pytest-benchmark: ``pytest bench/bench_attention.py --benchmark-only [--bench-preset quick]``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench._common import (
    CheckFailed,
    Unavailable,
    check_close,
    clear_grads,
    run_pytest_benchmark,
    sync_for,
)
from screening_attn import screened_attention
from screening_attn.attention import screened_attention_reference

FAMILY = "attention"
CHECK_T = 256  # prefix checked against the float64 reference (longer for large ν+ρ)
WINDOW_CHUNK = 64  # queries per SDPA call of sdpa_window (32-64 is fastest at w=192 here)
SEED = 0
ORACLE_BYTES = 1 << 30  # memory budget of the float64 reference run of the check

_NO_JIT = ("reference", "cpu", "sdpa_dense", "sdpa_window")

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_len(T: int, window: int, relevant: int) -> int:
    """Length of the checked prefix: long enough that keys get screened and evicted."""
    return min(T, max(CHECK_T, window + relevant + 64))


def make_inputs(B: int, H: int, T: int, D: int, t0: int, device: str, requires_grad: bool):
    """``q, k, v, grad_out`` of shape ``(B, H, T, D)``, float32. The first ``t0`` positions are
    the same for every ``T``, so one reference run on them checks every T."""
    t0 = min(T, t0)
    head = torch.randn(4, B, H, t0, D, generator=torch.Generator().manual_seed(SEED))
    tail = torch.randn(4, B, H, T - t0, D, generator=torch.Generator().manual_seed(SEED + T))
    q, k, v, g = (x.to(device).contiguous() for x in torch.cat([head, tail], 3).unbind(0))
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v, g


@functools.cache
def _oracle(B: int, H: int, D: int, t0: int, window: int, relevant: int):
    """Float64 reference output and gradients on the shared prefix of length ``t0``, a few
    heads at a time: heads are independent, and the reference's autograd graph holds a few
    ``(B, t0, ν+ρ, D)`` gathers per head (gigabytes at ν+ρ = 768 if all heads go at once)."""
    q, k, v, g = (x.double() for x in make_inputs(B, H, t0, D, t0, "cpu", requires_grad=False))
    per_head = 4 * B * t0 * min(window + relevant, t0) * D * 8  # bytes, roughly
    step = max(1, min(H, ORACLE_BYTES // max(per_head, 1)))
    parts = []
    for h in range(0, H, step):
        qh, kh, vh = (x[:, h : h + step].clone().requires_grad_() for x in (q, k, v))
        out = screened_attention_reference(qh, kh, vh, window, relevant)[0]
        out.backward(g[:, h : h + step])
        parts.append((out.detach(), qh.grad, kh.grad, vh.grad))
    return tuple(torch.cat(xs, 1) for xs in zip(*parts))


def _oracle_args(provider: str, T: int, window: int, relevant: int) -> tuple[int, int]:
    """(window, relevant) of the screened op that ``provider`` computes (docs/attention.md):
    ``relevant=0`` is sliding-window attention, ``window >= T`` full causal attention."""
    if provider == "sdpa_dense":
        return check_len(T, window, relevant), 0
    if provider in ("sdpa_window", "flex_window"):
        return window + relevant, 0
    return window, relevant


def _screened(backend: str, window: int, relevant: int, device: str) -> Attention:
    if backend in ("triton", "cuda") and device == "cpu":
        has_cuda = torch.cuda.is_available()
        raise Unavailable(
            "GPU kernel: run the report with --device cuda"
            if has_cuda
            else "GPU kernel: no CUDA device here"
        )
    tiny = torch.zeros(1, 1, 4, 4, device=device)
    try:  # the dispatcher's own message says why a backend can't run
        screened_attention(tiny, tiny, tiny, 2, 1, backend=backend)
    except (ValueError, TypeError) as exc:
        raise Unavailable(str(exc)) from None

    def attention(q, k, v):
        return screened_attention(q, k, v, window, relevant, backend=backend)

    return attention


def _sdpa_dense(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _window_plan(T: int, w: int, chunk: int, dtype: torch.dtype, device: str):
    """Per query chunk ``[s, e)``: its first key ``k0`` and the additive band mask of
    ``(e - s, e - k0)`` (query i sees keys i-w+1 .. i)."""
    i = torch.arange(chunk).view(-1, 1)
    j = torch.arange(chunk + w - 1).view(1, -1)  # key offset from s - w + 1
    band = (j >= i) & (j <= i + w - 1)
    bias = torch.zeros(band.shape, dtype=dtype).masked_fill(~band, -math.inf).to(device)
    plan = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        k0 = s - w + 1
        plan.append((s, e, max(k0, 0), bias[: e - s, max(0, -k0) : e - s + w - 1].contiguous()))
    return plan


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)


class _ChunkedWindowCPU(torch.autograd.Function):
    """Sliding-window attention as one CPU flash-attention call per query chunk; the backward
    calls the matching flash backward per chunk and accumulates dk, dv into their key range (an
    autograd graph of slices would allocate a full-size gradient per chunk)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lses = []
        for s, e, k0, mask in plan:
            o, lse = _FLASH_CPU(
                q[:, :, s:e], k[:, :, k0:e], v[:, :, k0:e], attn_mask=mask, scale=scale
            )
            out[:, :, s:e] = o
            lses.append(lse)
        ctx.plan, ctx.scale = plan, scale
        ctx.save_for_backward(q, k, v, out, *lses)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, *lses = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (s, e, k0, mask), lse in zip(ctx.plan, lses):
            gq, gk, gv = _FLASH_CPU_BWD(
                grad_out[:, :, s:e],
                q[:, :, s:e],
                k[:, :, k0:e],
                v[:, :, k0:e],
                out[:, :, s:e],
                lse,
                0.0,
                False,
                attn_mask=mask,
                scale=ctx.scale,
            )
            dq[:, :, s:e] = gq
            dk[:, :, k0:e] += gk
            dv[:, :, k0:e] += gv
        return dq, dk, dv, None, None


def _sdpa_window(T: int, w: int, D: int, device: str, chunk: int = WINDOW_CHUNK) -> Attention:
    plan = _window_plan(T, w, chunk, torch.float32, device)
    scale = 1.0 / math.sqrt(D)
    if device == "cpu" and _FLASH_CPU is not None and _FLASH_CPU_BWD is not None:
        return lambda q, k, v: _ChunkedWindowCPU.apply(q, k, v, plan, scale)

    def generic(q, k, v):  # other devices: plain SDPA per chunk, autograd through it
        outs = [
            F.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, k0:e], v[:, :, k0:e], attn_mask=mask, scale=scale
            )
            for s, e, k0, mask in plan
        ]
        return torch.cat(outs, 2)

    return generic


def _window_block_mask(T: int, w: int, device: str, block: int = 128):
    """FlexAttention ``BlockMask`` of causal sliding-window attention over ``w`` keys, built
    from block coordinates (``create_block_mask`` materializes T×T: seconds at T=16384)."""
    from torch.nn.attention.flex_attention import BlockMask

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

    n = -(-T // block)
    q0 = torch.arange(n).view(-1, 1) * block
    k0 = torch.arange(n).view(1, -1) * block
    q1, k1 = (torch.clamp(x + block - 1, max=T - 1) for x in (q0, k0))
    ragged = (q1 - q0 < block - 1) | (k1 - k0 < block - 1)  # last block when block ∤ T
    # q - k over the tile spans [q0 - k1, q1 - k0]; the band is 0 <= q - k <= w - 1
    touched = (q1 - k0 >= 0) & (q0 - k1 <= w - 1)
    full = (q0 - k1 >= 0) & (q1 - k0 <= w - 1) & ~ragged
    partial = touched & ~full

    def pack(m):
        num = m.sum(-1).to(torch.int32)[None, None].to(device)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, idx[None, None].to(device)

    (kv_num, kv_idx), (full_num, full_idx) = pack(partial), pack(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(T, T)
    )


@functools.cache
def _compiled_flex():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # one compiled graph per (T, w); the full preset needs more than the default limit of 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    # fullgraph: never fall back to the unfused eager path, which materializes T×T scores
    # (8 GiB at T=16384) and would time something else anyway
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def _flex_window(T: int, w: int, device: str, mode: str) -> Attention:
    if mode == "fwd+bwd" and device == "cpu":
        # Known limit (torch 2.13: "FlexAttention does not support backward on CPU"). Not
        # probed: an exception inside the compiled region leaves flex_attention running eager.
        raise Unavailable("FlexAttention has no backward on CPU")
    try:
        block_mask = _window_block_mask(T, w, device)
        flex = _compiled_flex()
    except (ImportError, AttributeError, RuntimeError) as exc:
        raise Unavailable(f"FlexAttention is not usable here: {exc}") from None
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


def _reset_flex() -> None:
    """After a failed FlexAttention call: drop the compiled code so the next case starts
    clean."""
    import torch._dynamo

    torch._dynamo.reset()
    _compiled_flex.cache_clear()


def attention_provider(provider: str, mode: str, *, T, D, window, relevant, device) -> Attention:
    """The function ``(q, k, v) -> out`` that ``provider`` times."""
    if provider in ("reference", "cpu", "triton", "cuda"):
        return _screened(provider, window, relevant, device)
    if provider == "sdpa_dense":
        return _sdpa_dense
    if provider == "sdpa_window":
        return _sdpa_window(T, window + relevant, D, device)
    if provider == "flex_window":
        return _flex_window(T, window + relevant, device, mode)
    raise ValueError(f"unknown attention provider {provider!r}")


def _check(attention: Attention, provider: str, mode: str, q, k, v, g, shape: dict) -> float:
    """Run ``attention`` once on the case's inputs, compare with the reference; returns the
    seconds the call took."""
    T, window, relevant = shape["T"], shape["window"], shape["relevant"]
    t0 = check_len(T, window, relevant)
    ref_out, ref_dq, ref_dk, ref_dv = _oracle(
        shape["B"], shape["H"], shape["D"], t0, *_oracle_args(provider, T, window, relevant)
    )
    tol = {"rtol": 2e-4, "atol": 2e-4} if q.device.type == "cpu" else {"rtol": 5e-3, "atol": 5e-3}
    try:
        if mode == "fwd":
            start = time.perf_counter()
            with torch.no_grad():
                out = attention(q, k, v)
        else:
            g_check = g.clone()
            g_check[:, :, t0:] = 0
            clear_grads(q, k, v)
            start = time.perf_counter()
            out = attention(q, k, v)
            out.backward(g_check)
        sync_for(q.device)()
        elapsed = time.perf_counter() - start
    except NotImplementedError as exc:
        raise Unavailable(str(exc).splitlines()[0]) from None
    check_close("out", out[:, :, :t0], ref_out, **tol)
    if mode == "fwd":
        return elapsed
    for name, x, ref in (("dq", q, ref_dq), ("dk", k, ref_dk), ("dv", v, ref_dv)):
        check_close(name, x.grad[:, :, :t0], ref, **tol)
        check_close(
            f"{name} past the checked prefix", x.grad[:, :, t0:], x.grad[:, :, t0:] * 0, **tol
        )
    clear_grads(q, k, v)
    return elapsed


def setup_attention(
    provider: str, mode: str, *, B, H, T, D, window, relevant, device="cpu"
) -> Callable[[], object]:
    """Zero-argument callable running ``provider`` in ``mode`` ("fwd" or "fwd+bwd") on fp32
    ``(B, H, T, D)`` inputs, after checking it against the reference. Raises ``Unavailable``
    or ``CheckFailed``."""
    shape = {"B": B, "H": H, "T": T, "D": D, "window": window, "relevant": relevant}
    attention = attention_provider(
        provider, mode, T=T, D=D, window=window, relevant=relevant, device=device
    )
    t0 = check_len(T, window, relevant)
    q, k, v, g = make_inputs(B, H, T, D, t0, device, requires_grad=mode == "fwd+bwd")
    try:
        check_call_s = _check(attention, provider, mode, q, k, v, g, shape)
    except Exception as exc:  # a provider that raises is FAILED, not a crash
        if provider == "flex_window":
            _reset_flex()
        if isinstance(exc, Unavailable | CheckFailed):
            raise
        raise CheckFailed(f"raised {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc

    if mode == "fwd":

        def run():
            with torch.no_grad():
                return attention(q, k, v)

    else:

        def run():
            clear_grads(q, k, v)
            attention(q, k, v).backward(g)

    # The check's call ran this code path on these inputs (its upstream gradient is zero past
    # the checked prefix, which costs every provider the same); measure() may use its time.
    # Not for JIT-compiled providers: their first call compiles.
    if provider in _NO_JIT:
        run.check_call_s = check_call_s
    return run


SETUPS = {"screened_attention": setup_attention}


def flops(op: str, provider: str, mode: str, shape: dict) -> float | None:
    """Model FLOPs: ~4 (ν+ρ) D per query and head forward (2 matmuls of 2 FLOPs per MAC),
    dense causal 2 T² D B H; the backward is 2.5× the forward."""
    B, H, T, D = shape["B"], shape["H"], shape["T"], shape["D"]
    if provider == "sdpa_dense":
        fwd = 2.0 * T * T * D * B * H
    else:
        fwd = 4.0 * min(shape["window"] + shape["relevant"], T) * D * T * B * H
    return fwd if mode == "fwd" else 3.5 * fwd


def test_attention(benchmark, case):
    run_pytest_benchmark(benchmark, case, setup_attention)
