"""The fused CNN-F kernels (SPEC §3): InsNorm·Bias·AdaReLU, the top-down InsNorm·gate, the
plain InsNorm and AdaPool. Every backend (C++ CPU, Triton under the interpreter) against the
reference, forward, feedback and backward; gradcheck; ties, hidden = 0, NaN, strided inputs;
torch.library checks and torch.compile; the networks on the kernels against the reference."""

import pytest
import torch
from _tolerances import assert_close

from screening_attn.feedback import (
    CNNF,
    AdaPool2d,
    AdaReLU,
    Bias,
    CNNFWideResNet,
    FeedbackConv2d,
    FeedbackLinear,
    FeedbackNetwork,
    Flatten,
    InsNorm,
    _ops,
    feedback_step,
    functional,
    reference,
)

BACKENDS = ["cpu", "triton"]
DTYPES = [torch.float32, torch.float64]
F64 = torch.float64
# (N, C, H, W). Planes: shorter than one CPU vector (16 floats, 8 doubles), one float vector,
# vectors and a tail; the last is larger than one Triton block (1024)
NORM_SHAPES = [(1, 1, 1, 2), (1, 2, 4, 4), (2, 3, 5, 7), (1, 2, 33, 40)]


def _name(v):
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v)


def _reference_fused(x, bias, hidden, eta, centered):
    u = reference.ins_norm(x, 1e-8, centered)
    if bias is not None:
        u = u + bias.view(1, -1, 1, 1)
    return reference.ada_relu(u, hidden, eta)


def _grads(out, inputs, grad):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad)


def _leaves(*tensors):
    return [None if t is None else t.clone().requires_grad_() for t in tensors]


# --- InsNorm · Bias · AdaReLU, bottom-up --------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=_name)
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
    ref_in, ker_in = _leaves(x, bias, hidden), _leaves(x, bias, hidden)
    y_ref, m_ref = _reference_fused(*ref_in, eta, centered)
    y, m = functional.ins_bias_ada_relu(
        *ker_in[:2], ker_in[2], eta, centered=centered, backend=backend
    )
    assert m.dtype == torch.bool and y.dtype == dtype and y.shape == shape
    assert torch.equal(m, m_ref)
    assert_close(y, y_ref)
    g = torch.randn(shape, dtype=dtype)
    for a, b in zip(_grads(y, ker_in, g), _grads(y_ref, ref_in, g)):
        assert_close(a, b)


