"""RelRNN / RelLSTM reference (docs/rnn.md) against independent oracles.

* hand-unrolled T=4 computations, written out step by step;
* exact-tie cases whose slots are derived by hand in comments;
* a slow per-row oracle with Python lists for the window and the slots;
* float64 gradcheck; the paper's parameter names; hypothesis over edge sizes; bad input.
"""

import functools
import math

import pytest
import torch
from _imports import non_stdlib_imports
from _tolerances import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from screening_attn.nn import RelLSTM, RelRNN, RelState
from screening_attn.rnn import reference as rnn_reference

F64 = torch.float64
NONLINEARITIES = ["tanh", "relu", "sigmoid", "identity", "modrelu"]

# The paper's parameters (bhargav104/MemoryNets: RNN.py class RelMemRNN, LSTM.py class RelLSTM),
# as functions of (I, Hd).
RNN_PARAMS = {
    "U.weight": lambda I, H: (H, I),
    "U.bias": lambda I, H: (H,),
    "V.weight": lambda I, H: (H, H),
    "Ua.weight": lambda I, H: (H, H),
    "Va.weight": lambda I, H: (H, H),
    "v": lambda I, H: (1, H),
}
MODRELU_PARAMS = {"nonlinearity.b": lambda I, H: (H,)}
LSTM_PARAMS = {
    "Wf.weight": lambda I, H: (H, H + I),
    "Wf.bias": lambda I, H: (H,),
    "Wi.weight": lambda I, H: (H, H + I),
    "Wi.bias": lambda I, H: (H,),
    "Wo.weight": lambda I, H: (H, H + I),
    "Wo.bias": lambda I, H: (H,),
    "Wg.weight": lambda I, H: (H, H + I),
    "Wg.bias": lambda I, H: (H,),
    "Ua.weight": lambda I, H: (H, H),
    "Va.weight": lambda I, H: (H, H),
    "v": lambda I, H: (1, H),
}


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """This file tests the reference: make it the default, as "auto" picks the compiled kernels
    (tests/test_rnn_kernels.py checks those against the reference). An explicit backend wins."""
    for cls in (RelRNN, RelLSTM):
        monkeypatch.setattr(
            cls, "forward", functools.partialmethod(cls.forward, backend="reference")
        )


# ------------------------------------------------------------------------------------------------
# Slow oracle: one batch row at a time, the window and the slots as Python lists.


def _act(z, name, b):
    if name == "tanh":
        return torch.tanh(z)
    if name == "relu":
        return torch.clamp(z, min=0)
    if name == "sigmoid":
        return 1 / (1 + torch.exp(-z))
    if name == "identity":
        return z
    assert name == "modrelu"
    mag = z.abs() + b
    return torch.where(mag > 0, torch.sign(z) * mag, torch.zeros_like(z))


