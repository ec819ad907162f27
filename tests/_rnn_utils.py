"""Shared helpers of the RelRNN / RelLSTM kernel tests: a module with non-zero biases, and one
run of a backend against the reference (forward h, final state, every gradient)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _tolerances import TOL

from screening_attn.nn import RelLSTM, RelRNN

F64 = torch.float64


def make(kind, I, Hd, window, relevant, nonlinearity="tanh", dtype=F64, device="cpu", seed=0):
    torch.manual_seed(seed)
    if kind == "rnn":
        m = RelRNN(I, Hd, window, relevant, nonlinearity, dtype=dtype)
    else:
        m = RelLSTM(I, Hd, window, relevant, dtype=dtype)
    with torch.no_grad():  # non-zero biases and a peaked v: rows screen differently
        for name, p in m.named_parameters():
            if name.endswith("bias") or name == "nonlinearity.b":
                p.uniform_(-0.5, 0.5)
        m.v.mul_(3.0)
    return m.to(device)


def saturated_model(kind, dtype, window=1, relevant=3):
    """A model whose h_t depends on x_t alone, h = 0 for x = 0 ("hot") and h < 0 for x = -5
    ("cold"), with scores v·tanh(Ua h_j) of 0 (hot) and about -6e3 (cold): attention weights
    are exactly 1/(number of hot candidates) and 0, so relevancies repeat bitwise."""
    big = 1e4
    if kind == "rnn":
        m = RelRNN(1, 1, window, relevant, nonlinearity="identity", bias=False, dtype=dtype)
        with torch.no_grad():  # h_t = x_t
            m.U.weight.fill_(1.0)
            m.V.weight.zero_()
    else:
        m = RelLSTM(1, 1, window, relevant, dtype=dtype)
        with torch.no_grad():  # f = σ(-big) = 0, i = o = σ(big) = 1: h_t = tanh(tanh(x_t))
            for gate, bias in ((m.Wf, -big), (m.Wi, big), (m.Wo, big), (m.Wg, 0.0)):
                gate.weight.zero_()
                gate.bias.fill_(bias)
            m.Wg.weight[0, 1] = 1.0  # z = [s, x]: the input only
    with torch.no_grad():
        m.Va.weight.zero_()
        m.Ua.weight.fill_(1.0)
        m.v.fill_(big)
    return m


def run(m, x, h0, g, backend, attn):
    """h, state and the gradients of x, h0 and every parameter (zeros where unused)."""
    kw = {"attn": attn} if isinstance(m, RelRNN) else {}
    x = x.detach().requires_grad_()
    h0 = None if h0 is None else h0.detach().requires_grad_()
    h, state = m(x, h0, backend=backend, **kw)
    inputs = [x, *([] if h0 is None else [h0]), *m.parameters()]
    grads = torch.autograd.grad(h, inputs, g, allow_unused=True, materialize_grads=True)
    return h, state, grads


NEAR_TIE = 1e-5  # relative: float32 rounding of relevancies summed over a few steps


@dataclass
class Screening:
    """The slot rule (docs/attention.md#screening) replayed on one run's own relevancies.

    ``slots[b][j]`` are row b's slot indices before state j is screened, ``targets[b][j]`` the
    slot state j went into (-1: dropped); ``evicted``: some state overwrote a full set's slot;
    ``tied``: some full-set decision compared exactly equal scores that decided it (the new
    score equal to the minimum, or a win over a minimum held by several slots)."""

    slots: list[list[tuple[int, ...]]]
    targets: list[list[int]]
    scores: list[list[tuple[float, ...]]]
    relevancy: list[list[float]]
    evicted: bool
    tied: bool


def _weakest(scores) -> int:
    """The slot with the smallest score, the lowest on ties; a NaN score counts as smallest."""
    m = 0
    for i in range(1, len(scores)):
        s, best = scores[i], scores[m]
        if (s != s and best == best) or s < best:
            m = i
    return m


def replay(state, window: int, relevant: int) -> Screening:
    """Replay the slot rule on ``state.relevancy`` (final for every screened state) and assert
    that it gives the run's own final slots and scores: a kernel whose rule differs (>= for >,
    another slot on ties) fails here on any exact tie, whatever the reference does."""
    r = state.relevancy.T.double().tolist()  # (B, T), exact
    T = state.relevancy.shape[0]
    out = Screening([], [], [], r, False, False)
    for b, row in enumerate(r):
        idx, sc = [-1] * relevant, [-math.inf] * relevant
        slots, targets, scores = [], [], []
        for j in range(max(0, T - window) if relevant else 0):
            slots.append(tuple(idx))
            scores.append(tuple(sc))
            e = row[j]
            if -1 in idx:
                target = idx.index(-1)
            else:
                m = _weakest(sc)
                target = m if e > sc[m] else -1
                out.evicted |= target >= 0
                out.tied |= e == sc[m] or (target >= 0 and sc.count(sc[m]) > 1)
            if target >= 0:
                idx[target], sc[target] = j, e
            targets.append(target)
        out.slots.append(slots)
        out.targets.append(targets)
        out.scores.append(scores)
        assert idx == state.relevant_index[b].tolist(), (
            f"row {b}: slots {state.relevant_index[b].tolist()} are not the slot rule's {idx} "
            "on the run's own relevancies"
        )
        torch.testing.assert_close(
            state.relevant_score[b].double(), torch.tensor(sc, dtype=F64), rtol=0, atol=0,
            equal_nan=True, msg=f"row {b}: slot scores are not the screened relevancies",
        )  # fmt: skip
    return out


def _near(a: float, b: float) -> bool:
    return abs(a - b) <= NEAR_TIE * max(abs(a), abs(b))


def first_divergence(got: Screening, want: Screening, window: int) -> list[int | None]:
    """Per row, the step t after which the two runs' screening decisions first differ (None if
    they never do), asserting that the difference is a near tie of ``want`` (the reference):
    the set was full and the two relevancies compared there (the new state's and the weakest
    slot's, or the two candidate slots') are within NEAR_TIE relative."""
    cuts: list[int | None] = []
    for b, (ga, wa) in enumerate(zip(got.targets, want.targets, strict=True)):
        j = next((j for j, (x, y) in enumerate(zip(ga, wa, strict=True)) if x != y), None)
        if j is None:
            cuts.append(None)
            continue
        slots, scores = want.slots[b][j], want.scores[b][j]
        where = f"row {b}, state {j} (slot {ga[j]} against the reference's {wa[j]})"
        assert -1 not in slots, f"{where}: the set was not full"
        if ga[j] >= 0 and wa[j] >= 0:  # both evict, another slot: its score ties the minimum
            pair = scores[ga[j]], scores[wa[j]]
        else:  # one evicts, one drops: the new state's relevancy ties the minimum
            pair = want.relevancy[b][j], scores[_weakest(list(scores))]
        assert _near(*pair), f"{where}: decided {pair[0]!r} against {pair[1]!r}, no near tie"
        cuts.append(j + window)
    return cuts


def _merge(a: list[int | None], b: list[int | None]) -> list[int | None]:
    return [x if y is None else y if x is None else min(x, y) for x, y in zip(a, b, strict=True)]


def _masks(cuts, T, window):
    """(steps, states): the (T, B) entries of h and of relevancy that are still comparable
    when row b's decisions diverge after step cuts[b]: h up to that step, and the relevancy of
    the states screened up to it (final before the divergence)."""
    B = len(cuts)
    steps = torch.ones(T, B, dtype=torch.bool)
    states = torch.ones(T, B, dtype=torch.bool)
    for b, t in enumerate(cuts):
        if t is not None:
            steps[t + 1 :, b] = False
            states[t - window + 1 :, b] = False
    return steps, states


def check(
    kind,
    *,
    T=20,
    B=3,
    I=4,
    Hd=5,
    window=3,
    relevant=2,
    nonlinearity="tanh",
    attn=1.3,
    dtype=F64,
    with_h0=True,
    seed=0,
    backend="cpu",
    device="cpu",
    x=None,
    model=None,
    restride: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Screening:
    """One run of ``backend`` against the reference; ``restride`` (same values, other strides)
    is applied to x and h0. Returns the reference's replayed screening (for the fuzz's events).

    float64 selections must match exactly. A float32 row whose screening decisions differ is
    excused only at its first differing decision, and only for a near tie there
    (``first_divergence``); everything of the row up to that step, and every other row, is
    still compared, and the gradients are compared in full for an upstream gradient that is
    zero after the divergence (the steps up to it do not depend on later decisions)."""
    m = model or make(kind, I, Hd, window, relevant, nonlinearity, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if x is None:
        x = torch.randn(T, B, I, generator=gen, dtype=F64)
    x = x.to(device, dtype)
    T, B = x.shape[:2]
    h0 = torch.randn(B, Hd, generator=gen, dtype=F64).to(device, dtype) if with_h0 else None
    if restride is not None:
        x, h0 = restride(x), None if h0 is None else restride(h0)
    g = torch.randn(T, B, Hd, generator=gen, dtype=F64).to(device, dtype)
    h, st, grads = run(m, x, h0, g, backend, attn)
    rh, rst, rgrads = run(m, x, h0, g, "reference", attn)
    assert h.dtype == dtype and h.shape == (T, B, Hd)
    assert st.relevant_index.shape == st.relevant_score.shape == (B, relevant)
    assert st.relevancy.shape == (T, B) and st.relevancy.dtype == rst.relevancy.dtype
    assert st.relevant_score.dtype == rst.relevant_score.dtype
    assert not st.relevant_score.requires_grad and not st.relevancy.requires_grad
    got, want = replay(st, window, relevant), replay(rst, window, relevant)
    cuts = first_divergence(got, want, window)
    assert dtype != F64 or cuts == [None] * B, "float64 selections must match the reference"
    names = ["h", "x", *(["h0"] if with_h0 else []), *(n for n, _ in m.named_parameters())]
    exact = None  # the float64 reference, run only if a float32 comparison needs it
    while True:
        if any(c is not None for c in cuts):  # the loss of the comparable steps only
            g_cut = g.clone()
            for b, t in enumerate(cuts):
                if t is not None:
                    g_cut[t + 1 :, b] = 0
            grads = run(m, x, h0, g_cut, backend, attn)[2]
            rgrads = run(m, x, h0, g_cut, "reference", attn)[2]
        else:
            g_cut = g
        steps, states = _masks(cuts, T, window)
        whole = [c is None for c in cuts]
        rtol, atol = TOL[dtype]
        close = {"rtol": rtol, "atol": atol}
        torch.testing.assert_close(st.relevant_index[whole], rst.relevant_index[whole])
        torch.testing.assert_close(st.relevant_score[whole], rst.relevant_score[whole], **close)
        torch.testing.assert_close(st.relevancy[states], rst.relevancy[states], **close)
        pairs = [(h[steps], rh[steps]), *zip(grads, rgrads, strict=True)]
        failed = []
        for name, (a, b) in zip(names, pairs, strict=True):
            try:
                torch.testing.assert_close(a, b, **close)
            except AssertionError:
                if dtype != torch.float32:
                    raise
                failed.append((name, a, b))
        if not failed:
            return want
        # Long recurrences can amplify rounding (BPTT through unsaturated steps): then every
        # element of the float32 kernel must be within float32's tolerance of float64, plus
        # 4 x the float32 reference's largest error on that tensor: float32's noise on this
        # problem, measured (an element's own reference error is one draw of that noise, not
        # its bound; the kernel's backward sums in another order, chunks and blocked
        # products, and measures up to ~3x the reference's error on such problems).
        if exact is None:
            exact, cuts64 = _float64_run(m, x, h0, g_cut, attn, want, window, relevant)
            merged = _merge(cuts, cuts64)
            if merged != cuts:  # float64 decides otherwise earlier: compare less, once more
                cuts, exact = merged, None
                continue
        for name, a, b in failed:
            i = names.index(name)
            e = exact[i][steps] if name == "h" else exact[i]
            e = e.double()
            err, ref_err = ((t.double() - e).abs() for t in (a, b))
            bound = 4 * ref_err.max() + rtol * e.abs() + atol
            bad = err > bound
            assert not bad.any(), (
                f"d{name}: {int(bad.sum())} elements beyond float32's tolerance + 4 x the float32 "
                f"reference's error against float64, worst by {(err - bound).max().item():.3g}"
            )
        return want


def _float64_run(m, x, h0, g, attn, want, window, relevant):
    """h and the gradients of the reference in float64 on the exactly upcast inputs, and the
    steps where its screening first differs from the float32 reference's ``want`` (near ties
    of float64, asserted)."""
    m64 = copy.deepcopy(m).double()
    h0 = None if h0 is None else h0.double()
    h, st, grads = run(m64, x.double(), h0, g.double(), "reference", attn)
    cuts = first_divergence(want, replay(st, window, relevant), window)
    return (h, *grads), cuts
