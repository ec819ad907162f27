"""Benchmark cases of the CNN-F feedback ops (docs/feedback.md).

One factory per op, ``setup_<op>(provider, mode, **shape)``: it builds the inputs (and the
model), checks the provider against the reference once, and returns the zero-argument callable
to time. Ops and providers:

* ``ada_relu`` (gated by a feedback signal, eta=0.1), ``ins_bias_ada_relu`` (the fused
  InsNorm -> Bias -> AdaReLU of a CNN-F stage, gated; its reference is the eager composition
  the layers run unfused) and ``ada_relu_feedback`` (the gate's top-down pass ``z * mask``) on a
  ``(N, 32, 28, 28)`` map: ``reference`` (PyTorch ops), ``cpu`` (the C++ kernel), ``triton``
  (GPU only);
* ``feedback_step`` (one cycle: feedback pass, ``ff`` update, gated forward pass from ``ff``)
  and ``run_cycles`` (reset, first pass, ``cycles`` cycles) on the paper's Fashion-MNIST
  ``CNNF``: ``reference`` is the eager composition (every gate in PyTorch ops), ``cpu`` the same
  network with its gates on the C++ kernels, ``cpu_bf16`` that network in bfloat16 (weights,
  images, gradients; convolutions in bfloat16 by torch, gates in float32 by the kernels), and
  ``conv_floor`` the same convolutions, transposed convolutions and linear maps alone, on fixed
  inputs.

Kernel providers are checked against the reference provider run in the same dtype (the gates'
masks are sign decisions; a float64 reference could flip a gate where a value rounds to zero,
which would be no bug); ``cpu_bf16`` by the half rule of docs/numerics.md against the float64
reference. ``feedback_step`` is timed in the steady state: after a first pass and
one cycle, so every timed call runs the gated path of every layer.

pytest-benchmark: ``pytest bench/bench_feedback.py --benchmark-only [--bench-preset quick]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench._common import (
    CheckFailed,
    Unavailable,
    check_close,
    check_equal,
    clear_grads,
    run_pytest_benchmark,
)
from screening_attn.feedback import CNNF, FeedbackConv2d, FeedbackLinear, feedback_step
from screening_attn.feedback import functional as fbf

FAMILY = "feedback"
ETA = 0.1
NUM_CLASSES = 10
SEED = 0
TOL = {"rtol": 1e-4, "atol": 1e-5}
F64 = torch.float64


# bfloat16 providers: the backend they run, in bfloat16.
HALF_PROVIDERS = {"cpu_bf16": "cpu"}


def _available(provider: str) -> None:
    provider = HALF_PROVIDERS.get(provider, provider)
    if provider in ("triton", "cuda"):
        raise Unavailable("GPU kernel: the feedback benchmarks run on CPU tensors")
    try:
        fbf.ada_relu(torch.zeros(2), torch.zeros(2), ETA, backend=provider)
    except ValueError as exc:
        raise Unavailable(str(exc)) from None


def _failed(exc: Exception) -> CheckFailed:
    return CheckFailed(f"raised {type(exc).__name__}: {str(exc).splitlines()[0]}")


def _randn(*size, seed: int) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed))


def _gate_inputs(N: int, C: int, HW: int):
    shape = (N, C, HW, HW)
    return _randn(*shape, seed=SEED), _randn(*shape, seed=SEED + 1), _randn(*shape, seed=SEED + 2)


def _gate_run(op: str, provider: str, mode: str, x, bias, hidden, g):
    """(y, mask, dx, dhidden, dbias) of one ``ada_relu`` or ``ins_bias_ada_relu`` call
    (gradients None in fwd mode)."""

    def call():
        if op == "ada_relu":
            return fbf.ada_relu(x, hidden, ETA, backend=provider)
        return fbf.ins_bias_ada_relu(x, bias, hidden, ETA, backend=provider)

    if mode == "fwd":
        with torch.no_grad():
            y, mask = call()
        return y, mask, None, None, None
    clear_grads(x, hidden, bias)
    y, mask = call()
    y.backward(g)
    return y, mask, x.grad, hidden.grad, bias.grad if op != "ada_relu" else None


def _setup_gate(op: str, provider: str, mode: str, N: int, C: int, HW: int):
    _available(provider)
    x, hidden, g = _gate_inputs(N, C, HW)
    bias = _randn(C, seed=SEED + 5)
    if mode == "fwd+bwd":
        for t in (x, hidden, bias):
            t.requires_grad_()
    if provider != "reference":
        try:
            got = _gate_run(op, provider, mode, x, bias, hidden, g)
            got = [t.clone() if t is not None else None for t in got]
            want = _gate_run(op, "reference", mode, x, bias, hidden, g)
        except Exception as exc:
            raise _failed(exc) from exc
        check_close("y", got[0], want[0], **TOL)
        check_equal("mask", got[1], want[1])
        if mode == "fwd+bwd":
            for name, a, b in zip(("dx", "dhidden", "dbias"), got[2:], want[2:]):
                if b is not None:
                    check_close(name, a, b, **TOL)
    return functools.partial(_gate_run, op, provider, mode, x, bias, hidden, g)


def setup_ada_relu(provider: str, mode: str, *, N, C, HW) -> Callable[[], object]:
    """Gated AdaReLU ``(y, mask) = ada_relu(x, hidden, 0.1)``; backward to x and hidden."""
    return _setup_gate("ada_relu", provider, mode, N, C, HW)


def setup_ins_bias_ada_relu(provider: str, mode: str, *, N, C, HW) -> Callable[[], object]:
    """Fused InsNorm -> Bias -> gated AdaReLU ``ins_bias_ada_relu(x, bias, hidden, 0.1)``;
    backward to x, bias and hidden."""
    return _setup_gate("ins_bias_ada_relu", provider, mode, N, C, HW)


def _gate_feedback_run(provider: str, mode: str, z, mask, g):
    if mode == "fwd":
        with torch.no_grad():
            return fbf.ada_relu_feedback(z, mask, backend=provider), None
    clear_grads(z)
    out = fbf.ada_relu_feedback(z, mask, backend=provider)
    out.backward(g)
    return out, z.grad


def setup_ada_relu_feedback(provider: str, mode: str, *, N, C, HW) -> Callable[[], object]:
    """The gate's top-down pass ``z * mask``; backward to z."""
    _available(provider)
    z, x, g = _gate_inputs(N, C, HW)
    mask = x > 0
    if mode == "fwd+bwd":
        z.requires_grad_()
    if provider != "reference":
        try:
            got = [
                t.clone() if t is not None else None
                for t in _gate_feedback_run(provider, mode, z, mask, g)
            ]
            want = _gate_feedback_run("reference", mode, z, mask, g)
        except Exception as exc:
            raise _failed(exc) from exc
        check_close("out", got[0], want[0], **TOL)
        if mode == "fwd+bwd":
            check_close("dz", got[1], want[1], **TOL)
    return functools.partial(_gate_feedback_run, provider, mode, z, mask, g)