def oracle(kind, p, x, h0, window, relevant, nonlinearity="tanh", attn=1.0):
    """``p``: parameter name -> tensor. Returns (h, relevant_index, relevant_score, relevancy)."""
    T, B, _ = x.shape
    Hd = p["Ua.weight"].shape[0]
    out = x.new_zeros(T, B, Hd)
    index = torch.full((B, relevant), -1, dtype=torch.int64)
    score = torch.full((B, relevant), -math.inf, dtype=x.dtype)
    relevancy = torch.zeros(T, B, dtype=x.dtype)
    for b in range(B):
        hs, r = [], [0.0] * T
        slots = [None] * relevant  # slot k: [position, score] or None
        s = x.new_zeros(Hd) if h0 is None else h0[b]
        cell = x.new_zeros(Hd)
        for t in range(T):
            if t > 0:
                win = list(range(max(0, t - window), t))
                cand = win + [sl[0] for sl in slots if sl is not None]
                e = torch.stack(
                    [
                        p["v"][0] @ torch.tanh(p["Va.weight"] @ s + p["Ua.weight"] @ hs[j])
                        for j in cand
                    ]
                )
                a = torch.exp(e - e.max())
                a = a / a.sum()
                for k, j in enumerate(win):
                    r[j] += a[k].item()
                c = sum(a[k] * hs[j] for k, j in enumerate(cand))
                s = 0.5 * (hs[t - 1] + attn * c)
            if kind == "rnn":
                pre = p["U.weight"] @ x[t, b] + p["V.weight"] @ s
                if "U.bias" in p:
                    pre = pre + p["U.bias"]
                if t == 0:
                    s = pre
                h = _act(pre, nonlinearity, p.get("nonlinearity.b"))
            else:
                z = torch.cat([s, x[t, b]])
                f = torch.sigmoid(p["Wf.weight"] @ z + p["Wf.bias"])
                i = torch.sigmoid(p["Wi.weight"] @ z + p["Wi.bias"])
                o = torch.sigmoid(p["Wo.weight"] @ z + p["Wo.bias"])
                g = torch.tanh(p["Wg.weight"] @ z + p["Wg.bias"])
                cell = f * cell + i * g
                h = o * torch.tanh(cell)
            hs.append(h)
            if t >= window:
                leaving = t - window
                free = [k for k, sl in enumerate(slots) if sl is None]
                if free:
                    slots[free[0]] = [leaving, r[leaving]]
                elif slots:
                    m = min(range(relevant), key=lambda k: (slots[k][1], k))
                    if r[leaving] > slots[m][1]:
                        slots[m] = [leaving, r[leaving]]
        out[:, b] = torch.stack(hs)
        relevancy[:, b] = torch.tensor(r, dtype=x.dtype)
        for k, sl in enumerate(slots):
            if sl is not None:
                index[b, k], score[b, k] = sl
    return out, index, score, relevancy


def _params(model):
    return {k: t.detach() for k, t in model.named_parameters()}


def _check_against_oracle(kind, model, x, h0, nonlinearity="tanh", attn=1.0):
    kw = {"attn": attn} if kind == "rnn" else {}
    h, state = model(x, h0, **kw)
    assert isinstance(state, RelState)
    eh, eidx, escore, erel = oracle(
        kind, _params(model), x, h0, model.window, model.relevant, nonlinearity, attn
    )
    assert_close(h, eh)
    assert torch.equal(state.relevant_index, eidx)
    assert_close(state.relevant_score, escore)
    assert_close(state.relevancy, erel)
    return h, state


def _model(kind, I, Hd, window, relevant, nonlinearity="tanh", dtype=F64, **kw):
    if kind == "rnn":
        return RelRNN(I, Hd, window, relevant, nonlinearity, dtype=dtype, **kw)
    return RelLSTM(I, Hd, window, relevant, dtype=dtype, **kw)


# ------------------------------------------------------------------------------------------------
# Hand-unrolled T = 4, ν = 2, ρ = 1, B = 2.


def _score(p, s, h):
    """e = v · tanh(Va s + Ua h), batched over rows: s, h (B, Hd) -> (B,)."""
    return torch.tanh(s @ p["Va.weight"].T + h @ p["Ua.weight"].T) @ p["v"][0]


def _hand_attention_steps(p, step, h_0, attn):
    """Steps t = 1..3 with ν = 2, ρ = 1; ``step(t, s)`` gives h_t from the state s_t.

    (The query s_0 of t = 1 is unobservable: one candidate, so α = 1 whatever the score.)
    """
    # t = 1: window {h_0}; one candidate, so α = 1.
    s1 = 0.5 * (h_0 + attn * h_0)
    h_1 = step(1, s1)
    r0 = torch.ones(2, dtype=F64)
    # t = 2: window {h_0, h_1}; the relevant set is empty.
    a = torch.softmax(torch.stack([_score(p, s1, h_0), _score(p, s1, h_1)], 1), 1)
    c2 = a[:, :1] * h_0 + a[:, 1:2] * h_1
    s2 = 0.5 * (h_1 + attn * c2)
    h_2 = step(2, s2)
    r0 = r0 + a[:, 0]
    r1 = a[:, 1]
    # t = 2 >= ν: state 0 leaves the window, slot 0 is empty: slot 0 <- state 0 (score r0).
    # t = 3: window {h_1, h_2} and relevant {h_0}.
    a = torch.softmax(
        torch.stack([_score(p, s2, h_1), _score(p, s2, h_2), _score(p, s2, h_0)], 1), 1
    )
    c3 = a[:, :1] * h_1 + a[:, 1:2] * h_2 + a[:, 2:3] * h_0
    s3 = 0.5 * (h_2 + attn * c3)
    h_3 = step(3, s3)
    r1 = r1 + a[:, 0]
    r2 = a[:, 1]
    # State 1 leaves; the set is full: it evicts state 0 iff r1 > r0 (strictly).
    evict = r1 > r0
    index = torch.where(evict, 1, 0).unsqueeze(1)
    score = torch.where(evict, r1, r0).unsqueeze(1)
    relevancy = torch.stack([r0, r1, r2, torch.zeros(2, dtype=F64)])
    return torch.stack([h_0, h_1, h_2, h_3]), index, score, relevancy


