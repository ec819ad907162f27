"""The instance-norm ops (docs/feedback.md): ``ins_norm``, ``ins_bias_ada_relu`` (bottom-up
InsNorm·Bias·AdaReLU in one pass) and ``ins_norm_gate`` (top-down InsNorm·gate). The reference
against the formula; every backend (C++ CPU, Triton under the interpreter) against the
reference, forward and backward; gradcheck; NaN, strided inputs; torch.library checks; errors.
(The InsNorm layer: test_feedback_layers.py.)"""

import math

import pytest
import torch
from _feedback_utils import (
    BACKENDS,
    DTYPES,
    F64,
    assert_non_finite_stays_in_its_plane,
    grads,
    ins_oracle,
    leaves,
    plane_inputs,
)
from _ids import case_id, dtype_id
from _tolerances import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from screening_attn.feedback import InsNorm, _ops, functional, ins_norm, reference

HYP = settings(
    deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# (N, C, H, W). Planes: shorter than one CPU vector (16 floats, 8 doubles), one float vector,
# vectors and a tail; the last is larger than one Triton block (1024)
NORM_SHAPES = [(1, 1, 1, 2), (1, 2, 4, 4), (2, 3, 5, 7), (1, 2, 33, 40)]


def _shape_id(shape):
    return case_id(shape=shape)


# --- the reference against the formula -----------------------------------------------------------
@HYP
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 4),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    centered=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_ins_norm_matches_formula(n, c, h, w, centered, seed):
    if centered and h * w < 2:
        h = 2
    x = torch.randn(n, c, h, w, dtype=F64, generator=torch.Generator().manual_seed(seed))
    expected = ins_oracle(x, centered)
    assert_close(reference.ins_norm(x, 1e-8, centered), expected)
    assert_close(ins_norm(x, centered=centered), expected)
    assert_close(InsNorm(centered=centered)(x), expected)


def test_ins_norm_eps_and_directions():
    x = torch.randn(2, 3, 4, 5, dtype=F64)
    assert_close(ins_norm(x, eps=0.5), x / ((x * x).mean(dim=(2, 3), keepdim=True) + 0.5).sqrt())
    # centered: only the denominator uses the variance, x is not shifted
    y = ins_norm(x + 10.0, centered=True)
    assert_close(y, (x + 10.0) / (x.var(dim=(2, 3), keepdim=True) + 1e-8).sqrt())
    top_down = InsNorm(bottom_up=False, top_down=True)
    assert top_down(x) is x
    assert_close(top_down.feedback(x), ins_oracle(x))
    assert InsNorm().feedback(x) is x


def test_ins_norm_nan_stays_in_its_plane():
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    x[1, 2, 0, 3] = float("nan")
    y = ins_norm(x)
    assert y[1, 2].isnan().all()
    y[1, 2] = 0.0
    assert y.isfinite().all()


# --- every backend against the reference ---------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=_shape_id)
@pytest.mark.parametrize(
    "gated,with_bias,centered",
    [(False, True, False), (True, True, False), (True, False, True), (False, False, True)],
    ids=["relu-bias", "ada-bias", "ada-centered", "relu-centered"],
)
def test_ins_bias_ada_relu_matches_reference(backend, dtype, shape, gated, with_bias, centered):
    x = torch.randn(shape, dtype=dtype) * 3 + (2.0 if centered else 0.0)
    bias = torch.randn(shape[1], dtype=dtype) if with_bias else None
    hidden = torch.randn(shape, dtype=dtype) if gated else None
    eta = 0.3
    ref_in, ker_in = leaves(x, bias, hidden), leaves(x, bias, hidden)
    y_ref, m_ref = reference.ins_bias_ada_relu(*ref_in, eta, centered=centered)
    y, m = functional.ins_bias_ada_relu(
        *ker_in[:2], ker_in[2], eta, centered=centered, backend=backend
    )
    assert m.dtype == torch.bool and y.dtype == dtype and y.shape == shape
    assert torch.equal(m, m_ref)
    assert_close(y, y_ref)
    g = torch.randn(shape, dtype=dtype)
    for a, b in zip(grads(y, ker_in, g), grads(y_ref, ref_in, g)):
        assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("centered", [False, True], ids=["msq", "centered"])
