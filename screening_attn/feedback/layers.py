"""CNN-F layers (docs/feedback.md): each has a bottom-up ``forward`` and a top-down ``feedback``.
Here the base class and the layers of the CNN-F ops (InsNorm, Bias, AdaReLU, AdaPool2d); those
whose feedback is a fixed linear map (FeedbackConv2d, FeedbackLinear, Flatten, GlobalAvgPool2d)
are in :mod:`~screening_attn.feedback.linear_maps`.

The gating layers (``AdaReLU``, ``AdaPool2d``) keep state between the two passes: ``forward``
remembers its gates for the next ``feedback``, ``feedback`` stores its input as the ``hidden``
signal that gates the next ``forward``. ``reset()`` forgets it. Their public methods
(``hidden_for``, ``set_mask`` / ``remember``, ``mask_for`` / ``selection_for``, ``set_hidden``)
are the steps of ``forward`` and ``feedback``, so that a fused op
(:mod:`~screening_attn.feedback.fusion`) can run a layer's pass and leave the same state.

Put the layers in a :class:`~screening_attn.feedback.sequential.FeedbackSequential` to get the
feedback version of your own CNN: its ``feedback`` runs the layers' feedbacks in reverse order.
The layers validate only their own state (a stored signal that does not fit the input, a
feedback before any forward); the functional ops they call validate the arguments.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
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
from screening_attn.feedback._checks import check_channels, check_eps, check_kernel_size

__all__ = [
    "AdaPool2d",
    "AdaReLU",
    "Bias",
    "FeedbackModule",
    "InsNorm",
    "PoolSelection",
]


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
                # nn.Module.__setattr__'s stub takes only tensors and modules
                module.backend = backend  # type: ignore[assignment]

    def _clear_state(self) -> None:
        """Stateless layers have nothing to forget."""


class InsNorm(FeedbackModule):
    """Instance norm without centering or affine (:func:`~screening_attn.feedback.functional.
    ins_norm`), for ``(N, C, H, W)``.

    CNN-F also normalizes the *top-down* signal, at other places than the bottom-up one, so
    each direction is switched separately; a disabled direction is the identity.

    Args:
        eps (float): added under the square root. Default: ``1e-8``.
        centered (bool): unbiased variance instead of the mean square. Default: ``False``.
        bottom_up (bool): normalize in ``forward``. Default: ``True``.
        top_down (bool): normalize in ``feedback``. Default: ``False``.
        backend (str): where it runs (docs/backends.md). Default: ``"auto"``.
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
        self.eps = check_eps(eps)
        self.centered = check_bool("centered", centered)
        self.bottom_up = check_bool("bottom_up", bottom_up)
        self.top_down = check_bool("top_down", top_down)
        self.backend = _backend.check_backend(backend)

    def forward(self, x: Tensor) -> Tensor:
        if not self.bottom_up:
            return x
        return functional.ins_norm(x, self.eps, self.centered, backend=self.backend)

    def feedback(self, z: Tensor) -> Tensor:
        if not self.top_down:
            return z
        check_tensor("z", z, ndim=4)  # so that the error names z: the op calls its input x
        return functional.ins_norm(z, self.eps, self.centered, backend=self.backend)

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
        check_channels("x", x, 1, self.num_channels, "channels")
        return x + self.bias.view(-1, *([1] * (x.dim() - 2)))

    def feedback(self, z: Tensor) -> Tensor:
        return z

    def extra_repr(self) -> str:
        return str(self.num_channels)


