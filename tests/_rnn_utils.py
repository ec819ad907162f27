"""Shared helpers of the RelRNN / RelLSTM kernel tests: a module with non-zero biases, and one
run of a backend against the reference (forward h, final state, every gradient)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from _tolerances import TOL

from screening_attn.nn import RelLSTM, RelRNN

F64 = torch.float64


def make(kind, I, Hd, window, relevant, nonlinearity="tanh", dtype=F64, device="cpu", seed=0):
    torch.manual_seed(seed)
    if kind == "rnn":
        m = RelRNN(I, Hd, window, relevant, nonlinearity, dtype=dtype)
    else:
        m = RelLSTM(I, Hd, window, relevant, dtype=dtype)
    with torch.no_grad():  # non-zero biases and a peaked v: rows screen differently
        for name, p in m.named_parameters():
            if name.endswith("bias") or name == "nonlinearity.b":
                p.uniform_(-0.5, 0.5)
        m.v.mul_(3.0)
    return m.to(device)


def run(m, x, h0, g, backend, attn):
    """h, state and the gradients of x, h0 and every parameter (zeros where unused)."""
    kw = {"attn": attn} if isinstance(m, RelRNN) else {}
    x = x.detach().requires_grad_()
    h0 = None if h0 is None else h0.detach().requires_grad_()
    h, state = m(x, h0, backend=backend, **kw)
    inputs = [x, *([] if h0 is None else [h0]), *m.parameters()]
    grads = torch.autograd.grad(h, inputs, g, allow_unused=True, materialize_grads=True)
    return h, state, grads


def near_tie(state, rtol=1e-5) -> bool:
    """Some row holds two screened relevancies within rtol: float32 may then select otherwise."""
    r = state.relevancy.double().T  # (B, T)
    for row in r:
        s, _ = row.sort()
        if ((s[1:] - s[:-1]).abs() <= rtol * s[1:].abs()).any():
            return True
    return False


def check(
    kind,
    *,
    T=20,
    B=3,
    I=4,
    Hd=5,
    window=3,
    relevant=2,
    nonlinearity="tanh",
    attn=1.3,
    dtype=F64,
    with_h0=True,
    seed=0,
    backend="cpu",
    device="cpu",
    x=None,
    model=None,
    restride: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """One run of ``backend`` against the reference; ``restride`` (same values, other strides)
    is applied to x and h0. Returns the module."""
    m = model or make(kind, I, Hd, window, relevant, nonlinearity, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if x is None:
        x = torch.randn(T, B, I, generator=gen, dtype=F64)
    x = x.to(device, dtype)
    T, B = x.shape[:2]
    h0 = torch.randn(B, Hd, generator=gen, dtype=F64).to(device, dtype) if with_h0 else None
    if restride is not None:
        x, h0 = restride(x), None if h0 is None else restride(h0)
    g = torch.randn(T, B, Hd, generator=gen, dtype=F64).to(device, dtype)
    h, st, grads = run(m, x, h0, g, backend, attn)
    rh, rst, rgrads = run(m, x, h0, g, "reference", attn)
    assert h.dtype == dtype and h.shape == (T, B, Hd)
    assert st.relevant_index.shape == st.relevant_score.shape == (B, relevant)
    assert st.relevancy.shape == (T, B) and st.relevancy.dtype == rst.relevancy.dtype
    assert st.relevant_score.dtype == rst.relevant_score.dtype
    assert not st.relevant_score.requires_grad and not st.relevancy.requires_grad
    if not torch.equal(st.relevant_index, rst.relevant_index):
        assert dtype != F64, "float64 selections must match the reference exactly"
        assert near_tie(rst), "float32 selection differs without a near tie"
        return m
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(st.relevant_score, rst.relevant_score, rtol=rtol, atol=atol)
    torch.testing.assert_close(st.relevancy, rst.relevancy, rtol=rtol, atol=atol)
    names = ["h", "x", *(["h0"] if with_h0 else []), *(n for n, _ in m.named_parameters())]
    exact = None  # the float64 reference, run only if a float32 comparison needs it
    for name, a, b in zip(names, (h, *grads), (rh, *rgrads), strict=True):
        try:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        except AssertionError:
            if dtype != torch.float32:
                raise
            # Long recurrences can amplify rounding (BPTT through unsaturated steps): then
            # the float32 kernel must be as accurate as the float32 reference, both against
            # float64 (the rule of _tolerances.assert_low_precision_close), or within float32's
            # tolerance relative to the largest entry.
            if exact is None:
                exact = _float64_run(m, x, h0, g, attn, rst)
            if exact is False:
                return m  # float64 selects otherwise: a near tie for float32
            e = exact[names.index(name)].double()
            err, ref_err = ((t.double() - e).abs().max().item() for t in (a, b))
            floor = rtol * e.abs().max().item() + atol  # float32's tolerance, norm-wise
            assert err <= 2 * ref_err + floor, f"d{name}: error {err:.3g} > 2 x {ref_err:.3g}"
    return m


def _float64_run(m, x, h0, g, attn, rst):
    """h and the gradients of the reference in float64 on the exactly upcast inputs, or False
    if its selection differs from the float32 reference's ``rst``."""
    m64 = copy.deepcopy(m).double()
    h0 = None if h0 is None else h0.double()
    h, st, grads = run(m64, x.double(), h0, g.double(), "reference", attn)
    if not torch.equal(st.relevant_index, rst.relevant_index):
        assert near_tie(st), "float32 and float64 select otherwise without a near tie"
        return False
    return (h, *grads)
