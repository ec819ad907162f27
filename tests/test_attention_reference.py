"""The screened_attention reference against independent oracles (docs/attention.md,
docs/backends.md).

Oracles: SDPA with an independently built mask (sliding window, full causal), SDPA with the mask
rebuilt from the returned spans (output and gradients given the sets), a slow scalar Python
implementation of the whole §1 scan (the selections), and hand-derived slots for a tie case.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from _attention_utils import reference_with_state
from _ids import case_id
from _imports import non_stdlib_imports
from _tolerances import ROUNDING, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from screening_attn import _backend
from screening_attn.attention import ScreeningState, screened_attention_reference
from screening_attn.attention import reference as attention_reference
from screening_attn.attention import screened_attention as public_screened_attention

# The oracle tests run the reference through the public entry point (its checks included);
# the compiled backends are compared with the reference in their own test files.
screened_attention = functools.partial(public_screened_attention, backend="reference")

NEG = -1.0e4  # a logit this far below the others gets probability exactly 0 (exp underflows)


# ----------------------------------------------------------------------------- helpers


def cases(shapes, dtypes=(torch.float64,)):
    """pytest params ``(B, H, T, D, Dv, window, relevant, dtype)`` with readable ids."""
    return [
        pytest.param(
            B, H, T, D, Dv, w, r, dt,
            id=case_id(B=B, H=H, T=T, D=D, Dv=Dv if Dv != D else None, w=w, r=r, dtype=dt),
        )
        for B, H, T, D, Dv, w, r in shapes
        for dt in dtypes
    ]  # fmt: skip


CASE_ARGS = "B,H,T,D,Dv,window,relevant,dtype"


def make_qkv(B, H, T, D, Dv=None, dtype=torch.float64, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v))


def sliding_window_mask(T, window):
    """M[t, j] = t - window < j <= t, built with no help from the code under test."""
    t = torch.arange(T).view(T, 1)
    j = torch.arange(T).view(1, T)
    return (j <= t) & (t - j < window)


def out_and_grads(fn, q, k, v, seed=1, g=None):
    """``fn``'s output and the gradients of <out, g> (g: given, or random from ``seed``)."""
    out = fn(q, k, v)
    if g is None:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    g = g.to(out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    return (out, *grads)


def assert_matches_sdpa(q, k, v, window, relevant, scale=None, *, mask=None, is_causal=False):
    """Reference output and q/k/v gradients equal SDPA with ``mask`` (or ``is_causal``)."""

    def ours(q, k, v):
        return screened_attention_reference(q, k, v, window, relevant, scale)[0]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale
        )

    for name, a, e in zip(
        ("out", "dq", "dk", "dv"), out_and_grads(ours, q, k, v), out_and_grads(sdpa, q, k, v)
    ):
        assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")


