"""Fused runs of consecutive CNN-F layers: which layers fuse, and the ``*_layers`` functions that
run them as one functional op while leaving each layer the state its own pass would.

* bottom-up ``InsNorm, Bias, AdaReLU``: :func:`~screening_attn.feedback.functional.
  ins_bias_ada_relu` (one pass over the activation), with a following ``AdaPool2d``:
  ``ins_bias_ada_relu_pool2d``;
* top-down, ``AdaReLU`` followed (bottom-up) by an ``InsNorm(top_down=True)``: ``ins_norm_gate``;
  by an ``AdaPool2d``: ``ada_unpool_gate``.

The layers keep their own parameters and state (so ``state_dict`` names do not change); the
functions read their configuration and drive their state through public methods
(``hidden_for``, ``set_mask``, ``remember``, ``mask_for``, ``selection_for``, ``set_hidden``).
Fusion needs the fused layers on one backend, other than ``"reference"``, which always runs the
plain composition. (Forward hooks of the individual fused layers do not fire.)
"""

from __future__ import annotations

from torch import Tensor, nn

from screening_attn.feedback import functional
from screening_attn.feedback.layers import AdaPool2d, AdaReLU, Bias, InsNorm

__all__ = [
    "ada_unpool_gate_layers",
    "fuses_ada_unpool_gate",
    "fuses_ins_bias_ada_relu",
    "fuses_ins_bias_ada_relu_pool2d",
    "fuses_ins_norm_gate",
    "ins_bias_ada_relu_layers",
    "ins_bias_ada_relu_pool_layers",
    "ins_norm_gate_layers",
]


def _same_kernel_backend(*layers: nn.Module) -> bool:
    """Layers run fused only on one backend, and not the reference (which is, by definition,
    the plain composition)."""
    backends = {getattr(layer, "backend", None) for layer in layers}
    return len(backends) == 1 and backends.pop() not in (None, "reference")


def fuses_ins_bias_ada_relu(ins: nn.Module, bias: nn.Module, relu: nn.Module) -> bool:
    """``ins, bias, relu`` (bottom-up order) run as one ``ins_bias_ada_relu``."""
    return (
        isinstance(ins, InsNorm)
        and ins.bottom_up
        and isinstance(bias, Bias)
        and isinstance(relu, AdaReLU)
        and _same_kernel_backend(ins, relu)
    )


def fuses_ins_bias_ada_relu_pool2d(
    ins: nn.Module, bias: nn.Module, relu: nn.Module, pool: nn.Module
) -> bool:
    """``ins, bias, relu, pool`` run as one ``ins_bias_ada_relu_pool2d``."""
    return (
        fuses_ins_bias_ada_relu(ins, bias, relu)
        and isinstance(pool, AdaPool2d)
        and _same_kernel_backend(relu, pool)
    )


def fuses_ins_norm_gate(relu: nn.Module, ins: nn.Module) -> bool:
    """``relu`` followed by ``ins`` bottom-up: top-down, ``ins.feedback`` then ``relu.feedback``
    run as one ``ins_norm_gate``."""
    return (
        isinstance(relu, AdaReLU)
        and isinstance(ins, InsNorm)
        and ins.top_down
        and _same_kernel_backend(ins, relu)
    )


def fuses_ada_unpool_gate(relu: nn.Module, pool: nn.Module) -> bool:
    """``relu`` followed by ``pool``: top-down, ``pool.feedback`` then ``relu.feedback`` run as
    one ``ada_unpool_gate``."""
    return (
        isinstance(relu, AdaReLU)
        and isinstance(pool, AdaPool2d)
        and _same_kernel_backend(relu, pool)
    )


def ins_bias_ada_relu_layers(ins: InsNorm, bias: Bias, relu: AdaReLU, x: Tensor) -> Tensor:
    """``relu(bias(ins(x)))``, as one fused op when the layers allow it, with the layers'
    parameters and state: the gate's mask is stored in ``relu``."""
    if not fuses_ins_bias_ada_relu(ins, bias, relu):
        return relu(bias(ins(x)))
    y, mask = functional.ins_bias_ada_relu(
        x,
        bias.bias,
        relu.hidden_for(x),
        relu.res_param,
        eps=ins.eps,
        centered=ins.centered,
        backend=relu.backend,
    )
    relu.set_mask(mask)
    return y


def ins_bias_ada_relu_pool_layers(
    ins: InsNorm, bias: Bias, relu: AdaReLU, pool: AdaPool2d, x: Tensor
) -> Tensor:
    """``pool(relu(bias(ins(x))))``, as one op where the layers allow it (on the CPU one kernel
    that never writes the full-resolution activation); the gate and the pool keep their state."""
    if not fuses_ins_bias_ada_relu_pool2d(ins, bias, relu, pool):
        return pool(ins_bias_ada_relu_layers(ins, bias, relu, x))
    pool_hidden = pool.hidden_for(x)
    y, mask, argmax, argmin = functional.ins_bias_ada_relu_pool2d(
        x,
        bias.bias,
        relu.hidden_for(x),
        pool_hidden,
        relu.res_param,
        pool.kernel_size,
        eps=ins.eps,
        centered=ins.centered,
        backend=relu.backend,
    )
    relu.set_mask(mask)
    pool.remember(argmax, argmin, pool_hidden, (x.shape[2], x.shape[3]))
    return y


def ins_norm_gate_layers(ins: InsNorm, relu: AdaReLU, z: Tensor) -> Tensor:
    """``relu.feedback(ins.feedback(z))``, as one fused op when the layers allow it: the
    normalized ``z`` becomes ``relu``'s hidden, the gated one is returned."""
    if not fuses_ins_norm_gate(relu, ins):
        return relu.feedback(ins.feedback(z))
    zn, out = functional.ins_norm_gate(
        z, relu.mask_for(z), eps=ins.eps, centered=ins.centered, backend=relu.backend
    )
    relu.set_hidden(zn)
    return out


def ada_unpool_gate_layers(relu: AdaReLU, pool: AdaPool2d, z: Tensor) -> Tensor:
    """``relu.feedback(pool.feedback(z))``, as one op where the layers allow it: the unpooled
    ``z`` becomes ``relu``'s hidden, the gated one is returned."""
    if not fuses_ada_unpool_gate(relu, pool):
        return relu.feedback(pool.feedback(z))
    selection = pool.selection_for(z)
    mask = relu.mask
    if mask is None or mask.shape != (*z.shape[:2], *selection.output_size):
        return relu.feedback(pool.feedback(z))  # not the pool's input: let the layers complain
    # the positions are the pool's own forward's: no need to check their values
    u, out = functional.ada_unpool_gate(
        z,
        selection.argmax,
        selection.argmin,
        selection.hidden,
        mask,
        selection.kernel_size,
        selection.output_size,
        check_positions=False,
        backend=relu.backend,
    )
    pool.set_hidden(z)
    relu.set_hidden(u)
    return out
