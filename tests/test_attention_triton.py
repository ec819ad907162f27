"""The Triton kernels of screened attention against the reference (never against another
kernel): forward, every gradient and the state, over dtypes and awkward sizes; torch.library
checks; torch.compile (determinism: test_determinism.py). Without a GPU they run under the
Triton interpreter (set by conftest.py), which is slow: shapes stay small (T <= 256, B·H <= 4)."""

from __future__ import annotations

import math

import pytest
import torch
from _attention_utils import (
    check_against_reference,
    check_nan_locality,
    make_qkv,
    reference_with_state,
)
from _tolerances import assert_low_precision_close

from screening_attn import _backend
from screening_attn.attention import _ops
from screening_attn.attention.state import ScreeningState

pytestmark = pytest.mark.skipif(not _backend.HAS_TRITON, reason="triton is not installed")

# Under the interpreter the kernels use 16-long query and key blocks (64 on a GPU), so T > 16
# crosses block boundaries: sets carried between blocks, keys screened in (and evicted) inside
# a block, key blocks whose spans leave gaps.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_triton(q, k, v, window, relevant, scale=None):
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _, index, score, relevancy, span = _ops.screened_attention_triton(
        q, k, v, window, relevant, scale
    )
    return out, ScreeningState(index, score, relevancy, span)


def qkv(B, H, T, D, Dv, dtype, seed=0):
    return tuple(
        x.detach().to(DEVICE).requires_grad_() for x in make_qkv(B, H, T, D, Dv, dtype, seed)
    )


def case_id(B, H, T, D, Dv, w, r, dtype):
    dv = f"-Dv{Dv}" if Dv != D else ""
    return f"B{B}-H{H}-T{T}-D{D}{dv}-w{w}-r{r}-{str(dtype).removeprefix('torch.')}"