def test_ins_norm_gate_and_ins_norm_match_reference(backend, dtype, shape, centered):
    z = torch.randn(shape, dtype=dtype)
    mask = torch.randn(shape) > 0
    (zr,), (zk,) = leaves(z), leaves(z)
    zn_ref, out_ref = reference.ins_norm_gate(zr, mask, centered=centered)
    zn, out = functional.ins_norm_gate(zk, mask, centered=centered, backend=backend)
    assert_close(zn, zn_ref)
    assert_close(out, out_ref)
    g1, g2 = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    (want,) = torch.autograd.grad((zn_ref * g1).sum() + (out_ref * g2).sum(), zr, retain_graph=True)
    (got,) = torch.autograd.grad((zn * g1).sum() + (out * g2).sum(), zk, retain_graph=True)
    assert_close(got, want)
    for ours, theirs in ((zn, zn_ref), (out, out_ref)):  # one output used: the other has no grad
        assert_close(
            torch.autograd.grad(ours, zk, g1, retain_graph=True)[0],
            torch.autograd.grad(theirs, zr, g1, retain_graph=True)[0],
        )
    y, y_ref = functional.ins_norm(zk, centered=centered, backend=backend), zn_ref.detach()
    assert_close(y, y_ref)
    y_ref = reference.ins_norm(zr, 1e-8, centered)
    assert_close(torch.autograd.grad(y, zk, g1)[0], torch.autograd.grad(y_ref, zr, g1)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 8, 256, 256),
        (1, 9, 250, 250),
    ],  # 2 MiB+ in float32; planes of whole 64-byte lines, or not
    ids=_shape_id,
)
def test_ins_norm_gate_streams_the_hidden_state_past_the_cache_cpu(dtype, shape):
    """The CPU kernel writes the gate's new hidden state (ins_norm_gate's zn) with non-temporal
    stores when it is 2 MiB or more and its planes are whole cache lines: the same values as
    the reference. (ada_unpool_gate's u: test_feedback_stages.py.)"""
    z = torch.randn(shape, dtype=dtype)
    mask = torch.randn(shape) > 0
    zn, out = functional.ins_norm_gate(z, mask, backend="cpu")
    zn_ref, out_ref = reference.ins_norm_gate(z, mask)
    assert_close(zn, zn_ref)
    assert_close(out, out_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_zero_closes_every_gate(backend):
    # the fused gate: hidden = 0 closes every gate (x' hidden = 0)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    y, mask = functional.ins_bias_ada_relu(x, None, torch.zeros_like(x), 0.1, backend=backend)
    assert not mask.any() and (y == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_local(backend):
    x = torch.randn(2, 3, 6, 8)
    x[1, 2, 3, 5] = float("nan")
    hidden = torch.randn_like(x)
    # instance norm: the NaN's (n, c) plane only
    y, mask = functional.ins_bias_ada_relu(x, torch.randn(3), hidden, 0.1, backend=backend)
    nan = y.isnan()
    assert nan[1, 2].all() and nan.sum() == 48 and not mask[1, 2].any()
    zn, _ = functional.ins_norm_gate(x, mask, backend=backend)
    assert zn.isnan().sum() == 48 and zn[1, 2].isnan().all()


@pytest.mark.parametrize("op", ["ins_bias_ada_relu", "ins_norm_gate"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_non_finite_stays_in_its_plane_forward_and_backward(backend, bad, op):
    t = plane_inputs()
    if op == "ins_bias_ada_relu":
        assert_non_finite_stays_in_its_plane(
            lambda x: functional.ins_bias_ada_relu(x, t.bias, t.hidden, 0.1, backend=backend)[0],
            t.x,
            bad,
        )
    else:
        assert_non_finite_stays_in_its_plane(
            lambda x: torch.cat(functional.ins_norm_gate(x, t.mask, backend=backend)),
            t.x,
            bad,
            outputs=2,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_channels_last(backend):
    x = torch.randn(2, 4, 6, 10, dtype=F64)
    h = torch.randn_like(x)
    layouts = [
        x.contiguous(memory_format=torch.channels_last),
        x.transpose(2, 3).contiguous().transpose(2, 3),
        torch.randn(2, 4, 6, 20, dtype=F64)[..., ::2].copy_(x),
    ]
    y0, m0 = functional.ins_bias_ada_relu(x, None, h, 0.2, backend=backend)
    for xs in layouts:
        assert not xs.is_contiguous()
        hs = h.contiguous(memory_format=torch.channels_last)
        y, m = functional.ins_bias_ada_relu(xs, None, hs, 0.2, backend=backend)
        assert torch.equal(m, m0) and torch.equal(y, y0) and y.is_contiguous()
        ms = m0.transpose(2, 3).contiguous().transpose(2, 3)
        _, out = functional.ins_norm_gate(xs, ms, backend=backend)
        assert torch.equal(out, functional.ins_norm_gate(x, m0, backend=backend)[1])


# Random shapes, dtypes and layouts against the reference: tests/test_fuzz.py.


# --- gradcheck, opcheck --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    # the Triton interpreter is slow: fast_mode (random projections of the Jacobian) for it
    check = {"fast_mode": backend == "triton"}

    def d(*shape):
        return torch.randn(*shape, dtype=F64, requires_grad=True)

    x, b, h = d(2, 2, 3, 4), d(2), d(2, 2, 3, 4)
    mask = torch.randn(2, 2, 3, 4) > 0
    for centered in (False, True):

        def fused(x, b, h, centered=centered):
            return functional.ins_bias_ada_relu(x, b, h, 0.3, centered=centered, backend=backend)[0]

        def gate(x, centered=centered):
            return functional.ins_norm_gate(x, mask, centered=centered, backend=backend)

        assert torch.autograd.gradcheck(fused, (x, b, h), **check)
        assert torch.autograd.gradcheck(lambda x, b: fused(x, b, None), (x, b), **check)
        assert torch.autograd.gradcheck(gate, (x,), **check)


def _norm_ops(backend):
    return _ops.norms.CPP if backend == "cpu" else _ops.norms.TRITON


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    norm = _norm_ops(backend)
    x = torch.randn(2, 3, 4, 6, dtype=F64, requires_grad=True)
    xt = torch.randn(2, 3, 6, 4, dtype=F64).transpose(2, 3).requires_grad_()  # non-contiguous
    b = torch.randn(3, dtype=F64, requires_grad=True)
    h = torch.randn(2, 3, 4, 6, dtype=F64, requires_grad=True)
    mask = torch.randn(2, 3, 4, 6) > 0
    for args in [(x, b, h, 0.3, 1e-8, False), (xt, None, None, 0.1, 1e-5, True)]:
        torch.library.opcheck(norm.ins_bias_ada_relu, args)
    torch.library.opcheck(norm.ins_norm, (xt, 1e-8, True))
    torch.library.opcheck(norm.ins_norm_gate, (xt, mask, 1e-8, False))
    # backward ops (their own double backward raises, so no input requires grad here)
    xd, g = x.detach(), torch.randn(2, 3, 4, 6, dtype=F64)
    _, m, rstd = norm.ins_bias_ada_relu(xd, b.detach(), h.detach(), 0.3, 1e-8, False)
    torch.library.opcheck(norm.ins_bias_ada_relu_backward, (g, xd, m, rstd, 0.3, True, True, False))
    torch.library.opcheck(norm.ins_norm_backward, (g, xd, rstd, False))
    torch.library.opcheck(norm.ins_norm_gate_backward, (g, g, xd, m, rstd, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_of_the_norm_ops_raises(backend):
    x = torch.randn(1, 2, 3, 3, dtype=F64, requires_grad=True)
    y, _ = functional.ins_bias_ada_relu(x, None, None, 0.1, backend=backend)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward of ins_bias_ada_relu"):
        g.sum().backward()


# --- errors --------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    x = torch.randn(2, 3, 4, 4)
    cases = [
        (lambda: functional.ins_bias_ada_relu(x, torch.randn(4)), ValueError, "bias must have"),
        (lambda: functional.ins_bias_ada_relu(x, None, torch.randn(2, 3, 4)), ValueError, "hidden"),
        (lambda: functional.ins_bias_ada_relu(x[0]), ValueError, "x must be 4-d"),
        (lambda: functional.ins_bias_ada_relu(x, eta="0.1"), TypeError, "eta"),
        (lambda: functional.ins_bias_ada_relu(x, eps=-1.0), ValueError, "eps"),
        (lambda: functional.ins_norm_gate(x, torch.ones(2, 3, 4, 4)), TypeError, "mask"),
        (lambda: functional.ins_norm(x[:, :, :1, :1], centered=True), ValueError, "centered"),
        (lambda: functional.ins_norm(x, backend="cuda"), ValueError, "CUDA tensors"),
    ]
    for call, exc, text in cases:
        with pytest.raises(exc, match=text):
            call()


def _bad_ins_norm_calls():
    x4 = torch.randn(2, 3, 4, 4)
    return [
        ("ins-eps-inf", lambda: ins_norm(x4, eps=math.inf), ValueError, "eps"),
        ("ins-rank", lambda: ins_norm(torch.randn(3, 4)), ValueError, "x must be 4-d"),
        ("ins-int", lambda: ins_norm(torch.ones(1, 1, 2, 2, dtype=torch.int64)), TypeError, "x"),
        ("ins-centered", lambda: ins_norm(x4, centered="yes"), TypeError, "centered"),
        ("ins-centered-1x1", lambda: ins_norm(x4[:, :, :1, :1], centered=True), ValueError, "x"),
    ]


@pytest.mark.parametrize("case", _bad_ins_norm_calls(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, call, exc, text = case
    with pytest.raises(exc, match=text):
        call()


def test_cpp_ops_check_their_inputs():
    """Direct torch.ops callers get the C++ checks (TORCH_CHECK_VALUE / _TYPE)."""
    ops = torch.ops.screening_attn
    x = torch.randn(2, 3, 4, 4)
    for call, exc, text in [
        (
            lambda: ops.ins_bias_ada_relu(x, torch.randn(4), None, 0.1, 1e-8, False),
            ValueError,
            "bias",
        ),
        (lambda: ops.ins_norm(x[0], 1e-8, False), ValueError, "4-d"),
        (lambda: ops.ins_norm_gate(x, torch.ones(2, 3, 4, 4), 1e-8, False), TypeError, "mask"),
        (
            lambda: ops.ins_norm_backward(x, x, torch.ones(2, 3, dtype=F64), False),
            TypeError,
            "rstd",
        ),
    ]:
        with pytest.raises(exc, match=text):
            call()