def scalar_screening(q, k, window, relevant, scale=None):
    """docs/attention.md computed literally: per (b, h), per query, in Python floats (float64).

    Returns ``(state_fields, mask)``: the four ScreeningState tensors and the (B, H, T, T)
    mask of the candidate sets C_t recorded query by query (not rebuilt from spans).
    """
    B, H, T, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    rho = relevant
    index = torch.full((B, H, rho), -1, dtype=torch.int64)
    score = torch.full((B, H, rho), -math.inf, dtype=torch.float64)
    relevancy = torch.zeros(B, H, T, dtype=torch.float64)
    span = torch.full((B, H, T, 2), -1, dtype=torch.int32)
    mask = torch.zeros(B, H, T, T, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            qs, ks = q[b, h].tolist(), k[b, h].tolist()
            slots = [None] * rho  # each None or [position, r]
            r = [0.0] * T
            start, end = [-1] * T, [-1] * T
            for t in range(T):
                win = list(range(max(0, t - window + 1), t + 1))
                rel = [s[0] for s in slots if s is not None]
                cands = win + rel
                for j in cands:
                    mask[b, h, t, j] = True
                logits = [scale * sum(x * y for x, y in zip(qs[t], ks[j])) for j in cands]
                top = max(logits)
                w = [math.exp(s - top) for s in logits]
                z = sum(w)
                for j, wj in zip(cands, w):
                    if j in win:
                        r[j] += wj / z
                e = t - window + 1
                if e < 0 or rho == 0:
                    continue
                empty = [i for i in range(rho) if slots[i] is None]
                if empty:
                    i = empty[0]
                else:
                    i = min(range(rho), key=lambda i: slots[i][1])  # first minimum
                    if not r[e] > slots[i][1]:
                        continue  # dropped for good
                    end[slots[i][0]] = t + 1
                slots[i] = [e, r[e]]
                start[e], end[e] = t + 1, T
            for i, s in enumerate(slots):
                if s is not None:
                    index[b, h, i], score[b, h, i] = s[0], s[1]
            relevancy[b, h] = torch.tensor(r, dtype=torch.float64)
            span[b, h] = torch.tensor(list(zip(start, end)), dtype=torch.int32).view(T, 2)
    return (index, score, relevancy, span), mask


def assert_state_matches_oracle(state, q, k, window, relevant, scale=None):
    (index, score, relevancy, span), mask = scalar_screening(
        q.detach().double(), k.detach().double(), window, relevant, scale
    )
    torch.testing.assert_close(state.relevant_index, index, rtol=0, atol=0)
    torch.testing.assert_close(state.span, span, rtol=0, atol=0)
    assert_close(state.relevant_score.double(), score, dtype=torch.float64)
    assert_close(state.relevancy.double(), relevancy, dtype=torch.float64)
    torch.testing.assert_close(state.candidate_mask(window), mask, rtol=0, atol=0)


def check_general(q, k, v, window, relevant, scale=None):
    """State vs the scalar oracle; output and gradients vs SDPA given the state's mask."""
    _, state = reference_with_state(q, k, v, window, relevant, scale)
    assert_state_matches_oracle(state, q, k, window, relevant, scale)
    mask = state.candidate_mask(window)
    assert_matches_sdpa(q, k, v, window, relevant, scale, mask=mask)


def saturated_qk(B, H, T, seed, dtype=torch.float64):
    """Keys one-hot (D = T, scale 1), so logit s_tj = q[t, j]; q[t, j] is 0 or NEG at random.

    Every attention weight is then exactly 0 or 1/n, and relevancies tie exactly and often.
    """
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(B, H, T, T, generator=g) < 0.5
    q = torch.where(active, 0.0, NEG).to(dtype)
    k = torch.eye(T, dtype=dtype).expand(B, H, T, T).clone()
    return q, k


# ----------------------------------------------------------------------------- oracles

SHAPES = [  # (B, H, T, D, Dv, window, relevant)
    (1, 1, 1, 4, 4, 1, 0),
    (1, 1, 1, 3, 2, 4, 3),
    (2, 1, 5, 3, 3, 8, 2),  # T < window
    (1, 2, 17, 5, 5, 1, 3),  # window 1
    (2, 3, 63, 16, 16, 4, 2),
    (1, 3, 33, 7, 5, 5, 40),  # relevant >= T
    (2, 2, 40, 8, 3, 3, 7),
]


WINDOW_ONLY = [(B, H, T, D, Dv, w, 0) for B, H, T, D, Dv, w, _ in SHAPES]


@pytest.mark.parametrize(CASE_ARGS, cases(WINDOW_ONLY, (torch.float64, torch.float32)))
def test_relevant0_is_sliding_window(B, H, T, D, Dv, window, relevant, dtype):
    q, k, v = make_qkv(B, H, T, D, Dv, dtype)
    mask = sliding_window_mask(T, window)
    assert_matches_sdpa(q, k, v, window, relevant, mask=mask)


FULL_CASES = [  # (B, H, T, D, Dv, window, relevant), all with window >= T or relevant >= T-window
    (1, 1, 1, 2, 2, 1, 0),
    (2, 2, 9, 4, 4, 9, 0),
    (1, 2, 9, 4, 6, 20, 3),
    (2, 1, 16, 5, 5, 4, 12),
    (1, 3, 21, 3, 3, 1, 20),
    (1, 1, 12, 4, 4, 2, 100),
]


@pytest.mark.parametrize(CASE_ARGS, cases(FULL_CASES, (torch.float64, torch.float32)))
def test_full_causal(B, H, T, D, Dv, window, relevant, dtype):
    q, k, v = make_qkv(B, H, T, D, Dv, dtype)
    assert_matches_sdpa(q, k, v, window, relevant, is_causal=True)


@pytest.mark.parametrize(CASE_ARGS, cases(SHAPES))
def test_general_against_scalar_oracle_and_sdpa(B, H, T, D, Dv, window, relevant, dtype):
    q, k, v = make_qkv(B, H, T, D, Dv, dtype, seed=T)
    check_general(q, k, v, window, relevant)


def test_general_with_scale():
    q, k, v = make_qkv(2, 2, 30, 6, 4, torch.float64, seed=3)
    check_general(q, k, v, 3, 4, scale=2.5)


@pytest.mark.parametrize(CASE_ARGS, cases(SHAPES[3:], (torch.float32,)))
def test_float32_given_its_sets(B, H, T, D, Dv, window, relevant, dtype):
    """float32: output/gradients vs float32 SDPA with the run's own mask; selections vs the
    float64 scalar oracle on the same (float32) inputs. Seeds are fixed, so no near-tie can
    make this flaky: a near-tie would fail deterministically."""
    q, k, v = make_qkv(B, H, T, D, Dv, dtype, seed=T)
    _, state = reference_with_state(q, k, v, window, relevant)
    assert state.relevant_score.dtype == torch.float32
    (index, score, relevancy, span), _ = scalar_screening(
        q.detach().double(), k.detach().double(), window, relevant
    )
    torch.testing.assert_close(state.relevant_index, index, rtol=0, atol=0)
    torch.testing.assert_close(state.span, span, rtol=0, atol=0)
    assert_close(state.relevant_score, score.float())
    assert_close(state.relevancy, relevancy.float())
    assert_matches_sdpa(q, k, v, window, relevant, mask=state.candidate_mask(window))


# ----------------------------------------------------------------------------- exact ties


def test_slot_rule_hand_derived():
    """ν = 2, ρ = 2, T = 7. Keys are one-hot and scale = 1, so s_tj = q[t, j]; each query's
    *active* candidates get logit 0 and the others NEG (probability exactly 0), so the active
    ones share the mass equally and every r below is exact. r_j = α_jj + α_{j+1,j}.

        query  window  R_t    active   α of window keys           screening after the query
        0      {0}     -      {0}      α00=1
        1      {0,1}   -      {1}      α10=0, α11=1               key 0: r=1   -> empty slot 0
        2      {1,2}   [0]    {1,2}    α21=.5, α22=.5             key 1: r=1.5 -> empty slot 1
        3      {2,3}   [0,1]  {2,3}    α32=.5, α33=.5             key 2: r=1, min = slot 0 (1);
                                                                    1 > 1 is false -> dropped
        4      {3,4}   [0,1]  {3}      α43=1, α44=0               key 3: r=1.5 > 1 -> slot 0,
                                                                    key 0 evicted
        5      {4,5}   [3,1]  {5}      α54=0, α55=1               key 4: r=0, dropped
        6      {5,6}   [3,1]  {5}      α65=1, α66=0               key 5: r=2; slots tie at 1.5
                                                                    -> lowest slot 0: key 3 out
    Final slots [5, 1] with scores [2, 1.5]. Breaking the tie toward slot 1, using >= instead of
    >, or taking a top-2 by sort would each give a different answer.
    """
    T, window, relevant = 7, 2, 2
    active = {0: [0], 1: [1], 2: [1, 2], 3: [2, 3], 4: [3], 5: [5], 6: [5]}
    q = torch.full((1, 1, T, T), NEG, dtype=torch.float64)
    for t, js in active.items():
        q[0, 0, t, js] = 0.0
    k = torch.eye(T, dtype=torch.float64).view(1, 1, T, T)
    v = torch.randn(1, 1, T, 3, dtype=torch.float64)
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    # Every weight is 0, 1/2 or 1 whatever the dtype, so the result is exact in all of them.
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        score_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        _, state = reference_with_state(
            q.to(dtype), k.to(dtype), v.to(dtype), window, relevant, scale=1.0
        )
        assert state.relevant_index.tolist() == [[[5, 1]]]
        assert state.relevant_score.tolist() == [[[2.0, 1.5]]]
        assert state.relevant_score.dtype == score_dtype
        assert state.relevancy.tolist() == [[[1.0, 1.5, 1.0, 1.5, 0.0, 2.0, 0.0]]]
        expected_span = [[2, 5], [3, 7], [-1, -1], [5, 7], [-1, -1], [7, 7], [-1, -1]]
        assert state.span.tolist() == [[expected_span]]
        assert_state_matches_oracle(state, q, k, window, relevant, 1.0)

    # R_t by hand from the table: queries 2: {0}; 3, 4: {0, 1}; 5, 6: {3, 1}.
    expected_mask = sliding_window_mask(T, window)
    for t, rel in {2: [0], 3: [0, 1], 4: [0, 1], 5: [3, 1], 6: [3, 1]}.items():
        expected_mask[t, rel] = True
    torch.testing.assert_close(state.candidate_mask(window)[0, 0], expected_mask)
    assert_matches_sdpa(q, k, v, window, relevant, 1.0, mask=expected_mask)


TIE_SHAPES = [
    (2, 2, 24, 4, 4, 1, 3),
    (1, 3, 30, 3, 2, 3, 4),
    (2, 1, 19, 2, 2, 2, 5),
    (1, 2, 40, 5, 5, 4, 1),
]


@pytest.mark.parametrize(CASE_ARGS, cases(TIE_SHAPES))
def test_ties_uniform_attention(B, H, T, D, Dv, window, relevant, dtype):
    """q = 0: every query attends uniformly (α = 1/|C_t| exactly), so many r tie exactly."""
    _, k, v = make_qkv(B, H, T, D, Dv, dtype, seed=T)
    q = torch.zeros(B, H, T, D, dtype=dtype, requires_grad=True)
    check_general(q, k, v, window, relevant)


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed{s}")
@pytest.mark.parametrize(
    "B,H,T,window,relevant",
    [(2, 2, 20, 2, 3), (1, 3, 25, 3, 2), (2, 1, 16, 1, 4)],
    ids=["B2-H2-T20-w2-r3", "B1-H3-T25-w3-r2", "B2-H1-T16-w1-r4"],
)
def test_ties_saturated(B, H, T, window, relevant, seed):
    """Saturated softmax: weights exactly 0 or 1/n, so r values tie exactly in many ways."""
    q, k = saturated_qk(B, H, T, seed)
    v = torch.randn(B, H, T, 3, dtype=torch.float64)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    check_general(q, k, v, window, relevant, scale=1.0)


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize(
    CASE_ARGS, cases([(1, 2, 9, 3, 2, 2, 2), (1, 1, 6, 2, 3, 1, 1), (2, 1, 5, 2, 2, 3, 0)])
)
def test_gradcheck(B, H, T, D, Dv, window, relevant, dtype):
    q, k, v = make_qkv(B, H, T, D, Dv, dtype, seed=7)

    def fn(q, k, v):
        return screened_attention_reference(q, k, v, window, relevant)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradgradcheck():
    """The reference is plain autograd, so double backward works (the kernels may refuse it)."""
    q, k, v = make_qkv(1, 1, 5, 2, 2, torch.float64, seed=7)
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: screened_attention_reference(q, k, v, 2, 1)[0], (q, k, v)
    )