def _model(provider: str, ind: int, cycles: int) -> CNNF:
    torch.manual_seed(SEED)
    model = CNNF(NUM_CLASSES, ind=ind, cycles=cycles, res_param=ETA, backend="reference")
    for m in model.modules():  # the zero-initialized biases would leave the gates symmetric
        if hasattr(m, "bias") and isinstance(m.bias, torch.nn.Parameter):
            torch.nn.init.normal_(m.bias, 0.0, 0.1)
    if provider in HALF_PROVIDERS:
        model.set_backend(HALF_PROVIDERS[provider])
        return model.to(torch.bfloat16)
    if provider != "reference":
        model.set_backend(provider)
    return model


def _images(N: int) -> torch.Tensor:
    return _randn(N, 1, 28, 28, seed=SEED + 3)


def _prepare_step(model: CNNF, x: torch.Tensor, requires_grad: bool):
    """First pass and one cycle, so the gates hold feedback; returns the (out, ff) that every
    timed ``feedback_step`` starts from."""
    with torch.no_grad():
        model.reset()
        out, ff = model.forward_capture(x, model.ff_unit)
        out, ff = feedback_step(model, out, ff)
    return out.requires_grad_(requires_grad), ff.requires_grad_(requires_grad)


def _step_run(model, mode, out, ff, g):
    if mode == "fwd":
        with torch.no_grad():
            return feedback_step(model, out, ff)
    model.zero_grad(set_to_none=True)
    clear_grads(out, ff)
    new_out, new_ff = feedback_step(model, out, ff)
    new_out.backward(g)
    return new_out, new_ff


def _cycles_run(model, mode, x, g):
    if mode == "fwd":
        with torch.no_grad():
            return model.run_cycles(x)
    model.zero_grad(set_to_none=True)
    clear_grads(x)
    logits = model.run_cycles(x)
    logits.backward(g)
    return logits


