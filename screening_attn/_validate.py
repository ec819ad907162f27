"""Shared argument checks: every failure names the argument, what was expected and what was
given."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, SupportsIndex, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys

__all__ = [
    "check_attention_inputs",
    "check_bool",
    "check_finite_float",
    "check_finite_scale",
    "check_int",
    "check_key_padding_mask",
    "check_same_device_dtype",
    "check_state_dict",
    "check_tensor",
]

INT64_MAX = 2**63 - 1  # sizes go to C++ ops as int64


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value: object, *, minimum: int) -> int:
    """An integer size in ``[minimum, 2**63 - 1]``: an int or any integral object that
    ``operator.index`` accepts (numpy integers); bool, numpy bool and tensors are rejected (a
    tensor size would be data-dependent under ``torch.compile``)."""
    if isinstance(value, bool | torch.Tensor):
        raise TypeError(f"{name} must be an int >= {minimum}, got {_describe(value)}")
    try:
        # operator.index is the check itself: it raises TypeError for a non-integral value
        index = operator.index(cast(SupportsIndex, value))
    except TypeError:
        raise TypeError(f"{name} must be an int >= {minimum}, got {_describe(value)}") from None
    if index < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {index}")
    if index > INT64_MAX:
        raise ValueError(f"{name} must be an int in [{minimum}, 2**63 - 1], got {index}")
    return index


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
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if value.dim() not in ranks:
        if len(ranks) > 2 and ranks == tuple(range(ranks[0], ranks[-1] + 1)):
            want = f"{ranks[0]}-d to {ranks[-1]}-d"
        else:
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


def check_attention_inputs(
    q: object,
    k: object,
    v: object,
    window: object,
    relevant: object,
    scale: object = None,
    *,
    grouped: bool = False,
) -> tuple[int, int, float | None]:
    """The arguments of ``screened_attention`` and of its Triton op (the C++ op checks its own):
    ``q`` `(B, H, T, D)`, ``k`` `(B, H, T, D)`, ``v`` `(B, H, T, Dv)` floating tensors of one
    dtype and device, ``window >= 1``, ``relevant >= 0``, ``scale`` finite or None
    (docs/backends.md). With ``grouped``, ``k`` and ``v`` may have ``Hkv`` heads dividing ``H``
    (docs/streaming.md). Returns ``(window, relevant, scale)`` as Python numbers."""
    q = check_tensor("q", q, ndim=4)
    k = check_tensor("k", k, ndim=4)
    v = check_tensor("v", v, ndim=4)
    check_same_device_dtype("q", q, k=k, v=v)
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if grouped:
        if k.shape[0] != B or k.shape[2:] != q.shape[2:]:
            raise ValueError(
                f"k must have the shape (B, Hkv, T, D) with the (B, T, D) of q, {(B, T, D)}, "
                f"got {tuple(k.shape)}"
            )
        if (Hkv == 0 and H != 0) or (Hkv != 0 and H % Hkv != 0):
            raise ValueError(
                f"k must have the shape (B, Hkv, T, D) with Hkv dividing the H={H} heads of q "
                f"(grouped-query attention), got Hkv={Hkv} in {tuple(k.shape)}"
            )
    elif k.shape != q.shape:
        raise ValueError(
            f"k must have the shape (B, H, T, D) of q, {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        want = (
            "(B, Hkv, T, Dv) with the (B, Hkv, T) of k"
            if grouped
            else "(B, H, T, Dv) with the (B, H, T) of q"
        )
        raise ValueError(f"v must have shape {want}, {tuple(k.shape[:3])}, got {tuple(v.shape)}")
    window = check_int("window", window, minimum=1)
    relevant = check_int("relevant", relevant, minimum=0)
    scale = check_finite_scale("scale", scale)
    return window, relevant, scale


def check_key_padding_mask(mask: object, q: torch.Tensor) -> torch.Tensor | None:
    """``None`` or a ``(B, T)`` bool tensor on the device of ``q`` `(B, H, T, D)`: True marks a
    real token (the convention of transformers' ``attention_mask``)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"key_padding_mask must be a bool tensor of shape (B, T) or None, got {_describe(mask)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor (True = real token), got dtype {mask.dtype}"
        )
    want = (q.shape[0], q.shape[2])
    if tuple(mask.shape) != want:
        raise ValueError(
            f"key_padding_mask must have shape (B, T) = {want}, got {tuple(mask.shape)}"
        )
    if mask.device != q.device:
        raise ValueError(
            f"key_padding_mask must be on the device of q ({q.device}), got {mask.device}"
        )
    return mask


class StateDictError(ValueError, RuntimeError):
    """A state_dict that does not fit the module: a ValueError (docs/backends.md) that is also the
    RuntimeError ``nn.Module.load_state_dict`` raises, so handlers written for either catch it."""


class StateDictTypeError(TypeError, RuntimeError):
    """A state_dict entry that is not a tensor (also a RuntimeError, as :class:`StateDictError`)."""


def check_state_dict(module: nn.Module, state_dict: object, *, strict: bool) -> None:
    """What ``module.load_state_dict(state_dict, strict)`` would reject, as errors naming the
    keys: a non-tensor entry (TypeError), a shape mismatch, and with ``strict`` missing or
    unexpected keys (ValueError). Runs before torch copies anything."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of str to Tensor, got {_describe(state_dict)}"
        )
    expected = module.state_dict(keep_vars=True)
    wrong = []
    for key, value in state_dict.items():
        if key not in expected:
            continue
        want = tuple(expected[key].shape)
        if not isinstance(value, torch.Tensor):
            raise StateDictTypeError(
                f"state_dict[{key!r}] must be a Tensor of shape {want}, got {_describe(value)}"
            )
        if tuple(value.shape) != want:
            wrong.append(f"state_dict[{key!r}] must have shape {want}, got {tuple(value.shape)}")
    if wrong:
        raise StateDictError(f"{type(module).__name__}: " + "; ".join(wrong))
    if strict:
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing or unexpected:
            raise StateDictError(
                f"state_dict must hold exactly the keys of {type(module).__name__} "
                f"(strict=True); missing: {missing}, unexpected: {unexpected}"
            )


class StateDictChecks(nn.Module):
    """Base of the package's modules: ``load_state_dict`` runs :func:`check_state_dict` first,
    so a checkpoint of the wrong shape raises a ValueError naming the keys."""

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        check_state_dict(self, state_dict, strict=check_bool("strict", strict))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
