"""The stage fusions (docs/feedback.md): ``ins_bias_ada_relu_pool2d`` (bottom-up
InsNorm·Bias·AdaReLU·AdaPool) and ``ada_unpool_gate`` (top-down AdaPool·AdaReLU feedback). Every
backend against the reference (their compositions), forward and backward; gradcheck,
torch.library checks of the C++ ops and their backward ops; streaming stores; empty batches
and non-finite values. (Which layers run them: test_feedback_layers.py.)"""

import math
from types import SimpleNamespace

import pytest
import torch
from _feedback_utils import (
    BACKENDS,
    DTYPES,
    F64,
    assert_non_finite_stays_in_its_plane,
    first_positions,
    grads,
    leaves,
    plane_inputs,
)
from _ids import case_id, dtype_id
from _tolerances import assert_close, assert_low_precision_close

from screening_attn import _backend
from screening_attn.feedback import _ops, functional, reference


def _stage_inputs(dtype, gated, shape=(2, 3, 8, 10)):
    x = torch.randn(shape, dtype=dtype)
    pooled = (*shape[:2], shape[2] // 2, shape[3] // 2)
    hidden = torch.randn(shape, dtype=dtype) if gated else None
    pool_hidden = torch.randint(-1, 2, pooled).to(dtype) if gated else None
    return x, torch.randn(shape[1], dtype=dtype), hidden, pool_hidden


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gated", [False, True], ids=["first-pass", "gated"])
def test_stage_fusions_match_the_reference(backend, dtype, gated):
    x, b, h, hp = _stage_inputs(dtype, gated)
    ref_in, ker_in = leaves(x, b, h), leaves(x, b, h)
    y_ref, m_ref, amax_ref, amin_ref = reference.ins_bias_ada_relu_pool2d(*ref_in, hp, 0.2, 2)
    y, m, amax, amin = functional.ins_bias_ada_relu_pool2d(*ker_in, hp, 0.2, 2, backend=backend)
    assert torch.equal(m, m_ref) and torch.equal(amax, amax_ref) and torch.equal(amin, amin_ref)
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    for a, c in zip(grads(y, ker_in, g), grads(y_ref, ref_in, g)):
        assert_close(a, c)
    # feedback: unpool then gate, both outputs used (the gate's hidden and what goes down)
    z = torch.randn_like(y)
    (zr,), (zk,) = leaves(z), leaves(z)
    size = tuple(x.shape[2:])
    ur, out_r = reference.ada_unpool_gate(zr, amax, amin, hp, m, 2, size)
    u, out = functional.ada_unpool_gate(zk, amax, amin, hp, m, 2, size, backend=backend)
    assert torch.equal(u, ur) and torch.equal(out, out_r)
    g1, g2 = torch.randn_like(u), torch.randn_like(u)
    (want,) = torch.autograd.grad((ur * g1).sum() + (out_r * g2).sum(), zr, retain_graph=True)
    (got,) = torch.autograd.grad((u * g1).sum() + (out * g2).sum(), zk, retain_graph=True)
    assert_close(got, want)
    for ours, theirs in ((u, ur), (out, out_r)):  # one output used: the other has no grad
        assert_close(
            torch.autograd.grad(ours, zk, g1, retain_graph=True)[0],
            torch.autograd.grad(theirs, zr, g1, retain_graph=True)[0],
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gated", [False, True], ids=["first-pass", "gated"])
@pytest.mark.parametrize("k", [2, 3])
def test_stage_fusion_ties_pick_the_first_position(backend, dtype, gated, k):
    """The fused pool on tied gate outputs: inputs in {-2, -1, 0, 1, 2} (and a hidden state
    that is a function of them) give bitwise-equal normalized values wherever the inputs are
    equal, and the ReLU makes every non-positive one 0: most windows tie, many at zero. The
    positions must follow the pools' rule on the reference's gate output."""
    gen = torch.Generator().manual_seed(10 + k)
    shape = (2, 3, 3 * k, 4 * k + 1)
    pooled = (2, 3, 3, 4)
    x = torch.randint(-2, 3, shape, generator=gen).to(dtype)
    x[0, 0, :k, :k] = -1.0  # a window of zeros after the ReLU
    b = torch.tensor([0.0, 0.25, -0.5], dtype=dtype)
    h = 0.5 * x if gated else None
    hp = torch.randint(-1, 2, pooled, generator=gen).to(dtype) if gated else None
    u_ref, m_ref = reference.ins_bias_ada_relu(x, b, h, 0.2)
    want_max, tied_max = first_positions(u_ref, k, True)
    want_min, tied_min = first_positions(u_ref, k, False)
    assert tied_max >= 5 and tied_min >= 5
    assert (want_max > 0).any() and (want_min > 0).any()
    y_ref, _, _, _ = reference.ins_bias_ada_relu_pool2d(x, b, h, hp, 0.2, k)
    y, m, amax, amin = functional.ins_bias_ada_relu_pool2d(x, b, h, hp, 0.2, k, backend=backend)
    assert torch.equal(m, m_ref)
    assert torch.equal(amax, want_max) and torch.equal(amin, want_min)
    assert_close(y, y_ref)


def test_stage_fusions_gradcheck_and_opcheck_cpu():
    x, b, h, hp = (None if t is None else t.requires_grad_() for t in _stage_inputs(F64, True))
    stages = _ops.stages.CPP

    def stage(x, b, h):
        return functional.ins_bias_ada_relu_pool2d(x, b, h, hp, 0.3, 2, backend="cpu")[0]

    assert torch.autograd.gradcheck(stage, (x, b, h))
    _, m, amax, amin = functional.ins_bias_ada_relu_pool2d(x, b, h, hp, 0.3, 2, backend="cpu")
    z = torch.randn(2, 3, 4, 5, dtype=F64, requires_grad=True)

    def unpool_gate(z):
        return functional.ada_unpool_gate(z, amax, amin, hp, m, 2, (8, 10), backend="cpu")

    assert torch.autograd.gradcheck(unpool_gate, (z,))
    assert torch.autograd.gradgradcheck(unpool_gate, (z,))
    xt = x.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    torch.library.opcheck(stages.ins_bias_ada_relu_pool2d, (xt, b, h, hp, 0.3, 1e-8, False, 2))
    torch.library.opcheck(
        stages.ins_bias_ada_relu_pool2d, (x, None, None, None, 0.1, 1e-8, True, 2)
    )
    torch.library.opcheck(stages.ada_unpool_gate, (z, hp, amax, amin, m, 2, 8, 10))
    m11 = torch.randn(2, 3, 8, 11) > 0  # a column past the last window
    torch.library.opcheck(stages.ada_unpool_gate, (z, None, amax, amin, m11, 2, 8, 11))
    # their fused backward ops (the pooled stage's has no derivative: no input requires grad)
    xd, bd, hd, hpd = x.detach(), b.detach(), h.detach(), hp.detach()
    y, m2, rstd, amax2, amin2 = stages.ins_bias_ada_relu_pool2d(xd, bd, hd, hpd, 0.3, 0.0, True, 2)
    args = (torch.randn_like(y), xd, m2, rstd, hpd, amax2, amin2, 0.3, True, True, True, 2)
    torch.library.opcheck(stages.ins_bias_ada_relu_pool2d_backward, args)
    gu = torch.randn(2, 3, 8, 10, dtype=F64, requires_grad=True)
    go = torch.randn(2, 3, 8, 10, dtype=F64, requires_grad=True)
    torch.library.opcheck(stages.ada_unpool_gate_backward, (gu, go, hp, amax, amin, m, 2))
    torch.library.opcheck(stages.ada_unpool_gate_backward, (None, go, None, amax, amin, m, 2))
    (gx,) = torch.autograd.grad(stage(x, b, h).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward of ins_bias_ada_relu_pool2d"):
        gx.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 8, 256, 256),
        (1, 9, 250, 250),
    ],  # 2 MiB+ in float32; planes of whole 64-byte lines, or not
    ids=lambda s: case_id(shape=s),
)
def test_ada_unpool_gate_streams_the_hidden_state_past_the_cache_cpu(dtype, shape):
    """The CPU kernel writes the gate's new hidden state (ada_unpool_gate's u) with
    non-temporal stores when it is 2 MiB or more and its planes are whole cache lines: the
    same values as the reference. (ins_norm_gate's zn: test_feedback_norms.py.)"""
    mask = torch.randn(shape) > 0
    pooled = (*shape[:2], shape[2] // 2, shape[3] // 2)
    zp, hp = torch.randn(pooled, dtype=dtype), torch.randn(pooled, dtype=dtype)
    _, amax, amin = functional.ada_pool2d(torch.randn(shape, dtype=dtype), hp, 2, backend="cpu")
    u, out = functional.ada_unpool_gate(zp, amax, amin, hp, mask, 2, shape[2:], backend="cpu")
    u_ref, out_ref = reference.ada_unpool_gate(zp, amax, amin, hp, mask, 2, shape[2:])
    assert torch.equal(u, u_ref) and torch.equal(out, out_ref)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_empty_batch(backend):
    """N = 0 runs the stage ops (and the ins_norm_gate that follows) forward and backward to
    empty results. (A whole CNN-F: test_feedback_models.py.)"""
    x = torch.randn(0, 2, 4, 6, dtype=F64, requires_grad=True)
    y, mask, amax, amin = functional.ins_bias_ada_relu_pool2d(
        x, torch.zeros(2, dtype=F64), torch.randn_like(x), torch.randn(0, 2, 2, 3, dtype=F64),
        0.1, 2, backend=backend,
    )  # fmt: skip
    u, out = functional.ada_unpool_gate(y, amax, amin, None, mask, 2, (4, 6), backend=backend)
    zn, gated = functional.ins_norm_gate(out, mask, backend=backend)
    assert y.shape == (0, 2, 2, 3) and u.shape == out.shape == zn.shape == x.shape
    (grad,) = torch.autograd.grad((y.sum() + gated.sum()), x)
    assert grad.shape == x.shape


@pytest.mark.parametrize("op", ["ins_bias_ada_relu_pool2d", "ada_unpool_gate"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_non_finite_stays_in_its_plane_forward_and_backward(backend, bad, op):
    t = plane_inputs()
    if op == "ins_bias_ada_relu_pool2d":
        assert_non_finite_stays_in_its_plane(
            lambda x: functional.ins_bias_ada_relu_pool2d(
                x, t.bias, t.hidden, t.pool_hidden, 0.1, 2, backend=backend
            )[0],
            t.x,
            bad,
        )
    else:
        _, amax, amin = functional.ada_pool2d(t.x, t.pool_hidden, 2, backend=backend)
        assert_non_finite_stays_in_its_plane(
            lambda z: torch.cat(
                functional.ada_unpool_gate(
                    z, amax, amin, t.pool_hidden, t.mask, 2, (4, 6), backend=backend
                )
            ),
            t.z,
            bad,
            outputs=2,
        )


# Random shapes, dtypes and layouts against the reference: tests/test_fuzz.py.


# Each CNN-F op on the tensors of plane_inputs() (shapes in the helper): the op's outputs, and
# the names of the inputs it is differentiable in.
_OPS = {
    "ada_relu": (lambda t, b: functional.ada_relu(t.x, t.hidden, 0.3, backend=b), "x hidden"),
    "ada_relu_feedback": (lambda t, b: functional.ada_relu_feedback(t.x, t.mask, backend=b), "x"),
    "ins_norm": (lambda t, b: functional.ins_norm(t.x, backend=b), "x"),
    "ins_norm_gate": (lambda t, b: functional.ins_norm_gate(t.x, t.mask, backend=b), "x"),
    "ins_bias_ada_relu": (
        lambda t, b: functional.ins_bias_ada_relu(t.x, t.bias, t.hidden, 0.3, backend=b),
        "x bias hidden",
    ),
    "ada_pool2d": (lambda t, b: functional.ada_pool2d(t.x, t.pool_hidden, 2, backend=b), "x"),
    "ada_unpool2d": (
        lambda t, b: functional.ada_unpool2d(
            t.z, t.amax, t.amin, t.pool_hidden, 2, (4, 6), backend=b
        ),
        "z",
    ),
    "ins_bias_ada_relu_pool2d": (
        lambda t, b: functional.ins_bias_ada_relu_pool2d(
            t.x, t.bias, t.hidden, t.pool_hidden, 0.3, 2, backend=b
        ),
        "x bias hidden",
    ),
    "ada_unpool_gate": (
        lambda t, b: functional.ada_unpool_gate(
            t.z, t.amax, t.amin, t.pool_hidden, t.mask, 2, (4, 6), backend=b
        ),
        "z",
    ),
}


def _run_op(name, dtype, backend, g):
    """``name`` on plane_inputs() cast to ``dtype``: (outputs, gradients of its inputs for the
    output gradients ``g``, cast to ``dtype``)."""
    op, wrt = _OPS[name]
    p = plane_inputs()
    _, p.amax, p.amin = reference.ada_pool2d(p.x, p.pool_hidden, 2)
    t = SimpleNamespace(
        **{k: v.to(dtype) if v.is_floating_point() else v for k, v in vars(p).items()}
    )
    for k in wrt.split():
        setattr(t, k, getattr(t, k).requires_grad_())
    out = op(t, backend)
    out = out if isinstance(out, tuple) else (out,)
    floating = [o for o in out if o.is_floating_point()]
    grad = torch.autograd.grad(
        floating, [getattr(t, k) for k in wrt.split()], [gi.to(dtype) for gi in g(floating)]
    )
    return out, grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("name", list(_OPS))
def test_half_cpu_tensors_run_the_cpu_kernels_in_float32(name, dtype):
    """CNN-F ops on half CPU tensors: "auto" picks the C++ kernels (never the reference), which
    compute in float32 and round once. Outputs and gradients against the float64 reference on the
    exactly upcast inputs, by the half rule (at most twice the error of the reference run in
    that dtype); masks and positions equal to the float64 reference's."""
    assert _backend.resolve(name, "auto", torch.device("cpu"), dtype, functional._KERNELS) == "cpu"
    gen = torch.Generator().manual_seed(5)
    fixed: list[torch.Tensor] = []

    def g(outs):  # the same output gradients for every run
        if not fixed:
            fixed.extend(torch.randn(o.shape, dtype=F64, generator=gen) for o in outs)
        return fixed

    got, got_grad = _run_op(name, dtype, "cpu", g)
    want, want_grad = _run_op(name, F64, "reference", g)
    lowp, lowp_grad = _run_op(name, dtype, "reference", g)

    def magnitude(e):
        # An instance norm's output and gradient are differences of sums over the (n, c)
        # plane: their rounding scales with the plane's largest value, not with the element's,
        # which cancellation can make arbitrarily small (1-2 of 144 gradient elements failed
        # the element's own magnitude, in float16 and bfloat16).
        e = e.detach().double().abs()
        if name.startswith("ins_") and e.dim() == 4:
            return e.amax(dim=(-2, -1), keepdim=True).expand_as(e)
        return e

    assert len(got) == len(want)
    for a, b, c in zip(got, want, lowp, strict=True):
        if b.is_floating_point():
            assert a.dtype == dtype
            assert_low_precision_close(a, b, c, magnitude(b))
        else:
            assert torch.equal(a, b), name
    for a, b, c in zip(got_grad, want_grad, lowp_grad, strict=True):
        assert a.dtype == dtype
        assert_low_precision_close(a, b, c, magnitude(b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_half_cpp_ops_check_before_converting(dtype):
    """The C++ ops take half tensors directly (rstd stays float32) and still reject mixed dtypes:
    the checks see the arguments as given, before the conversion to float32."""
    p = plane_inputs()
    x, hidden = p.x.to(dtype), p.hidden.to(dtype)
    y, rstd = torch.ops.screening_attn.ins_norm(x, 1e-8, False)
    assert y.dtype == dtype and rstd.dtype == torch.float32
    assert_close(rstd, torch.ops.screening_attn.ins_norm(x.float(), 1e-8, False)[1])
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    with pytest.raises(TypeError, match="hidden must have the dtype of x"):
        torch.ops.screening_attn.ada_relu(x, hidden.to(other), 0.1)
    with pytest.raises(TypeError, match="rstd must be Float"):
        torch.ops.screening_attn.ins_norm_backward(x, x, rstd.to(dtype), False)