# ----------------------------------------------------------------------------- hypothesis


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 2))
    T = draw(st.integers(1, 12))
    window = draw(st.integers(1, 8))
    relevant = draw(st.integers(0, 8))
    Dv = draw(st.integers(1, 5))
    mode = draw(st.sampled_from(["randn", "zero_q", "saturated"]))
    seed = draw(st.integers(0, 2**16))
    if mode == "saturated":
        q, k = saturated_qk(B, H, T, seed)
        D, scale = T, draw(st.sampled_from([None, 1.0, 0.5]))
    else:
        D = draw(st.integers(1, 6))
        q, k, _ = make_qkv(B, H, T, D, dtype=torch.float64, seed=seed, requires_grad=False)
        if mode == "zero_q":
            q = torch.zeros_like(q)
        scale = draw(st.one_of(st.none(), st.floats(0.1, 3.0)))
    v = torch.randn(
        B, H, T, Dv, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )
    return (q, k, v, window, relevant, scale)


@settings(max_examples=150, deadline=None)
@given(problems())
def test_hypothesis_against_oracles(problem):
    q, k, v, window, relevant, scale = problem
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    check_general(q, k, v, window, relevant, scale)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_inputs_accumulate_in_float32(dtype):
    """Numerics sanity only (not an oracle): half inputs are computed in float32, so against
    the float64 reference on the same (exactly upcast) inputs the output and gradients differ
    by one final rounding to ``dtype`` (relative ROUNDING[dtype]) plus float32 noise (1e-5)."""
    B, H, T, D, window, relevant = 2, 2, 40, 8, 3, 4
    q, k, v = make_qkv(B, H, T, D, dtype=dtype, seed=5)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))

    def run(q, k, v):
        return screened_attention_reference(q, k, v, window, relevant)[0]

    out, state = reference_with_state(q, k, v, window, relevant)
    _, state64 = reference_with_state(q64, k64, v64, window, relevant)
    assert out.dtype == dtype
    assert state.relevant_score.dtype == state.relevancy.dtype == torch.float32
    torch.testing.assert_close(state.relevant_index, state64.relevant_index, rtol=0, atol=0)
    torch.testing.assert_close(state.relevancy.double(), state64.relevancy, rtol=1e-5, atol=1e-6)

    g = torch.randn(out.shape, dtype=dtype)  # the same (exactly upcast) g for both runs
    lowp = out_and_grads(run, q, k, v, g=g)
    ref = out_and_grads(run, q64, k64, v64, g=g)
    for a, e in zip(lowp, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), e, rtol=ROUNDING[dtype], atol=1e-5)