class AdaReLU(FeedbackModule):
    """AdaReLU with residual parameter ``res_param`` (docs/feedback.md).

    ``forward`` runs :func:`~screening_attn.feedback.functional.ada_relu` on ``backend`` with
    the ``hidden`` signal stored by the last ``feedback`` (a plain ReLU before the first one) and
    remembers the gate ``mask``; ``feedback(z)`` returns ``z * mask``
    (:func:`~screening_attn.feedback.functional.ada_relu_feedback`, same backend) and stores
    ``hidden = z``.

    Args:
        res_param (float): the step ``eta`` toward ``hidden``. Default: ``0.1``.
        backend (str): where the gate runs (docs/backends.md). Default: ``"auto"``.
    """

    def __init__(self, res_param: float = 0.1, *, backend: str = "auto") -> None:
        super().__init__()
        self.res_param = check_finite_float("res_param", res_param)
        self.backend = _backend.check_backend(backend)
        self.hidden: Tensor | None = None
        self.mask: Tensor | None = None

    def hidden_for(self, x: Tensor) -> Tensor | None:
        """The stored feedback signal that gates a forward of ``x`` (``None`` before any
        feedback), after checking that it fits ``x``."""
        if self.hidden is not None and isinstance(x, Tensor) and self.hidden.shape != x.shape:
            raise ValueError(
                f"x has shape {tuple(x.shape)} but the stored feedback signal has shape "
                f"{tuple(self.hidden.shape)}; call reset() before a new input"
            )
        return self.hidden

    def set_mask(self, mask: Tensor) -> None:
        """Remember the gates of a forward of this layer, run here or in a fused op (the
        ``mask`` that :func:`~screening_attn.feedback.functional.ada_relu` returns), for the
        next ``feedback``."""
        self.mask = mask

    def mask_for(self, z: Tensor) -> Tensor:
        """The gates of the last forward, to apply to the feedback signal ``z``, after checking
        that there was a forward and that ``z`` has its input's shape."""
        if self.mask is None:
            raise RuntimeError("AdaReLU.feedback needs a forward pass first (no gates stored)")
        if isinstance(z, Tensor) and z.shape != self.mask.shape:
            raise ValueError(
                f"z must have the shape of the last forward input {tuple(self.mask.shape)}, "
                f"got {tuple(z.shape)}"
            )
        return self.mask

    def set_hidden(self, hidden: Tensor) -> None:
        """Store the feedback signal that gates the next forward (``feedback`` stores its input;
        a fused op the signal as it reaches this layer)."""
        self.hidden = hidden

    def forward(self, x: Tensor) -> Tensor:
        y, mask = functional.ada_relu(x, self.hidden_for(x), self.res_param, backend=self.backend)
        self.set_mask(mask)
        return y

    def feedback(self, z: Tensor) -> Tensor:
        out = functional.ada_relu_feedback(z, self.mask_for(z), backend=self.backend)
        self.set_hidden(z)
        return out

    def _clear_state(self) -> None:
        self.hidden = None
        self.mask = None

    def extra_repr(self) -> str:
        return f"res_param={self.res_param}, backend={self.backend!r}"


class PoolSelection(NamedTuple):
    """What an AdaPool forward selected, for its feedback: the arguments of
    :func:`~screening_attn.feedback.functional.ada_unpool2d` after ``z``."""

    argmax: Tensor  # uint8 window positions, the pooled shape
    argmin: Tensor
    hidden: Tensor | None  # the signal that gated the forward (detached), None if ungated
    kernel_size: int
    output_size: tuple[int, int]  # (H, W) of the forward's input


def _plane_indices(positions: Tensor, k: int, width: int) -> Tensor:
    """uint8 window positions ``row * k + col`` -> int64 flat indices into the input plane."""
    pos = positions.long()
    ho = torch.arange(pos.shape[2], device=pos.device).view(-1, 1)
    wo = torch.arange(pos.shape[3], device=pos.device).view(1, -1)
    return (ho * k + torch.div(pos, k, rounding_mode="floor")) * width + wo * k + pos % k


