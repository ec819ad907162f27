"""CNN-F layers (SPEC §3): each has a bottom-up ``forward`` and a top-down ``feedback``.

The gating layers (``AdaReLU``, ``AdaPool2d``) keep state between the two passes: ``forward``
remembers its gates for the next ``feedback``, ``feedback`` stores its input as the ``hidden``
signal that gates the next ``forward``. ``reset()`` forgets it. Put the layers in a
``FeedbackSequential`` to get the feedback version of your own CNN: its ``feedback`` runs the
layers' feedbacks in reverse order.

Fused kernels: where a ``FeedbackSequential`` holds ``InsNorm, Bias, AdaReLU`` in a row, its
``forward`` runs the three as one op (:func:`~screening_attn.feedback.functional.
ins_bias_ada_relu`, one pass over the activation), with a following ``AdaPool2d`` too
(``ins_bias_ada_relu_pool2d``); where it holds ``AdaReLU`` followed by an
``InsNorm(top_down=True)`` or by an ``AdaPool2d``, its ``feedback`` runs the two feedbacks as
one op (``ins_norm_gate``, ``ada_unpool_gate``). The layers keep their own parameters and state
(so ``state_dict`` names do not change) and their checks; fusion needs the fused layers on one
backend, other than ``"reference"``, which always runs the plain composition. (Forward hooks of
the individual fused layers do not fire.)

Example::

    net = FeedbackSequential(
        FeedbackConv2d(1, 8, 3, padding=1), InsNorm(), Bias(8), AdaReLU(), AdaPool2d(2),
        InsNorm(bottom_up=False, top_down=True),  # normalizes the top-down signal only
        Flatten(), FeedbackLinear(8 * 14 * 14, 10), Bias(10),
    )
    logits = net(torch.randn(4, 1, 28, 28))
    image_rec = net.feedback(logits)  # (4, 1, 28, 28), through the gates set above
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from screening_attn import _backend
from screening_attn._validate import (
    StateDictChecks,
    check_bool,
    check_finite_float,
    check_int,
    check_same_device_dtype,
    check_tensor,
)
from screening_attn.feedback import functional

__all__ = [
    "AdaPool2d",
    "AdaReLU",
    "Bias",
    "FeedbackConv2d",
    "FeedbackLinear",
    "FeedbackModule",
    "FeedbackSequential",
    "Flatten",
    "GlobalAvgPool2d",
    "InsNorm",
    "ada_unpool_gate_layers",
    "ins_bias_ada_relu_layers",
    "ins_bias_ada_relu_pool_layers",
    "ins_norm",
    "ins_norm_gate_layers",
]


def _pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        first, second = (check_int(name, v, minimum=minimum) for v in value)
        return first, second
    v = check_int(name, value, minimum=minimum)
    return v, v


def _check_channels(name: str, x: Tensor, dim: int, expected: int, what: str) -> None:
    if x.shape[dim] != expected:
        raise ValueError(
            f"{name} must have {expected} {what} (dim {dim}), got shape {tuple(x.shape)}"
        )


def _check_eps(eps: object) -> float:
    value = check_finite_float("eps", eps)
    if value < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    return value


def ins_norm(
    x: Tensor, eps: float = 1e-8, centered: bool = False, *, backend: str = "auto"
) -> Tensor:
    """CNN-F's instance norm (SPEC §3): ``x / sqrt(mean_{H,W}(x^2) + eps)`` per (n, c).

    Args:
        x (Tensor): `(N, C, H, W)`, floating point.
        eps (float): added under the square root, >= 0. Default: ``1e-8``.
        centered (bool): use the unbiased variance (as ``torch.var``) instead of the mean square;
            only the denominator changes, ``x`` is not centered. Default: ``False``.
        backend (str): where it runs (SPEC §4). Default: ``"auto"``.

    Returns:
        Tensor shaped and typed like ``x``.

    Example::

        >>> y = ins_norm(torch.randn(2, 3, 8, 8))
        >>> power = y.square().mean(dim=(2, 3))  # 1 for every (n, c), up to eps
        >>> torch.allclose(power, torch.ones(2, 3), atol=1e-4)
        True
    """
    return functional._ins_norm("x", x, eps, centered, backend)


class FeedbackModule(StateDictChecks, nn.Module):
    """Base of the CNN-F layers: ``forward(x)`` bottom-up, ``feedback(z)`` top-down."""

    def feedback(self, z: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no feedback pass")

    def reset(self) -> None:
        """Forget the gate state of this module and of every submodule."""
        for module in self.modules():
            if isinstance(module, FeedbackModule):
                module._clear_state()

    def set_backend(self, backend: str) -> None:
        """Set ``backend`` on every submodule that dispatches to compiled kernels."""
        backend = _backend.check_backend(backend)
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend

    def _clear_state(self) -> None:
        """Stateless layers have nothing to forget."""


class InsNorm(FeedbackModule):
    """Instance norm without centering or affine (SPEC §3 ``ins_norm``), for ``(N, C, H, W)``.

    CNN-F also normalizes the *top-down* signal, at other places than the bottom-up one, so
    each direction is switched separately; a disabled direction is the identity.

    Args:
        eps (float): added under the square root. Default: ``1e-8``.
        centered (bool): unbiased variance instead of the mean square. Default: ``False``.
        bottom_up (bool): normalize in ``forward``. Default: ``True``.
        top_down (bool): normalize in ``feedback``. Default: ``False``.
        backend (str): where it runs (SPEC §4). Default: ``"auto"``.
    """

    def __init__(
        self,
        eps: float = 1e-8,
        centered: bool = False,
        *,
        bottom_up: bool = True,
        top_down: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.eps = _check_eps(eps)
        self.centered = check_bool("centered", centered)
        self.bottom_up = check_bool("bottom_up", bottom_up)
        self.top_down = check_bool("top_down", top_down)
        self.backend = _backend.check_backend(backend)

    def forward(self, x: Tensor) -> Tensor:
        if not self.bottom_up:
            return x
        return functional._ins_norm("x", x, self.eps, self.centered, self.backend)

    def feedback(self, z: Tensor) -> Tensor:
        if not self.top_down:
            return z
        return functional._ins_norm("z", z, self.eps, self.centered, self.backend)

    def extra_repr(self) -> str:
        return (
            f"eps={self.eps}, centered={self.centered}, bottom_up={self.bottom_up}, "
            f"top_down={self.top_down}, backend={self.backend!r}"
        )


class Bias(FeedbackModule):
    """Learned per-channel bias (dim 1 of ``(N, C, *)``), zero-initialized; feedback is the
    identity."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.num_channels = check_int("num_channels", num_channels, minimum=1)
        self.bias = nn.Parameter(torch.zeros(self.num_channels))

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x, ndim=tuple(range(2, 9)))
        check_same_device_dtype("bias", self.bias, x=x)
        _check_channels("x", x, 1, self.num_channels, "channels")
        return x + self.bias.view(-1, *([1] * (x.dim() - 2)))

    def feedback(self, z: Tensor) -> Tensor:
        return z

    def extra_repr(self) -> str:
        return str(self.num_channels)


