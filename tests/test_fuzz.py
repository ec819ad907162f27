"""Hypothesis fuzzing of every compiled backend against the reference (never against another
kernel): screened attention (C++ CPU, Triton), RelRNN / RelLSTM (the C++ sequence kernels) and
the CNN-F ops (C++ CPU, Triton), forward and gradients, over shapes with their edge cases
(T = 1, T < ν, ν = 1, ρ = 0, ρ >= T, B = H = 1, small odd D, empty dims), dtypes and memory
layouts (transposed, sliced, broadcast, channels_last views).

Example counts per op (`make test`, the "ci" profile of conftest.py: fixed, derandomized
examples; `make fuzz` multiplies every count by FUZZ_FACTOR = 10 and draws new ones each run):

* every op's C++ CPU kernel: 1000 examples (float64 and float32; float16 / bfloat16 too for the
  CNN-F gates, pools and the top-down norm), but screened attention 600 and RelRNN / RelLSTM 500
  (their checks cost the most);
* the Triton kernels run under the interpreter, 10-1000x slower than the C++ kernels, so they
  get fewer examples of smaller sizes: screened attention 20 (T <= 20, B·H <= 2; float64,
  float32, float16, bfloat16), each CNN-F op 60 (planes up to 8 x 8; float64, float32, and
  float16 / bfloat16 for the gates, pools and the top-down norm).

Time (`make test`): 110 s on this 2-core machine, 220 s while other jobs load it; the module runs
on one thread whatever OMP_NUM_THREADS says.

Selections (attention's relevant sets, RNN slots, gates, pool positions) must match the
reference exactly in float64. In lower precision a differing selection is accepted only where
the reference's decision was a near tie (then the example checks what it can and records a
Hypothesis event; `make fuzz` prints how often that happened). For attention an excuse covers
one row from its first differing decision on: everything else is still compared
(tests/_attention_utils.py); the hot/cold mode's inputs tie exactly in every dtype and get no
excuse. Half outputs and gradients: element-wise bounds (docs/numerics.md).

The attention examples exercise the mechanism: mostly T >= ν + ρ + 2 and tie modes; the events
"attention: evicts" and "attention: ties" give their shares (`--hypothesis-show-statistics`; in
the ci profile 58% evict and 32% tie of the CPU's 600, 90% and 25% of Triton's 20).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _attention_utils import (
    assert_state_consistent,
    attention_magnitudes,
    check_against_reference,
    differing_rows,
    near_tie_decision,
    reference_with_state,
    tied_decisions,
)
from _env import FUZZ_FACTOR
from _feedback_utils import windows
from _rnn_utils import check as check_rnn
from _rnn_utils import make as make_rnn
from _rnn_utils import saturated_model
from _tolerances import ROUNDING, TOL, assert_close, assert_low_precision_close
from hypothesis import event, given, settings
from hypothesis import strategies as st

from screening_attn import _backend
from screening_attn.attention import _ops as attention_ops
from screening_attn.attention import screened_attention
from screening_attn.attention.state import ScreeningState
from screening_attn.feedback import functional, reference

pytestmark = pytest.mark.skipif(_backend.C_ERROR is not None, reason=str(_backend.C_ERROR))
needs_triton = pytest.mark.skipif(not _backend.HAS_TRITON, reason="triton is not installed")

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
HALF = (F16, BF16)
CPU_EXAMPLES = 1000
# attention's examples check against several float64 oracles (~90 ms each): fewer, for the
# suite's 20-minute budget; `make fuzz` runs 10x
CPU_ATTENTION_EXAMPLES = 600
TRITON_ATTENTION_EXAMPLES = 20
TRITON_FEEDBACK_EXAMPLES = 60


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The examples are tiny: a second thread only adds synchronisation, which costs 5x the
    time when the other core is busy. (Results across thread counts: the determinism tests.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fuzz(examples: int):
    """Settings of one fuzz test: ``examples`` (times FUZZ_FACTOR under `make fuzz`); the rest
    (derandomize, database, deadline=None) comes from the loaded profile."""
    return settings(max_examples=examples * FUZZ_FACTOR)


# ------------------------------------------------------------------------------------------------
# Shared strategies: layouts, dtypes, seeds.

# Same values, other strides. "broadcast" repeats the first entry of dim 0 (stride 0), so it
# changes the values: every layout's result is what both the kernel and the reference get.
LAYOUTS = ("contiguous", "transposed", "permuted", "channels_last", "sliced", "strided_outer",
           "broadcast")  # fmt: skip
layouts = st.sampled_from(LAYOUTS)
seeds = st.integers(0, 2**31 - 1)


def restride(x: torch.Tensor, layout: str, requires_grad: bool = False) -> torch.Tensor:
    """``x`` (detached) seen through ``layout``; a leaf that requires grad if asked."""
    x = x.detach()
    n = x.dim()
    if layout == "transposed" and n >= 2:  # the last two dims stored swapped
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "permuted" and n >= 3:  # dims 1 and 2 stored swapped ((B, T, H, D) storage)
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "channels_last" and n == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced" and n >= 1:  # every other element of the last dim
        y = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])[..., ::2]
        x = y.copy_(x)
    elif layout == "strided_outer" and n >= 1:  # every other row of dim 0, from offset 1
        y = x.new_zeros(2 * x.shape[0] + 1, *x.shape[1:])[1::2]
        x = y.copy_(x)
    elif layout == "broadcast" and n >= 1 and x.shape[0] > 0:
        x = x[:1].expand_as(x)
    return x.requires_grad_(requires_grad)


def randn(shape, dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Standard normal values drawn in float64 (so every dtype sees the same numbers), cast."""
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype)


