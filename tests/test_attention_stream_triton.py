"""The Triton kernels stream (docs/streaming.md): the op ``screened_attention_stream_triton``
takes a stream's initial state (R0 slot keys with their scores, the P earlier keys with their
relevancy so far) and runs the n new positions in one launch of each kernel.

Oracle: the reference's ``screened_attention_stream``, call by call, each backend carrying its
own state: outputs, slots, relevancy, spans and the next state (float64 to 1e-10), gradients
of the call's q, k, v against the reference's autograd; fp16/bf16 by the rule of
``tests/_tolerances.py``; ``opcheck``; a compiled decode step; ``ScreenedKVCache(backend=
"triton")`` against one ``screened_attention`` call.

Without a GPU the kernels run under the Triton interpreter (conftest.py): T <= 24, B·H <= 8.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _attention_utils import tied_decisions
from _env import DEVICE
from _ids import case_id
from _tolerances import assert_close, assert_low_precision_close
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention_gqa_padding import padding
from test_attention_kernels import one_hot_qk
from test_cache import make_qkv, run_split

from screening_attn import ScreenedKVCache, _backend, screened_attention
from screening_attn.attention import _ops, cache
from screening_attn.attention.reference import screened_attention_stream

pytestmark = pytest.mark.skipif(not _backend.HAS_TRITON, reason="triton is not installed")

STATE_FIELDS = ("keys", "values", "relevancy", "valid", "slot_keys", "slot_values",
                "slot_index", "slot_score")  # fmt: skip


def qkv(B, H, Hkv, T, D=4, Dv=3, seed=0, dtype=torch.float64, ties=False):
    """Inputs on DEVICE; ``ties``: saturated logits (each 0 or NEG at random, one-hot keys,
    D = T), so that the weights are exactly 0 or 1/n and relevancies tie exactly."""
    if ties:
        active = torch.rand(B, H, T, T, generator=torch.Generator().manual_seed(seed)) < 0.5
        q, k, v = one_hot_qk("triton", active, dtype)
        return q.detach(), k[:, :Hkv].detach(), v[:, :Hkv].detach()
    q, k, v = make_qkv(B, H, Hkv, T, D, Dv, seed=seed, dtype=torch.float64)
    return tuple(x.to(DEVICE, dtype) for x in (q, k, v))


def assert_same_state(got, want, check):
    assert got.seen == want.seen
    for name in STATE_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype in (torch.bool, torch.int64):
            assert torch.equal(a.cpu(), b.cpu()), name
        else:
            check(a, b)


def run_both(q, k, v, window, relevant, scale, real, cuts):
    """The Triton stream and the reference stream over the pieces between ``cuts``, each from
    its own state; every call's results compared (float64, 1e-10; indices exact)."""
    bounds = [0, *cuts, q.shape[2]]
    s_tr = s_ref = None
    for a, b in itertools.pairwise(bounds):
        part = [x[:, :, a:b] for x in (q, k, v)]
        mask = None if real is None else real[:, a:b]
        *got, s_tr = _ops.screened_attention_stream_triton_state(
            *part, window, relevant, scale, mask, s_tr
        )
        *want, s_ref = screened_attention_stream(*part, window, relevant, scale, mask, s_ref)
        out, index, score, relevancy, span = got
        assert_close(out, want[0])
        assert torch.equal(index.cpu(), want[1].cpu())
        assert_close(score, want[2])
        assert_close(relevancy, want[3])
        assert torch.equal(span.cpu(), want[4].cpu())
        assert_same_state(s_tr, s_ref, assert_close)
    return s_tr


