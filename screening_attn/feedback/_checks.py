"""Argument checks shared by the CNN-F functional ops and layers: each raises a ValueError or
TypeError naming the argument (docs/backends.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from screening_attn._validate import (
    check_finite_float,
    check_int,
    check_same_device_dtype,
    check_tensor,
)

MAX_KERNEL_SIZE = 16  # window positions are stored in a uint8


def check_channels(name: str, x: Tensor, dim: int, expected: int, what: str) -> None:
    """``x`` has ``expected`` entries in dimension ``dim`` (channels or features)."""
    if x.shape[dim] != expected:
        raise ValueError(
            f"{name} must have {expected} {what} (dim {dim}), got shape {tuple(x.shape)}"
        )


def check_eps(eps: object) -> float:
    value = check_finite_float("eps", eps)
    if value < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    return value


def check_eta(eta: object) -> float:
    return check_finite_float("eta", eta)


def check_kernel_size(kernel_size: object) -> int:
    k = check_int("kernel_size", kernel_size, minimum=1)
    if k > MAX_KERNEL_SIZE:
        raise ValueError(f"kernel_size must be an int in [1, {MAX_KERNEL_SIZE}], got {k}")
    return k


def check_like(name: str, t: Tensor, like_name: str, like: Tensor) -> None:
    """``t`` is a tensor with the shape, dtype and device of ``like``."""
    check_tensor(name, t, ndim=like.dim())
    check_same_device_dtype(like_name, like, **{name: t})
    if t.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}"
        )


def check_mask(mask: object, what: str, shape: tuple[int, ...], device: torch.device) -> None:
    """``mask`` is a bool tensor of ``shape`` on ``device`` (those of ``what``)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor, got {got}")
    if tuple(mask.shape) != shape or mask.device != device:
        raise ValueError(
            f"mask must have the shape and device of {what} "
            f"({shape}, {device}), got ({tuple(mask.shape)}, {mask.device})"
        )


def check_plane(name: str, x: Tensor, centered: bool) -> None:
    """``x`` is `(N, C, H, W)`; the unbiased variance needs two elements per plane."""
    check_tensor(name, x, ndim=4)
    if centered and x.shape[2] * x.shape[3] < 2:
        raise ValueError(
            f"{name} needs at least 2 elements in H x W for centered=True (unbiased variance), "
            f"got shape {tuple(x.shape)}"
        )


def check_window_positions(
    name: str, pos: object, pooled: tuple[int, ...], device: torch.device
) -> None:
    """``pos`` is a uint8 tensor of window positions of the pooled shape."""
    if not isinstance(pos, Tensor) or pos.dtype != torch.uint8:
        got = pos.dtype if isinstance(pos, Tensor) else type(pos).__name__
        raise TypeError(f"{name} must be a uint8 tensor (window positions), got {got}")
    if tuple(pos.shape) != pooled or pos.device != device:
        raise ValueError(
            f"{name} must have the pooled shape {pooled} on {device}, "
            f"got {tuple(pos.shape)} on {pos.device}"
        )