class _RNNStep:
    def __init__(self, p, x):
        self.p, self.x = p, x

    def __call__(self, t, s):
        p = self.p
        return torch.tanh(self.x[t] @ p["U.weight"].T + p["U.bias"] + s @ p["V.weight"].T)


class _LSTMStep:
    def __init__(self, p, x, cell):
        self.p, self.x, self.cell = p, x, cell

    def __call__(self, t, s):
        p = self.p
        z = torch.cat([s, self.x[t]], 1)
        f = torch.sigmoid(z @ p["Wf.weight"].T + p["Wf.bias"])
        i = torch.sigmoid(z @ p["Wi.weight"].T + p["Wi.bias"])
        o = torch.sigmoid(z @ p["Wo.weight"].T + p["Wo.bias"])
        g = torch.tanh(z @ p["Wg.weight"].T + p["Wg.bias"])
        self.cell = f * self.cell + i * g
        return o * torch.tanh(self.cell)


def _sharpen(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for t in model.parameters():
            t.normal_(0, 1)
        model.v.mul_(3.0)  # peaked attention, so that the two rows screen differently


def test_rel_rnn_hand_unrolled():
    m = RelRNN(2, 3, window=2, relevant=1, nonlinearity="tanh", dtype=F64)
    _sharpen(m, 7)
    p = _params(m)
    x = torch.randn(4, 2, 2, dtype=F64)
    h0 = torch.randn(2, 3, dtype=F64)
    attn = 0.7
    step = _RNNStep(p, x)
    # t = 0: no attention; p0 = U x_0 + V h0 is the first query s_0; h_0 = tanh(p0).
    p0 = x[0] @ p["U.weight"].T + p["U.bias"] + h0 @ p["V.weight"].T
    eh, eidx, escore, erel = _hand_attention_steps(p, step, torch.tanh(p0), attn)
    assert eidx.flatten().tolist() == [1, 0]  # row 0 evicts state 0, row 1 keeps it
    h, state = m(x, h0, attn=attn)
    assert_close(h, eh)
    assert torch.equal(state.relevant_index, eidx)
    assert_close(state.relevant_score, escore)
    assert_close(state.relevancy, erel)


def test_rel_lstm_hand_unrolled():
    m = RelLSTM(2, 3, window=2, relevant=1, dtype=F64)
    _sharpen(m, 5)
    p = _params(m)
    x = torch.randn(4, 2, 2, dtype=F64)
    h0 = torch.randn(2, 3, dtype=F64)
    step = _LSTMStep(p, x, torch.zeros(2, 3, dtype=F64))
    # t = 0: s_0 = h0 feeds the gates, no attention; cell starts at zeros.
    eh, eidx, escore, erel = _hand_attention_steps(p, step, step(0, h0), 1.0)
    assert eidx.flatten().tolist() == [1, 0]
    h, state = m(x, h0)
    assert_close(h, eh)
    assert torch.equal(state.relevant_index, eidx)
    assert_close(state.relevant_score, escore)
    assert_close(state.relevancy, erel)


# ------------------------------------------------------------------------------------------------
# Exact ties.


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_all_zero_inputs_uniform_attention(kind):
    # x = 0, h0 = 0 and zero biases make every state 0 (tanh(0) = 0; LSTM: g = tanh(0) = 0, so
    # cell = 0 and h = 0), so every logit e_j = v·tanh(0) = 0: attention is uniform over the n_t
    # candidates. ν = 2, ρ = 2, T = 6:
    #   t=1: {0}            n=1  r0 = 1
    #   t=2: {0,1}          n=2  r0 = 3/2, r1 = 1/2;   screen 0 -> slot 0 (first empty)
    #   t=3: {1,2} + {0}    n=3  r1 = 5/6, r2 = 1/3;   screen 1 -> slot 1 (first empty)
    #   t=4: {2,3} + {0,1}  n=4  r2 = 7/12, r3 = 1/4; screen 2: 7/12 > min 5/6? no, dropped
    #   t=5: {3,4} + {0,1}  n=4  r3 = 1/2, r4 = 1/4;  screen 3: 1/2 > 5/6? no, dropped
    # final slots [0, 1], scores [3/2, 5/6]; r5 = 0 (never attended).
    m = _model(kind, 2, 3, 2, 2)
    with torch.no_grad():
        for name, t in m.named_parameters():
            if name.endswith("bias"):
                t.zero_()
    x = torch.zeros(6, 2, 2, dtype=F64)
    h, state = m(x)
    assert torch.equal(h, torch.zeros_like(h))
    assert state.relevant_index.tolist() == [[0, 1], [0, 1]]
    assert_close(state.relevant_score, torch.tensor([[1.5, 5 / 6]] * 2, dtype=F64))
    r = torch.tensor([1.5, 5 / 6, 7 / 12, 1 / 2, 1 / 4, 0], dtype=F64)
    assert_close(state.relevancy, r.unsqueeze(1).expand(6, 2))


def test_exact_ties_slot_rule():
    # Hd = I = 1, identity φ, U = 1, no bias, V = 0, Va = 0, Ua = 1, v = 1e4: h_t = x_t and
    # e_j = 1e4 · tanh(h_j) does not depend on the query. "Hot" states (x = 0) have e = 0,
    # "cold" ones (x = -5) e ≈ -9999, so exp underflows to exactly 0: α is split exactly evenly
    # among the hot candidates, 0 to cold ones. ν = 1 (r_j is the α of h_j at step j+1), ρ = 3.
    # Row 0, x = H C C H C H:
    #   t=1: {0}                 r0 = 1;  0 -> slot 0 (first empty)
    #   t=2: {1} + {0}           r1 = 0;  1 -> slot 1 (first empty)
    #   t=3: {2} + {0,1}         r2 = 0;  2 -> slot 2 (first empty)
    #   t=4: {3} + {0,1,2}       r3 = 1/2 (two hot): slots 1 and 2 tie at 0: the lowest slot
    #                            number, slot 1, is evicted -> [0, 3, 2]
    #   t=5: {4} + {0,3,2}       r4 = 0: not strictly above the min (slot 2, 0): dropped
    # Row 1, x = H C C C H C:
    #   t=1..3 as row 0 -> [0, 1, 2]
    #   t=4: {3} + {0,1,2}       r3 = 0: ties slot 1 (0) but is not strictly larger: dropped
    #   t=5: {4} + {0,1,2}       r4 = 1/2: evicts slot 1 (lowest of the tied minima) -> [0, 4, 2]
    m = RelRNN(1, 1, window=1, relevant=3, nonlinearity="identity", bias=False, dtype=F64)
    with torch.no_grad():
        m.U.weight.fill_(1.0)
        m.V.weight.zero_()
        m.Va.weight.zero_()
        m.Ua.weight.fill_(1.0)
        m.v.fill_(1e4)
    H, C = 0.0, -5.0
    x = torch.tensor([[H, H], [C, C], [C, C], [H, C], [C, H], [H, C]], dtype=F64).unsqueeze(2)
    h, state = m(x)
    assert torch.equal(h, x)
    assert state.relevant_index.tolist() == [[0, 3, 2], [0, 4, 2]]
    assert state.relevant_score.tolist() == [[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]]
    assert state.relevancy.T.tolist() == [[1, 0, 0, 0.5, 0, 0], [1, 0, 0, 0, 0.5, 0]]
    _check_against_oracle("rnn", m, x, None, "identity")


# ------------------------------------------------------------------------------------------------
# Slow oracle on random inputs.


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_rel_rnn_matches_oracle(nonlinearity):
    m = RelRNN(4, 5, window=3, relevant=2, nonlinearity=nonlinearity, dtype=F64)
    x = torch.randn(30, 3, 4, dtype=F64)
    h0 = torch.randn(3, 5, dtype=F64)
    _, state = _check_against_oracle("rnn", m, x, h0, nonlinearity, attn=1.3)
    assert (state.relevant_index >= 0).all()


def test_rel_lstm_matches_oracle():
    m = RelLSTM(4, 5, window=3, relevant=2, dtype=F64)
    x = torch.randn(30, 3, 4, dtype=F64)
    h0 = torch.randn(3, 5, dtype=F64)
    _check_against_oracle("lstm", m, x, h0)
    _check_against_oracle("lstm", m, x, None)


@pytest.mark.parametrize("attn", [0.0, 0.5, 2.0])
def test_attn_factor(attn):
    m = RelRNN(3, 4, window=2, relevant=2, dtype=F64)
    _check_against_oracle("rnn", m, torch.randn(12, 2, 3, dtype=F64), None, attn=attn)


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
@pytest.mark.parametrize(
    "T, window, relevant",
    [(1, 1, 0), (1, 3, 2), (2, 3, 1), (3, 5, 2), (10, 1, 1), (10, 1, 0), (10, 3, 0), (9, 2, 20)],
    ids=lambda v: str(v),
)
def test_edge_sizes(kind, T, window, relevant):
    m = _model(kind, 2, 3, window, relevant)
    x = torch.randn(T, 2, 2, dtype=F64)
    h, state = _check_against_oracle(kind, m, x, torch.randn(2, 3, dtype=F64))
    assert h.shape == (T, 2, 3)
    assert state.relevant_index.shape == state.relevant_score.shape == (2, relevant)
    assert state.relevancy.shape == (T, 2)
    n_screened = max(0, T - window)
    assert (state.relevant_index >= 0).sum(1).tolist() == [min(n_screened, relevant)] * 2


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_full_attention_when_nothing_is_dropped(kind):
    # ρ >= T: every state that leaves the window is kept, so every step attends to all earlier
    # states, exactly as a window that never slides (ν >= T).
    x = torch.randn(11, 2, 3, dtype=F64)
    a = _model(kind, 3, 4, 2, 11)
    b = _model(kind, 3, 4, 11, 0)
    b.load_state_dict(a.state_dict())
    assert_close(a(x)[0], b(x)[0])


def test_t1_is_one_plain_step():
    m = RelRNN(3, 4, window=2, relevant=1, dtype=F64)
    x, h0 = torch.randn(1, 2, 3, dtype=F64), torch.randn(2, 4, dtype=F64)
    h, state = m(x, h0)
    assert_close(h[0], torch.tanh(m.U(x[0]) + m.V(h0)))
    assert state.relevant_index.tolist() == [[-1], [-1]]
    assert state.relevant_score.tolist() == [[-math.inf], [-math.inf]]


class _CountLinear(TorchFunctionMode):
    """Counts F.linear calls with a given weight."""

    def __init__(self, weight):
        super().__init__()
        self.weight, self.calls = weight, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear and args[1] is self.weight:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_ua_h_computed_once_per_state(kind):
    m = _model(kind, 2, 3, 3, 2)
    with _CountLinear(m.Ua.weight) as count:
        m(torch.randn(15, 2, 2, dtype=F64))
    assert count.calls == 15


# ------------------------------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize(
    "kind, nonlinearity, seed",
    [("rnn", "tanh", 6), ("rnn", "modrelu", 2), ("rnn", "sigmoid", 8), ("lstm", "", 0)],
)
def test_gradcheck(kind, nonlinearity, seed):
    # T = 6, ν = 2, ρ = 1, seeds picked so that a state evicts state 0 from its slot in some row
    # (relevancies >= 0.01 apart, far from gradcheck's perturbation): gradients reach every
    # parameter, x and h0 through the window and the relevant set, screening decisions fixed.
    m = _model(kind, 2, 2, 2, 1, nonlinearity or "tanh")
    _sharpen(m, seed)
    names = [n for n, _ in m.named_parameters()]
    params = [t.detach().clone().requires_grad_() for _, t in m.named_parameters()]
    x = torch.randn(6, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 2, dtype=F64, requires_grad=True)
    kw = {"attn": 0.8} if kind == "rnn" else {}

    def f(x, h0, *ps):
        return functional_call(m, dict(zip(names, ps)), (x, h0), kw)[0]

    _, state = m(x, h0, **kw)
    assert (state.relevant_index > 0).any()
    assert not state.relevant_score.requires_grad and not state.relevancy.requires_grad
    assert torch.autograd.gradcheck(f, (x, h0, *params))


