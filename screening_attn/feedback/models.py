"""CNN-F networks (docs/feedback.md): recurrent generative feedback inference on a feedback CNN.

A ``FeedbackNetwork`` is a ``FeedbackSequential`` that knows which unit's input is the fed-back
feature map ``ff`` (``ff_unit``), the step ``res_param`` and the number of ``cycles``. ``CNNF`` and
``CNNFWideResNet`` are the paper's Fashion-MNIST and CIFAR networks built that way; build your own
the same way from the layers of :mod:`screening_attn.feedback`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from screening_attn import _backend
from screening_attn._validate import (
    check_finite_float,
    check_int,
    check_same_device_dtype,
    check_tensor,
)
from screening_attn.feedback import functional
from screening_attn.feedback.fusion import ins_bias_ada_relu_layers, ins_norm_gate_layers
from screening_attn.feedback.layers import AdaPool2d, AdaReLU, Bias, FeedbackModule, InsNorm
from screening_attn.feedback.linear_maps import (
    FeedbackConv2d,
    FeedbackLinear,
    Flatten,
    GlobalAvgPool2d,
)
from screening_attn.feedback.sequential import FeedbackSequential

__all__ = ["CNNF", "CNNFWideResNet", "FeedbackNetwork", "WideBasicBlock", "feedback_step"]


def feedback_step(model: FeedbackNetwork, out: Tensor, ff: Tensor) -> tuple[Tensor, Tensor]:
    """One CNN-F cycle: ``rec = model.feedback(out)``; ``ff = ff + eta (rec - ff)``;
    ``out = model.forward(ff, start=model.ff_unit)``, gated by the stored feedback.

    The unit the fused kernels and the benchmarks target: with compiled backends the norm /
    bias / gate layers run fused (see :mod:`~screening_attn.feedback.fusion`), the pools run
    their kernels and the update is one ``torch.lerp``; convolutions and linear maps are torch's.

    Args:
        model (FeedbackNetwork): after a forward pass (its gates set).
        out (Tensor): the logits of the last forward pass, `(N, classes)`.
        ff (Tensor): the fed-back feature map of the last cycle (the input of unit
            ``model.ff_unit``).

    Returns:
        ``(out, ff)``: the new logits and the updated feature map.
    """
    if not isinstance(model, FeedbackNetwork):
        raise TypeError(f"model must be a FeedbackNetwork, got {type(model).__name__}")
    check_tensor("out", out, ndim=tuple(range(1, 9)))
    check_tensor("ff", ff, ndim=tuple(range(1, 9)))
    check_same_device_dtype("out", out, ff=ff)
    if model._out_shape is None:
        raise RuntimeError("feedback_step needs a forward pass of the model first (no gates set)")
    if tuple(out.shape) != model._out_shape:
        raise ValueError(
            f"out must have the shape of the model's last output {model._out_shape}, "
            f"got {tuple(out.shape)}"
        )
    rec = model.feedback(out)
    if ff.shape != rec.shape:
        raise ValueError(
            f"ff must have the shape of the map fed back at unit {model.ff_unit}, "
            f"{tuple(rec.shape)}, got {tuple(ff.shape)}"
        )
    ff = functional.feedback_update(ff, rec, model.res_param, backend=model.backend)
    return model.forward(ff, start=model.ff_unit), ff


class FeedbackNetwork(FeedbackSequential):
    """A ``FeedbackSequential`` that runs CNN-F inference (docs/feedback.md).

    Args:
        *layers: feedback layers, or one ``OrderedDict`` of them, input first.
        ff_unit (int): index in ``units()`` of the unit whose input is the fed-back map ``ff``
            (0 = the input image). Default: ``0``.
        cycles (int): feedback cycles of ``run_cycles``/``run_average``. Default: ``2``.
        res_param (float): the step ``eta`` of ``ff <- ff + eta (rec - ff)``. Default: ``0.1``.
        backend (str): where that update runs (``"reference"``: the plain formula, else
            ``torch.lerp``); ``set_backend`` sets it with the layers'. Default: ``"auto"``.

    ``forward(x)`` is one bottom-up pass from the input (gated by whatever feedback is stored),
    ``feedback(z)`` reconstructs ``ff`` (it stops at ``ff_unit``), ``reset()`` clears the gates.
    """

    def __init__(
        self,
        *layers: FeedbackModule | OrderedDict[str, FeedbackModule],
        ff_unit: int = 0,
        cycles: int = 2,
        res_param: float = 0.1,
        backend: str = "auto",
    ) -> None:
        super().__init__(*layers)
        self.ff_unit = self._index("ff_unit", ff_unit, self.units())
        self.cycles = check_int("cycles", cycles, minimum=0)
        self.res_param = check_finite_float("res_param", res_param)
        self.backend = _backend.check_backend(backend)
        self._clear_state()

    def _check_input(self, x: Tensor) -> None:
        """Checks of the network's input (unit 0) beyond the first layer's own."""

    def _clear_state(self) -> None:
        self._out_shape: tuple[int, ...] | None = None  # of the last output, for feedback_step

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        if start == 0:
            self._check_input(x)
        out = super().forward(x, start)
        self._out_shape = tuple(out.shape)
        return out

    def forward_capture(self, x: Tensor, at: int) -> tuple[Tensor, Tensor]:
        self._check_input(x)
        out, captured = super().forward_capture(x, at)
        self._out_shape = tuple(out.shape)
        return out, captured

    def feedback(self, z: Tensor, stop: int | None = None) -> Tensor:
        return super().feedback(z, self.ff_unit if stop is None else stop)

    def _first_pass(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.reset()
        return self.forward_capture(x, self.ff_unit)

    def run_cycles(self, x: Tensor) -> Tensor:
        """Logits `(N, classes)` after ``cycles`` feedback cycles (differentiable). ``N = 0``
        gives `(0, classes)`; nothing mixes across the batch, so a NaN in one input reaches
        only its own logits."""
        out, ff = self._first_pass(x)
        for _ in range(self.cycles):
            out, ff = feedback_step(self, out, ff)
        return out

    def run_average(self, x: Tensor) -> Tensor:
        """Mean of the logits of the first pass and of every cycle, `(N, classes)`."""
        out, ff = self._first_pass(x)
        logits = [out]
        for _ in range(self.cycles):
            out, ff = feedback_step(self, out, ff)
            logits.append(out)
        return torch.stack(logits).mean(dim=0)


def _stage(
    i: int, cin: int, cout: int, res_param: float, backend: str
) -> list[tuple[str, FeedbackModule]]:
    """conv (3x3, pad 1) -> ins -> bias -> AdaReLU, named as the paper's code (the last three
    run as one fused op, see :mod:`~screening_attn.feedback.fusion`)."""
    return [
        (f"conv{i}", FeedbackConv2d(cin, cout, 3, padding=1)),
        (f"ins{i}", InsNorm(backend=backend)),
        (f"ins{i}_bias", Bias(cout)),
        (f"relu{i}", AdaReLU(res_param, backend=backend)),
    ]


def _top_down_norm(i: int, backend: str) -> tuple[str, FeedbackModule]:
    """Where the paper's feedback normalizes the signal entering stage ``i``'s gates."""
    return f"ins{i}_fb", InsNorm(bottom_up=False, top_down=True, backend=backend)


class CNNF(FeedbackNetwork):
    """The paper's Fashion-MNIST CNN-F (docs/feedback.md), input `(N, 1, 28, 28)`.

    Bottom-up ``conv1(1→16) ins bias relu1 | conv2(16→32) ... relu2 | conv3(32→32) ... relu3
    pool3 | conv4(32→64) ... relu4 pool4 | flatten | fc1(3136→1000) bias relu5 | fc2(1000→128)
    bias relu6 | fc3(128→classes) bias``; top-down the same layers transposed, in reverse, with an
    instance norm of the top-down signal at the top of each conv stage (``ins{i}_fb``).

    Args:
        num_classes (int): number of logits.
        ind (int): 0, 1 or 2: ``ff`` is the input of ``conv{ind+1}`` (0 = the image).
            Default: ``0``.
        cycles (int): feedback cycles. Default: ``2``.
        res_param (float): the step eta of AdaReLU and of the ``ff`` update. Default: ``0.1``.
        backend (str): where the norms, gates, pools and the update run (docs/backends.md).
            Default: ``"auto"``.

    Example::

        model = CNNF(10, ind=0, cycles=2)
        logits = model.run_average(torch.randn(8, 1, 28, 28))  # (8, 10)
    """

    def __init__(
        self,
        num_classes: int,
        ind: int = 0,
        cycles: int = 2,
        res_param: float = 0.1,
        *,
        backend: str = "auto",
    ) -> None:
        num_classes = check_int("num_classes", num_classes, minimum=1)
        ind = check_int("ind", ind, minimum=0)
        if ind > 2:
            raise ValueError(f"ind must be 0, 1 or 2, got {ind}")
        eta = check_finite_float("res_param", res_param)
        layers = [
            *_stage(1, 1, 16, eta, backend),
            _top_down_norm(1, backend),
            *_stage(2, 16, 32, eta, backend),
            _top_down_norm(2, backend),
            *_stage(3, 32, 32, eta, backend),
            ("pool3", AdaPool2d(2, backend=backend)),
            _top_down_norm(3, backend),
            *_stage(4, 32, 64, eta, backend),
            ("pool4", AdaPool2d(2, backend=backend)),
            _top_down_norm(4, backend),
            ("flatten", Flatten()),
            ("fc1", FeedbackLinear(3136, 1000)),
            ("fc1_bias", Bias(1000)),
            ("relu5", AdaReLU(eta, backend=backend)),
            ("fc2", FeedbackLinear(1000, 128)),
            ("fc2_bias", Bias(128)),
            ("relu6", AdaReLU(eta, backend=backend)),
            ("fc3", FeedbackLinear(128, num_classes)),
            ("fc3_bias", Bias(num_classes)),
        ]
        ff_unit = [name for name, _ in layers].index(f"conv{ind + 1}")
        super().__init__(
            OrderedDict(layers), ff_unit=ff_unit, cycles=cycles, res_param=eta, backend=backend
        )
        self.ind = ind

    def _check_input(self, x: Tensor) -> None:
        check_tensor("x", x, ndim=4)
        # two 2x2 pools must leave the 7 x 7 map that fc1 (3136 = 64 * 7 * 7) takes
        if x.shape[1] != 1 or x.shape[2] // 4 != 7 or x.shape[3] // 4 != 7:
            raise ValueError(
                f"x must be images of shape (N, 1, 28, 28) (H, W in 28..31), got {tuple(x.shape)}"
            )


class WideBasicBlock(FeedbackModule):
    """The paper's pre-activation wide-ResNet block with feedback.

    Bottom-up: ``a = relu1(bias(ins1(x)))``; ``h = conv2(relu2(bias(ins2(conv1(a)))))``
    (``conv1`` carries the stride); output ``x + h``, or ``conv_shortcut(a) + h`` (1x1, strided)
    when the channel count changes.
    Top-down from ``z``: ``g = ins1(conv1ᵀ(relu2ᵀ(ins2(conv2ᵀ z))))``; output
    ``z + relu1ᵀ(g)``, or ``relu1ᵀ(conv_shortcutᵀ z + g)`` with a shortcut conv.
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        stride: int,
        res_param: float = 0.1,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.ins1 = InsNorm(top_down=True, backend=backend)
        self.ins1_bias = Bias(in_planes)
        self.relu1 = AdaReLU(res_param, backend=backend)
        self.conv1 = FeedbackConv2d(in_planes, out_planes, 3, stride, 1)
        self.ins2 = InsNorm(top_down=True, backend=backend)
        self.ins2_bias = Bias(out_planes)
        self.relu2 = AdaReLU(res_param, backend=backend)
        self.conv2 = FeedbackConv2d(out_planes, out_planes, 3, 1, 1)
        self.conv_shortcut = (
            None if in_planes == out_planes else FeedbackConv2d(in_planes, out_planes, 1, stride)
        )

    def forward(self, x: Tensor) -> Tensor:
        a = ins_bias_ada_relu_layers(self.ins1, self.ins1_bias, self.relu1, x)
        h = ins_bias_ada_relu_layers(self.ins2, self.ins2_bias, self.relu2, self.conv1(a))
        h = self.conv2(h)
        return (x if self.conv_shortcut is None else self.conv_shortcut(a)) + h

    def feedback(self, z: Tensor) -> Tensor:
        # the biases' feedback is the identity
        g = ins_norm_gate_layers(self.ins2, self.relu2, self.conv2.feedback(z))
        g = self.conv1.feedback(g)
        if self.conv_shortcut is None:
            return z + ins_norm_gate_layers(self.ins1, self.relu1, g)
        return self.relu1.feedback(self.conv_shortcut.feedback(z) + self.ins1.feedback(g))


