"""The CNN-F networks (docs/feedback.md): CNNF and CNNFWideResNet against oracles written with
torch.nn.functional (the first pass is a plain CNN; the cycles follow the documented wiring and
the paper's code), gradcheck through the cycles, the networks on the kernels against the
reference, feedback_step and feedback_update, torch.compile, empty batches and non-finite
inputs, the converter of the paper's checkpoints; errors."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from _feedback_utils import (
    BACKENDS,
    F64,
    assert_non_finite_stays_in_its_plane,
    ins_oracle,
    plane_inputs,
    randomize,
)
from _ids import dtype_id
from _tolerances import assert_close
from torch import nn

from screening_attn.feedback import (
    CNNF,
    AdaPool2d,
    AdaReLU,
    Bias,
    CNNFWideResNet,
    FeedbackConv2d,
    FeedbackLinear,
    FeedbackNetwork,
    Flatten,
    GlobalAvgPool2d,
    InsNorm,
    WideBasicBlock,
    convert_paper_state_dict,
    feedback_step,
    functional,
)


# --- oracles: the gates --------------------------------------------------------------------------
def _where0(mask, x):
    return torch.where(mask, x, torch.zeros_like(x))


class Gates:
    """AdaReLU / AdaPool as docs/feedback.md defines them, written with torch.where and
    F.max_pool2d / F.max_unpool2d."""

    def __init__(self, eta):
        self.eta, self.hidden, self.state = eta, {}, {}

    def relu(self, name, x):
        h = self.hidden.get(name)
        if h is None:
            mask = x > 0
        else:
            x = x + self.eta * (h - x)
            mask = x * h > 0
        self.state[name] = mask
        return _where0(mask, x)

    def relu_fb(self, name, z):
        self.hidden[name] = z
        return _where0(self.state[name], z)

    def pool(self, name, x):
        h = self.hidden.get(name)
        vmax, imax = F.max_pool2d(x, 2, return_indices=True)
        size = x.shape[-2:]
        if h is None:
            self.state[name] = (imax, None, None, None, size)
            return vmax
        negmin, imin = F.max_pool2d(-x, 2, return_indices=True)
        pos, neg = h > 0, h < 0
        self.state[name] = (imax, imin, pos, neg, size)
        return torch.where(pos, vmax, torch.where(neg, -negmin, torch.zeros_like(vmax)))

    def pool_fb(self, name, z):
        self.hidden[name] = z
        imax, imin, pos, neg, size = self.state[name]
        if pos is None:
            return F.max_unpool2d(z, imax, 2, output_size=size)
        return F.max_unpool2d(_where0(pos, z), imax, 2, output_size=size) + F.max_unpool2d(
            _where0(neg, z), imin, 2, output_size=size
        )


# --- oracles: the paper's state_dict layout ------------------------------------------------------
# The paper's state_dict layout (GitHub yjhuangcd/CNNF, model_mnist.py / model_cifar.py /
# layers.py), filled from our model's tensors. P is the paper's parameter dict; the oracles
# below read only paper keys.


def paper_cnnf(model):
    sd = {}
    for i in range(1, 5):
        w = model.get_submodule(f"conv{i}").weight
        sd[f"conv{i}.conv.weight"] = w
        sd[f"conv{i}.conv_t.weight"] = w
        sd[f"ins{i}_bias.bias"] = model.get_submodule(f"ins{i}_bias").bias.view(1, -1, 1, 1)
    for i in range(1, 4):
        w = model.get_submodule(f"fc{i}").weight
        sd[f"fc{i}.weight"] = w
        sd[f"fc{i}.linear.weight"] = w
        sd[f"fc{i}.linear_t.weight"] = w.t()
        sd[f"fc{i}_bias.bias"] = model.get_submodule(f"fc{i}_bias").bias.view(1, -1)
    return sd


def paper_wrn(model):
    sd = {}

    def conv(key, module):
        sd[f"{key}.conv.weight"] = module.weight
        sd[f"{key}.conv_t.weight"] = module.weight

    conv("conv1", model.conv1)
    for g, group in enumerate((model.block1, model.block2, model.block3), start=1):
        for i, blk in enumerate(group):
            key = f"block{g}.layer.{i}"
            sd[f"{key}.ins1_bias.bias"] = blk.ins1_bias.bias.view(1, -1, 1, 1)
            conv(f"{key}.conv1", blk.conv1)
            sd[f"{key}.ins2_bias.bias"] = blk.ins2_bias.bias.view(1, -1, 1, 1)
            conv(f"{key}.conv2", blk.conv2)
            if blk.conv_shortcut is not None:
                conv(f"{key}.conv_shortcut", blk.conv_shortcut)
    sd["ins1_bias.bias"] = model.ins1_bias.bias.view(1, -1, 1, 1)
    sd["fc.weight"] = model.fc.weight
    sd["fc.linear.weight"] = model.fc.weight
    sd["fc.linear_t.weight"] = model.fc.weight.t()
    sd["fc_bias.bias"] = model.fc_bias.bias.view(1, -1)
    return sd


def _detached(sd):
    return {k: v.detach().clone() for k, v in sd.items()}


# --- network oracles: docs/feedback.md's wiring for CNNF, the paper's code for the Wide ResNet --


def oracle_cnnf(P, x, ind, eta, cycles):
    """Returns the logits of the first pass and of every cycle, and the ff of every cycle."""
    gates = Gates(eta)

    def forward(h, start):
        captured = h
        for i in range(1, 5):
            if i - 1 < start:
                continue
            if i - 1 == ind:
                captured = h
            h = F.conv2d(h, P[f"conv{i}.conv.weight"], padding=1)
            h = gates.relu(f"relu{i}", ins_oracle(h) + P[f"ins{i}_bias.bias"])
            if i >= 3:
                h = gates.pool(f"pool{i}", h)
        h = h.flatten(1)
        for i in range(1, 4):
            h = h @ P[f"fc{i}.linear.weight"].T + P[f"fc{i}_bias.bias"]
            if i < 3:
                h = gates.relu(f"relu{i + 4}", h)
        return h, captured

    def feedback(z):
        # linear_t is nn.Linear(out, in) with weight W^T: linear_t(z) = z @ (W^T)^T
        z = gates.relu_fb("relu6", z @ P["fc3.linear_t.weight"].T)
        z = gates.relu_fb("relu5", z @ P["fc2.linear_t.weight"].T)
        z = (z @ P["fc1.linear_t.weight"].T).view(-1, 64, 7, 7)
        for i in (4, 3, 2, 1):
            if i - 1 < ind:
                break
            z = ins_oracle(z)
            if i >= 3:
                z = gates.pool_fb(f"pool{i}", z)
            z = gates.relu_fb(f"relu{i}", z)
            z = F.conv_transpose2d(z, P[f"conv{i}.conv_t.weight"], padding=1)
        return z

    out, ff = forward(x, 0)
    logits, ffs = [out], [ff]
    for _ in range(cycles):
        ff = ff + eta * (feedback(out) - ff)
        out, _ = forward(ff, ind)
        logits.append(out)
        ffs.append(ff)
    return logits, ffs


def oracle_wrn(P, x, ind, eta, cycles):
    """The paper's WideResNet/NetworkBlock/BasicBlock control flow, written with F ops."""
    gates = Gates(eta)
    n = 1 + max(int(k.split(".")[2]) for k in P if k.startswith("block1.layer."))

    def bias(key):
        return P[f"{key}.bias"]

    def block(g, i, x):
        key = f"block{g}.layer.{i}"
        w1 = P[f"{key}.conv1.conv.weight"]
        equal = w1.shape[0] == w1.shape[1]
        assert (f"{key}.conv_shortcut.conv.weight" in P) == (not equal)
        stride = 2 if g > 1 and i == 0 else 1
        a = gates.relu(f"{key}.relu1", ins_oracle(x) + bias(f"{key}.ins1_bias"))
        o = F.conv2d(a, w1, stride=stride, padding=1)
        o = gates.relu(f"{key}.relu2", ins_oracle(o) + bias(f"{key}.ins2_bias"))
        o = F.conv2d(o, P[f"{key}.conv2.conv.weight"], padding=1)
        if equal:
            return x + o
        return F.conv2d(a, P[f"{key}.conv_shortcut.conv.weight"], stride=stride) + o

    def block_fb(g, i, z):
        key = f"block{g}.layer.{i}"
        w1 = P[f"{key}.conv1.conv_t.weight"]
        equal = w1.shape[0] == w1.shape[1]
        stride = 2 if g > 1 and i == 0 else 1
        extra = 1 if stride > 1 else 0
        o = ins_oracle(F.conv_transpose2d(z, P[f"{key}.conv2.conv_t.weight"], padding=1))
        o = gates.relu_fb(f"{key}.relu2", o)
        o = F.conv_transpose2d(o, w1, stride=stride, padding=1, output_padding=extra)
        o = ins_oracle(o)
        if not equal:
            sc = P[f"{key}.conv_shortcut.conv_t.weight"]
            o = o + F.conv_transpose2d(z, sc, stride=stride, output_padding=extra)
        o = gates.relu_fb(f"{key}.relu1", o)
        return z + o if equal else o

    def forward(h, first):
        captured = h
        if first or ind == 0:
            h = F.conv2d(h, P["conv1.conv.weight"], padding=1)
        for g in (1, 2, 3):
            for i in range(n):
                if g == 1 and not first and i < ind:
                    continue
                h = block(g, i, h)
                if g == 1 and first and i + 1 == ind:
                    captured = h
        h = gates.relu("relu", ins_oracle(h) + bias("ins1_bias"))
        h = F.avg_pool2d(h, 8).flatten(1)
        return h @ P["fc.linear.weight"].T + bias("fc_bias"), captured

    def feedback(z):
        z = (z @ P["fc.linear_t.weight"].T)[:, :, None, None]
        z = gates.relu_fb("relu", ins_oracle(F.interpolate(z, scale_factor=8)))
        for g in (3, 2, 1):
            for i in reversed(range(n)):
                if g == 1 and i < ind:
                    continue
                z = block_fb(g, i, z)
        if ind == 0:
            z = F.conv_transpose2d(z, P["conv1.conv_t.weight"], padding=1)
        return z

    out, ff = forward(x, True)
    logits = [out]
    for _ in range(cycles):
        ff = ff + eta * (feedback(out) - ff)
        out, _ = forward(ff, False)
        logits.append(out)
    return logits


