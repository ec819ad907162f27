"""Every compiled backend of screened attention, the C++ CPU kernel (``"cpu"``) and the Triton
kernels (``"triton"``), against the reference (never against another kernel): forward, every
gradient and the state, over dtypes and awkward sizes; torch.library checks; torch.compile;
NaN locality; the slot rule's exact ties (the worked example of docs/attention.md, saturated
softmax, repeated states), each asserting that tied decisions happened (determinism:
test_determinism.py; random shapes and layouts: test_fuzz.py).

Without a GPU the Triton kernels run under the Triton interpreter (set by conftest.py), which is
slow: their cases stay small (T <= 256, B·H <= 4), hence a size per backend in most tests.
"""

from __future__ import annotations

import math

import pytest
import torch
from _attention_utils import (
    OpsCalled,
    attention_magnitudes,
    check_against_reference,
    check_nan_locality,
    make_qkv,
    reference_with_state,
    tied_decisions,
)
from _env import DEVICE
from _ids import case_id, dtype_id
from _tolerances import assert_low_precision_close

from screening_attn import _backend
from screening_attn.attention import ScreeningState, _ops, screened_attention

needs_triton = pytest.mark.skipif(not _backend.HAS_TRITON, reason="triton is not installed")
BACKENDS = [pytest.param("cpu"), pytest.param("triton", marks=needs_triton)]


def run_cpu(q, k, v, window, relevant, scale=None):
    return screened_attention(q, k, v, window, relevant, scale=scale, return_state=True,
                              backend="cpu")  # fmt: skip


def run_triton(q, k, v, window, relevant, scale=None):
    """The Triton op itself (the public function's dispatch to it:
    test_public_api_dispatches_to_triton)."""
    if scale is None:
        D = q.shape[-1]
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    out, _, *state = _ops.screened_attention_triton(q, k, v, window, relevant, scale)
    return out, ScreeningState(*state)


RUN = {"cpu": run_cpu, "triton": run_triton}
OP_SUFFIX = {"cpu": "cpp", "triton": "triton"}  # _ops.screened_attention_{suffix}


def qkv(backend, B, H, T, D, Dv=None, dtype=torch.float64, seed=0, scale_by=1.0):
    """``make_qkv``'s leaves on the device of ``backend``: Triton's run on a GPU if there is
    one."""
    device = "cpu" if backend == "cpu" else DEVICE
    xs = make_qkv(B, H, T, D, Dv, dtype, seed, scale_by)
    return tuple(x.detach().to(device).requires_grad_() for x in xs)


# (B, H, T, D, Dv, window, relevant). The C++ kernel's query blocks are 64 long, so T > 64 crosses
# block boundaries with keys screened in during a block and sets carried between blocks.
CPU_SHAPES = [
    (1, 1, 1, 4, 4, 3, 2),  # T = 1
    (1, 2, 5, 4, 3, 8, 2),  # T < window
    (2, 1, 130, 4, 4, 1, 3),  # window 1: every key is screened right after its own query
    (1, 2, 100, 8, 8, 5, 0),  # relevant 0: sliding window
    (1, 1, 70, 4, 4, 5, 100),  # relevant >= T: full causal
    (2, 3, 200, 8, 5, 7, 5),
    (1, 2, 300, 16, 16, 64, 10),  # window == block length
    (1, 1, 257, 5, 7, 70, 9),  # non-powers of two, window > block
    (1, 1, 150, 3, 3, 1, 1),
]
# Under the interpreter the Triton kernels use 16-long query and key blocks (64 on a GPU), so
# T > 16 crosses block boundaries: sets carried between blocks, keys screened in (and evicted)
# inside a block, key blocks whose spans leave gaps.
TRITON_SHAPES = [
    (1, 1, 1, 8, 8, 4, 2),  # T = 1
    (1, 2, 5, 8, 6, 8, 2),  # T < window
    (2, 1, 40, 16, 16, 1, 3),  # window 1: every key is screened right after its own query
    (1, 2, 50, 16, 16, 4, 0),  # relevant 0: sliding window
    (1, 1, 24, 8, 8, 3, 30),  # relevant >= T: full causal
    (2, 2, 63, 12, 20, 4, 2),  # non-powers of two, Dv > D
    (1, 2, 97, 5, 3, 16, 16),  # window == block, D and Dv < 16
    (1, 1, 48, 16, 16, 48, 2),  # window == T: key 0 is screened in after the last query
    (1, 1, 200, 16, 16, 21, 19),  # window and relevant > a block
    (2, 2, 128, 32, 32, 6, 5),  # B·H = 4
]


