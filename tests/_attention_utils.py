"""Shared helpers of the screened-attention tests: the reference with its state wrapped, and a
backend's run against the reference's, selections included (docs/numerics.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from _tolerances import TOL
from torch.utils._python_dispatch import TorchDispatchMode

from screening_attn.attention import ScreeningState, screened_attention_reference


def reference_with_state(q, k, v, window, relevant, scale=None):
    """``screened_attention_reference`` as ``(out, ScreeningState)``."""
    out, *state = screened_attention_reference(q, k, v, window, relevant, scale)
    return out, ScreeningState(*state)


def make_qkv(B, H, T, D, Dv=None, dtype=torch.float64, seed=0, scale_by=1.0):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64) * scale_by
    k = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype).requires_grad_() for x in (q, k, v))


# Below float32's smallest normal the CPU kernel's exp gives 0 (exp_nonpositive, screening.h)
# where torch gives a subnormal, so a key whose relevancy is subnormal in the reference is at 0
# there and ties with every other such key; subnormals carry no 1e-5 relative precision anyway.
SUBNORMAL = torch.finfo(torch.float32).tiny


def relevant_sets(span_row, index_row) -> list[frozenset]:
    """``R_0 … R_T`` of one (b, h) row: ``R_t`` (t < T) rebuilt from the spans (j ∈ R_t when
    start_j ≤ t < end_j), ``R_T`` from ``relevant_index`` (a key evicted by the last screening
    also ends at T, so the spans alone cannot tell it from one that stays)."""
    T = len(span_row)
    enter, leave = [[] for _ in range(T + 1)], [[] for _ in range(T + 1)]
    for j, (s, e) in enumerate(span_row):
        if s >= 0 and s < e:  # [T, T) enters after the last query: only in R_T
            enter[s].append(j)
            leave[e].append(j)
    sets, cur = [], set()
    for t in range(T):
        cur.difference_update(leave[t])
        cur.update(enter[t])
        sets.append(frozenset(cur))
    sets.append(frozenset(i for i in index_row if i >= 0))
    return sets


def _near(a: float, b: float, rtol: float) -> bool:
    """The documented near tie (docs/numerics.md): within ``rtol`` relative, or both
    subnormal in float32."""
    if abs(a) < SUBNORMAL and abs(b) < SUBNORMAL:
        return True
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def near_tie_decision(state, ref_state, n, window, relevant, rtol=1e-5):
    """The leaving key e of the first screening decision at which row ``n`` (of the flattened
    B·H rows) of the two runs differs, if that decision was a near tie; None otherwise.

    Walks ``R_0 … R_T`` of both runs; the first differing ``R_{t+1}`` was made by the screening
    of e = t-ν+1 from the same ``R_t``. Accepted only if that set was full (ρ keys: an empty
    slot takes any key, so no rounding can change that decision) and the two relevancies the
    decision compared, in the reference's run, are a near tie: the leaving key's and the slot
    minimum's (the key one run evicted, or the other run's minimum), or the two tied minima
    when both runs inserted e but evicted different keys."""
    span = state.span.flatten(0, 1)[n].tolist()
    ref_span = ref_state.span.flatten(0, 1)[n].tolist()
    sets = relevant_sets(span, state.relevant_index.flatten(0, 1)[n].tolist())
    ref_sets = relevant_sets(ref_span, ref_state.relevant_index.flatten(0, 1)[n].tolist())
    diff = [t for t in range(len(sets)) if sets[t] != ref_sets[t]]
    if not diff or diff[0] == 0:
        return None  # the same sets with other spans, or a set before any screening
    t = diff[0] - 1
    e = t - window + 1
    before, got, want = sets[t], sets[t + 1], ref_sets[t + 1]
    if e < 0 or len(before) != relevant:
        return None
    rel = ref_state.relevancy.flatten(0, 1)[n].double().tolist()
    own = state.relevancy.flatten(0, 1)[n].double().tolist()
    out_got, out_want = before - got, before - want  # the evicted key, if any
    if len(out_got) > 1 or len(out_want) > 1:
        return None
    if e in got and e in want and out_got and out_want:
        (a,), (b,) = out_got, out_want
        ok = _near(rel[a], rel[b], rtol)  # two tied slot minima
    elif e in got and e not in want and out_got and not out_want:
        (a,) = out_got
        ok = _near(rel[e], rel[a], rtol)  # the reference dropped e, the kernel evicted a
    elif e in want and e not in got and out_want and not out_got:
        (b,) = out_want
        kernel_min = min(own[j] for j in before)
        ok = _near(rel[e], rel[b], rtol) and _near(own[e], kernel_min, rtol)
    else:
        ok = False
    return e if ok else None


def near_tie_explains(state, ref_state, window, rtol=1e-5) -> bool:
    """True when every row whose selection differs first differs at a near-tie decision
    (``near_tie_decision``). Says nothing about the rest: ``check_against_reference`` checks
    it."""
    relevant = state.relevant_index.shape[-1]
    rows = differing_rows(state, ref_state)
    return all(
        near_tie_decision(state, ref_state, n, window, relevant, rtol) is not None for n in rows
    )


def differing_rows(state, ref_state) -> list[int]:
    """The flattened (b, h) rows whose spans or relevant slots differ."""
    span = (state.span != ref_state.span).flatten(0, 1).flatten(1).any(-1)
    index = (state.relevant_index != ref_state.relevant_index).flatten(0, 1).any(-1)
    return (span | index).nonzero().flatten().tolist()


def assert_state_consistent(state, window):
    """The state agrees with itself: every span starts at j + ν; replaying the screenings the
    spans record (who entered, who was evicted) gives ``relevant_index`` in slot order; each
    slot's score is its key's relevancy, bitwise; empty slots are a suffix with score -inf."""
    B, H, T = state.relevancy.shape
    relevant = state.relevant_index.shape[-1]
    spans = state.span.flatten(0, 1).tolist()
    index = state.relevant_index.flatten(0, 1).tolist()
    for n in range(B * H):
        entered, evicted = {}, {}
        for j, (s, e) in enumerate(spans[n]):
            if s == -1:
                assert e == -1, (n, j, s, e)
                continue
            assert s == j + window and s <= e <= T, (n, j, s, e)
            entered[s - 1] = j  # screened after query s - 1
            if e < T:
                evicted[e - 1] = j
        slots = []
        for t in range(T - 1):  # the last screening (after query T-1): from relevant_index
            if t in evicted:
                slots[slots.index(evicted[t])] = entered[t]
            elif t in entered:
                slots.append(entered[t])
                assert len(slots) <= relevant, (n, t)
        got = [i for i in index[n] if i >= 0]
        assert index[n] == got + [-1] * (relevant - len(got)), f"row {n}: empty slots not last"
        if T - 1 in entered and len(slots) == relevant:  # the last key overwrote one slot
            changed = [s for s, (a, b) in enumerate(zip(slots, got)) if a != b]
            assert len(changed) == 1 and got[changed[0]] == entered[T - 1], (n, slots, got)
        else:
            expected = slots + ([entered[T - 1]] if T - 1 in entered else [])
            assert got == expected, f"row {n}: slots {got}, the spans give {expected}"
    idx = state.relevant_index
    score = state.relevant_score
    stored = state.relevancy.gather(-1, idx.clamp(min=0))
    same = (score == stored) | (score.isnan() & stored.isnan())
    assert torch.where(idx >= 0, same, score == float("-inf")).all(), "slot scores"


def attention_magnitudes(q, k, v, g, mask, scale=None):
    """Masked softmax attention and its gradients for ``g`` evaluated on absolute values, in
    float64 (shapes of out, dq, dk, dv): P|V|, scale·|dS||K|, scale·|dS|ᵀ|Q|, Pᵀ|g| with
    |dS| = P ⊙ (|g||V|ᵀ + rowsum(P ⊙ |g||V|ᵀ)). Each bounds the sum its result rounds, element
    by element: the magnitude of the low-precision rule (``assert_low_precision_close``)."""
    q, k, v, g = (x.detach().double().cpu() for x in (q, k, v, g))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (scale * q @ k.transpose(-1, -2)).masked_fill(~mask.cpu(), float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num()  # a query without candidates (padding): 0
    dp = g.abs() @ v.abs().transpose(-1, -2)
    ds = p * (dp + (p * dp).sum(-1, keepdim=True))
    return (p @ v.abs(), scale * ds @ k.abs(), scale * ds.transpose(-1, -2) @ q.abs(),
            p.transpose(-1, -2) @ g.abs())  # fmt: skip


def _masked_sdpa(q, k, v, mask, scale, dtype):
    """Masked softmax attention (docs/attention.md) in ``dtype`` on the inputs cast to it, with
    its gradients for ``g``: the oracle of a run given its own candidate mask."""
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = F.scaled_dot_product_attention(*xs, attn_mask=mask, scale=scale)
    return out, xs


def _rows_close(got, want, exact, rows, rtol, atol, what, conditioned, events):
    """Element-wise, over the flattened (b, h) ``rows``: ``|got - want| <= atol + rtol |want|``;
    with ``conditioned`` (a peaked softmax amplifies rounding) an element may instead
    be as accurate as ``want`` is in its (b, h) row: ``|got - exact| <= 2 max_row |want - exact|
    + atol + rtol max_row |exact|`` (each element bounded; the row gives the scale)."""
    if not rows:
        return
    a, b, e = (x.detach().flatten(0, 1)[rows].double() for x in (got, want, exact))
    close = (a - b).abs() <= atol + rtol * b.abs()
    close |= (a == b) | (a.isnan() & b.isnan())
    if conditioned and not close.all():
        # the reference's error level in its (b, h) row: a property of the conditioning
        # scales of the row (its conditioning): the reference's error and the largest entry
        ref_err, big = ((x.abs().flatten(1).nan_to_num(0.0).amax(1)).view(-1, *[1] * (e.dim() - 1))
                        for x in (b - e, e))  # fmt: skip
        accurate = (a - e).abs() <= 2 * ref_err + atol + rtol * big
        if events is not None:
            events.append("ill-conditioned: checked against float64 SDPA")
        close |= accurate
    bad = (~close).nonzero()
    assert len(bad) == 0, (
        f"{what}: {len(bad)} elements differ, first at {bad[0].tolist()}: "
        f"{a[tuple(bad[0])].item()!r} vs {b[tuple(bad[0])].item()!r}"
    )


def check_against_reference(run, q, k, v, window, relevant, scale=None, conditioned=False,
                            events=None, exact=False):  # fmt: skip
    """``run(q, k, v, window, relevant, scale) -> (out, state)`` against the reference:
    forward, gradients and state, every tensor element-wise. Returns True if the selections
    are the same, False if some rows legitimately differ at a near tie (float32 only, and not
    with ``exact``: inputs whose relevancies every run computes bitwise alike, so that a tie
    is a tie in every run and must be decided by the slot rule).

    A differing row is accepted only as ``near_tie_decision`` says; its output and gradients
    are then checked against masked attention with the run's *own* candidate mask, its
    relevancies up to that decision against the reference's; every other row is compared in
    full. ``conditioned`` allows float32 outputs and gradients the float64 accuracy rule
    (``_rows_close``); ``events`` collects what happened (for Hypothesis)."""
    dtype = q.dtype
    rtol, atol = TOL[dtype]
    out, state = run(q, k, v, window, relevant, scale)
    ref, ref_state = reference_with_state(q, k, v, window, relevant, scale)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert state.relevant_score.dtype == ref_state.relevant_score.dtype
    assert state.relevancy.dtype == ref_state.relevancy.dtype
    assert state.span.dtype == torch.int32 and state.relevant_index.dtype == torch.int64
    assert state.span.shape == ref_state.span.shape
    assert state.relevant_index.shape == ref_state.relevant_index.shape
    state, ref_state = (ScreeningState(*(x.cpu() for x in (s.relevant_index, s.relevant_score,
                        s.relevancy, s.span))) for s in (state, ref_state))  # fmt: skip
    assert_state_consistent(state, window)
    differ = differing_rows(state, ref_state)
    excused = {}  # row -> the leaving key of its first differing decision
    if differ:
        assert dtype != torch.float64, "float64 selections must match the reference exactly"
        assert not exact, "selections of exact-arithmetic inputs must match the reference"
        for n in differ:
            e = near_tie_decision(state, ref_state, n, window, relevant)
            assert e is not None, f"row {n}: selection differs without a near tie"
            excused[n] = e
        if events is not None:
            events.append("selection differs at a near tie")
    rows = [n for n in range(ref.shape[0] * ref.shape[1]) if n not in excused]
    flat = lambda x: x.flatten(0, 1)  # noqa: E731
    assert torch.equal(flat(state.span)[rows], flat(ref_state.span)[rows])
    assert torch.equal(flat(state.relevant_index)[rows], flat(ref_state.relevant_index)[rows])
    _rows_close(state.relevant_score, ref_state.relevant_score, ref_state.relevant_score, rows,
                rtol, atol, "relevant_score", False, None)  # fmt: skip
    _rows_close(state.relevancy, ref_state.relevancy, ref_state.relevancy, rows, rtol, atol,
                "relevancy", False, None)  # fmt: skip
    for n, e in excused.items():  # the keys screened up to the differing decision
        _rows_close(state.relevancy[..., : e + 1], ref_state.relevancy[..., : e + 1],
                    ref_state.relevancy[..., : e + 1], [n], rtol, atol,
                    f"relevancy of row {n} up to key {e}", False, None)  # fmt: skip

    g = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), g))
    want = (ref, *torch.autograd.grad(ref, (q, k, v), g))
    exact = want
    if conditioned or excused:
        mask = state.candidate_mask(window).to(q.device)
        own, xs = _masked_sdpa(q, k, v, mask, scale, dtype)
        own64, xs64 = _masked_sdpa(q, k, v, mask, scale, torch.float64)
        own_all = (own, *torch.autograd.grad(own, xs, g))
        exact = (own64, *torch.autograd.grad(own64, xs64, g.double()))
        if excused:  # the excused rows' oracle: attention with the run's own sets
            pick = torch.zeros(ref.shape[0] * ref.shape[1], dtype=torch.bool)
            pick[list(excused)] = True
            pick = pick.view(ref.shape[0], ref.shape[1], 1, 1).to(q.device)
            want = tuple(
                torch.where(pick, o.detach().to(w.dtype), w) for w, o in zip(want, own_all)
            )
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), got, want, exact):
        _rows_close(a, b, e, list(range(ref.shape[0] * ref.shape[1])), rtol, atol, name,
                    conditioned or bool(excused), events)  # fmt: skip
    return not excused


def check_nan_locality(run, q, k, v, positions, window=6, relevant=3):
    """A NaN and a +Inf at ``positions[name]`` of q, k or v give exactly the reference's pattern
    of non-finite values, forward and backward (the reference's own locality is tested against
    the candidate mask in test_attention_reference.py).

    ``run(q, k, v, window, relevant) -> out``."""
    for name, index in positions.items():
        for bad in (math.nan, math.inf):
            args = {n: x.detach().clone() for n, x in zip("qkv", (q, k, v))}
            args[name][index] = bad
            args = {n: x.requires_grad_() for n, x in args.items()}
            out = run(*args.values(), window, relevant)
            ref, _ = reference_with_state(*args.values(), window, relevant)
            what = f"{name}={bad}"
            assert torch.equal(out.isnan(), ref.isnan()), what
            assert 0 < (~out.isfinite()).sum() < out.numel() // 2, what
            torch.testing.assert_close(out, ref, equal_nan=True, msg=what)
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, tuple(args.values()), g)
            ref_grads = torch.autograd.grad(ref, tuple(args.values()), g)
            for a, b in zip(grads, ref_grads):
                assert torch.equal(a.isnan(), b.isnan()), what
                torch.testing.assert_close(a, b, equal_nan=True, msg=what)


def tied_decisions(ref_state, window) -> tuple[int, int]:
    """How many of the reference's screenings decided a tie, over all rows: ``(equal, tied)``,
    ``equal`` where the set was full and the leaving key's relevancy equalled the slot minimum
    exactly (dropped: ``>=`` would evict), ``tied`` where the key entered over two or more slots
    tied at the minimum (the lowest slot is overwritten: another slot rule evicts another key).
    A tie test asserts both are non-zero, or it tests nothing."""
    relevant = ref_state.relevant_index.shape[-1]
    T = ref_state.relevancy.shape[-1]
    equal = tied = 0
    spans = ref_state.span.flatten(0, 1).tolist()
    index = ref_state.relevant_index.flatten(0, 1).tolist()
    rels = ref_state.relevancy.flatten(0, 1).tolist()
    for span, idx, rel in zip(spans, index, rels):
        sets = relevant_sets(span, idx)
        for t in range(window - 1, T):
            e, before = t - window + 1, sets[t]
            if relevant == 0 or len(before) < relevant:
                continue
            low = min(rel[j] for j in before)
            equal += rel[e] == low
            tied += e in sets[t + 1] and sum(rel[j] == low for j in before) >= 2
    return equal, tied


class OpsCalled(TorchDispatchMode):
    """Records the names of the ops dispatched under it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))
