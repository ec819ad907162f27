"""The Triton chunked scan (``screened_attention_chunk_scan_kernel`` in kernels/attention.py)
does the work its CPU emulation (screening_attn/attention/scan.py) counts, row by row: the same
verification rounds, exact tie steps, one-query fallback steps and most rounds of a chunk, with
the same slots and spans. So the depths bench/scan_depth.py reports from the emulation are the
kernel's. (The kernel's outputs and gradients are checked by every Triton attention test, as
the launchers' default scan.)"""

from __future__ import annotations

import pytest
import torch

from bench.scan_depth import adversarial_inputs
from screening_attn._kernels.attention import scan_depth, scan_kernel
from screening_attn.attention.scan import chunked_screening_scan
from tests.test_attention_scan import one_hot_ties, randn

CHUNK = 16  # the interpreter's block; the GPU launchers use 32


def check_counts(q, k, window, relevant, scale, chunk=CHUNK):
    """Run both on ``q``, ``k`` `(N, T, D)` (N rows, one head each); assert equal counts and
    sets; return the emulation's stats."""
    stats: dict = {}
    _, index, _, _, span = chunked_screening_scan(
        q, k, window, relevant, scale, chunk=chunk, stats=stats
    )
    counts, k_index, k_span, _ = scan_depth(q[None], k[None], window, relevant, scale, chunk)
    assert counts[:, 0].tolist() == stats["rounds"].sum(1).tolist(), "rounds"
    assert counts[:, 1].tolist() == stats["exact_steps"].tolist(), "exact tie steps"
    assert counts[:, 2].tolist() == stats["fallback_steps"].tolist(), "one-query steps"
    assert counts[:, 3].tolist() == stats["rounds"].max(1).values.tolist(), "most rounds"
    assert torch.equal(k_index[0], index) and torch.equal(k_span[0], span)
    return stats


def test_random_rounds():
    """Sharp logits: chunks that need several rounds."""
    q, k = (
        randn(2, 96, 8, dtype=torch.float64, seed=1),
        randn(2, 96, 8, dtype=torch.float64, seed=2),
    )
    stats = check_counts(q, k, 4, 3, 4.0)
    assert int(stats["rounds"].max()) >= 2


@pytest.mark.parametrize("seed, window, relevant", [(3, 2, 4), (5, 1, 3)])
def test_exact_ties(seed, window, relevant):
    """Exactly tied relevancies (1/m shares) that need the exact one-key rule."""
    q, k = one_hot_ties(2, 64, torch.float32, seed, p=0.3 if seed % 2 else 0.7)
    stats = check_counts(q, k, window, relevant, 1.0)
    assert int(stats["exact_steps"].sum()) > 0


def test_adversarial_fallback():
    """Each decision flips the next: the fallback's one-query steps."""
    q, k, scale = adversarial_inputs(160, 0, window=8, d=4)
    stats = check_counts(q[None], k[None], 8, 4, scale)
    assert int(stats["fallback_steps"].sum()) > 0


def test_scan_choice(monkeypatch):
    assert scan_kernel() == "chunked"
    monkeypatch.setenv("SCREENING_ATTN_TRITON_SCAN", "sequential")
    assert scan_kernel() == "sequential"
    monkeypatch.setenv("SCREENING_ATTN_TRITON_SCAN", "parallel")
    with pytest.raises(ValueError, match="SCREENING_ATTN_TRITON_SCAN"):
        scan_kernel()


@pytest.mark.parametrize("grouped", [False, True])
def test_sequential_scan_kept(monkeypatch, grouped):
    """The sequential kernel stays selectable, and equal to the reference (float64, forward and
    state; grouped heads with padding too)."""
    from screening_attn import screened_attention

    monkeypatch.setenv("SCREENING_ATTN_TRITON_SCAN", "sequential")
    H, Hkv, T = (4, 2, 40) if grouped else (2, 2, 40)
    q = randn(2, H, T, 8, dtype=torch.float64, seed=7)
    k, v = (randn(2, Hkv, T, 8, dtype=torch.float64, seed=s) for s in (8, 9))
    real = torch.rand(2, T, generator=torch.Generator().manual_seed(3)) < 0.8 if grouped else None
    args = dict(key_padding_mask=real, return_state=True)
    out, state = screened_attention(q, k, v, 5, 3, backend="triton", **args)
    expected, ref = screened_attention(q, k, v, 5, 3, backend="reference", **args)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert torch.equal(state.relevant_index, ref.relevant_index)
    torch.testing.assert_close(state.relevancy, ref.relevancy, rtol=0, atol=1e-12)