# ------------------------------------------------------------------------------------------------
# Screened attention.


# (weighted: q = 0 and self-only never evict once the set is full)
ATTENTION_MODES = ("randn", "randn", "peaked", "peaked", "saturated", "saturated", "saturated",
                   "hot_cold", "hot_cold", "zero_q", "repeated_keys", "self_only")  # fmt: skip
# Triton's few examples: the modes that evict (q = 0 and self-only never do; the CPU fuzz and
# the tie tests of test_attention_kernels.py run them through Triton)
TRITON_ATTENTION_MODES = ("randn", "peaked", "saturated", "saturated", "hot_cold", "hot_cold",
                          "repeated_keys")  # fmt: skip
# Modes whose every run (kernel or reference, any summation order) computes the weights and
# relevancies bitwise alike in every dtype: no near-tie excuse applies.
EXACT_MODES = ("hot_cold",)
# exp(NEG) is 0 in the dtype (halves: computed in float32); as small as that allows, since
# dk sums |NEG| times rounding-sized terms
NEG = {F64: -800.0, F32: -105.0, F16: -105.0, BF16: -105.0}


@st.composite
def attention_cases(draw, max_T: int, max_BH: int, max_D: int, dtypes, modes=ATTENTION_MODES,
                    min_set: int = 1, max_set: int = 6, slack: int = 2,
                    edge_one_in: int = 5):  # fmt: skip
    """Mostly T >= ν + ρ + ``slack`` with ν, ρ in [``min_set``, ``max_set``], so that the set
    fills and keys are evicted (ν = 1 or ρ = 1 evict less: then key 0, the only candidate of
    query 0, often holds its slot for good); the edge cases (T = 1, T < ν, ν = 1, ρ = 0,
    ρ >= T, huge ν) in one example of ``edge_one_in``.

    Modes: randn; peaked (saturated rows, exact 0/1 weights); q = 0 (uniform attention);
    saturated (one-hot keys, logits 0 or NEG: weights exactly 0 or 1/n, relevancies tie with
    the slot minimum and between slots); hot/cold keys (cold keys' logits are NEG whatever the
    query, hot keys' 0: weights exactly 0 or 1/n in every dtype, cold relevancies exactly 0,
    so float32 and half runs tie exactly too); repeated keys (equal logits, so equal weights);
    self-only (every weight 1 on the query's own key: every relevancy is 1, every full-set
    screening a tie).

    Returns ``(q, k, v, window, relevant, scale, exact)``, ``exact`` for ``EXACT_MODES``."""
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, max(1, max_BH // B)))
    mode = draw(st.sampled_from(modes))
    # (the last value: Hypothesis's simplest example is then one that evicts)
    if draw(st.integers(1, edge_one_in)) == edge_one_in:  # edge cases
        T = draw(st.one_of(st.just(1), st.integers(1, max_T)))
        window = draw(st.one_of(st.just(1), st.integers(1, T + 1), st.integers(T, 2 * T + 20),
                                st.just(2**40)))  # fmt: skip
        relevant = draw(st.one_of(st.just(0), st.integers(0, 8), st.integers(max(0, T - 1), T + 3)))
    else:  # the set fills and keys are evicted
        window = draw(st.integers(min_set, max_set))
        relevant = draw(st.integers(min_set, max_set))
        T = draw(st.integers(min(window + relevant + slack, max_T), max_T))
    D = draw(st.one_of(st.integers(1, 3), st.integers(1, max_D)))
    if mode in ("saturated", "self_only"):
        D = T  # one-hot keys: the logit s_tj is q[t, j]
    Dv = draw(st.one_of(st.just(D), st.integers(1, max_D)))
    dtype = draw(st.sampled_from(dtypes))
    if mode in ("saturated", "self_only") and dtype == F32:
        # dk sums |NEG| = 105 times float32 rounding-sized terms of ds where the exact value
        # can be 0: beyond any elementwise float32 bound (hot_cold ties float32 exactly)
        dtype = F64
    scale = draw(st.one_of(st.none(), st.floats(0.1, 3.0)))
    lay = draw(st.tuples(layouts, layouts, layouts))
    gen = torch.Generator().manual_seed(draw(seeds))
    q = randn((B, H, T, D), dtype, gen, 4.0 if mode == "peaked" else 1.0)
    k, v = randn((B, H, T, D), dtype, gen), randn((B, H, T, Dv), dtype, gen)
    if mode == "zero_q":
        q = torch.zeros_like(q)
    elif mode in ("saturated", "self_only"):
        active = torch.rand(B, H, T, T, generator=gen) < 0.5
        if mode == "self_only":
            active = torch.eye(T, dtype=torch.bool).expand(B, H, T, T)
        q = torch.where(active, 0.0, NEG[dtype]).to(dtype)
        k = torch.eye(T, dtype=dtype).expand(B, H, T, T).clone()
        scale = 1.0
    elif mode == "hot_cold":
        # q_t = (1, randn…), cold k_j = (NEG, 0…), hot k_j = 0: every product is exact. Key 0
        # is hot and enters the first slot (never evicted but by a hot key), so every query
        # has a hot candidate; with ρ = 0 every ν-th key is hot instead. (A query with only
        # cold candidates would weigh them uniformly, and its dq sum |NEG| times
        # rounding-sized terms of an exact 0.) Cold keys' gradients are then exactly 0. Keys
        # 1 … ν+ρ-1 are cold, so that the other slots start at relevancy 0, which later cold
        # keys tie and hot keys beat.
        j = torch.arange(T).view(T, 1)
        p_hot = draw(st.sampled_from([0.25, 0.5]))
        drawn = torch.rand(B, H, T, 1, generator=gen) < p_hot
        hot = (drawn & (j >= window + relevant)) | (j == 0)
        if relevant == 0:
            hot |= j % window == window - 1
        q[..., 0] = 1.0
        k = torch.zeros_like(k)
        k[..., :1] = torch.where(hot, 0.0, NEG[dtype]).to(dtype)
        scale = 1.0
    elif mode == "repeated_keys":  # a few distinct keys, repeated along the sequence
        distinct = min(draw(st.integers(1, 3)), T)
        k = k[:, :, torch.randint(0, distinct, (T,), generator=gen)]
    q, k, v = (restride(x, layout, True) for x, layout in zip((q, k, v), lay))
    return q, k, v, window, relevant, scale, mode in EXACT_MODES


def run_cpu(q, k, v, window, relevant, scale):
    return screened_attention(q, k, v, window, relevant, scale=scale, return_state=True,
                              backend="cpu")  # fmt: skip


def run_triton(q, k, v, window, relevant, scale):
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _, index, score, relevancy, span = attention_ops.screened_attention_triton(
        q, k, v, window, relevant, scale
    )
    return out, ScreeningState(index, score, relevancy, span)


def record_mechanism(q, k, v, window, relevant, scale):
    """Hypothesis events: does the reference's run evict a key, does it decide a tie?"""
    _, ref_state = reference_with_state(q, k, v, window, relevant, scale)
    T = q.shape[2]
    start, end = ref_state.span[..., 0], ref_state.span[..., 1]
    evicts = bool(((start >= 0) & (end < T)).any())
    if 0 <= T - window < T and relevant > 0:  # the last screening: its evicted key ends at T
        full = ((start >= 0) & (start < T) & (end == T)).sum(-1) == relevant
        evicts |= bool((full & (start[..., T - window] == T)).any())
    equal, tied = tied_decisions(ref_state, window)
    event("attention: evicts" if evicts else "attention: no eviction")
    event("attention: ties" if equal + tied else "attention: no tie")


def check_attention(run, q, k, v, window, relevant, scale, exact):
    record_mechanism(q, k, v, window, relevant, scale)
    if q.dtype in HALF:
        same = check_attention_half(run, q, k, v, window, relevant, scale, exact)
        if not same:
            event("selection differs at a near tie")
        return
    events = []
    # float64 too: the saturated tie modes' logits reach |800|, where one rounding of the
    # reference's own summation order already costs ~1e-8 relative in a small dk entry (seen
    # once in a full run); the bound is then per element, against an independent float64 SDPA
    check_against_reference(run, q, k, v, window, relevant, scale, conditioned=True,
                            events=events, exact=exact)  # fmt: skip
    for name in sorted(set(events)):
        event(name)


def check_attention_half(run, q, k, v, window, relevant, scale, exact) -> bool:
    """fp16/bf16: the kernel and the reference both compute in float32 from the same inputs,
    so their selections match but for near ties (``near_tie_decision``: local and exact). State
    of the other rows, and of an excused row its relevancies up to that decision: as the
    reference's. Output and gradients: the low-precision rule of _tolerances.py against a
    float64 oracle with the kernel's own selection (masked softmax attention on the exactly
    upcast inputs), the low-precision reference being that attention computed in float32;
    element-wise, with the magnitudes of ``attention_magnitudes``."""
    out, state = run(q, k, v, window, relevant, scale)
    ref, ref_state = reference_with_state(q, k, v, window, relevant, scale)
    assert out.dtype == q.dtype and state.relevancy.dtype == torch.float32
    assert state.relevant_score.dtype == torch.float32
    assert_state_consistent(state, window)
    excused = {}
    for n in differing_rows(state, ref_state):
        assert not exact, f"row {n}: selection of exact-arithmetic inputs differs"
        e = near_tie_decision(state, ref_state, n, window, relevant)
        assert e is not None, f"row {n}: selection differs without a near tie"
        excused[n] = e
    rows = [n for n in range(q.shape[0] * q.shape[1]) if n not in excused]
    flat = lambda x: x.flatten(0, 1)  # noqa: E731
    assert torch.equal(flat(state.span)[rows], flat(ref_state.span)[rows])
    assert torch.equal(flat(state.relevant_index)[rows], flat(ref_state.relevant_index)[rows])
    for got, want in ((state.relevancy, ref_state.relevancy),
                      (state.relevant_score, ref_state.relevant_score)):  # fmt: skip
        torch.testing.assert_close(flat(got)[rows], flat(want)[rows], rtol=1e-5, atol=1e-5)
    for n, e in excused.items():
        got, want = flat(state.relevancy)[n, : e + 1], flat(ref_state.relevancy)[n, : e + 1]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mask = state.candidate_mask(window)
    x64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    x32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out64 = F.scaled_dot_product_attention(*x64, attn_mask=mask, scale=scale)
    out32 = F.scaled_dot_product_attention(*x32, attn_mask=mask, scale=scale)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads64 = torch.autograd.grad(out64, x64, g.double())
    if excused:  # the low-precision reference with the kernel's sets
        ref_grads = [x.to(q.dtype) for x in torch.autograd.grad(out32, x32, g.float())]
        ref = out32.detach().to(q.dtype)
    else:
        ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    magnitudes = attention_magnitudes(q, k, v, g, mask, scale)
    assert_low_precision_close(out, out64.detach(), ref, magnitudes[0])
    for a, b64, b_lp, m in zip(grads, grads64, ref_grads, magnitudes[1:]):
        assert_low_precision_close(a, b64, b_lp, m)
    return not excused


@fuzz(CPU_ATTENTION_EXAMPLES)
@given(attention_cases(max_T=140, max_BH=4, max_D=9, dtypes=[F64, F32]))
def test_attention_cpu(case):
    check_attention(run_cpu, *case)


@needs_triton
@fuzz(TRITON_ATTENTION_EXAMPLES)
@given(attention_cases(max_T=20, max_BH=2, max_D=16, dtypes=[F64, F32, F16, BF16],
                      modes=TRITON_ATTENTION_MODES, min_set=2, max_set=4, slack=6,
                      edge_one_in=8))  # fmt: skip
def test_attention_triton(case):
    check_attention(run_triton, *case)


# ------------------------------------------------------------------------------------------------
# RelRNN and RelLSTM: the C++ sequence kernels (backend "cpu") against the reference module.


RNN_MODES = ("evict", "evict", "evict", "tie", "tie", "screening", "edge")
# Half the examples of the other ops: every one runs a Python loop over T >= ν+ρ+2 steps.
RNN_EXAMPLES = 500


@st.composite
def rnn_cases(draw, kind: str):
    """A mode, then sizes. "edge": any T, ν, ρ (T = 1, T < ν, ρ = 0, ρ >= T, a window that never
    slides); the others have T >= ν+ρ+2, so that sets fill and get contested: "screening" on
    random inputs, "evict" with small sets and long sequences, "tie" on hot/cold inputs of
    _rnn_utils.saturated_model, whose relevancies repeat bitwise. T = 65 crosses the
    backward's 64-step chunks; the rest stay short (the reference is a Python loop over time)."""
    mode = draw(st.sampled_from(RNN_MODES))
    if mode == "edge":
        T = draw(st.sampled_from([*range(1, 25), 65]))
        window = draw(st.one_of(st.just(1), st.integers(1, T + 1), st.just(2**40)))
        relevant = draw(st.one_of(st.just(0), st.integers(0, 4), st.integers(T, T + 2)))
    elif mode == "tie":  # window 1: a cold state's relevancy is exactly 0, like early slots'
        window, relevant = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    else:  # window >= 2: a later state can beat the early ones' large relevancies
        window = draw(st.integers(2, 3 if mode == "evict" else 5))
        relevant = draw(st.integers(1, 2 if mode == "evict" else 4))
    if mode != "edge":
        T = window + relevant + 2 + draw(st.integers(0, 10)) + (6 if mode == "evict" else 0)
        T = 65 if draw(st.integers(0, 39)) == 0 else T
    case = {
        "mode": mode,
        "T": T,
        "B": draw(st.integers(1 if mode == "edge" else 2, 3)),
        # one hidden feature gives too few distinct scores to contest a set
        "I": draw(st.integers(1 if mode == "edge" else 2, 4)),
        "Hd": draw(st.integers(1 if mode == "edge" else 2, 7)),
        "window": window,
        "relevant": relevant,
        "dtype": draw(st.sampled_from([F64, F32])),
        "with_h0": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
        "layout": draw(layouts),  # of x and h0
    }
    if kind == "rnn":
        case["nonlinearity"] = draw(st.sampled_from(["tanh", "relu", "sigmoid", "identity",
                                                     "modrelu"]))  # fmt: skip
        case["attn"] = draw(st.one_of(st.just(1.0), st.floats(0.0, 2.0)))
    return case


def check_rnn_case(kind: str, case: dict) -> None:
    """One fuzz example; records whether the reference's screening evicted and tied."""
    layout, mode = case.pop("layout"), case.pop("mode")
    if mode == "tie":  # hot (0) and cold (-5) inputs: weights exactly 1/n and 0
        gen = torch.Generator().manual_seed(case["seed"])
        T, B = case.pop("T"), case.pop("B")
        case["x"] = torch.where(torch.rand(T, B, 1, generator=gen) < 0.6, 0.0, -5.0).double()
        case["model"] = saturated_model(kind, case["dtype"], case["window"], case["relevant"])
        case.update(I=1, Hd=1)
    if mode == "evict":  # sharper attention: a few states collect most of the relevancy
        # (RelLSTM's states are alike, bounded by its gates: it needs a sharper v)
        args = (case["I"], case["Hd"], case["window"], case["relevant"])
        case["model"] = make_rnn(kind, *args, case.get("nonlinearity", "tanh"), case["dtype"],
                                 seed=case["seed"])  # fmt: skip
        with torch.no_grad():
            case["model"].v.mul_(3.0 if kind == "rnn" else 30.0)
    screening = check_rnn(kind, restride=lambda x: restride(x, layout), **case)
    event(f"{kind}: screening evicts" if screening.evicted else f"{kind}: no eviction")
    event(f"{kind}: exact tie at a screening" if screening.tied else f"{kind}: no tie")


@fuzz(RNN_EXAMPLES)
@given(rnn_cases("rnn"))
def test_rel_rnn_cpu(case):
    check_rnn_case("rnn", case)


@fuzz(RNN_EXAMPLES)
@given(rnn_cases("lstm"))
def test_rel_lstm_cpu(case):
    check_rnn_case("lstm", case)


# ------------------------------------------------------------------------------------------------
# CNN-F ops.


def examples_for(backend: str) -> int:
    return CPU_EXAMPLES if backend == "cpu" else TRITON_FEEDBACK_EXAMPLES


def dtypes_for(backend: str, half: bool = True) -> list[torch.dtype]:
    return [F64, F32, *(HALF if half and backend in ("cpu", "triton") else ())]


def grads(out, inputs, grad):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad)