def _case(backend, shape, dtype):
    B, H, T, D, Dv, w, r = shape
    name = case_id(B=B, H=H, T=T, D=D, Dv=Dv if Dv != D else None, w=w, r=r, dtype=dtype)
    marks = [needs_triton] if backend == "triton" else []
    return pytest.param(backend, *shape, dtype, id=f"{backend}-{name}", marks=marks)


CASES = [_case("cpu", s, d) for s in CPU_SHAPES for d in (torch.float64, torch.float32)]
CASES += [_case("triton", s, torch.float64) for s in TRITON_SHAPES]
CASES += [_case("triton", s, torch.float32) for s in TRITON_SHAPES if s[2] >= 40]


@pytest.mark.parametrize("backend,B,H,T,D,Dv,window,relevant,dtype", CASES)
def test_matches_reference(backend, B, H, T, D, Dv, window, relevant, dtype):
    q, k, v = qkv(backend, B, H, T, D, Dv, dtype)
    # True: same selections (float64 must match exactly; these float32 inputs have no near tie),
    # so the output, every gradient and the whole state were compared.
    assert check_against_reference(RUN[backend], q, k, v, window, relevant)


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_scale_and_peaked_softmax(backend):
    shape = {"cpu": (2, 2, 90, 8, 8), "triton": (1, 2, 70, 8, 8)}[backend]
    q, k, v = qkv(backend, *shape, scale_by=4.0)  # saturated rows: many exact 0/1 weights
    assert check_against_reference(RUN[backend], q, k, v, 6, 4, scale=0.9)


# ----------------------------------------------------------------------------- exact ties
# One-hot keys (D = T) with scale 1 make the logit s_tj = q[t, j]; a candidate whose logit is
# NEG gets weight exactly 0 (exp underflows in every dtype), the others share the mass
# equally: 1/n, correctly rounded in every backend, added to r in query order. Equal sums are
# then bitwise equal in every backend and dtype, so the slot rule itself decides the ties
# (``exact``: no near-tie excuse in float32 either).
# (float32: exp(-105) is 0 too. dk sums |q| = 105 times rounding-sized terms: float32
# gradients get the float64 accuracy rule, ``conditioned``; selections and state are exact.)
NEG = {torch.float64: -1.0e4, torch.float32: -105.0}
TIE_DTYPES = [torch.float64, torch.float32]


def one_hot_qk(backend, active, dtype):
    """q (B, H, T, T) with logit 0 where ``active`` (bool, (B, H, T, T)) and NEG elsewhere, and
    one-hot keys; v random."""
    B, H, T, _ = active.shape
    device = "cpu" if backend == "cpu" else DEVICE
    q = torch.where(active, 0.0, NEG[dtype]).to(dtype)
    k = torch.eye(T, dtype=dtype).expand(B, H, T, T).clone()
    v = torch.randn(B, H, T, 3, generator=torch.Generator().manual_seed(T), dtype=dtype)
    return tuple(x.to(device).requires_grad_() for x in (q, k, v))