def test_non_contiguous_inputs():
    B, H, T, D, Dv, window, relevant = 2, 3, 20, 4, 5, 3, 2
    q, k, v = make_qkv(B, H, T, D, Dv, torch.float64, seed=2, requires_grad=False)
    # Same values, other memory layouts: transposed storage, a slice of a wider tensor, permuted.
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_nc = torch.cat([k, torch.zeros_like(k)], dim=-1)[..., :D]
    v_nc = v.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    assert not any(x.is_contiguous() for x in (q_nc, k_nc, v_nc))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    leaves_nc = [x.detach().requires_grad_() for x in (q_nc, k_nc, v_nc)]

    def run(q, k, v):
        return screened_attention(q, k, v, window, relevant)

    for a, e in zip(out_and_grads(run, *leaves_nc), out_and_grads(run, *leaves)):
        assert_close(a, e)


def test_no_t_by_t_allocation():
    """docs/attention.md, cost: no tensor of T×T elements (per row) in the forward or the
    backward."""

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in tree_flatten(out)[0]:
                if isinstance(x, torch.Tensor):
                    self.largest = max(self.largest, x.numel())
            return out

    T, window, relevant = 128, 3, 2
    q, k, v = make_qkv(1, 1, T, 2, dtype=torch.float64)
    with LargestTensor() as mode:
        out, _ = screened_attention(q, k, v, window, relevant, return_state=True)
        out.sum().backward()
    # The largest intermediate is the (T, ν+ρ, D) candidate gather: 1280 elements << T² = 16384.
    assert 0 < mode.largest <= T * (window + relevant) * 2