def leaves(*tensors):
    """Fresh leaves over the same memory (layouts kept), one set per run."""
    return [None if t is None else t.detach().requires_grad_() for t in tensors]


def compare(got, want, exact_fn) -> None:
    """Kernel results ``got`` against the reference's ``want`` (same dtype) by _tolerances.
    Where float32 fails them on an ill-conditioned problem (an instance norm of two nearly
    equal values, say), every element of the kernel's result must be within float32's
    tolerance of float64 (``exact_fn()``: the reference on the exactly upcast inputs, with the
    same selections) plus twice the float32 reference's largest error on that tensor (float32's
    noise on this problem, measured). Every tensor is checked."""
    exact = None
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        try:
            assert_close(a, b)
        except AssertionError:
            if a.dtype != F32:
                raise
            if exact is None:
                exact = exact_fn()
            e = exact[i].detach().double()
            err, ref_err = ((t.detach().double() - e).abs() for t in (a, b))
            rtol, atol = TOL[F32]
            bound = 2 * ref_err.max() + rtol * e.abs() + atol
            bad = err > bound
            assert not bad.any(), (i, int(bad.sum()), (err - bound).max().item())
            event("float32 ill-conditioned: checked against float64")


def upcast(*tensors):
    return leaves(*(None if t is None else t.detach().double() for t in tensors))