# ------------------------------------------------------------------------------------------------
# The paper's parameter names and shapes.


@pytest.mark.parametrize(
    "kind, nonlinearity, bias, expected",
    [
        ("rnn", "tanh", True, RNN_PARAMS),
        ("rnn", "modrelu", True, {**MODRELU_PARAMS, **RNN_PARAMS}),
        ("rnn", "relu", False, {k: s for k, s in RNN_PARAMS.items() if k != "U.bias"}),
        ("lstm", None, True, LSTM_PARAMS),
    ],
)
def test_paper_parameter_names_and_state_dict(kind, nonlinearity, bias, expected):
    I, Hd = 3, 5
    if kind == "rnn":
        m = RelRNN(I, Hd, 2, 2, nonlinearity, bias=bias, dtype=F64)
    else:
        m = RelLSTM(I, Hd, 2, 2, dtype=F64)
    shapes = {k: tuple(t.shape) for k, t in m.state_dict().items()}
    assert shapes == {k: f(I, Hd) for k, f in expected.items()}
    # A checkpoint of the paper's copy-task model holds the RNN under "rnn." next to "lin.".
    ckpt = {f"rnn.{k}": torch.randn(f(I, Hd), dtype=F64) for k, f in expected.items()}
    ckpt["lin.weight"] = torch.randn(9, Hd, dtype=F64)
    sd = {k.removeprefix("rnn."): t for k, t in ckpt.items() if k.startswith("rnn.")}
    m.load_state_dict(sd, strict=True)
    x = torch.randn(8, 2, I, dtype=F64)
    h, state = m(x)
    eh, eidx, _, _ = oracle(kind, sd, x, None, 2, 2, nonlinearity)
    assert_close(h, eh)
    assert torch.equal(state.relevant_index, eidx)


