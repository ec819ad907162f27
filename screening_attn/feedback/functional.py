"""Public functional CNN-F ops (docs/feedback.md). Each validates its arguments once, picks the
backend (docs/backends.md) and runs :mod:`~screening_attn.feedback.reference`'s op of the same
name or the registered op of :mod:`screening_attn.feedback._ops`."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from screening_attn import _backend
from screening_attn._library import OpT
from screening_attn._validate import check_bool, check_int, check_same_device_dtype, check_tensor
from screening_attn.feedback import _ops, reference
from screening_attn.feedback._checks import (
    check_eps,
    check_eta,
    check_kernel_size,
    check_like,
    check_mask,
    check_plane,
    check_window_positions,
)

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

# The compiled backends of every CNN-F op and the dtypes they take.
_KERNELS = {
    "cpu": _backend.CPU_HALF_DTYPES,
    "cuda": _backend.CUDA_DTYPES,
    "triton": _backend.TRITON_DTYPES,
}


class _Family(Protocol[OpT]):
    """A module of ``_ops``: one op family's ops in each implementation (None if missing)."""

    CPP: OpT | None
    TRITON: OpT | None


def _loaded(ops: OpT | None) -> OpT:
    # resolve() picks a compiled backend only where it loaded, so its ops are registered
    assert ops is not None
    return ops


def _compiled(group: _Family[OpT], impl: str) -> OpT:
    """``group``'s ops (a module of ``_ops``) for the compiled backend ``impl``: the Triton
    custom ops, or the C++ ops (which dispatch to CPU or CUDA by device)."""
    return _loaded(group.TRITON if impl == "triton" else group.CPP)


