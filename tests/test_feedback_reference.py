"""CNN-F reference (SPEC §3) against independent oracles: formulas written inline, brute-force
pooling loops, torch.nn.functional compositions of the networks, and the paper's key layout."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from _tolerances import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
    FeedbackSequential,
    Flatten,
    GlobalAvgPool2d,
    InsNorm,
    WideBasicBlock,
    convert_paper_state_dict,
    feedback_step,
    functional,
    ins_norm,
    reference,
)

HYP = settings(
    deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
F64 = torch.float64


def _randomize(model: nn.Module, bias_std: float = 0.5) -> nn.Module:
    """Nonzero biases (they start at 0) so that a misplaced bias cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, bias_std)
    return model


# ---------------------------------------------------------------------------------------------
# Inline formulas


def ins_oracle(x, centered=False, eps=1e-8):
    n = x.shape[2] * x.shape[3]
    if centered:
        mean = x.sum(dim=(2, 3), keepdim=True) / n
        power = ((x - mean) ** 2).sum(dim=(2, 3), keepdim=True) / (n - 1)
    else:
        power = (x * x).sum(dim=(2, 3), keepdim=True) / n
    return x / (power + eps) ** 0.5


def brute_pool(x, k, largest):
    """Loop over every window in row-major order; a strictly better value replaces the best."""
    n_, c_, h, w = x.shape
    vals = torch.empty(n_, c_, h // k, w // k, dtype=x.dtype)
    idx = torch.empty(n_, c_, h // k, w // k, dtype=torch.int64)
    for n, c, i, j in itertools.product(range(n_), range(c_), range(h // k), range(w // k)):
        best, pos = None, None
        for r, s in itertools.product(range(i * k, i * k + k), range(j * k, j * k + k)):
            v = x[n, c, r, s].item()
            if best is None or (v > best if largest else v < best):
                best, pos = v, r * w + s
        vals[n, c, i, j], idx[n, c, i, j] = best, pos
    return vals, idx


def _where0(mask, x):
    return torch.where(mask, x, torch.zeros_like(x))


class Gates:
    """The SPEC's AdaReLU / AdaPool written with torch.where and F.max_pool2d/F.max_unpool2d."""

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


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Network oracles: SPEC §3's wiring for CNNF, the paper's code for the Wide ResNet.


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


# ---------------------------------------------------------------------------------------------
# ins_norm


@HYP
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 4),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    centered=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_ins_norm_matches_formula(n, c, h, w, centered, seed):
    if centered and h * w < 2:
        h = 2
    x = torch.randn(n, c, h, w, dtype=F64, generator=torch.Generator().manual_seed(seed))
    expected = ins_oracle(x, centered)
    assert_close(reference.ins_norm(x, 1e-8, centered), expected)
    assert_close(ins_norm(x, centered=centered), expected)
    assert_close(InsNorm(centered=centered)(x), expected)


def test_ins_norm_eps_and_directions():
    x = torch.randn(2, 3, 4, 5, dtype=F64)
    assert_close(ins_norm(x, eps=0.5), x / ((x * x).mean(dim=(2, 3), keepdim=True) + 0.5).sqrt())
    # centered: only the denominator uses the variance, x is not shifted
    y = ins_norm(x + 10.0, centered=True)
    assert_close(y, (x + 10.0) / (x.var(dim=(2, 3), keepdim=True) + 1e-8).sqrt())
    top_down = InsNorm(bottom_up=False, top_down=True)
    assert top_down(x) is x
    assert_close(top_down.feedback(x), ins_oracle(x))
    assert InsNorm().feedback(x) is x


def test_ins_norm_nan_stays_in_its_plane():
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    x[1, 2, 0, 3] = float("nan")
    y = ins_norm(x)
    assert y[1, 2].isnan().all()
    y[1, 2] = 0.0
    assert y.isfinite().all()


# ---------------------------------------------------------------------------------------------
# AdaReLU


@HYP
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), eta=st.floats(0.0, 1.0))
def test_ada_relu_reference_matches_spec(shape, eta):
    x, hidden = torch.randn(*shape, dtype=F64), torch.randn(*shape, dtype=F64)
    y, mask = reference.ada_relu(x, None, eta)
    assert torch.equal(mask, x > 0)
    assert_close(y, torch.where(x > 0, x, torch.zeros_like(x)))
    y, mask = reference.ada_relu(x, hidden, eta)
    moved = (1 - eta) * x + eta * hidden
    assert torch.equal(mask, torch.sign(moved) * torch.sign(hidden) > 0)
    assert_close(y, torch.where(mask, moved, torch.zeros_like(x)))


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


# ---------------------------------------------------------------------------------------------
# AdaPool


@HYP
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 3),
    k=st.integers(1, 3),
    extra_h=st.integers(0, 4),
    extra_w=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_pools_match_brute_force_with_ties(n, c, k, extra_h, extra_w, seed):
    h, w = k + extra_h, k + extra_w
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (n, c, h, w), generator=gen).to(F64)  # mostly ties
    for largest, pool in ((True, reference._max_pool2d), (False, reference._min_pool2d)):
        vals, idx = pool(x, k)
        want_vals, want_idx = brute_pool(x, k, largest)
        assert torch.equal(idx, want_idx)
        assert torch.equal(vals, want_vals)
    vals, idx = reference._max_pool2d(x, k)
    torch.testing.assert_close(vals, F.max_pool2d(x, k), rtol=0, atol=0)
    unpooled = reference._unpool2d(vals, idx, (h, w))
    torch.testing.assert_close(unpooled, F.max_unpool2d(vals, idx, k, output_size=(h, w)))
    layer = AdaPool2d(k)
    want_max, want_min = brute_pool(x, k, True)[0], brute_pool(x, k, False)[0]
    assert torch.equal(layer(x), want_max)
    assert torch.equal(layer.argmax, idx)
    hidden = torch.randint(-1, 2, want_max.shape, generator=gen).to(F64)
    layer.hidden = hidden
    want = torch.where(hidden > 0, want_max, torch.where(hidden < 0, want_min, 0.0))
    assert torch.equal(layer(x), want)