# ---- AdaReLU and its feedback gate (any shape) -------------------------------------------------


def ada_relu_case(backend):
    return st.fixed_dictionaries(
        {
            "shape": st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple),
            "gated": st.booleans(),
            "eta": st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
            "dtype": st.sampled_from(dtypes_for(backend)),
            "layouts": st.tuples(layouts, layouts, layouts),
            "seed": seeds,
        }
    )


def check_ada_relu(backend, shape, gated, eta, dtype, layouts, seed):
    gen = torch.Generator().manual_seed(seed)
    x = restride(randn(shape, dtype, gen), layouts[0])
    h = restride(randn(shape, dtype, gen), layouts[1]) if gated else None
    # half inputs: the kernels compute in float32, so the oracle is the reference in float32 on
    # the exactly upcast inputs, rounded once
    ref_dtype = F32 if dtype in HALF else dtype
    (xr, hr), (xk, hk) = (
        leaves(x.to(ref_dtype), None if h is None else h.to(ref_dtype)),
        leaves(x, h),
    )
    y_ref, m_ref = reference.ada_relu(xr, hr, eta)
    y, m = functional.ada_relu(xk, hk, eta, backend=backend)
    assert m.dtype == torch.bool and y.dtype == dtype and y.shape == x.shape
    flipped = m != m_ref
    if flipped.any():
        # x' = x + η(h - x) is exactly 0 for some half inputs (x = -0.6015625, h = 2.40625,
        # η = 0.2): its sign is then the rounding's, which a kernel (FMA, operation order) may
        # round the other way. Only such gates may differ: |x'| within four roundings in
        # ref_dtype (η's conversion, h - x, the product, the sum) of the operands' sizes.
        assert gated, "a plain ReLU gate (x > 0) has no rounding to differ by"
        x64, h64 = x.double(), h.double()
        unit = torch.finfo(ref_dtype).eps / 2  # unit roundoff
        bound = 4 * unit * (x64.abs() + abs(eta) * (h64.abs() + x64.abs()))
        far = flipped & ((x64 + eta * (h64 - x64)).abs() > bound)
        assert not far.any(), f"{int(far.sum())} gates differ with |x'| above rounding"
        event("gate differs within rounding of 0")
        # a flipped gate outputs x' or 0, both within rounding of 0: compare everything else,
        # with no upstream gradient at the flips
        assert ((y.double() - y_ref.double()).abs()[flipped] <= 2 * bound[flipped]).all()
        y, y_ref = y.masked_fill(flipped, 0), y_ref.masked_fill(flipped, 0)
    g = restride(randn(shape, dtype, gen), layouts[2]).masked_fill(flipped, 0)
    got, want = grads(y, [xk, hk], g), grads(y_ref, [xr, hr], g.to(ref_dtype))
    z = restride(randn(shape, dtype, gen), layouts[2], True)
    fb = functional.ada_relu_feedback(z, m, backend=backend)
    (gz,) = torch.autograd.grad(fb, z, g)
    if dtype in HALF:
        rtol = 2 * ROUNDING[dtype]  # one rounding of a float32 value apart at most (1 ulp)
        close = {"rtol": rtol, "atol": 1e-6}
        torch.testing.assert_close(y.float(), y_ref.to(dtype).float(), **close)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.to(dtype).float(), **close)
    else:
        assert_close(y, y_ref)
        for a, b in zip(got, want):
            assert_close(a, b)
    assert torch.equal(fb, reference.ada_relu_feedback(z.detach(), m))
    assert torch.equal(gz, reference.ada_relu_feedback(g, m))


