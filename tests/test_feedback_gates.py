"""The AdaReLU gate ops ``ada_relu`` and ``ada_relu_feedback`` (docs/feedback.md): the reference
against the formula; every backend against the reference, forward, feedback and backward;
torch.library checks; torch.compile; errors. (The AdaReLU layer: test_feedback_layers.py.)"""

import math

import pytest
import torch
from _feedback_utils import BACKENDS, DTYPES, assert_non_finite_stays_in_its_plane, plane_inputs
from _ids import case_id, dtype_id
from _tolerances import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from screening_attn import _backend
from screening_attn.feedback import _ops, functional, reference
from screening_attn.feedback.functional import ada_relu, ada_relu_feedback

HYP = settings(
    deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
F64 = torch.float64
SHAPES = [(1,), (7,), (2, 3, 5, 5), (4, 16, 28, 28), (3, 2500)]  # last: > one Triton block
CASES = [pytest.param(s, d, id=case_id(shape=s, dtype=d)) for s in SHAPES for d in DTYPES]


def _inputs(shape, dtype, gated):
    x = torch.randn(shape, dtype=dtype)
    h = torch.randn(shape, dtype=dtype) if gated else None
    return x, h


# --- the reference against the formula -----------------------------------------------------------
@HYP
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), eta=st.floats(0.0, 1.0))
def test_ada_relu_reference_matches_spec(shape, eta):
    x, hidden = torch.randn(*shape, dtype=F64), torch.randn(*shape, dtype=F64)
    y, mask = reference.ada_relu(x, None, eta)
    assert torch.equal(mask, x > 0)
    assert_close(y, torch.where(x > 0, x, torch.zeros_like(x)))
    y, mask = reference.ada_relu(x, hidden, eta)
    moved = (1 - eta) * x + eta * hidden
    assert torch.equal(mask, torch.sign(moved) * torch.sign(hidden) > 0)
    assert_close(y, torch.where(mask, moved, torch.zeros_like(x)))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_ada_relu_formula_by_hand(backend):
    """Independent of the reference: values worked out from docs/feedback.md by hand."""
    x = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    h = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0, 3.0], dtype=torch.float64)
    # x' = x + 0.5 (h - x) = (x + h) / 2 = [1, 0, 0.5, -1.5, 0.25, 1.5]; open where x' h > 0
    y, m = ada_relu(x, h, 0.5, backend=backend)
    assert m.tolist() == [True, False, False, True, False, True]
    assert y.tolist() == [1.0, 0.0, 0.0, -1.5, 0.0, 1.5]
    y, m = ada_relu(x, None, 0.5, backend=backend)  # ungated: ReLU, eta unused
    assert y.tolist() == [1.0, 0.0, 2.0, 0.0, 0.5, 0.0]