def test_modrelu_is_a_submodule_with_b():
    m = RelRNN(2, 4, 2, 1, "modrelu")
    assert isinstance(m.nonlinearity, torch.nn.Module)
    assert m.nonlinearity.b.shape == (4,)
    z = torch.tensor([-2.0, -0.005, 0.0, 3.0])
    with torch.no_grad():
        m.nonlinearity.b.copy_(torch.tensor([-1.0, -0.01, 0.5, 0.5]))
    assert m.nonlinearity(z).tolist() == [-1.0, 0.0, 0.0, 3.5]


# ------------------------------------------------------------------------------------------------
# Hypothesis over shapes and edge sizes.


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # fixed examples; a 3000-example sweep of this test also passed
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    kind=st.sampled_from(["rnn", "lstm"]),
    T=st.integers(1, 10),
    B=st.integers(1, 3),
    I=st.integers(1, 3),
    Hd=st.integers(1, 4),
    window=st.integers(1, 5),
    relevant=st.integers(0, 4),
    nonlinearity=st.sampled_from(NONLINEARITIES),
    with_h0=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_against_oracle(
    kind, T, B, I, Hd, window, relevant, nonlinearity, with_h0, seed
):
    torch.manual_seed(seed)
    m = _model(kind, I, Hd, window, relevant, nonlinearity)
    x = torch.randn(T, B, I, dtype=F64)
    h0 = torch.randn(B, Hd, dtype=F64) if with_h0 else None
    _, state = _check_against_oracle(kind, m, x, h0, nonlinearity)
    idx = state.relevant_index
    kept = idx >= 0
    assert (idx[kept] <= T - 1 - window).all()
    for row, ok in zip(idx, kept):
        assert len(set(row[ok].tolist())) == int(ok.sum())  # distinct positions
    gathered = state.relevancy.T.gather(1, idx.clamp(min=0))
    assert torch.equal(state.relevant_score[kept], gathered[kept])


