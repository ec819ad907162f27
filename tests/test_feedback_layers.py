"""The CNN-F layers (docs/feedback.md), the sequential runner and its fusions: AdaReLU and
AdaPool2d through forward/feedback cycles (hand values, state, reference view), the tied
convolution and linear map, Bias / Flatten / GlobalAvgPool2d, FeedbackSequential's units, which
layers run fused and that a fused run leaves the layers the state of the plain one; errors.
(The ops the layers call: test_feedback_{gates,norms,pools,stages}.py.)"""

import math

import pytest
import torch
import torch.nn.functional as F
from _feedback_utils import F64, randomize
from _ids import case_id
from _tolerances import assert_close
from torch import nn

from screening_attn.feedback import (
    CNNF,
    AdaPool2d,
    AdaReLU,
    Bias,
    FeedbackConv2d,
    FeedbackLinear,
    FeedbackSequential,
    Flatten,
    GlobalAvgPool2d,
    InsNorm,
    ada_unpool_gate_layers,
    functional,
    ins_bias_ada_relu_pool_layers,
    ins_norm_gate_layers,
)


# --- AdaReLU and AdaPool2d -----------------------------------------------------------------------
def test_ada_relu_layer_hand_values():
    relu = AdaReLU(res_param=0.5, backend="reference")
    x = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5], dtype=F64)
    assert relu(x).tolist() == [1.0, 0.0, 3.0, 0.0, 0.5]
    z = torch.tensor([2.0, 2.0, -1.0, -2.0, 0.0], dtype=F64)
    assert relu.feedback(z).tolist() == [2.0, 0.0, -1.0, 0.0, 0.0]
    assert relu.hidden is z
    # x' = x + 0.5 (z - x) = [1.5, 0, 1, -3, 0.25]; gate x' z > 0: both negative passes too
    assert relu(x).tolist() == [1.5, 0.0, 0.0, -3.0, 0.0]
    assert relu.feedback(z).tolist() == [2.0, 0.0, 0.0, -2.0, 0.0]
    relu.reset()
    assert relu.hidden is None and relu.mask is None
    assert relu(x).tolist() == [1.0, 0.0, 3.0, 0.0, 0.5]


def test_ada_relu_layer_dispatches_through_functional(monkeypatch):
    calls = []
    real = functional.ada_relu

    def spy(x, hidden, eta, *, backend):
        calls.append((backend, eta, hidden))
        return real(x, hidden, eta, backend="reference")

    monkeypatch.setattr(functional, "ada_relu", spy)
    relu = AdaReLU(0.25, backend="cpu")
    x = torch.randn(3, 4)
    relu(x)
    relu.backend = "reference"
    relu.feedback(torch.ones(3, 4))
    relu(x)
    assert [(b, e) for b, e, _ in calls] == [("cpu", 0.25), ("reference", 0.25)]
    assert calls[0][2] is None and calls[1][2] is not None

    model = CNNF(10, backend="cpu")
    model.set_backend("reference")
    gates = [m for m in model.modules() if isinstance(m, AdaReLU)]
    assert len(gates) == 6 and all(m.backend == "reference" for m in gates)


def test_ada_pool_layer_cycle_hand_values():
    x = torch.tensor([[1, 5, -2, 0], [3, 2, -7, 4], [0, 0, 6, 6], [0, 0, 6, -1]], dtype=F64).view(
        1, 1, 4, 4
    )
    pool = AdaPool2d(2)
    assert pool(x).view(2, 2).tolist() == [[5, 4], [0, 6]]  # argmax 1, 7, 8 (tie), 10 (tie)
    z1 = torch.tensor([[2.0, -3.0], [0.5, -1.0]], dtype=F64).view(1, 1, 2, 2)
    rec = pool.feedback(z1)  # no gated forward yet: everything to the argmax positions
    assert rec.view(4, 4).tolist() == [[0, 2, 0, 0], [0, 0, 0, -3], [0.5, 0, -1, 0], [0, 0, 0, 0]]
    # gated by z1: max where z1 > 0, min where z1 < 0 (argmin 0, 6, 8, 15)
    xg = x.clone().requires_grad_()
    y = pool(xg)
    assert y.view(2, 2).tolist() == [[5, -7], [0, -1]]
    y.sum().backward()
    assert xg.grad.flatten().nonzero().flatten().tolist() == [1, 6, 8, 15]
    # the feedback uses the masks of the last forward (z1's signs), not z2's
    z2 = torch.tensor([[-1.0, 4.0], [3.0, 0.0]], dtype=F64).view(1, 1, 2, 2)
    rec = pool.feedback(z2)
    assert rec.view(4, 4).tolist() == [[0, -1, 0, 0], [0, 0, 4, 0], [3, 0, 0, 0], [0, 0, 0, 0]]
    # gated by z2; hidden = 0 gives 0
    assert pool(x).view(2, 2).tolist() == [[1, 4], [0, 0]]
    pool.reset()
    assert pool.hidden is None and pool.argmin is None
    assert pool(x).view(2, 2).tolist() == [[5, 4], [0, 6]]


