"""Helpers of the CNN-F tests (tests/test_feedback_*.py)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from _env import HAS_CUDA
from torch import nn

# The compiled backends of the tests that build CPU tensors: the C++ kernels, and Triton where it
# takes CPU tensors, under its interpreter (tests/conftest.py sets it when there is no GPU). With
# a GPU, Triton (and the CUDA kernels) run on CUDA tensors in test_feedback_devices.py.
BACKENDS = ["cpu"] if HAS_CUDA else ["cpu", "triton"]
DTYPES = [torch.float32, torch.float64]
F64 = torch.float64


def leaves(*tensors):
    return [None if t is None else t.clone().requires_grad_() for t in tensors]


def grads(out, inputs, grad):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad)


def randomize(model: nn.Module, bias_std: float = 0.5) -> nn.Module:
    """Nonzero biases (they start at 0) so that a misplaced bias cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, bias_std)
    return model


def ins_oracle(x, centered=False, eps=1e-8):
    """ins_norm written from its formula, with sums instead of means."""
    n = x.shape[2] * x.shape[3]
    if centered:
        mean = x.sum(dim=(2, 3), keepdim=True) / n
        power = ((x - mean) ** 2).sum(dim=(2, 3), keepdim=True) / (n - 1)
    else:
        power = (x * x).sum(dim=(2, 3), keepdim=True) / n
    return x / (power + eps) ** 0.5


def plane_inputs() -> SimpleNamespace:
    """Inputs of the per-plane tests: ``x``, ``hidden`` `(3, 2, 4, 6)`, the pooled ``z`` and
    ``pool_hidden`` `(3, 2, 2, 3)`, ``bias`` `(2,)` and ``mask = hidden > 0``, float64."""
    g = torch.Generator().manual_seed(3)
    x, hidden = torch.randn(2, 3, 2, 4, 6, dtype=F64, generator=g).unbind(0)
    z = torch.randn(3, 2, 2, 3, dtype=F64, generator=g)
    pool_hidden = torch.randn(3, 2, 2, 3, dtype=F64, generator=g)
    bias = torch.randn(2, dtype=F64, generator=g)
    return SimpleNamespace(
        x=x, hidden=hidden, z=z, pool_hidden=pool_hidden, bias=bias, mask=hidden > 0
    )


def assert_non_finite_stays_in_its_plane(
    op: Callable, t: torch.Tensor, bad: float, outputs: int = 1
) -> None:
    """``op`` works per (n, c) plane of ``t`` (`(3, 2, H, W)`): a NaN or +Inf in one element of
    plane (1, 1) leaves every other plane of the output (``outputs`` of them concatenated along
    dim 0) and of the gradient of ``t`` bitwise unchanged, and does reach its own plane."""
    t = t.clone().requires_grad_()
    clean = op(t)
    grad_out = torch.randn(clean.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    (clean_grad,) = torch.autograd.grad(clean, t, grad_out)
    tb = t.detach().clone()
    tb[1, 1, 1, 1] = bad
    tb.requires_grad_()
    out = op(tb)
    (grad,) = torch.autograd.grad(out, tb, grad_out)
    n = out.shape[0] // outputs
    planes = [(i, c) for i in range(out.shape[0]) for c in range(2) if (i % n, c) != (1, 1)]
    for i, c in planes:
        assert torch.equal(out[i, c], clean[i, c]), (i, c)
    for i, c in [(i, c) for i in range(3) for c in range(2) if (i, c) != (1, 1)]:
        assert torch.equal(grad[i, c], clean_grad[i, c]), (i, c)
    reached = not torch.equal(out[1, 1], clean[1, 1]) or not torch.equal(
        grad[1, 1], clean_grad[1, 1]
    )
    assert reached


def windows(y: torch.Tensor, k: int) -> torch.Tensor:
    """The k x k pooling windows of ``y`` `(N, C, H, W)`, row-major: `(N, C, H/k, W/k, k²)`."""
    w = y.unfold(2, k, k).unfold(3, k, k)
    return w.reshape(*w.shape[:4], k * k)


def first_positions(y: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The pools' rule, written out: the first window position holding the window's maximum
    (minimum); and how many windows hold it more than once (ties the rule decides)."""
    w = windows(y, k)
    best = w.amax(-1, keepdim=True) if largest else w.amin(-1, keepdim=True)
    hit = w == best
    pos = torch.where(hit, torch.arange(k * k), k * k).amin(-1)
    return pos.to(torch.uint8), int((hit.sum(-1) > 1).sum())