def plain_cnnf(P, x):
    """The first pass is an ordinary CNN: conv, ins, bias, relu, max-pool, linear."""
    h = x
    for i in range(1, 5):
        h = F.conv2d(h, P[f"conv{i}.conv.weight"], padding=1)
        h = F.relu(ins_oracle(h) + P[f"ins{i}_bias.bias"])
        if i >= 3:
            h = F.max_pool2d(h, 2)
    h = h.flatten(1)
    h = F.relu(F.linear(h, P["fc1.linear.weight"]) + P["fc1_bias.bias"])
    h = F.relu(F.linear(h, P["fc2.linear.weight"]) + P["fc2_bias.bias"])
    return F.linear(h, P["fc3.linear.weight"]) + P["fc3_bias.bias"]


def plain_wrn(P, x, n):
    h = F.conv2d(x, P["conv1.conv.weight"], padding=1)
    for g, i in itertools.product((1, 2, 3), range(n)):
        key = f"block{g}.layer.{i}"
        stride = 2 if g > 1 and i == 0 else 1
        a = F.relu(ins_oracle(h) + P[f"{key}.ins1_bias.bias"])
        o = F.conv2d(a, P[f"{key}.conv1.conv.weight"], stride=stride, padding=1)
        o = F.relu(ins_oracle(o) + P[f"{key}.ins2_bias.bias"])
        o = F.conv2d(o, P[f"{key}.conv2.conv.weight"], padding=1)
        if f"{key}.conv_shortcut.conv.weight" in P:
            h = F.conv2d(a, P[f"{key}.conv_shortcut.conv.weight"], stride=stride) + o
        else:
            h = h + o
    h = F.relu(ins_oracle(h) + P["ins1_bias.bias"])
    h = F.avg_pool2d(h, 8).flatten(1)
    return F.linear(h, P["fc.linear.weight"]) + P["fc_bias.bias"]