def _ada_relu_test(backend):
    @fuzz(examples_for(backend))
    @given(ada_relu_case(backend))
    def test(case):
        check_ada_relu(backend, **case)

    return test


test_ada_relu_cpu = _ada_relu_test("cpu")
test_ada_relu_triton = needs_triton(_ada_relu_test("triton"))


# ---- InsNorm family: ins_bias_ada_relu, ins_norm_gate, ins_norm --------------------------------


@st.composite
def planes(draw, backend: str, min_hw: int = 1):
    """(N, C, H, W) with the edge cases N = C = 1, H = W = min_hw (the Triton interpreter
    gets planes up to 8 x 8, the C++ kernels 12 x 12)."""
    max_hw = max(min_hw, max_planes(backend))
    return (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 4)),
        draw(st.one_of(st.just(min_hw), st.integers(min_hw, max_hw))),
        draw(st.one_of(st.just(min_hw), st.integers(min_hw, max_hw))),
    )


def max_planes(backend: str) -> int:
    return 12 if backend == "cpu" else 8


def norm_case(backend, half: bool):
    return st.fixed_dictionaries(
        {
            "shape": planes(backend),
            "with_bias": st.booleans(),
            "gated": st.booleans(),
            "centered": st.booleans(),
            "eta": st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
            # a large mean makes the centered variance differ from the mean square
            "offset": st.sampled_from([0.0, 2.0]),
            "dtype": st.sampled_from(dtypes_for(backend, half)),
            "layouts": st.tuples(layouts, layouts, layouts),
            "seed": seeds,
        }
    )