# ----------------------------------------------------------------------------- state, edges


@pytest.mark.parametrize(
    "dtype,score_dtype",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
    ids=["float64", "float32", "bfloat16", "float16"],
)
def test_state_layout(dtype, score_dtype):
    # T=6, ν=3: keys 0, 1, 2, 3 leave the window (after queries 2, 3, 4, 5), so slots 0..3
    # fill in order and slots 4, 5 stay empty; key 3, screened after the last query, has [6, 6).
    B, H, T, D, Dv, window, relevant = 2, 3, 6, 4, 5, 3, 6
    q, k, v = make_qkv(B, H, T, D, Dv, dtype)
    out, state = screened_attention(q, k, v, window, relevant, return_state=True)
    assert isinstance(state, ScreeningState)
    assert out.shape == (B, H, T, Dv) and out.dtype == dtype
    assert state.relevant_index.shape == (B, H, relevant)
    assert state.relevant_index.dtype == torch.int64
    assert state.relevant_score.shape == (B, H, relevant)
    assert state.relevant_score.dtype == score_dtype
    assert state.relevancy.shape == (B, H, T) and state.relevancy.dtype == score_dtype
    assert state.span.shape == (B, H, T, 2) and state.span.dtype == torch.int32
    # Nothing is ever evicted with free slots: keys 0..3 in slots 0..3, in order.
    assert (state.relevant_index[..., :4] == torch.arange(4)).all()
    assert (state.relevant_index[..., 4:] == -1).all()
    assert (state.relevant_score[..., 4:] == -math.inf).all()
    torch.testing.assert_close(
        state.relevant_score[..., :4], state.relevancy[..., :4], rtol=0, atol=0
    )
    expected_span = torch.tensor([[3, 6], [4, 6], [5, 6], [6, 6], [-1, -1], [-1, -1]])
    assert (state.span == expected_span.to(torch.int32)).all()
    mask = state.candidate_mask(window)
    assert mask.shape == (B, H, T, T) and mask.dtype == torch.bool
    assert (mask == torch.ones(T, T, dtype=torch.bool).tril()).all()
    # Without return_state, only the output.
    out2 = screened_attention(q, k, v, window, relevant)
    assert isinstance(out2, torch.Tensor)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "B,H,T", [(2, 3, 0), (0, 3, 5), (2, 0, 5), (0, 0, 0)], ids=["T0", "B0", "H0", "B0-H0-T0"]
)
def test_empty_inputs(B, H, T):
    window, relevant, D, Dv = 3, 2, 4, 5
    q, k, v = make_qkv(B, H, T, D, Dv)
    out, state = screened_attention(q, k, v, window, relevant, return_state=True)
    assert out.shape == (B, H, T, Dv)
    assert state.relevant_index.shape == (B, H, relevant)
    assert (state.relevant_index == -1).all()  # T = 0: nothing screened; else no elements
    assert state.relevancy.shape == (B, H, T)
    assert state.span.shape == (B, H, T, 2)
    out.sum().backward()
    assert q.grad.shape == q.shape and v.grad.shape == v.shape