# --- the networks against the oracles ---------------------------------------------------------
@pytest.mark.parametrize("ind", [0, 1, 2])
def test_cnnf_first_pass_is_plain_cnn(ind):
    model = randomize(CNNF(10, ind=ind, backend="reference").double())
    P = _detached(paper_cnnf(model))
    x = torch.randn(3, 1, 28, 28, dtype=F64)
    model.reset()
    out, ff = model.forward_capture(x, model.ff_unit)
    assert_close(out, plain_cnnf(P, x))
    h = x
    for i in range(1, ind + 1):
        h = F.relu(
            ins_oracle(F.conv2d(h, P[f"conv{i}.conv.weight"], padding=1)) + P[f"ins{i}_bias.bias"]
        )
    assert_close(ff, h)
    model.run_cycles(x)
    model.reset()
    assert_close(model(x), plain_cnnf(P, x))


@pytest.mark.parametrize("depth,widen,ind", [(10, 1, 0), (10, 2, 1), (16, 1, 2)])
def test_wide_resnet_first_pass_is_plain_cnn(depth, widen, ind):
    model = randomize(CNNFWideResNet(depth, 10, widen, ind=ind, backend="reference").double())
    n = (depth - 4) // 6
    assert len(model.block1) == n
    assert (model.block1[0].conv_shortcut is None) == (widen == 1)
    assert model.block2[0].conv_shortcut is not None and model.block2[0].conv1.stride == (2, 2)
    P = _detached(paper_wrn(model))
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    model.reset()
    assert_close(model(x), plain_wrn(P, x, n))


