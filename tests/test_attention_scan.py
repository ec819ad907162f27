"""The chunk-parallel scan (screening_attn/attention/scan.py) equals the reference's sequential
``_screening_scan`` bitwise: every output, float64 and float32, ties and NaN included."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from bench import scan_depth
from screening_attn.attention.reference import _screening_scan
from screening_attn.attention.scan import chunked_screening_scan

NAMES = ("history", "slot_index", "slot_score", "relevancy", "span")
DTYPES = [torch.float64, torch.float32]


def compare(q, k, window, relevant, scale, chunk=None, **fallback):
    """Assert bitwise equality of all five outputs; return the emulation's stats and the
    reference's outputs."""
    expected = _screening_scan(q, k, window, relevant, scale)
    stats = {}
    got = chunked_screening_scan(
        q, k, window, relevant, scale, chunk=chunk, stats=stats, **fallback
    )
    for name, e, g in zip(NAMES, expected, got):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        if e.is_floating_point():  # torch.equal says NaN != NaN: compare where, then values
            assert torch.equal(e.isnan(), g.isnan()), name
            e, g = e.masked_fill(e.isnan(), 0), g.masked_fill(g.isnan(), 0)
        assert torch.equal(e, g), name
    chunks = math.ceil(q.shape[1] / stats["chunk"])
    assert stats["rounds"].shape == (q.shape[0], chunks)
    assert bool((stats["rounds"] >= 1).all()) and bool((stats["rounds"] <= stats["chunk"]).all())
    depth = stats["rounds"].sum(1) + 2 * stats["exact_steps"] + stats["fallback_steps"]
    assert torch.equal(stats["depth"], depth)
    assert bool((stats["fallback_steps"] <= stats["chunk"] * stats["fallback_chunks"]).all())
    return stats, expected


def randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def one_hot_ties(N, T, dtype, seed, p=0.4):
    """Exactly tied relevancies: keys are unit vectors and each query gives logit 0 to a random
    subset of keys and -1e4 (weight exactly 0) to the rest, so weights are exact 1/m shares."""
    g = torch.Generator().manual_seed(seed)
    k = torch.eye(T, dtype=dtype).expand(N, T, T).contiguous()
    q = torch.where(torch.rand(N, T, T, generator=g) < p, 0.0, -1e4).to(dtype)
    return q, k