def test_zero_head_dim_averages_candidates():
    """D = 0: every logit is 0, so each query averages the values of its candidates."""
    T, window, relevant = 7, 2, 1
    q = torch.zeros(1, 1, T, 0, dtype=torch.float64)
    v = torch.randn(1, 1, T, 3, dtype=torch.float64)
    out, state = screened_attention(q, q, v, window, relevant, return_state=True)
    m = state.candidate_mask(window)[0, 0].double()
    torch.testing.assert_close(out[0, 0], (m @ v[0, 0]) / m.sum(-1, keepdim=True))


def test_nan_propagates_to_affected_outputs_only():
    B, H, T, D, window, relevant = 2, 2, 16, 4, 2, 2
    q, k, v = make_qkv(B, H, T, D, dtype=torch.float64, requires_grad=False)
    clean, clean_state = screened_attention(q, k, v, window, relevant, return_state=True)

    # A NaN value v_j reaches exactly the queries that see key j; the selection is unchanged.
    j = 3
    v_nan = v.clone()
    v_nan[1, 0, j, 1] = math.nan
    out, state = screened_attention(q, k, v_nan, window, relevant, return_state=True)
    torch.testing.assert_close(state.span, clean_state.span)
    seen = clean_state.candidate_mask(window)[1, 0, :, j]
    assert (out[1, 0].isnan().any(-1) == seen).all()
    expected = clean.clone()
    expected[1, 0, seen, 1] = math.nan  # column 1 only: out_t[d] = Σ_j α_tj v_j[d]
    torch.testing.assert_close(out, expected, equal_nan=True)

    # A NaN query affects its own output only.
    q_nan = q.clone()
    q_nan[0, 1, 9, 0] = math.nan
    out = screened_attention(q_nan, k, v, window, relevant)
    nan_at = torch.zeros(B, H, T, dtype=torch.bool)
    nan_at[0, 1, 9] = True
    assert (out.isnan().any(-1) == nan_at).all()
    torch.testing.assert_close(out[~nan_at], clean[~nan_at])

    # A NaN key reaches exactly the queries whose candidate set holds it (per the run's own
    # state), including key 0, which padding positions gather and must not leak from.
    for j in (0, 8):
        k_nan = k.clone()
        k_nan[0, 0, j, 2] = math.nan
        out, state = screened_attention(q, k_nan, v, window, relevant, return_state=True)
        seen = state.candidate_mask(window)[0, 0, :, j]
        assert (out[0, 0].isnan().any(-1) == seen).all()
        assert not out[0, 0, ~seen].isnan().any()
        torch.testing.assert_close(out[1:], clean[1:])
        torch.testing.assert_close(out[0, 1:], clean[0, 1:])


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_non_finite_input_reaches_only_dependent_outputs_and_gradients(name, bad):
    """A NaN or +Inf in one query row, key or value of row (b, h) = (1, 0): every other (b, h)
    is bitwise unchanged, forward and every gradient; inside the row, the non-finite outputs are
    the queries that see it (per the run's own mask M, exactly so for NaN), and the non-finite
    gradients lie in what those queries touch: dq of those queries, dk and dv of their
    candidates (dv of a bad value itself stays finite: it is Σ_t α_tj g_t)."""
    B, H, T, D, window, relevant = 2, 2, 16, 3, 3, 2
    q, k, v = make_qkv(B, H, T, D, dtype=torch.float64)
    g = torch.randn(B, H, T, D, dtype=torch.float64)
    clean = screened_attention(q, k, v, window, relevant)
    clean_grads = torch.autograd.grad(clean, (q, k, v), g)
    args = {n: x.detach().clone() for n, x in zip("qkv", (q, k, v))}
    j = 5
    args[name][1, 0, j, 1] = bad
    args = [x.requires_grad_() for x in args.values()]
    out, state = screened_attention(*args, window, relevant, return_state=True)
    grads = torch.autograd.grad(out, args, g)
    for a, b in zip((out, *grads), (clean, *clean_grads)):  # the other (b, h) rows
        assert torch.equal(a[0], b[0]) and torch.equal(a[1, 1], b[1, 1])

    m = state.candidate_mask(window)[1, 0]  # (T, T)
    sees = torch.zeros(T, dtype=torch.bool)
    if name == "q":
        sees[j] = True
    else:
        sees = m[:, j].clone()
    touched = m[sees].any(0)  # keys that those queries attend to
    bad_out = ~out[1, 0].isfinite().all(-1)
    assert bad_out.any() and not (bad_out & ~sees).any()
    if math.isnan(bad):
        assert torch.equal(bad_out, sees)
    dq, dk, dv = (~x[1, 0].isfinite().all(-1) for x in grads)
    assert not (dq & ~sees).any() and not (dk & ~touched).any() and not (dv & ~touched).any()
    if name == "v":
        assert not dv.any()


