"""``ScreenedKVCache`` (docs/streaming.md): any split of a sequence into ``attend`` calls gives
one ``screened_attention`` call's output (float64, 1e-12) and final slots, with at most ν-1+ρ
keys stored; beam-search reordering and row selection; errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from screening_attn import ScreenedKVCache, screened_attention

EXACT = dict(rtol=0, atol=1e-12)
# The backends that stream from an initial state here (the Triton kernels: their own file,
# tests/test_attention_stream_triton.py, as the interpreter is slow).
BACKENDS = ["reference", "cpu"]


def make_qkv(B, H, Hkv, T, D=4, Dv=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, T, Dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def run_split(cache, q, k, v, cuts, real=None):
    """``cache.attend`` on the pieces of the sequence between ``cuts``; the outputs, concatenated,
    and the storage after each call."""
    bounds = [0, *cuts, q.shape[2]]
    outs, stored = [], []
    for a, b in itertools.pairwise(bounds):
        mask = None if real is None else real[:, a:b]
        outs.append(cache.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], mask))
        stored.append(cache.stored)
    return torch.cat(outs, dim=2), stored


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.integers(1, 2),
    T=st.integers(1, 24),
    window=st.integers(1, 6),
    relevant=st.integers(0, 4),
    seed=st.integers(0, 2**16),
    pad=st.sampled_from(["none", "left", "random"]),
    data=st.data(),
)
def test_any_split_equals_one_call(backend, B, Hkv, G, T, window, relevant, seed, pad, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=6)) if T > 1 else [])
    q, k, v = make_qkv(B, G * Hkv, Hkv, T, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    real = {
        "none": None,
        "left": torch.arange(T)[None] >= torch.randint(0, T + 1, (B, 1), generator=gen),
        "random": torch.rand(B, T, generator=gen) < 0.7,
    }[pad]
    cache = ScreenedKVCache(window, relevant, backend=backend)
    out, stored = run_split(cache, q, k, v, cuts, real)
    expected, state = screened_attention(
        q, k, v, window, relevant, key_padding_mask=real, return_state=True, backend="reference"
    )
    torch.testing.assert_close(out, expected, **EXACT)
    torch.testing.assert_close(cache.relevant_index, state.relevant_index, rtol=0, atol=0)
    torch.testing.assert_close(cache.relevant_score, state.relevant_score, **EXACT)
    assert cache.seen == T
    assert max(stored) <= window - 1 + relevant


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_one_token_at_a_time_long_stream(backend):
    """Prefill then 1-token steps over a stream 20x the window: storage never exceeds ν-1+ρ
    keys (and stays constant once full), and the outputs are the one-call outputs."""
    window, relevant, T = 4, 3, 80
    q, k, v = make_qkv(2, 4, 2, T, seed=1)
    cache = ScreenedKVCache(window, relevant, backend=backend)
    out, stored = run_split(cache, q, k, v, [10, *range(11, T)])
    expected = screened_attention(q, k, v, window, relevant, backend="reference")
    torch.testing.assert_close(out, expected, **EXACT)
    assert stored[0] <= window - 1 + relevant
    assert set(stored[5:]) == {window - 1 + relevant}


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_held_is_bounded_after_a_long_prefill(backend):
    """The memory the cache keeps alive (storages, not views of the prefill's buffers) is that
    of ν-1+ρ keys and values with their statistics, whatever the prefill's length."""
    window, relevant, B, Hkv, D, Dv = 4, 3, 2, 2, 4, 3
    sizes = []
    for T in (50, 400):
        q, k, v = make_qkv(B, 4, Hkv, T, D, Dv, seed=6)
        cache = ScreenedKVCache(window, relevant, backend=backend)
        cache.attend(q, k, v)
        sizes.append(cache.nbytes())
    kept = window - 1 + relevant
    # keys, values, scores (float64) and positions (int64) of the kept entries, validity flags
    bound = B * Hkv * kept * (D + Dv + 2) * 8 + B * window
    assert sizes[0] == sizes[1] <= bound


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_and_scale(backend):
    q, k, v = make_qkv(1, 2, 1, 12, dtype=torch.float32, seed=2)
    cache = ScreenedKVCache(3, 2, scale=0.3, backend=backend)
    out, _ = run_split(cache, q, k, v, [5, 6])
    expected = screened_attention(q, k, v, 3, 2, scale=0.3, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_the_new_inputs(backend):
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 1, 6, seed=3))
    cache = ScreenedKVCache(3, 1, backend=backend)
    cache.attend(q[:, :, :4].detach(), k[:, :, :4].detach(), v[:, :, :4].detach())
    out = cache.attend(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:])
    expected = screened_attention(q, k, v, 3, 1)[:, :, 4:]
    g = torch.randn(out.shape, dtype=out.dtype)
    # the cached keys are detached, so compare the gradients of this call's inputs only
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(expected, (q, k, v), g)
    torch.testing.assert_close(got[0], want[0], **EXACT)
    for a, e in zip(got[1:], want[1:]):
        torch.testing.assert_close(a[:, :, 4:], e[:, :, 4:], **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["reorder", "select", "select-bool"])
