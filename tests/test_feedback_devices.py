"""The CNN-F ops' GPU backends on the tensors they take on this machine (tests/_env.py): Triton on
CUDA tensors when there is a GPU (here, without one, on CPU tensors under the interpreter), the
CUDA kernels on CUDA tensors (skipped here: no GPU). Every op, gated and not, forward and
backward, against the reference run on the CPU in the same dtype; one shape whose planes fit
one Triton loop step, one whose planes take several. A second GPU, if any, checks the device
guard: tensors on cuda:1 while cuda:0 is current. (The other test_feedback_*.py files test the
edge cases on CPU tensors: the Triton backend there under the interpreter.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _env import DEVICE, HAS_CUDA, needs_cuda
from _ids import case_id
from _tolerances import assert_close

from screening_attn import _backend
from screening_attn.feedback import functional as fn

ETA, K = 0.3, 2
SHAPES = [(2, 3, 6, 8), (1, 2, 20, 22)]  # planes of 48 (one step) and 440 elements (several)


def _pooled(s):
    return (s[0], s[1], s[2] // K, s[3] // K)


def _positions(s):
    return torch.randint(0, K * K, _pooled(s), dtype=torch.uint8)


def _unpool(b, z, am, an, h):  # one row more than the windows cover: it stays zero
    return fn.ada_unpool2d(z, am, an, h, K, (am.shape[2] * K + 1, am.shape[3] * K), backend=b)


# name -> (the op on backend b, the inputs of a shape: CPU tensors, floats in `dtype`)
Make = Callable[[tuple, torch.dtype], tuple]
OPS: dict[str, tuple[Callable, Make]] = {
    "ada_relu": (
        lambda b, x, h: fn.ada_relu(x, h, ETA, backend=b),
        lambda s, d: (torch.randn(s, dtype=d), torch.randn(s, dtype=d)),
    ),
    "relu": (
        lambda b, x: fn.ada_relu(x, None, ETA, backend=b),
        lambda s, d: (torch.randn(s, dtype=d),),
    ),
    "ada_relu_feedback": (
        lambda b, z, m: fn.ada_relu_feedback(z, m, backend=b),
        lambda s, d: (torch.randn(s, dtype=d), torch.randn(s) > 0),
    ),
    "ins_norm": (lambda b, x: fn.ins_norm(x, backend=b), lambda s, d: (torch.randn(s, dtype=d),)),
    "ins_norm_centered": (
        lambda b, x: fn.ins_norm(x, centered=True, backend=b),
        lambda s, d: (torch.randn(s, dtype=d) + 2,),
    ),
    "ins_bias_ada_relu": (
        lambda b, x, bias, h: fn.ins_bias_ada_relu(x, bias, h, ETA, backend=b),
        lambda s, d: (torch.randn(s, dtype=d), torch.randn(s[1], dtype=d), torch.randn(s, dtype=d)),
    ),
    "ins_relu_centered": (
        lambda b, x: fn.ins_bias_ada_relu(x, None, None, centered=True, backend=b),
        lambda s, d: (torch.randn(s, dtype=d) * 3 + 2,),
    ),
    "ins_norm_gate": (
        lambda b, z, m: fn.ins_norm_gate(z, m, backend=b),
        lambda s, d: (torch.randn(s, dtype=d), torch.randn(s) > 0),
    ),
    "ada_pool2d": (
        lambda b, x, h: fn.ada_pool2d(x, h, K, backend=b),
        lambda s, d: (torch.randn(s, dtype=d), torch.randn(_pooled(s), dtype=d)),
    ),
    "max_pool2d": (
        lambda b, x: fn.ada_pool2d(x, None, K, backend=b),
        lambda s, d: (torch.randn(s, dtype=d),),
    ),
    "ada_unpool2d": (
        _unpool,
        lambda s, d: (
            torch.randn(_pooled(s), dtype=d),
            _positions(s),
            _positions(s),
            torch.randn(_pooled(s), dtype=d),
        ),
    ),
    "ins_bias_ada_relu_pool2d": (
        lambda b, x, bias, h, ph: fn.ins_bias_ada_relu_pool2d(x, bias, h, ph, ETA, K, backend=b),
        lambda s, d: (
            torch.randn(s, dtype=d),
            torch.randn(s[1], dtype=d),
            torch.randn(s, dtype=d),
            torch.randn(_pooled(s), dtype=d),
        ),
    ),
    "ada_unpool_gate": (
        lambda b, z, am, an, h, m: fn.ada_unpool_gate(
            z, am, an, h, m, K, tuple(m.shape[2:]), backend=b
        ),
        lambda s, d: (
            torch.randn(_pooled(s), dtype=d),
            _positions(s),
            _positions(s),
            torch.randn(_pooled(s), dtype=d),
            torch.randn(s) > 0,
        ),
    ),
}


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _run(op: Callable, backend: str, inputs: tuple, device: str):
    """The op's outputs (on the CPU) and the gradients of its float inputs for a fixed upstream
    gradient (a function of the outputs' shapes only, so both runs get the same)."""
    leaves = [
        t.to(device).requires_grad_() if t.is_floating_point() else t.to(device) for t in inputs
    ]
    outs = _outputs(op(backend, *leaves))
    floats = [o for o in outs if o.is_floating_point()]
    gen = torch.Generator().manual_seed(7)
    ups = [torch.randn(o.shape, dtype=o.dtype, generator=gen).to(device) for o in floats]
    wrt = [t for t in leaves if t.is_floating_point()]
    grads = torch.autograd.grad(floats, wrt, ups, allow_unused=True)
    return [o.detach().cpu() for o in outs], [None if g is None else g.cpu() for g in grads]


def _check_against_reference(backend: str, device: str, name: str, shape, dtype) -> None:
    op, make = OPS[name]
    inputs = make(shape, dtype)
    outs, grads = _run(op, backend, inputs, device)
    want_outs, want_grads = _run(op, "reference", inputs, "cpu")
    for got, want in zip(outs, want_outs, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        if want.is_floating_point():
            assert_close(got, want)
        else:  # masks and pool positions: decisions, bit for bit
            assert torch.equal(got, want)
    for got, want in zip(grads, want_grads, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            assert_close(got, want)


CASES = [
    pytest.param(name, shape, dtype, id=case_id(op=name, shape=shape, dtype=dtype))
    for name in OPS
    for shape in SHAPES
    for dtype in (torch.float32, torch.float64)
]


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(("name", "shape", "dtype"), CASES)
def test_triton_matches_reference(name, shape, dtype):
    _check_against_reference("triton", DEVICE, name, shape, dtype)


@needs_cuda
@pytest.mark.parametrize(("name", "shape", "dtype"), CASES)
def test_cuda_matches_reference(name, shape, dtype):
    if not _backend.cuda_compiled():
        pytest.skip("screening_attn._C was built without CUDA")
    _check_against_reference("cuda", "cuda", name, shape, dtype)


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", ["ada_relu", "ins_bias_ada_relu", "ada_pool2d"])
def test_tensors_on_the_second_gpu(backend, name):
    """The launchers guard the device: cuda:1's tensors while cuda:0 is current."""
    if backend == "cuda" and not _backend.cuda_compiled():
        pytest.skip("screening_attn._C was built without CUDA")
    with torch.cuda.device(0):
        _check_against_reference(backend, "cuda:1", name, SHAPES[0], torch.float32)
