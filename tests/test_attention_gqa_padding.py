"""Grouped-query attention and key padding in ``screened_attention`` (docs/streaming.md).

Oracles: a slow scalar Python implementation of the §5 scan (group-mean relevancy, padded keys
and queries), SDPA with ``enable_gqa=True`` and the mask that scan recorded (outputs and
gradients), identical query heads in a group (= the one-head op on the KV heads), and a padded
batch against each row alone.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from _tolerances import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from screening_attn import screened_attention
from screening_attn.attention import _ops

reference = functools.partial(screened_attention, backend="reference")

# The backends that take grouped heads and padding (the GPU kernels don't yet).
BACKENDS = ["reference", "cpu"]


def make_qkv(B, H, Hkv, T, D, Dv=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, Dv, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype).requires_grad_() for x in (q, k, v))


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
    return torch.autograd.grad(out, inputs, g)


def check_against_oracles(q, k, v, window, relevant, real=None, backend="reference"):
    out, state = screened_attention(
        q, k, v, window, relevant, key_padding_mask=real, return_state=True, backend=backend
    )
    (index, score, relevancy, span), mask = scalar_screening(
        q.detach(), k.detach(), window, relevant, real
    )
    torch.testing.assert_close(state.relevant_index, index, rtol=0, atol=0)
    torch.testing.assert_close(state.span, span, rtol=0, atol=0)
    assert_close(state.relevant_score, score)
    assert_close(state.relevancy, relevancy)
    expected = sdpa_given_mask(q, k, v, mask)
    assert_close(out, expected)
    for name, a, e in zip("qkv", grads(out, (q, k, v)), grads(expected, (q, k, v))):
        assert_close(a, e, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G", [2, 3])
def test_saturated_ties_gqa(backend, G):
    """Exact ties (q = 0, so attention is uniform): the group mean of equal weights ties exactly
    too, and the slot rule keeps the first keys; checked against the scalar oracle."""
    _, k, v = make_qkv(2, 2 * G, 2, 12, 2, Dv=3)
    q = torch.zeros(2, 2 * G, 12, 2, dtype=torch.float64, requires_grad=True)
    check_against_oracles(q, k, v, 3, 2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G", [2, 3])
def test_identical_heads_of_a_group_equal_the_one_head_op(G, backend):
    """If the G query heads of a group are equal, the group mean is each head's relevancy, so
    every head gets the one-head op's output on the KV heads (an oracle independent of the
    grouping code)."""
    q1, k, v = make_qkv(2, 2, 2, 20, 4, seed=3)
    q = q1.repeat_interleave(G, dim=1)
    out, state = screened_attention(q, k, v, 3, 3, return_state=True, backend=backend)
    out1, state1 = screened_attention(q1, k, v, 3, 3, return_state=True, backend=backend)
    assert_close(out, out1.repeat_interleave(G, dim=1))
    torch.testing.assert_close(state.relevant_index, state1.relevant_index, rtol=0, atol=0)
    torch.testing.assert_close(state.span, state1.span, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_true_mask_equals_no_mask(backend):
    q, k, v = make_qkv(2, 4, 2, 16, 4)
    real = torch.ones(2, 16, dtype=torch.bool)
    run = functools.partial(screened_attention, return_state=True, backend=backend)
    a, sa = run(q, k, v, 3, 2, key_padding_mask=real)
    b, sb = run(q, k, v, 3, 2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for x, y in zip(vars(sa).values(), vars(sb).values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(side, backend):
    """A batch of rows of lengths 13 and 20 padded to 20 (junk in the padding): on the real
    tokens, outputs, gradients, relevancies and slots are those of each row alone."""
    T, lengths, window, relevant = 20, (13, 20), 3, 2
    q, k, v = make_qkv(2, 4, 2, T, 4, seed=5)
    real = torch.zeros(2, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if side == "left":
            real[b, T - n :] = True
        else:
            real[b, :n] = True
    run = functools.partial(screened_attention, return_state=True, backend=backend)
    out, state = run(q, k, v, window, relevant, key_padding_mask=real)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
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
    q, k, v = make_qkv(1, 2, 1, 8, 4)
    real = torch.tensor([[False] * 3 + [True] * 5])
    out = screened_attention(q, k, v, 2, 1, key_padding_mask=real, backend=backend)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert out.isfinite().all()
    for g in torch.autograd.grad(out.sum(), (q, k, v)):
        assert g.isfinite().all()


class OpsCalled(TorchDispatchMode):
    """Records the names of the ops dispatched under it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


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


@pytest.mark.parametrize("backend", ["triton"])
def test_gpu_backends_refuse_gqa_and_padding(backend):
    q, k, v = make_qkv(1, 4, 2, 10, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"backend='{backend}' does not support grouped-query"):
        screened_attention(q, k, v, 3, 2, backend=backend)
    q, k, v = make_qkv(1, 2, 2, 10, 4, dtype=torch.float32)
    real = torch.ones(1, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match=f"backend='{backend}' does not support key_padding_mask"):
        screened_attention(q, k, v, 3, 2, key_padding_mask=real, backend=backend)


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
