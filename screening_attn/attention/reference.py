"""Pure-PyTorch reference of ``screened_attention`` (SPEC §1): the definition of correct.

Two passes, the shape the kernels follow:

1. ``_screening_scan`` (no grad, sequential in t, vectorized over the B·H rows): per query, the
   softmax over the ν window keys and the ρ slots, relevancy accumulation for the window keys,
   then the slot rule for the key leaving the window. It records ``R_t`` for every query.
2. ``_attend`` (differentiable, all queries at once): with the sets fixed, gather the ν+ρ
   candidate keys and values of every query and run a masked softmax attention.

Memory is O(B·H·T·(ν+ρ)·D); nothing of size T×T is allocated.
"""

from __future__ import annotations

import math

import torch

from screening_attn._validate import (
    check_finite_scale,
    check_int,
    check_same_device_dtype,
    check_tensor,
)
from screening_attn.attention.state import ScreeningState

__all__ = ["check_inputs", "screened_attention_reference"]


def check_inputs(
    q: object, k: object, v: object, window: object, relevant: object, scale: object
) -> tuple[int, int, float | None]:
    """SPEC §4 checks shared by every backend; returns ``(window, relevant, scale)``."""
    q = check_tensor("q", q, ndim=4)
    k = check_tensor("k", k, ndim=4)
    v = check_tensor("v", v, ndim=4)
    check_same_device_dtype("q", q, k=k, v=v)
    if k.shape != q.shape:
        raise ValueError(
            f"k must have the shape (B, H, T, D) of q, {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must have shape (B, H, T, Dv) with the (B, H, T) of q, {tuple(q.shape[:3])}, "
            f"got {tuple(v.shape)}"
        )
    window = check_int("window", window, minimum=1)
    relevant = check_int("relevant", relevant, minimum=0)
    scale = check_finite_scale("scale", scale)
    return window, relevant, scale


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64; float32 and the half types accumulate in float32 (SPEC §1 Numerics).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _window_positions(T: int, window: int, device: torch.device) -> torch.Tensor:
    """``(T, ν)`` int64: column i of row t holds key ``t-ν+1+i`` (negative = before the start)."""
    t = torch.arange(T, device=device)[:, None]
    return t - torch.arange(window - 1, -1, -1, device=device)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (N, T, D)``, ``index (N, ...)`` with entries in [0, T) -> ``(N, ..., D)``."""
    rows = torch.arange(x.shape[0], device=x.device).view(-1, *([1] * (index.dim() - 1)))
    return x[rows, index]


@torch.no_grad()
def _screening_scan(
    q: torch.Tensor, k: torch.Tensor, window: int, relevant: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the screening recurrence for N = B·H independent rows.

    Args:
        q, k: ``(N, T, D)`` in the compute dtype.

    Returns:
        ``history (N, T, ρ)`` int64: the slots seen by query t (``R_t``), -1 when empty;
        ``slot_index (N, ρ)`` int64 and ``slot_score (N, ρ)``: ``R_T`` and its scores;
        ``relevancy (N, T)``; ``span (N, T, 2)`` int32.
    """
    N, T, _ = q.shape
    nu, rho = window, relevant
    device, dtype = q.device, q.dtype
    neg_inf = float("-inf")

    # Window logits of every query at once, (N, T, ν): this part is parallel.
    win_pos = _window_positions(T, nu, device)  # (T, ν)
    win_valid = win_pos >= 0
    k_win = _gather_rows(k, win_pos.clamp(min=0).expand(N, T, nu))  # (N, T, ν, D)
    win_logits = scale * torch.einsum("ntd,ntid->nti", q, k_win)
    # masked_fill, not an added -inf bias: NaN + -inf is NaN, and padding gathers key 0.
    win_logits = win_logits.masked_fill(~win_valid, neg_inf)

    slot_index = torch.full((N, rho), -1, dtype=torch.int64, device=device)
    slot_score = torch.full((N, rho), neg_inf, dtype=dtype, device=device)
    history = torch.empty((N, T, rho), dtype=torch.int64, device=device)
    relevancy = torch.zeros((N, T), dtype=dtype, device=device)
    span = torch.full((N, T, 2), -1, dtype=torch.int32, device=device)
    rows = torch.arange(N, device=device)

    for t in range(T):
        history[:, t] = slot_index
        logits = win_logits[:, t]  # (N, ν)
        if rho > 0:
            k_slot = _gather_rows(k, slot_index.clamp(min=0))  # (N, ρ, D)
            slot_logits = scale * torch.einsum("nd,nsd->ns", q[:, t], k_slot)
            slot_logits = slot_logits.masked_fill(slot_index < 0, neg_inf)
            logits = torch.cat([logits, slot_logits], dim=-1)
        alpha = torch.softmax(logits, dim=-1)  # the query itself is always a candidate

        # Relevancy of the window keys t-ν+1 .. t (the valid part of the first ν columns).
        lo = max(0, t - nu + 1)
        relevancy[:, lo : t + 1] += alpha[:, nu - (t + 1 - lo) : nu]

        e = t - nu + 1  # the key leaving the window; its r is final
        if e < 0 or rho == 0:
            continue
        r_e = relevancy[:, e]
        empty = slot_index < 0
        has_empty = empty.any(dim=-1)
        first_empty = empty.to(torch.uint8).argmax(dim=-1)  # argmax returns the first maximum
        # Smallest stored score, ties -> lowest slot (argmin returns the first minimum).
        # A NaN score counts as the smallest, made explicit here rather than left to argmin;
        # since `r_e > NaN` is False, a slot holding a NaN score is never overwritten.
        min_slot = slot_score.masked_fill(slot_score.isnan(), neg_inf).argmin(dim=-1)
        target = torch.where(has_empty, first_empty, min_slot)  # (N,)
        old_index = slot_index[rows, target]
        insert = has_empty | (r_e > slot_score[rows, target])  # strict: a tie is dropped

        # Spans: the evicted key leaves before query t+1; the new key sits in from query t+1.
        evicted = insert & (old_index >= 0)
        old_safe = old_index.clamp(min=0)
        span[rows, old_safe, 1] = torch.where(evicted, t + 1, span[rows, old_safe, 1])
        span[:, e, 0] = torch.where(insert, t + 1, -1)
        span[:, e, 1] = torch.where(insert, T, -1)

        slot_index[rows, target] = torch.where(insert, e, old_index)
        slot_score[rows, target] = torch.where(insert, r_e, slot_score[rows, target])

    return history, slot_index, slot_score, relevancy, span


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    history: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Masked softmax attention over each query's candidates, differentiable in q, k, v.

    Args:
        q, k: ``(N, T, D)``; v: ``(N, T, Dv)``; history: ``(N, T, ρ)`` slots seen by each query.

    Returns:
        ``(N, T, Dv)``.
    """
    N, T, _ = q.shape
    win_pos = _window_positions(T, window, q.device).expand(N, T, window)
    cand = torch.cat([win_pos, history], dim=-1)  # (N, T, ν+ρ); window and slots are disjoint
    valid = cand >= 0
    cand = cand.clamp(min=0)
    # Padding candidates (before position 0, empty slots) gather key/value 0: zero them so that
    # nothing of that row, NaN included, reaches an output or a gradient through a padding
    # entry, and mask their logits *after* the product (probability and gradient exactly 0,
    # no -inf arithmetic anywhere). Row 0 is in fact a real candidate of every query that has
    # padding, so this is defensive; the kernels simply skip padding.
    k_c = _gather_rows(k, cand).masked_fill(~valid[..., None], 0)  # (N, T, ν+ρ, D)
    v_c = _gather_rows(v, cand).masked_fill(~valid[..., None], 0)  # (N, T, ν+ρ, Dv)
    logits = scale * torch.einsum("ntd,ntcd->ntc", q, k_c)
    logits = logits.masked_fill(~valid, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("ntc,ntcd->ntd", p, v_c)


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    relevant: int,
    scale: float | None,
    return_state: bool,
) -> torch.Tensor | tuple[torch.Tensor, ScreeningState]:
    """The reference on checked arguments (see ``check_inputs``)."""
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    window = min(window, T + 1)  # a larger window sees and screens the same keys
    if scale is None:
        # D = 0 makes every logit 0 whatever the scale: attention is a plain average then.
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    cdtype = _compute_dtype(q.dtype)
    q_, k_, v_ = (x.reshape(B * H, T, x.shape[-1]).to(cdtype) for x in (q, k, v))

    history, slot_index, slot_score, relevancy, span = _screening_scan(
        q_.detach(), k_.detach(), window, relevant, scale
    )
    out = _attend(q_, k_, v_, history, window, scale).to(q.dtype).reshape(B, H, T, Dv)
    if not return_state:
        return out
    state = ScreeningState(
        relevant_index=slot_index.view(B, H, relevant),
        relevant_score=slot_score.view(B, H, relevant),
        relevancy=relevancy.view(B, H, T),
        span=span.view(B, H, T, 2),
    )
    return out, state


def screened_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    relevant: int,
    scale: float | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ScreeningState]:
    """Pure-PyTorch ``screened_attention`` (same arguments and results; see its docstring).

    Readable and float64-capable, not fast: a Python loop over the T queries runs the screening.
    float16/bfloat16 inputs are computed in float32 and the output cast back.
    """
    window, relevant, scale = check_inputs(q, k, v, window, relevant, scale)
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be a bool, got {return_state!r}")
    return _reference(q, k, v, window, relevant, scale, return_state)
