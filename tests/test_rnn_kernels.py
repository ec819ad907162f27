"""The fused RelRNN / RelLSTM kernels (backend "cpu", and "cuda" on a GPU) against the reference:
forward h, the final state (slots, scores, relevancy) and every gradient (all parameters, x, h0),
float64 with exact selections and float32 within tolerances; awkward sizes (T = 1, T < ν, ν = 1,
ρ = 0, ρ >= T, T across the backward's 64-step chunks); exact ties; torch.library checks of every
op; torch.compile; NaN locality; errors (determinism: test_determinism.py)."""

import copy
import math

import pytest
import torch
from _env import needs_cuda
from _rnn_utils import check, make, run, saturated_model
from _tolerances import assert_close, assert_low_precision_close

from screening_attn import _backend
from screening_attn.nn import RelRNN
from screening_attn.rnn import modules as rnn_modules

F64, F32 = torch.float64, torch.float32
HALF = (torch.float16, torch.bfloat16)
OPS = torch.ops.screening_attn
NONLINEARITIES = ["tanh", "relu", "sigmoid", "identity", "modrelu"]
pytestmark = pytest.mark.skipif(_backend.C_ERROR is not None, reason=str(_backend.C_ERROR))


# ------------------------------------------------------------------------------------------------
# Against the reference.

KINDS = [("rnn", nl) for nl in NONLINEARITIES] + [("lstm", "tanh")]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize(("kind", "nonlinearity"), KINDS, ids=lambda v: str(v))
def test_matches_reference(kind, nonlinearity, dtype):
    # T = 70 crosses the backward's 64-step chunks.
    check(kind, T=70, nonlinearity=nonlinearity, dtype=dtype, seed=3)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    ("kind", "nonlinearity"), [("rnn", "tanh"), ("rnn", "modrelu"), ("lstm", "tanh")]
)
def test_step_op_loop_matches_reference(kind, nonlinearity, dtype, monkeypatch):
    """SCREENING_ATTN_RNN_STEP_OPS=1: the sequence ops' device-generic loop (step ops through the
    dispatcher, as on CUDA) on the CPU, which the mutation harness relies on; otherwise the CPU
    runs its row-block loops (csrc/cpu/rnn.cpp), which every other test here runs."""
    monkeypatch.setenv("SCREENING_ATTN_RNN_STEP_OPS", "1")
    check(kind, T=70, nonlinearity=nonlinearity, dtype=dtype, seed=4)


@pytest.mark.parametrize("attn", [0.0, 0.5, 2.0])
def test_attn_factor(attn):
    check("rnn", attn=attn)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["rnn", "lstm"])
@pytest.mark.parametrize(
    "T, B, window, relevant",
    [
        (1, 2, 3, 2),  # T = 1: no attention at all
        (4, 2, 6, 2),  # T < window: nothing is screened
        (30, 3, 1, 3),  # window 1: each state is screened right after its one window step
        (30, 2, 4, 0),  # relevant 0: windowed attention
        (12, 2, 2, 40),  # relevant >= T: every screened state is kept (padded slots)
        (65, 1, 5, 3),  # one step past a chunk
        (129, 2, 7, 4),  # three chunks
        (9, 2, 2**40, 3),  # huge window: never slides
        (1, 1, 1, 0),
    ],
    ids=lambda v: str(v),
)
def test_edge_sizes(kind, T, B, window, relevant, dtype):
    check(kind, T=T, B=B, window=window, relevant=relevant, dtype=dtype, seed=T)


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_without_h0_and_odd_sizes(kind):
    check(kind, T=23, B=5, I=1, Hd=33, window=5, relevant=3, with_h0=False, seed=9)