def saturated(N, T, D, dtype, seed):
    """Zero query rows (uniform weights), keys repeated from a few sign vectors, large scale."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, T, D, generator=g, dtype=dtype).sign()
    q[:, torch.rand(T, generator=g) < 0.4] = 0
    k = torch.randn(N, 3, D, generator=g, dtype=dtype).sign()[:, torch.randint(0, 3, (T,))]
    return q, k


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize(
    "T, window, relevant, D, scale, chunk",
    [
        (48, 4, 3, 8, 0.5, None),
        (48, 4, 3, 8, 4.0, None),  # sharp logits: speculation fails more often
        (40, 8, 5, 16, 1.0, 3),
        (40, 3, 6, 4, 2.0, 7),
    ],
)
def test_random_inputs(dtype, T, window, relevant, D, scale, chunk):
    q, k = randn(3, T, D, dtype=dtype, seed=1), randn(3, T, D, dtype=dtype, seed=2)
    compare(q, k, window, relevant, scale, chunk)


def test_verification_rounds_are_exercised():
    """Sharp logits make the speculation wrong in some chunks: the loop really iterates."""
    q, k = (
        randn(4, 64, 8, dtype=torch.float64, seed=3),
        randn(4, 64, 8, dtype=torch.float64, seed=4),
    )
    stats = compare(q, k, 8, 4, 4.0)[0]
    assert int(stats["rounds"].max()) >= 2


def test_worked_example():
    """docs/attention.md's worked example: the final state is given there, independently."""
    T = 8
    active = {0: [0], 1: [0, 1], 2: [1], 3: [2, 3], 4: [3], 5: [5], 6: [5], 7: [6, 7, 5, 1]}
    q = torch.full((1, T, T), -1e4, dtype=torch.float64)
    for t, js in active.items():
        q[0, t, js] = 0.0
    k = torch.eye(T, dtype=torch.float64)[None]
    compare(q, k, 2, 2, 1.0)
    _, slot_index, slot_score, relevancy, span = chunked_screening_scan(q, k, 2, 2, 1.0)
    assert slot_index.tolist() == [[5, 1]] and slot_score.tolist() == [[2.0, 1.5]]
    assert relevancy.tolist() == [[1.5, 1.5, 0.5, 1.5, 0.0, 2.0, 0.25, 0.25]]
    expected_span = [[-1, -1]] * T
    expected_span[0], expected_span[1], expected_span[5] = [2, 7], [3, 8], [7, 8]
    assert span[0].tolist() == expected_span


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_exact_ties_take_the_exact_path(dtype):
    """Only a tie involving a key that entered during the same chunk needs the exact path, so
    the chunks here are long next to ν."""
    exact = 0
    for seed in range(8):
        window, relevant, chunk = 1 + seed % 3, 3 + seed % 2, 8 + seed % 5
        q, k = one_hot_ties(3, 40, dtype, seed, p=0.3 if seed % 2 else 0.7)
        exact += int(compare(q, k, window, relevant, 1.0, chunk)[0]["exact_steps"].sum())
    assert exact > 0  # the tie fallback ran, and agreed


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_saturated_softmax(dtype, scale):
    q, k = saturated(3, 48, 6, dtype, seed=5)
    compare(q, k, 4, 3, scale)
    compare(q, k, 3, 5, scale, chunk=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_nan_inputs(dtype):
    """A NaN key makes NaN relevancies; one takes an empty slot and then blocks the full set."""
    T, D = 40, 4
    q, k = randn(3, T, D, dtype=dtype, seed=6), randn(3, T, D, dtype=dtype, seed=7)
    k[0, 2, 1] = float("nan")  # early: NaN reaches a slot while the set fills
    k[1, 25, 0] = float("nan")  # late: NaN relevancies meet a full set
    q[2, 10] = float("nan")  # a NaN query row
    stats = compare(q, k, 3, 3, 1.0)[0]
    _, _, slot_score, _, _ = chunked_screening_scan(q, k, 3, 3, 1.0)
    assert bool(slot_score[0].isnan().any())  # the frozen-set case was reached
    assert stats["rounds"].shape[0] == 3


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize(
    "T, window, relevant, chunk",
    [
        (1, 1, 1, None),
        (1, 3, 2, None),
        (5, 8, 2, None),  # T < ν: nothing is screened
        (20, 1, 3, None),  # ν = 1
        (20, 4, 0, None),  # ρ = 0
        (20, 4, 25, None),  # ρ ≥ T: slots never fill
        (20, 4, 17, None),  # ρ = T - ν + 1: the last key takes the last slot
        (30, 4, 3, 1),
        (30, 4, 3, 4),
        (30, 4, 3, 31),  # one chunk longer than T
    ],
)
def test_edge_cases(dtype, T, window, relevant, chunk):
    q, k = randn(2, T, 3, dtype=dtype, seed=8), randn(2, T, 3, dtype=dtype, seed=9)
    stats = compare(q, k, window, relevant, 1.0, chunk)[0]
    if relevant == 0:
        assert bool((stats["rounds"] == 1).all())


@pytest.mark.parametrize("family", ["random", "adversarial", "ties"])
def test_benchmark_inputs(family):
    """bench/scan_depth.py's inputs at its ν = 128, ρ = 64 and a short T: exact, and the
    adversarial chain really forces one round per decision unless the fallback cuts it."""
    T = 2 * 128 + 64 + 40
    q, k, scale = zip(*(scan_depth.FAMILIES[family](T, seed) for seed in range(2)))
    q, k = torch.stack(q), torch.stack(k)
    stats, _ = compare(q, k, 128, 64, scale[0])
    if family == "adversarial":
        # Through the fallback: two rounds that fix one decision each (after, in the chunk
        # that fills the slots, one that fixes the fill), one-query steps to the chunk's end,
        # and one round that confirms them.
        assert int(stats["fallback_chunks"].min()) >= 1
        assert int(stats["rounds"].max()) <= 4
        chunks = stats["rounds"].shape[1]
        assert bool((stats["depth"] <= T + 3 * chunks + 2 * stats["exact_steps"]).all())
        # Without it, speculation really fixes one decision per round.
        stats, _ = compare(q, k, 128, 64, scale[0], fallback_rounds=None)
        assert int(stats["rounds"].max()) >= 64
        assert int(stats["fallback_steps"].sum()) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("fallback_rounds", [1, 2])
def test_fallback_random_and_ties(dtype, fallback_rounds):
    """Every round counts as slow (``fallback_progress`` = L + 1), so each chunk that needs more
    than ``fallback_rounds`` rounds takes one-query steps from wherever its last round left it:
    to the chunk's end (then one round confirms them), or for a short stretch and then
    speculates again."""
    q, k = randn(3, 64, 8, dtype=dtype, seed=3), randn(3, 64, 8, dtype=dtype, seed=4)
    fb = dict(fallback_rounds=fallback_rounds, fallback_progress=17)
    stats = compare(q, k, 4, 4, 8.0, 16, fallback_stretch=16, **fb)[0]
    assert int(stats["fallback_chunks"].sum()) > 0
    assert int(stats["rounds"].max()) <= fallback_rounds + 1
    # Stretches of 2 steps: speculation resumes inside the chunk after each one.
    stats = compare(q, k, 4, 4, 8.0, 16, fallback_stretch=2, **fb)[0]
    assert int(stats["fallback_chunks"].sum()) > 0
    assert int(stats["rounds"].max()) > fallback_rounds + 1
    q, k = one_hot_ties(3, 40, dtype, seed=1, p=0.3)
    fb = dict(fallback_rounds=fallback_rounds, fallback_progress=13)
    stats = compare(q, k, 2, 4, 1.0, 12, fallback_stretch=12, **fb)[0]
    assert int(stats["fallback_chunks"].sum()) > 0


def test_bad_chunk():
    q = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="chunk"):
        chunked_screening_scan(q, q, 2, 1, 1.0, chunk=0)
    with pytest.raises(ValueError, match="fallback_rounds"):
        chunked_screening_scan(q, q, 2, 1, 1.0, fallback_rounds=0)
    with pytest.raises(ValueError, match="fallback_stretch"):
        chunked_screening_scan(q, q, 2, 1, 1.0, fallback_stretch=0)


