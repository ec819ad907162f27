"""Glue shared by every op family's ``_ops.py``: the accumulator dtype and the guard that makes
a backward op's own derivative a clear error."""

from __future__ import annotations

from typing import TypeAlias, TypeVar

import torch
from torch._library.custom_ops import CustomOpDef
from torch._ops import OpOverload

__all__ = ["Op", "OpT", "acc_dtype", "no_double_backward"]

# A registered op: a C++ op's overload (torch.ops.screening_attn.<name>.default) or a Triton
# custom op (torch.library.custom_op); both are callable and take fakes and autograd.
Op: TypeAlias = OpOverload | CustomOpDef
# The item type of a family's NamedTuple of ops, which holds either its registered ops or their
# fakes.
OpT = TypeVar("OpT")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of softmax statistics, relevancies and per-plane norms: float64 for float64 inputs,
    float32 for everything else (half inputs accumulate in float32; docs/numerics.md)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_double_backward(op: Op, name: str) -> None:
    """Register an autograd formula for the backward op ``op`` that raises: the compiled
    backward ops have no derivative of their own, and silently returning zeros would be wrong.
    ``backend="reference"`` gives higher-order gradients."""

    def setup_context(ctx, inputs, output) -> None:
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"screening_attn: double backward of {name} is not implemented (its backward op has "
            "no derivative); first-order gradients work, and backend='reference' gives "
            "higher-order ones"
        )

    torch.library.register_autograd(op, backward, setup_context=setup_context)