# ------------------------------------------------------------------------------------------------
# Exact ties: the slot rule decides, as in the reference (tests/test_rnn_reference.py derives
# these cases by hand).


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_all_zero_inputs_tie_exactly(kind, dtype):
    # every state 0, every logit v·tanh(0) = 0: uniform attention, many exactly equal relevancies
    m = make(kind, 2, 3, 2, 2, dtype=dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    x = torch.zeros(40, 2, 2, dtype=dtype)
    h, st = m(x, backend="cpu")
    _, rst = m(x, backend="reference")
    assert torch.equal(h, torch.zeros_like(h))
    assert torch.equal(st.relevant_index, rst.relevant_index)
    assert torch.equal(st.relevant_score, rst.relevant_score)
    assert torch.equal(st.relevancy, rst.relevancy)
    check(kind, x=torch.zeros(40, 2, 2), Hd=3, I=2, window=2, relevant=2, dtype=dtype)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_exact_ties_lowest_slot_is_evicted(dtype):
    # The construction of test_rnn_reference.test_exact_ties_slot_rule: h_t = x_t, hot states
    # (x = 0) share α exactly, cold ones (x = -5) get exactly 0; rows end in [0, 3, 2], [0, 4, 2].
    m = RelRNN(1, 1, window=1, relevant=3, nonlinearity="identity", bias=False, dtype=dtype)
    with torch.no_grad():
        m.U.weight.fill_(1.0)
        m.V.weight.zero_()
        m.Va.weight.zero_()
        m.Ua.weight.fill_(1.0)
        m.v.fill_(1e4)
    H, C = 0.0, -5.0
    x = torch.tensor([[H, H], [C, C], [C, C], [H, C], [C, H], [H, C]], dtype=dtype).unsqueeze(2)
    h, st = m(x, backend="cpu")
    assert torch.equal(h, x)
    assert st.relevant_index.tolist() == [[0, 3, 2], [0, 4, 2]]
    assert st.relevant_score.tolist() == [[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]]
    assert st.relevancy.T.tolist() == [[1, 0, 0, 0.5, 0, 0], [1, 0, 0, 0, 0.5, 0]]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_exact_repeated_states_tie_at_screening(kind, dtype):
    # Rows of hot (0) and cold (-5) inputs: with window 1 a hot state's relevancy is
    # 1 / (hot candidates of the next step), a cold one's 0, so full sets meet equal scores (a
    # new 0 against a slot's 0, a new 0.5 against two slots at 0.25). The kernel's final slots
    # must be the slot rule's on its own relevancies (check replays it) and match the reference.
    gen = torch.Generator().manual_seed(5)
    x = torch.where(torch.rand(24, 6, 1, generator=gen) < 0.5, 0.0, -5.0).to(F64)
    x[:6, :2, 0] = torch.tensor([[0.0, 0], [-5, -5], [-5, -5], [0, -5], [-5, 0], [0, -5]])
    m = saturated_model(kind, dtype)
    screening = check(kind, x=x, model=m, I=1, Hd=1, window=1, relevant=3, dtype=dtype)
    assert screening.tied and screening.evicted
    # the two hand rows: slots 1 and 2 tie at 0 and the hot state 3 (row 0) or 4 (row 1)
    # evicts the lower; row 1's cold state 3 ties them and is dropped
    assert [t[:5] for t in screening.targets[:2]] == [[0, 1, 2, 1, -1], [0, 1, 2, -1, 1]]


@pytest.mark.parametrize(
    "kind, nonlinearity", [("rnn", "modrelu"), ("rnn", "identity"), ("lstm", "")]
)
def test_paper_checkpoint_runs_identically(kind, nonlinearity):
    # A state_dict saved by the paper's code (its copy-task model: "rnn." + "lin.") loads as it
    # is, and the fused kernels then give the reference's outputs, slots and gradients on a
    # copy-task input.
    m = make(kind, 10, 6, 4, 3, nonlinearity or "tanh")
    ckpt = {f"rnn.{k}": 0.4 * torch.randn_like(t) for k, t in m.state_dict().items()}
    ckpt["lin.weight"] = torch.randn(9, 6, dtype=F64)
    m.load_state_dict({k.removeprefix("rnn."): t for k, t in ckpt.items() if k.startswith("rnn.")})
    seq = torch.zeros(40, 3, dtype=torch.long)
    seq[:8] = torch.randint(1, 9, (8, 3))
    seq[31] = 9
    x = torch.nn.functional.one_hot(seq, 10).to(F64)
    assert torch.equal(
        m.U.weight if kind == "rnn" else m.Wf.weight,
        ckpt["rnn.U.weight" if kind == "rnn" else "rnn.Wf.weight"],
    )
    check(kind, x=x, I=10, Hd=6, window=4, relevant=3, model=m, seed=1)


# ------------------------------------------------------------------------------------------------
# The CPU step kernels' attention terms from exponentials (rnn_key_exp; docs/kernels/cpu-cuda.md):
# keys and queries with |value| <= 20 take tanh(q + k) = 1 - 2 g / (g + e), g = e^{-2q},
# e = e^{2k}; rows beyond that take tanh. The sequence tests above run the exp path; these run
# the tanh fallback inside sequences and both paths of the step ops side by side.

EXP_LIMIT = 20.0


def test_key_exp_values_and_out_of_range_rows():
    rows = torch.randn(6, 2, 7, dtype=F64, generator=torch.Generator().manual_seed(0)) * 5
    rows[0, 0, 3] = 20.5  # one key out of range: the row's first element is NaN
    rows[1, 1, 0] = -25.0
    rows[2, 0, 6] = float("nan")
    rows[3, 1, 2] = float("inf")
    rows[4, 0] = torch.tensor([20.0, -20.0, 0.0, -0.0, 1e-30, -1e-30, 19.9], dtype=F64)  # in range
    bad = (rows.abs() > EXP_LIMIT).any(-1) | rows.isnan().any(-1)
    assert bad.sum() == 4
    for dtype, rtol in [(F64, 1e-15), (F32, 3e-7)]:
        k = rows.to(dtype)
        out = torch.full_like(k, 7.0)
        OPS.rnn_key_exp(k, out)
        assert torch.equal(out[..., 0].isnan(), bad)
        want = torch.exp(2 * k.double())
        torch.testing.assert_close(out[~bad].double(), want[~bad], rtol=rtol, atol=0)
        flat = torch.empty(12, 7, dtype=dtype)  # any leading shape: rows of the last dimension
        OPS.rnn_key_exp(k.reshape(12, 7), flat)
        assert torch.equal(flat.view_as(out).nan_to_num(7.0), out.nan_to_num(7.0))
    OPS.rnn_key_exp(torch.empty(3, 0, 4), torch.empty(3, 0, 4))  # empty: nothing to do
    with pytest.raises(ValueError, match="key_exp must have the shape of uah"):
        OPS.rnn_key_exp(torch.randn(2, 3), torch.empty(3, 2))
    with pytest.raises(TypeError, match="key_exp must have the dtype of uah"):
        OPS.rnn_key_exp(torch.randn(2, 3), torch.empty(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="key_exp must be contiguous"):
        OPS.rnn_key_exp(torch.randn(2, 3), torch.empty(3, 2).T)


def _step_problem(dtype, T=9, B=4, Hd=6, window=3, rho=3, t=8, seed=0):
    """Inputs of step t with full slots; row 1 has keys out of range (some candidates take
    tanh), row 2's query is out of range (every candidate takes tanh)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, B, Hd, generator=gen, dtype=F64)
    uah = 3 * torch.randn(T, B, Hd, generator=gen, dtype=F64)
    uah[2, 1, 4] = 30.0  # slot state 2 of row 1
    uah[6, 1, 0] = -21.0  # window state 6 of row 1
    query = 3 * torch.randn(B, Hd, generator=gen, dtype=F64)
    query[2, 5] = 22.0
    v = torch.randn(Hd, generator=gen, dtype=F64)
    slots = torch.tensor([[0, 2, 4], [2, 1, 3], [4, 0, 1], [3, 2, 0]])[:B, :rho]
    scores = torch.rand(B, rho, generator=gen, dtype=F64)
    grad_s = torch.randn(B, Hd, generator=gen, dtype=F64)
    return [x.to(dtype) for x in (hidden, uah, query, v, scores, grad_s)] + [slots, t, window]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_step_ops_exp_terms_match_tanh_terms(dtype):
    """rnn_attend_step and its backward with key_exp against the same calls without it (every
    term through tanh, which the reference tests cover), within the tolerance table."""
    hidden, uah, query, v, scores, grad_s, slots, t, window = _step_problem(dtype)
    T, B, Hd = hidden.shape
    rho = slots.shape[1]
    kexp = torch.empty_like(uah)
    OPS.rnn_key_exp(uah, kexp)
    assert kexp[2, 1, 0].isnan() and kexp[6, 1, 0].isnan() and not kexp[:, 0].isnan().any()
    results = []
    for key_exp in (None, kexp):
        state = [slots.clone(), scores.clone(), torch.zeros(T, B, dtype=dtype)]
        out = [torch.empty(B, Hd, dtype=dtype), torch.empty(B, window + rho, dtype=dtype)]
        cand = torch.empty(B, rho, dtype=torch.long)
        OPS.rnn_attend_step(query, hidden, uah, v, *state, *out, cand, t, window, 0.7, key_exp)
        grads = [torch.zeros(T, B, Hd, dtype=dtype), torch.zeros(T, B, Hd, dtype=dtype)]
        grads += [torch.zeros(B, Hd, dtype=dtype), torch.empty(B, Hd, dtype=dtype)]
        OPS.rnn_attend_step_backward(
            grad_s, query, hidden, uah, v, out[1], cand, *grads, t, window, 0.7, key_exp
        )
        results.append([*state, *out, cand, *grads])
    for a, b in zip(*results, strict=True):
        if a.dtype == torch.long:
            assert torch.equal(a, b)
        else:
            assert_close(b, a, dtype=dtype)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_keys_and_queries_out_of_exp_range_match_reference(kind, dtype):
    """Large states: an identity RelRNN (an LSTM with a large Ua, Va) whose keys Ua h and
    queries Va s leave |.| <= 20 in some rows and steps and stay inside in others, so the
    kernels mix exp terms and tanh terms within a step; against the reference."""
    m = make(kind, 4, 5, 3, 2, "identity" if kind == "rnn" else "tanh", dtype=F64, seed=4)
    with torch.no_grad():  # the LSTM's states are bounded: a larger factor
        m.Ua.weight.mul_(12.0 if kind == "rnn" else 60.0)
        m.Va.weight.mul_(12.0 if kind == "rnn" else 60.0)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(24, 3, 4, generator=gen, dtype=F64)
    x[:, 0] *= 0.05  # row 0: small states, exp terms
    x[:, 2] *= 4.0
    # the run mixes both kinds of keys (checked on the reference's states)
    with torch.no_grad():
        h, _ = m(x, backend="reference")
        keys = h @ m.Ua.weight.T
    out = (keys.abs() > EXP_LIMIT).any(-1)
    assert out.any() and (~out).any(), out
    check(kind, x=x, model=m.to(dtype), I=4, Hd=5, window=3, relevant=2, dtype=dtype, seed=4)


# ------------------------------------------------------------------------------------------------
# Gradcheck, torch.library, torch.compile.


@pytest.mark.parametrize(
    "kind, nonlinearity, seed", [("rnn", "tanh", 6), ("rnn", "modrelu", 2), ("lstm", "tanh", 0)]
)
def test_gradcheck(kind, nonlinearity, seed):
    from torch.func import functional_call

    m = make(kind, 2, 2, 2, 1, nonlinearity, seed=seed)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(8, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 2, dtype=F64, requires_grad=True)
    kw = {"attn": 0.8, "backend": "cpu"} if kind == "rnn" else {"backend": "cpu"}

    def f(x, h0, *ps):
        return functional_call(m, dict(zip(names, ps)), (x, h0), kw)[0]

    assert torch.autograd.gradcheck(f, (x, h0, *params))


def _rnn_args(T=9, B=2, I=3, Hd=4, window=2, relevant=2, nonlinearity="modrelu", attn=0.7):
    m = make("rnn", I, Hd, window, relevant, nonlinearity, dtype=F32)
    x = torch.randn(T, B, I)
    h0 = torch.randn(Hd, B).T  # strided
    b = m.nonlinearity.b if nonlinearity == "modrelu" else None
    return (
        x,
        h0,
        m.U.weight,
        m.U.bias,
        m.V.weight,
        m.Ua.weight,
        m.Va.weight,
        m.v,
        b,
        window,
        relevant,
        nonlinearity,
        attn,
    )


def _lstm_args(T=9, B=2, I=3, Hd=4, window=2, relevant=2):
    m = make("lstm", I, Hd, window, relevant, dtype=F32)
    W = torch.cat([m.Wf.weight, m.Wi.weight, m.Wo.weight, m.Wg.weight]).detach().requires_grad_()
    b = torch.cat([m.Wf.bias, m.Wi.bias, m.Wo.bias, m.Wg.bias]).detach().requires_grad_()
    x, h0 = torch.randn(T, B, I), torch.randn(B, Hd)
    return (x, h0, W, b, m.Ua.weight, m.Va.weight, m.v, window, relevant)


def test_opcheck_sequence_ops():
    for args in [_rnn_args(), _rnn_args(T=1, nonlinearity="tanh"), _rnn_args(T=70, relevant=0)]:
        torch.library.opcheck(OPS.rel_rnn.default, args)
        out = OPS.rel_rnn(*args)
        g = torch.randn_like(out[0])
        x, h0, Uw, _, V, Ua, Va, v, _, window, _, nl, attn = args
        saved = [t.detach() for t in out[4:]]
        bargs = (g, x, h0, Uw, V, Ua, Va, v, out[0], *saved, window, nl, attn)
        torch.library.opcheck(
            OPS.rel_rnn_backward.default,
            tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in bargs),
        )
    for args in [_lstm_args(), _lstm_args(T=70, relevant=9)]:
        torch.library.opcheck(OPS.rel_lstm.default, args)
        out = OPS.rel_lstm(*args)
        x, _, W, _, Ua, Va, v, window, _ = args
        bargs = (torch.randn_like(out[0]), x, W, Ua, Va, v, out[0], *out[4:], window)
        torch.library.opcheck(
            OPS.rel_lstm_backward.default,
            tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in bargs),
        )


def test_backward_reuses_or_recomputes_key_exp():
    # The CPU forward returns E = e^{2 uah} for its backward; given an empty one, the backward
    # recomputes it, with the same bits; one not shaped like uah is an error.
    with torch.no_grad():
        rnn = [a.detach() if isinstance(a, torch.Tensor) else a for a in _rnn_args(T=12)]
        lstm = [a.detach() if isinstance(a, torch.Tensor) else a for a in _lstm_args(T=12)]
        out_r, out_l = OPS.rel_rnn(*rnn), OPS.rel_lstm(*lstm)
    torch.testing.assert_close(out_r[9], torch.exp(2 * out_r[6]))
    torch.testing.assert_close(out_l[10], torch.exp(2 * out_l[7]))
    x, h0, Uw, _, V, Ua, Va, v, _, window, _, nl, attn = rnn
    xl, _, W, _, Ual, Val, vl, window_l, _ = lstm

    def backward_rnn(key_exp):
        g = torch.ones_like(out_r[0])
        return OPS.rel_rnn_backward(g, x, h0, Uw, V, Ua, Va, v, out_r[0], *out_r[4:9], key_exp,
                                    window, nl, attn)  # fmt: skip

    def backward_lstm(key_exp):
        g = torch.ones_like(out_l[0])
        return OPS.rel_lstm_backward(g, xl, W, Ual, Val, vl, out_l[0], *out_l[4:10], key_exp,
                                     window_l)  # fmt: skip

    for backward, key_exp in ((backward_rnn, out_r[9]), (backward_lstm, out_l[10])):
        for kept, recomputed in zip(backward(key_exp), backward(key_exp.new_empty(0))):
            assert torch.equal(kept, recomputed)
        with pytest.raises(ValueError, match="key_exp"):
            backward(key_exp[:, :1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("m,k,n", [(16, 128, 256), (3, 5, 7), (1, 1, 1), (64, 640, 128)])
def test_step_mm_matches_mm(dtype, accumulate, m, k, n):
    """The loops' per-step product (torch's brgemm for float32 on the CPU, at::mm otherwise),
    into a row-strided view as the loops write pq_t."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    buf = torch.randn(m, n + 3, dtype=dtype)
    out, before = buf[:, 1 : n + 1], buf.clone()
    want = (out + a @ b) if accumulate else a @ b
    OPS.rnn_step_mm(out, a, b, accumulate)
    tol = {"rtol": 1e-5, "atol": 1e-5 * k**0.5} if dtype == torch.float32 else {}
    torch.testing.assert_close(out, want, **tol)
    # the columns around the view are untouched
    assert torch.equal(buf[:, 0], before[:, 0]) and torch.equal(buf[:, n + 1 :], before[:, n + 1 :])
    with pytest.raises(ValueError, match="rnn_step_mm"):
        OPS.rnn_step_mm(out, a, torch.randn(k + 1, n, dtype=dtype), accumulate)
    torch.library.opcheck(OPS.rnn_step_mm.default, (out, a, b, accumulate))


def test_opcheck_step_ops():
    T, B, Hd, window, rho, t = 6, 3, 4, 2, 2, 5
    hidden, uah = torch.randn(T, B, Hd), torch.randn(T, B, Hd)
    v = torch.randn(1, Hd, requires_grad=True)  # so that the autograd registration is checked
    query = torch.randn(B, 2 * Hd)[:, Hd:]  # a row-strided view, as the loops pass it
    # full slots whose scores no state can beat, so that opcheck's repeated calls see one state
    slots = torch.tensor([[0, 2], [1, 0], [2, 1]])
    scores = torch.full((B, rho), 10.0)
    out = (torch.empty(B, Hd), torch.empty(B, window + rho), torch.empty(B, rho, dtype=torch.long))
    torch.library.opcheck(
        OPS.rnn_attend_step.default,
        (
            query,
            hidden,
            uah,
            v,
            slots.clone(),
            scores.clone(),
            torch.zeros(T, B),
            *out,
            t,
            window,
            0.9,
        ),
    )
    OPS.rnn_attend_step(
        query,
        hidden,
        uah,
        v,
        slots.clone(),
        scores.clone(),
        torch.zeros(T, B),
        *out,
        t,
        window,
        0.9,
    )
    alpha, cand = out[1], out[2]
    grads = (torch.zeros(T, B, Hd), torch.zeros(T, B, Hd), torch.zeros(B, Hd), torch.empty(B, Hd))
    torch.library.opcheck(
        OPS.rnn_attend_step_backward.default,
        (torch.randn(B, Hd), query, hidden, uah, v, alpha, cand, *grads, t, window, 0.9),
    )
    kexp = torch.empty(T, B, Hd)
    torch.library.opcheck(OPS.rnn_key_exp.default, (uah, kexp))
    OPS.rnn_key_exp(uah, kexp)
    state = (slots.clone(), scores.clone(), torch.zeros(T, B))
    torch.library.opcheck(
        OPS.rnn_attend_step.default, (query, hidden, uah, v, *state, *out, t, window, 0.9, kexp)
    )
    torch.library.opcheck(
        OPS.rnn_attend_step_backward.default,
        (torch.randn(B, Hd), query, hidden, uah, v, alpha, cand, *grads, t, window, 0.9, kexp),
    )
    pre = torch.randn(B, Hd, requires_grad=True)
    for nl, b in [("tanh", None), ("modrelu", torch.randn(Hd))]:
        torch.library.opcheck(OPS.rnn_activation.default, (pre, b, nl, torch.empty(B, Hd)))
        torch.library.opcheck(
            OPS.rnn_activation_backward.default,
            (torch.randn(B, Hd), torch.randn(B, Hd), nl, torch.empty(B, Hd), torch.zeros(B, Hd)),
        )
    gates = torch.randn(B, 5 * Hd)[:, : 4 * Hd]
    cell, h = torch.empty(B, Hd), torch.empty(B, Hd)
    torch.library.opcheck(OPS.lstm_cell.default, (gates.clone(), pre, cell, h))
    torch.library.opcheck(
        OPS.lstm_cell_backward.default,
        (
            torch.randn(B, Hd),
            torch.rand(B, 4 * Hd),
            torch.randn(B, Hd),
            torch.randn(B, Hd),
            torch.zeros(B, Hd),
            torch.empty(B, 5 * Hd)[:, : 4 * Hd],
        ),
    )


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_compile_fullgraph_matches_eager(kind):
    torch._dynamo.reset()
    m = make(kind, 3, 4, 3, 2, dtype=F32)
    x = torch.randn(25, 2, 3, requires_grad=True)

    def f(x):
        h, state = m(x, backend="cpu")
        return (h * h).sum() + state.relevancy.sum(), state.relevant_index

    loss, index = f(x)
    grads = torch.autograd.grad(loss, (x, *m.parameters()))
    closs, cindex = torch.compile(f, fullgraph=True)(x)
    cgrads = torch.autograd.grad(closs, (x, *m.parameters()))
    assert torch.equal(index, cindex)
    torch.testing.assert_close(closs, loss)
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------
# Dispatch, layouts, NaN, errors.


def test_auto_picks_the_kernels_for_every_float_dtype(monkeypatch):
    called = []
    fused = rnn_modules._RNN_IMPLS["cpu"]

    def spy(*args, **kwargs):
        called.append(args[0].dtype)
        return fused(*args, **kwargs)

    monkeypatch.setitem(rnn_modules._RNN_IMPLS, "cpu", spy)
    for dtype in (*HALF, F32, F64):
        m = make("rnn", 2, 3, 2, 1, dtype=F32).to(dtype)
        h, state = m(torch.randn(4, 1, 2, dtype=dtype))
        assert h.dtype == dtype and state.relevancy.dtype == (F64 if dtype == F64 else F32)
    assert called == [*HALF, F32, F64]  # half CPU tensors never take the reference
    m = make("rnn", 2, 3, 2, 1, dtype=F32).to(torch.bfloat16)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        m(torch.randn(4, 1, 2, dtype=torch.bfloat16), backend="cuda")


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize(
    ("kind", "nonlinearity"), [("rnn", "tanh"), ("rnn", "modrelu"), ("lstm", "tanh")]
)
def test_half_inputs_compute_in_float32(kind, nonlinearity, dtype):
    """Half CPU inputs (docs/backends.md): h and every gradient within the tolerance table's half
    rule (error against float64 at most twice the half reference's), on the same half-rounded
    model and inputs; the screening as in float64."""
    m = make(kind, 3, 6, 3, 2, nonlinearity, dtype=F32).to(dtype)
    gen = torch.Generator().manual_seed(7)
    x, h0 = torch.randn(20, 2, 3, generator=gen), torch.randn(2, 6, generator=gen)
    g = torch.randn(20, 2, 6, generator=gen)
    x, h0, g = x.to(dtype), h0.to(dtype), g.to(dtype)
    attn = 0.7 if kind == "rnn" else None
    m64 = copy.deepcopy(m).double()
    h64, s64, grads64 = run(m64, x.double(), h0.double(), g.double(), "reference", attn)
    h_lp, _, grads_lp = run(m, x, h0, g, "reference", attn)
    h, state, grads = run(m, x, h0, g, "cpu", attn)
    assert h.dtype == dtype and all(gr.dtype == dtype for gr in grads)
    assert state.relevancy.dtype == F32 and state.relevant_score.dtype == F32
    assert torch.equal(state.relevant_index, s64.relevant_index)
    assert_low_precision_close(h, h64, h_lp)
    for got, want, ref in zip(grads, grads64, grads_lp, strict=True):
        assert_low_precision_close(got, want, ref)


def test_non_contiguous_inputs():
    m = make("rnn", 3, 4, 2, 2)
    x = torch.randn(2, 30, 3, dtype=F64).transpose(0, 1)
    h0 = torch.randn(4, 2, dtype=F64).T
    h, s = m(x, h0, backend="cpu")
    rh, rs = m(x.contiguous(), h0.contiguous(), backend="reference")
    torch.testing.assert_close(h, rh, rtol=1e-10, atol=1e-10)
    assert torch.equal(s.relevant_index, rs.relevant_index)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_empty_batch(kind, backend):
    """B = 0 gives an empty h and state on every backend, gradients included (T = 0 is an
    error, as for torch.nn.RNN: tests/test_hostile_inputs.py)."""
    m = make(kind, 3, 4, 2, 2)
    x = torch.randn(6, 0, 3, dtype=F64, requires_grad=True)
    h, s = m(x, backend=backend)
    assert h.shape == (6, 0, 4) and s.relevant_index.shape == (0, 2)
    assert s.relevant_score.shape == (0, 2) and s.relevancy.shape == (6, 0)
    grads = torch.autograd.grad(h.sum(), (x, *m.parameters()), allow_unused=True)
    assert grads[0].shape == x.shape
    assert all(g is None or not g.any() for g in grads[1:])  # a sum over no rows


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("kind", ["rnn", "lstm"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_stays_in_its_row(kind, bad, backend):
    """A NaN or +Inf in x[4, 1]: rows 0 and 2 are bitwise unchanged, forward, state and the
    gradients of x and h0 (only the shared parameters' gradients see every row); row 1 is
    untouched before step 4, and a NaN reaches every later step of it."""
    m = make(kind, 3, 4, 2, 2)
    x = torch.randn(30, 3, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(3, 4, dtype=F64, requires_grad=True)
    clean, sc = m(x, h0, backend=backend)
    g = torch.randn_like(clean)
    clean_grads = torch.autograd.grad(clean, (x, h0), g)
    xb = x.detach().clone()
    xb[4, 1, 0] = bad
    xb.requires_grad_()
    h, s = m(xb, h0, backend=backend)
    gx, gh0 = torch.autograd.grad(h, (xb, h0), g)
    assert torch.equal(h[:4, 1], clean[:4, 1])
    if math.isnan(bad):
        assert h[4:, 1].isnan().all() and gx[:, 1].isnan().any()
    assert torch.equal(h[:, [0, 2]], clean[:, [0, 2]])
    assert torch.equal(s.relevant_index[[0, 2]], sc.relevant_index[[0, 2]])
    assert torch.equal(s.relevancy[:, [0, 2]], sc.relevancy[:, [0, 2]])
    assert torch.equal(gx[:, [0, 2]], clean_grads[0][:, [0, 2]])
    assert torch.equal(gh0[[0, 2]], clean_grads[1][[0, 2]])


def test_errors():
    m = make("rnn", 3, 4, 2, 1, dtype=F32)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        m(x, backend="cuda")
    with pytest.raises(RuntimeError, match=r"double backward of .* is not implemented"):
        xr = x.clone().requires_grad_()
        h, _ = m(xr, backend="cpu")
        (gx,) = torch.autograd.grad(h.sum(), xr, create_graph=True)
        gx.sum().backward()
    args = list(_rnn_args())
    # direct op callers get the C++ checks
    cases = [
        ({0: torch.randn(5, 2)}, ValueError, r"x must have shape \(T >= 1, B, input_size\)"),
        ({1: torch.randn(3, 4)}, ValueError, r"h0 must have shape \(B, hidden_size\)"),
        ({4: args[4].double()}, TypeError, r"V_weight must have the dtype of x"),
        ({2: torch.randn(4, 5)}, ValueError, r"U_weight must have shape \(4, 3\)"),
        ({7: torch.randn(1, 5)}, ValueError, r"v must have hidden_size = 4 elements"),
        ({9: 0}, ValueError, r"window must be >= 1"),
        ({10: -1}, ValueError, r"relevant must be >= 0"),
        ({11: "gelu"}, ValueError, r"nonlinearity must be one of"),
        ({8: None}, ValueError, r"'modrelu' needs modrelu_b"),
    ]
    for change, exc, msg in cases:
        bad = list(args)
        for i, value in change.items():
            bad[i] = value
        with pytest.raises(exc, match=msg):
            OPS.rel_rnn(*bad)
    T, B, Hd = 6, 2, 3
    hidden = torch.randn(T, B, Hd)
    state = (
        torch.tensor([[3], [-1]]),
        torch.zeros(B, 1),
        torch.zeros(T, B),
        torch.empty(B, Hd),
        torch.empty(B, 3),
        torch.empty(B, 1, dtype=torch.long),
    )
    with pytest.raises(ValueError, match="not older than the window"):  # slot 3 is in the window
        OPS.rnn_attend_step(torch.randn(B, Hd), hidden, hidden, torch.randn(Hd), *state, 4, 2, 1.0)
    with pytest.raises(ValueError, match="t must be >= 1"):
        OPS.rnn_attend_step(torch.randn(B, Hd), hidden, hidden, torch.randn(Hd), *state, 0, 2, 1.0)
    with pytest.raises(TypeError, match="slot_score must have dtype Float"):
        bad = (state[0], state[1].double(), *state[2:])
        OPS.rnn_attend_step(torch.randn(B, Hd), hidden, hidden, torch.randn(Hd), *bad, 4, 2, 1.0)


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; the sources are compiled by tests/test_build.py).


@needs_cuda
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize(("kind", "nonlinearity"), KINDS, ids=lambda v: str(v))
def test_cuda_matches_reference(kind, nonlinearity, dtype):
    if not _backend.cuda_compiled():
        pytest.skip("screening_attn._C was built without CUDA")
    check(kind, T=70, nonlinearity=nonlinearity, dtype=dtype, backend="cuda", device="cuda")


def _bad_slot_state(device: str):
    """A direct call's arguments whose slot 0 of row 0 holds step 3, inside the window of step 4
    (window 2): ``(step args, step_backward args)``."""
    T, B, Hd, t, window = 6, 2, 3, 4, 2
    hidden, q, v = torch.randn(T, B, Hd), torch.randn(B, Hd), torch.randn(Hd)
    slots = torch.tensor([[3], [-1]])
    alpha = torch.zeros(B, window + 1)
    step = (q, hidden, hidden, v, slots, torch.zeros(B, 1), torch.zeros(T, B))
    step += (torch.empty(B, Hd), alpha, torch.empty(B, 1, dtype=torch.long), t, window, 1.0)
    grads = (torch.zeros(T, B, Hd), torch.zeros(T, B, Hd), torch.zeros(B, Hd), torch.empty(B, Hd))
    backward = (torch.randn(B, Hd), q, hidden, hidden, v, alpha, slots, *grads, t, window, 1.0)
    move = lambda a: a.to(device) if isinstance(a, torch.Tensor) else a  # noqa: E731
    return [move(a) for a in step], [move(a) for a in backward]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_bad_slot_state_raises_on_every_device(device):
    """The same error on both kernels; on CUDA validated on the host: a ValueError, not a device
    assert that would poison the context (the sequence op after it still runs)."""
    if device == "cuda" and not _backend.cuda_compiled():
        pytest.skip("screening_attn._C was built without CUDA")
    step, backward = _bad_slot_state(device)
    with pytest.raises(ValueError, match="slot_index holds step 3, which is not older"):
        OPS.rnn_attend_step(*step)
    with pytest.raises(ValueError, match="cand holds step 3, which is not older"):
        OPS.rnn_attend_step_backward(*backward)
    if device == "cuda":
        torch.cuda.synchronize()  # raises if a kernel had failed
        check("rnn", T=12, nonlinearity="tanh", dtype=torch.float32, backend="cuda", device="cuda")


@needs_cuda
def test_cuda_step_beyond_shared_memory_raises():
    """window + relevant candidates past the block's shared memory: a clear error before any
    launch (not a launch failure), naming window + relevant and Hd."""
    if not _backend.cuda_compiled():
        pytest.skip("screening_attn._C was built without CUDA")
    step, _ = _bad_slot_state("cuda")
    window = 1 << 16  # 1.3 MB of candidates at 20 B each: more than any GPU's block has
    step[4] = torch.full_like(step[4], -1)
    step[8] = torch.zeros(2, window + 1, device="cuda")
    step[-2] = window
    with pytest.raises(ValueError, match=r"window \+ relevant = 65537 candidates \(Hd = 3\)"):
        OPS.rnn_attend_step(*step)
    torch.cuda.synchronize()
