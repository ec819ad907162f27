"""Shared argument checks: every failure names the argument, what was expected and what was
given."""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "check_bool",
    "check_finite_float",
    "check_finite_scale",
    "check_int",
    "check_same_device_dtype",
    "check_tensor",
]


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value: object, *, minimum: int) -> int:
    """An integer size (bool is rejected) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {_describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | tuple[int, ...],
    floating: bool = True,
) -> torch.Tensor:
    """A tensor of the given rank(s); floating point unless ``floating=False``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_describe(value)}")
    ranks = (ndim,) if isinstance(ndim, int) else ndim
    if value.dim() not in ranks:
        want = " or ".join(f"{r}-d" for r in ranks)
        raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_same_device_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Every tensor in ``others`` has the dtype and device of ``ref``."""
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}"
            )
        if t.device != ref.device:
            raise ValueError(
                f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}"
            )


def check_finite_scale(name: str, value: object) -> float | None:
    """``None`` or a finite real number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite float or None, got {_describe(value)}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite float or None, got {value}")
    return float(value)


def check_finite_float(name: str, value: object) -> float:
    """A finite real number (bool is rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite float, got {_describe(value)}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite float, got {value}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    """A bool (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return value
