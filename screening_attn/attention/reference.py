"""Pure-PyTorch reference of ``screened_attention`` (docs/attention.md, docs/streaming.md): the
definition of correct. Imports only torch; takes checked arguments (the public
``screened_attention`` and ``ScreenedKVCache`` check them) and returns plain tensors.

Two passes, the shape the kernels follow:

1. ``_scan`` (no grad, sequential in t, vectorized over the B·Hkv rows and the G query heads of a
   group): per query, the softmax over the ν window keys and the ρ slots, relevancy accumulation
   (the group mean) for the window keys, then the slot rule for the key leaving the window. It
   records ``R_t`` for every query.
2. ``_attend`` (differentiable, all queries at once): with the sets fixed, gather the ν+ρ
   candidate keys and values of every query and run a masked softmax attention.

Both run on a *buffer* per row: the slot keys of an initial state, then the last ν-1 keys of the
earlier positions (their relevancy so far), then the new keys. With no initial state the buffer
is the sequence itself, so one call and a stream of calls (``screened_attention_stream``) are the
same computation. Grouped heads never repeat k or v: each of the G query heads of a group reads
the group's gathered keys in place.

Memory is O(B·H·T·(ν+ρ)·D); nothing of size T×T is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["StreamState", "screened_attention_reference", "screened_attention_stream"]


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


def _query_windows(
    n: int, prefix: int, window: int, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The window of the queries at sequence positions ``prefix … prefix+n-1``.

    Returns ``pos (n, ν)``: the sequence position of each window column, clamped to 0, and
    ``ok (N, n, ν)``: the column holds a real key (not before the start, not padded)."""
    pos = _window_positions(prefix + n, window, valid.device)[prefix:]
    ok = pos >= 0
    pos = pos.clamp(min=0)
    return pos, ok & valid[:, pos]


