"""CNN-F layers whose forward and feedback are fixed linear maps (docs/feedback.md): the tied
convolution and linear map (the feedback is the transposed op with the same weight), Flatten and
the global average pool. They keep no gate state, only the shape the feedback restores."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from screening_attn._validate import check_int, check_same_device_dtype, check_tensor
from screening_attn.feedback._checks import check_channels
from screening_attn.feedback.layers import FeedbackModule

__all__ = ["FeedbackConv2d", "FeedbackLinear", "Flatten", "GlobalAvgPool2d"]


# Half dtypes whose CPU convolutions and matrix products oneDNN runs natively (AVX-512 BF16 /
# FP16, AMX); elsewhere (AVX2) ATen's half convolutions run ~15x slower than float32 ones (this
# VM, 2026-12-04: 484 ms against 32 ms for CNNF's first convolution at batch 64). Read once, so
# torch.compile sees a constant.
_NATIVE_CPU_HALF = {
    torch.bfloat16: bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    torch.float16: bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()),
}


def _upcast(x: Tensor) -> bool:
    """Whether ``x``'s products run in float32: a float16/bfloat16 CPU tensor without native
    support. The result is rounded to ``x``'s dtype once, as the fused CNN-F kernels round
    theirs (SPEC §4)."""
    return x.device.type == "cpu" and not _NATIVE_CPU_HALF.get(x.dtype, True)


def _product(op: Callable[[Tensor, Tensor], Tensor], x: Tensor, weight: Tensor) -> Tensor:
    """``op(x, weight)``, in float32 and rounded once where ``_upcast(x)``."""
    if _upcast(x):
        return op(x.float(), weight.float()).to(x.dtype)
    return op(x, weight)


def _pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        first, second = (check_int(name, v, minimum=minimum) for v in value)
        return first, second
    v = check_int(name, value, minimum=minimum)
    return v, v


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
        check_channels(name, x, 1, channels, "channels")

    def forward(self, x: Tensor) -> Tensor:
        self._check("x", x, self.in_channels)
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
            raise ValueError(
                f"x must be at least the kernel size {self.kernel_size} in H and W after padding "
                f"{self.padding}, got shape {tuple(x.shape)}"
            )
        return _product(self._conv, x, self.weight)

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, stride=self.stride, padding=self.padding)

    def feedback(self, z: Tensor) -> Tensor:
        self._check("z", z, self.out_channels)
        return _product(self._conv_t, z, self.weight)

    def _conv_t(self, z: Tensor, weight: Tensor) -> Tensor:
        return F.conv_transpose2d(
            z, weight, stride=self.stride, padding=self.padding, output_padding=self.output_padding
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
        check_channels(name, x, -1, features, "features")

    def forward(self, x: Tensor) -> Tensor:
        self._check("x", x, self.in_features)
        return _product(F.linear, x, self.weight)

    def feedback(self, z: Tensor) -> Tensor:
        self._check("z", z, self.out_features)
        return _product(torch.matmul, z, self.weight)

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
        if self.size is None or self.channels is None:  # both are set by forward
            raise RuntimeError("GlobalAvgPool2d.feedback needs a forward pass first")
        check_tensor("z", z, ndim=2)
        check_channels("z", z, 1, self.channels, "channels (those of the last forward input)")
        return z[:, :, None, None].expand(-1, -1, *self.size)
