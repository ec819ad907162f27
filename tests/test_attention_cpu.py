"""The C++ CPU kernel of screened attention against the reference: forward, every gradient and
the state, over dtypes and awkward sizes; torch.library checks; torch.compile; NaN locality
(determinism: test_determinism.py)."""

import pytest
import torch
from _attention_utils import (
    check_against_reference,
    check_nan_locality,
    make_qkv,
    reference_with_state,
)

from screening_attn.attention import _ops, screened_attention, screened_attention_reference


def run_cpu(q, k, v, window, relevant, scale):
    return screened_attention(q, k, v, window, relevant, scale=scale, return_state=True,
                              backend="cpu")  # fmt: skip


# (B, H, T, D, Dv, window, relevant): the kernel's query blocks are 64 long, so T > 64 crosses
# block boundaries with keys screened in during a block and sets carried between blocks.
SHAPES = [
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


def _id(shape, dtype):
    B, H, T, D, Dv, w, r = shape
    return f"B{B}-H{H}-T{T}-D{D}-Dv{Dv}-w{w}-r{r}-{str(dtype).removeprefix('torch.')}"


CASES = [pytest.param(s, d, id=_id(s, d)) for s in SHAPES for d in (torch.float64, torch.float32)]


@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_matches_reference(shape, dtype):
    B, H, T, D, Dv, w, r = shape
    q, k, v = make_qkv(B, H, T, D, Dv, dtype=dtype)
    assert check_against_reference(run_cpu, q, k, v, w, r)


def test_explicit_scale_and_peaked_softmax():
    q, k, v = make_qkv(2, 2, 90, 8, 8, scale_by=4.0)  # saturated rows: many exact 0/1 weights
    assert check_against_reference(run_cpu, q, k, v, 6, 4, scale=0.9)


def test_exact_ties_follow_the_slot_rule():
    # q = 0: uniform attention, so relevancies tie exactly and the slot rule decides
    q, k, v = make_qkv(2, 1, 80, 4)
    q = torch.zeros_like(q, requires_grad=True)
    assert check_against_reference(run_cpu, q, k, v, 4, 3)


# Random shapes, dtypes and layouts against the reference: tests/test_fuzz.py.


def test_non_contiguous_inputs():
    q, k, v = make_qkv(1, 2, 90, 6, 6)
    # (B, T, H, D) storage seen as (B, H, T, D): the usual layout after a head split
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    out = screened_attention(qt, kt, vt, 5, 3, backend="cpu")
    ref = screened_attention_reference(q, k, v, 5, 3)[0]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_empty_inputs():
    for shape in [(0, 2, 5, 4), (1, 2, 0, 4), (1, 0, 5, 4), (1, 2, 5, 0)]:
        x = torch.randn(shape, requires_grad=True)
        out, state = screened_attention(x, x, x, 3, 2, return_state=True, backend="cpu")
        ref, ref_state = reference_with_state(x, x, x, 3, 2)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(state.relevant_index, ref_state.relevant_index)
        torch.testing.assert_close(state.span, ref_state.span)
        (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
        (ref_grad,) = torch.autograd.grad(ref.sum(), x, allow_unused=True)
        torch.testing.assert_close(grad, ref_grad)


def test_nan_reaches_only_dependent_outputs():
    """A NaN/Inf in one key, value or query row gives the reference's NaN pattern, forward and
    backward (the GEMM path would smear 0·NaN over a whole block)."""
    q, k, v = make_qkv(1, 2, 150, 4, 4)
    positions = {"v": (0, 1, 70, 2), "k": (0, 0, 3, 1), "q": (0, 1, 100, 0)}
    check_nan_locality(lambda *a: screened_attention(*a, backend="cpu"), q, k, v, positions)


def test_opcheck():
    q, k, v = make_qkv(1, 2, 70, 4, 3)
    qp = q.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # strided
    for args in [(q, k, v, 5, 3, 0.5), (qp, k, v, 1, 0, 1.0), (q, k, v, 80, 2, 0.3)]:
        torch.library.opcheck(_ops.screened_attention_cpp, args)
    out, lse, _, _, _, span = _ops.screened_attention_cpp(q, k, v, 5, 3, 0.5)
    g = torch.randn_like(out)
    torch.library.opcheck(
        _ops.screened_attention_backward_cpp,
        (g, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), span, 5, 0.5),
    )


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def f(q, k, v):
        out, state = screened_attention(q, k, v, 7, 4, return_state=True, backend="cpu")
        return (out * out).sum() + state.relevancy.sum(), state.span

    q, k, v = make_qkv(2, 2, 100, 8, 8, dtype=torch.float32)
    loss, span = f(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    closs, cspan = torch.compile(f, fullgraph=True)(q, k, v)
    cgrads = torch.autograd.grad(closs, (q, k, v))
    assert torch.equal(span, cspan)
    torch.testing.assert_close(closs, loss)
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b)


def test_errors():
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(TypeError, match="backend='cpu' takes float32 or float64"):
        screened_attention(q.half(), q.half(), q.half(), 2, 1, backend="cpu")
    out = screened_attention(q.half(), q.half(), q.half(), 2, 1)  # auto: the reference
    assert out.dtype == torch.float16
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


def test_huge_window_and_relevant():
    q, k, v = make_qkv(1, 2, 40, 4)
    # (the state has ρ slots per row, so a huge ρ is a huge output; a huge ν costs nothing)
    for window, relevant in [(2**40, 3), (5, 1000), (40, 1), (41, 1)]:
        assert check_against_reference(run_cpu, q, k, v, window, relevant)