def gate_rounding(x, bias, hidden, eta, centered, dtype):
    """The gate's argument u' (u = InsNorm(x) + bias, u' = u + eta (hidden - u)) in float64 on
    the same inputs, and per element the most that ``dtype``'s rounding can move it: eps times
    the operands' magnitude |x r| + |bias| + |hidden|, times n + 4 for the n-term reduction
    behind r (and the ratio of the mean square to the variance when centered) and the few
    roundings after it. A gate may differ from the reference only where |u'| is below this."""
    up = [None if t is None else t.detach().double() for t in (x, bias, hidden)]
    xs = reference.ins_norm(up[0], 1e-8, centered)
    u = xs if up[1] is None else xs + up[1].view(1, -1, 1, 1)
    arg = u if up[2] is None else u + eta * (up[2] - u)
    n = x.shape[2] * x.shape[3]
    cond = 1.0
    if centered and n > 1:
        power = up[0].square().mean(dim=(2, 3), keepdim=True)
        cond = power / up[0].var(dim=(2, 3), keepdim=True).clamp_min(1e-300)
    mag = xs.abs()
    for t in up[1:]:
        if t is not None:
            mag = mag + (t.abs().view(1, -1, 1, 1) if t.dim() == 1 else t.abs())
    return arg, (n + 4) * cond * torch.finfo(dtype).eps * mag


def gate_flips(masks, x, b, h, eta, centered, dtype):
    """Where the gate masks ``masks`` (the kernel's, the reference's, float64's) disagree; each
    such element must be within rounding of 0 (``gate_rounding``), and float64 kernels and
    references must agree everywhere. Returns (flipped, bound)."""
    flipped = torch.zeros_like(masks[0])
    for other in masks[1:]:
        flipped |= other != masks[0]
    arg, bound = gate_rounding(x, b, h, eta, centered, dtype)
    if flipped.any():
        assert dtype != F64, "float64 gates must match the reference exactly"
        far = flipped & (arg.abs() > bound)
        assert not far.any(), f"{int(far.sum())} gates differ with |u'| above rounding"
        event("gate differs within rounding of 0")
    return flipped, bound


def check_ins_bias_ada_relu(backend, shape, with_bias, gated, centered, eta, offset, dtype,
                            layouts, seed):  # fmt: skip
    if centered and shape[2] * shape[3] < 2:
        shape = (*shape[:2], 1, 2)  # the unbiased variance needs two elements per plane
    gen = torch.Generator().manual_seed(seed)
    x = restride(randn(shape, dtype, gen, 3.0) + offset, layouts[0])
    b = randn(shape[1], dtype, gen) if with_bias else None
    h = restride(randn(shape, dtype, gen), layouts[1]) if gated else None
    ref_in, ker_in, ins64 = leaves(x, b, h), leaves(x, b, h), upcast(x, b, h)
    y_ref, m_ref = reference.ins_bias_ada_relu(*ref_in, eta, centered=centered)
    y, m = functional.ins_bias_ada_relu(*ker_in, eta, centered=centered, backend=backend)
    y64, m64 = reference.ins_bias_ada_relu(*ins64, eta, centered=centered)
    assert m.dtype == torch.bool and y.dtype == dtype and y.shape == shape
    flipped, bound = gate_flips((m, m_ref, m64), x, b, h, eta, centered, dtype)
    # A flipped gate outputs u' or 0, both within rounding of 0. Everything else compares, and
    # with no upstream gradient at the flips (their only mask-dependent term) every gradient.
    assert ((y - y_ref).abs().double()[flipped] <= 2 * bound[flipped]).all()
    g = restride(randn(shape, dtype, gen), layouts[2])
    g = g.masked_fill(flipped, 0)

    def exact():
        return (y64.masked_fill(flipped, 0), *grads(y64, ins64, g.double()))

    compare(
        (y.masked_fill(flipped, 0), *grads(y, ker_in, g)),
        (y_ref.masked_fill(flipped, 0), *grads(y_ref, ref_in, g)),
        exact,
    )


