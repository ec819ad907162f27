"""Grouped-query attention and key padding in ``screened_attention`` (docs/streaming.md).

Oracles: a slow scalar Python implementation of the §5 scan (group-mean relevancy, padded keys
and queries), SDPA with ``enable_gqa=True`` and the mask that scan recorded (outputs and
gradients), identical query heads in a group (= the one-head op on the KV heads), and a padded
batch against each row alone. The kernels (C++ CPU, Triton) are also checked against the
reference.

Without a GPU the Triton kernels run under the Triton interpreter (conftest.py), which is slow:
their cases stay small (B·H <= 8, T <= 40), so where a test's B·H would pass 8 Triton runs G = 2
only.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from _attention_utils import OpsCalled, attention_magnitudes
from _env import DEVICE
from _ids import case_id, dtype_id
from _tolerances import assert_close, assert_low_precision_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from screening_attn import _backend, screened_attention
from screening_attn.attention import ScreeningState, _ops

reference = functools.partial(screened_attention, backend="reference")

needs_triton = pytest.mark.skipif(not _backend.HAS_TRITON, reason="triton is not installed")
TRITON = pytest.param("triton", marks=needs_triton)
# Every backend takes grouped heads and padding.
BACKENDS = ["reference", "cpu", TRITON]


def device_of(backend):
    """Where a backend's tensors go: Triton's on a GPU if there is one (else its interpreter)."""
    return DEVICE if backend == "triton" else "cpu"


def make_qkv(B, H, Hkv, T, D, Dv=None, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, Dv, generator=g, dtype=torch.float64)
    return tuple(x.to(device, dtype).requires_grad_() for x in (q, k, v))


def scalar_screening(q, k, window, relevant, real=None, scale=None):
    """docs/streaming.md computed literally, per (b, KV head), per query, in Python floats.

    Returns ``(index, score, relevancy, span)`` with Hkv heads and the ``(B, Hkv, T, T)`` mask of
    the candidate sets recorded query by query."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    real = torch.ones(B, T, dtype=torch.bool) if real is None else real
    index = torch.full((B, Hkv, relevant), -1, dtype=torch.int64)
    score = torch.full((B, Hkv, relevant), -math.inf, dtype=torch.float64)
    relevancy = torch.zeros(B, Hkv, T, dtype=torch.float64)
    span = torch.full((B, Hkv, T, 2), -1, dtype=torch.int32)
    mask = torch.zeros(B, Hkv, T, T, dtype=torch.bool)
    for b in range(B):
        ok = real[b].tolist()
        for kh in range(Hkv):
            ks = k[b, kh].tolist()
            slots = [None] * relevant  # each None or [position, r]
            r = [0.0] * T
            start, end = [-1] * T, [-1] * T
            for t in range(T):
                win = [j for j in range(max(0, t - window + 1), t + 1) if ok[j]]
                cands = win + [s[0] for s in slots if s is not None]
                for j in cands:
                    mask[b, kh, t, j] = True
                if ok[t] and cands:
                    for h in range(kh * G, (kh + 1) * G):
                        qs = q[b, h, t].tolist()
                        logits = [scale * sum(x * y for x, y in zip(qs, ks[j])) for j in cands]
                        top = max(logits)
                        w = [math.exp(s - top) for s in logits]
                        z = sum(w)
                        for j, wj in zip(cands, w):
                            if j in win:
                                r[j] += wj / z / G
                e = t - window + 1
                if e < 0 or relevant == 0 or not ok[e]:
                    continue
                empty = [i for i in range(relevant) if slots[i] is None]
                if empty:
                    i = empty[0]
                else:
                    i = min(range(relevant), key=lambda i: slots[i][1])  # first minimum
                    if not r[e] > slots[i][1]:
                        continue
                    end[slots[i][0]] = t + 1
                slots[i] = [e, r[e]]
                start[e], end[e] = t + 1, T
            for i, s in enumerate(slots):
                if s is not None:
                    index[b, kh, i], score[b, kh, i] = s[0], s[1]
            relevancy[b, kh] = torch.tensor(r, dtype=torch.float64)
            span[b, kh] = torch.tensor(list(zip(start, end)), dtype=torch.int32).view(T, 2)
    return (index, score, relevancy, span), mask