# --- top-down InsNorm · gate, and the plain InsNorm ---------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=_name)
@pytest.mark.parametrize("centered", [False, True], ids=["msq", "centered"])
def test_ins_norm_gate_and_ins_norm_match_reference(backend, dtype, shape, centered):
    z = torch.randn(shape, dtype=dtype)
    mask = torch.randn(shape) > 0
    (zr,), (zk,) = _leaves(z), _leaves(z)
    zn_ref = reference.ins_norm(zr, 1e-8, centered)
    out_ref = reference.ada_relu_feedback(zn_ref, mask)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 8, 256, 256),
        (1, 9, 250, 250),
    ],  # 2 MiB+ in float32; planes of whole 64-byte lines, or not
    ids=_name,
)
def test_hidden_states_streamed_past_the_cache_cpu(dtype, shape):
    """The CPU kernels write a gate's new hidden state (ins_norm_gate's zn, ada_unpool_gate's u)
    with non-temporal stores when it is 2 MiB or more and its planes are whole cache lines:
    the same values as the reference."""
    z = torch.randn(shape, dtype=dtype)
    mask = torch.randn(shape) > 0
    zn, out = functional.ins_norm_gate(z, mask, backend="cpu")
    zn_ref = reference.ins_norm(z, 1e-8, False)
    assert_close(zn, zn_ref)
    assert_close(out, reference.ada_relu_feedback(zn_ref, mask))
    pooled = (*shape[:2], shape[2] // 2, shape[3] // 2)
    zp, hp = torch.randn(pooled, dtype=dtype), torch.randn(pooled, dtype=dtype)
    _, amax, amin = functional.ada_pool2d(torch.randn(shape, dtype=dtype), hp, 2, backend="cpu")
    u, out = functional.ada_unpool_gate(zp, amax, amin, hp, mask, 2, shape[2:], backend="cpu")
    u_ref = functional.ada_unpool2d(zp, amax, amin, hp, 2, shape[2:], backend="reference")
    assert torch.equal(u, u_ref) and torch.equal(out, reference.ada_relu_feedback(u_ref, mask))


# Random shapes, dtypes and layouts against the reference: tests/test_fuzz.py.


# --- AdaPool -------------------------------------------------------------------------------------
def _reference_pool(x, hidden, k):
    """Reference forward with differentiable output, positions in the kernels' uint8 form."""
    return functional.ada_pool2d(x, hidden, k, backend="reference")


POOL_CASES = [
    pytest.param(k, shape, ties, id=f"k{k}-{_name(shape)}-{'ties' if ties else 'randn'}")
    for k, shape, ties in [
        (2, (2, 3, 8, 8), True),  # rows of 4 windows: the k = 2 vector path
        (2, (1, 2, 28, 36), False),  # 14 and 18 windows a row: overlapping last chunk
        (2, (2, 2, 7, 5), True),  # odd sizes: rows and columns past the last window
        (2, (1, 1, 2, 2), False),
        (3, (1, 2, 7, 10), True),  # the generic scan
        (1, (1, 2, 3, 4), False),
    ]
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("gated", [False, True], ids=["max", "gated"])
@pytest.mark.parametrize("k,shape,ties", POOL_CASES)
def test_ada_pool_matches_reference(backend, dtype, gated, k, shape, ties):
    x = torch.randint(-1, 2, shape).to(dtype) if ties else torch.randn(shape, dtype=dtype)
    pooled = (*shape[:2], shape[2] // k, shape[3] // k)
    hidden = torch.randint(-1, 2, pooled).to(dtype) if gated else None  # zeros included
    (xr,), (xk,) = _leaves(x), _leaves(x)
    y_ref, amax_ref, amin_ref = _reference_pool(xr, hidden, k)
    y, amax, amin = functional.ada_pool2d(xk, hidden, k, backend=backend)
    assert amax.dtype == torch.uint8 and y.shape == pooled
    assert torch.equal(amax, amax_ref) and torch.equal(amin, amin_ref)
    assert torch.equal(y, y_ref)
    g = torch.randn(pooled, dtype=dtype)
    assert torch.equal(torch.autograd.grad(y, xk, g)[0], torch.autograd.grad(y_ref, xr, g)[0])
    # feedback: the unpool, and its backward (the gather)
    (zr,), (zk,) = _leaves(g), _leaves(g)
    size = shape[2:]
    u_ref = functional.ada_unpool2d(zr, amax, amin, hidden, k, size, backend="reference")
    u = functional.ada_unpool2d(zk, amax, amin, hidden, k, size, backend=backend)
    assert u.shape == shape and torch.equal(u, u_ref)
    gu = torch.randn(shape, dtype=dtype)
    assert torch.equal(torch.autograd.grad(u, zk, gu)[0], torch.autograd.grad(u_ref, zr, gu)[0])


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_pool_ties_pick_the_first_element(backend):
    windows = [
        [[0.0, 0.0], [0.0, 0.0]],  # all tied: first for max and min
        [[1.0, 3.0], [3.0, 1.0]],  # max tie (0,1)/(1,0), min tie (0,0)/(1,1)
        [[3.0, 1.0], [1.0, 3.0]],
        [[-0.0, 0.0], [0.0, -1.0]],  # signed zeros tie
        [[2.0, 5.0], [5.0, 5.0]],
        [[4.0, 4.0], [-2.0, -2.0]],
    ]
    # the windows side by side in one row of a 2 x 12 plane (each row of windows is one chunk)
    x = torch.tensor(windows, dtype=F64).permute(1, 0, 2).reshape(1, 1, 2, 12)
    y, amax, amin = functional.ada_pool2d(x, None, 2, backend=backend)
    assert amax.flatten().tolist() == [0, 1, 0, 0, 1, 0]
    assert amin.flatten().tolist() == [0, 0, 1, 3, 0, 2]
    assert y.flatten().tolist() == [0.0, 3.0, 3.0, 0.0, 5.0, 4.0]
    hidden = torch.tensor([[[[1.0, -1.0, 0.0, -1.0, 1.0, -1.0]]]], dtype=F64)
    y, _, _ = functional.ada_pool2d(x, hidden, 2, backend=backend)
    assert y.flatten().tolist() == [0.0, 1.0, 0.0, -1.0, 5.0, -2.0]
    z = torch.full((1, 1, 1, 6), 7.0, dtype=F64)
    rec = functional.ada_unpool2d(z, amax, amin, hidden, 2, (2, 12), backend=backend)
    want = torch.zeros(2, 12, dtype=F64)
    for w, pos in enumerate([0, 0, None, 3, 1, 2]):  # argmax if hidden > 0, argmin if < 0
        if pos is not None:
            want[pos // 2, 2 * w + pos % 2] = 7.0
    assert torch.equal(rec.view(2, 12), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_zero_gives_zero(backend):
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    hidden = torch.zeros(2, 3, 3, 3, dtype=F64)
    y, amax, amin = functional.ada_pool2d(x, hidden, 2, backend=backend)
    assert (y == 0).all()
    z = torch.randn(2, 3, 3, 3, dtype=F64)
    assert (functional.ada_unpool2d(z, amax, amin, hidden, 2, (6, 6), backend=backend) == 0).all()
    # the fused gate: hidden = 0 closes every gate (x' hidden = 0)
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
    # pooling: the NaN's window only, for max, min and the gated mix; it is the selected element
    y, amax, amin = functional.ada_pool2d(x, torch.randn(2, 3, 3, 4), 2, backend=backend)
    assert y.isnan().sum() == 1 and y[1, 2, 1, 2].isnan()
    assert amax[1, 2, 1, 2] == amin[1, 2, 1, 2] == 3  # (row 1, col 1) of window (1, 2)
    z = torch.randn(2, 3, 3, 4)
    z[0, 1, 2, 0] = float("nan")
    u = functional.ada_unpool2d(z, amax, amin, None, 2, (6, 8), backend=backend)
    assert u.isnan().sum() == 1 and u[0, 1, 4:6, 0:2].isnan().any()


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_empty_batch(backend):
    """N = 0 runs every op and a whole CNN-F (forward and backward) to empty results."""
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
    model = CNNF(10, cycles=1, backend=backend)
    logits = model.run_cycles(torch.randn(0, 1, 28, 28, requires_grad=True))
    assert logits.shape == (0, 10)
    logits.sum().backward()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_non_finite_stays_in_its_plane_forward_and_backward(backend, bad):
    """Every CNN-F op works per (n, c) plane: a NaN or +Inf in one element of plane (1, 1) leaves
    every other plane bitwise unchanged, forward and the gradient of that input, and does reach
    its own plane."""
    g = torch.Generator().manual_seed(3)
    x, hidden = torch.randn(2, 3, 2, 4, 6, dtype=F64, generator=g).unbind(0)
    z = torch.randn(3, 2, 2, 3, dtype=F64, generator=g)
    pool_hidden = torch.randn(3, 2, 2, 3, dtype=F64, generator=g)
    bias, mask = torch.randn(2, dtype=F64, generator=g), hidden > 0
    _, amax, amin = functional.ada_pool2d(x, pool_hidden, 2, backend=backend)
    b = backend
    ops = {  # name: (op of one tensor, the tensor, where the bad value goes)
        "ada_relu": (lambda t: functional.ada_relu(t, hidden, 0.1, backend=b)[0], x),
        "ada_relu_feedback": (lambda t: functional.ada_relu_feedback(t, mask, backend=b), x),
        "ins_bias_ada_relu": (
            lambda t: functional.ins_bias_ada_relu(t, bias, hidden, 0.1, backend=b)[0],
            x,
        ),
        "ins_norm_gate": (lambda t: torch.cat(functional.ins_norm_gate(t, mask, backend=b)), x),
        "ada_pool2d": (lambda t: functional.ada_pool2d(t, pool_hidden, 2, backend=b)[0], x),
        "stage": (
            lambda t: functional.ins_bias_ada_relu_pool2d(
                t, bias, hidden, pool_hidden, 0.1, 2, backend=b
            )[0],
            x,
        ),
        "ada_unpool2d": (
            lambda t: functional.ada_unpool2d(t, amax, amin, pool_hidden, 2, (4, 6), backend=b),
            z,
        ),
        "ada_unpool_gate": (
            lambda t: torch.cat(
                functional.ada_unpool_gate(t, amax, amin, pool_hidden, mask, 2, (4, 6), backend=b)
            ),
            z,
        ),
        "feedback_update": (lambda t: functional.feedback_update(t, hidden, 0.1, backend=b), x),
    }
    for name, (op, t) in ops.items():
        t = t.clone().requires_grad_()
        clean = op(t)
        grad_out = torch.randn(clean.shape, dtype=F64, generator=g)
        (clean_grad,) = torch.autograd.grad(clean, t, grad_out)
        tb = t.detach().clone()
        tb[1, 1, 1, 1] = bad
        tb.requires_grad_()
        out = op(tb)
        (grad,) = torch.autograd.grad(out, tb, grad_out)
        n = 3 if name in ("ins_norm_gate", "ada_unpool_gate") else out.shape[0]  # cat of two
        planes = [(i, c) for i in range(out.shape[0]) for c in range(2) if (i % n, c) != (1, 1)]
        for i, c in planes:
            assert torch.equal(out[i, c], clean[i, c]), (name, i, c)
        for i, c in [(i, c) for i in range(3) for c in range(2) if (i, c) != (1, 1)]:
            assert torch.equal(grad[i, c], clean_grad[i, c]), (name, i, c)
        reached = not torch.equal(out[1, 1], clean[1, 1]) or not torch.equal(
            grad[1, 1], clean_grad[1, 1]
        )
        assert reached, name


def test_nan_in_one_image_leaves_the_others_logits_and_gradients():
    """CNN-F run_cycles mixes nothing across the batch: a NaN or +Inf pixel in image 0 leaves
    the logits and input gradients of image 1 unchanged (only the shared weights' gradients see
    both). The per-op test above covers Triton; the whole network under its interpreter is slow."""
    torch.manual_seed(0)
    model = CNNF(10, cycles=1).double()
    x = torch.randn(2, 1, 28, 28, dtype=F64)
    for backend in ("reference", "cpu"):
        model.set_backend(backend)
        xc = x.clone().requires_grad_()
        clean = model.run_cycles(xc)
        (clean_grad,) = torch.autograd.grad(clean.sum(), xc)
        for bad in (float("nan"), float("inf")):
            xb = x.clone()
            xb[0, 0, 10, 12] = bad
            xb.requires_grad_()
            out = model.run_cycles(xb)
            (grad,) = torch.autograd.grad(out.sum(), xb)
            assert torch.equal(out[1], clean[1]) and torch.equal(grad[1], clean_grad[1])
            assert not out[0].isfinite().all() or not torch.equal(out[0], clean[0])


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
    p0 = functional.ada_pool2d(x, None, 2, backend=backend)
    for xs in layouts:
        assert not xs.is_contiguous()
        hs = h.contiguous(memory_format=torch.channels_last)
        y, m = functional.ins_bias_ada_relu(xs, None, hs, 0.2, backend=backend)
        assert torch.equal(m, m0) and torch.equal(y, y0) and y.is_contiguous()
        ms = m0.transpose(2, 3).contiguous().transpose(2, 3)
        _, out = functional.ins_norm_gate(xs, ms, backend=backend)
        assert torch.equal(out, functional.ins_norm_gate(x, m0, backend=backend)[1])
        for a, b in zip(functional.ada_pool2d(xs, None, 2, backend=backend), p0):
            assert torch.equal(a, b)
    z = torch.randn(2, 4, 5, 3, dtype=F64).transpose(2, 3)
    u = functional.ada_unpool2d(z, p0[1], p0[2], None, 2, (6, 10), backend=backend)
    want = functional.ada_unpool2d(z.contiguous(), p0[1], p0[2], None, 2, (6, 10), backend=backend)
    assert torch.equal(u, want)


# --- stage fusions: InsNorm·Bias·AdaReLU·AdaPool and AdaPool·AdaReLU feedback --------------------
def _stage_inputs(dtype, gated, shape=(2, 3, 8, 10)):
    x = torch.randn(shape, dtype=dtype)
    pooled = (*shape[:2], shape[2] // 2, shape[3] // 2)
    hidden = torch.randn(shape, dtype=dtype) if gated else None
    pool_hidden = torch.randint(-1, 2, pooled).to(dtype) if gated else None
    return x, torch.randn(shape[1], dtype=dtype), hidden, pool_hidden


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("gated", [False, True], ids=["first-pass", "gated"])
def test_stage_fusions_match_the_reference(backend, dtype, gated):
    x, b, h, hp = _stage_inputs(dtype, gated)
    ref_in, ker_in = _leaves(x, b, h), _leaves(x, b, h)
    u_ref, m_ref = _reference_fused(*ref_in, 0.2, False)
    y_ref, amax_ref, amin_ref = _reference_pool(u_ref, hp, 2)
    y, m, amax, amin = functional.ins_bias_ada_relu_pool2d(*ker_in, hp, 0.2, 2, backend=backend)
    assert torch.equal(m, m_ref) and torch.equal(amax, amax_ref) and torch.equal(amin, amin_ref)
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    for a, c in zip(_grads(y, ker_in, g), _grads(y_ref, ref_in, g)):
        assert_close(a, c)
    # feedback: unpool then gate, both outputs used (the gate's hidden and what goes down)
    z = torch.randn_like(y)
    (zr,), (zk,) = _leaves(z), _leaves(z)
    size = tuple(x.shape[2:])
    ur = functional.ada_unpool2d(zr, amax, amin, hp, 2, size, backend="reference")
    out_r = reference.ada_relu_feedback(ur, m)
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


def test_stage_fusions_gradcheck_and_opcheck_cpu():
    x, b, h, hp = (None if t is None else t.requires_grad_() for t in _stage_inputs(F64, True))

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
    torch.library.opcheck(
        _ops.stages.CPP.ins_bias_ada_relu_pool2d, (xt, b, h, hp, 0.3, 1e-8, False, 2)
    )
    torch.library.opcheck(
        _ops.stages.CPP.ins_bias_ada_relu_pool2d, (x, None, None, None, 0.1, 1e-8, True, 2)
    )
    torch.library.opcheck(_ops.stages.CPP.ada_unpool_gate, (z, hp, amax, amin, m, 2, 8, 10))
    m11 = torch.randn(2, 3, 8, 11) > 0  # a column past the last window
    torch.library.opcheck(_ops.stages.CPP.ada_unpool_gate, (z, None, amax, amin, m11, 2, 8, 11))
    # their fused backward ops (the pooled stage's has no derivative: no input requires grad)
    xd, bd, hd, hpd = x.detach(), b.detach(), h.detach(), hp.detach()
    y, m2, rstd, amax2, amin2 = _ops.stages.CPP.ins_bias_ada_relu_pool2d(
        xd, bd, hd, hpd, 0.3, 0.0, True, 2
    )
    args = (torch.randn_like(y), xd, m2, rstd, hpd, amax2, amin2, 0.3, True, True, True, 2)
    torch.library.opcheck(_ops.stages.CPP.ins_bias_ada_relu_pool2d_backward, args)
    gu = torch.randn(2, 3, 8, 10, dtype=F64, requires_grad=True)
    go = torch.randn(2, 3, 8, 10, dtype=F64, requires_grad=True)
    torch.library.opcheck(_ops.stages.CPP.ada_unpool_gate_backward, (gu, go, hp, amax, amin, m, 2))
    torch.library.opcheck(
        _ops.stages.CPP.ada_unpool_gate_backward, (None, go, None, amax, amin, m, 2)
    )
    (gx,) = torch.autograd.grad(stage(x, b, h).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward of ins_bias_ada_relu_pool2d"):
        gx.sum().backward()


# --- gradcheck, opcheck, compile -----------------------------------------------------------------
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
    hp = torch.randn(2, 2, 1, 2, dtype=F64)
    hp[0, 0, 0, 0] = 0.0

    def pool(x):
        return functional.ada_pool2d(x, hp, 2, backend=backend)[0]

    assert torch.autograd.gradcheck(pool, (x,), **check)
    assert torch.autograd.gradgradcheck(pool, (x,), **check)
    _, amax, amin = functional.ada_pool2d(x, hp, 2, backend=backend)

    def unpool(z):
        return functional.ada_unpool2d(z, amax, amin, hp, 2, (3, 4), backend=backend)

    assert torch.autograd.gradcheck(unpool, (d(2, 2, 1, 2),), **check)
    assert torch.autograd.gradgradcheck(unpool, (d(2, 2, 1, 2),), **check)


def _norm_and_pool_ops(backend):
    if backend == "cpu":
        return _ops.norms.CPP, _ops.pools.CPP
    return _ops.norms.TRITON, _ops.pools.TRITON


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    norm, pool = _norm_and_pool_ops(backend)
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
    hp = torch.randn(2, 3, 2, 3, dtype=F64)
    torch.library.opcheck(pool.ada_pool2d, (xt, hp, 2))
    torch.library.opcheck(pool.ada_pool2d, (x, None, 2))
    _, amax, amin = pool.ada_pool2d(xd, hp, 2)
    z = torch.randn(2, 3, 2, 3, dtype=F64, requires_grad=True)
    torch.library.opcheck(pool.ada_unpool2d, (z, hp, amax, amin, 2, 5, 7))
    torch.library.opcheck(pool.ada_pool2d_gather, (x, None, amax, amin, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_of_the_norm_ops_raises(backend):
    x = torch.randn(1, 2, 3, 3, dtype=F64, requires_grad=True)
    y, _ = functional.ins_bias_ada_relu(x, None, None, 0.1, backend=backend)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward of ins_bias_ada_relu"):
        g.sum().backward()


def _small_network(backend):
    """conv, ins·bias·relu (fused), pool, top-down ins (fused with the gate), linear layers."""
    eta = 0.3
    return FeedbackNetwork(
        FeedbackConv2d(1, 2, 3, padding=1),
        InsNorm(backend=backend),
        Bias(2),
        AdaReLU(eta, backend=backend),
        InsNorm(bottom_up=False, top_down=True, backend=backend),
        FeedbackConv2d(2, 3, 3, padding=1),
        InsNorm(backend=backend),
        Bias(3),
        AdaReLU(eta, backend=backend),
        AdaPool2d(2, backend=backend),
        InsNorm(bottom_up=False, top_down=True, backend=backend),
        Flatten(),
        FeedbackLinear(48, 5),
        Bias(5),
        cycles=2,
        res_param=eta,
        backend=backend,
    )


def test_compile_fullgraph_feedback_step_matches_eager():
    torch._dynamo.reset()
    model = CNNF(10, ind=1, backend="cpu")
    x = torch.randn(2, 1, 28, 28)

    def start():
        model.reset()
        out, ff = model.forward_capture(x, model.ff_unit)
        return feedback_step(model, out, ff)  # gates set by a first cycle

    out, ff = start()
    eager = feedback_step(model, out, ff)
    state = [m.hidden for m in model.modules() if isinstance(m, AdaReLU)]
    out, ff = start()
    compiled = torch.compile(feedback_step, fullgraph=True)(model, out, ff)
    for a, b in zip(compiled, eager):
        assert_close(a, b)
    for m, h in zip((m for m in model.modules() if isinstance(m, AdaReLU)), state):
        if h is None:  # relu1: above ff (ind=1), never fed back
            assert m.hidden is None
        else:
            assert_close(m.hidden, h)  # the layers' state was updated as in eager mode


# --- networks on the kernels ---------------------------------------------------------------------
def _randomized(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def _same_logits_and_input_grads(make, x):
    ref = _randomized(make("reference").double())
    ker = make("cpu").double()
    ker.load_state_dict(ref.state_dict())
    results = []
    for model in (ref, ker):
        xi = x.clone().requires_grad_()
        out = model.run_average(xi)
        results.append((out, *torch.autograd.grad(out.logsumexp(1).sum(), xi)))
    for a, b in zip(*results):
        assert_close(a, b)
    assert results[1][1].abs().sum() > 0


@pytest.mark.parametrize("ind", [0, 2])
def test_cnnf_cpu_equals_reference(ind):
    _same_logits_and_input_grads(
        lambda backend: CNNF(10, ind=ind, cycles=2, res_param=0.3, backend=backend),
        torch.randn(2, 1, 28, 28, dtype=F64),
    )


@pytest.mark.parametrize("widen,ind", [(1, 0), (2, 1)])
def test_wide_resnet_cpu_equals_reference(widen, ind):
    _same_logits_and_input_grads(
        lambda backend: CNNFWideResNet(10, 10, widen, ind=ind, res_param=0.2, backend=backend),
        torch.randn(2, 3, 32, 32, dtype=F64),
    )


def test_small_network_triton_equals_reference():
    _same_logits_and_input_grads(
        lambda backend: _small_network("triton" if backend == "cpu" else backend),
        torch.randn(2, 1, 8, 8, dtype=F64),
    )


def test_models_run_the_fused_ops(monkeypatch):
    names = {
        "fwd": "ins_bias_ada_relu",
        "fwd_pool": "ins_bias_ada_relu_pool2d",
        "fb": "ins_norm_gate",
        "fb_pool": "ada_unpool_gate",
        "relu": "ada_relu",
    }
    calls = dict.fromkeys(names, 0)

    def spy(key, real):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        return wrapped

    for key, name in names.items():
        monkeypatch.setattr(functional, name, spy(key, getattr(functional, name)))
    model = CNNF(10, cycles=1, backend="cpu")
    model.run_cycles(torch.randn(2, 1, 28, 28))
    # two forward passes: stages 1-2 fused, stages 3-4 fused with their pools; one feedback:
    # stages 1-2 norm + gate, stages 3-4 unpool + gate; relu5 / relu6 run alone
    assert calls == {"fwd": 4, "fwd_pool": 4, "fb": 2, "fb_pool": 2, "relu": 4}
    assert set(model.state_dict()) == set(CNNF(10, backend="reference").state_dict())
    calls.update(dict.fromkeys(names, 0))
    model.set_backend("reference")  # the reference runs the plain composition
    model.run_cycles(torch.randn(2, 1, 28, 28))
    assert calls == {"fwd": 0, "fwd_pool": 0, "fb": 0, "fb_pool": 0, "relu": 12}


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
        (lambda: functional.ada_pool2d(x, None, 17), ValueError, "kernel_size"),
        (lambda: functional.ada_pool2d(x, None, 5), ValueError, "at least 5x5"),
        (lambda: functional.ada_pool2d(x, torch.randn(2, 3, 4, 4)), ValueError, "pooled shape"),
        (
            lambda: functional.ada_unpool2d(
                x[..., :2, :2], *[torch.zeros(2, 3, 2, 2)] * 2, None, 2, (4, 4)
            ),
            TypeError,
            "argmax must be a uint8",
        ),
        (
            lambda: functional.ada_unpool2d(
                x, *[torch.zeros(2, 3, 4, 4, dtype=torch.uint8)] * 2, None, 2, (4, 4)
            ),
            ValueError,
            "not the 2x2 pooling",
        ),
        (lambda: functional.feedback_update(x, x[0], 0.1), ValueError, "rec"),
        (lambda: functional.ins_norm(x, backend="cuda"), ValueError, "CUDA tensors"),
        (lambda: AdaPool2d(2, backend="gpu"), ValueError, "backend"),
        (lambda: InsNorm(backend=1), ValueError, "backend"),
    ]
    for call, exc, text in cases:
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
        (lambda: ops.ada_pool2d(x, None, 0), ValueError, "kernel_size"),
        (lambda: ops.ada_pool2d(x, torch.randn(2, 3, 3, 3), 2), ValueError, "hidden"),
        (
            lambda: ops.ada_unpool2d(x[..., :2, :2], None, *[torch.zeros(2, 3, 2, 2)] * 2, 2, 4, 4),
            TypeError,
            "argmax",
        ),
    ]:
        with pytest.raises(exc, match=text):
            call()


def test_pool_layer_keeps_the_reference_view_of_its_state():
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    ref, ker = AdaPool2d(2, backend="reference"), AdaPool2d(2, backend="cpu")
    for layer in (ref, ker):
        layer(x)
        layer.feedback(
            torch.randn(2, 3, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
        )
        layer(x)
    for name in ("argmax", "argmin", "pos_mask", "neg_mask"):
        assert torch.equal(getattr(ref, name), getattr(ker, name))
    _, imax = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(ker.argmax, imax)
    ker.reset()
    assert ker.argmax is None and ker.argmin is None and ker.pos_mask is None


def test_pool_cases_cover_every_cpu_path():
    """The CPU's k = 2 rows run 8 windows at a time (rows of >= 8), 4 (rows of 4..7) or a
    scalar scan (< 4) for float32; the cases above must hit each."""
    widths = {shape[3] // 2 for k, shape, _ in (p.values for p in POOL_CASES) if k == 2}
    assert any(w >= 8 for w in widths) and any(4 <= w < 8 for w in widths)
    assert any(w < 4 for w in widths)