# ------------------------------------------------------------------------------------------------
# Dtypes, layouts, NaN.


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_float32_matches_float64(kind):
    m = _model(kind, 3, 4, 3, 2, dtype=torch.float32)
    x = torch.randn(20, 2, 3)
    h, state = m(x)
    m64 = _model(kind, 3, 4, 3, 2)
    m64.load_state_dict(m.state_dict())
    h64, state64 = m64(x.double())
    assert h.dtype == state.relevant_score.dtype == state.relevancy.dtype == torch.float32
    assert_close(h, h64.float(), dtype=torch.float32)
    assert torch.equal(state.relevant_index, state64.relevant_index)


def test_non_contiguous_input_and_reference_backend():
    m = RelRNN(3, 4, 2, 2, dtype=F64)
    x = torch.randn(2, 9, 3, dtype=F64).transpose(0, 1)  # (T, B, I), not contiguous
    h0 = torch.randn(4, 2, dtype=F64).T
    assert not x.is_contiguous() and not h0.is_contiguous()
    h, s = m(x, h0, backend="reference")
    h2, s2 = m(x.contiguous(), h0.contiguous())
    assert_close(h, h2)
    assert torch.equal(s.relevant_index, s2.relevant_index)


# ------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "args, kwargs, exc, name",
    [
        ((0, 4, 2, 1), {}, ValueError, "input_size"),
        ((3.0, 4, 2, 1), {}, TypeError, "input_size"),
        ((3, 0, 2, 1), {}, ValueError, "hidden_size"),
        ((3, True, 2, 1), {}, TypeError, "hidden_size"),
        ((3, 4, 0, 1), {}, ValueError, "window"),
        ((3, 4, None, 1), {}, TypeError, "window"),
        ((3, 4, 2, -1), {}, ValueError, "relevant"),
        ((3, 4, 2, 1.5), {}, TypeError, "relevant"),
    ],
)
@pytest.mark.parametrize("cls", [RelRNN, RelLSTM])
def test_bad_sizes(cls, args, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        cls(*args, **kwargs)


def test_bad_nonlinearity_and_bias():
    with pytest.raises(ValueError, match=r"nonlinearity must be one of .*'modrelu'.*'gelu'"):
        RelRNN(3, 4, 2, 1, "gelu")
    with pytest.raises(ValueError, match="nonlinearity"):
        RelRNN(3, 4, 2, 1, torch.nn.Tanh())
    with pytest.raises(TypeError, match="bias"):
        RelRNN(3, 4, 2, 1, "tanh", bias=1)


# Malformed forward inputs, on every backend: tests/test_hostile_inputs.py.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_rnn_constructs_and_runs(dtype):
    """The orthogonal init of V needs a QR, which has no half-precision CPU kernel: it is drawn
    in float32 and cast (this used to raise NotImplementedError in the constructor)."""
    m = RelRNN(3, 4, 2, 1, dtype=dtype)
    w = m.V.weight.double()
    assert (w @ w.T - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-2
    h, _ = m(torch.randn(5, 2, 3, dtype=dtype))
    assert h.dtype == dtype and h.isfinite().all()


def test_reference_imports_only_torch():
    """The reference reads on its own: torch and the standard library, nothing of the package."""
    assert non_stdlib_imports(rnn_reference) == {"torch"}