@pytest.mark.parametrize("ind", [0, 1, 2])
def test_cnnf_cycles_match_oracle(ind):
    eta = 0.3
    model = randomize(CNNF(10, ind=ind, cycles=2, res_param=eta, backend="reference").double())
    P = _detached(paper_cnnf(model))
    x = torch.randn(2, 1, 28, 28, dtype=F64)
    x_ours, x_oracle = x.clone().requires_grad_(), x.clone().requires_grad_()
    logits, ffs = oracle_cnnf(P, x_oracle, ind, eta, cycles=2)
    out = model.run_cycles(x_ours)
    assert_close(out, logits[-1])
    assert not torch.allclose(logits[-1], logits[0])  # the feedback did something
    assert_close(model.run_average(x), torch.stack(logits).mean(0).detach())
    # backward to the input through every cycle
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (logits[-1] * g).sum().backward()
    assert x_ours.grad.abs().sum() > 0
    assert_close(x_ours.grad, x_oracle.grad)
    # feedback_step is one cycle; run_average the mean over the first pass and the cycles
    model.reset()
    out, ff = model.forward_capture(x, model.ff_unit)
    steps = [out]
    for cycle in (1, 2):
        out, ff = feedback_step(model, out, ff)
        assert_close(out, logits[cycle].detach())
        assert_close(ff, ffs[cycle].detach())
        steps.append(out)
    assert_close(model.run_average(x), torch.stack(steps).mean(0))


@pytest.mark.parametrize("depth,widen,ind", [(10, 1, 0), (10, 2, 1), (16, 1, 2), (16, 2, 1)])
def test_wide_resnet_cycles_match_paper_wiring(depth, widen, ind):
    eta = 0.2
    model = CNNFWideResNet(depth, 10, widen, ind=ind, cycles=2, res_param=eta, backend="reference")
    model = randomize(model.double())
    P = _detached(paper_wrn(model))
    x = torch.randn(2, 3, 32, 32, dtype=F64, requires_grad=True)
    logits = oracle_wrn(P, x, ind, eta, cycles=2)
    assert_close(model.run_cycles(x), logits[-1])
    assert not torch.allclose(logits[-1], logits[0])
    assert_close(model.run_average(x), torch.stack(logits).mean(0))
    out = model.run_cycles(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(logits[-1].sum(), x)
    assert_close(grad, want)


class _RunCycles(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.run_cycles(x)


def _gradcheck_network(net, x):
    net = randomize(net.double())
    wrapper = _RunCycles(net)
    names = [n for n, _ in wrapper.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in wrapper.parameters()]

    def f(x, *ps):
        return torch.func.functional_call(wrapper, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), *params), eps=1e-6, atol=1e-5)


