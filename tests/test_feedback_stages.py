"""The stage fusions (docs/feedback.md): ``ins_bias_ada_relu_pool2d`` (bottom-up
InsNorm·Bias·AdaReLU·AdaPool) and ``ada_unpool_gate`` (top-down AdaPool·AdaReLU feedback). Every
backend against the reference (their compositions), forward and backward; gradcheck,
torch.library checks of the C++ ops and their backward ops; streaming stores; empty batches
and non-finite values. (Which layers run them: test_feedback_layers.py.)"""

import math

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
from _tolerances import assert_close

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_half_cpu_tensors_run_the_reference_or_name_the_backend(dtype):
    """CNN-F ops on half CPU tensors: "auto" gives the reference's result (the C++ kernels take
    float32 and float64), "cpu" the documented TypeError naming the backend and the dtypes."""
    p = plane_inputs()
    x, hidden, z, hp, bias, mask = (
        t.to(dtype) if t.is_floating_point() else t
        for t in (p.x, p.hidden, p.z, p.pool_hidden, p.bias, p.mask)
    )
    _, amax, amin = reference.ada_pool2d(x, hp, 2)
    calls = {
        "ada_relu": (lambda **kw: functional.ada_relu(x, hidden, 0.3, **kw)),
        "ada_relu_feedback": (lambda **kw: functional.ada_relu_feedback(x, mask, **kw)),
        "ins_norm": (lambda **kw: functional.ins_norm(x, **kw)),
        "ins_norm_gate": (lambda **kw: functional.ins_norm_gate(x, mask, **kw)),
        "ins_bias_ada_relu": (
            lambda **kw: functional.ins_bias_ada_relu(x, bias, hidden, 0.3, **kw)
        ),
        "ada_pool2d": (lambda **kw: functional.ada_pool2d(x, hp, 2, **kw)),
        "ada_unpool2d": (lambda **kw: functional.ada_unpool2d(z, amax, amin, hp, 2, (4, 6), **kw)),
        "ins_bias_ada_relu_pool2d": (
            lambda **kw: functional.ins_bias_ada_relu_pool2d(x, bias, hidden, hp, 0.3, 2, **kw)
        ),
        "ada_unpool_gate": (
            lambda **kw: functional.ada_unpool_gate(z, amax, amin, hp, mask, 2, (4, 6), **kw)
        ),
    }
    refs = {
        "ada_relu": lambda: reference.ada_relu(x, hidden, 0.3),
        "ada_relu_feedback": lambda: reference.ada_relu_feedback(x, mask),
        "ins_norm": lambda: reference.ins_norm(x, 1e-8, False),
        "ins_norm_gate": lambda: reference.ins_norm_gate(x, mask),
        "ins_bias_ada_relu": lambda: reference.ins_bias_ada_relu(x, bias, hidden, 0.3),
        "ada_pool2d": lambda: reference.ada_pool2d(x, hp, 2),
        "ada_unpool2d": lambda: reference.ada_unpool2d(z, amax, amin, hp, 2, (4, 6)),
        "ins_bias_ada_relu_pool2d": lambda: reference.ins_bias_ada_relu_pool2d(
            x, bias, hidden, hp, 0.3, 2
        ),
        "ada_unpool_gate": lambda: reference.ada_unpool_gate(z, amax, amin, hp, mask, 2, (4, 6)),
    }
    for name, call in calls.items():
        got, want = call(), refs[name]()
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), name
        with pytest.raises(TypeError, match=rf"{name}: backend='cpu' takes float32 or float64"):
            call(backend="cpu")
