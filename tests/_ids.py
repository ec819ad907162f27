"""One way to name parametrized cases: ``case_id(B=2, H=3, T=63, D=16, w=4, r=2,
dtype=torch.float64)`` -> ``"B2-H3-T63-D16-w4-r2-float64"``."""

from __future__ import annotations

import torch


def _part(key: str, value: object) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, bool):
        return key if value else f"no{key}"
    if isinstance(value, tuple | list):
        return key + "x".join(str(v) for v in value)
    return f"{key}{value}"


def case_id(**fields: object) -> str:
    """Fields in call order, ``key + value``; dtypes by name, bools as ``key``/``nokey``,
    tuples joined with ``x``; ``None`` fields are left out."""
    return "-".join(_part(k, v) for k, v in fields.items() if v is not None)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