class AdaReLU(FeedbackModule):
    """AdaReLU with residual parameter ``res_param`` (SPEC §3).

    ``forward`` runs :func:`screening_attn.feedback.functional.ada_relu` on ``backend`` with the
    ``hidden`` signal stored by the last ``feedback`` (a plain ReLU before the first one) and
    remembers the gate mask; ``feedback(z)`` stores ``hidden = z`` and returns ``z * mask``
    (:func:`~screening_attn.feedback.functional.ada_relu_feedback`, same backend).

    Args:
        res_param (float): the step ``eta`` toward ``hidden``. Default: ``0.1``.
        backend (str): where the gate runs (SPEC §4). Default: ``"auto"``.
    """

    def __init__(self, res_param: float = 0.1, *, backend: str = "auto") -> None:
        super().__init__()
        self.res_param = check_finite_float("res_param", res_param)
        self.backend = _backend.check_backend(backend)
        self.hidden: Tensor | None = None
        self.mask: Tensor | None = None

    def _check_forward(self, x: Tensor) -> None:
        if self.hidden is not None and self.hidden.shape != x.shape:
            raise ValueError(
                f"x has shape {tuple(x.shape)} but the stored feedback signal has shape "
                f"{tuple(self.hidden.shape)}; call reset() before a new input"
            )

    def _check_feedback(self, z: Tensor) -> None:
        if self.mask is None:
            raise RuntimeError("AdaReLU.feedback needs a forward pass first (no gates stored)")
        check_tensor("z", z, ndim=self.mask.dim())
        if z.shape != self.mask.shape:
            raise ValueError(
                f"z must have the shape of the last forward input {tuple(self.mask.shape)}, "
                f"got {tuple(z.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_forward(x)
        y, self.mask = functional.ada_relu(x, self.hidden, self.res_param, backend=self.backend)
        return y

    def feedback(self, z: Tensor) -> Tensor:
        self._check_feedback(z)
        self.hidden = z
        return functional.ada_relu_feedback(z, self.mask, backend=self.backend)

    def _clear_state(self) -> None:
        self.hidden = None
        self.mask = None

    def extra_repr(self) -> str:
        return f"res_param={self.res_param}, backend={self.backend!r}"


class AdaPool2d(FeedbackModule):
    """AdaPool (SPEC §3): k x k windows, stride k, for ``(N, C, H, W)``.

    Before any feedback ``forward`` max-pools; with a stored ``hidden`` it takes the max where
    ``hidden > 0``, the min where ``hidden < 0`` and 0 where it is 0. ``feedback(z)`` stores
    ``hidden = z`` and unpools ``z`` to the positions the last ``forward`` selected. Ties pick
    the first element of the window in row-major order, for max and for min.

    The state between the passes is compact: the uint8 window positions of the max and the min
    (1 byte each per output) and a reference to the ``hidden`` that gated the forward (its signs
    are the masks). ``argmax``, ``argmin``, ``pos_mask`` and ``neg_mask`` give them in the
    reference's form (int64 plane indices as ``max_pool2d``'s, bool masks).

    Args:
        kernel_size (int): k in [1, 16].
        backend (str): where it runs (SPEC §4). Default: ``"auto"``.
    """

    def __init__(self, kernel_size: int, *, backend: str = "auto") -> None:
        super().__init__()
        self.kernel_size = functional._check_kernel_size(kernel_size)
        self.backend = _backend.check_backend(backend)
        self._clear_state()

    def _check_forward(self, x: Tensor) -> None:
        check_tensor("x", x, ndim=4)
        k = self.kernel_size
        if x.shape[2] < k or x.shape[3] < k:
            raise ValueError(
                f"x must be at least {k}x{k} (kernel_size) in H and W, got shape {tuple(x.shape)}"
            )
        if self.hidden is not None:
            pooled = (*x.shape[:2], x.shape[2] // k, x.shape[3] // k)
            if self.hidden.shape != pooled:
                raise ValueError(
                    f"x pools to shape {pooled} but the stored feedback signal has shape "
                    f"{tuple(self.hidden.shape)}; call reset() before a new input"
                )

    def _store(self, x: Tensor, argmax: Tensor, argmin: Tensor) -> None:
        """The state a forward leaves for the next feedback."""
        # The gate is read for its signs only: detached, so a later feedback pass does not
        # reach back into the graph of the cycle that produced it.
        gate = None if self.hidden is None else self.hidden.detach()
        self._argmax, self._argmin, self._gate = argmax, argmin, gate
        self.input_size = (x.shape[2], x.shape[3])

    def _check_feedback(self, z: Tensor) -> None:
        if self._argmax is None:
            raise RuntimeError("AdaPool2d.feedback needs a forward pass first (no gates stored)")
        check_tensor("z", z, ndim=4)
        if z.shape != self._argmax.shape:
            raise ValueError(
                f"z must have the shape of the last forward output {tuple(self._argmax.shape)}, "
                f"got {tuple(z.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_forward(x)
        y, argmax, argmin = functional.ada_pool2d(
            x, self.hidden, self.kernel_size, backend=self.backend
        )
        self._store(x, argmax, argmin)
        return y

    def feedback(self, z: Tensor) -> Tensor:
        self._check_feedback(z)
        self.hidden = z
        return functional._ada_unpool2d(
            z,
            self._argmax,
            self._argmin,
            self._gate,
            self.kernel_size,
            self.input_size,
            self.backend,
            False,  # the positions are this layer's own forward's
        )

    def _plane_indices(self, positions: Tensor | None) -> Tensor | None:
        if positions is None:
            return None
        return functional._plane_indices(positions, self.kernel_size, self.input_size[1])

    @property
    def argmax(self) -> Tensor | None:
        """int64 flat indices into each input plane of the last forward's maxima."""
        return self._plane_indices(self._argmax)

    @property
    def argmin(self) -> Tensor | None:
        """As ``argmax`` for the minima; ``None`` unless the last forward was gated."""
        return None if self._gate is None else self._plane_indices(self._argmin)

    @property
    def pos_mask(self) -> Tensor | None:
        """``hidden > 0`` of the last forward (``None`` if it was not gated)."""
        return None if self._gate is None else self._gate > 0

    @property
    def neg_mask(self) -> Tensor | None:
        return None if self._gate is None else self._gate < 0

    def _clear_state(self) -> None:
        self.hidden: Tensor | None = None
        self._gate: Tensor | None = None
        self._argmax: Tensor | None = None
        self._argmin: Tensor | None = None
        self.input_size: tuple[int, int] | None = None

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, backend={self.backend!r}"


class FeedbackConv2d(FeedbackModule):
    """2-D convolution without bias whose feedback is the transposed convolution with the same
    weight: one parameter, so its gradient is the sum of both uses.

    Args:
        in_channels, out_channels (int): as ``nn.Conv2d``.
        kernel_size, stride, padding (int or (int, int)): as ``nn.Conv2d``. Defaults: ``1``, ``0``.
        output_padding (int or (int, int), optional): of the feedback's ``conv_transpose2d``;
            ``None`` means 1 when the stride is > 1 and 0 otherwise (so stride 2 maps even sizes
            back exactly). Default: ``None``.

    The weight ``(out_channels, in_channels, kH, kW)`` starts from He init,
    ``N(0, 2 / (kH kW out_channels))``, as the paper's code.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        *,
        output_padding: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, minimum=1)
        self.out_channels = check_int("out_channels", out_channels, minimum=1)
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        if output_padding is None:
            self.output_padding = tuple(int(s > 1) for s in self.stride)
        else:
            self.output_padding = _pair("output_padding", output_padding, 0)
            for op, s in zip(self.output_padding, self.stride):
                if op >= s:
                    raise ValueError(
                        f"output_padding must be smaller than stride {self.stride}, "
                        f"got {self.output_padding}"
                    )
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.in_channels, kh, kw))
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (kh * kw * self.out_channels)))

    def _check(self, name: str, x: Tensor, channels: int) -> None:
        check_tensor(name, x, ndim=4)
        check_same_device_dtype("weight", self.weight, **{name: x})
        _check_channels(name, x, 1, channels, "channels")

    def forward(self, x: Tensor) -> Tensor:
        self._check("x", x, self.in_channels)
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
            raise ValueError(
                f"x must be at least the kernel size {self.kernel_size} in H and W after padding "
                f"{self.padding}, got shape {tuple(x.shape)}"
            )
        return F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)

    def feedback(self, z: Tensor) -> Tensor:
        self._check("z", z, self.out_channels)
        return F.conv_transpose2d(
            z,
            self.weight,
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, output_padding={self.output_padding}"
        )


class FeedbackLinear(FeedbackModule):
    """Linear map without bias, ``x W^T``, whose feedback is ``z W`` with the same weight
    ``(out_features, in_features)`` (one parameter; initialized as ``nn.Linear``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.out_features = check_int("out_features", out_features, minimum=1)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def _check(self, name: str, x: Tensor, features: int) -> None:
        check_tensor(name, x, ndim=tuple(range(1, 9)))
        check_same_device_dtype("weight", self.weight, **{name: x})
        _check_channels(name, x, -1, features, "features")

    def forward(self, x: Tensor) -> Tensor:
        self._check("x", x, self.in_features)
        return F.linear(x, self.weight)

    def feedback(self, z: Tensor) -> Tensor:
        self._check("z", z, self.out_features)
        return z @ self.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Flatten(FeedbackModule):
    """``(N, *) -> (N, prod(*))``; feedback restores the shape of the last forward input."""

    def __init__(self) -> None:
        super().__init__()
        self._clear_state()

    def _clear_state(self) -> None:
        self.shape: tuple[int, ...] | None = None

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x, ndim=tuple(range(2, 9)), floating=False)
        self.shape = tuple(x.shape[1:])
        return x.flatten(1)

    def feedback(self, z: Tensor) -> Tensor:
        if self.shape is None:
            raise RuntimeError("Flatten.feedback needs a forward pass first (shape unknown)")
        check_tensor("z", z, ndim=2, floating=False)
        if z.shape[1] != math.prod(self.shape):
            raise ValueError(
                f"z must have {math.prod(self.shape)} features to unflatten to {self.shape}, "
                f"got shape {tuple(z.shape)}"
            )
        return z.reshape(z.shape[0], *self.shape)


class GlobalAvgPool2d(FeedbackModule):
    """``(N, C, H, W) -> (N, C)``, the mean over H and W; feedback copies each value back to all
    H x W positions (nearest upsampling, as the paper's code does after its ``avg_pool2d(8)``;
    not the exact adjoint, which would also divide by H W — the next top-down ``InsNorm``
    removes the scale)."""

    def __init__(self) -> None:
        super().__init__()
        self._clear_state()

    def _clear_state(self) -> None:
        self.size: tuple[int, int] | None = None
        self.channels: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x, ndim=4)
        self.size, self.channels = (x.shape[2], x.shape[3]), x.shape[1]
        return x.mean(dim=(2, 3))

    def feedback(self, z: Tensor) -> Tensor:
        if self.size is None:
            raise RuntimeError("GlobalAvgPool2d.feedback needs a forward pass first")
        check_tensor("z", z, ndim=2)
        _check_channels("z", z, 1, self.channels, "channels (those of the last forward input)")
        return z[:, :, None, None].expand(-1, -1, *self.size)


def _same_kernel_backend(*layers: nn.Module) -> bool:
    """Layers run fused only on one backend, and not the reference (which is, by definition,
    the plain composition)."""
    backends = {getattr(layer, "backend", None) for layer in layers}
    return len(backends) == 1 and backends.pop() not in (None, "reference")


def _fuses_forward(ins: nn.Module, bias: nn.Module, relu: nn.Module) -> bool:
    return (
        isinstance(ins, InsNorm)
        and ins.bottom_up
        and isinstance(bias, Bias)
        and isinstance(relu, AdaReLU)
        and _same_kernel_backend(ins, relu)
    )


def _fuses_forward_pool(ins: nn.Module, bias: nn.Module, relu: nn.Module, pool: nn.Module) -> bool:
    return (
        _fuses_forward(ins, bias, relu)
        and isinstance(pool, AdaPool2d)
        and _same_kernel_backend(relu, pool)
    )


def _fuses_feedback(relu: nn.Module, ins: nn.Module) -> bool:
    """``relu`` followed by ``ins`` bottom-up: top-down, ``ins.feedback`` then ``relu.feedback``."""
    return (
        isinstance(relu, AdaReLU)
        and isinstance(ins, InsNorm)
        and ins.top_down
        and _same_kernel_backend(ins, relu)
    )


def _fuses_unpool_gate(relu: nn.Module, pool: nn.Module) -> bool:
    """``relu`` followed by ``pool``: top-down, ``pool.feedback`` then ``relu.feedback``."""
    return (
        isinstance(relu, AdaReLU)
        and isinstance(pool, AdaPool2d)
        and _same_kernel_backend(relu, pool)
    )


def ins_bias_ada_relu_pool_layers(
    ins: InsNorm, bias: Bias, relu: AdaReLU, pool: AdaPool2d, x: Tensor
) -> Tensor:
    """``pool(relu(bias(ins(x))))``, as one op where the layers allow it (on the CPU one kernel
    that never writes the full-resolution activation); the gate and the pool keep their state."""
    if not _fuses_forward_pool(ins, bias, relu, pool):
        return pool(ins_bias_ada_relu_layers(ins, bias, relu, x))
    check_tensor("x", x, ndim=4)
    _check_channels("x", x, 1, bias.num_channels, "channels")
    relu._check_forward(x)
    pool._check_forward(x)
    y, relu.mask, argmax, argmin = functional.ins_bias_ada_relu_pool2d(
        x,
        bias.bias,
        relu.hidden,
        pool.hidden,
        relu.res_param,
        pool.kernel_size,
        eps=ins.eps,
        centered=ins.centered,
        backend=relu.backend,
    )
    pool._store(x, argmax, argmin)
    return y


def ada_unpool_gate_layers(relu: AdaReLU, pool: AdaPool2d, z: Tensor) -> Tensor:
    """``relu.feedback(pool.feedback(z))``, as one op where the layers allow it."""
    if not _fuses_unpool_gate(relu, pool):
        return relu.feedback(pool.feedback(z))
    pool._check_feedback(z)
    if relu.mask is None or relu.mask.shape[2:] != pool.input_size:
        return relu.feedback(pool.feedback(z))  # not the pool's input: let the layers complain
    pool.hidden = z
    relu.hidden, out = functional._ada_unpool_gate(
        z,
        pool._argmax,
        pool._argmin,
        pool._gate,
        relu.mask,
        pool.kernel_size,
        pool.input_size,
        relu.backend,
        False,  # the positions are the pool's own forward's
    )
    return out


def ins_bias_ada_relu_layers(ins: InsNorm, bias: Bias, relu: AdaReLU, x: Tensor) -> Tensor:
    """``relu(bias(ins(x)))``, as one fused op when the layers allow it (see the module doc),
    with the layers' parameters and state: the gate's mask is stored in ``relu``."""
    if not _fuses_forward(ins, bias, relu):
        return relu(bias(ins(x)))
    check_tensor("x", x, ndim=4)
    _check_channels("x", x, 1, bias.num_channels, "channels")
    relu._check_forward(x)
    y, relu.mask = functional.ins_bias_ada_relu(
        x,
        bias.bias,
        relu.hidden,
        relu.res_param,
        eps=ins.eps,
        centered=ins.centered,
        backend=relu.backend,
    )
    return y


def ins_norm_gate_layers(ins: InsNorm, relu: AdaReLU, z: Tensor) -> Tensor:
    """``relu.feedback(ins.feedback(z))``, as one fused op when the layers allow it: the
    normalized ``z`` becomes ``relu``'s hidden, the gated one is returned."""
    if not _fuses_feedback(relu, ins):
        return relu.feedback(ins.feedback(z))
    relu._check_feedback(z)
    relu.hidden, out = functional.ins_norm_gate(
        z, relu.mask, eps=ins.eps, centered=ins.centered, backend=relu.backend
    )
    return out


class FeedbackSequential(FeedbackModule, nn.Sequential):
    """A chain of feedback layers (an ``nn.Sequential``, also built from an ``OrderedDict``).

    Nested ``FeedbackSequential``s are flattened into one list of *units* (``units()``); other
    layers, e.g. a residual block with its own ``forward``/``feedback``, are single units.

    * ``forward(x, start=0)`` runs units ``start, start+1, ...``;
    * ``forward_capture(x, at)`` runs them all and also returns the input of unit ``at``;
    * ``feedback(z, stop=0)`` runs the feedbacks of the units from the last down to ``stop``:
      it reconstructs the input of unit ``stop``.
    """

    def __init__(self, *layers: nn.Module | OrderedDict[str, nn.Module]) -> None:
        super().__init__(*layers)
        self.units()  # every layer must be a FeedbackModule

    def units(self) -> list[FeedbackModule]:
        out: list[FeedbackModule] = []
        for name, layer in self._modules.items():
            if isinstance(layer, FeedbackSequential):
                out.extend(layer.units())
            elif isinstance(layer, FeedbackModule):
                out.append(layer)
            else:
                raise TypeError(
                    f"layer {name!r} of a FeedbackSequential must be a FeedbackModule, "
                    f"got {type(layer).__name__}"
                )
        return out

    def _index(self, name: str, value: object, units: list[FeedbackModule]) -> int:
        i = check_int(name, value, minimum=0)
        if i > len(units):
            raise ValueError(f"{name} must be an int in [0, {len(units)}], got {i}")
        return i

    def __getitem__(self, idx: int | slice) -> nn.Module:
        if isinstance(idx, slice):
            return FeedbackSequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    @staticmethod
    def _run(units: list[FeedbackModule], x: Tensor, start: int, at: int) -> tuple[Tensor, Tensor]:
        """Units ``start, start+1, ...`` on ``x``; also returns the input of unit ``at``.
        ``InsNorm, Bias, AdaReLU`` in a row run fused, unless ``at`` falls inside them."""
        captured = x
        i = start
        while i < len(units):
            if i == at:
                captured = x
            if (
                at not in (i + 1, i + 2, i + 3)
                and i + 3 < len(units)
                and _fuses_forward_pool(*units[i : i + 4])
            ):
                x = ins_bias_ada_relu_pool_layers(*units[i : i + 4], x)
                i += 4
            elif (
                at not in (i + 1, i + 2)
                and i + 2 < len(units)
                and _fuses_forward(*units[i : i + 3])
            ):
                x = ins_bias_ada_relu_layers(*units[i : i + 3], x)
                i += 3
            else:
                x = units[i](x)
                i += 1
        return x, x if at == len(units) else captured

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        units = self.units()
        return self._run(units, x, self._index("start", start, units), -1)[0]

    def forward_capture(self, x: Tensor, at: int) -> tuple[Tensor, Tensor]:
        units = self.units()
        return self._run(units, x, 0, self._index("at", at, units))  # at == len: the output

    def feedback(self, z: Tensor, stop: int = 0) -> Tensor:
        units = self.units()
        stop = self._index("stop", stop, units)
        i = len(units) - 1
        while i >= stop:
            if i - 1 >= stop and _fuses_feedback(units[i - 1], units[i]):
                z = ins_norm_gate_layers(units[i], units[i - 1], z)
                i -= 2
            elif i - 1 >= stop and _fuses_unpool_gate(units[i - 1], units[i]):
                z = ada_unpool_gate_layers(units[i - 1], units[i], z)
                i -= 2
            else:
                z = units[i].feedback(z)
                i -= 1
        return z