def test_reorder_and_select_batch_rows(how, backend):
    """Beam search: after reordering (or selecting) rows, continuing the stream equals one call
    over the reordered prefix followed by the new positions."""
    window, relevant = 3, 2
    q, k, v = make_qkv(3, 4, 2, 16, seed=4)
    index = {
        "reorder": torch.tensor([2, 0, 0]),
        "select": torch.tensor([1, 2]),
        "select-bool": torch.tensor([True, False, True]),
    }[how]
    cache = ScreenedKVCache(window, relevant, backend=backend)
    cache.attend(q[:, :, :9], k[:, :, :9], v[:, :, :9])
    getattr(cache, how.split("-")[0])(index)
    rows = index.nonzero().flatten() if index.dtype == torch.bool else index
    q2, k2, v2 = (torch.cat([x[rows, :, :9], x[:, :, 9:][: len(rows)]], dim=2) for x in (q, k, v))
    out = cache.attend(q2[:, :, 9:], k2[:, :, 9:], v2[:, :, 9:])
    expected, state = screened_attention(q2, k2, v2, window, relevant, return_state=True)
    torch.testing.assert_close(out, expected[:, :, 9:], **EXACT)
    torch.testing.assert_close(cache.relevant_index, state.relevant_index, rtol=0, atol=0)


def test_reset_starts_a_new_stream():
    q, k, v = make_qkv(1, 2, 2, 8)
    cache = ScreenedKVCache(3, 2)
    cache.attend(q, k, v)
    cache.reset()
    assert cache.seen == 0 and cache.stored == 0
    q2, k2, v2 = make_qkv(2, 2, 1, 5, seed=9)
    torch.testing.assert_close(cache.attend(q2, k2, v2), screened_attention(q2, k2, v2, 3, 2))


@pytest.mark.parametrize(
    "shape, error, match",
    [
        (dict(B=2), ValueError, r"batch size 1, got 2"),
        (dict(H=4), ValueError, r"number of query heads 2, got 4"),
        (dict(H=2, Hkv=1), ValueError, r"number of KV heads 2, got 1"),
        (dict(D=5), ValueError, r"head dim of q and k 4, got 5"),
        (dict(Dv=5), ValueError, r"head dim of v 3, got 5"),
        (dict(dtype=torch.float32), TypeError, r"holds torch.float64 keys, got torch.float32"),
        (dict(T=0), ValueError, r"n >= 1 new positions"),
        (dict(H=3), ValueError, r"Hkv dividing the H=3 heads"),
    ],
)
def test_mismatched_calls_raise(shape, error, match):
    cache = ScreenedKVCache(3, 2)
    cache.attend(*make_qkv(1, 2, 2, 5))
    kw = dict(B=1, H=2, Hkv=2, T=3, D=4, Dv=3) | shape
    with pytest.raises(error, match=match):
        cache.attend(*make_qkv(**kw))
    assert cache.seen == 5  # nothing changed


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"^window must be an int >= 1, got 0"):
        ScreenedKVCache(0, 2)
    with pytest.raises(ValueError, match=r"^relevant must be an int >= 0, got -1"):
        ScreenedKVCache(2, -1)
    with pytest.raises(ValueError, match=r"^scale must be a finite float"):
        ScreenedKVCache(2, 1, scale=float("nan"))
    with pytest.raises(ValueError, match=r"^backend must be one of"):
        ScreenedKVCache(2, 1, backend="gpu")
    with pytest.raises(ValueError, match=r"ScreenedKVCache has no backend='cuda'"):
        ScreenedKVCache(2, 1, backend="cuda").attend(*make_qkv(1, 2, 2, 5))
    cache = ScreenedKVCache(3, 2)
    with pytest.raises(ValueError, match="the cache is empty"):
        cache.reorder(torch.tensor([0]))
    q, k, v = make_qkv(2, 2, 2, 5)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        cache.attend(q, k, v, torch.ones(2, 5))
    cache.attend(q, k, v)
    with pytest.raises(ValueError, match=r"reorder keeps the batch size: index must have B = 2"):
        cache.reorder(torch.tensor([0]))
    with pytest.raises(ValueError, match=r"rows in \[0, 2\), got \[0, 2\]"):
        cache.select(torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="1-d tensor of batch rows"):
        cache.select([0, 1])
