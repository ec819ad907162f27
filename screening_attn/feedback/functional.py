"""Public functional CNN-F ops, dispatching to a backend (SPEC §4)."""

from __future__ import annotations

import torch
from torch import Tensor

from screening_attn import _backend
from screening_attn._validate import (
    check_bool,
    check_finite_float,
    check_int,
    check_same_device_dtype,
    check_tensor,
)
from screening_attn.feedback import _ops, reference

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
    "cpu": _backend.CPU_DTYPES,
    "cuda": _backend.CUDA_DTYPES,
    "triton": _backend.TRITON_DTYPES,
}
_MAX_KERNEL_SIZE = 16  # window positions are stored in a uint8


def _check_like(name: str, t: Tensor, like_name: str, like: Tensor) -> None:
    check_tensor(name, t, ndim=like.dim())
    check_same_device_dtype(like_name, like, **{name: t})
    if t.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}"
        )


def _check_mask(mask: Tensor, like_name: str, like: Tensor) -> None:
    _check_mask_shape(mask, like_name, tuple(like.shape), like.device)


def _check_mask_shape(mask: Tensor, what: str, shape: tuple[int, ...], device) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor, got {got}")
    if tuple(mask.shape) != shape or mask.device != device:
        raise ValueError(
            f"mask must have the shape and device of {what} "
            f"({shape}, {device}), got ({tuple(mask.shape)}, {mask.device})"
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
    eta = _check_eta(eta)
    impl = _backend.resolve("ada_relu", backend, x.device, x.dtype, _KERNELS)
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
    impl = _backend.resolve("ada_relu_feedback", backend, z.device, z.dtype, _KERNELS)
    return _run_ada_relu_feedback(impl, z, mask)


def _run_ada_relu_feedback(impl: str, z: Tensor, mask: Tensor) -> Tensor:
    if impl == "reference":
        return reference.gate(z, mask)
    if impl == "triton":
        return _ops.ada_relu_feedback_triton(z, mask)
    return _ops.ada_relu_feedback_cpp(z, mask)


# --- Instance norm family ------------------------------------------------------------------------
def _check_eps(eps: object) -> float:
    value = check_finite_float("eps", eps)
    if value < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    return value


def _check_eta(eta: object) -> float:
    return check_finite_float("eta", eta)


def _check_plane(name: str, x: Tensor, centered: bool) -> None:
    check_tensor(name, x, ndim=4)
    if centered and x.shape[2] * x.shape[3] < 2:
        raise ValueError(
            f"{name} needs at least 2 elements in H x W for centered=True (unbiased variance), "
            f"got shape {tuple(x.shape)}"
        )


def _norm_ops(impl: str) -> _ops.NormOps:
    return _ops.norm_triton if impl == "triton" else _ops.norm_cpp


def ins_norm(
    x: Tensor, eps: float = 1e-8, centered: bool = False, *, backend: str = "auto"
) -> Tensor:
    """CNN-F's instance norm (SPEC §3): ``x / sqrt(mean_{H,W}(x^2) + eps)`` per (n, c).

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
    return _ins_norm("x", x, eps, centered, backend)


def _ins_norm(name: str, x: Tensor, eps: float, centered: bool, backend: str) -> Tensor:
    """:func:`ins_norm` whose errors call the tensor ``name``."""
    eps, centered = _check_eps(eps), check_bool("centered", centered)
    _check_plane(name, x, centered)
    impl = _backend.resolve("ins_norm", backend, x.device, x.dtype, _KERNELS)
    if impl == "reference":
        return reference.ins_norm(x, eps, centered)
    return _norm_ops(impl).ins_norm(x, eps, centered)[0]


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
    return _run_ins_bias_ada_relu(impl, x, bias, hidden, eta, eps, centered)


def _check_ins_bias_ada_relu(
    x: Tensor,
    bias: Tensor | None,
    hidden: Tensor | None,
    eta: object,
    eps: object,
    centered: object,
) -> tuple[float, float, bool]:
    eps, centered, eta = _check_eps(eps), check_bool("centered", centered), _check_eta(eta)
    _check_plane("x", x, centered)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same_device_dtype("x", x, bias=bias)
        if bias.shape[0] != x.shape[1]:
            raise ValueError(
                f"bias must have shape (C,) = ({x.shape[1]},), got {tuple(bias.shape)}"
            )
    if hidden is not None:
        _check_like("hidden", hidden, "x", x)
    return eta, eps, centered


def _run_ins_bias_ada_relu(
    impl: str,
    x: Tensor,
    bias: Tensor | None,
    hidden: Tensor | None,
    eta: float,
    eps: float,
    centered: bool,
) -> tuple[Tensor, Tensor]:
    if impl == "reference":
        u = reference.ins_norm(x, eps, centered)
        if bias is not None:
            u = u + bias.view(1, -1, 1, 1)
        return reference.ada_relu(u, hidden, eta)
    y, mask, _ = _norm_ops(impl).ins_bias_ada_relu(x, bias, hidden, eta, eps, centered)
    return y, mask


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
    eps, centered = _check_eps(eps), check_bool("centered", centered)
    _check_plane("z", z, centered)
    _check_mask(mask, "z", z)
    impl = _backend.resolve("ins_norm_gate", backend, z.device, z.dtype, _KERNELS)
    if impl == "reference":
        zn = reference.ins_norm(z, eps, centered)
        return zn, reference.gate(zn, mask)
    zn, out, _ = _norm_ops(impl).ins_norm_gate(z, mask, eps, centered)
    return zn, out


# --- AdaPool -------------------------------------------------------------------------------------
def _check_kernel_size(kernel_size: object) -> int:
    k = check_int("kernel_size", kernel_size, minimum=1)
    if k > _MAX_KERNEL_SIZE:
        raise ValueError(f"kernel_size must be an int in [1, {_MAX_KERNEL_SIZE}], got {k}")
    return k


def _check_positions(name: str, pos: object, pooled: tuple[int, ...], device) -> None:
    if not isinstance(pos, Tensor) or pos.dtype != torch.uint8:
        got = pos.dtype if isinstance(pos, Tensor) else type(pos).__name__
        raise TypeError(f"{name} must be a uint8 tensor (window positions), got {got}")
    if tuple(pos.shape) != pooled or pos.device != device:
        raise ValueError(
            f"{name} must have the pooled shape {pooled} on {device}, "
            f"got {tuple(pos.shape)} on {pos.device}"
        )


def _window_positions(flat: Tensor, k: int, width: int) -> Tensor:
    """Flat plane indices (``max_pool2d``'s) -> uint8 positions ``row * k + col`` in the window."""
    row = torch.div(flat, width, rounding_mode="floor")
    return ((row % k) * k + flat % width % k).to(torch.uint8)


def _plane_indices(pos: Tensor, k: int, width: int) -> Tensor:
    return reference._plane_index(pos.long(), k, width)


def ada_pool2d(
    x: Tensor, hidden: Tensor | None = None, kernel_size: int = 2, *, backend: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """AdaPool forward (SPEC §3): k x k windows, stride k (floor mode).

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
    return _run_ada_pool2d(impl, x, hidden, k)


def _check_ada_pool2d(
    x: Tensor, hidden: Tensor | None, kernel_size: object, hidden_name: str
) -> int:
    check_tensor("x", x, ndim=4)
    k = _check_kernel_size(kernel_size)
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


def _run_ada_pool2d(
    impl: str, x: Tensor, hidden: Tensor | None, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    if impl == "reference":
        y, argmax, argmin, _, _ = reference.ada_pool2d(x, hidden, k)
        if argmin is None:
            argmin = reference.min_pool2d(x, k)[1]
        width = x.shape[3]
        return y, _window_positions(argmax, k, width), _window_positions(argmin, k, width)
    ops = _ops.pool_triton if impl == "triton" else _ops.pool_cpp
    return ops.ada_pool2d(x, hidden, k)


def ada_unpool2d(
    z: Tensor,
    argmax: Tensor,
    argmin: Tensor,
    hidden: Tensor | None,
    kernel_size: int,
    output_size: tuple[int, int],
    *,
    backend: str = "auto",
) -> Tensor:
    """AdaPool feedback (SPEC §3): ``z`` back to the positions the last forward selected.

    ``hidden`` is the signal that gated that forward (``None`` if it was ungated): then the
    result is ``unpool(z [hidden > 0], argmax) + unpool(z [hidden < 0], argmin)``, else
    ``unpool(z, argmax)``. Also the backward of :func:`ada_pool2d`.

    Args:
        z (Tensor): `(N, C, Ho, Wo)`.
        argmax, argmin (Tensor): uint8 window positions from :func:`ada_pool2d`, in
            ``[0, k * k)`` (checked in eager mode: the kernels would drop others silently).
        hidden (Optional[Tensor]): `(N, C, Ho, Wo)`, or ``None``.
        kernel_size (int): k of the forward.
        output_size ((int, int)): (H, W) of the forward's input; ``H // k == Ho``.
        backend (str): as :func:`ada_pool2d`.

    Returns:
        Tensor `(N, C, H, W)`: zero except at the selected positions.
    """
    return _ada_unpool2d(z, argmax, argmin, hidden, kernel_size, output_size, backend, True)


def _ada_unpool2d(z, argmax, argmin, hidden, kernel_size, output_size, backend, check_values):
    """``ada_unpool2d``; the layers pass the positions their own forward computed and skip the
    (data-dependent, one reduction each) check of their values."""
    k, height, width = _check_ada_unpool2d(
        z, argmax, argmin, hidden, kernel_size, output_size, check_values
    )
    impl = _backend.resolve("ada_unpool2d", backend, z.device, z.dtype, _KERNELS)
    return _run_ada_unpool2d(impl, z, argmax, argmin, hidden, k, height, width)


def _check_ada_unpool2d(
    z: Tensor,
    argmax: Tensor,
    argmin: Tensor,
    hidden: Tensor | None,
    kernel_size: object,
    output_size: object,
    check_values: bool = True,
) -> tuple[int, int, int]:
    check_tensor("z", z, ndim=4)
    k = _check_kernel_size(kernel_size)
    if not isinstance(output_size, tuple | list) or len(output_size) != 2:
        raise TypeError(f"output_size must be a pair of ints (H, W), got {output_size!r}")
    height, width = (check_int("output_size", v, minimum=1) for v in output_size)
    if height // k != z.shape[2] or width // k != z.shape[3]:
        raise ValueError(
            f"z of shape {tuple(z.shape)} is not the {k}x{k} pooling of a {height}x{width} plane"
        )
    pooled = tuple(z.shape)
    _check_positions("argmax", argmax, pooled, z.device)
    _check_positions("argmin", argmin, pooled, z.device)
    if hidden is not None:
        _check_like("hidden", hidden, "z", z)
    # Out-of-window positions would be dropped silently by the kernels. A data-dependent check,
    # so eager only, and skipped for the layers (they pass what their own forward computed).
    if check_values and not torch.compiler.is_compiling() and z.device.type != "meta":
        for name, pos in (("argmax", argmax), ("argmin", argmin))[: 1 if hidden is None else 2]:
            if pos.numel() and int(pos.max()) >= k * k:
                raise ValueError(
                    f"{name} must hold window positions row * k + col in [0, {k * k}), "
                    f"got {int(pos.max())}"
                )
    return k, height, width


def _run_ada_unpool2d(
    impl: str,
    z: Tensor,
    argmax: Tensor,
    argmin: Tensor,
    hidden: Tensor | None,
    k: int,
    height: int,
    width: int,
) -> Tensor:
    if impl == "reference":
        imax, imin = _plane_indices(argmax, k, width), _plane_indices(argmin, k, width)
        pos = None if hidden is None else hidden > 0
        neg = None if hidden is None else hidden < 0
        return reference.ada_unpool2d(z, imax, imin, pos, neg, (height, width))
    ops = _ops.pool_triton if impl == "triton" else _ops.pool_cpp
    return ops.ada_unpool2d(z, hidden, argmax, argmin, k, height, width)


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

    Returns:
        ``(y, mask, argmax, argmin)``: the pooled output, the gate's mask (full resolution) and
        the pool's window positions, as the two ops return them.
    """
    eta, eps, centered = _check_ins_bias_ada_relu(x, bias, hidden, eta, eps, centered)
    k = _check_ada_pool2d(x, pool_hidden, kernel_size, "pool_hidden")
    impl = _backend.resolve("ins_bias_ada_relu_pool2d", backend, x.device, x.dtype, _KERNELS)
    if impl != "cpu":
        u, mask = _run_ins_bias_ada_relu(impl, x, bias, hidden, eta, eps, centered)
        y, argmax, argmin = _run_ada_pool2d(impl, u, pool_hidden, k)
        return y, mask, argmax, argmin
    y, mask, _, argmax, argmin = _ops.ins_bias_ada_relu_pool2d_cpp(
        x, bias, hidden, pool_hidden, eta, eps, centered, k
    )
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
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Top-down AdaPool then AdaReLU: ``u = ada_unpool2d(z, ...)`` (the gate's new hidden) and
    ``u * mask``. One pass on the CPU (the unpooled plane is gated while in cache); other
    backends run the two ops.

    Returns:
        ``(u, out)``, both `(N, C, H, W)`.
    """
    return _ada_unpool_gate(
        z, argmax, argmin, hidden, mask, kernel_size, output_size, backend, True
    )


def _ada_unpool_gate(
    z, argmax, argmin, hidden, mask, kernel_size, output_size, backend, check_values
) -> tuple[Tensor, Tensor]:
    """``ada_unpool_gate``; ``check_values`` as in ``_ada_unpool2d``."""
    k, height, width = _check_ada_unpool2d(
        z, argmax, argmin, hidden, kernel_size, output_size, check_values
    )
    _check_mask_shape(mask, "the unpooled output", (*z.shape[:2], height, width), z.device)
    impl = _backend.resolve("ada_unpool_gate", backend, z.device, z.dtype, _KERNELS)
    if impl != "cpu":
        u = _run_ada_unpool2d(impl, z, argmax, argmin, hidden, k, height, width)
        return u, _run_ada_relu_feedback(impl, u, mask)
    return _ops.ada_unpool_gate_cpp(z, hidden, argmax, argmin, mask, k, height, width)


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
    """
    check_tensor("ff", ff, ndim=tuple(range(1, 9)))
    _check_like("rec", rec, "ff", ff)
    eta = _check_eta(eta)
    impl = _backend.resolve("feedback_update", backend, ff.device, ff.dtype, _KERNELS)
    if impl == "reference":
        return reference.feedback_update(ff, rec, eta)
    return torch.lerp(ff, rec, eta)