def test_pool_ties_go_to_first_element():
    windows = torch.tensor(
        [
            [[0.0, 0.0], [0.0, 0.0]],  # all tied: first for max and min
            [[1.0, 3.0], [3.0, 1.0]],  # max tie (0,1)/(1,0), min tie (0,0)/(1,1)
            [[3.0, 1.0], [1.0, 3.0]],
            [[-0.0, 0.0], [0.0, -1.0]],  # signed zeros tie
            [[2.0, 5.0], [5.0, 5.0]],
        ],
        dtype=F64,
    )
    x = windows.view(1, 5, 2, 2)
    vals, idx = reference._max_pool2d(x, 2)
    assert idx.flatten().tolist() == [0, 1, 0, 0, 1]
    assert vals.flatten().tolist() == [0.0, 3.0, 3.0, 0.0, 5.0]
    vals, idx = reference._min_pool2d(x, 2)
    assert idx.flatten().tolist() == [0, 0, 1, 3, 0]
    assert vals.flatten().tolist() == [0.0, 1.0, 1.0, -1.0, 2.0]


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


# ---------------------------------------------------------------------------------------------
# Tied conv / linear


@pytest.mark.parametrize(
    "k,stride,padding,size",
    [(3, 1, 1, 6), (3, 2, 1, 8), (1, 2, 0, 6), (2, 1, 0, 5), (3, 3, 1, 9)],
    ids=lambda v: str(v),
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


def test_bias_flatten_global_pool():
    bias = _randomize(Bias(3).double())
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


# ---------------------------------------------------------------------------------------------
# Networks


@pytest.mark.parametrize("ind", [0, 1, 2])
def test_cnnf_first_pass_is_plain_cnn(ind):
    model = _randomize(CNNF(10, ind=ind, backend="reference").double())
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
    model = _randomize(CNNFWideResNet(depth, 10, widen, ind=ind, backend="reference").double())
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
    model = _randomize(CNNF(10, ind=ind, cycles=2, res_param=eta, backend="reference").double())
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
    model = _randomize(model.double())
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
    net = _randomize(net.double())
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


# ---------------------------------------------------------------------------------------------
# Converter


def test_convert_cnnf_state_dict_same_logits():
    src = _randomize(CNNF(10, ind=2, backend="reference"))
    paper = _detached(paper_cnnf(src))
    converted = convert_paper_state_dict(paper)
    dst = CNNF(10, ind=2, backend="reference")
    assert set(converted) == set(dst.state_dict())
    dst.load_state_dict(converted)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(dst.run_average(x), src.run_average(x))


@pytest.mark.parametrize("depth,widen", [(10, 2), (16, 1)])
def test_convert_wide_resnet_state_dict_same_logits(depth, widen):
    src = _randomize(CNNFWideResNet(depth, 10, widen, ind=1, backend="reference"))
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
    model = _randomize(CNNF(10, ind=0, cycles=1, res_param=eta, backend="reference").double())
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


# ---------------------------------------------------------------------------------------------
# SPEC §4: bad input raises an error naming the argument


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
        ("ins-eps-inf", lambda: ins_norm(x4, eps=math.inf), ValueError, "eps"),
        ("ins-rank", lambda: ins_norm(torch.randn(3, 4)), ValueError, "x must be 4-d"),
        ("ins-int", lambda: ins_norm(torch.ones(1, 1, 2, 2, dtype=torch.int64)), TypeError, "x"),
        ("ins-centered", lambda: ins_norm(x4, centered="yes"), TypeError, "centered"),
        ("ins-centered-1x1", lambda: ins_norm(x4[:, :, :1, :1], centered=True), ValueError, "x"),
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