class CNNFWideResNet(FeedbackNetwork):
    """The paper's CIFAR CNN-F on a pre-activation Wide ResNet, input `(N, 3, 32, 32)`.

    ``conv1(3→16) | block1 | block2 (stride 2) | block3 (stride 2) | ins bias relu | global
    average pool | fc(64·widen→classes) bias``; each group holds ``(depth-4)/6``
    :class:`WideBasicBlock`s of widths ``16·widen``, ``32·widen``, ``64·widen``. Top-down: ``fcᵀ``,
    copy to every position of the last map, instance norm, ``reluᵀ``, the blocks' feedbacks in
    reverse and ``conv1ᵀ`` (when ``ind = 0``).

    Args:
        depth (int): 6 n + 4 with n >= 1 blocks per group (10, 16, 22, 28, 34, 40, ...).
        num_classes (int): number of logits.
        widen_factor (int): width multiplier. Default: ``1``.
        ind (int): in ``[0, n]``; 0: ``ff`` is the image; ``k >= 1``: ``ff`` is the output of the
            ``k``-th block of ``block1`` (as the paper's code). Default: ``0``.
        cycles (int), res_param (float), backend (str): as :class:`CNNF`.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        widen_factor: int = 1,
        ind: int = 0,
        cycles: int = 2,
        res_param: float = 0.1,
        *,
        backend: str = "auto",
    ) -> None:
        depth = check_int("depth", depth, minimum=10)
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6 n + 4 with n >= 1 (10, 16, 22, ...), got {depth}")
        n = (depth - 4) // 6
        num_classes = check_int("num_classes", num_classes, minimum=1)
        widen_factor = check_int("widen_factor", widen_factor, minimum=1)
        ind = check_int("ind", ind, minimum=0)
        if ind > n:
            raise ValueError(f"ind must be in [0, {n}] for depth {depth}, got {ind}")
        eta = check_finite_float("res_param", res_param)
        width = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]

        def group(cin: int, cout: int, stride: int) -> FeedbackSequential:
            return FeedbackSequential(
                *(
                    WideBasicBlock(
                        cin if i == 0 else cout, cout, stride if i == 0 else 1, eta, backend=backend
                    )
                    for i in range(n)
                )
            )

        layers = OrderedDict(
            conv1=FeedbackConv2d(3, width[0], 3, padding=1),
            block1=group(width[0], width[1], 1),
            block2=group(width[1], width[2], 2),
            block3=group(width[2], width[3], 2),
            ins1=InsNorm(backend=backend),
            ins1_bias=Bias(width[3]),
            relu=AdaReLU(eta, backend=backend),
            ins1_fb=InsNorm(bottom_up=False, top_down=True, backend=backend),
            pool=GlobalAvgPool2d(),
            fc=FeedbackLinear(width[3], num_classes),
            fc_bias=Bias(num_classes),
        )
        # units(): conv1, block1[0], ..., block1[n-1], block2[0], ...; ind = k >= 1 feeds back
        # the output of block1[k-1], the input of unit k + 1.
        super().__init__(
            layers,
            ff_unit=0 if ind == 0 else ind + 1,
            cycles=cycles,
            res_param=eta,
            backend=backend,
        )
        self.ind = ind

    def _check_input(self, x: Tensor) -> None:
        check_tensor("x", x, ndim=4)
        # the feedback of the two stride-2 stages maps even sizes back exactly
        if x.shape[1] != 3 or x.shape[2] % 4 or x.shape[3] % 4 or min(x.shape[2:]) == 0:
            raise ValueError(
                f"x must be images of shape (N, 3, H, W) with H and W positive multiples of 4 "
                f"(e.g. 32 x 32), got {tuple(x.shape)}"
            )
