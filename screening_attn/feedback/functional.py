"""Public functional CNN-F ops, dispatching to a backend (SPEC §4)."""

from __future__ import annotations

import torch
from torch import Tensor

from screening_attn import _backend
from screening_attn._validate import check_same_device_dtype, check_tensor
from screening_attn.feedback import _ops, reference

__all__ = ["ada_relu", "ada_relu_feedback"]

_ADA_RELU_BACKENDS = ("reference", "cpu", "cuda", "triton")


def _check_like(name: str, t: Tensor, like_name: str, like: Tensor) -> None:
    check_tensor(name, t, ndim=like.dim())
    check_same_device_dtype(like_name, like, **{name: t})
    if t.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}"
        )


def _check_mask(mask: Tensor, like_name: str, like: Tensor) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor, got {got}")
    if mask.shape != like.shape or mask.device != like.device:
        raise ValueError(
            f"mask must have the shape and device of {like_name} "
            f"({tuple(like.shape)}, {like.device}), got ({tuple(mask.shape)}, {mask.device})"
        )


def ada_relu(
    x: Tensor, hidden: Tensor | None = None, eta: float = 0.0, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """AdaReLU gate of CNN-F (SPEC §3), elementwise.

    Without feedback (``hidden is None``) a plain ReLU. With feedback, the input first moves a
    step ``eta`` toward the top-down signal, ``x' = x + eta (hidden - x)``, and the gate opens
    where ``x'`` and ``hidden`` agree in sign: ``y = x' [x' hidden > 0]``.

    Args:
        x (Tensor): the bottom-up pre-activation, any shape.
        hidden (Optional[Tensor]): the top-down signal stored at this layer by the last feedback
            pass, shaped like ``x``. Default: ``None``.
        eta (float): residual step toward ``hidden`` (the paper's ``res_param``). Default: ``0.0``.
        backend (str): ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
            Default: ``"auto"``.

    Returns:
        ``(y, mask)``: ``y`` of the shape and dtype of ``x`` (contiguous), and ``mask``, a bool
        tensor of the same shape marking the open gates.

    Example::

        >>> x = torch.randn(2, 3)
        >>> y, mask = ada_relu(x)                       # first pass: ReLU
        >>> y, mask = ada_relu(x, torch.randn(2, 3), 0.1)  # gated by feedback
    """
    check_tensor("x", x, ndim=tuple(range(9)))
    if hidden is not None:
        _check_like("hidden", hidden, "x", x)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a float, got {eta!r} ({type(eta).__name__})")
    eta = float(eta)
    impl = _backend.resolve("ada_relu", backend, x.device, _ADA_RELU_BACKENDS)
    if impl == "reference":
        return reference.ada_relu(x, hidden, eta)
    if impl == "triton":
        return _ops.ada_relu_triton(x, hidden, eta)
    return _ops.ada_relu_cpp(x, hidden, eta)


def ada_relu_feedback(z: Tensor, mask: Tensor, *, backend: str = "auto") -> Tensor:
    """The AdaReLU gate's top-down pass: ``z * mask`` with the mask of the last forward.

    Args:
        z (Tensor): the feedback signal, shaped like the gate's input.
        mask (Tensor): bool, the ``mask`` returned by :func:`ada_relu`.
        backend (str): as in :func:`ada_relu`. Default: ``"auto"``.

    Returns:
        Tensor shaped and typed like ``z``.
    """
    check_tensor("z", z, ndim=tuple(range(9)))
    _check_mask(mask, "z", z)
    impl = _backend.resolve("ada_relu_feedback", backend, z.device, _ADA_RELU_BACKENDS)
    if impl == "reference":
        return reference.gate(z, mask)
    if impl == "triton":
        return _ops.ada_relu_feedback_triton(z, mask)
    return _ops.ada_relu_feedback_cpp(z, mask)
