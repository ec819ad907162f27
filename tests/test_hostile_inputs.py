"""A catalogue of malformed calls to the public API (docs/backends.md), every CPU backend
included.

Each row is ``(id, call, error type, regex)``: the call must raise exactly that ValueError or
TypeError (never a RuntimeError, IndexError or AssertionError from deeper down) with a message
that matches the regex, which names the argument. After each case the same test makes a valid
call of the same family on the same backend, which must work: a bad call leaves nothing broken.

Decisions this file pins down:
* sizes (window, relevant, kernel_size, ...) accept any integral object ``operator.index``
  takes (numpy integers); bool, numpy bool, floats and tensors are rejected; they must fit int64;
* ``load_state_dict`` of the package's modules raises a ``StateDictError`` (a ValueError, and
  still the RuntimeError torch's load_state_dict raises) naming the key, before copying anything;
* a call that only makes sense after a forward pass (a layer's ``feedback``, ``feedback_step``)
  made before one raises RuntimeError: that is call order, not a malformed argument.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch

from screening_attn import feedback as fb
from screening_attn._validate import check_attention_inputs
from screening_attn.attention import screened_attention, screened_attention_reference
from screening_attn.feedback import functional as fn
from screening_attn.nn import RelLSTM, RelRNN

META = torch.device("meta")  # the "other device" of the mixed-device cases: exists everywhere


def _qkv(**over):
    q = torch.randn(2, 3, 5, 4)
    args = dict(q=q, k=q.clone(), v=torch.randn(2, 3, 5, 6), window=2, relevant=1)
    args.update(over)
    return args


_Q = torch.randn(2, 3, 5, 4)

# Attention: kwargs of screened_attention -> (error, regex). Run on every backend below.
ATTENTION = {
    "q-not-tensor": (_qkv(q=_Q.tolist()), TypeError, r"^q must be a torch\.Tensor, got"),
    "q-none": (_qkv(q=None), TypeError, r"^q must be a torch\.Tensor, got None"),
    "q-numpy": (_qkv(q=_Q.numpy()), TypeError, r"^q must be a torch\.Tensor"),
    "q-3d": (_qkv(q=_Q[0]), ValueError, r"^q must be 4-d, got shape \(3, 5, 4\)"),
    "k-5d": (_qkv(k=_Q[None]), ValueError, r"^k must be 4-d"),
    "v-2d": (_qkv(v=torch.randn(5, 6)), ValueError, r"^v must be 4-d"),
    "q-int": (_qkv(q=_Q.long()), TypeError, r"^q must be a floating-point tensor, got .*int64"),
    "all-int": (_qkv(q=_Q.int(), k=_Q.int(), v=_Q.int()), TypeError, r"^q must be a floating"),
    "all-bool": (_qkv(q=_Q > 0, k=_Q > 0, v=_Q > 0), TypeError, r"^q must be a floating.*bool"),
    "q-complex": (_qkv(q=_Q.to(torch.complex64)), TypeError, r"^q must be a floating-point"),
    "k-dtype": (_qkv(k=_Q.double()), TypeError, r"^k must have the dtype of q \(torch.float32\)"),
    "v-dtype": (_qkv(v=torch.randn(2, 3, 5, 6).half()), TypeError, r"^v must have the dtype"),
    "k-device": (_qkv(k=_Q.to(META)), ValueError, r"^k must be on the device of q \(cpu\)"),
    "v-device": (_qkv(v=_Q.to(META)), ValueError, r"^v must be on the device of q \(cpu\)"),
    "q-device": (_qkv(q=_Q.to(META)), ValueError, r"^k must be on the device of q \(meta\)"),
    "k-batch": (_qkv(k=torch.randn(1, 3, 5, 4)), ValueError, r"^k must have the shape .*\(1, 3"),
    "k-heads": (_qkv(k=torch.randn(2, 2, 5, 4)), ValueError, r"^k must have the shape"),
    "k-time": (_qkv(k=torch.randn(2, 3, 6, 4)), ValueError, r"^k must have the shape"),
    "k-dim": (_qkv(k=torch.randn(2, 3, 5, 3)), ValueError, r"^k must have the shape"),
    "v-batch": (_qkv(v=torch.randn(3, 3, 5, 4)), ValueError, r"^v must have shape"),
    "v-time": (_qkv(v=torch.randn(2, 3, 4, 4)), ValueError, r"^v must have shape .*got \(2, 3, 4"),
    "window-0": (_qkv(window=0), ValueError, r"^window must be an int >= 1, got 0"),
    "window-neg": (_qkv(window=-3), ValueError, r"^window must be an int >= 1, got -3"),
    "window-float": (_qkv(window=2.0), TypeError, r"^window must be an int >= 1, got 2\.0"),
    "window-bool": (_qkv(window=True), TypeError, r"^window must be an int >= 1, got True"),
    "window-np-bool": (_qkv(window=np.True_), TypeError, r"^window must be an int >= 1"),
    "window-tensor": (_qkv(window=torch.tensor(2)), TypeError, r"^window must be an int"),
    "window-2**63": (_qkv(window=2**63), ValueError, r"^window must be an int in \[1, 2\*\*63"),
    "relevant-neg": (_qkv(relevant=-1), ValueError, r"^relevant must be an int >= 0, got -1"),
    "relevant-np-neg": (_qkv(relevant=np.int8(-1)), ValueError, r"^relevant must be an int >= 0"),
    "relevant-str": (_qkv(relevant="2"), TypeError, r"^relevant must be an int >= 0, got '2'"),
    "relevant-bool": (_qkv(relevant=False), TypeError, r"^relevant must be an int"),
    "relevant-float": (_qkv(relevant=1.0), TypeError, r"^relevant must be an int"),
    "relevant-2**64": (_qkv(relevant=2**64), ValueError, r"^relevant must be an int in \[0, 2"),
    "scale-nan": (_qkv(scale=math.nan), ValueError, r"^scale must be a finite float .*got nan"),
    "scale-inf": (_qkv(scale=-math.inf), ValueError, r"^scale must be a finite float"),
    "scale-np-inf": (_qkv(scale=np.float32(np.inf)), ValueError, r"^scale must be a finite"),
    "scale-str": (_qkv(scale="0.5"), TypeError, r"^scale must be a finite float .*got '0\.5'"),
    "scale-bool": (_qkv(scale=True), TypeError, r"^scale must be a finite float"),
    "scale-complex": (_qkv(scale=1j), TypeError, r"^scale must be a finite float"),
    "scale-tensor": (_qkv(scale=torch.tensor(0.5)), TypeError, r"^scale must be a finite float"),
    "return_state-str": (_qkv(return_state="yes"), TypeError, r"^return_state must be a bool"),
    "return_state-int": (_qkv(return_state=1), TypeError, r"^return_state must be a bool"),
}
TRITON_SAMPLE = {"q-not-tensor", "all-int", "k-device", "k-time", "v-time", "window-bool",
                 "window-2**63", "relevant-2**64", "scale-nan", "return_state-int"}  # fmt: skip
ATTENTION_BACKENDS = {
    "misspelt": ("refrence", r"^backend must be one of"),
    "capitalised": ("CPU", r"^backend must be one of"),
    "none": (None, r"^backend must be one of"),
    "bytes": (b"cpu", r"^backend must be one of"),
    "cuda": ("cuda", r"has no backend='cuda'"),
}

_x = torch.randn(2, 3, 4, 4)
_pos = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
_mask = _x > 0

# CNN-F functional ops: name -> (call(backend), error, regex); run on every backend below.
FEEDBACK_OPS: dict[str, tuple[Callable, type, str]] = {
    "ada_relu-eta-nan": (lambda b: fn.ada_relu(_x, _x, math.nan, backend=b), ValueError, "^eta"),
    "ada_relu-eta-inf": (lambda b: fn.ada_relu(_x, _x, math.inf, backend=b), ValueError, "^eta"),
    "ada_relu-eta-bool": (lambda b: fn.ada_relu(_x, _x, True, backend=b), TypeError, "^eta"),
    "ada_relu-x-bool": (lambda b: fn.ada_relu(_mask, backend=b), TypeError, "^x must be a float"),
    "ada_relu-x-9d": (
        lambda b: fn.ada_relu(torch.zeros([1] * 9), backend=b),
        ValueError,
        r"^x must be 0-d to 8-d",
    ),
    "ada_relu-hidden-device": (
        lambda b: fn.ada_relu(_x, _x.to(META), 0.1, backend=b),
        ValueError,
        r"^hidden must be on the device of x",
    ),
    "ada_relu_feedback-mask-device": (
        lambda b: fn.ada_relu_feedback(_x, _mask.to(META), backend=b),
        ValueError,
        r"^mask must have the shape and device of z",
    ),
    "ada_relu_feedback-z-int": (
        lambda b: fn.ada_relu_feedback(_x.long(), _mask, backend=b),
        TypeError,
        r"^z must be a floating-point",
    ),
    "ins_norm-eps-nan": (lambda b: fn.ins_norm(_x, math.nan, backend=b), ValueError, "^eps"),
    "ins_norm-eps-bool": (lambda b: fn.ins_norm(_x, True, backend=b), TypeError, "^eps"),
    "ins_norm-centered-int": (
        lambda b: fn.ins_norm(_x, 1e-8, 1, backend=b),
        TypeError,
        "^centered must be a bool",
    ),
    "ins_bias_ada_relu-bias-device": (
        lambda b: fn.ins_bias_ada_relu(_x, torch.zeros(3, device=META), backend=b),
        ValueError,
        r"^bias must be on the device of x",
    ),
    "ins_bias_ada_relu-bias-int": (
        lambda b: fn.ins_bias_ada_relu(_x, torch.zeros(3, dtype=torch.long), backend=b),
        TypeError,
        r"^bias must be a floating-point",
    ),
    "ins_bias_ada_relu-bias-2d": (
        lambda b: fn.ins_bias_ada_relu(_x, torch.zeros(1, 3), backend=b),
        ValueError,
        r"^bias must be 1-d",
    ),
    "ins_norm_gate-mask-device": (
        lambda b: fn.ins_norm_gate(_x, _mask.to(META), backend=b),
        ValueError,
        r"^mask must have the shape and device of z",
    ),
    "ada_pool2d-k-bool": (
        lambda b: fn.ada_pool2d(_x, None, True, backend=b),
        TypeError,
        r"^kernel_size must be an int",
    ),
    "ada_pool2d-k-float": (
        lambda b: fn.ada_pool2d(_x, None, 2.0, backend=b),
        TypeError,
        r"^kernel_size must be an int",
    ),
    "ada_pool2d-hidden-int": (
        lambda b: fn.ada_pool2d(_x, _pos.long(), 2, backend=b),
        TypeError,
        r"^hidden must be a floating-point",
    ),
    "ada_pool2d-empty-plane": (
        lambda b: fn.ada_pool2d(_x[:, :, :0], None, 2, backend=b),
        ValueError,
        r"^x must be at least 2x2",
    ),
    "ada_unpool2d-position-out-of-window": (
        lambda b: fn.ada_unpool2d(_x[..., :2, :2], _pos + 4, _pos, None, 2, (4, 4), backend=b),
        ValueError,
        r"^argmax must hold window positions .*\[0, 4\), got 4",
    ),
    "ada_unpool2d-gated-argmin-out-of-window": (
        lambda b: fn.ada_unpool2d(
            _x[..., :2, :2], _pos, _pos + 200, _x[..., :2, :2], 2, (4, 4), backend=b
        ),
        ValueError,
        r"^argmin must hold window positions",
    ),
    "ada_unpool2d-output_size-int": (
        lambda b: fn.ada_unpool2d(_x[..., :2, :2], _pos, _pos, None, 2, 4, backend=b),
        TypeError,
        r"^output_size must be a pair",
    ),
    "ada_unpool2d-output_size-float": (
        lambda b: fn.ada_unpool2d(_x[..., :2, :2], _pos, _pos, None, 2, (4.0, 4), backend=b),
        TypeError,
        r"^output_size must be an int",
    ),
    "ada_unpool2d-argmax-device": (
        lambda b: fn.ada_unpool2d(_x[..., :2, :2], _pos.to(META), _pos, None, 2, (4, 4), backend=b),
        ValueError,
        r"^argmax must have the pooled shape .* on cpu, got .* on meta",
    ),
    "stage-x-list": (
        lambda b: fn.ins_bias_ada_relu_pool2d([1.0], None, None, None, 0.1, 2, backend=b),
        TypeError,
        r"^x must be a torch\.Tensor",
    ),
    "stage-bias-channels": (
        lambda b: fn.ins_bias_ada_relu_pool2d(_x, torch.zeros(5), None, None, 0.1, 2, backend=b),
        ValueError,
        r"^bias must have shape \(C,\) = \(3,\), got \(5,\)",
    ),
    "stage-pool_hidden-shape": (
        lambda b: fn.ins_bias_ada_relu_pool2d(_x, None, None, _x[..., :3, :3], 0.1, 2, backend=b),
        ValueError,
        r"^pool_hidden must have the pooled shape \(2, 3, 2, 2\)",
    ),
    "stage-eta-nan": (
        lambda b: fn.ins_bias_ada_relu_pool2d(_x, None, None, None, math.nan, 2, backend=b),
        ValueError,
        r"^eta must be a finite float",
    ),
    "unpool_gate-z-list": (
        lambda b: fn.ada_unpool_gate([1.0], _pos, _pos, None, _mask, 2, (4, 4), backend=b),
        TypeError,
        r"^z must be a torch\.Tensor",
    ),
    "unpool_gate-output_size-int": (
        lambda b: fn.ada_unpool_gate(_x[..., :2, :2], _pos, _pos, None, _mask, 2, 4, backend=b),
        TypeError,
        r"^output_size must be a pair",
    ),
    "unpool_gate-mask-shape": (
        lambda b: fn.ada_unpool_gate(
            _x[..., :2, :2], _pos, _pos, None, _mask[:1], 2, (4, 4), backend=b
        ),
        ValueError,
        r"^mask must have the shape and device of the unpooled output \(\(2, 3, 4, 4\)",
    ),
    "feedback_update-eta-nan": (
        lambda b: fn.feedback_update(_x, _x, math.nan, backend=b),
        ValueError,
        r"^eta must be a finite float",
    ),
    "feedback_update-rec-device": (
        lambda b: fn.feedback_update(_x, _x.to(META), 0.1, backend=b),
        ValueError,
        r"^rec must be on the device of ff",
    ),
}


def _feedback_ok_triton() -> None:
    y, mask = fn.ada_relu(_x, _x, 0.1, backend="triton")
    assert y.shape == _x.shape and mask.dtype == torch.bool


def _feedback_ok(backend: str) -> None:
    y, mask = fn.ins_bias_ada_relu(_x, torch.zeros(3), _x, 0.1, backend=backend)
    p, amax, amin = fn.ada_pool2d(y, None, 2, backend=backend)
    u = fn.ada_unpool2d(p, amax, amin, None, 2, (4, 4), backend=backend)
    assert u.shape == _x.shape and mask.dtype == torch.bool


# RelRNN / RelLSTM: name -> (call(module, x, backend), error, regex), on every backend.
RNN_FORWARD: dict[str, tuple[Callable, type, str]] = {
    "x-2d": (lambda m, x, b: m(x[0], backend=b), ValueError, r"^x must be 3-d"),
    "x-numpy": (lambda m, x, b: m(x.numpy(), backend=b), TypeError, r"^x must be a torch.Tensor"),
    "x-features": (
        lambda m, x, b: m(torch.randn(5, 2, 4), backend=b),
        ValueError,
        r"^x must have shape \(T, B, input_size=3\)",
    ),
    "x-T0": (
        lambda m, x, b: m(x[:0], backend=b),
        ValueError,
        r"^x must hold at least one time step",
    ),
    "x-int": (lambda m, x, b: m(x.long(), backend=b), TypeError, r"^x must be a floating-point"),
    "x-bool": (lambda m, x, b: m(x > 0, backend=b), TypeError, r"^x must be a floating-point"),
    "x-dtype": (
        lambda m, x, b: m(x.double(), backend=b),
        TypeError,
        r"^x must have the dtype of the module's parameters",
    ),
    "x-device": (
        lambda m, x, b: m(x.to(META), backend=b),
        ValueError,
        r"^x must be on the device of the module's",
    ),
    "h0-shape": (
        lambda m, x, b: m(x, torch.randn(2, 5), backend=b),
        ValueError,
        r"^h0 must have shape \(B, hidden_size\)",
    ),
    "h0-batch": (
        lambda m, x, b: m(x, torch.randn(3, 4), backend=b),
        ValueError,
        r"^h0 must have shape \(B, hidden_size\) = \(2, 4\)",
    ),
    "h0-3d": (
        lambda m, x, b: m(x, torch.randn(1, 2, 4), backend=b),
        ValueError,
        r"^h0 must be 2-d",
    ),
    "h0-dtype": (
        lambda m, x, b: m(x, torch.randn(2, 4).double(), backend=b),
        TypeError,
        r"^h0 must have the dtype of x",
    ),
    "h0-int": (
        lambda m, x, b: m(x, torch.ones(2, 4, dtype=torch.long), backend=b),
        TypeError,
        r"^h0 must be a floating-point",
    ),
    "h0-device": (
        lambda m, x, b: m(x, torch.randn(2, 4, device=META), backend=b),
        ValueError,
        r"^h0 must be on the device of x \(cpu\), got meta",
    ),
    "h0-list": (
        lambda m, x, b: m(x, [[0.0] * 4] * 2, backend=b),
        TypeError,
        r"^h0 must be a torch\.Tensor",
    ),
}
RNN_BACKENDS = {
    "triton": ("triton", r"has no backend='triton'"),
    "cuda": ("cuda", r"backend='cuda' needs CUDA tensors"),
    "misspelt": ("refrence", r"^backend must be one of"),
}


def _rnn_ctor_cases():
    """Constructor arguments and checkpoints of the two modules."""
    cases = []
    for cls in (RelRNN, RelLSTM):
        n = cls.__name__
        m = cls(3, 4, 2, 1)
        sd = m.state_dict()
        cases += [
            (f"{n}-window-2**63", lambda c=cls: c(3, 4, 2**63, 1), ValueError, r"^window must"),
            (f"{n}-window-np-bool", lambda c=cls: c(3, 4, np.True_, 1), TypeError, r"^window"),
            (f"{n}-relevant-str", lambda c=cls: c(3, 4, 2, "1"), TypeError, r"^relevant"),
            (
                f"{n}-input_size-tensor",
                lambda c=cls: c(torch.tensor(3), 4, 2, 1),
                TypeError,
                "^input",
            ),
            (
                f"{n}-state_dict-shape",
                lambda m=m, sd=sd: m.load_state_dict({**sd, "v": torch.zeros(4)}),
                ValueError,
                r"state_dict\['v'\] must have shape \(1, 4\), got \(4,\)",
            ),
            (
                f"{n}-state_dict-unknown-key",
                lambda m=m, sd=sd: m.load_state_dict({**sd, "w": torch.zeros(1)}),
                ValueError,
                r"^state_dict must hold exactly the keys .*unexpected: \['w'\]",
            ),
            (
                f"{n}-state_dict-missing-key",
                lambda m=m, sd=sd: m.load_state_dict({k: v for k, v in sd.items() if k != "v"}),
                ValueError,
                r"^state_dict must hold exactly the keys .*missing: \['v'\]",
            ),
            (
                f"{n}-state_dict-not-tensor",
                lambda m=m, sd=sd: m.load_state_dict({**sd, "v": [0.0] * 4}),
                TypeError,
                r"^state_dict\['v'\] must be a Tensor of shape \(1, 4\)",
            ),
            (
                f"{n}-state_dict-not-mapping",
                lambda m=m: m.load_state_dict([("v", torch.zeros(1, 4))]),
                TypeError,
                r"^state_dict must be a mapping",
            ),
            (
                f"{n}-state_dict-strict-int",
                lambda m=m, sd=sd: m.load_state_dict(sd, strict=1),
                TypeError,
                r"^strict must be a bool",
            ),
        ]
    mod = RelRNN(3, 4, 2, 1, "modrelu")
    x = torch.randn(5, 2, 3)
    cases += [
        (
            "RelRNN-modrelu-b-shape",
            lambda: mod.load_state_dict({**mod.state_dict(), "nonlinearity.b": torch.zeros(5)}),
            ValueError,
            r"state_dict\['nonlinearity\.b'\] must have shape \(4,\)",
        ),
        ("RelRNN-attn-nan", lambda: mod(x, attn=math.nan), ValueError, r"^attn must be a finite"),
        ("RelRNN-attn-bool", lambda: mod(x, attn=True), TypeError, r"^attn must be a finite"),
        ("RelRNN-attn-inf", lambda: mod(x, attn=math.inf), ValueError, r"^attn must be a finite"),
        ("RelRNN-attn-str", lambda: mod(x, attn="1"), TypeError, r"^attn must be a finite"),
        (
            "RelRNN-attn-tensor",
            lambda: mod(x, attn=torch.tensor(0.5)),
            TypeError,
            r"^attn must be a finite",
        ),
        ("RelRNN-nonlinearity-None", lambda: RelRNN(3, 4, 2, 1, None), ValueError, "^nonlinear"),
    ]
    return cases


def _models_cases():
    cnnf = fb.CNNF(10, cycles=1)
    x = torch.randn(2, 1, 28, 28)
    sd = cnnf.state_dict()

    def stepped(out_fn=None, ff_fn=None):
        out, ff = cnnf.forward_capture(x, cnnf.ff_unit)
        out = out if out_fn is None else out_fn(out)
        ff = ff if ff_fn is None else ff_fn(ff)
        return fb.feedback_step(cnnf, out, ff)

    conv = fb.FeedbackConv2d(3, 4, 3)
    gap = fb.GlobalAvgPool2d()
    gap(_x)
    paper = {"conv1.conv.weight": torch.zeros(16, 1, 5, 5)}
    return (
        [
            (
                "cnnf-x-27x27",
                lambda: cnnf.run_cycles(x[..., :27, :27]),
                ValueError,
                r"^x must be images",
            ),
            (
                "cnnf-x-channels",
                lambda: cnnf.run_cycles(x.expand(2, 3, 28, 28)),
                ValueError,
                "^x must be",
            ),
            (
                "cnnf-x-device",
                lambda: cnnf.run_cycles(x.to(META)),
                ValueError,
                r"^x must be on the dev",
            ),
            (
                "cnnf-x-dtype",
                lambda: cnnf.run_average(x.double()),
                TypeError,
                r"^x must have the dtype",
            ),
            ("cnnf-x-list", lambda: cnnf.run_cycles(x.tolist()), TypeError, r"^x must be a torch"),
            ("cnnf-x-int", lambda: cnnf.run_cycles(x.long()), TypeError, r"^x must be a floating"),
            ("cnnf-cycles-np-bool", lambda: fb.CNNF(10, cycles=np.False_), TypeError, "^cycles"),
            (
                "cnnf-state_dict-shape",
                lambda: cnnf.load_state_dict({**sd, "fc1.weight": sd["fc1.weight"][:, :-1]}),
                ValueError,
                r"state_dict\['fc1\.weight'\] must have shape \(1000, 3136\)",
            ),
            (
                "cnnf-state_dict-unknown",
                lambda: cnnf.load_state_dict({**sd, "fc9.weight": torch.zeros(1)}),
                ValueError,
                r"unexpected: \['fc9\.weight'\]",
            ),
            (
                "cnnf-converted-wrong-conv",
                lambda: cnnf.load_state_dict(fb.convert_paper_state_dict(paper), strict=False),
                ValueError,
                r"state_dict\['conv1\.weight'\] must have shape \(16, 1, 3, 3\), got \(16, 1, 5",
            ),
            (
                "convert-bias-1d",
                lambda: fb.convert_paper_state_dict({"ins1_bias.bias": torch.zeros(3)}),
                ValueError,
                r"^ins1_bias\.bias must have shape \(1, C, 1, 1\) or \(1, C\), got \(3,\)",
            ),
            (
                "convert-unknown-key",
                lambda: fb.convert_paper_state_dict({**paper, "foo.bar": torch.zeros(1)}),
                ValueError,
                r"keys that the paper's CNNF and WideResNet do not: \['foo\.bar'\]",
            ),
            (
                "convert-value-numpy",
                lambda: fb.convert_paper_state_dict({"conv1.conv.weight": np.zeros(3)}),
                TypeError,
                r"^state_dict\['conv1\.conv\.weight'\] must be a Tensor",
            ),
            (
                "feedback_step-model",
                lambda: fb.feedback_step(torch.nn.Linear(2, 2), x, x),
                TypeError,
                r"^model must be a FeedbackNetwork, got Linear",
            ),
            (
                "feedback_step-out-shape",
                lambda: stepped(out_fn=lambda o: o[:1]),
                ValueError,
                r"^out must have the shape of the model's last output \(2, 10\), got \(1, 10\)",
            ),
            (
                "feedback_step-ff-shape",
                lambda: stepped(ff_fn=lambda f: f[..., :14]),
                ValueError,
                r"^ff must have the shape of the map fed back at unit 0",
            ),
            (
                "feedback_step-ff-dtype",
                lambda: stepped(ff_fn=lambda f: f.double()),
                TypeError,
                r"^ff must have the dtype of out",
            ),
            (
                "conv-x-smaller-than-kernel",
                lambda: conv(torch.randn(1, 3, 2, 5)),
                ValueError,
                r"^x must be at least the kernel size \(3, 3\)",
            ),
            (
                "gap-feedback-channels",
                lambda: gap.feedback(torch.randn(2, 5)),
                ValueError,
                r"^z must have 3 channels",
            ),
            (
                "wrn-x-30x30",
                lambda: fb.CNNFWideResNet(10, 10, cycles=1).run_cycles(torch.randn(1, 3, 30, 30)),
                ValueError,
                r"^x must be images of shape \(N, 3, H, W\) with H and W positive multiples of 4",
            ),
        ],
        cnnf,
        x,
    )


_MODEL_CASES, _CNNF, _IMAGE = _models_cases()


def _params():
    """(id, call, error, regex, follow-up) for every row of the catalogue."""
    rows = []
    for backend in ("reference", "cpu", "triton"):

        def att_ok(b=backend):
            q = torch.randn(1, 2, 5, 3)
            assert screened_attention(q, q, q, np.int64(2), np.uint8(1), backend=b).shape == q.shape

        for name, (kwargs, exc, regex) in ATTENTION.items():
            if backend == "triton" and name not in TRITON_SAMPLE:
                continue  # the checks precede dispatch; the interpreter's follow-ups are slow
            rows.append(
                (
                    f"attention-{backend}-{name}",
                    lambda kw=kwargs, b=backend: screened_attention(**kw, backend=b),
                    exc,
                    regex,
                    att_ok,
                )
            )
        for name, (call, exc, regex) in FEEDBACK_OPS.items():
            rows.append(
                (
                    f"feedback-{backend}-{name}",
                    lambda c=call, b=backend: c(b),
                    exc,
                    regex,
                    (lambda b=backend: _feedback_ok(b))
                    if backend != "triton"
                    else _feedback_ok_triton,
                )
            )
    # the checks of screened_attention and its Triton op, called directly (the reference
    # function takes checked arguments)
    for name, (kwargs, exc, regex) in ATTENTION.items():
        if "return_state" not in name:
            rows.append(
                (
                    f"attention-checks-{name}",
                    lambda kw=kwargs: check_attention_inputs(**kw),
                    exc,
                    regex,
                    lambda: screened_attention_reference(**_qkv()),
                )
            )
    for name, (backend, regex) in ATTENTION_BACKENDS.items():
        rows.append(
            (
                f"attention-backend-{name}",
                lambda b=backend: screened_attention(**_qkv(), backend=b),
                ValueError,
                regex,
                lambda: screened_attention(**_qkv()),
            )
        )
    for cls in (RelRNN, RelLSTM):
        m = cls(3, 4, 2, 1)
        x = torch.randn(5, 2, 3)
        for backend in ("reference", "cpu"):

            def rnn_ok(m=m, x=x, b=backend):
                assert m(x, torch.zeros(2, 4), backend=b)[0].shape == (5, 2, 4)

            for name, (call, exc, regex) in RNN_FORWARD.items():
                rows.append(
                    (
                        f"{cls.__name__}-{backend}-{name}",
                        lambda c=call, m=m, x=x, b=backend: c(m, x, b),
                        exc,
                        regex,
                        rnn_ok,
                    )
                )
        for name, (backend, regex) in RNN_BACKENDS.items():
            rows.append(
                (
                    f"{cls.__name__}-backend-{name}",
                    lambda m=m, x=x, b=backend: m(x, backend=b),
                    ValueError,
                    regex,
                    lambda m=m, x=x: m(x),
                )
            )
    rnn = RelRNN(3, 4, 2, 1)
    for case in _rnn_ctor_cases():
        rows.append((*case, lambda: rnn(torch.randn(5, 2, 3))))

    def cnnf_ok():
        out = _CNNF.run_cycles(_IMAGE)
        assert out.shape == (2, 10) and out.isfinite().all()

    for case in _MODEL_CASES:
        rows.append((*case, cnnf_ok))
    return rows


ROWS = _params()


def test_the_catalogue_is_large_and_its_ids_unique():
    ids = [row[0] for row in ROWS]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


@pytest.mark.parametrize(
    ("case", "call", "exc", "regex", "follow_up"), ROWS, ids=[r[0] for r in ROWS]
)
def test_malformed_call_raises_a_clear_error(case, call, exc, regex, follow_up):
    with pytest.raises(exc, match=regex) as info:
        call()
    # exactly a ValueError or TypeError (or the state_dict errors, which are also what torch's
    # load_state_dict raises), not some deeper error that happens to subclass one
    allowed = {"ValueError", "TypeError", "StateDictError", "StateDictTypeError"}
    assert type(info.value).__name__ in allowed, repr(info.value)
    follow_up()  # the process and the objects involved are still usable


def test_integral_sizes_are_accepted():
    """numpy integers (anything ``operator.index`` takes) are sizes like ints, everywhere."""
    q = torch.randn(1, 1, 6, 2, dtype=torch.float64)
    want = screened_attention(q, q, q, 2, 1)
    for backend in ("reference", "cpu", "triton"):
        got = screened_attention(q, q, q, np.int32(2), np.uint64(1), backend=backend)
        torch.testing.assert_close(got, want)
    m = RelLSTM(np.int64(3), np.int16(4), np.int8(2), np.uint8(1))
    assert (m.input_size, m.window, m.relevant) == (3, 2, 1)
    assert type(m.window) is int
    assert fb.AdaPool2d(np.int64(2)).kernel_size == 2


def test_huge_relevant_without_state_allocates_nothing_of_size_rho():
    """``relevant >= T - window`` is full causal attention; without ``return_state`` a huge
    value must not allocate ρ slots per row (with the state it has to: the state has ρ slots)."""
    q, k, v = torch.randn(3, 1, 2, 9, 3, dtype=torch.float64).unbind(0)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for backend in ("reference", "cpu", "triton"):
        torch.testing.assert_close(screened_attention(q, k, v, 3, 2**62, backend=backend), full)
    # and below that, a larger relevant than T - window changes nothing either
    torch.testing.assert_close(
        screened_attention(q, k, v, 3, 7, backend="cpu"),
        screened_attention_reference(q, k, v, 3, 7)[0],  # not capped: the definition
    )


def test_triton_on_cpu_without_the_interpreter_says_why():
    """conftest sets TRITON_INTERPRET=1 before triton is imported, so run without it in a fresh
    process: backend='triton' on CPU tensors is a ValueError naming the fix, and the process
    goes on (the auto backend still works there)."""
    script = """
import torch, screening_attn
from screening_attn import feedback as fb
x = torch.randn(1, 1, 4, 2)
for call in (
    lambda: screening_attn.screened_attention(x, x, x, 2, 1, backend="triton"),
    lambda: fb.ada_relu(x, backend="triton"),
    lambda: fb.ins_norm(x, backend="triton"),
    lambda: fb.ada_pool2d(x[..., :2], None, 2, backend="triton"),
):
    try:
        call()
    except ValueError as e:
        assert "TRITON_INTERPRET=1" in str(e) and "backend='triton'" in str(e), e
    else:
        raise SystemExit("no error")
assert screening_attn.screened_attention(x, x, x, 2, 1).shape == x.shape
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
