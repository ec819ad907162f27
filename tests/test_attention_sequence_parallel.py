"""The C++ CPU kernel of screened attention with fewer (b, KV head) rows than threads: with one
row and 2 threads the forward runs as a pipeline of 64-query blocks (range logits, scan, outputs
on either thread) and the backward in 512-query segments (csrc/cpu/attention.cpp). Against the
reference in float64 (to 1e-12) and bitwise against the same call on one thread: outputs, state
and every gradient. T spans several segments, and the window (70) is wider than a block, so
keys enter the set inside blocks and sets cross block and segment boundaries.

(2 threads exist on every machine torch runs on: ``torch.set_num_threads(2)`` starts a second
OpenMP thread even on one core, where the tasks still split between the two.)"""

from __future__ import annotations

import math

import pytest
import torch

from screening_attn import _backend, screened_attention
from screening_attn.attention import _ops
from screening_attn.attention.reference import screened_attention_stream

pytestmark = pytest.mark.skipif(_backend.C_ERROR is not None, reason=str(_backend.C_ERROR))

T, WINDOW, RELEVANT = 1300, 70, 9  # 21 query blocks, 3 backward segments
SEGMENT = 512  # kSegmentQ in csrc/cpu/attention.cpp
EXACT = dict(rtol=0, atol=1e-12)
_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32}


def _bits(t):
    """The raw bits of a float tensor (so -0.0 and 0.0 differ), others as they are."""
    return t.contiguous().view(_INT_OF[t.dtype]) if t.dtype in _INT_OF else t


def _inputs(H, Hkv, n, D=4, Dv=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, n, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, Hkv, n, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, Hkv, n, Dv, generator=g, dtype=torch.float64)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def _with_grads(fn, inputs, seed=1):
    """``fn()``'s tensors (output first), then the gradients of ``inputs`` for a fixed random
    output gradient."""
    out, *rest = fn()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return [out.detach(), *(x.detach() for x in rest), *torch.autograd.grad(out, inputs, g)]


def _on_threads(n, fn):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        assert torch.get_num_threads() == n
        return fn()
    finally:
        torch.set_num_threads(saved)


def _check(fn, inputs, reference):
    """``fn`` on 2 threads: bitwise the 1-thread result, and the reference's to 1e-12."""
    one = _on_threads(1, lambda: _with_grads(fn, inputs))
    two = _on_threads(2, lambda: _with_grads(fn, inputs))
    ref = _with_grads(reference, inputs)
    assert len(one) == len(two) == len(ref)
    for i, (a, b, r) in enumerate(zip(one, two, ref)):
        assert torch.equal(_bits(a), _bits(b)), f"result {i}: 2 threads differ from 1"
        if r.is_floating_point():
            torch.testing.assert_close(b, r, **EXACT, msg=lambda m, i=i: f"result {i}: {m}")
        else:
            assert torch.equal(b, r), f"result {i} differs from the reference"


def test_shapes_split():
    """The cases below really give several blocks and segments to the one row."""
    assert T > 2 * SEGMENT and WINDOW > 64 and math.ceil(T / 64) > 16  # 16: the forward's ring


def test_one_row():
    q, k, v = _inputs(1, 1, T)

    def run(backend):
        return lambda: _state_tuple(
            *screened_attention(q, k, v, WINDOW, RELEVANT, return_state=True, backend=backend)
        )

    _check(run("cpu"), (q, k, v), run("reference"))


def test_one_row_grouped_heads_and_padding():
    """One (b, KV head) row with 3 query heads, a key padding mask with gaps."""
    q, k, v = _inputs(3, 1, T, seed=2)
    real = torch.rand(1, T, generator=torch.Generator().manual_seed(3)) < 0.8

    def run(backend):
        return lambda: _state_tuple(
            *screened_attention(
                q, k, v, WINDOW, RELEVANT, key_padding_mask=real, return_state=True, backend=backend
            )
        )

    _check(run("cpu"), (q, k, v), run("reference"))


def test_one_row_stream_with_state():
    """The stream op's second call: R0 slot keys and P earlier positions before its n queries
    (the backward's segments start after them)."""
    q1, k1, v1 = _inputs(2, 1, 600, seed=4)
    q, k, v = _inputs(2, 1, T, seed=5)
    scale = 0.5
    _, *_, state = screened_attention_stream(
        q1.detach(), k1.detach(), v1.detach(), WINDOW, RELEVANT, scale
    )
    assert state.slot_keys.shape[2] > 0 and state.keys.shape[2] == WINDOW - 1

    def run(stream):
        def fn():
            out, index, score, rel, span, _ = stream(q, k, v, WINDOW, RELEVANT, scale, state=state)
            return out, index, score, rel, span

        return fn

    _check(run(_ops.screened_attention_stream_cpu), (q, k, v), run(screened_attention_stream))


def _state_tuple(out, state):
    return out, state.relevant_index, state.relevant_score, state.relevancy, state.span
