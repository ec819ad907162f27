"""Long sequences on the C++ CPU kernels: memory stays O(T) with small constants
(docs/attention.md, docs/rnn.md).

Each case runs in a fresh process (bench/long_sequences.py, which also prints the figures: `python
-m bench.long_sequences`); peak memory is the rise of VmHWM over the resident size after a
warm-up, so it counts the inputs, outputs, saved activations and every temporary (the method is
described there).
"""

import pytest

from bench.long_sequences import ATTENTION, RNN, measure, rnn_step_bytes
from screening_attn import _backend

pytestmark = pytest.mark.skipif(_backend.C_ERROR is not None, reason=str(_backend.C_ERROR))


def test_attention_over_a_million_keys_stays_within_3x_its_tensors():
    # T = 1,000,000, D = 64, float32: q, k, v and out are 256 MB each. With the state: lse,
    # relevancy and span add 16 bytes per key (1.6% of q+k+v+out); nothing of size T x T.
    r = measure("attention", return_state=True, **ATTENTION)
    assert r["qkvo_bytes"] == 4 * ATTENTION["T"] * ATTENTION["D"] * 4
    # the measure sees the tensors themselves (else it would be measuring nothing)
    assert r["peak_increase"] >= r["qkvo_bytes"] + r["state_bytes"]
    assert r["peak_increase"] <= 3 * r["qkvo_bytes"], r


def test_rel_rnn_memory_is_linear_in_T_and_matches_the_saved_activations():
    # forward + backward; B = 2, Hd = 16, float32 (the figures at 12.5k and 25k steps too:
    # python -m bench.long_sequences)
    steps = (50_000, 100_000)
    peaks = [measure("rnn", T=T, backend="cpu", **RNN)["peak_increase"] for T in steps]
    assert peaks[1] <= 2.2 * peaks[0], peaks
    # bytes per step over the doubling (constant costs cancel) against what the forward must
    # save for the backward plus the backward's own per-step buffers
    per_step = (peaks[1] - peaks[0]) / (steps[1] - steps[0])
    need = rnn_step_bytes(T=steps[1], **RNN)
    assert need["saved"] < per_step <= 1.15 * need["total"], (per_step, need)


def test_reference_rel_rnn_memory_is_linear_in_T():
    # The reference's autograd graph costs ~40 kB a step; its peak rise has a negative offset
    # (the warm-up's freed memory is reused), so compare increments: linear growth doubles
    # them, quadratic growth would triple them.
    steps = (250, 500, 1_000)
    peaks = [measure("rnn", T=T, backend="reference", **RNN)["peak_increase"] for T in steps]
    assert peaks[2] - peaks[1] <= 2.2 * (peaks[1] - peaks[0]), peaks
