"""Load checkpoints (and gradients) of the paper's code (GitHub ``yjhuangcd/CNNF``) into
:class:`~screening_attn.feedback.CNNF` / :class:`~screening_attn.feedback.CNNFWideResNet`."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from screening_attn._validate import check_bool

__all__ = ["convert_paper_state_dict"]

# Module paths of the paper's CNNF and WideResNet, by layer kind.
_CONV = r"conv\d+|block[1-3]\.layer\.\d+\.(?:conv1|conv2|conv_shortcut)"
_LINEAR = r"fc\d*"
_BIAS = r"(?:ins\d+|fc\d*)_bias|block[1-3]\.layer\.\d+\.ins[12]_bias"
_KEY = re.compile(
    rf"(?P<conv>{_CONV})\.(?P<conv_part>conv|conv_t)\.weight"
    rf"|(?P<linear>{_LINEAR})\.(?:(?P<linear_part>linear|linear_t)\.)?weight"
    rf"|(?P<bias>{_BIAS})\.bias"
)


def _target(module: str) -> str:
    """The paper's ``block2.layer.0.conv1`` is this package's ``block2.0.conv1``."""
    return re.sub(r"^(block[1-3])\.layer\.", r"\1.", module)


def _equal(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _one_of(target: str, entries: list[tuple[str, Tensor]]) -> Tensor:
    """Entries that are one tensor in the paper's model: they must agree; keep one."""
    (key, value), *rest = entries
    for other_key, other in rest:
        if not _equal(value, other):
            raise ValueError(
                f"{other_key} must equal {key} (they are one tied weight, {target} here), "
                f"but they differ (shapes {tuple(other.shape)} and {tuple(value.shape)})"
            )
    return value


def convert_paper_state_dict(
    state_dict: Mapping[str, Tensor | None], *, gradients: bool = False
) -> dict[str, Tensor | None]:
    """Map a ``state_dict`` saved by the paper's code to this package's names.

    Handles both of the paper's networks (``CNNF`` and ``WideResNet``)::

        conv1.conv.weight                      -> conv1.weight     (conv_t.weight: the same tensor)
        fc1.linear.weight, fc1.weight          -> fc1.weight       (linear_t.weight: its transpose)
        ins1_bias.bias (1, C, 1, 1), fc1_bias.bias (1, F) -> ins1_bias.bias (C,), fc1_bias.bias (F,)
        block2.layer.0.conv_shortcut.conv.weight -> block2.0.conv_shortcut.weight

    The paper keeps each weight under several keys: its ``Conv2d`` holds one parameter as
    ``conv.weight`` and ``conv_t.weight``; its ``Linear`` holds ``W`` as ``linear.weight`` and
    ``weight`` and a second parameter ``linear_t.weight`` that it resets to ``W^T`` before each
    feedback pass. Here every weight is one tied parameter, so the copies are checked and dropped.

    Args:
        state_dict (Mapping[str, Tensor]): the paper model's ``state_dict()``, or with
            ``gradients=True`` a dict of its gradients (e.g. ``{n: p.grad for n, p in
            paper_model.named_parameters()}``; ``None`` entries count as zero).
        gradients (bool): the values are gradients. The paper's ``conv_t`` is the same
            parameter as ``conv``, so its gradient already holds both uses and is counted once;
            ``linear_t`` is a parameter of its own whose gradient is the feedback use, so its
            transpose is *added* to the ``W`` gradient: the result is the gradient of this
            package's tied weight (the sum of both uses). Default: ``False``.

    Returns:
        dict: for ``model.load_state_dict`` (values may share storage with the input).

    Raises:
        TypeError: ``state_dict`` is not a mapping of str to tensors.
        ValueError: unknown keys (listed); copies of one weight that differ (in a state dict
            ``linear_t.weight`` must equal ``linear.weight`` transposed); a bias not shaped
            ``(1, C, 1, 1)`` or ``(1, C)``.

    Example::

        model = CNNF(10, ind=2)
        model.load_state_dict(convert_paper_state_dict(torch.load("cnnf-best.pt")))
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of str to Tensor, got {type(state_dict)}")
    gradients = check_bool("gradients", gradients)
    groups: dict[str, tuple[str, dict[str, tuple[str, Tensor]]]] = {}
    unknown = []
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {key!r}")
        if not isinstance(value, Tensor) and not (gradients and value is None):
            raise TypeError(f"state_dict[{key!r}] must be a Tensor, got {type(value).__name__}")
        match = _KEY.fullmatch(key)
        if match is None:
            unknown.append(key)
            continue
        kind = next(k for k in ("conv", "linear", "bias") if match[k] is not None)
        part = match[f"{kind}_part"] if kind != "bias" else "bias"
        target = f"{_target(match[kind])}.{'bias' if kind == 'bias' else 'weight'}"
        _, parts = groups.setdefault(target, (kind, {}))
        if value is not None:
            parts[part or "alias"] = (key, value)
    if unknown:
        raise ValueError(
            f"state_dict has keys that the paper's CNNF and WideResNet do not: {unknown}"
        )

    out: dict[str, Tensor | None] = {}
    for target, (kind, parts) in groups.items():
        if not parts:  # only None gradients
            out[target] = None
        elif kind == "bias":
            key, value = parts["bias"]
            if value.dim() not in (2, 4) or value.numel() != value.shape[1]:
                raise ValueError(
                    f"{key} must have shape (1, C, 1, 1) or (1, C), got {tuple(value.shape)}"
                )
            out[target] = value.reshape(-1)
        elif kind == "conv":
            out[target] = _one_of(target, [parts[p] for p in ("conv", "conv_t") if p in parts])
        else:
            direct = [parts[p] for p in ("linear", "alias") if p in parts]
            weight = _one_of(target, direct) if direct else None
            transposed = None
            if "linear_t" in parts:
                key, value = parts["linear_t"]
                if value.dim() != 2:
                    raise ValueError(f"{key} must be 2-d, got shape {tuple(value.shape)}")
                transposed = (f"{key} transposed", value.t())
            if transposed is None:
                out[target] = weight
            elif weight is None:
                out[target] = transposed[1]
            elif gradients:
                if transposed[1].shape != weight.shape:
                    raise ValueError(
                        f"{transposed[0]} must have the shape of {direct[0][0]} "
                        f"{tuple(weight.shape)}, got {tuple(transposed[1].shape)}"
                    )
                out[target] = weight + transposed[1]
            else:
                hint = " (pass gradients=True for a dict of gradients)"
                try:
                    out[target] = _one_of(target, [direct[0], transposed])
                except ValueError as exc:
                    raise ValueError(str(exc) + hint) from None
    return out