def test_ada_pool_odd_sizes_and_nan():
    x = torch.randn(2, 3, 5, 7, dtype=F64)
    pool = AdaPool2d(2)
    y = pool(x)
    assert_close(y, F.max_pool2d(x, 2))
    rec = pool.feedback(torch.randn_like(y))
    assert rec.shape == x.shape and (rec[:, :, 4] == 0).all() and (rec[:, :, :, 6] == 0).all()
    x[0, 1, 2, 3] = float("nan")
    pool.reset()
    y = pool(x)
    assert y[0, 1, 1, 1].isnan() and y.isnan().sum() == 1


def test_ada_pool_non_contiguous_input():
    x = torch.randn(2, 3, 6, 4, dtype=F64)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert not xt.is_contiguous() and not xc.is_contiguous()
    for other in (xt, xc):
        assert torch.equal(AdaPool2d(2)(other), AdaPool2d(2)(x))
        assert_close(InsNorm()(other), InsNorm()(x))
    conv = FeedbackConv2d(3, 2, 3, padding=1).double()
    assert_close(conv(xt), conv(x))


def test_pool_layer_keeps_the_reference_view_of_its_state():
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    ref, ker = AdaPool2d(2, backend="reference"), AdaPool2d(2, backend="cpu")
    for layer in (ref, ker):
        layer(x)
        layer.feedback(
            torch.randn(2, 3, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
        )
        layer(x)
    for name in ("argmax", "argmin", "pos_mask", "neg_mask"):
        assert torch.equal(getattr(ref, name), getattr(ker, name))
    _, imax = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(ker.argmax, imax)
    ker.reset()
    assert ker.argmax is None and ker.argmin is None and ker.pos_mask is None


# --- the tied convolution and linear map, Bias, Flatten, GlobalAvgPool2d -------------------------
@pytest.mark.parametrize(
    "k,stride,padding,size",
    [
        pytest.param(*case, id=case_id(k=case[0], stride=case[1], padding=case[2], size=case[3]))
        for case in [(3, 1, 1, 6), (3, 2, 1, 8), (1, 2, 0, 6), (2, 1, 0, 5), (3, 3, 1, 9)]
    ],
)
def test_conv_feedback_is_conv_transpose_and_gradient_sums(k, stride, padding, size):
    conv = FeedbackConv2d(3, 5, k, stride, padding).double()
    x = torch.randn(2, 3, size, size, dtype=F64)
    y = conv(x)
    z = torch.randn_like(y)
    extra = 1 if stride > 1 else 0
    assert_close(y, F.conv2d(x, conv.weight, stride=stride, padding=padding))
    back = conv.feedback(z)
    assert_close(
        back,
        F.conv_transpose2d(z, conv.weight, stride=stride, padding=padding, output_padding=extra),
    )
    if back.shape == x.shape:  # then the feedback is the exact adjoint
        assert_close((y * z).sum(), (x * back).sum())
    gy, gb = torch.randn_like(y), torch.randn_like(back)
    ((conv(x) * gy).sum() + (conv.feedback(z) * gb).sum()).backward()
    w1 = conv.weight.detach().clone().requires_grad_()
    w2 = conv.weight.detach().clone().requires_grad_()
    loss = (F.conv2d(x, w1, stride=stride, padding=padding) * gy).sum()
    back2 = F.conv_transpose2d(z, w2, stride=stride, padding=padding, output_padding=extra)
    (loss + (back2 * gb).sum()).backward()
    assert_close(conv.weight.grad, w1.grad + w2.grad)
    assert len(list(conv.parameters())) == 1


def test_conv_stride2_maps_even_sizes_back_and_output_padding_override():
    conv = FeedbackConv2d(2, 4, 3, stride=2, padding=1)
    assert conv.feedback(conv(torch.randn(1, 2, 8, 8))).shape == (1, 2, 8, 8)
    conv = FeedbackConv2d(2, 4, 3, stride=2, padding=1, output_padding=0)
    assert conv.feedback(conv(torch.randn(1, 2, 7, 7))).shape == (1, 2, 7, 7)
    std = FeedbackConv2d(64, 128, 3).weight.std().item()
    assert abs(std - math.sqrt(2 / (9 * 128))) < 0.01  # He init as the paper's code


def test_linear_feedback_is_transpose_and_gradient_sums():
    lin = FeedbackLinear(7, 4).double()
    x, z = torch.randn(3, 7, dtype=F64), torch.randn(3, 4, dtype=F64)
    assert_close(lin(x), x @ lin.weight.T)
    assert_close(lin.feedback(z), z @ lin.weight)
    assert_close((lin(x) * z).sum(), (x * lin.feedback(z)).sum())
    gy, gb = torch.randn(3, 4, dtype=F64), torch.randn(3, 7, dtype=F64)
    ((lin(x) * gy).sum() + (lin.feedback(z) * gb).sum()).backward()
    w1 = lin.weight.detach().clone().requires_grad_()
    w2 = lin.weight.detach().clone().requires_grad_()
    ((F.linear(x, w1) * gy).sum() + ((z @ w2) * gb).sum()).backward()
    assert_close(lin.weight.grad, w1.grad + w2.grad)
    assert len(list(lin.parameters())) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_cpu_products_run_in_float32_where_not_native(dtype, monkeypatch):
    # on a CPU without oneDNN support for the dtype (this machine: AVX2, where ATen's half
    # convolutions are ~15x slower), the tied convolution and linear map compute in float32
    # from the half values and round once; with support, in ATen's half kernels. (Here ATen's
    # half convolution rounds the same float32 result, so the dtypes the kernels are handed
    # tell the paths apart, not the values.)
    from screening_attn.feedback import linear_maps

    upcast = linear_maps._upcast(torch.empty(0, dtype=dtype))
    assert upcast == (not torch.ops.mkldnn._is_mkldnn_bf16_supported()) or dtype != torch.bfloat16
    seen = []
    for name in ("conv2d", "conv_transpose2d", "linear"):
        real = getattr(F, name)
        monkeypatch.setattr(
            F,
            name,
            lambda a, w, *args, _real=real, **kw: seen.append(a.dtype) or _real(a, w, *args, **kw),
        )
    conv, lin = FeedbackConv2d(3, 5, 3, 2, 1), FeedbackLinear(7, 4)
    x, v = torch.randn(2, 3, 8, 8), torch.randn(3, 7)
    for layer, inp, ops in (
        (conv, x, (conv._conv, conv._conv_t)),
        (lin, v, (lambda a, w: F.linear(a, w), lambda a, w: a @ w)),
    ):
        w32 = layer.weight.detach().to(dtype).float()
        layer.to(dtype)
        xh = inp.to(dtype)
        y = layer(xh)
        z = torch.randn_like(y)
        back = layer.feedback(z)
        assert y.dtype == back.dtype == dtype
        assert seen and set(seen) == {torch.float32 if upcast else dtype}
        seen.clear()
        expect_y = ops[0](xh.float(), w32).to(dtype)
        expect_b = ops[1](z.float(), w32).to(dtype)
        if upcast:
            assert torch.equal(y, expect_y) and torch.equal(back, expect_b)
        else:
            torch.testing.assert_close(y, expect_y, rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(back, expect_b, rtol=2e-2, atol=2e-2)
        # the weight's gradient comes back in its dtype, summed over both uses
        (y.float().sum() + back.float().sum()).backward()
        assert layer.weight.grad is not None and layer.weight.grad.dtype == dtype


def test_bias_flatten_global_pool():
    bias = randomize(Bias(3).double())
    x = torch.randn(2, 3, 4, 5, dtype=F64)
    assert_close(bias(x), x + bias.bias.view(1, 3, 1, 1))
    assert_close(bias(x[:, :, 0, 0]), x[:, :, 0, 0] + bias.bias)
    assert bias.feedback(x) is x
    flat = Flatten()
    assert flat(x).shape == (2, 60)
    assert torch.equal(flat.feedback(flat(x)), x)
    gap = GlobalAvgPool2d()
    x8 = torch.randn(2, 3, 8, 8, dtype=F64)
    assert_close(gap(x8), F.avg_pool2d(x8, 8).flatten(1))
    z = torch.randn(2, 3, dtype=F64)
    assert_close(gap.feedback(z), F.interpolate(z[:, :, None, None], scale_factor=8))


# --- FeedbackSequential and its fusions ----------------------------------------------------------
def test_sequential_units_and_slices():
    inner = FeedbackSequential(Bias(2), AdaReLU())
    seq = FeedbackSequential(FeedbackConv2d(1, 2, 3, padding=1), inner, InsNorm())
    assert [type(u) for u in seq.units()] == [FeedbackConv2d, Bias, AdaReLU, InsNorm]
    assert isinstance(seq[1:], FeedbackSequential) and len(seq[1:]) == 2
    x = torch.randn(2, 1, 5, 5)
    out, captured = seq.forward_capture(x, 2)
    assert torch.equal(captured, inner[0](seq[0](x)))
    assert torch.equal(seq(captured, start=2), out)
    assert seq.feedback(out, stop=3).shape == out.shape
    assert seq.feedback(out).shape == x.shape


def test_models_run_the_fused_ops(monkeypatch):
    names = {
        "fwd": "ins_bias_ada_relu",
        "fwd_pool": "ins_bias_ada_relu_pool2d",
        "fb": "ins_norm_gate",
        "fb_pool": "ada_unpool_gate",
        "relu": "ada_relu",
    }
    calls = dict.fromkeys(names, 0)

    def spy(key, real):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        return wrapped

    for key, name in names.items():
        monkeypatch.setattr(functional, name, spy(key, getattr(functional, name)))
    model = CNNF(10, cycles=1, backend="cpu")
    model.run_cycles(torch.randn(2, 1, 28, 28))
    # two forward passes: stages 1-2 fused, stages 3-4 fused with their pools; one feedback:
    # stages 1-2 norm + gate, stages 3-4 unpool + gate; relu5 / relu6 run alone
    assert calls == {"fwd": 4, "fwd_pool": 4, "fb": 2, "fb_pool": 2, "relu": 4}
    assert set(model.state_dict()) == set(CNNF(10, backend="reference").state_dict())
    calls.update(dict.fromkeys(names, 0))
    model.set_backend("reference")  # the reference runs the plain composition
    model.run_cycles(torch.randn(2, 1, 28, 28))
    assert calls == {"fwd": 0, "fwd_pool": 0, "fb": 0, "fb_pool": 0, "relu": 12}


@pytest.mark.parametrize("gated", [False, True], ids=["first-pass", "gated"])
def test_fused_layers_leave_the_state_of_the_plain_ones(gated):
    """ins_bias_ada_relu_pool_layers, ada_unpool_gate_layers and ins_norm_gate_layers on the CPU
    leave the gate and the pool the state their own passes leave (the reference layers)."""
    x = torch.randn(2, 3, 8, 10, dtype=F64)
    runs = []
    for backend in ("reference", "cpu"):
        torch.manual_seed(1)  # the same bias and feedback signals for both
        ins, bias = InsNorm(backend=backend), randomize(Bias(3).double())
        relu, pool = AdaReLU(0.3, backend=backend), AdaPool2d(2, backend=backend)
        top = InsNorm(bottom_up=False, top_down=True, backend=backend)
        if gated:  # a first cycle stores feedback signals in both gates
            ins_bias_ada_relu_pool_layers(ins, bias, relu, pool, x)
            ada_unpool_gate_layers(relu, pool, torch.randn(2, 3, 4, 5, dtype=F64))
        y = ins_bias_ada_relu_pool_layers(ins, bias, relu, pool, x)
        state = [y, relu.mask, pool.argmax, pool.argmin, pool.pos_mask, pool.input_size]
        out = ada_unpool_gate_layers(relu, pool, torch.randn(2, 3, 4, 5, dtype=F64))
        state += [out, relu.hidden, pool.hidden]
        relu(torch.randn(2, 3, 8, 10, dtype=F64))
        state += [ins_norm_gate_layers(top, relu, torch.randn(2, 3, 8, 10, dtype=F64))]
        runs.append([*state, relu.hidden])
    for a, b in zip(*runs):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert_close(a, b)
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b
    assert (runs[1][3] is None) == (not gated)


# --- errors --------------------------------------------------------------------------------------
def test_layer_backend_errors():
    for call, text in [
        (lambda: AdaPool2d(2, backend="gpu"), "backend"),
        (lambda: InsNorm(backend=1), "backend"),
    ]:
        with pytest.raises(ValueError, match=text):
            call()


def _cases():
    x4 = torch.randn(2, 3, 4, 4)
    conv = FeedbackConv2d(3, 4, 3, padding=1)
    lin = FeedbackLinear(5, 2)
    pool = AdaPool2d(2)
    relu = AdaReLU()
    stale = AdaPool2d(2)
    stale(x4)
    stale.feedback(torch.randn(2, 3, 2, 2))
    stale_relu = AdaReLU()
    stale_relu(x4)
    stale_relu.feedback(torch.randn_like(x4))
    flat = Flatten()
    flat(x4)
    seq = FeedbackSequential(Bias(3), relu)
    return [
        ("pool-k-float", lambda: AdaPool2d(2.0), TypeError, "kernel_size"),
        ("pool-k-zero", lambda: AdaPool2d(0), ValueError, "kernel_size"),
        ("pool-k-bool", lambda: AdaPool2d(True), TypeError, "kernel_size"),
        ("pool-rank", lambda: pool(torch.randn(3, 4, 4)), ValueError, "x must be 4-d"),
        ("pool-int", lambda: pool(torch.ones(1, 1, 4, 4, dtype=torch.int64)), TypeError, "x"),
        ("pool-small", lambda: pool(torch.randn(1, 1, 1, 4)), ValueError, "x must be at least"),
        ("pool-fb-first", lambda: AdaPool2d(2).feedback(x4), RuntimeError, "forward"),
        ("pool-fb-shape", lambda: stale.feedback(torch.randn(2, 3, 4, 4)), ValueError, "z"),
        ("pool-stale", lambda: stale(torch.randn(1, 3, 4, 4)), ValueError, "reset"),
        ("relu-eta-nan", lambda: AdaReLU(float("nan")), ValueError, "res_param"),
        ("relu-eta-str", lambda: AdaReLU("0.1"), TypeError, "res_param"),
        ("relu-backend", lambda: AdaReLU(backend="gpu"), ValueError, "backend"),
        ("relu-fb-first", lambda: AdaReLU().feedback(x4), RuntimeError, "forward"),
        ("relu-fb-shape", lambda: stale_relu.feedback(torch.randn(2, 3, 4, 5)), ValueError, "z"),
        ("relu-stale", lambda: stale_relu(torch.randn(1, 3, 4, 4)), ValueError, "reset"),
        ("relu-int", lambda: AdaReLU()(torch.ones(3, dtype=torch.int32)), TypeError, "x"),
        ("ins-eps", lambda: InsNorm(eps=-1.0), ValueError, "eps"),
        ("ins-fb-rank", lambda: InsNorm(top_down=True).feedback(x4[0]), ValueError, "z"),
        ("conv-k", lambda: FeedbackConv2d(3, 4, 2.5), TypeError, "kernel_size"),
        ("conv-cin", lambda: FeedbackConv2d(0, 4, 3), ValueError, "in_channels"),
        ("conv-stride", lambda: FeedbackConv2d(3, 4, 3, stride=0), ValueError, "stride"),
        ("conv-pad", lambda: FeedbackConv2d(3, 4, 3, padding=-1), ValueError, "padding"),
        ("conv-pair", lambda: FeedbackConv2d(3, 4, (3, 3, 3)), ValueError, "kernel_size"),
        (
            "conv-opad",
            lambda: FeedbackConv2d(3, 4, 3, 2, output_padding=2),
            ValueError,
            "output_padding",
        ),
        ("conv-channels", lambda: conv(torch.randn(2, 5, 4, 4)), ValueError, "x must have 3"),
        ("conv-rank", lambda: conv(torch.randn(3, 4, 4)), ValueError, "x must be 4-d"),
        ("conv-dtype", lambda: conv(x4.double()), TypeError, "x must have the dtype"),
        ("conv-device", lambda: conv(x4.to("meta")), ValueError, "x must be on the device"),
        ("conv-fb-channels", lambda: conv.feedback(x4), ValueError, "z must have 4"),
        ("lin-features", lambda: lin(torch.randn(2, 4)), ValueError, "x must have 5"),
        ("lin-fb-features", lambda: lin.feedback(torch.randn(2, 5)), ValueError, "z must have 2"),
        ("lin-dtype", lambda: lin(torch.randn(2, 5, dtype=F64)), TypeError, "x"),
        ("lin-size", lambda: FeedbackLinear(5, -2), ValueError, "out_features"),
        ("bias-size", lambda: Bias(0), ValueError, "num_channels"),
        ("bias-channels", lambda: Bias(4)(x4), ValueError, "x must have 4"),
        ("bias-rank", lambda: Bias(4)(torch.randn(4)), ValueError, "x must be"),
        ("flatten-fb", lambda: flat.feedback(torch.randn(2, 47)), ValueError, "z must have 48"),
        ("gap-rank", lambda: GlobalAvgPool2d()(torch.randn(2, 3)), ValueError, "x must be 4-d"),
        ("seq-layer", lambda: FeedbackSequential(nn.ReLU()), TypeError, "FeedbackModule"),
        ("seq-start", lambda: seq(x4, start=3), ValueError, "start"),
        ("seq-stop", lambda: seq.feedback(x4, stop=-1), ValueError, "stop"),
        ("seq-start-float", lambda: seq(x4, start=1.0), TypeError, "start"),
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, call, exc, text = case
    with pytest.raises(exc, match=text):
        call()