# (B, H, Hkv, T, window, relevant, padding, cuts, ties seed or None): prefill, single-token
# decode steps and chunks; G = H / Hkv in {1, 2, 4}
CASES = [
    (1, 2, 2, 24, 4, 3, "none", (10, 11, 12, 13, 18), None),
    (1, 4, 2, 24, 4, 3, "left", (9, 10, 11, 16, 17), None),
    (1, 8, 2, 20, 3, 2, "right", (7, 8, 9, 15), None),
    (2, 2, 1, 20, 5, 2, "random", (6, 7, 8, 13), None),
    (2, 4, 1, 16, 3, 2, "left", (1, 2, 3, 9), None),  # decode from the first position on
    (1, 2, 1, 6, 9, 2, "none", (3, 4, 5), None),  # T < ν
    (1, 2, 1, 12, 1, 3, "none", (5, 6, 7), None),  # ν = 1: no earlier keys, slots only
    (1, 2, 1, 16, 4, 0, "left", (6, 7, 8), None),  # ρ = 0
    (1, 2, 2, 14, 3, 20, "none", (5, 6, 7), None),  # ρ >= T
    # exact ties of both kinds (asserted), G = 1, 2, and ν = 1
    (2, 2, 2, 20, 2, 3, "none", (8, 9, 10, 15), 0),
    (1, 2, 1, 20, 2, 3, "none", (8, 9, 10, 15), 16),
    (1, 4, 2, 20, 1, 3, "none", (7, 8, 9), 1),
]


@pytest.mark.parametrize(
    "B, H, Hkv, T, window, relevant, pad, cuts, ties",
    CASES,
    ids=[
        case_id(B=B, H=H, Hkv=Hkv, T=T, w=w, r=r, pad=p, ties=t)
        for B, H, Hkv, T, w, r, p, _, t in CASES
    ],
)
def test_stream_steps_equal_the_reference(B, H, Hkv, T, window, relevant, pad, cuts, ties):
    tied = ties is not None
    q, k, v = qkv(B, H, Hkv, T, seed=ties if tied else T + window, ties=tied)
    scale = 1.0 if tied else 0.6
    real = padding(pad, B, T, seed=window)
    real = None if real is None else real.to(DEVICE)
    if tied:  # the one-call screening did decide exact ties of both kinds
        _, ref = screened_attention(q, k, v, window, relevant, scale=scale, return_state=True,
                                    backend="reference")  # fmt: skip
        equal, between = tied_decisions(ref, window)
        assert equal > 0 and between > 0, (equal, between)
    run_both(q, k, v, window, relevant, scale, real, list(cuts))


