"""``FeedbackSequential``: a chain of CNN-F layers whose ``feedback`` runs the layers' feedbacks
in reverse order, fusing consecutive layers where :mod:`~screening_attn.feedback.fusion` can.

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

from collections import OrderedDict
from typing import cast

from torch import Tensor, nn

from screening_attn._validate import check_int
from screening_attn.feedback import fusion
from screening_attn.feedback.layers import AdaPool2d, AdaReLU, Bias, FeedbackModule, InsNorm

__all__ = ["FeedbackSequential"]


class FeedbackSequential(FeedbackModule, nn.Sequential):
    """A chain of feedback layers (an ``nn.Sequential``, also built from an ``OrderedDict``).

    Nested ``FeedbackSequential``s are flattened into one list of *units* (``units()``); other
    layers, e.g. a residual block with its own ``forward``/``feedback``, are single units.

    * ``forward(x, start=0)`` runs units ``start, start+1, ...``;
    * ``forward_capture(x, at)`` runs them all and also returns the input of unit ``at``;
    * ``feedback(z, stop=0)`` runs the feedbacks of the units from the last down to ``stop``:
      it reconstructs the input of unit ``stop``.
    """

    def __init__(self, *layers: FeedbackModule | OrderedDict[str, FeedbackModule]) -> None:
        # nn.Sequential's stub has one overload for modules and one for an OrderedDict; at
        # runtime it takes either, as here
        super().__init__(*layers)  # type: ignore[arg-type]
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
            layers = cast(dict[str, FeedbackModule], self._modules)  # as __init__ checked
            return FeedbackSequential(OrderedDict(list(layers.items())[idx]))
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
                and fusion.fuses_ins_bias_ada_relu_pool2d(*units[i : i + 4])
            ):
                # the predicate checked the layers' types (casts: mypy cannot narrow through it)
                ins, bias, relu, pool = units[i : i + 4]
                x = fusion.ins_bias_ada_relu_pool_layers(
                    cast(InsNorm, ins),
                    cast(Bias, bias),
                    cast(AdaReLU, relu),
                    cast(AdaPool2d, pool),
                    x,
                )
                i += 4
            elif (
                at not in (i + 1, i + 2)
                and i + 2 < len(units)
                and fusion.fuses_ins_bias_ada_relu(*units[i : i + 3])
            ):
                ins, bias, relu = units[i : i + 3]
                x = fusion.ins_bias_ada_relu_layers(
                    cast(InsNorm, ins), cast(Bias, bias), cast(AdaReLU, relu), x
                )
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
            if i - 1 >= stop and fusion.fuses_ins_norm_gate(units[i - 1], units[i]):
                z = fusion.ins_norm_gate_layers(
                    cast(InsNorm, units[i]), cast(AdaReLU, units[i - 1]), z
                )
                i -= 2
            elif i - 1 >= stop and fusion.fuses_ada_unpool_gate(units[i - 1], units[i]):
                z = fusion.ada_unpool_gate_layers(
                    cast(AdaReLU, units[i - 1]), cast(AdaPool2d, units[i]), z
                )
                i -= 2
            else:
                z = units[i].feedback(z)
                i -= 1
        return z
