"""Pure-PyTorch reference of the CNN-F ops (SPEC §3): readable, float64-capable, the definition
of correct for every kernel."""

from __future__ import annotations

import torch
from torch import Tensor


def ada_relu(x: Tensor, hidden: Tensor | None, eta: float) -> tuple[Tensor, Tensor]:
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


def gate(z: Tensor, mask: Tensor) -> Tensor:
    """``z * mask``: a gate's feedback pass with the mask of its last forward."""
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
    win = _windows(x, k)
    # argmax/argmin return the first extreme element on ties (and pick NaN, which propagates).
    pos = win.argmax(dim=-1) if largest else win.argmin(dim=-1)
    values = win.gather(-1, pos.unsqueeze(-1)).squeeze(-1)  # differentiable in x
    return values, _plane_index(pos, k, x.shape[-1])


def max_pool2d(x: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
    """k x k max-pool with stride k. Returns ``(y, argmax)``; ``argmax`` holds int64 flat indices
    into each input plane. Ties pick the first element of the window in row-major order."""
    return _select(x, kernel_size, largest=True)


def min_pool2d(x: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
    """k x k min-pool with stride k, ``(y, argmin)``; ties pick the first element, as for max."""
    return _select(x, kernel_size, largest=False)


def ada_pool2d(
    x: Tensor, hidden: Tensor | None, kernel_size: int
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """AdaPool forward. Returns ``(y, argmax, argmin, pos_mask, neg_mask)``.

    No feedback yet (``hidden is None``): a max-pool; ``argmin`` and the masks are ``None``.
    Otherwise ``y = [hidden > 0] maxpool(x) + [hidden < 0] minpool(x)`` (0 where hidden is 0),
    with ``hidden`` shaped like ``y`` and both bool masks returned.
    """
    y_max, argmax = max_pool2d(x, kernel_size)
    if hidden is None:
        return y_max, argmax, None, None, None
    y_min, argmin = min_pool2d(x, kernel_size)
    pos_mask, neg_mask = hidden > 0, hidden < 0
    return y_max * pos_mask + y_min * neg_mask, argmax, argmin, pos_mask, neg_mask


def unpool2d(z: Tensor, indices: Tensor, output_size: tuple[int, int]) -> Tensor:
    """Scatter ``z (N, C, Ho, Wo)`` to the flat plane ``indices`` of a zero ``(N, C, H, W)`` map
    (``max_unpool2d`` with non-overlapping windows); differentiable in ``z``."""
    n, c = z.shape[:2]
    height, width = output_size
    out = z.new_zeros(n, c, height * width)
    return out.scatter(2, indices.flatten(2), z.flatten(2)).view(n, c, height, width)


def ada_unpool2d(
    z: Tensor,
    argmax: Tensor,
    argmin: Tensor | None,
    pos_mask: Tensor | None,
    neg_mask: Tensor | None,
    output_size: tuple[int, int],
) -> Tensor:
    """AdaPool feedback: ``z`` back to the argmax positions before any gated forward (masks
    ``None``); after one, ``unpool(z [pos_mask], argmax) + unpool(z [neg_mask], argmin)``."""
    if pos_mask is None:
        return unpool2d(z, argmax, output_size)
    return unpool2d(z * pos_mask, argmax, output_size) + unpool2d(z * neg_mask, argmin, output_size)


def feedback_update(ff: Tensor, reconstruction: Tensor, eta: float) -> Tensor:
    """One feedback step on the fed-back feature map: ``ff + eta (reconstruction - ff)``."""
    return ff + eta * (reconstruction - ff)