def test_gradcheck_cycles_small_cnn():
    eta = 0.3
    net = FeedbackNetwork(
        FeedbackConv2d(1, 2, 3, padding=1),
        InsNorm(),
        Bias(2),
        AdaReLU(eta, backend="reference"),
        AdaPool2d(2),
        InsNorm(bottom_up=False, top_down=True),
        FeedbackConv2d(2, 3, 3, stride=2, padding=1),
        InsNorm(),
        Bias(3),
        AdaReLU(eta, backend="reference"),
        InsNorm(bottom_up=False, top_down=True),
        Flatten(),
        FeedbackLinear(12, 5),
        Bias(5),
        AdaReLU(eta, backend="reference"),
        FeedbackLinear(5, 3),
        Bias(3),
        ff_unit=0,
        cycles=2,
        res_param=eta,
    )
    _gradcheck_network(net, torch.randn(2, 1, 8, 8, dtype=F64))


def test_gradcheck_cycles_wide_blocks_intermediate_ff():
    eta = 0.3
    net = FeedbackNetwork(
        FeedbackConv2d(1, 2, 3, padding=1),
        WideBasicBlock(2, 2, 1, eta, backend="reference"),
        WideBasicBlock(2, 3, 2, eta, backend="reference"),
        InsNorm(),
        Bias(3),
        AdaReLU(eta, backend="reference"),
        InsNorm(bottom_up=False, top_down=True),
        GlobalAvgPool2d(),
        FeedbackLinear(3, 2),
        Bias(2),
        ff_unit=1,
        cycles=2,
        res_param=eta,
    )
    _gradcheck_network(net, torch.randn(1, 1, 6, 6, dtype=F64))


def test_cnnf_backward_to_input_float32():
    model = CNNF(10, ind=2, cycles=2, backend="reference")
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    model.run_average(x).logsumexp(1).sum().backward()
    assert x.grad.isfinite().all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


# --- the networks on the kernels ------------------------------------------------------------------
def _small_network(backend):
    """conv, ins·bias·relu (fused), pool, top-down ins (fused with the gate), linear layers."""
    eta = 0.3
    return FeedbackNetwork(
        FeedbackConv2d(1, 2, 3, padding=1),
        InsNorm(backend=backend),
        Bias(2),
        AdaReLU(eta, backend=backend),
        InsNorm(bottom_up=False, top_down=True, backend=backend),
        FeedbackConv2d(2, 3, 3, padding=1),
        InsNorm(backend=backend),
        Bias(3),
        AdaReLU(eta, backend=backend),
        AdaPool2d(2, backend=backend),
        InsNorm(bottom_up=False, top_down=True, backend=backend),
        Flatten(),
        FeedbackLinear(48, 5),
        Bias(5),
        cycles=2,
        res_param=eta,
        backend=backend,
    )


def test_compile_fullgraph_feedback_step_matches_eager():
    torch._dynamo.reset()
    model = CNNF(10, ind=1, backend="cpu")
    x = torch.randn(2, 1, 28, 28)

    def start():
        model.reset()
        out, ff = model.forward_capture(x, model.ff_unit)
        return feedback_step(model, out, ff)  # gates set by a first cycle

    out, ff = start()
    eager = feedback_step(model, out, ff)
    state = [m.hidden for m in model.modules() if isinstance(m, AdaReLU)]
    out, ff = start()
    compiled = torch.compile(feedback_step, fullgraph=True)(model, out, ff)
    for a, b in zip(compiled, eager):
        assert_close(a, b)
    for m, h in zip((m for m in model.modules() if isinstance(m, AdaReLU)), state):
        if h is None:  # relu1: above ff (ind=1), never fed back
            assert m.hidden is None
        else:
            assert_close(m.hidden, h)  # the layers' state was updated as in eager mode