def _grads(model, *tensors) -> dict[str, torch.Tensor]:
    out = {f"d{name}": p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    out.update({f"d_input{i}": t.grad.clone() for i, t in enumerate(tensors) if t.grad is not None})
    return out


def _check_cnnf(op: str, provider: str, mode: str, N: int, ind: int, cycles: int) -> None:
    """Run ``op`` from scratch with ``provider`` and with the reference (same weights, same
    inputs) and compare logits, the fed-back map and every gradient. In float64: in float32 the
    fused norm's different summation order can legitimately flip a gate or a pool's choice
    where a value sits within rounding of zero or of a tie, and a whole network amplifies that
    into visibly different logits."""
    results = []
    for p in (provider, "reference"):
        model = _model(p, ind, cycles).double()
        x = _images(N).double()
        g = _randn(N, NUM_CLASSES, seed=SEED + 4).double()
        if op == "feedback_step":
            out, ff = _prepare_step(model, x, mode == "fwd+bwd")
            _step_run(model, mode, out, ff, g)  # a second cycle: gates set by the first one
            new_out, new_ff = _step_run(model, mode, out, ff, g)
            results.append(({"out": new_out, "ff": new_ff}, _grads(model, out, ff)))
        else:
            x.requires_grad_(mode == "fwd+bwd")
            results.append(({"logits": _cycles_run(model, mode, x, g)}, _grads(model, x)))
    (got, got_grads), (want, want_grads) = results
    for name in want:
        check_close(name, got[name], want[name], rtol=1e-7, atol=1e-9)
    if set(got_grads) != set(want_grads):
        raise CheckFailed(f"gradients of {sorted(got_grads)}, expected {sorted(want_grads)}")
    for name in want_grads:
        check_close(name, got_grads[name], want_grads[name], rtol=1e-7, atol=1e-9)


def _check_cnnf_bf16(op: str, provider: str, mode: str, N: int, ind: int, cycles: int) -> None:
    """``run_cycles`` in bfloat16: logits and every gradient within twice the error of the
    reference run in bfloat16 (the truth: the float64 reference on the same weights and images,
    upcast exactly) plus 1e-2 of the largest entry (a gate that flips on a value within
    bfloat16 rounding of zero moves the network's outputs)."""
    runs = []
    for p, dtype in ((provider, torch.bfloat16), ("reference", torch.bfloat16), ("reference", F64)):
        model = _model(p, ind, cycles).to(torch.bfloat16).to(dtype)
        x = _images(N).to(torch.bfloat16).to(dtype)
        g = _randn(N, NUM_CLASSES, seed=SEED + 4).to(torch.bfloat16).to(dtype)
        x.requires_grad_(mode == "fwd+bwd")
        logits = _cycles_run(model, mode, x, g)
        runs.append({"logits": logits.detach(), **_grads(model, x)})
    got, lowp, want = runs
    for name, w in want.items():
        err = (got[name].double() - w).abs().max().item()
        ref_err = (lowp[name].double() - w).abs().max().item()
        if not err <= 2 * ref_err + 1e-2 * w.abs().max().item():
            raise CheckFailed(
                f"{name}: error {err:.3g} > 2 x the bfloat16 reference's {ref_err:.3g}"
            )


@functools.cache
def _layer_shapes(N: int, ind: int) -> tuple[tuple, ...]:
    """Per conv/linear layer of CNNF, in forward order: (unit index, kind, weight shape,
    stride, padding, output_padding, input shape, output shape)."""
    model = _model("reference", ind, 1)
    units = model.units()
    rows = {}

    def hook(unit_index):
        def record(module, args, output):
            w = module.weight
            conv = isinstance(module, FeedbackConv2d)
            rows[unit_index] = (
                unit_index,
                "conv" if conv else "linear",
                tuple(w.shape),
                module.stride if conv else None,
                module.padding if conv else None,
                module.output_padding if conv else None,
                tuple(args[0].shape),
                tuple(output.shape),
            )

        return record

    handles = [
        u.register_forward_hook(hook(i))
        for i, u in enumerate(units)
        if isinstance(u, FeedbackConv2d | FeedbackLinear)
    ]
    with torch.no_grad():
        model(_images(N))
    for h in handles:
        h.remove()
    return tuple(rows[i] for i in sorted(rows))


@functools.cache
def _ff_unit(ind: int) -> int:
    return _model("reference", ind, 1).ff_unit


def _floor_passes(op: str, ff_unit: int, cycles: int, layers) -> list[tuple[str, tuple]]:
    """(direction, layer) in the order ``op`` runs them."""
    cycle_layers = [row for row in layers if row[0] >= ff_unit]
    one_cycle = [("feedback", r) for r in reversed(cycle_layers)]
    one_cycle += [("forward", r) for r in cycle_layers]
    if op == "feedback_step":
        return one_cycle
    return [("forward", r) for r in layers] + one_cycle * cycles


def _conv_floor(op: str, mode: str, *, N: int, ind: int, cycles: int) -> Callable[[], object]:
    model = _model("reference", ind, cycles)
    layers = _layer_shapes(N, ind)
    grad = mode == "fwd+bwd"
    weights = {r[0]: model.units()[r[0]].weight for r in layers}
    calls = []
    for k, (direction, row) in enumerate(_floor_passes(op, model.ff_unit, cycles, layers)):
        unit, kind, _, stride, padding, out_pad, in_shape, out_shape = row
        inp = _randn(*(in_shape if direction == "forward" else out_shape), seed=SEED + 10 + k)
        calls.append(
            (direction, kind, weights[unit], stride, padding, out_pad, inp.requires_grad_(grad))
        )

    def products():
        outs = []
        for direction, kind, w, stride, padding, out_pad, inp in calls:
            if kind == "linear":
                outs.append(F.linear(inp, w) if direction == "forward" else inp @ w)
            elif direction == "forward":
                outs.append(F.conv2d(inp, w, stride=stride, padding=padding))
            else:
                outs.append(
                    F.conv_transpose2d(
                        inp, w, stride=stride, padding=padding, output_padding=out_pad
                    )
                )
        return outs

    if mode == "fwd":

        def run():
            with torch.no_grad():
                return products()

        return run
    with torch.no_grad():
        out_grads = [torch.ones_like(o) for o in products()]
    leaves = [c[-1] for c in calls]

    def run_bwd():
        model.zero_grad(set_to_none=True)
        clear_grads(*leaves)
        torch.autograd.backward(products(), out_grads)

    return run_bwd


def _setup_cnnf(op: str, provider: str, mode: str, N: int, ind: int, cycles: int):
    if provider == "conv_floor":
        return _conv_floor(op, mode, N=N, ind=ind, cycles=cycles)
    _available(provider)
    if provider != "reference":
        check = _check_cnnf_bf16 if provider in HALF_PROVIDERS else _check_cnnf
        try:
            check(op, provider, mode, N, ind, cycles)
        except CheckFailed:
            raise
        except Exception as exc:
            raise _failed(exc) from exc
    model = _model(provider, ind, cycles)
    dtype = torch.bfloat16 if provider in HALF_PROVIDERS else torch.float32
    x = _images(N).to(dtype)
    g = _randn(N, NUM_CLASSES, seed=SEED + 4).to(dtype)
    if op == "feedback_step":
        out, ff = _prepare_step(model, x, mode == "fwd+bwd")
        return functools.partial(_step_run, model, mode, out, ff, g)
    x.requires_grad_(mode == "fwd+bwd")
    return functools.partial(_cycles_run, model, mode, x, g)


def setup_feedback_step(provider: str, mode: str, *, N, ind, cycles) -> Callable[[], object]:
    """One CNN-F cycle ``feedback_step(model, out, ff)`` of CNNF on N images, in the steady
    state; backward from the new logits to every parameter, ``out`` and ``ff``."""
    return _setup_cnnf("feedback_step", provider, mode, N, ind, cycles)


def setup_run_cycles(provider: str, mode: str, *, N, ind, cycles) -> Callable[[], object]:
    """``model.run_cycles(x)`` of CNNF on N images; backward to every parameter and x."""
    return _setup_cnnf("run_cycles", provider, mode, N, ind, cycles)


SETUPS = {
    "ada_relu": setup_ada_relu,
    "ins_bias_ada_relu": setup_ins_bias_ada_relu,
    "ada_relu_feedback": setup_ada_relu_feedback,
    "feedback_step": setup_feedback_step,
    "run_cycles": setup_run_cycles,
}


def flops(op: str, provider: str, mode: str, shape: dict) -> float | None:
    """The convolutions' and linear maps' FLOPs (2 per MAC; a transposed conv costs what its
    forward does); backward twice the forward. None for the elementwise gates."""
    if op not in ("feedback_step", "run_cycles"):
        return None
    layers = _layer_shapes(shape["N"], shape["ind"])
    ff_unit = _ff_unit(shape["ind"])
    total = 0.0
    for _, row in _floor_passes(op, ff_unit, shape["cycles"], layers):
        _, kind, w, *_, in_shape, out_shape = row
        if kind == "linear":
            total += 2.0 * in_shape[0] * w[0] * w[1]
        else:
            n, cout, ho, wo = out_shape
            total += 2.0 * n * cout * ho * wo * w[1] * w[2] * w[3]
    return total if mode == "fwd" else 3.0 * total


def test_feedback(benchmark, case):
    run_pytest_benchmark(benchmark, case, SETUPS[case.op])