class AdaPool2d(FeedbackModule):
    """AdaPool (docs/feedback.md): k x k windows, stride k, for ``(N, C, H, W)``.

    Before any feedback ``forward`` max-pools; with a stored ``hidden`` it takes the max where
    ``hidden > 0``, the min where ``hidden < 0`` and 0 where it is 0. ``feedback(z)`` unpools
    ``z`` to the positions the last ``forward`` selected and stores ``hidden = z``. Ties pick
    the first element of the window in row-major order, for max and for min.

    The state between the passes is compact (a :class:`PoolSelection`): the uint8 window
    positions of the max and the min (1 byte each per output) and a reference to the ``hidden``
    that gated the forward (its signs are the masks). ``argmax``, ``argmin``, ``pos_mask`` and
    ``neg_mask`` give them in the reference's form (int64 plane indices as ``max_pool2d``'s,
    bool masks).

    Args:
        kernel_size (int): k in [1, 16].
        backend (str): where it runs (docs/backends.md). Default: ``"auto"``.
    """

    hidden: Tensor | None
    _selection: PoolSelection | None

    def __init__(self, kernel_size: int, *, backend: str = "auto") -> None:
        super().__init__()
        self.kernel_size = check_kernel_size(kernel_size)
        self.backend = _backend.check_backend(backend)
        self._clear_state()

    def hidden_for(self, x: Tensor) -> Tensor | None:
        """The stored feedback signal that gates a forward of ``x`` (``None`` before any
        feedback), after checking that it has the shape ``x`` pools to."""
        k, h = self.kernel_size, self.hidden
        # (x that is no 4-d tensor of at least k x k is the op's to name)
        if h is not None and isinstance(x, Tensor) and x.dim() == 4 and min(x.shape[2:]) >= k:
            pooled = (*x.shape[:2], x.shape[2] // k, x.shape[3] // k)
            if h.shape != pooled:
                raise ValueError(
                    f"x pools to shape {pooled} but the stored feedback signal has shape "
                    f"{tuple(h.shape)}; call reset() before a new input"
                )
        return h

    def remember(
        self,
        argmax: Tensor,
        argmin: Tensor,
        hidden: Tensor | None,
        output_size: tuple[int, int],
    ) -> None:
        """Record what a forward of this layer selected, run here or in a fused op, for the next
        ``feedback``.

        Args:
            argmax, argmin (Tensor): the uint8 window positions that
                :func:`~screening_attn.feedback.functional.ada_pool2d` returned.
            hidden (Optional[Tensor]): the signal that gated the forward (what
                :meth:`hidden_for` returned), or ``None``.
            output_size ((int, int)): (H, W) of the forward's input.
        """
        # The gate is read for its signs only: detached, so a later feedback pass does not
        # reach back into the graph of the cycle that produced it.
        gate = None if hidden is None else hidden.detach()
        self._selection = PoolSelection(argmax, argmin, gate, self.kernel_size, output_size)

    def selection_for(self, z: Tensor) -> PoolSelection:
        """What the last forward selected, to unpool the feedback signal ``z`` to, after
        checking that there was a forward and that ``z`` has its output's shape."""
        selection = self._selection
        if selection is None:
            raise RuntimeError("AdaPool2d.feedback needs a forward pass first (no gates stored)")
        if isinstance(z, Tensor) and z.shape != selection.argmax.shape:
            raise ValueError(
                f"z must have the shape of the last forward output "
                f"{tuple(selection.argmax.shape)}, got {tuple(z.shape)}"
            )
        return selection

    def set_hidden(self, hidden: Tensor) -> None:
        """Store the feedback signal that gates the next forward."""
        self.hidden = hidden

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.hidden_for(x)
        y, argmax, argmin = functional.ada_pool2d(x, hidden, self.kernel_size, backend=self.backend)
        self.remember(argmax, argmin, hidden, (x.shape[2], x.shape[3]))
        return y

    def feedback(self, z: Tensor) -> Tensor:
        # the positions are this layer's own forward's: no need to check their values
        out = functional.ada_unpool2d(
            z, *self.selection_for(z), check_positions=False, backend=self.backend
        )
        self.set_hidden(z)
        return out

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(H, W) of the last forward's input."""
        return None if self._selection is None else self._selection.output_size

    def _gated(self) -> PoolSelection | None:
        s = self._selection
        return None if s is None or s.hidden is None else s

    @property
    def argmax(self) -> Tensor | None:
        """int64 flat indices into each input plane of the last forward's maxima."""
        s = self._selection
        return None if s is None else _plane_indices(s.argmax, s.kernel_size, s.output_size[1])

    @property
    def argmin(self) -> Tensor | None:
        """As ``argmax`` for the minima; ``None`` unless the last forward was gated."""
        s = self._gated()
        return None if s is None else _plane_indices(s.argmin, s.kernel_size, s.output_size[1])

    @property
    def pos_mask(self) -> Tensor | None:
        """``hidden > 0`` of the last forward (``None`` if it was not gated)."""
        s = self._gated()
        return None if s is None or s.hidden is None else s.hidden > 0

    @property
    def neg_mask(self) -> Tensor | None:
        s = self._gated()
        return None if s is None or s.hidden is None else s.hidden < 0

    def _clear_state(self) -> None:
        self.hidden = None
        self._selection = None

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, backend={self.backend!r}"