def _same_logits_and_input_grads(make, x):
    ref = randomize(make("reference").double())
    ker = make("cpu").double()
    ker.load_state_dict(ref.state_dict())
    results = []
    for model in (ref, ker):
        xi = x.clone().requires_grad_()
        out = model.run_average(xi)
        results.append((out, *torch.autograd.grad(out.logsumexp(1).sum(), xi)))
    for a, b in zip(*results):
        assert_close(a, b)
    assert results[1][1].abs().sum() > 0


@pytest.mark.parametrize("ind", [0, 2])
def test_cnnf_cpu_equals_reference(ind):
    _same_logits_and_input_grads(
        lambda backend: CNNF(10, ind=ind, cycles=2, res_param=0.3, backend=backend),
        torch.randn(2, 1, 28, 28, dtype=F64),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_half_cnnf_runs_its_gates_on_the_cpu_kernels(dtype, monkeypatch):
    """A half CNNF on CPU tensors under backend="auto" never calls a reference op, and its
    logits and input gradient are within twice the error of the same network run on the
    reference in that dtype (the truth: float64 on the same, exactly upcast, weights and
    images), plus 1e-2 of the largest entry: a gate that flips on a value within half rounding
    of zero moves a whole network's outputs."""
    base = randomize(CNNF(10, ind=0, cycles=2, res_param=0.3, backend="auto")).to(dtype)
    x = torch.randn(2, 1, 28, 28).to(dtype)

    def run(model, t):
        t = t.clone().requires_grad_()
        out = model.run_cycles(t)
        return out.detach(), *torch.autograd.grad(out.float().logsumexp(1).sum(), t)

    with monkeypatch.context() as m:
        for name in functional.__all__:
            m.setattr(functional.reference, name, None)  # any reference call raises TypeError
        got = run(base, x)
    base.set_backend("reference")
    lowp = run(base, x)
    want = run(base.double(), x.double())
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for a, b, c in zip(got, want, lowp, strict=True):
        err = (a.double() - b).abs().max().item()
        assert err <= 2 * (c.double() - b).abs().max().item() + 1e-2 * b.abs().max().item()
    assert got[1].abs().sum() > 0


@pytest.mark.parametrize("widen,ind", [(1, 0), (2, 1)])
def test_wide_resnet_cpu_equals_reference(widen, ind):
    _same_logits_and_input_grads(
        lambda backend: CNNFWideResNet(10, 10, widen, ind=ind, res_param=0.2, backend=backend),
        torch.randn(2, 3, 32, 32, dtype=F64),
    )


def test_small_network_triton_equals_reference():
    _same_logits_and_input_grads(
        lambda backend: _small_network("triton" if backend == "cpu" else backend),
        torch.randn(2, 1, 8, 8, dtype=F64),
    )


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_empty_batch(backend):
    """N = 0 runs a whole CNN-F (forward and backward) to empty results. (The ops:
    test_feedback_stages.py.)"""
    model = CNNF(10, cycles=1, backend=backend)
    logits = model.run_cycles(torch.randn(0, 1, 28, 28, requires_grad=True))
    assert logits.shape == (0, 10)
    logits.sum().backward()


def test_nan_in_one_image_leaves_the_others_logits_and_gradients():
    """CNN-F run_cycles mixes nothing across the batch: a NaN or +Inf pixel in image 0 leaves
    the logits and input gradients of image 1 unchanged (only the shared weights' gradients see
    both). The per-op test above covers Triton; the whole network under its interpreter is slow."""
    torch.manual_seed(0)
    model = CNNF(10, cycles=1).double()
    x = torch.randn(2, 1, 28, 28, dtype=F64)
    for backend in ("reference", "cpu"):
        model.set_backend(backend)
        xc = x.clone().requires_grad_()
        clean = model.run_cycles(xc)
        (clean_grad,) = torch.autograd.grad(clean.sum(), xc)
        for bad in (float("nan"), float("inf")):
            xb = x.clone()
            xb[0, 0, 10, 12] = bad
            xb.requires_grad_()
            out = model.run_cycles(xb)
            (grad,) = torch.autograd.grad(out.sum(), xb)
            assert torch.equal(out[1], clean[1]) and torch.equal(grad[1], clean_grad[1])
            assert not out[0].isfinite().all() or not torch.equal(out[0], clean[0])


# --- feedback_update -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_feedback_update_non_finite_stays_in_its_plane(backend, bad):
    t = plane_inputs()
    assert_non_finite_stays_in_its_plane(
        lambda x: functional.feedback_update(x, t.hidden, 0.1, backend=backend), t.x, bad
    )


def test_feedback_update_errors_name_the_argument():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="rec"):
        functional.feedback_update(x, x[0], 0.1)