def test_nan_relevancy_holds_its_slot():
    """NaN scores in the slot rule (docs/attention.md): a NaN r counts as the smallest stored
    score (as torch.min/argmin treat NaN), and since `r_e > NaN` is False that slot is never
    overwritten; an empty slot takes any key, NaN r included (the slot rule never looks at
    r_e then)."""
    T, window, relevant = 8, 1, 2
    q, k, v = make_qkv(1, 1, T, 3, requires_grad=False)
    q[0, 0, 0, 0] = math.nan  # α_00 = NaN, so r_0 = NaN; key 0 still takes empty slot 0
    out, state = screened_attention(q, k, v, window, relevant, return_state=True)
    # Key 1 (finite r) takes empty slot 1; every later key meets the NaN slot 0 as the minimum
    # and is dropped, even though slot 1 holds a finite score.
    assert state.relevant_index.tolist() == [[[0, 1]]]
    assert state.relevant_score[0, 0, 0].isnan() and state.relevant_score[0, 0, 1].isfinite()
    assert state.span[0, 0, :2].tolist() == [[1, T], [2, T]]
    assert (state.span[0, 0, 2:] == -1).all()
    assert out[0, 0, 0].isnan().all() and not out[0, 0, 1:].isnan().any()


# ----------------------------------------------------------------------------- bad input
# (the malformed calls are catalogued in tests/test_hostile_inputs.py)


