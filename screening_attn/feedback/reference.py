"""Pure-PyTorch reference of every CNN-F op (docs/feedback.md): readable, float64-capable, the
definition of correct for every kernel. Imports only torch.

Each function has the signature and return values of the public op of the same name in
:mod:`screening_attn.feedback.functional` (minus ``backend``), takes checked arguments and is
differentiable where the op is. The fused ops are written as the compositions they fuse.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ada_pool2d",
    "ada_relu",
    "ada_relu_feedback",
    "ada_unpool2d",
    "ada_unpool_gate",
    "feedback_update",
    "ins_bias_ada_relu",
    "ins_bias_ada_relu_pool2d",
    "ins_norm",
    "ins_norm_gate",
]


def ada_relu(x: Tensor, hidden: Tensor | None = None, eta: float = 0.0) -> tuple[Tensor, Tensor]:
    """AdaReLU gate. Returns ``(y, mask)`` with ``mask`` a bool tensor shaped like ``x``.

    No feedback yet (``hidden is None``): a plain ReLU. Otherwise the input is first moved a
    step ``eta`` toward the feedback signal, ``x' = x + eta (hidden - x)``, and the gate opens
    where ``x'`` and ``hidden`` agree in sign.
    """
    if hidden is None:
        mask = x > 0
        return x * mask, mask
    xr = x + eta * (hidden - x)
    mask = xr * hidden > 0
    return xr * mask, mask


def ada_relu_feedback(z: Tensor, mask: Tensor) -> Tensor:
    """``z * mask``: the gate's feedback pass with the mask of its last forward."""
    return z * mask


def ins_norm(x: Tensor, eps: float = 1e-8, centered: bool = False) -> Tensor:
    """Instance norm without centering or affine: ``x / sqrt(mean_{H,W}(x^2) + eps)`` per (n, c).

    ``centered=True`` puts the unbiased variance (as ``torch.var``) under the root instead of the
    mean square; ``x`` itself is still not centered. ``x``: ``(N, C, H, W)``.
    """
    if centered:
        power = x.var(dim=(-2, -1), keepdim=True)
    else:
        power = x.square().mean(dim=(-2, -1), keepdim=True)
    return x / torch.sqrt(power + eps)


def ins_bias_ada_relu(
    x: Tensor,
    bias: Tensor | None = None,
    hidden: Tensor | None = None,
    eta: float = 0.0,
    *,
    eps: float = 1e-8,
    centered: bool = False,
) -> tuple[Tensor, Tensor]:
    """Bottom-up ``InsNorm -> Bias -> AdaReLU``: ``ada_relu(ins_norm(x) + bias[c], hidden, eta)``.
    Returns ``(y, mask)``."""
    u = ins_norm(x, eps, centered)
    if bias is not None:
        u = u + bias.view(1, -1, 1, 1)
    return ada_relu(u, hidden, eta)


def ins_norm_gate(
    z: Tensor, mask: Tensor, *, eps: float = 1e-8, centered: bool = False
) -> tuple[Tensor, Tensor]:
    """Top-down ``InsNorm -> AdaReLU.feedback``: ``(zn, zn * mask)`` with ``zn = ins_norm(z)``."""
    zn = ins_norm(z, eps, centered)
    return zn, ada_relu_feedback(zn, mask)


def _windows(x: Tensor, k: int) -> Tensor:
    """``(N, C, H, W) -> (N, C, H//k, W//k, k*k)``: the non-overlapping k x k windows, each
    flattened in row-major order; rows and columns past the last full window are dropped (the
    floor mode of ``max_pool2d``)."""
    win = x.unfold(2, k, k).unfold(3, k, k)  # (N, C, Ho, Wo, k, k)
    return win.reshape(*win.shape[:4], k * k)


def _plane_index(pos: Tensor, k: int, width: int) -> Tensor:
    """Position inside each window ``(N, C, Ho, Wo)`` -> flat index into the input's H x W plane
    (the convention of ``max_pool2d(return_indices=True)`` and ``max_unpool2d``)."""
    ho = torch.arange(pos.shape[2], device=pos.device).view(-1, 1)
    wo = torch.arange(pos.shape[3], device=pos.device).view(1, -1)
    row = ho * k + torch.div(pos, k, rounding_mode="floor")
    col = wo * k + pos % k
    return row * width + col


