"""Pure-PyTorch reference of ``screened_attention`` (docs/attention.md): the definition of
correct. Imports only torch; takes checked arguments (the public ``screened_attention`` checks
them) and returns plain tensors.

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

__all__ = ["screened_attention_reference"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64; float32 and the half types accumulate in float32
    # (docs/numerics.md; the kernels' glue has the same rule as _library.acc_dtype)
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


def screened_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    relevant: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch ``screened_attention`` on checked arguments: readable and float64-capable,
    not fast (a Python loop over the T queries runs the screening). Differentiable in q, k, v
    with the screening decisions held fixed; double backward works.

    Args:
        q (torch.Tensor):
            queries of shape `(B, H, T, D)`.
        k (torch.Tensor):
            keys of shape `(B, H, T, D)`, dtype and device of `q`.
        v (torch.Tensor):
            values of shape `(B, H, T, Dv)`, dtype and device of `q`.
        window (int):
            `ν >= 1`, the most recent positions every query sees (itself included).
        relevant (int):
            `ρ >= 0`, the slots of the relevant set.
        scale (Optional[float]):
            factor on the logits. Default: `None`, meaning `1 / sqrt(D)` (1 for `D = 0`).

    Returns:
        out (torch.Tensor):
            `(B, H, T, Dv)`, dtype of `q`; float16/bfloat16 inputs are computed in float32.
        relevant_index (torch.Tensor):
            `(B, H, ρ)` int64, the key held by each slot after the last query; `-1` if empty.
        relevant_score (torch.Tensor):
            `(B, H, ρ)`, each slot's relevancy; `-inf` if empty.
        relevancy (torch.Tensor):
            `(B, H, T)`, every key's relevancy. Scores are float64 for float64 inputs, else
            float32.
        span (torch.Tensor):
            `(B, H, T, 2)` int32, the queries `[start, end)` during which each key sat in the
            relevant set; `[-1, -1]` if never.
    """
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    window = min(window, T + 1)  # a larger window sees and screens the same keys
    if scale is None:
        # D = 0 makes every logit 0 whatever the scale: attention is a plain average then.
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    acc = _acc_dtype(q.dtype)
    q_, k_, v_ = (x.reshape(B * H, T, x.shape[-1]).to(acc) for x in (q, k, v))

    history, slot_index, slot_score, relevancy, span = _screening_scan(
        q_.detach(), k_.detach(), window, relevant, scale
    )
    out = _attend(q_, k_, v_, history, window, scale).to(q.dtype).reshape(B, H, T, Dv)
    return (
        out,
        slot_index.view(B, H, relevant),
        slot_score.view(B, H, relevant),
        relevancy.view(B, H, T),
        span.view(B, H, T, 2),
    )