@torch.no_grad()
def _scan(
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    relevancy0: torch.Tensor,
    slot_index0: torch.Tensor,
    slot_score0: torch.Tensor,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the screening recurrence for N independent rows of G query heads each.

    Args:
        q: ``(N, G, n, D)`` the new queries, in the compute dtype.
        k: ``(N, R0 + S, D)`` the buffer: R0 initial slot keys, then the sequence of S = P + n
            keys (P earlier keys, then the n new ones).
        valid: ``(N, S)`` bool, the sequence keys that are real tokens.
        relevancy0: ``(N, P)`` the relevancy so far of the P earlier keys.
        slot_index0, slot_score0: ``(N, ρ)`` the initial slots as buffer indices (-1 empty) and
            their scores (-inf empty).

    Returns:
        ``history (N, n, ρ)`` int64: the slots (buffer indices) seen by each new query;
        ``slot_index (N, ρ)`` buffer indices and ``slot_score (N, ρ)``: the slots after the last
        query; ``relevancy (N, S)``; ``span (N, R0 + S, 2)`` int32 per buffer entry, in the
        query numbers of this call.
    """
    N, G, n, _ = q.shape
    X, S = k.shape[1], valid.shape[1]
    R0, P = X - S, S - n
    nu, rho = window, slot_index0.shape[1]
    device, dtype = q.device, q.dtype
    neg_inf = float("-inf")

    # Window logits of every query at once, (N, G, n, ν): this part is parallel. One product
    # per query head of the group, each exactly the product of the one-head op.
    win_pos, win_ok = _query_windows(n, P, nu, valid)
    k_win = _gather_rows(k, (R0 + win_pos).expand(N, n, nu))  # (N, n, ν, D)
    win_logits = torch.stack(
        [scale * torch.einsum("ntd,ntid->nti", q[:, g], k_win) for g in range(G)], dim=1
    )
    # masked_fill, not an added -inf bias: NaN + -inf is NaN, and padding gathers key 0.
    win_logits = win_logits.masked_fill(~win_ok[:, None], neg_inf)
    q_valid = valid[:, P:]

    slot_index = slot_index0.clone()
    slot_score = slot_score0.clone()
    history = torch.empty((N, n, rho), dtype=torch.int64, device=device)
    relevancy = torch.cat([relevancy0, torch.zeros((N, n), dtype=dtype, device=device)], dim=1)
    span = torch.full((N, X, 2), -1, dtype=torch.int32, device=device)
    rows = torch.arange(N, device=device)

    for i in range(n):
        t = P + i  # the query's sequence position
        history[:, i] = slot_index
        logits = win_logits[:, :, i]  # (N, G, ν)
        has_slot = slot_index >= 0
        if rho > 0:
            k_slot = _gather_rows(k, slot_index.clamp(min=0))  # (N, ρ, D)
            slot_logits = torch.stack(
                [scale * torch.einsum("nd,nsd->ns", q[:, g, i], k_slot) for g in range(G)], dim=1
            )
            slot_logits = slot_logits.masked_fill(~has_slot[:, None], neg_inf)
            logits = torch.cat([logits, slot_logits], dim=-1)
        alpha = torch.softmax(logits, dim=-1)

        # Relevancy of the window keys t-ν+1 .. t (the valid part of the first ν columns): the
        # group mean, from real queries that have a candidate at all (else alpha is NaN).
        counts = q_valid[:, i] & (win_ok[:, i].any(-1) | has_slot.any(-1))
        gained = torch.where(counts[:, None], alpha[..., :nu].mean(dim=1), 0)
        lo = max(0, t - nu + 1)
        relevancy[:, lo : t + 1] += gained[:, nu - (t + 1 - lo) : nu]

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
        # strict: a tie is dropped; a padded key takes no slot
        insert = (has_empty | (r_e > slot_score[rows, target])) & valid[:, e]

        # Spans: the evicted key leaves before query i+1; the new key sits in from query i+1.
        evicted = insert & (old_index >= 0)
        old_safe = old_index.clamp(min=0)
        span[rows, old_safe, 1] = torch.where(evicted, i + 1, span[rows, old_safe, 1])
        span[:, R0 + e, 0] = torch.where(insert, i + 1, -1)
        span[:, R0 + e, 1] = torch.where(insert, n, -1)

        slot_index[rows, target] = torch.where(insert, R0 + e, old_index)
        slot_score[rows, target] = torch.where(insert, r_e, slot_score[rows, target])

    return history, slot_index, slot_score, relevancy, span


def _screening_scan(
    q: torch.Tensor, k: torch.Tensor, window: int, relevant: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_scan`` of one call with one query head per row and no padding, on ``q``, ``k``
    ``(N, T, D)``: ``history (N, T, ρ)``, ``slot_index``, ``slot_score (N, ρ)`` (positions),
    ``relevancy (N, T)``, ``span (N, T, 2)`` (the unit that ``scan.chunked_screening_scan``
    reproduces bitwise)."""
    N, T, _ = q.shape
    valid = torch.ones((N, T), dtype=torch.bool, device=q.device)
    empty = q.new_empty((N, 0))
    slot_index0 = torch.full((N, relevant), -1, dtype=torch.int64, device=q.device)
    slot_score0 = torch.full((N, relevant), float("-inf"), dtype=q.dtype, device=q.device)
    return _scan(q[:, None], k, valid, empty, slot_index0, slot_score0, window, scale)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    history: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Masked softmax attention over each query's candidates, differentiable in q, k, v.

    Args:
        q: ``(N, G, n, D)``; k: ``(N, R0 + S, D)``, v: ``(N, R0 + S, Dv)`` the buffers of
            ``_scan``; valid: ``(N, S)``; history: ``(N, n, ρ)`` slots seen by each query.

    Returns:
        ``(N, G, n, Dv)``; a query without any candidate gets zeros.
    """
    N, G, n, _ = q.shape
    S = valid.shape[1]
    R0 = k.shape[1] - S
    win_pos, win_ok = _query_windows(n, S - n, window, valid)
    # window and slots are disjoint
    cand = torch.cat([(R0 + win_pos).expand(N, n, window), history.clamp(min=0)], dim=-1)
    ok = torch.cat([win_ok, history >= 0], dim=-1)  # (N, n, ν+ρ)
    has = ok.any(dim=-1, keepdim=True)  # (N, n, 1)
    # Padding candidates gather some real key/value: zero them so that nothing of that row,
    # NaN included, reaches an output or a gradient through a padding entry, and mask their
    # logits *after* the product (probability and gradient exactly 0). A query without any
    # candidate keeps its (zero) logits unmasked, so its softmax and its gradient stay finite,
    # and its weights are then set to 0.
    k_c = _gather_rows(k, cand).masked_fill(~ok[..., None], 0)  # (N, n, ν+ρ, D)
    v_c = _gather_rows(v, cand).masked_fill(~ok[..., None], 0)  # (N, n, ν+ρ, Dv)
    outs = []
    for g in range(G):
        logits = scale * torch.einsum("ntd,ntcd->ntc", q[:, g], k_c)
        logits = logits.masked_fill(~ok & has, float("-inf"))
        p = torch.softmax(logits, dim=-1).masked_fill(~has, 0)
        outs.append(torch.einsum("ntc,ntcd->ntd", p, v_c))
    return torch.stack(outs, dim=1)


@dataclass
class StreamState:
    """What later queries of a stream can still see, per (b, KV head) (docs/streaming.md).

    Keys and values have the inputs' dtype; scores and relevancies the accumulation dtype.

    Attributes:
        seen (int): positions seen so far (padded ones included).
        keys, values: ``(B, Hkv, P, D)``, ``(B, Hkv, P, Dv)``: the last ``P = min(ν-1, seen)``
            positions, the window of the next query without itself.
        relevancy: ``(B, Hkv, P)`` their relevancy so far.
        valid: ``(B, P)`` bool, which of them are real tokens.
        slot_keys, slot_values: ``(B, Hkv, R, D)``, ``(B, Hkv, R, Dv)``: the relevant set, in
            slot order; ``R <= ρ`` (slots fill in order and never empty, so the columns past
            the last one ever filled are not stored).
        slot_index: ``(B, Hkv, R)`` int64, each slot's position; -1 when empty.
        slot_score: ``(B, Hkv, R)`` each slot's relevancy; -inf when empty.
    """

    seen: int
    keys: torch.Tensor
    values: torch.Tensor
    relevancy: torch.Tensor
    valid: torch.Tensor
    slot_keys: torch.Tensor
    slot_values: torch.Tensor
    slot_index: torch.Tensor
    slot_score: torch.Tensor

    @classmethod
    def empty(cls, B: int, Hkv: int, D: int, Dv: int, dtype, device) -> StreamState:
        """The state before the first position."""

        def z(*shape, dt=dtype):
            return torch.empty(shape, dtype=dt, device=device)

        acc = _acc_dtype(dtype)
        return cls(
            0,
            z(B, Hkv, 0, D),
            z(B, Hkv, 0, Dv),
            z(B, Hkv, 0, dt=acc),
            z(B, 0, dt=torch.bool),
            z(B, Hkv, 0, D),
            z(B, Hkv, 0, Dv),
            z(B, Hkv, 0, dt=torch.int64),
            z(B, Hkv, 0, dt=acc),
        )

    def index_select(self, index: torch.Tensor) -> StreamState:
        """The state of the batch rows ``index`` (any length, repeats allowed)."""
        pick = [
            x.index_select(0, index)
            for x in (
                self.keys,
                self.values,
                self.relevancy,
                self.valid,
                self.slot_keys,
                self.slot_values,
                self.slot_index,
                self.slot_score,
            )
        ]
        return StreamState(self.seen, *pick)


def stream_start(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    relevant: int,
    state: StreamState | None,
) -> tuple[StreamState, int]:
    """``state`` (the empty one at a stream's start) and the slot columns of this call's result,
    ``min(ρ, R0 + keys this call screens)``: the columns past the R0 initial slots plus every key
    leaving the window in this call can never fill (shared with the kernels' glue)."""
    if state is None:
        B, Hkv, D, Dv = k.shape[0], k.shape[1], k.shape[-1], v.shape[-1]
        state = StreamState.empty(B, Hkv, D, Dv, q.dtype, q.device)
    R0, S = state.slot_keys.shape[2], state.keys.shape[2] + q.shape[2]
    return state, min(relevant, R0 + max(S - window + 1, 0))


def screened_attention_stream(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    relevant: int,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    state: StreamState | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, StreamState]:
    """Screened attention of the next n positions of a stream, from ``state`` (None: the
    start). Differentiable in q, k, v with the screening decisions held fixed.

    Args:
        q: ``(B, H, n, D)``; k: ``(B, Hkv, n, D)``; v: ``(B, Hkv, n, Dv)`` with ``H % Hkv == 0``
            (query head h reads KV head ``h // (H / Hkv)``).
        window, relevant: ν >= 1, ρ >= 0. scale: the factor on the logits.
        key_padding_mask: ``(B, n)`` bool, True for a real token; None: all real.
        state: what the earlier positions left (checked to match by the caller).

    Returns:
        ``out (B, H, n, Dv)`` (dtype of q; zeros for a query without any candidate);
        ``relevant_index (B, Hkv, R)`` int64 positions and ``relevant_score (B, Hkv, R)`` of the
        slots after the last query, ``R = min(ρ, slots ever fillable)``, empty slots -1/-inf;
        ``relevancy (B, Hkv, n)`` of the new keys (so far, for those still in the window);
        ``span (B, Hkv, n, 2)`` int32 of the new keys, in the query numbers of this call;
        the next ``StreamState``.
    """
    B, H, n, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G, N = (H // Hkv if Hkv else 1), B * Hkv  # H = Hkv = 0 is an empty call
    acc = _acc_dtype(q.dtype)
    state, rho = stream_start(q, k, v, window, relevant, state)
    P, R0 = state.keys.shape[2], state.slot_keys.shape[2]
    S = P + n
    # A window wider than the sequence sees and screens the same keys.
    nu = min(window, S + 1)
    if key_padding_mask is None:
        key_padding_mask = torch.ones((B, n), dtype=torch.bool, device=q.device)
    valid_b = torch.cat([state.valid, key_padding_mask], dim=1)  # (B, S)
    valid = valid_b[:, None].expand(B, Hkv, S).reshape(N, S)

    # The buffers: initial slots, then the earlier positions, then the new ones.
    k_all = torch.cat([state.slot_keys, state.keys, k], dim=2)
    v_all = torch.cat([state.slot_values, state.values, v], dim=2)
    k_x = k_all.reshape(N, R0 + S, D).to(acc)
    v_x = v_all.reshape(N, R0 + S, Dv).to(acc)
    q_ = q.reshape(N, G, n, D).to(acc)

    filled = state.slot_index.reshape(N, R0) >= 0
    slot_index0 = torch.full((N, rho), -1, dtype=torch.int64, device=q.device)
    slot_index0[:, :R0] = torch.where(filled, torch.arange(R0, device=q.device), -1)
    slot_score0 = torch.full((N, rho), float("-inf"), dtype=acc, device=q.device)
    slot_score0[:, :R0] = state.slot_score.reshape(N, R0)

    history, slot_x, slot_score, relevancy, span = _scan(
        q_.detach(),
        k_x.detach(),
        valid,
        state.relevancy.reshape(N, P).to(acc),
        slot_index0,
        slot_score0,
        nu,
        scale,
    )
    out = _attend(q_, k_x, v_x, valid, history, nu, scale).to(q.dtype).reshape(B, H, n, Dv)

    return _finish(
        out,
        state,
        window,
        k_all,
        v_all,
        valid_b,
        relevancy.reshape(B, Hkv, S),
        slot_x.reshape(B, Hkv, rho),
        slot_score.reshape(B, Hkv, rho),
        span.reshape(B, Hkv, R0 + S, 2),
    )


def _finish(
    out: torch.Tensor,
    state: StreamState,
    window: int,
    k_all: torch.Tensor,
    v_all: torch.Tensor,
    valid_b: torch.Tensor,
    relevancy: torch.Tensor,
    slot_x: torch.Tensor,
    slot_score: torch.Tensor,
    span: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, StreamState]:
    """The return value of ``screened_attention_stream`` (shared with the kernels' glue) from a
    scan over the buffers ``k_all``, ``v_all`` ``(B, Hkv, R0 + S, ·)`` of ``state`` and n new
    positions: ``relevancy (B, Hkv, S)``, slots ``slot_x`` (buffer rows, -1 empty) and
    ``slot_score (B, Hkv, R)``, ``span (B, Hkv, R0 + S, 2)``."""
    B, Hkv, R0 = state.slot_index.shape
    P, S, rho = state.keys.shape[2], valid_b.shape[1], slot_x.shape[2]
    n = S - P
    N = B * Hkv
    D, Dv = k_all.shape[-1], v_all.shape[-1]
    slot_x = slot_x.reshape(N, rho)
    # The next state: the last ν-1 positions and the slots' keys, values and positions.
    keep = min(window - 1, S)
    x_pos = torch.cat(
        [
            state.slot_index.reshape(N, R0),
            torch.arange(state.seen - P, state.seen + n, device=k_all.device).expand(N, S),
        ],
        dim=1,
    )
    slot_pos = torch.where(slot_x >= 0, x_pos.gather(1, slot_x.clamp(min=0)), -1)
    k_flat, v_flat = k_all.detach().reshape(N, R0 + S, D), v_all.detach().reshape(N, R0 + S, Dv)
    # Copies, not views: a view of the last keys would keep this call's whole buffer alive.
    next_state = StreamState(
        state.seen + n,
        k_all[:, :, R0 + S - keep :].detach().clone(),
        v_all[:, :, R0 + S - keep :].detach().clone(),
        relevancy[:, :, S - keep :].clone(),
        valid_b[:, S - keep :].clone(),
        _gather_rows(k_flat, slot_x.clamp(min=0)).reshape(B, Hkv, rho, D),
        _gather_rows(v_flat, slot_x.clamp(min=0)).reshape(B, Hkv, rho, Dv),
        slot_pos.reshape(B, Hkv, rho),
        slot_score,
    )
    return (
        out,
        next_state.slot_index,
        next_state.slot_score,
        relevancy[:, :, P:],
        span[:, :, R0 + P :],
        next_state,
    )


def screened_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    relevant: int,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch ``screened_attention`` on checked arguments: readable and float64-capable,
    not fast (a Python loop over the T queries runs the screening). Differentiable in q, k, v
    with the screening decisions held fixed; double backward works.

    Args:
        q (torch.Tensor):
            queries of shape `(B, H, T, D)`.
        k (torch.Tensor):
            keys of shape `(B, Hkv, T, D)` with `H % Hkv == 0`, dtype and device of `q`.
        v (torch.Tensor):
            values of shape `(B, Hkv, T, Dv)`, dtype and device of `q`.
        window (int):
            `ν >= 1`, the most recent positions every query sees (itself included).
        relevant (int):
            `ρ >= 0`, the slots of the relevant set (one set per KV head).
        scale (Optional[float]):
            factor on the logits. Default: `None`, meaning `1 / sqrt(D)` (1 for `D = 0`).
        key_padding_mask (Optional[torch.Tensor]):
            `(B, T)` bool, True for a real token. Default: `None`, no padding.

    Returns:
        out (torch.Tensor):
            `(B, H, T, Dv)`, dtype of `q`; float16/bfloat16 inputs are computed in float32.
        relevant_index (torch.Tensor):
            `(B, Hkv, ρ)` int64, the key held by each slot after the last query; `-1` if empty.
        relevant_score (torch.Tensor):
            `(B, Hkv, ρ)`, each slot's relevancy; `-inf` if empty.
        relevancy (torch.Tensor):
            `(B, Hkv, T)`, every key's relevancy (the mean over the group's query heads).
            Scores are float64 for float64 inputs, else float32.
        span (torch.Tensor):
            `(B, Hkv, T, 2)` int32, the queries `[start, end)` during which each key sat in the
            relevant set; `[-1, -1]` if never.
    """
    D = q.shape[-1]
    if scale is None:
        # D = 0 makes every logit 0 whatever the scale: attention is a plain average then.
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    out, slot_index, slot_score, relevancy, span, _ = screened_attention_stream(
        q, k, v, window, relevant, scale, key_padding_mask
    )
    # The columns that could never fill are empty slots of the state.
    missing = relevant - slot_index.shape[-1]
    slot_index = torch.nn.functional.pad(slot_index, (0, missing), value=-1)
    slot_score = torch.nn.functional.pad(slot_score, (0, missing), value=float("-inf"))
    return out, slot_index, slot_score, relevancy, span