def sdpa_given_mask(q, k, v, mask, scale=None):
    """SDPA (enable_gqa) with the per-KV-head candidate mask; rows without a candidate -> 0."""
    G = q.shape[1] // k.shape[1]
    m = mask.repeat_interleave(G, dim=1)
    has = m.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m | ~has, scale=scale, enable_gqa=True)
    return out * has


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g.to(out.device))


def check_against_oracles(q, k, v, window, relevant, real=None, backend="reference"):
    """``q``, ``k``, ``v`` on the backend's device; ``real`` on the CPU (or None)."""
    out, state = screened_attention(
        q, k, v, window, relevant, return_state=True, backend=backend,
        key_padding_mask=None if real is None else real.to(q.device),
    )  # fmt: skip
    (index, score, relevancy, span), mask = scalar_screening(
        q.detach().cpu(), k.detach().cpu(), window, relevant, real
    )
    torch.testing.assert_close(state.relevant_index.cpu(), index, rtol=0, atol=0)
    torch.testing.assert_close(state.span.cpu(), span, rtol=0, atol=0)
    assert_close(state.relevant_score.cpu(), score)
    assert_close(state.relevancy.cpu(), relevancy)
    expected = sdpa_given_mask(q, k, v, mask.to(q.device))
    assert_close(out, expected)
    for name, a, e in zip("qkv", grads(out, (q, k, v)), grads(expected, (q, k, v))):
        assert_close(a, e, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])  # Triton: test_triton_* below