def check_ins_norm_gate(backend, shape, with_bias, gated, centered, eta, offset, dtype,
                        layouts, seed):  # fmt: skip
    """The top-down InsNorm·gate (zn, zn ⊙ mask) and the plain InsNorm; half inputs by the
    low-precision rule against float64."""
    del with_bias, gated, eta  # (shared strategy)
    if centered and shape[2] * shape[3] < 2:
        shape = (*shape[:2], 1, 2)
    gen = torch.Generator().manual_seed(seed)
    z = restride(randn(shape, dtype, gen, 3.0) + offset, layouts[0])
    mask = restride(torch.rand(shape, generator=gen) > 0.5, layouts[1])
    g1, g2 = randn(shape, dtype, gen), restride(randn(shape, dtype, gen), layouts[2])

    def run(zz, impl, g1=g1, g2=g2):
        if impl == "reference":
            zn, out = reference.ins_norm_gate(zz, mask, centered=centered)
            y = zn
        else:
            zn, out = functional.ins_norm_gate(zz, mask, centered=centered, backend=impl)
            y = functional.ins_norm(zz, centered=centered, backend=impl)
        loss = (zn * g1).sum() + (out * g2).sum()
        (gz,) = torch.autograd.grad(loss, zz, retain_graph=True)  # (y is zn for the reference)
        (gy,) = torch.autograd.grad(y, zz, g1)
        return zn, out, y, gz, gy

    got = run(*leaves(z), backend)
    want = run(*leaves(z), "reference")
    if dtype in HALF:
        exact = run(*upcast(z), "reference", g1.double(), g2.double())
        for a, e, lp in zip(got, exact, want):
            assert a.dtype == dtype
            # The interpreter's float32 -> bfloat16 store truncates (a GPU rounds to nearest):
            # up to one ulp of error, not half. kernels/feedback.py stores in the input dtype
            # (screened attention stores through float32 on the CPU for this).
            truncates = dtype == BF16 and backend == "triton" and a.device.type == "cpu"
            assert_low_precision_close(a, e.detach(), lp, ulps=2.0 if truncates else 1.0)
    else:
        compare(got, want, lambda: run(*upcast(z), "reference", g1.double(), g2.double()))


def _norm_test(check, backend, half):
    @fuzz(examples_for(backend))
    @given(norm_case(backend, half))
    def test(case):
        check(backend, **case)

    return test


test_ins_bias_ada_relu_cpu = _norm_test(check_ins_bias_ada_relu, "cpu", False)
test_ins_bias_ada_relu_triton = needs_triton(_norm_test(check_ins_bias_ada_relu, "triton", False))
test_ins_norm_gate_cpu = _norm_test(check_ins_norm_gate, "cpu", True)
test_ins_norm_gate_triton = needs_triton(_norm_test(check_ins_norm_gate, "triton", True))


# ---- AdaPool2d and its unpool ------------------------------------------------------------------


@st.composite
def pool_cases(draw, backend):
    k = draw(st.sampled_from([1, 2, 2, 3, 4]))
    N, C, H, W = draw(planes(backend, min_hw=k))
    return {
        "shape": (N, C, H, W),
        "k": k,
        "gated": draw(st.booleans()),
        "ties": draw(st.booleans()),  # values in {-1, 0, 1}: most windows hold ties
        "dtype": draw(st.sampled_from(dtypes_for(backend))),
        "layouts": draw(st.tuples(layouts, layouts, layouts)),
        "seed": draw(seeds),
    }


def check_pool(backend, shape, k, gated, ties, dtype, layouts, seed):
    """Selections are comparisons and the rest is copying: every result is exact, in every
    dtype."""
    gen = torch.Generator().manual_seed(seed)
    pooled = (*shape[:2], shape[2] // k, shape[3] // k)

    def values(size):
        if ties:
            return torch.randint(-1, 2, size, generator=gen).to(dtype)
        return randn(size, dtype, gen)

    x = restride(values(shape), layouts[0])
    # the gate's signs, zeros included (hidden = 0 gives 0)
    hidden = restride(torch.randint(-1, 2, pooled, generator=gen).to(dtype), layouts[1])
    hidden = hidden if gated else None
    (xr,), (xk,) = leaves(x), leaves(x)
    y_ref, amax_ref, amin_ref = reference.ada_pool2d(xr, hidden, k)
    y, amax, amin = functional.ada_pool2d(xk, hidden, k, backend=backend)
    assert amax.dtype == torch.uint8 and y.shape == pooled and y.dtype == dtype
    assert torch.equal(amax, amax_ref) and torch.equal(amin, amin_ref)
    assert torch.equal(y, y_ref)
    g = restride(randn(pooled, dtype, gen), layouts[2])
    assert torch.equal(torch.autograd.grad(y, xk, g)[0], torch.autograd.grad(y_ref, xr, g)[0])
    # feedback: the unpool to the selected positions, and its backward (the gather)
    (zr,), (zk,) = leaves(g), leaves(g)
    size = shape[2:]
    u_ref = reference.ada_unpool2d(zr, amax, amin, hidden, k, size)
    u = functional.ada_unpool2d(zk, amax, amin, hidden, k, size, backend=backend)
    assert u.shape == shape and torch.equal(u, u_ref)
    gu = restride(randn(shape, dtype, gen), layouts[0])
    assert torch.equal(torch.autograd.grad(u, zk, gu)[0], torch.autograd.grad(u_ref, zr, gu)[0])


def _pool_test(backend):
    @fuzz(examples_for(backend))
    @given(pool_cases(backend))
    def test(case):
        check_pool(backend, **case)

    return test


test_ada_pool2d_cpu = _pool_test("cpu")
test_ada_pool2d_triton = needs_triton(_pool_test("triton"))


# ---- stage fusions: InsNorm·Bias·AdaReLU·AdaPool and AdaPool·AdaReLU feedback ------------------


@st.composite
def stage_cases(draw, backend):
    k = draw(st.sampled_from([1, 2, 2, 3]))
    N, C, H, W = draw(planes(backend, min_hw=k))
    return {
        "shape": (N, C, H, W),
        "k": k,
        "with_bias": draw(st.booleans()),
        "gated": draw(st.booleans()),
        "centered": draw(st.booleans()),
        "eta": draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))),
        "dtype": draw(st.sampled_from(dtypes_for(backend, half=False))),
        "layouts": draw(st.tuples(layouts, layouts, layouts)),
        "seed": draw(seeds),
    }