@pytest.mark.parametrize("dtype", TIE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_worked_example(backend, dtype):
    """docs/attention.md's worked example, with its exact final state: (a) a leaving key
    against two slots tied at the minimum, (b) a key tying the minimum is dropped, (c) a key
    overwrites the lower of two tied slots."""
    T, window, relevant = 8, 2, 2
    active = torch.zeros(1, 1, T, T, dtype=torch.bool)
    for t, js in {0: [0], 1: [0, 1], 2: [1], 3: [2, 3], 4: [3], 5: [5], 6: [5],
                  7: [6, 7, 5, 1]}.items():  # fmt: skip
        active[0, 0, t, js] = True
    q, k, v = one_hot_qk(backend, active, dtype)
    _, state = RUN[backend](q, k, v, window, relevant, 1.0)
    assert state.relevant_index.tolist() == [[[5, 1]]]
    assert state.relevant_score.tolist() == [[[2.0, 1.5]]]
    assert state.relevancy.tolist() == [[[1.5, 1.5, 0.5, 1.5, 0.0, 2.0, 0.25, 0.25]]]
    span = [[2, 7], [3, 8], [-1, -1], [-1, -1], [-1, -1], [7, 8], [-1, -1], [-1, -1]]
    assert state.span.tolist() == [[span]]
    assert check_against_reference(RUN[backend], q, k, v, window, relevant, 1.0, exact=True,
                                   conditioned=dtype == torch.float32)  # fmt: skip


# (B, H, T, window, relevant, seed): ties of both kinds in every case (asserted)
SATURATED = [(2, 2, 20, 2, 3, 0), (1, 3, 25, 3, 2, 0), (2, 1, 16, 1, 4, 0), (1, 2, 24, 2, 2, 1)]


@pytest.mark.parametrize("dtype", TIE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "B,H,T,window,relevant,seed",
    SATURATED,
    ids=[f"B{c[0]}-H{c[1]}-T{c[2]}-w{c[3]}-r{c[4]}" for c in SATURATED],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_ties_follow_the_slot_rule(backend, B, H, T, window, relevant, seed, dtype):
    """Each logit 0 or NEG at random: weights exactly 0 or 1/n, so relevancies tie exactly, with
    the slot minimum and between slots."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = one_hot_qk(backend, torch.rand(B, H, T, T, generator=g) < 0.5, dtype)
    equal, tied = tied_decisions(reference_with_state(q, k, v, window, relevant, 1.0)[1], window)
    assert equal > 0 and tied > 0, (equal, tied)
    assert check_against_reference(RUN[backend], q, k, v, window, relevant, 1.0, exact=True,
                                   conditioned=dtype == torch.float32)  # fmt: skip


@pytest.mark.parametrize("dtype", TIE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_states_tie_every_decision(backend, dtype):
    """Every query attends only to itself: every key's relevancy is exactly 1, so once the set
    is full every screening is a tie, which keeps the incumbents (the first ρ keys)."""
    T, window, relevant = 20, 3, 4
    active = torch.eye(T, dtype=torch.bool).expand(1, 2, T, T)
    q, k, v = one_hot_qk(backend, active, dtype)
    equal, _ = tied_decisions(reference_with_state(q, k, v, window, relevant, 1.0)[1], window)
    assert equal == 2 * (T - window + 1 - relevant)
    assert check_against_reference(RUN[backend], q, k, v, window, relevant, 1.0, exact=True,
                                   conditioned=dtype == torch.float32)  # fmt: skip
    _, state = RUN[backend](q, k, v, window, relevant, 1.0)
    assert state.relevant_index.tolist() == [[[0, 1, 2, 3]] * 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_window_and_relevant(backend):
    T = {"cpu": 40, "triton": 30}[backend]
    q, k, v = qkv(backend, 1, 2, T, 4)
    # (the state has ρ slots per row, so a huge ρ is a huge output; a huge ν costs nothing)
    for window, relevant in [(2**40, 3), (5, 1000), (T, 1), (T + 1, 1)]:
        assert check_against_reference(RUN[backend], q, k, v, window, relevant)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    T = {"cpu": 90, "triton": 40}[backend]
    q, k, v = qkv(backend, 1, 2, T, 6, 6)
    # (B, T, H, D) storage seen as (B, H, T, D): the usual layout after a head split
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    out, state = RUN[backend](qt, kt, vt, 5, 3)
    ref, ref_state = reference_with_state(q, k, v, 5, 3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(state.span, ref_state.span)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend, dtype):
    device = "cpu" if backend == "cpu" else DEVICE
    for shape in [(0, 2, 5, 4), (1, 2, 0, 4), (1, 0, 5, 4), (1, 2, 5, 0)]:
        x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
        out, state = RUN[backend](x, x, x, 3, 2)
        ref, ref_state = reference_with_state(x, x, x, 3, 2)
        torch.testing.assert_close(out, ref)
        for name in ("relevant_index", "relevant_score", "relevancy", "span"):
            torch.testing.assert_close(getattr(state, name), getattr(ref_state, name))
        (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
        (ref_grad,) = torch.autograd.grad(ref.sum(), x, allow_unused=True)
        torch.testing.assert_close(grad, ref_grad)


@pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning"
)  # numpy, in the Triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_reaches_only_dependent_outputs(backend):
    """A NaN/Inf in one key, value or query row gives the reference's NaN pattern, forward and
    backward (a plain tile GEMM would smear 0 · NaN over the tile)."""
    T, D, Dv, positions = {
        "cpu": (150, 4, 4, {"v": (0, 1, 70, 2), "k": (0, 0, 3, 1), "q": (0, 1, 100, 0)}),
        # 3 blocks of 16 under the interpreter; heads wider than the fix-up launches' 16-column
        # chunks, with the non-finite entries in the second chunk
        "triton": (40, 24, 20, {"v": (0, 1, 25, 18), "k": (0, 0, 3, 17), "q": (0, 1, 33, 0)}),
    }[backend]
    q, k, v = qkv(backend, 1, 2, T, D, Dv)
    check_nan_locality(lambda *a: RUN[backend](*a)[0], q, k, v, positions)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    op = getattr(_ops, f"screened_attention_{OP_SUFFIX[backend]}")
    backward_op = getattr(_ops, f"screened_attention_backward_{OP_SUFFIX[backend]}")
    T = {"cpu": 70, "triton": 20}[backend]
    q, k, v = qkv(backend, 1, 2, T, 4, 3)
    qp = q.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # strided
    for args in [(q, k, v, 5, 3, 0.5), (qp, k, v, 1, 0, 1.0), (q, k, v, T + 10, 2, 0.3)]:
        torch.library.opcheck(op, args)
    out, lse, _, _, _, span = op(q, k, v, 5, 3, 0.5)
    g = torch.randn_like(out).transpose(2, 3).contiguous().transpose(2, 3)  # strided
    torch.library.opcheck(
        backward_op,
        (g, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), span, 5, 0.5),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def f(q, k, v):
        out, state = RUN[backend](q, k, v, 7, 4)
        return (out * out).sum() + state.relevancy.sum(), state.span

    shape = {"cpu": (2, 2, 100, 8, 8), "triton": (1, 2, 40, 8, 8)}[backend]
    q, k, v = qkv(backend, *shape, dtype=torch.float32)
    loss, span = f(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    closs, cspan = torch.compile(f, fullgraph=True)(q, k, v)
    cgrads = torch.autograd.grad(closs, (q, k, v))
    assert torch.equal(span, cspan)
    torch.testing.assert_close(closs, loss)
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b)


def test_errors_cpu():
    q = torch.randn(1, 1, 4, 2)
    q8 = q.to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="'cpu' takes float16, bfloat16, float32 or float64"):
        screened_attention(q8, q8, q8, 2, 1, backend="cpu")
    # direct op callers get the C++ checks
    with pytest.raises(ValueError, match="window must be >= 1"):
        _ops.screened_attention_cpp(q, q, q, 0, 1, 1.0)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        _ops.screened_attention_cpp(q, q[..., :1], q, 2, 1, 1.0)
    with pytest.raises(TypeError, match="v must have the dtype of q"):
        _ops.screened_attention_cpp(q, q, q.double(), 2, 1, 1.0)
    with pytest.raises(RuntimeError, match=r"double backward of .* is not implemented"):
        q2, k2, v2 = make_qkv(1, 1, 6, 2)
        out = screened_attention(q2, k2, v2, 2, 1, backend="cpu")
        (gq,) = torch.autograd.grad(out.sum(), q2, create_graph=True)
        gq.sum().backward()


@needs_triton
def test_errors_triton(monkeypatch):
    q = torch.randn(1, 1, 4, 2, device=DEVICE)
    if DEVICE == "cpu":
        with monkeypatch.context() as m:
            m.setenv("TRITON_INTERPRET", "0")
            with pytest.raises(ValueError, match="runs only under the Triton interpreter"):
                _ops.screened_attention_triton(q, q, q, 2, 1, 1.0)
    # direct op callers get the public function's checks
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        _ops.screened_attention_triton(q, q, q, 0, 1, 1.0)
    with pytest.raises(ValueError, match="k must have the shape"):
        _ops.screened_attention_triton(q, q[..., :1], q, 2, 1, 1.0)
    with pytest.raises(TypeError, match="v must have the dtype of q"):
        _ops.screened_attention_triton(q, q, q.double(), 2, 1, 1.0)
    q2, k2, v2 = qkv("triton", 1, 1, 6, 2, 2)
    out, lse, _, _, _, span = _ops.screened_attention_triton(q2, k2, v2, 2, 1, 0.5)
    with pytest.raises(ValueError, match=r"span must be a torch\.int32 tensor"):
        args = (out, q2, k2, v2, out, lse, span.long(), 2, 0.5)
        _ops.screened_attention_backward_triton(*args)
    (gq,) = torch.autograd.grad(out.sum(), q2, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward of .* is not implemented"):
        gq.sum().backward()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_triton_half_precision(dtype):
    """fp16/bf16 inputs accumulate in float32 (under the interpreter every tl.dot is in
    float32: its bf16 tl.dot is wrong). Output and gradients: error against the float64
    reference at most twice the reference's own error in that dtype, element-wise (with the
    magnitudes of ``attention_magnitudes``); state: float32."""
    B, H, T, D, Dv, window, relevant = 1, 2, 70, 16, 8, 5, 3
    q, k, v = (x.detach().to(dtype) for x in make_qkv(B, H, T, D, Dv, seed=1))
    g = torch.randn(B, H, T, Dv, generator=torch.Generator().manual_seed(2)).to(dtype)

    def out_and_grads(fn, x_dtype):
        xs = [x.to(DEVICE, x_dtype).requires_grad_() for x in (q, k, v)]
        out, state = fn(*xs)
        return out, torch.autograd.grad(out, xs, g.to(DEVICE, x_dtype)), state

    def reference(*xs):
        return reference_with_state(*xs, window, relevant)

    out64, grads64, state64 = out_and_grads(reference, torch.float64)
    out_lp, grads_lp, state_lp = out_and_grads(reference, dtype)
    out, grads, state = out_and_grads(lambda *xs: run_triton(*xs, window, relevant), dtype)
    assert out.dtype == dtype and all(x.dtype == dtype for x in grads)
    assert state.relevancy.dtype == state.relevant_score.dtype == torch.float32
    # these inputs have no near tie: float32 and float64 pick the same sets
    assert torch.equal(state.span.cpu(), state64.span) and torch.equal(state.span, state_lp.span)
    assert torch.equal(state.relevant_index, state_lp.relevant_index)
    torch.testing.assert_close(state.relevancy, state_lp.relevancy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.relevant_score, state_lp.relevant_score, rtol=1e-5, atol=1e-5)
    mags = attention_magnitudes(q, k, v, g, state64.candidate_mask(window))
    assert_low_precision_close(out, out64, out_lp, mags[0])
    for a, b64, b_lp, m in zip(grads, grads64, grads_lp, mags[1:]):
        assert_low_precision_close(a, b64, b_lp, m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("grouped", [False, True], ids=["mha", "gqa-padding"])
def test_cpu_half_precision(dtype, grouped):
    """fp16/bf16 inputs on the C++ kernel ("auto" picks it), computed in float32: output and
    gradients within twice the reference's own error in that dtype of the float64 reference;
    the state in float32, the sets those of the reference in that dtype."""
    B, H, T, D, Dv, window, relevant = 2, 4, 150, 16, 8, 5, 3
    Hkv = 2 if grouped else H
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, h, T, d, generator=gen, dtype=torch.float64).to(dtype)
               for h, d in ((H, D), (Hkv, D), (Hkv, Dv)))  # fmt: skip
    real = torch.arange(T)[None] >= torch.tensor([[0], [40]]) if grouped else None
    g = torch.randn(B, H, T, Dv, generator=gen).to(dtype)

    def run(backend, x_dtype):
        xs = [x.to(x_dtype).requires_grad_() for x in (q, k, v)]
        out, state = screened_attention(*xs, window, relevant, key_padding_mask=real,
                                        return_state=True, backend=backend)  # fmt: skip
        return out, torch.autograd.grad(out, xs, g.to(x_dtype)), state

    with OpsCalled() as mode:
        out, grads, state = run("auto", dtype)
    assert {n.split("::")[0] for n in mode.names if "screened" in n} == {"screening_attn"}
    out64, grads64, state64 = run("reference", torch.float64)
    out_lp, grads_lp, state_lp = run("reference", dtype)
    assert out.dtype == dtype and all(x.dtype == dtype for x in grads)
    assert state.relevancy.dtype == state.relevant_score.dtype == torch.float32
    assert torch.equal(state.span, state_lp.span) and torch.equal(state.span, state64.span)
    torch.testing.assert_close(state.relevancy, state_lp.relevancy, rtol=1e-5, atol=1e-5)
    # element-wise magnitudes on the query heads (k, v and the sets repeated over each group;
    # padded keys out), dk and dv summed over the group as the kernel sums them
    G = H // Hkv
    mask = state64.candidate_mask(window).repeat_interleave(G, 1)
    if real is not None:
        mask = mask & real[:, None, None, :]
    kq, vq = (x.repeat_interleave(G, 1) for x in (k, v))
    m_out, m_q, m_k, m_v = attention_magnitudes(q, kq, vq, g, mask)
    m_k, m_v = (m.unflatten(1, (Hkv, G)).sum(2) for m in (m_k, m_v))
    assert_low_precision_close(out, out64, out_lp, m_out)
    for a, b64, b_lp, m in zip(grads, grads64, grads_lp, (m_q, m_k, m_v)):
        assert_low_precision_close(a, b64, b_lp, m)


def test_cpu_half_precision_op_checks():
    """Direct callers of the C++ op: half inputs give a half output and float32 statistics."""
    q, k, v = (x.detach().to(torch.bfloat16) for x in make_qkv(1, 2, 20, 4, 4))
    out, lse, _, score, rel, _ = _ops.screened_attention_cpp(q, k, v, 3, 2, 0.5)
    assert out.dtype == torch.bfloat16 and lse.dtype == score.dtype == rel.dtype == torch.float32
    ref = screened_attention(q.float(), k.float(), v.float(), 3, 2, scale=0.5, backend="cpu")
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=0, atol=0)


@needs_triton
def test_triton_programs_stride_over_blocks(monkeypatch):
    """Grid axes 1 and 2 hold at most 65535 programs (B·H goes on axis 0), so the programs of
    axis 1 stride over the query and key blocks: with 2 of them, each takes 2-3 of the 5
    blocks of 16, forward and backward, fix-ups included (a NaN in V)."""
    from screening_attn._kernels import attention as kernels

    monkeypatch.setattr(kernels, "_GRID_YZ", 2)
    q, k, v = qkv("triton", 1, 2, 70, 8, 8)
    assert check_against_reference(run_triton, q, k, v, 5, 3)
    check_nan_locality(lambda *a: run_triton(*a)[0], q, k, v, {"v": (0, 1, 40, 2)}, 5, 3)


@needs_triton
def test_triton_refuses_rows_past_int32_offsets():
    """Offsets inside one (b, h) row are int32: T · max(D, Dv) >= 2³¹ is refused before a
    launch (a tensor that large can't be built here, so the check itself is called)."""
    from screening_attn._kernels import attention as kernels

    kernels._check_sizes(2**24, 127, 64)
    with pytest.raises(ValueError, match=r"< 2\^31"):
        kernels._check_sizes(2**24, 64, 128)
    with pytest.raises(ValueError, match=r"T=1073741824"):
        kernels._check_sizes(2**30, 1, 1)  # the span's 2 columns


@needs_triton
def test_public_api_dispatches_to_triton():
    q, k, v = make_qkv(1, 2, 40, 8, 8)
    out, state = screened_attention(q, k, v, 5, 3, return_state=True, backend="triton")
    ref, ref_state = reference_with_state(q, k, v, 5, 3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(state.span, ref_state.span)