def _select(x: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """``(values, pos)``: the max (or min) of each window, differentiable in ``x``, and its
    int64 position ``row * k + col`` in the window."""
    win = _windows(x, k)
    # argmax/argmin return the first extreme element on ties (and pick NaN, which propagates).
    pos = win.argmax(dim=-1) if largest else win.argmin(dim=-1)
    return win.gather(-1, pos.unsqueeze(-1)).squeeze(-1), pos


def _max_pool2d(x: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
    """k x k max-pool with stride k. Returns ``(y, argmax)``; ``argmax`` holds int64 flat indices
    into each input plane. Ties pick the first element of the window in row-major order."""
    values, pos = _select(x, kernel_size, largest=True)
    return values, _plane_index(pos, kernel_size, x.shape[-1])


def _min_pool2d(x: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
    """k x k min-pool with stride k, ``(y, argmin)``; ties pick the first element, as for max."""
    values, pos = _select(x, kernel_size, largest=False)
    return values, _plane_index(pos, kernel_size, x.shape[-1])


def _unpool2d(z: Tensor, indices: Tensor, output_size: tuple[int, int]) -> Tensor:
    """Scatter ``z (N, C, Ho, Wo)`` to the flat plane ``indices`` of a zero ``(N, C, H, W)`` map
    (``max_unpool2d`` with non-overlapping windows); differentiable in ``z``."""
    n, c = z.shape[:2]
    height, width = output_size
    out = z.new_zeros(n, c, height * width)
    return out.scatter(2, indices.flatten(2), z.flatten(2)).view(n, c, height, width)


def ada_pool2d(
    x: Tensor, hidden: Tensor | None = None, kernel_size: int = 2
) -> tuple[Tensor, Tensor, Tensor]:
    """AdaPool forward: k x k windows, stride k. Returns ``(y, argmax, argmin)``.

    No feedback yet (``hidden is None``): a max-pool. Otherwise
    ``y = [hidden > 0] maxpool(x) + [hidden < 0] minpool(x)`` (0 where hidden is 0), with
    ``hidden`` shaped like ``y``. ``argmax`` and ``argmin`` are the uint8 positions
    ``row * k + col`` of the max and the min in each window, both always computed.
    """
    y_max, pos_max = _select(x, kernel_size, largest=True)
    y_min, pos_min = _select(x, kernel_size, largest=False)
    argmax, argmin = pos_max.to(torch.uint8), pos_min.to(torch.uint8)
    if hidden is None:
        return y_max, argmax, argmin
    return y_max * (hidden > 0) + y_min * (hidden < 0), argmax, argmin


def ada_unpool2d(
    z: Tensor,
    argmax: Tensor,
    argmin: Tensor,
    hidden: Tensor | None,
    kernel_size: int,
    output_size: tuple[int, int],
) -> Tensor:
    """AdaPool feedback: ``z`` back to the argmax positions of an ungated forward (``hidden``
    ``None``); after a gated one, ``unpool(z [hidden > 0], argmax) + unpool(z [hidden < 0],
    argmin)``. ``argmax``, ``argmin``: uint8 window positions as :func:`ada_pool2d` returns."""
    width = output_size[1]
    imax = _plane_index(argmax.long(), kernel_size, width)
    if hidden is None:
        return _unpool2d(z, imax, output_size)
    imin = _plane_index(argmin.long(), kernel_size, width)
    return _unpool2d(z * (hidden > 0), imax, output_size) + _unpool2d(
        z * (hidden < 0), imin, output_size
    )


def ins_bias_ada_relu_pool2d(
    x: Tensor,
    bias: Tensor | None,
    hidden: Tensor | None,
    pool_hidden: Tensor | None,
    eta: float,
    kernel_size: int,
    *,
    eps: float = 1e-8,
    centered: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A stage that ends in a pool: :func:`ins_bias_ada_relu` then :func:`ada_pool2d` gated by
    ``pool_hidden``. Returns ``(y, mask, argmax, argmin)``."""
    u, mask = ins_bias_ada_relu(x, bias, hidden, eta, eps=eps, centered=centered)
    y, argmax, argmin = ada_pool2d(u, pool_hidden, kernel_size)
    return y, mask, argmax, argmin


def ada_unpool_gate(
    z: Tensor,
    argmax: Tensor,
    argmin: Tensor,
    hidden: Tensor | None,
    mask: Tensor,
    kernel_size: int,
    output_size: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Top-down AdaPool then AdaReLU: ``(u, u * mask)`` with
    ``u = ada_unpool2d(z, argmax, argmin, hidden, kernel_size, output_size)``."""
    u = ada_unpool2d(z, argmax, argmin, hidden, kernel_size, output_size)
    return u, ada_relu_feedback(u, mask)


def feedback_update(ff: Tensor, rec: Tensor, eta: float) -> Tensor:
    """One feedback step on the fed-back feature map: ``ff + eta (rec - ff)``."""
    return ff + eta * (rec - ff)