# (B, H, T, D, Dv, window, relevant)
SHAPES = [
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
DTYPE_SHAPES = [(s, torch.float64) for s in SHAPES] + [
    (s, torch.float32) for s in SHAPES if s[2] >= 40
]
CASES = [pytest.param(*s, d, id=case_id(*s, d)) for s, d in DTYPE_SHAPES]


@pytest.mark.parametrize("B,H,T,D,Dv,window,relevant,dtype", CASES)
def test_matches_reference(B, H, T, D, Dv, window, relevant, dtype):
    q, k, v = qkv(B, H, T, D, Dv, dtype)
    # True: same selections (float64 must match exactly; these float32 inputs have no near tie),
    # so the output, every gradient and the whole state were compared.
    assert check_against_reference(run_triton, q, k, v, window, relevant)


def test_explicit_scale_and_peaked_softmax():
    q, k, v = qkv(1, 2, 70, 8, 8, torch.float64)
    with torch.no_grad():
        q *= 4.0  # saturated rows: many exact 0/1 weights, so tied relevancies
    assert check_against_reference(run_triton, q, k, v, 6, 4, scale=0.9)


def test_exact_ties_follow_the_slot_rule():
    # q = 0: uniform attention, relevancies tie exactly and the slot rule alone decides
    q, k, v = qkv(2, 1, 60, 4, 4, torch.float64)
    q = torch.zeros_like(q, requires_grad=True)
    assert check_against_reference(run_triton, q, k, v, 4, 3)


def test_huge_window_and_relevant():
    q, k, v = qkv(1, 2, 30, 4, 4, torch.float64)
    for window, relevant in [(2**40, 3), (5, 1000), (30, 1), (31, 1)]:
        assert check_against_reference(run_triton, q, k, v, window, relevant)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision(dtype):
    """fp16/bf16 inputs accumulate in float32 (under the interpreter every tl.dot is in
    float32: its bf16 tl.dot is wrong). Output and gradients: error against the float64
    reference at most twice the reference's own error in that dtype; state: float32."""
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
    assert_low_precision_close(out, out64, out_lp)
    for a, b64, b_lp in zip(grads, grads64, grads_lp):
        assert_low_precision_close(a, b64, b_lp)


def test_non_contiguous_inputs():
    q, k, v = qkv(1, 2, 40, 6, 6, torch.float64)
    # (B, T, H, D) storage seen as (B, H, T, D): the usual layout after a head split
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    out, state = run_triton(qt, kt, vt, 5, 3)
    ref, ref_state = reference_with_state(q, k, v, 5, 3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(state.span, ref_state.span)


def test_empty_inputs():
    for shape in [(0, 2, 5, 4), (1, 2, 0, 4), (1, 0, 5, 4), (1, 2, 5, 0)]:
        x = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
        out, state = run_triton(x, x, x, 3, 2, scale=1.0)
        ref, ref_state = reference_with_state(x, x, x, 3, 2, 1.0)
        torch.testing.assert_close(out, ref)
        for name in ("relevant_index", "relevant_score", "relevancy", "span"):
            torch.testing.assert_close(getattr(state, name), getattr(ref_state, name))
        (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
        (ref_grad,) = torch.autograd.grad(ref.sum(), x, allow_unused=True)
        torch.testing.assert_close(grad, ref_grad)


def test_opcheck():
    q, k, v = qkv(1, 2, 20, 4, 3, torch.float64)
    qp = q.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # strided
    for args in [(q, k, v, 5, 3, 0.5), (qp, k, v, 1, 0, 1.0), (q, k, v, 30, 2, 0.3)]:
        torch.library.opcheck(_ops.screened_attention_triton, args)
    out, lse, _, _, _, span = _ops.screened_attention_triton(q, k, v, 5, 3, 0.5)
    g = torch.randn_like(out).transpose(2, 3).contiguous().transpose(2, 3)  # strided
    torch.library.opcheck(
        _ops.screened_attention_backward_triton,
        (g, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), span, 5, 0.5),
    )


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def f(q, k, v):
        out, _, _, _, relevancy, span = _ops.screened_attention_triton(q, k, v, 7, 4, 0.3)
        return (out * out).sum() + relevancy.sum(), span

    q, k, v = qkv(1, 2, 40, 8, 8, torch.float32)
    loss, span = f(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    closs, cspan = torch.compile(f, fullgraph=True)(q, k, v)
    cgrads = torch.autograd.grad(closs, (q, k, v))
    assert torch.equal(span, cspan)
    torch.testing.assert_close(closs, loss)
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b)


def test_errors(monkeypatch):
    q = torch.randn(1, 1, 4, 2, device=DEVICE)
    if DEVICE == "cpu":
        with monkeypatch.context() as m:
            m.setenv("TRITON_INTERPRET", "0")
            with pytest.raises(ValueError, match="runs only under the Triton interpreter"):
                _ops.screened_attention_triton(q, q, q, 2, 1, 1.0)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        _ops.screened_attention_triton(q, q, q, 0, 1, 1.0)
    with pytest.raises(ValueError, match="k must have the shape"):
        _ops.screened_attention_triton(q, q[..., :1], q, 2, 1, 1.0)
    with pytest.raises(TypeError, match="v must have the dtype of q"):
        _ops.screened_attention_triton(q, q, q.double(), 2, 1, 1.0)
    q2, k2, v2 = qkv(1, 1, 6, 2, 2, torch.float64)
    out, lse, _, _, _, span = _ops.screened_attention_triton(q2, k2, v2, 2, 1, 0.5)
    with pytest.raises(ValueError, match=r"span must be a torch\.int32 tensor"):
        args = (out, q2, k2, v2, out, lse, span.long(), 2, 0.5)
        _ops.screened_attention_backward_triton(*args)
    (gq,) = torch.autograd.grad(out.sum(), q2, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward of .* is not implemented"):
        gq.sum().backward()


# Random shapes, dtypes and layouts against the reference: tests/test_fuzz.py.


@pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning"
)  # numpy, in the interpreter
def test_nan_reaches_only_dependent_outputs():
    """A NaN/Inf in one key, value or query row gives the reference's NaN pattern, forward and
    backward (a plain tile GEMM would smear 0 · NaN over the tile)."""
    q, k, v = qkv(1, 2, 40, 4, 4, torch.float64)  # 3 blocks of 16 under the interpreter
    positions = {"v": (0, 1, 25, 2), "k": (0, 0, 3, 1), "q": (0, 1, 33, 0)}
    check_nan_locality(lambda *a: run_triton(*a)[0], q, k, v, positions)


def test_public_api_dispatches_to_triton():
    from screening_attn import screened_attention

    q, k, v = make_qkv(1, 2, 40, 8, 8)
    out, state = screened_attention(q, k, v, 5, 3, return_state=True, backend="triton")
    ref, ref_state = reference_with_state(q, k, v, 5, 3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(state.span, ref_state.span)