TINY = [1e-4, -1e-4, 3e-5, -3e-5, 1e-30, -1e-30, 1e-40, -1e-40, 0.0, -0.0, 2.0, -2.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gate_decides_near_zero_by_sign(backend, dtype):
    """Gate arguments a hair from 0 (1e-40 is subnormal in float32) are decided by their sign
    like any other: x > 0 ungated, x' h > 0 gated (eta = 0.5 moves x halfway to h, far from
    any rounding of x'), and in the fused InsNorm·Bias·AdaReLU, u = x r > 0."""
    x = torch.tensor(TINY, dtype=dtype)
    y, m = ada_relu(x, None, 0.5, backend=backend)
    assert m.tolist() == [v > 0 for v in TINY]
    assert torch.equal(y, x * m)
    h = torch.tensor([2e-4 if i % 3 else -2e-4 for i in range(len(TINY))], dtype=dtype)
    moved = [0.5 * (a + b) for a, b in zip(TINY, h.double().tolist())]
    y, m = ada_relu(x, h, 0.5, backend=backend)
    assert m.tolist() == [a * b > 0 for a, b in zip(moved, h.double().tolist())]
    y_ref, m_ref = reference.ada_relu(x, h, 0.5)
    assert torch.equal(m, m_ref)
    assert_close(y, y_ref)
    planes = x.view(1, 2, 2, 3)  # the 1e-30 and 1e-40 stay tiny after the normalization
    y, m = functional.ins_bias_ada_relu(planes, None, None, 0.0, backend=backend)
    assert m.flatten().tolist() == [v > 0 for v in TINY]


# --- every backend against the reference ---------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_ada_relu_matches_reference(backend, gated, shape, dtype):
    x, h = _inputs(shape, dtype, gated)
    eta = 0.1
    xs = [x.clone().requires_grad_() for _ in range(2)]
    hs = [None if h is None else h.clone().requires_grad_() for _ in range(2)]
    y_ref, m_ref = reference.ada_relu(xs[0], hs[0], eta)
    y, m = ada_relu(xs[1], hs[1], eta, backend=backend)
    assert m.dtype == torch.bool and y.dtype == dtype and y.shape == x.shape
    assert torch.equal(m, m_ref)
    assert_close(y, y_ref)
    g = torch.randn(shape, dtype=dtype)
    grads_ref = torch.autograd.grad(y_ref, [xs[0], *([hs[0]] if gated else [])], g)
    grads = torch.autograd.grad(y, [xs[1], *([hs[1]] if gated else [])], g)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_ada_relu_feedback_matches_reference(backend, shape, dtype):
    z = torch.randn(shape, dtype=dtype, requires_grad=True)
    mask = torch.randn(shape) > 0
    out = ada_relu_feedback(z, mask, backend=backend)
    assert_close(out, reference.ada_relu_feedback(z, mask))
    g = torch.randn(shape, dtype=dtype)
    (gz,) = torch.autograd.grad(out, z, g)
    assert_close(gz, g * mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(3, 5) > 0

    def gated(x, h):
        return ada_relu(x, h, 0.3, backend=backend)[0]

    assert torch.autograd.gradcheck(gated, (x, h))
    assert torch.autograd.gradgradcheck(gated, (x, h))
    assert torch.autograd.gradcheck(lambda x: ada_relu(x, backend=backend)[0], (x,))
    assert torch.autograd.gradgradcheck(lambda x: ada_relu(x, backend=backend)[0], (x,))
    assert torch.autograd.gradcheck(lambda z: ada_relu_feedback(z, mask, backend=backend), (z,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_empty(backend):
    x = torch.randn(6, 4, 5).transpose(0, 2)
    h = torch.randn(5, 4, 6)[:, :, :]
    h = h.transpose(1, 2).transpose(1, 2)
    y, m = ada_relu(x, h, 0.2, backend=backend)
    y_ref, m_ref = reference.ada_relu(x, h, 0.2)
    assert torch.equal(m, m_ref)
    assert_close(y, y_ref)
    y, m = ada_relu(torch.empty(0, 3), torch.empty(0, 3), 0.1, backend=backend)
    assert y.shape == (0, 3) and m.shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_local(backend):
    x = torch.randn(4, 4)
    x[1, 2] = float("nan")
    h = torch.randn(4, 4)
    y, m = ada_relu(x, h, 0.1, backend=backend)
    assert torch.isnan(y[1, 2]) and not m[1, 2]
    y_ref, _ = reference.ada_relu(x, h, 0.1)
    finite = ~torch.isnan(y_ref)
    assert torch.isnan(y).sum() == 1
    assert_close(y[finite], y_ref[finite])


@pytest.mark.parametrize("op", ["ada_relu", "ada_relu_feedback"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_non_finite_stays_in_its_plane_forward_and_backward(backend, bad, op):
    t = plane_inputs()
    if op == "ada_relu":
        assert_non_finite_stays_in_its_plane(
            lambda x: functional.ada_relu(x, t.hidden, 0.1, backend=backend)[0], t.x, bad
        )
    else:
        assert_non_finite_stays_in_its_plane(
            lambda x: functional.ada_relu_feedback(x, t.mask, backend=backend), t.x, bad
        )


# Random shapes, dtypes and layouts against the reference: tests/test_fuzz.py.


# --- torch.library and torch.compile -------------------------------------------------------------
def _opcheck_samples(dtype=torch.float64):
    x = torch.randn(3, 4, 5, dtype=dtype, requires_grad=True)
    h = torch.randn(3, 4, 5, dtype=dtype, requires_grad=True)
    xt = torch.randn(5, 4, 3, dtype=dtype).permute(2, 1, 0).requires_grad_()  # non-contiguous
    return [(x, None, 0.1), (x, h, 0.1), (xt, h, 0.4), (xt, None, 0.0)]


def _ops_of(backend):
    return _ops.gates.CPP if backend == "cpu" else _ops.gates.TRITON


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    fwd, bwd, fb = _ops_of(backend)
    for args in _opcheck_samples():
        torch.library.opcheck(fwd, args)
    g = torch.randn(5, 4, 3, dtype=torch.float64).permute(2, 1, 0).requires_grad_()
    mask = torch.randn(3, 4, 5) > 0
    torch.library.opcheck(bwd, (g, mask, 0.3))
    torch.library.opcheck(fb, (g, mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def f(x, h):
        y, m = ada_relu(x, h, 0.1, backend=backend)
        z = ada_relu_feedback(y * 2, m, backend=backend)
        return (z * z).sum()

    x = torch.randn(4, 8, requires_grad=True)
    h = torch.randn(4, 8, requires_grad=True)
    eager = f(x, h)
    ge = torch.autograd.grad(eager, (x, h))
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, h)
    gc = torch.autograd.grad(out, (x, h))
    assert_close(out, eager)
    for a, b in zip(gc, ge):
        assert_close(a, b)


# --- errors --------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="hidden must have the shape of x"):
        ada_relu(x, torch.randn(3, 2), 0.1)
    with pytest.raises(ValueError, match="hidden must be 2-d"):
        ada_relu(x, torch.randn(6), 0.1)
    with pytest.raises(TypeError, match="hidden must have the dtype of x"):
        ada_relu(x, torch.randn(2, 3, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="hidden must be on the device of x"):
        ada_relu(x, torch.randn(2, 3, device="meta"), 0.1)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ada_relu(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        ada_relu([1.0, 2.0])
    with pytest.raises(TypeError, match="eta must be a finite float"):
        ada_relu(x, x, "0.1")
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        ada_relu_feedback(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask must have the shape"):
        ada_relu_feedback(x, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend must be one of"):
        ada_relu(x, backend="cpp")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        ada_relu(x, backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ada_relu(torch.randn(3), backend="triton")


def test_cpp_op_checks_its_inputs():
    """Direct torch.ops callers get the C++ checks (TORCH_CHECK_VALUE / _TYPE)."""
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="hidden must have the shape of x"):
        torch.ops.screening_attn.ada_relu(x, torch.randn(3, 2), 0.1)
    with pytest.raises(TypeError, match="hidden must have the dtype of x"):
        torch.ops.screening_attn.ada_relu(x, torch.randn(2, 3, dtype=torch.float64), 0.1)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        torch.ops.screening_attn.ada_relu_feedback(x, torch.ones(2, 3))


def test_auto_picks_the_cpp_kernel_on_cpu():
    cpu, kernels = torch.device("cpu"), functional._KERNELS
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert _backend.resolve("ada_relu", "auto", cpu, dtype, kernels) == "cpu"
    # a dtype the kernel does not take: "auto" runs the reference, a named backend refuses,
    # naming the op, the backend, the dtypes it takes and the one it got
    fp8 = torch.float8_e4m3fn
    assert _backend.resolve("ada_relu", "auto", cpu, fp8, kernels) == "reference"
    with pytest.raises(
        TypeError,
        match=r"ada_relu: backend='cpu' takes float16, bfloat16, float32 or float64 inputs, "
        r"got torch.float8_e4m3fn",
    ):
        _backend.resolve("ada_relu", "cpu", cpu, fp8, kernels)