def pool_flips(positions, u_ref, u64, bound, flipped, k):
    """Windows where the pool positions ``positions`` (pairs of uint8 maps: the kernel's or
    float64's, and the float32 reference's) differ. Each must be a tie within rounding: the
    two positions' values (float64) within the sum of their rounding bounds, and not an exact
    tie of the float32 reference's values with no flipped gate there (the first-index rule
    decides those). Returns the windows (bool, pooled shape)."""
    win = [windows(t, k) for t in (u_ref, u64, bound, flipped)]
    out = torch.zeros(win[0].shape[:4], dtype=torch.bool)
    for got, want in positions:
        diff = got != want
        if not diff.any():
            continue
        p, q = got.long()[..., None], want.long()[..., None]
        ur, u, bd, fl = ((w.gather(-1, p)[..., 0], w.gather(-1, q)[..., 0]) for w in win)
        near = (u[0] - u[1]).abs() <= bd[0] + bd[1]
        exact_tie = (ur[0] == ur[1]) & ~fl[0] & ~fl[1]
        bad = diff & (~near | exact_tie)
        assert not bad.any(), f"{int(bad.sum())} pool positions differ without a rounding tie"
        out |= diff
    return out


def check_stage(backend, shape, k, with_bias, gated, centered, eta, dtype, layouts, seed):
    if centered and shape[2] * shape[3] < 2:
        shape = (*shape[:2], shape[2], 2)
    gen = torch.Generator().manual_seed(seed)
    pooled = (*shape[:2], shape[2] // k, shape[3] // k)
    x = restride(randn(shape, dtype, gen, 3.0), layouts[0])
    b = randn(shape[1], dtype, gen) if with_bias else None
    h = restride(randn(shape, dtype, gen), layouts[1]) if gated else None
    hp = torch.randint(-1, 2, pooled, generator=gen).to(dtype) if gated else None
    ref_in, ker_in, ins64 = leaves(x, b, h), leaves(x, b, h), upcast(x, b, h)
    hp64 = None if hp is None else hp.double()
    y_ref, m_ref, amax_ref, amin_ref = reference.ins_bias_ada_relu_pool2d(
        *ref_in, hp, eta, k, centered=centered
    )
    y, m, amax, amin = functional.ins_bias_ada_relu_pool2d(
        *ker_in, hp, eta, k, centered=centered, backend=backend
    )
    y64, m64, amax64, amin64 = reference.ins_bias_ada_relu_pool2d(
        *ins64, hp64, eta, k, centered=centered
    )
    flipped, bound = gate_flips((m, m_ref, m64), x, b, h, eta, centered, dtype)
    with torch.no_grad():
        u_ref = reference.ins_bias_ada_relu(*ref_in, eta, centered=centered)[0]
        u64 = reference.ins_bias_ada_relu(*ins64, eta, centered=centered)[0]
    pairs = [(amax, amax_ref), (amin, amin_ref), (amax64, amax_ref), (amin64, amin_ref)]
    moved = pool_flips(pairs, u_ref, u64, bound, flipped, k)
    if moved.any():
        assert dtype != F64, "float64 pool positions must match the reference exactly"
        event("pool position differs at a rounding tie")
    # Windows with a flipped gate or a moved position output values within rounding of each
    # other; everything else compares, and with no upstream gradient there every gradient.
    loose = moved | windows(flipped, k).any(-1)
    slack = 2 * windows(bound, k).amax(-1)
    assert ((y - y_ref).abs().double()[loose] <= slack[loose]).all()
    if not moved.any():
        assert torch.equal(amax, amax_ref) and torch.equal(amin, amin_ref)
    g = randn(pooled, dtype, gen).masked_fill(loose, 0)

    def exact():
        return (y64.masked_fill(loose, 0), *grads(y64, ins64, g.double()))

    compare(
        (y.masked_fill(loose, 0), *grads(y, ker_in, g)),
        (y_ref.masked_fill(loose, 0), *grads(y_ref, ref_in, g)),
        exact,
    )
    # feedback: unpool then gate, both outputs used (the gate's hidden and what goes down)
    z = restride(randn(pooled, dtype, gen), layouts[2])
    (zr,), (zk,) = leaves(z), leaves(z)
    size = tuple(shape[2:])
    ur, out_r = reference.ada_unpool_gate(zr, amax, amin, hp, m, k, size)
    u, out = functional.ada_unpool_gate(zk, amax, amin, hp, m, k, size, backend=backend)
    assert torch.equal(u, ur) and torch.equal(out, out_r)
    g1, g2 = randn(shape, dtype, gen), randn(shape, dtype, gen)
    (want,) = torch.autograd.grad((ur * g1).sum() + (out_r * g2).sum(), zr)
    (got,) = torch.autograd.grad((u * g1).sum() + (out * g2).sum(), zk)
    assert_close(got, want)


def _stage_test(backend):
    @fuzz(examples_for(backend))
    @given(stage_cases(backend))
    def test(case):
        check_stage(backend, **case)

    return test


test_stage_fusions_cpu = _stage_test("cpu")
test_stage_fusions_triton = needs_triton(_stage_test("triton"))