# --- AdaReLU gate --------------------------------------------------------------------------------
def ada_relu(
    x: Tensor, hidden: Tensor | None = None, eta: float = 0.0, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """AdaReLU gate of CNN-F (docs/feedback.md), elementwise.

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
        check_like("hidden", hidden, "x", x)
    eta = check_eta(eta)
    impl = _backend.resolve("ada_relu", backend, x.device, x.dtype, _KERNELS)
    if impl == "reference":
        return reference.ada_relu(x, hidden, eta)
    return _compiled(_ops.gates, impl).ada_relu(x, hidden, eta)


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
    check_mask(mask, "z", tuple(z.shape), z.device)
    impl = _backend.resolve("ada_relu_feedback", backend, z.device, z.dtype, _KERNELS)
    if impl == "reference":
        return reference.ada_relu_feedback(z, mask)
    return _compiled(_ops.gates, impl).ada_relu_feedback(z, mask)


# --- Instance-norm family ------------------------------------------------------------------------
def ins_norm(
    x: Tensor, eps: float = 1e-8, centered: bool = False, *, backend: str = "auto"
) -> Tensor:
    """CNN-F's instance norm (docs/feedback.md): ``x / sqrt(mean_{H,W}(x^2) + eps)`` per (n, c).

    Args:
        x (Tensor): `(N, C, H, W)`, floating point.
        eps (float): added under the square root, >= 0. Default: ``1e-8``.
        centered (bool): use the unbiased variance (as ``torch.var``) instead of the mean square;
            only the denominator changes, ``x`` is not centered. Default: ``False``.
        backend (str): ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
            Default: ``"auto"``.

    Returns:
        Tensor shaped and typed like ``x`` (contiguous for the compiled backends).

    Example::

        >>> y = ins_norm(torch.randn(2, 3, 8, 8))
        >>> power = y.square().mean(dim=(2, 3))  # 1 for every (n, c), up to eps
        >>> torch.allclose(power, torch.ones(2, 3), atol=1e-4)
        True
    """
    eps, centered = check_eps(eps), check_bool("centered", centered)
    check_plane("x", x, centered)
    impl = _backend.resolve("ins_norm", backend, x.device, x.dtype, _KERNELS)
    if impl == "reference":
        return reference.ins_norm(x, eps, centered)
    return _compiled(_ops.norms, impl).ins_norm(x, eps, centered)[0]


def ins_bias_ada_relu(
    x: Tensor,
    bias: Tensor | None = None,
    hidden: Tensor | None = None,
    eta: float = 0.0,
    *,
    eps: float = 1e-8,
    centered: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Bottom-up ``InsNorm -> Bias -> AdaReLU`` of a CNN-F stage in one pass over ``x``.

    Per (n, c) plane: ``u = x / sqrt(mean(x^2) + eps) + bias[c]``, then the AdaReLU gate of
    :func:`ada_relu`: ``y = u [u > 0]`` without feedback, else ``u' = u + eta (hidden - u)``,
    ``y = u' [u' hidden > 0]``. The compiled kernels read ``x`` (and ``hidden``) once from
    memory and write ``y`` and the mask: 4 + 4 + 4 + 1 bytes per float32 element when gated.

    Args:
        x (Tensor): `(N, C, H, W)` pre-activation (a convolution's output).
        bias (Optional[Tensor]): `(C,)`. Default: ``None`` (no bias).
        hidden (Optional[Tensor]): the top-down signal stored at the gate, shaped like ``x``.
            Default: ``None`` (plain ReLU).
        eta (float): the gate's residual step (``res_param``). Default: ``0.0``.
        eps (float), centered (bool): as :func:`ins_norm`.
        backend (str): as :func:`ins_norm`. Default: ``"auto"``.

    Returns:
        ``(y, mask)``: ``y`` like ``x``; ``mask`` bool, the open gates (what the gate's feedback
        and the backward need).

    Example::

        >>> x, b = torch.randn(2, 16, 28, 28), torch.zeros(16)
        >>> y, mask = ins_bias_ada_relu(x, b)                                  # first pass
        >>> y, mask = ins_bias_ada_relu(x, b, torch.randn_like(x), eta=0.1)   # gated
    """
    eta, eps, centered = _check_ins_bias_ada_relu(x, bias, hidden, eta, eps, centered)
    impl = _backend.resolve("ins_bias_ada_relu", backend, x.device, x.dtype, _KERNELS)
    if impl == "reference":
        return reference.ins_bias_ada_relu(x, bias, hidden, eta, eps=eps, centered=centered)
    y, mask, _ = _compiled(_ops.norms, impl).ins_bias_ada_relu(x, bias, hidden, eta, eps, centered)
    return y, mask


def _check_ins_bias_ada_relu(
    x: Tensor,
    bias: Tensor | None,
    hidden: Tensor | None,
    eta: object,
    eps: object,
    centered: object,
) -> tuple[float, float, bool]:
    eps, centered, eta = check_eps(eps), check_bool("centered", centered), check_eta(eta)
    check_plane("x", x, centered)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same_device_dtype("x", x, bias=bias)
        if bias.shape[0] != x.shape[1]:
            raise ValueError(
                f"bias must have shape (C,) = ({x.shape[1]},), got {tuple(bias.shape)}"
            )
    if hidden is not None:
        check_like("hidden", hidden, "x", x)
    return eta, eps, centered


def ins_norm_gate(
    z: Tensor, mask: Tensor, *, eps: float = 1e-8, centered: bool = False, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Top-down ``InsNorm -> AdaReLU.feedback`` in one pass: ``zn = ins_norm(z)`` (the gate's
    new ``hidden``) and ``zn * mask`` (what goes down to the next layer).

    Args:
        z (Tensor): `(N, C, H, W)` top-down signal.
        mask (Tensor): bool, the gate's mask from its last forward, shaped like ``z``.
        eps (float), centered (bool), backend (str): as :func:`ins_norm`.

    Returns:
        ``(zn, out)``, both shaped like ``z``.
    """
    eps, centered = check_eps(eps), check_bool("centered", centered)
    check_plane("z", z, centered)
    check_mask(mask, "z", tuple(z.shape), z.device)
    impl = _backend.resolve("ins_norm_gate", backend, z.device, z.dtype, _KERNELS)
    if impl == "reference":
        return reference.ins_norm_gate(z, mask, eps=eps, centered=centered)
    zn, out, _ = _compiled(_ops.norms, impl).ins_norm_gate(z, mask, eps, centered)
    return zn, out


# --- AdaPool -------------------------------------------------------------------------------------
def ada_pool2d(
    x: Tensor, hidden: Tensor | None = None, kernel_size: int = 2, *, backend: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """AdaPool forward (docs/feedback.md): k x k windows, stride k (floor mode).

    Before any feedback (``hidden is None``) a max-pool; with ``hidden``,
    ``y = [hidden > 0] max + [hidden < 0] min`` (0 where ``hidden`` is 0). Ties pick the first
    element of the window in row-major order, for max and for min; NaN wins (the first NaN).

    Args:
        x (Tensor): `(N, C, H, W)`, H and W >= ``kernel_size``.
        hidden (Optional[Tensor]): `(N, C, H // k, W // k)`. Default: ``None``.
        kernel_size (int): k in [1, 16]. Default: ``2``.
        backend (str): ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        ``(y, argmax, argmin)``: ``y`` `(N, C, H // k, W // k)`; ``argmax``, ``argmin`` uint8
        positions ``row * k + col`` of the max and of the min inside each window (1 byte per
        output instead of max_pool2d's 8-byte plane index); both are always computed.
    """
    k = _check_ada_pool2d(x, hidden, kernel_size, "hidden")
    impl = _backend.resolve("ada_pool2d", backend, x.device, x.dtype, _KERNELS)
    if impl == "reference":
        return reference.ada_pool2d(x, hidden, k)
    return _compiled(_ops.pools, impl).ada_pool2d(x, hidden, k)


def _check_ada_pool2d(
    x: Tensor, hidden: Tensor | None, kernel_size: object, hidden_name: str
) -> int:
    check_tensor("x", x, ndim=4)
    k = check_kernel_size(kernel_size)
    if x.shape[2] < k or x.shape[3] < k:
        raise ValueError(
            f"x must be at least {k}x{k} (kernel_size) in H and W, got shape {tuple(x.shape)}"
        )
    pooled = (x.shape[0], x.shape[1], x.shape[2] // k, x.shape[3] // k)
    if hidden is not None:
        check_tensor(hidden_name, hidden, ndim=4)
        check_same_device_dtype("x", x, **{hidden_name: hidden})
        if tuple(hidden.shape) != pooled:
            raise ValueError(
                f"{hidden_name} must have the pooled shape {pooled}, got {tuple(hidden.shape)}"
            )
    return k


def ada_unpool2d(
    z: Tensor,
    argmax: Tensor,
    argmin: Tensor,
    hidden: Tensor | None,
    kernel_size: int,
    output_size: tuple[int, int],
    *,
    check_positions: bool = True,
    backend: str = "auto",
) -> Tensor:
    """AdaPool feedback (docs/feedback.md): ``z`` back to the positions the last forward selected.

    ``hidden`` is the signal that gated that forward (``None`` if it was ungated): then the
    result is ``unpool(z [hidden > 0], argmax) + unpool(z [hidden < 0], argmin)``, else
    ``unpool(z, argmax)``. Also the backward of :func:`ada_pool2d`.

    Args:
        z (Tensor): `(N, C, Ho, Wo)`.
        argmax, argmin (Tensor): uint8 window positions from :func:`ada_pool2d`, in
            ``[0, k * k)``.
        hidden (Optional[Tensor]): `(N, C, Ho, Wo)`, or ``None``.
        kernel_size (int): k of the forward.
        output_size ((int, int)): (H, W) of the forward's input; ``H // k == Ho``.
        check_positions (bool): check, in eager mode, that the positions are in ``[0, k * k)``
            (the kernels would drop others silently): one reduction over each. ``False`` for
            positions that :func:`ada_pool2d` returned. Default: ``True``.
        backend (str): as :func:`ada_pool2d`.

    Returns:
        Tensor `(N, C, H, W)`: zero except at the selected positions.
    """
    k, height, width = _check_ada_unpool2d(
        z, argmax, argmin, hidden, kernel_size, output_size, check_positions
    )
    impl = _backend.resolve("ada_unpool2d", backend, z.device, z.dtype, _KERNELS)
    if impl == "reference":
        return reference.ada_unpool2d(z, argmax, argmin, hidden, k, (height, width))
    return _compiled(_ops.pools, impl).ada_unpool2d(z, hidden, argmax, argmin, k, height, width)


def _check_ada_unpool2d(
    z: Tensor,
    argmax: Tensor,
    argmin: Tensor,
    hidden: Tensor | None,
    kernel_size: object,
    output_size: object,
    check_values: object,
) -> tuple[int, int, int]:
    check_tensor("z", z, ndim=4)
    k = check_kernel_size(kernel_size)
    if not isinstance(output_size, tuple | list) or len(output_size) != 2:
        raise TypeError(f"output_size must be a pair of ints (H, W), got {output_size!r}")
    height, width = (check_int("output_size", v, minimum=1) for v in output_size)
    if height // k != z.shape[2] or width // k != z.shape[3]:
        raise ValueError(
            f"z of shape {tuple(z.shape)} is not the {k}x{k} pooling of a {height}x{width} plane"
        )
    pooled = tuple(z.shape)
    check_window_positions("argmax", argmax, pooled, z.device)
    check_window_positions("argmin", argmin, pooled, z.device)
    if hidden is not None:
        check_like("hidden", hidden, "z", z)
    # A data-dependent check, so eager only.
    check_values = check_bool("check_positions", check_values)
    if check_values and not torch.compiler.is_compiling() and z.device.type != "meta":
        for name, pos in (("argmax", argmax), ("argmin", argmin))[: 1 if hidden is None else 2]:
            if pos.numel() and int(pos.max()) >= k * k:
                raise ValueError(
                    f"{name} must hold window positions row * k + col in [0, {k * k}), "
                    f"got {int(pos.max())}"
                )
    return k, height, width


# --- Stage fusions -------------------------------------------------------------------------------
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
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A CNN-F stage that ends in a pool: :func:`ins_bias_ada_relu` then :func:`ada_pool2d`
    (gated by ``pool_hidden``).

    On the CPU one kernel: each gated plane is pooled from a cache-resident scratch plane, so
    the full-resolution activation is never written (8 bytes per float32 element saved, the
    write and the pool's read). Other backends run the two ops.

    Args:
        x, bias, hidden, eta, eps, centered: as :func:`ins_bias_ada_relu`.
        pool_hidden (Optional[Tensor]), kernel_size (int): the ``hidden`` and ``kernel_size``
            of :func:`ada_pool2d`.
        backend (str): as :func:`ins_norm`. Default: ``"auto"``.

    Returns:
        ``(y, mask, argmax, argmin)``: the pooled output, the gate's mask (full resolution) and
        the pool's window positions, as the two ops return them.
    """
    eta, eps, centered = _check_ins_bias_ada_relu(x, bias, hidden, eta, eps, centered)
    k = _check_ada_pool2d(x, pool_hidden, kernel_size, "pool_hidden")
    impl = _backend.resolve("ins_bias_ada_relu_pool2d", backend, x.device, x.dtype, _KERNELS)
    if impl == "reference":
        return reference.ins_bias_ada_relu_pool2d(
            x, bias, hidden, pool_hidden, eta, k, eps=eps, centered=centered
        )
    if impl == "cpu":
        y, mask, _, argmax, argmin = _loaded(_ops.stages.CPP).ins_bias_ada_relu_pool2d(
            x, bias, hidden, pool_hidden, eta, eps, centered, k
        )
        return y, mask, argmax, argmin
    u, mask, _ = _compiled(_ops.norms, impl).ins_bias_ada_relu(x, bias, hidden, eta, eps, centered)
    y, argmax, argmin = _compiled(_ops.pools, impl).ada_pool2d(u, pool_hidden, k)
    return y, mask, argmax, argmin


def ada_unpool_gate(
    z: Tensor,
    argmax: Tensor,
    argmin: Tensor,
    hidden: Tensor | None,
    mask: Tensor,
    kernel_size: int,
    output_size: tuple[int, int],
    *,
    check_positions: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Top-down AdaPool then AdaReLU: ``u = ada_unpool2d(z, ...)`` (the gate's new hidden) and
    ``u * mask``. One pass on the CPU (the unpooled plane is gated while in cache); other
    backends run the two ops.

    Args:
        z, argmax, argmin, hidden, kernel_size, output_size, check_positions: as
            :func:`ada_unpool2d`.
        mask (Tensor): bool `(N, C, H, W)`, the gate's mask from its last forward.
        backend (str): as :func:`ada_pool2d`.

    Returns:
        ``(u, out)``, both `(N, C, H, W)`.
    """
    k, height, width = _check_ada_unpool2d(
        z, argmax, argmin, hidden, kernel_size, output_size, check_positions
    )
    check_mask(mask, "the unpooled output", (*z.shape[:2], height, width), z.device)
    impl = _backend.resolve("ada_unpool_gate", backend, z.device, z.dtype, _KERNELS)
    if impl == "reference":
        return reference.ada_unpool_gate(z, argmax, argmin, hidden, mask, k, (height, width))
    if impl == "cpu":
        return _loaded(_ops.stages.CPP).ada_unpool_gate(
            z, hidden, argmax, argmin, mask, k, height, width
        )
    u = _compiled(_ops.pools, impl).ada_unpool2d(z, hidden, argmax, argmin, k, height, width)
    return u, _compiled(_ops.gates, impl).ada_relu_feedback(u, mask)


# --- Feedback update -----------------------------------------------------------------------------
def feedback_update(ff: Tensor, rec: Tensor, eta: float, *, backend: str = "auto") -> Tensor:
    """The CNN-F step on the fed-back feature map: ``ff + eta (rec - ff)``.

    The compiled backends use ``torch.lerp`` (the same formula for ``eta < 0.5``): one pass
    over ``ff`` and ``rec`` (12 bytes per float32 element) instead of three elementwise
    kernels and two temporaries (32 bytes), on every device, with autograd.

    Args:
        ff (Tensor): the fed-back map.
        rec (Tensor): its reconstruction by the feedback pass, shaped like ``ff``.
        eta (float): the step (``res_param``).
        backend (str): ``"reference"`` runs the composition; anything else ``torch.lerp``.

    Returns:
        Tensor shaped and typed like ``ff``.
    """
    check_tensor("ff", ff, ndim=tuple(range(1, 9)))
    check_like("rec", rec, "ff", ff)
    eta = check_eta(eta)
    impl = _backend.resolve("feedback_update", backend, ff.device, ff.dtype, _KERNELS)
    if impl == "reference":
        return reference.feedback_update(ff, rec, eta)
    return torch.lerp(ff, rec, eta)
