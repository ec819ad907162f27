"""The AdaPool ops ``ada_pool2d`` and ``ada_unpool2d`` (docs/feedback.md; ``ada_pool2d_gather`` is
the unpool's backward). The reference against brute-force loops and F.max_pool2d; every backend
(C++ CPU, Triton under the interpreter) against the reference, forward, feedback and backward;
ties, hidden = 0, NaN, strided inputs; gradcheck; torch.library checks; errors. (The AdaPool2d
layer: test_feedback_layers.py.)"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from _feedback_utils import (
    BACKENDS,
    DTYPES,
    F64,
    assert_non_finite_stays_in_its_plane,
    first_positions,
    leaves,
    plane_inputs,
    windows,
)
from _ids import case_id, dtype_id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from screening_attn.feedback import AdaPool2d, _ops, functional, reference

HYP = settings(
    deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def brute_pool(x, k, largest):
    """Loop over every window in row-major order; a strictly better value replaces the best."""
    n_, c_, h, w = x.shape
    vals = torch.empty(n_, c_, h // k, w // k, dtype=x.dtype)
    idx = torch.empty(n_, c_, h // k, w // k, dtype=torch.int64)
    for n, c, i, j in itertools.product(range(n_), range(c_), range(h // k), range(w // k)):
        best, pos = None, None
        for r, s in itertools.product(range(i * k, i * k + k), range(j * k, j * k + k)):
            v = x[n, c, r, s].item()
            if best is None or (v > best if largest else v < best):
                best, pos = v, r * w + s
        vals[n, c, i, j], idx[n, c, i, j] = best, pos
    return vals, idx


# --- the reference against oracles ---------------------------------------------------------------
@HYP
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 3),
    k=st.integers(1, 3),
    extra_h=st.integers(0, 4),
    extra_w=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_pools_match_brute_force_with_ties(n, c, k, extra_h, extra_w, seed):
    h, w = k + extra_h, k + extra_w
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (n, c, h, w), generator=gen).to(F64)  # mostly ties
    for largest, pool in ((True, reference._max_pool2d), (False, reference._min_pool2d)):
        vals, idx = pool(x, k)
        want_vals, want_idx = brute_pool(x, k, largest)
        assert torch.equal(idx, want_idx)
        assert torch.equal(vals, want_vals)
    vals, idx = reference._max_pool2d(x, k)
    torch.testing.assert_close(vals, F.max_pool2d(x, k), rtol=0, atol=0)
    unpooled = reference._unpool2d(vals, idx, (h, w))
    torch.testing.assert_close(unpooled, F.max_unpool2d(vals, idx, k, output_size=(h, w)))
    layer = AdaPool2d(k)
    want_max, want_min = brute_pool(x, k, True)[0], brute_pool(x, k, False)[0]
    assert torch.equal(layer(x), want_max)
    assert torch.equal(layer.argmax, idx)
    hidden = torch.randint(-1, 2, want_max.shape, generator=gen).to(F64)
    layer.hidden = hidden
    want = torch.where(hidden > 0, want_max, torch.where(hidden < 0, want_min, 0.0))
    assert torch.equal(layer(x), want)


def test_pool_ties_go_to_first_element():
    windows = torch.tensor(
        [
            [[0.0, 0.0], [0.0, 0.0]],  # all tied: first for max and min
            [[1.0, 3.0], [3.0, 1.0]],  # max tie (0,1)/(1,0), min tie (0,0)/(1,1)
            [[3.0, 1.0], [1.0, 3.0]],
            [[-0.0, 0.0], [0.0, -1.0]],  # signed zeros tie
            [[2.0, 5.0], [5.0, 5.0]],
        ],
        dtype=F64,
    )
    x = windows.view(1, 5, 2, 2)
    vals, idx = reference._max_pool2d(x, 2)
    assert idx.flatten().tolist() == [0, 1, 0, 0, 1]
    assert vals.flatten().tolist() == [0.0, 3.0, 3.0, 0.0, 5.0]
    vals, idx = reference._min_pool2d(x, 2)
    assert idx.flatten().tolist() == [0, 0, 1, 3, 0]
    assert vals.flatten().tolist() == [0.0, 1.0, 1.0, -1.0, 2.0]


# --- every backend against the reference ---------------------------------------------------------
POOL_CASES = [
    pytest.param(k, shape, ties, id=case_id(k=k, shape=shape, ties=ties))
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
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gated", [False, True], ids=["max", "gated"])
@pytest.mark.parametrize("k,shape,ties", POOL_CASES)
def test_ada_pool_matches_reference(backend, dtype, gated, k, shape, ties):
    x = torch.randint(-1, 2, shape).to(dtype) if ties else torch.randn(shape, dtype=dtype)
    pooled = (*shape[:2], shape[2] // k, shape[3] // k)
    hidden = torch.randint(-1, 2, pooled).to(dtype) if gated else None  # zeros included
    (xr,), (xk,) = leaves(x), leaves(x)
    y_ref, amax_ref, amin_ref = reference.ada_pool2d(xr, hidden, k)
    y, amax, amin = functional.ada_pool2d(xk, hidden, k, backend=backend)
    assert amax.dtype == torch.uint8 and y.shape == pooled
    assert torch.equal(amax, amax_ref) and torch.equal(amin, amin_ref)
    assert torch.equal(y, y_ref)
    g = torch.randn(pooled, dtype=dtype)
    assert torch.equal(torch.autograd.grad(y, xk, g)[0], torch.autograd.grad(y_ref, xr, g)[0])
    # feedback: the unpool, and its backward (the gather)
    (zr,), (zk,) = leaves(g), leaves(g)
    size = shape[2:]
    u_ref = reference.ada_unpool2d(zr, amax, amin, hidden, k, size)
    u = functional.ada_unpool2d(zk, amax, amin, hidden, k, size, backend=backend)
    assert u.shape == shape and torch.equal(u, u_ref)
    gu = torch.randn(shape, dtype=dtype)
    assert torch.equal(torch.autograd.grad(u, zk, gu)[0], torch.autograd.grad(u_ref, zr, gu)[0])


def test_pool_cases_cover_every_cpu_path():
    """The CPU's k = 2 rows run 8 windows at a time (rows of >= 8), 4 (rows of 4..7) or a
    scalar scan (< 4) for float32; the cases above must hit each."""
    widths = {shape[3] // 2 for k, shape, _ in (p.values for p in POOL_CASES) if k == 2}
    assert any(w >= 8 for w in widths) and any(4 <= w < 8 for w in widths)
    assert any(w < 4 for w in widths)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("k", [2, 3])
def test_tied_windows_pick_the_first_position(backend, dtype, k):
    """Windows of values in {-1, 0, 1} (most tie for their max and min, several at every
    position: a rule picking a later or a shifted position cannot agree), gated and not,
    against the rule written out (first_positions), not the reference."""
    gen = torch.Generator().manual_seed(k)
    x = torch.randint(-1, 2, (2, 3, 4 * k, 3 * k + 1), generator=gen).to(dtype)
    x[0, 0, :k, :k] = 1.0  # a window tied everywhere
    hidden = torch.randint(-1, 2, (2, 3, 4, 3), generator=gen).to(dtype)
    want_max, tied_max = first_positions(x, k, True)
    want_min, tied_min = first_positions(x, k, False)
    assert tied_max >= 10 and tied_min >= 10
    assert (want_max > 0).any() and (want_min > 0).any()
    w = windows(x, k)
    for h in (None, hidden):
        y, amax, amin = functional.ada_pool2d(x, h, k, backend=backend)
        assert torch.equal(amax, want_max) and torch.equal(amin, want_min)
        ymax = w.gather(-1, want_max.long()[..., None])[..., 0]
        ymin = w.gather(-1, want_min.long()[..., None])[..., 0]
        want_y = ymax if h is None else ymax * (h > 0) + ymin * (h < 0)
        assert torch.equal(y, want_y)


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_local(backend):
    x = torch.randn(2, 3, 6, 8)
    x[1, 2, 3, 5] = float("nan")
    # pooling: the NaN's window only, for max, min and the gated mix; it is the selected element
    y, amax, amin = functional.ada_pool2d(x, torch.randn(2, 3, 3, 4), 2, backend=backend)
    assert y.isnan().sum() == 1 and y[1, 2, 1, 2].isnan()
    assert amax[1, 2, 1, 2] == amin[1, 2, 1, 2] == 3  # (row 1, col 1) of window (1, 2)
    z = torch.randn(2, 3, 3, 4)
    z[0, 1, 2, 0] = float("nan")
    u = functional.ada_unpool2d(z, amax, amin, None, 2, (6, 8), backend=backend)
    assert u.isnan().sum() == 1 and u[0, 1, 4:6, 0:2].isnan().any()


@pytest.mark.parametrize("op", ["ada_pool2d", "ada_unpool2d"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_non_finite_stays_in_its_plane_forward_and_backward(backend, bad, op):
    t = plane_inputs()
    if op == "ada_pool2d":
        assert_non_finite_stays_in_its_plane(
            lambda x: functional.ada_pool2d(x, t.pool_hidden, 2, backend=backend)[0], t.x, bad
        )
    else:
        _, amax, amin = functional.ada_pool2d(t.x, t.pool_hidden, 2, backend=backend)
        assert_non_finite_stays_in_its_plane(
            lambda z: functional.ada_unpool2d(
                z, amax, amin, t.pool_hidden, 2, (4, 6), backend=backend
            ),
            t.z,
            bad,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_channels_last(backend):
    x = torch.randn(2, 4, 6, 10, dtype=F64)
    layouts = [
        x.contiguous(memory_format=torch.channels_last),
        x.transpose(2, 3).contiguous().transpose(2, 3),
        torch.randn(2, 4, 6, 20, dtype=F64)[..., ::2].copy_(x),
    ]
    p0 = functional.ada_pool2d(x, None, 2, backend=backend)
    for xs in layouts:
        assert not xs.is_contiguous()
        for a, b in zip(functional.ada_pool2d(xs, None, 2, backend=backend), p0):
            assert torch.equal(a, b)
    z = torch.randn(2, 4, 5, 3, dtype=F64).transpose(2, 3)
    u = functional.ada_unpool2d(z, p0[1], p0[2], None, 2, (6, 10), backend=backend)
    want = functional.ada_unpool2d(z.contiguous(), p0[1], p0[2], None, 2, (6, 10), backend=backend)
    assert torch.equal(u, want)


# Random shapes, dtypes and layouts against the reference: tests/test_fuzz.py.


# --- gradcheck, opcheck --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    # the Triton interpreter is slow: fast_mode (random projections of the Jacobian) for it
    check = {"fast_mode": backend == "triton"}

    def d(*shape):
        return torch.randn(*shape, dtype=F64, requires_grad=True)

    x = d(2, 2, 3, 4)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    pool = _ops.pools.CPP if backend == "cpu" else _ops.pools.TRITON
    x = torch.randn(2, 3, 4, 6, dtype=F64, requires_grad=True)
    xt = torch.randn(2, 3, 6, 4, dtype=F64).transpose(2, 3).requires_grad_()  # non-contiguous
    hp = torch.randn(2, 3, 2, 3, dtype=F64)
    torch.library.opcheck(pool.ada_pool2d, (xt, hp, 2))
    torch.library.opcheck(pool.ada_pool2d, (x, None, 2))
    _, amax, amin = pool.ada_pool2d(x.detach(), hp, 2)
    z = torch.randn(2, 3, 2, 3, dtype=F64, requires_grad=True)
    torch.library.opcheck(pool.ada_unpool2d, (z, hp, amax, amin, 2, 5, 7))
    torch.library.opcheck(pool.ada_pool2d_gather, (x, None, amax, amin, 2))


# --- errors --------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    x = torch.randn(2, 3, 4, 4)
    cases = [
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
    ]
    for call, exc, text in cases:
        with pytest.raises(exc, match=text):
            call()


def test_cpp_ops_check_their_inputs():
    """Direct torch.ops callers get the C++ checks (TORCH_CHECK_VALUE / _TYPE)."""
    ops = torch.ops.screening_attn
    x = torch.randn(2, 3, 4, 4)
    for call, exc, text in [
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
