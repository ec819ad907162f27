"""Shared helpers of the screened-attention tests: the reference with its state wrapped, and a
backend's run against the reference's, selections included (docs/numerics.md)."""

from __future__ import annotations

import math

import torch
from _tolerances import TOL

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


def near_tie_explains(state, ref_state, window, rtol=1e-5) -> bool:
    """True when every row whose selection differs first differs at a screening decision that
    compared two scores within ``rtol`` of each other (in the reference's run), or on a key
    whose relevancy is subnormal in float32 (see ``SUBNORMAL``)."""
    span, ref_span = state.span.flatten(0, 1), ref_state.span.flatten(0, 1)
    rel = ref_state.relevancy.flatten(0, 1).double()
    for n in range(span.shape[0]):
        bad = (span[n] != ref_span[n]).any(-1).nonzero()
        if len(bad) == 0:
            continue
        # Keys are screened in order e = 0, 1, ...; a differing span of key j can stem from the
        # decision on j itself or on the key that evicted it, so look at the earliest of both.
        e = int(bad.min())
        t = e + window - 1
        start, end = ref_span[n, :, 0], ref_span[n, :, 1]
        members = ((start >= 0) & (start <= t) & (end > t)).nonzero().flatten()
        members = members[members != e]
        if len(members) == 0:
            return False
        r_e, r_min = rel[n, e], rel[n, members].min()
        if r_e.abs() < SUBNORMAL:
            continue
        if not (r_e - r_min).abs() <= rtol * max(r_e.abs(), r_min.abs()):
            return False
    return True


def check_against_reference(run, q, k, v, window, relevant, scale=None):
    """``run(q, k, v, window, relevant, scale) -> (out, state)`` against the reference, forward,
    gradients and state. Returns False (after checking what can be) if a near-tie made the two
    selections legitimately differ, True otherwise."""
    dtype = q.dtype
    rtol, atol = TOL[dtype]
    out, state = run(q, k, v, window, relevant, scale)
    ref, ref_state = reference_with_state(q, k, v, window, relevant, scale)
    if not torch.equal(state.span, ref_state.span):
        assert dtype != torch.float64, "float64 selections must match the reference exactly"
        assert near_tie_explains(state, ref_state, window), "selection differs without a near tie"
        return False
    torch.testing.assert_close(state.relevant_index, ref_state.relevant_index, rtol=0, atol=0)
    torch.testing.assert_close(state.relevant_score, ref_state.relevant_score, rtol=rtol, atol=atol)
    torch.testing.assert_close(state.relevancy, ref_state.relevancy, rtol=rtol, atol=atol)
    assert state.relevant_score.dtype == ref_state.relevant_score.dtype
    assert state.relevancy.dtype == ref_state.relevancy.dtype
    assert state.span.dtype == torch.int32 and state.relevant_index.dtype == torch.int64
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")
    return True


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