# --- the converter of the paper's checkpoints ----------------------------------------------------
def test_convert_cnnf_state_dict_same_logits():
    src = randomize(CNNF(10, ind=2, backend="reference"))
    paper = _detached(paper_cnnf(src))
    converted = convert_paper_state_dict(paper)
    dst = CNNF(10, ind=2, backend="reference")
    assert set(converted) == set(dst.state_dict())
    dst.load_state_dict(converted)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(dst.run_average(x), src.run_average(x))


@pytest.mark.parametrize("depth,widen", [(10, 2), (16, 1)])
def test_convert_wide_resnet_state_dict_same_logits(depth, widen):
    src = randomize(CNNFWideResNet(depth, 10, widen, ind=1, backend="reference"))
    converted = convert_paper_state_dict(_detached(paper_wrn(src)))
    dst = CNNFWideResNet(depth, 10, widen, ind=1, backend="reference")
    assert set(converted) == set(dst.state_dict())
    dst.load_state_dict(converted)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(dst.run_cycles(x), src.run_cycles(x))


def test_convert_gradients_sum_the_untied_linear_t():
    """The paper's linear_t is its own parameter: its gradient (transposed) adds to W's; its
    conv_t is the conv's parameter, whose gradient already holds both uses."""
    eta = 0.1
    model = randomize(CNNF(10, ind=0, cycles=1, res_param=eta, backend="reference").double())
    x = torch.randn(2, 1, 28, 28, dtype=F64)
    g = torch.randn(2, 10, dtype=F64)
    (model.run_average(x) * g).sum().backward()

    # the paper's parameters: conv and conv_t one tensor, linear and linear_t two
    paper = {}
    for key, value in _detached(paper_cnnf(model)).items():
        if key.endswith("conv_t.weight"):
            paper[key] = paper[key.replace("conv_t", "conv")]
        elif key.endswith("linear.weight"):
            paper[key] = paper[key[: -len("linear.weight")] + "weight"]
        else:
            paper[key] = value.requires_grad_()
    logits, _ = oracle_cnnf(paper, x, 0, eta, cycles=1)
    (torch.stack(logits).mean(0) * g).sum().backward()
    # named_parameters() of the paper's model: no conv_t (same parameter), fc.weight not
    # fc.linear.weight (same parameter, registered first)
    grads = {k: v.grad for k, v in paper.items() if "conv_t" not in k and "linear.weight" not in k}
    assert grads["fc1.linear_t.weight"].abs().sum() > 0
    converted = convert_paper_state_dict(grads, gradients=True)
    ours = {name: p.grad for name, p in model.named_parameters()}
    assert set(converted) == set(ours)
    for name in ours:
        assert_close(converted[name], ours[name])
    # a state_dict-like gradient dict lists the shared conv gradient twice: counted once
    both = dict(
        grads, **{k.replace(".conv.", ".conv_t."): v for k, v in grads.items() if ".conv." in k}
    )
    assert_close(
        convert_paper_state_dict(both, gradients=True)["conv2.weight"], ours["conv2.weight"]
    )
    # None gradients count as zero
    partial = dict(grads, **{"fc1.linear_t.weight": None})
    assert torch.equal(
        convert_paper_state_dict(partial, gradients=True)["fc1.weight"], grads["fc1.weight"]
    )