@st.composite
def problems(draw):
    N = draw(st.integers(1, 3))
    T = draw(st.integers(1, 40))
    window = draw(st.integers(1, 5))
    relevant = draw(st.integers(0, 5))
    chunk = draw(st.one_of(st.none(), st.integers(1, 14)))
    dtype = draw(st.sampled_from(DTYPES))
    mode = draw(st.sampled_from(["randn", "one_hot", "saturated"]))
    seed = draw(st.integers(0, 2**16))
    if mode == "one_hot":
        q, k = one_hot_ties(N, T, dtype, seed, p=draw(st.sampled_from([0.3, 0.7])))
        scale = 1.0
    elif mode == "saturated":
        q, k = saturated(N, T, 4, dtype, seed)
        scale = draw(st.sampled_from([1.0, 20.0]))
    else:
        q, k = randn(N, T, 4, dtype=dtype, seed=seed), randn(N, T, 4, dtype=dtype, seed=seed + 1)
        scale = draw(st.floats(0.1, 5.0))
    fallback = {
        "fallback_rounds": draw(st.sampled_from([None, 1, 2, 3])),
        "fallback_progress": draw(st.one_of(st.none(), st.integers(1, 15))),
        "fallback_stretch": draw(st.one_of(st.none(), st.integers(1, 6))),
    }
    return q, k, window, relevant, scale, chunk, mode, fallback


@settings(max_examples=250, deadline=None)
@given(problems())
def test_hypothesis(problem):
    q, k, window, relevant, scale, chunk, mode, fallback = problem
    stats, (*_, span) = compare(q, k, window, relevant, scale, chunk, **fallback)
    T = q.shape[1]
    event(f"mode={mode}")
    event("evicts" if bool(((span[..., 1] >= 0) & (span[..., 1] < T)).any()) else "no eviction")
    event("exact tie step" if int(stats["exact_steps"].sum()) else "no exact tie step")
    event("rounds > 1" if int(stats["rounds"].max()) > 1 else "rounds = 1")
    event("fallback" if int(stats["fallback_chunks"].sum()) else "no fallback")
    if int(stats["fallback_chunks"].sum()):
        resumed = bool((stats["fallback_steps"] < stats["chunk"] * stats["fallback_chunks"]).any())
        event("speculation resumed after a stretch" if resumed else "stretches to chunk ends")