def test_different_value_dim_is_fine():
    q = torch.randn(2, 3, 5, 4)
    out = screened_attention(q, q.clone(), torch.randn(2, 3, 5, 6), 2, 1)
    assert out.shape == (2, 3, 5, 6)


@pytest.mark.parametrize(
    "backend",
    [
        "reference",
        pytest.param("cpu", marks=pytest.mark.skipif(
            _backend.C_ERROR is not None, reason=str(_backend.C_ERROR))),
        pytest.param("triton", marks=pytest.mark.skipif(
            not _backend.HAS_TRITON, reason="triton is not installed")),
    ],
)  # fmt: skip
def test_backends_agree_with_reference(backend):
    """The public entry point with each backend, through the hand-derived tie case (exact in
    every backend) and random inputs: float64 selections exactly the reference's."""
    q, k, v = make_qkv(2, 2, 20, 4, 3, torch.float64, requires_grad=False)
    out, state = public_screened_attention(q, k, v, 3, 2, return_state=True, backend=backend)
    ref, ref_state = reference_with_state(q, k, v, 3, 2)
    exact = backend == "reference"
    rtol, atol = (0, 0) if exact else (1e-10, 1e-10)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(state.span, ref_state.span, rtol=0, atol=0)
    torch.testing.assert_close(state.relevant_index, ref_state.relevant_index, rtol=0, atol=0)
    torch.testing.assert_close(state.relevancy, ref_state.relevancy, rtol=rtol, atol=atol)
    torch.testing.assert_close(state.relevant_score, ref_state.relevant_score, rtol=rtol,
                               atol=atol)  # fmt: skip

    # test_slot_rule_hand_derived's inputs: every weight 0, 1/2 or 1, so exact everywhere
    T, active = 7, {0: [0], 1: [1], 2: [1, 2], 3: [2, 3], 4: [3], 5: [5], 6: [5]}
    q = torch.full((1, 1, T, T), NEG, dtype=torch.float64)
    for t, js in active.items():
        q[0, 0, t, js] = 0.0
    k = torch.eye(T, dtype=torch.float64).view(1, 1, T, T)
    _, state = public_screened_attention(q, k, k, 2, 2, scale=1.0, return_state=True,
                                         backend=backend)  # fmt: skip
    assert state.relevant_index.tolist() == [[[5, 1]]]
    assert state.relevancy.tolist() == [[[1.0, 1.5, 1.0, 1.5, 0.0, 2.0, 0.0]]]
    expected_span = [[2, 5], [3, 7], [-1, -1], [5, 7], [-1, -1], [7, 7], [-1, -1]]
    assert state.span.tolist() == [[expected_span]]


def test_reference_imports_only_torch():
    """The reference reads on its own: torch and the standard library, nothing of the package."""
    assert non_stdlib_imports(attention_reference) == {"torch"}