@pytest.mark.parametrize("G, n, pad", [(1, 5, "none"), (2, 1, "left"), (4, 3, "random")])
def test_gradients_of_the_new_inputs(G, n, pad):
    """The backward of a step from a non-empty state: dq, dk, dv of the call's n positions
    against the reference stream's autograd (the cached keys are detached)."""
    B, Hkv, T, window, relevant = 1, 2, 18, 4, 3
    q, k, v = qkv(B, G * Hkv, Hkv, T, seed=G + n)
    real = padding(pad, B, T, seed=3)
    real = None if real is None else real.to(DEVICE)
    a = T - n
    *_, state = screened_attention_stream(
        q[:, :, :a], k[:, :, :a], v[:, :, :a], window, relevant, 0.5,
        None if real is None else real[:, :a],
    )  # fmt: skip
    assert state.slot_keys.shape[2] > 0 and state.keys.shape[2] > 0
    new = [x[:, :, a:].clone().requires_grad_() for x in (q, k, v)]
    mask = None if real is None else real[:, a:]
    out = _ops.screened_attention_stream_triton_state(*new, window, relevant, 0.5, mask, state)[0]
    want = screened_attention_stream(*new, window, relevant, 0.5, mask, state)[0]
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(n))
    g = g.to(DEVICE)
    got_grads = torch.autograd.grad(out, new, g)
    want_grads = torch.autograd.grad(want, new, g)
    assert_close(out, want)
    for x, y in zip(got_grads, want_grads):
        assert_close(x, y)
    assert any(x.abs().max() > 0 for x in got_grads[1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_stream(dtype):
    """fp16/bf16: each call's output within the rule of tests/_tolerances.py of the float64
    reference stream on the same (rounded) inputs, against the reference run in ``dtype``;
    the slots those of the float64 stream."""
    B, H, Hkv, T, window, relevant = 1, 4, 2, 20, 4, 3
    q, k, v = qkv(B, H, Hkv, T, D=8, Dv=8, seed=11, dtype=dtype)
    x64 = [x.double() for x in (q, k, v)]
    s_tr = s_lp = s_64 = None
    for a, b in itertools.pairwise([0, 9, 10, 11, 15, T]):
        part, part64 = [x[:, :, a:b] for x in (q, k, v)], [x[:, :, a:b] for x in x64]
        out, *_, s_tr = _ops.screened_attention_stream_triton_state(
            *part, window, relevant, 0.35, None, s_tr
        )
        lp, *_, s_lp = screened_attention_stream(*part, window, relevant, 0.35, None, s_lp)
        e64, *_, s_64 = screened_attention_stream(*part64, window, relevant, 0.35, None, s_64)
        assert out.dtype == dtype
        assert_low_precision_close(out, e64, lp)
        assert torch.equal(s_tr.slot_index.cpu(), s_64.slot_index.cpu())


def stream_op_args(G=2, n=6, window=4, relevant=3, scale=0.5):
    """Arguments of the Triton stream op as the glue builds them, from a state left by 14
    padded positions of a grouped-head stream."""
    B, Hkv, before = 2, 2, 14
    q, k, v = qkv(B, G * Hkv, Hkv, before + n, seed=5)
    real = (torch.rand(B, before + n, generator=torch.Generator().manual_seed(2)) < 0.8).to(DEVICE)
    *_, s = screened_attention_stream(
        q[:, :, :before], k[:, :, :before], v[:, :, :before], window, relevant, scale,
        real[:, :before],
    )  # fmt: skip
    valid = torch.cat([s.valid, real[:, before:]], dim=1)
    new = [x[:, :, before:] for x in (q, k, v)]
    state = (s.slot_keys, s.slot_values, s.keys, s.values, s.relevancy, s.slot_index,
             s.slot_score)  # fmt: skip
    return (*new, valid, *state, window, relevant, scale)


def test_stream_op_opcheck():
    """torch.library.opcheck of the Triton stream op and its backward: from a state (with a
    strided q), and from the start without padding."""
    args = stream_op_args()
    q = args[0].transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # strided
    k, v = (x.clone().requires_grad_() for x in args[1:3])
    torch.library.opcheck(_ops.screened_attention_stream_triton, (q, k, v, *args[3:]))
    q0, k0, v0 = qkv(1, 2, 1, 7, seed=1)
    empty = q0.new_empty(1, 1, 0)
    start = (q0, k0, v0, None, *[q0.new_empty(1, 1, 0, d) for d in (4, 3, 4, 3)],
             empty, empty.long(), empty, 3, 2, 0.5)  # fmt: skip
    torch.library.opcheck(_ops.screened_attention_stream_triton, start)
    out, lse, *_, span = _ops.screened_attention_stream_triton(*args)
    g = torch.randn_like(out)
    bwd = (g, *args[:3], *args[4:8], out, lse, span, args[3], args[11], args[13], args[12])
    torch.library.opcheck(_ops.screened_attention_stream_backward_triton, bwd)


def test_stream_op_errors():
    args = list(stream_op_args())
    op = _ops.screened_attention_stream_triton
    bad_mask = args[3][:, 1:]
    with pytest.raises(ValueError, match=r"key_padding_mask must be a torch.bool tensor of shape"):
        op(*args[:3], bad_mask, *args[4:])
    with pytest.raises(ValueError, match=r"relevancy0 must be a torch.float64 tensor"):
        op(*args[:8], args[8].float(), *args[9:])
    with pytest.raises(ValueError, match=r"slot_values must be a torch.float64 tensor"):
        op(*args[:5], args[5][:, :, :-1], *args[6:])
    with pytest.raises(ValueError, match=r"relevant must be >= the \d+ initial slots"):
        op(*args[:12], 0, args[13])


def test_decode_step_compiles_fullgraph():
    """Prefill and single-token decode through the Triton stream op, each one compiled graph
    (no graph break), equal to eager."""
    torch._dynamo.reset()
    q, k, v = qkv(1, 4, 2, 16, D=8, Dv=8, seed=4, dtype=torch.float32)

    def step(q, k, v, state):
        out, *_, nxt = _ops.screened_attention_stream_triton_state(q, k, v, 5, 3, 0.35, None, state)
        return out, nxt

    compiled = torch.compile(step, fullgraph=True)
    out, state = step(q[:, :, :12], k[:, :, :12], v[:, :, :12], None)
    cout, cstate = compiled(q[:, :, :12], k[:, :, :12], v[:, :, :12], None)
    torch.testing.assert_close(cout, out)
    for t in range(12, 15):
        s = slice(t, t + 1)
        out, state = step(q[:, :, s], k[:, :, s], v[:, :, s], state)
        cout, cstate = compiled(q[:, :, s], k[:, :, s], v[:, :, s], cstate)
        torch.testing.assert_close(cout, out)
        assert torch.equal(cstate.slot_index, state.slot_index)


class _Calls:
    """Counts the calls of the Triton stream op (the cache must run it, not the reference)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = _ops.screened_attention_stream_triton_state

        def counted(*a, **kw):
            self.n += 1
            return real(*a, **kw)

        monkeypatch.setitem(cache._STREAMS, "triton", counted)


@settings(max_examples=4, deadline=None)
@given(
    Hkv=st.integers(1, 2),
    G=st.sampled_from([1, 2]),
    T=st.integers(1, 14),
    window=st.integers(1, 5),
    relevant=st.integers(0, 3),
    seed=st.integers(0, 2**16),
    pad=st.sampled_from(["none", "left", "random"]),
    data=st.data(),
)
def test_cache_any_split_equals_one_call(Hkv, G, T, window, relevant, seed, pad, data):
    """``ScreenedKVCache(backend="triton")``: any split gives one ``screened_attention`` call's
    outputs (1e-12) and final slots."""
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=4)) if T > 1 else [])
    B = 2
    q, k, v = qkv(B, G * Hkv, Hkv, T, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    real = {
        "none": None,
        "left": torch.arange(T)[None] >= torch.randint(0, T + 1, (B, 1), generator=gen),
        "random": torch.rand(B, T, generator=gen) < 0.7,
    }[pad]
    real = None if real is None else real.to(DEVICE)
    c = ScreenedKVCache(window, relevant, backend="triton")
    out, stored = run_split(c, q, k, v, cuts, real)
    expected, state = screened_attention(
        q, k, v, window, relevant, key_padding_mask=real, return_state=True, backend="reference"
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert torch.equal(c.relevant_index.cpu(), state.relevant_index.cpu())
    torch.testing.assert_close(c.relevant_score, state.relevant_score, rtol=0, atol=1e-12)
    assert max(stored) <= window - 1 + relevant


def test_cache_runs_the_triton_op(monkeypatch):
    calls = _Calls(monkeypatch)
    q, k, v = qkv(1, 2, 1, 8, seed=2)
    c = ScreenedKVCache(3, 2, backend="triton")
    run_split(c, q, k, v, [5, 6])
    assert calls.n == 3
    assert cache.KERNELS["triton"] == _backend.TRITON_DTYPES


def test_auto_picks_triton_for_cuda_tensors():
    """``backend="auto"`` streams on the Triton kernels for CUDA tensors (the rule, checked
    without a GPU), on the C++ kernel for CPU tensors."""
    for dtype in _backend.TRITON_DTYPES:
        picked = _backend.resolve(
            "ScreenedKVCache", "auto", torch.device("cuda"), dtype, cache.KERNELS
        )
        assert picked == "triton"
    if _backend.C_ERROR is None:
        picked = _backend.resolve(
            "ScreenedKVCache", "auto", torch.device("cpu"), torch.float64, cache.KERNELS
        )
        assert picked == "cpu"


def test_hf_generate_streams_on_triton(monkeypatch):
    """``screening_attn.hf`` through the Triton stream: "auto" (which picks it on CUDA
    tensors) routed to it for CPU tensors, greedy tokens and scores of a tiny grouped-head
    Llama equal those without a cache."""
    import test_hf  # skips this test without the [hf] extra (transformers)

    calls = _Calls(monkeypatch)
    monkeypatch.setitem(cache._STREAMS, "cpu", cache._STREAMS["triton"])
    model = test_hf.make_model("llama-gqa")
    ids = test_hf.tokens(1, 6, seed=3)
    kw = dict(max_new_tokens=4, output_scores=True, return_dict_in_generate=True)
    c = test_hf.ScreenedCache(config=model.config)
    a = test_hf.generate(model, ids, cache=c, **kw)
    b = test_hf.generate(model, ids, use_cache=False, **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.scores), torch.stack(b.scores), **test_hf.EXACT)
    assert calls.n == 2 * 4  # two layers, a prefill and three single-token steps