def test_convert_rejects_inconsistent_and_unknown():
    paper = _detached(paper_cnnf(CNNF(10)))
    bad = dict(paper)
    bad["conv3.conv_t.weight"] = paper["conv3.conv_t.weight"] + 1
    with pytest.raises(ValueError, match=r"conv3\.conv_t\.weight"):
        convert_paper_state_dict(bad)
    bad = dict(paper)
    bad["fc2.linear_t.weight"] = paper["fc2.linear_t.weight"].clone()
    bad["fc2.linear_t.weight"][0, 0] += 1
    with pytest.raises(ValueError, match=r"fc2\.linear_t\.weight.*gradients=True"):
        convert_paper_state_dict(bad)
    bad = dict(paper)
    bad["fc2.weight"] = paper["fc2.weight"] * 2
    with pytest.raises(ValueError, match=r"fc2\.weight"):
        convert_paper_state_dict(bad)
    bad = dict(paper)
    bad["fc3.linear_t.weight"] = paper["fc3.linear.weight"]  # not transposed
    with pytest.raises(ValueError, match=r"fc3\.linear_t\.weight"):
        convert_paper_state_dict(bad)
    for key in ("module.conv1.conv.weight", "conv1.conv.bias", "relu1.hidden", "fc1.linear.bias"):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            convert_paper_state_dict({**paper, key: torch.zeros(1)})
    with pytest.raises(ValueError, match=r"ins2_bias\.bias.*\(1, C, 1, 1\)"):
        convert_paper_state_dict({**paper, "ins2_bias.bias": torch.zeros(1, 32, 2, 1)})
    with pytest.raises(TypeError, match="state_dict"):
        convert_paper_state_dict([("conv1.conv.weight", torch.zeros(1))])
    with pytest.raises(TypeError, match=r"conv1\.conv\.weight"):
        convert_paper_state_dict({"conv1.conv.weight": None})
    with pytest.raises(TypeError, match="gradients"):
        convert_paper_state_dict(paper, gradients=1)


# --- errors --------------------------------------------------------------------------------------
def _cases():
    return [
        ("net-ff-unit", lambda: FeedbackNetwork(Bias(3), ff_unit=2), ValueError, "ff_unit"),
        ("cnnf-ind", lambda: CNNF(10, ind=3), ValueError, "ind"),
        ("cnnf-ind-float", lambda: CNNF(10, ind=1.0), TypeError, "ind"),
        ("cnnf-classes", lambda: CNNF(0), ValueError, "num_classes"),
        ("cnnf-cycles", lambda: CNNF(10, cycles=-1), ValueError, "cycles"),
        ("cnnf-eta", lambda: CNNF(10, res_param=math.inf), ValueError, "res_param"),
        ("cnnf-backend", lambda: CNNF(10, backend="tpu"), ValueError, "backend"),
        ("cnnf-set-backend", lambda: CNNF(10).set_backend("tpu"), ValueError, "backend"),
        (
            "cnnf-x-channels",
            lambda: CNNF(10).run_cycles(torch.randn(1, 3, 28, 28)),
            ValueError,
            r"x must be images of shape \(N, 1, 28, 28\)",
        ),
        ("cnnf-x-rank", lambda: CNNF(10).run_cycles(torch.randn(1, 28, 28)), ValueError, "x"),
        (
            "cnnf-x-size",
            lambda: CNNF(10).run_cycles(torch.randn(1, 1, 32, 32)),
            ValueError,
            r"x must be images of shape \(N, 1, 28, 28\) \(H, W in 28..31\), got \(1, 1, 32",
        ),
        ("wrn-depth", lambda: CNNFWideResNet(12, 10), ValueError, "depth"),
        ("wrn-depth-small", lambda: CNNFWideResNet(4, 10), ValueError, "depth"),
        ("wrn-widen", lambda: CNNFWideResNet(10, 10, widen_factor=0), ValueError, "widen_factor"),
        ("wrn-ind", lambda: CNNFWideResNet(10, 10, ind=2), ValueError, "ind"),
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, call, exc, text = case
    with pytest.raises(exc, match=text):
        call()