@settings(max_examples=25)
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.integers(1, 3),
    T=st.integers(1, 14),
    window=st.integers(1, 5),
    relevant=st.integers(0, 4),
    seed=st.integers(0, 2**16),
    pad=st.sampled_from(["none", "left", "right", "random"]),
)
def test_gqa_padding_against_scalar_oracle(backend, B, Hkv, G, T, window, relevant, seed, pad):
    q, k, v = make_qkv(B, G * Hkv, Hkv, T, 3, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    pos = torch.arange(T)
    real = {
        "none": None,
        "left": pos[None, :] >= T - lengths[:, None],
        "right": pos[None, :] < lengths[:, None],
        "random": torch.rand(B, T, generator=gen) < 0.7,
    }[pad]
    check_against_oracles(q, k, v, window, relevant, real, backend)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.integers(1, 3),
    T=st.integers(1, 40),
    window=st.integers(1, 8),
    relevant=st.integers(0, 5),
    seed=st.integers(0, 2**16),
    pad=st.sampled_from(["none", "left", "right", "random", "all"]),
)
def test_cpu_kernel_equals_reference(B, Hkv, G, T, window, relevant, seed, pad):
    """The C++ kernel against the reference in float64 to 1e-12: output, state, gradients.
    Covers T = 1, T < ν, ν = 1, ρ = 0, Hkv = 1 and rows that are all padding."""
    q, k, v = make_qkv(B, G * Hkv, Hkv, T, 3, Dv=2, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    pos = torch.arange(T)
    real = {
        "none": None,
        "left": pos[None, :] >= T - lengths[:, None],
        "right": pos[None, :] < lengths[:, None],
        "random": torch.rand(B, T, generator=gen) < 0.6,
        "all": torch.zeros(B, T, dtype=torch.bool),
    }[pad]
    kw = dict(key_padding_mask=real, return_state=True)
    out, state = screened_attention(q, k, v, window, relevant, backend="cpu", **kw)
    ref, ref_state = reference(q, k, v, window, relevant, **kw)
    exact = dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(out, ref, **exact)
    for name in ("relevant_index", "span"):
        torch.testing.assert_close(getattr(state, name), getattr(ref_state, name), rtol=0, atol=0)
    torch.testing.assert_close(state.relevant_score, ref_state.relevant_score, **exact)
    torch.testing.assert_close(state.relevancy, ref_state.relevancy, **exact)
    for name, a, e in zip("qkv", grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, e, **exact, msg=lambda m, name=name: f"d{name}: {m}")


# (backend, G) with B·H = 4G; Triton (the interpreter) G = 2 only, B·H = 8
BACKEND_G = [(b, G) for b in ("reference", "cpu") for G in (2, 3)]
BACKEND_G += [pytest.param("triton", 2, marks=needs_triton)]


@pytest.mark.parametrize("backend,G", BACKEND_G)
def test_saturated_ties_gqa(backend, G):
    """Exact ties (q = 0, so attention is uniform): the group mean of equal weights ties exactly
    too, and the slot rule keeps the first keys; checked against the scalar oracle."""
    _, k, v = make_qkv(2, 2 * G, 2, 12, 2, Dv=3, device=device_of(backend))
    q = torch.zeros(2, 2 * G, 12, 2, dtype=torch.float64, device=k.device, requires_grad=True)
    check_against_oracles(q, k, v, 3, 2, backend=backend)


@pytest.mark.parametrize("backend,G", BACKEND_G)
def test_identical_heads_of_a_group_equal_the_one_head_op(G, backend):
    """If the G query heads of a group are equal, the group mean is each head's relevancy, so
    every head gets the one-head op's output on the KV heads (an oracle independent of the
    grouping code)."""
    q1, k, v = make_qkv(2, 2, 2, 20, 4, seed=3, device=device_of(backend))
    q = q1.repeat_interleave(G, dim=1)
    out, state = screened_attention(q, k, v, 3, 3, return_state=True, backend=backend)
    out1, state1 = screened_attention(q1, k, v, 3, 3, return_state=True, backend=backend)
    assert_close(out, out1.repeat_interleave(G, dim=1))
    torch.testing.assert_close(state.relevant_index, state1.relevant_index, rtol=0, atol=0)
    torch.testing.assert_close(state.span, state1.span, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_true_mask_equals_no_mask(backend):
    q, k, v = make_qkv(2, 4, 2, 16, 4, device=device_of(backend))
    real = torch.ones(2, 16, dtype=torch.bool, device=q.device)
    run = functools.partial(screened_attention, return_state=True, backend=backend)
    a, sa = run(q, k, v, 3, 2, key_padding_mask=real)
    b, sb = run(q, k, v, 3, 2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for x, y in zip(vars(sa).values(), vars(sb).values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# Triton (the interpreter): left padding only; right padding is in test_triton_equals_reference
@pytest.mark.parametrize(
    "backend,side",
    [(b, side) for b in ("reference", "cpu") for side in ("left", "right")]
    + [pytest.param("triton", "left", marks=needs_triton)],
)
def test_padded_batch_equals_each_row_alone(side, backend):
    """A batch of rows of lengths 13 and 20 padded to 20 (junk in the padding): on the real
    tokens, outputs, gradients, relevancies and slots are those of each row alone."""
    T, lengths, window, relevant = 20, (13, 20), 3, 2
    q, k, v = make_qkv(2, 4, 2, T, 4, seed=5, device=device_of(backend))
    real = torch.zeros(2, T, dtype=torch.bool, device=q.device)
    for b, n in enumerate(lengths):
        if side == "left":
            real[b, T - n :] = True
        else:
            real[b, :n] = True
    run = functools.partial(screened_attention, return_state=True, backend=backend)
    out, state = run(q, k, v, window, relevant, key_padding_mask=real)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    g = g.to(q.device)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g * real[:, None, :, None])
    for b, n in enumerate(lengths):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        qb, kb, vb = (x[b : b + 1, :, sl].detach().requires_grad_() for x in (q, k, v))
        ob, sb = run(qb, kb, vb, window, relevant)
        eq, ek, ev = torch.autograd.grad(ob, (qb, kb, vb), g[b : b + 1, :, sl])
        assert_close(out[b : b + 1, :, sl], ob)
        for a, e in ((dq, eq), (dk, ek), (dv, ev)):
            assert_close(a[b : b + 1, :, sl], e)
        assert_close(state.relevancy[b : b + 1, :, sl], sb.relevancy)
        shift = sl.start
        index = torch.where(sb.relevant_index >= 0, sb.relevant_index + shift, -1)
        torch.testing.assert_close(state.relevant_index[b : b + 1], index, rtol=0, atol=0)
        assert_close(state.relevant_score[b : b + 1], sb.relevant_score)


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_without_candidate_outputs_zeros(backend):
    """Left padding: the padded queries before the first real token have no candidate; they
    output zeros and every gradient stays finite."""
    q, k, v = make_qkv(1, 2, 1, 8, 4, device=device_of(backend))
    real = torch.tensor([[False] * 3 + [True] * 5], device=q.device)
    out = screened_attention(q, k, v, 2, 1, key_padding_mask=real, backend=backend)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert out.isfinite().all()
    for g in torch.autograd.grad(out.sum(), (q, k, v)):
        assert g.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_runs_the_cpu_kernel_for_gqa_and_padding(dtype):
    q, k, v = make_qkv(1, 4, 2, 10, 4, dtype=dtype)
    real = torch.ones(1, 10, dtype=torch.bool)
    for kw in ({}, {"key_padding_mask": real}):
        with OpsCalled() as mode:
            got = screened_attention(q, k, v, 3, 2, **kw)
        assert "screening_attn::screened_attention_stream" in mode.names
        cpu = screened_attention(q, k, v, 3, 2, backend="cpu", **kw)
        torch.testing.assert_close(got, cpu, rtol=0, atol=0)


def run_triton(q, k, v, window, relevant, real=None, scale=None):
    """The Triton op itself: ``(out, state)``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, _, *state = _ops.screened_attention_triton(q, k, v, window, relevant, scale, real)
    return out, ScreeningState(*state)


def padding(kind, B, T, seed=0):
    """A ``(B, T)`` key padding mask (CPU) or None: left/right padding of random lengths (at
    least 5 padded positions per row), random holes, or none."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T - 4, (B,), generator=gen)
    pos = torch.arange(T)
    return {
        "none": None,
        "left": pos[None, :] >= T - lengths[:, None],
        "right": pos[None, :] < lengths[:, None],
        "random": torch.rand(B, T, generator=gen) < 0.6,
    }[kind]


# (B, H, Hkv, T, D, Dv, window, relevant, pad): G = H / Hkv in {1, 2, 4}. The interpreter's
# blocks are 16 long, so T > 16 carries sets between query blocks and key blocks.
TRITON_CASES = [
    (2, 4, 1, 24, 4, 3, 5, 3, "left"),  # G = 4
    (2, 4, 2, 20, 3, 2, 3, 2, "random"),  # G = 2, holes in the middle
    (1, 2, 2, 24, 4, 4, 4, 2, "right"),  # G = 1
    (1, 4, 2, 7, 3, 3, 8, 2, "left"),  # T < window
    (1, 4, 2, 20, 4, 4, 1, 3, "none"),  # window 1, no mask
    (1, 8, 2, 18, 2, 2, 3, 0, "random"),  # relevant 0, G = 4
]


@needs_triton
@pytest.mark.parametrize(
    "B,H,Hkv,T,D,Dv,window,relevant,pad,dtype",
    [
        pytest.param(*c, dt, id=case_id(B=c[0], H=c[1], Hkv=c[2], T=c[3], D=c[4], Dv=c[5],
                                        w=c[6], r=c[7], pad=c[8], dtype=dt))
        for c, dt in [(c, torch.float64) for c in TRITON_CASES]
        + [(TRITON_CASES[1], torch.float32)]
    ],
)  # fmt: skip
def test_triton_equals_reference(B, H, Hkv, T, D, Dv, window, relevant, pad, dtype):
    """The Triton kernels against the reference: output, state (the sets exactly) and every
    gradient, float64 to 1e-10 (float32: the tolerance table; these inputs have no near tie)."""
    q, k, v = make_qkv(B, H, Hkv, T, D, Dv, seed=T, dtype=dtype, device=DEVICE)
    real = padding(pad, B, T, seed=T)
    real = None if real is None else real.to(DEVICE)
    out, state = run_triton(q, k, v, window, relevant, real)
    ref, ref_state = screened_attention(q, k, v, window, relevant, key_padding_mask=real,
                                        return_state=True, backend="reference")  # fmt: skip
    assert out.dtype == dtype and state.relevancy.shape == (B, Hkv, T)
    assert_close(out, ref)
    for name in ("relevant_index", "span"):
        torch.testing.assert_close(getattr(state, name), getattr(ref_state, name), rtol=0, atol=0)
    assert_close(state.relevant_score, ref_state.relevant_score)
    assert_close(state.relevancy, ref_state.relevancy)
    for name, a, e in zip("qkv", grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(a, e, msg=lambda m, name=name: f"d{name}: {m}")


@needs_triton
def test_triton_against_scalar_oracle():
    """Grouped heads (G = 2) and left padding against the scalar scan and SDPA given its mask."""
    q, k, v = make_qkv(1, 4, 2, 20, 3, seed=11, device=DEVICE)
    check_against_oracles(q, k, v, 3, 2, padding("left", 1, 20, seed=4), backend="triton")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_triton_half_precision_gqa_padding(dtype):
    """fp16/bf16 with G = 2 and left padding, accumulated in float32: output and gradients
    within twice the reference's own error in that dtype of the float64 reference (the
    tolerance table's rule); the sets those of the reference."""
    B, H, Hkv, T, D, Dv, window, relevant = 1, 4, 2, 20, 8, 4, 4, 3
    x64 = [x.detach() for x in make_qkv(B, H, Hkv, T, D, Dv, seed=2)]
    real = padding("left", B, T, seed=3)
    g = torch.randn(B, H, T, Dv, generator=torch.Generator().manual_seed(4)).to(dtype)

    def run(fn, x_dtype, device):
        xs = [x.to(device, x_dtype).requires_grad_() for x in x64]
        out, state = fn(*xs, real.to(device))
        return out, torch.autograd.grad(out, xs, g.to(device, x_dtype)), state

    def ref(q, k, v, mask):
        return screened_attention(q, k, v, window, relevant, key_padding_mask=mask,
                                  return_state=True, backend="reference")  # fmt: skip

    out64, grads64, state64 = run(ref, torch.float64, "cpu")
    out_lp, grads_lp, state_lp = run(ref, dtype, "cpu")
    out, grads, state = run(lambda *a: run_triton(*a[:3], window, relevant, a[3]), dtype, DEVICE)
    assert out.dtype == dtype and all(x.dtype == dtype for x in grads)
    assert state.relevancy.dtype == torch.float32
    assert torch.equal(state.span.cpu(), state64.span)
    assert torch.equal(state.span.cpu(), state_lp.span)
    torch.testing.assert_close(state.relevancy.cpu(), state_lp.relevancy, rtol=1e-5, atol=1e-5)
    # the magnitudes of the products over each query head's candidates (the KV heads repeated
    # for this oracle only); a query without any candidate outputs 0 and sends no gradient
    G = H // Hkv
    cand = state64.candidate_mask(window) & real[:, None, None, :]
    has = cand.any(-1, keepdim=True)
    mask = (cand | ~has).repeat_interleave(G, dim=1)
    rep = [x.repeat_interleave(G, dim=1) for x in x64[1:]]
    gm = g.double() * has.repeat_interleave(G, dim=1)
    m_out, m_dq, m_dk, m_dv = attention_magnitudes(x64[0], *rep, gm, mask)
    # dK, dV sum over the group: so do their magnitudes
    m_dk, m_dv = (m.view(B, Hkv, G, T, -1).sum(2) for m in (m_dk, m_dv))
    assert_low_precision_close(out, out64, out_lp, m_out)
    for a, b64, b_lp, m in zip(grads, grads64, grads_lp, (m_dq, m_dk, m_dv)):
        assert_low_precision_close(a, b64, b_lp, m)


@needs_triton
def test_triton_opcheck_gqa_padding():
    """torch.library.opcheck of the Triton ops with grouped heads and a padding mask (and a
    strided q), forward and backward."""
    q, k, v = make_qkv(1, 2, 1, 17, 2, Dv=3, seed=6, device=DEVICE)
    real = padding("left", 1, 17, seed=1).to(DEVICE)
    qp = q.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # strided
    torch.library.opcheck(_ops.screened_attention_triton, (qp, k, v, 4, 3, 0.5, real))
    out, lse, _, _, _, span = _ops.screened_attention_triton(q, k, v, 4, 3, 0.5, real)
    g = torch.randn_like(out)
    q, k, v, out, lse = (x.detach() for x in (q, k, v, out, lse))
    args = (g, q, k, v, out, lse, span, 4, 0.5, 3, real)
    torch.library.opcheck(_ops.screened_attention_backward_triton, args)


@needs_triton
def test_triton_compile_fullgraph_gqa_padding():
    """``screened_attention(backend="triton")`` with grouped heads and padding compiles into one
    graph (no graph break) with eager's loss, state and gradients."""
    torch._dynamo.reset()

    def f(q, k, v, real):
        out, state = screened_attention(q, k, v, 5, 3, key_padding_mask=real, return_state=True,
                                        backend="triton")  # fmt: skip
        return (out * out).sum() + state.relevancy.sum(), state.span

    q, k, v = make_qkv(1, 2, 1, 18, 4, dtype=torch.float32, seed=8, device=DEVICE)
    real = padding("left", 1, 18, seed=2).to(DEVICE)
    loss, span = f(q, k, v, real)
    grads_ = torch.autograd.grad(loss, (q, k, v))
    closs, cspan = torch.compile(f, fullgraph=True)(q, k, v, real)
    cgrads = torch.autograd.grad(closs, (q, k, v))
    assert torch.equal(span, cspan)
    torch.testing.assert_close(closs, loss)
    for a, b in zip(cgrads, grads_):
        torch.testing.assert_close(a, b)


@needs_triton
def test_public_api_dispatches_gqa_and_padding_to_triton():
    """backend="triton" (and "auto" on a GPU) runs the Triton op for grouped heads and padding,
    not the reference."""
    q, k, v = make_qkv(1, 4, 2, 10, 4, dtype=torch.float32, device=DEVICE)
    real = torch.ones(1, 10, dtype=torch.bool, device=DEVICE)
    for backend in ["triton", "auto"] if DEVICE == "cuda" else ["triton"]:
        for mask in (None, real):
            with OpsCalled() as mode:
                got = screened_attention(q, k, v, 3, 2, key_padding_mask=mask, backend=backend)
            assert "screening_attn::screened_attention_triton" in mode.names
    op, _ = run_triton(q, k, v, 3, 2, real, scale=0.5)
    torch.testing.assert_close(got, op, rtol=0, atol=0)


@needs_triton
def test_triton_op_checks_grouped_and_mask_arguments():
    """Direct callers of the Triton ops get the public function's checks."""
    q, k, v = make_qkv(1, 4, 2, 10, 4, dtype=torch.float32, device=DEVICE)
    op = _ops.screened_attention_triton
    with pytest.raises(ValueError, match=r"Hkv dividing the H=4 heads of q"):
        op(q, k[:, :1].expand(1, 3, 10, 4), v[:, :1].expand(1, 3, 10, 4), 3, 2, 0.5)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, T\)"):
        op(q, k, v, 3, 2, 0.5, torch.ones(1, 9, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor"):
        op(q, k, v, 3, 2, 0.5, torch.ones(1, 10, dtype=torch.int32, device=DEVICE))
    out, lse, _, _, _, span = op(q, k, v, 3, 2, 0.5)
    with pytest.raises(
        ValueError, match=r"span must be a torch\.int32 tensor of shape \(1, 2, 10, 2\)"
    ):
        args = (out, q, k, v, out, lse, span.repeat(1, 2, 1, 1), 3, 0.5)
        _ops.screened_attention_backward_triton(*args)


@pytest.mark.parametrize(
    "kv_heads, mask, error, match",
    [
        (
            3,
            None,
            ValueError,
            r"^k must have the shape .*Hkv dividing the H=4 heads of q .*got Hkv=3",
        ),
        (
            0,
            None,
            ValueError,
            r"^k must have the shape .*Hkv dividing the H=4 heads of q .*got Hkv=0",
        ),
        (2, torch.ones(1, 10, dtype=torch.int64), TypeError, r"key_padding_mask must be a bool"),
        (2, torch.ones(1, 9, dtype=torch.bool), ValueError, r"key_padding_mask must have shape"),
        (2, torch.ones(10, dtype=torch.bool), ValueError, r"key_padding_mask must have shape"),
        (2, [[True] * 10], TypeError, r"key_padding_mask must be a bool tensor"),
    ],
)
def test_bad_input_names_the_argument(kv_heads, mask, error, match):
    q = torch.randn(1, 4, 10, 4)
    k, v = torch.randn(2, 1, kv_heads, 10, 4).unbind(0)
    with pytest.raises(error, match=match):
        screened_attention(q, k, v, 3, 2, key_padding_mask=mask)


def test_v_heads_must_match_k():
    q, k = torch.randn(1, 4, 10, 4), torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match=r"v must have shape \(B, Hkv, T, Dv\)"):
        screened_attention(q, k, torch.randn(1, 4, 10, 4), 3, 2)


def test_grouped_heads_never_repeat_k_and_v():
    """docs/streaming.md: no tensor the size of k, v repeated G times (or of their repeated
    candidate gather) in the forward or the backward; the largest is q (or dq) or the one
    per-KV-head gather of the ν+ρ candidates."""

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in tree_flatten(out)[0]:
                if isinstance(x, torch.Tensor):
                    self.largest = max(self.largest, x.numel())
            return out

    B, H, Hkv, T, D, window, relevant = 1, 8, 1, 64, 16, 3, 2
    q, k, v = make_qkv(B, H, Hkv, T, D)
    real = torch.ones(B, T, dtype=torch.bool)
    with LargestTensor() as mode:
        out, _ = reference(q, k, v, window, relevant, key_padding_mask=real, return_state=True)
        out.sum().backward()
    gather = B * Hkv * T * (window + relevant) * D
    assert 0 < mode.largest <= max(q.numel(), gather)
    assert mode.largest < H // Hkv * gather  # what repeating k and v would cost


def stream_args(n_before=20, n=10, window=4, relevant=3, scale=0.5):
    """Arguments of the C++ stream op as the glue builds them: a state left by ``n_before``
    padded positions of a grouped-head stream, and ``n`` new positions."""
    q, k, v = make_qkv(2, 4, 2, n_before + n, 4, Dv=3, seed=7)
    real = torch.rand(2, n_before + n, generator=torch.Generator().manual_seed(8)) < 0.8
    a = slice(0, n_before)
    *_, state = _ops.screened_attention_stream_cpu(
        q[:, :, a].detach(), k[:, :, a].detach(), v[:, :, a].detach(), window, relevant, scale,
        real[:, a],
    )  # fmt: skip
    b = slice(n_before, None)
    k_all = torch.cat([state.slot_keys, state.keys, k[:, :, b]], dim=2)
    v_all = torch.cat([state.slot_values, state.values, v[:, :, b]], dim=2)
    valid = torch.cat([state.valid, real[:, b]], dim=1)
    R0 = state.slot_index.shape[-1]
    return (q[:, :, b], k_all, v_all, valid, state.relevancy, state.slot_index, state.slot_score,
            window, relevant, scale), R0  # fmt: skip


def test_stream_op_opcheck():
    op, backward_op = (
        _ops.screened_attention_stream_cpp,
        _ops.screened_attention_stream_backward_cpp,
    )
    args, R0 = stream_args()
    assert R0 > 0 and args[4].shape[-1] > 0  # a real initial state
    q, k, v = make_qkv(2, 4, 2, 12, 4, Dv=3, seed=9)
    none = q.new_empty(2, 2, 0)
    real = torch.rand(2, 12, generator=torch.Generator().manual_seed(1)) < 0.7
    for a in [args, (q, k, v, real, none, none.long(), none, 5, 3, 0.5),
              (q, k, v, None, none, none.long(), none, 1, 0, 1.0)]:  # fmt: skip
        torch.library.opcheck(op, a)
    out, lse, _, _, _, span = op(*args)
    g = torch.randn_like(out)
    q, k, v, valid = (x.detach() for x in args[:4])
    window, scale = args[7], args[9]
    torch.library.opcheck(
        backward_op, (g, q, k, v, out.detach(), lse.detach(), span, valid, R0, window, scale)
    )


def test_stream_op_errors():
    args, _ = stream_args()
    op = _ops.screened_attention_stream_cpp
    with pytest.raises(ValueError, match=r"k must hold the R0=\d+ initial slots"):
        op(args[0], args[1][:, :, 1:], args[2][:, :, 1:], *args[3:])
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, S\)"):
        op(*args[:3], args[3][:, 1:], *args[4:])
    with pytest.raises(TypeError, match=r"slot_score0 must be Double"):
        op(*args[:6], args[6].float(), *args[7:])
    with pytest.raises(ValueError, match=r"relevant must be >= the \d+ initial slots"):
        op(*args[:8], 0, args[9])


def test_prefill_and_decode_compile_fullgraph():
    """Prefill of n positions and single-token decode, each one compiled graph with the kernel
    (no graph break, no Python loop over positions), equal to eager."""
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 4, 2, 24, 8, dtype=torch.float32, seed=4)
    q, k, v = (x.detach() for x in (q, k, v))

    def step(q, k, v, state):
        out, *_, nxt = _ops.screened_attention_stream_cpu(q, k, v, 5, 3, 0.35, None, state)
        return out, nxt

    compiled = torch.compile(step, fullgraph=True)
    out, state = step(q[:, :, :20], k[:, :, :20], v[:, :, :20], None)
    cout, cstate = compiled(q[:, :, :20], k[:, :, :20], v[:, :, :20], None)
    torch.testing.assert_close(cout, out)
    for t in range(20, 24):
        s = slice(t, t + 1)
        out, state = step(q[:, :, s], k[:, :, s], v[:, :, s], state)
        cout, cstate = compiled(q[:, :, s], k[:, :, s], v[:, :, s], cstate)
        torch.testing.assert_close(cout, out)
        assert torch.equal(cstate.slot_index, state.slot_index)
