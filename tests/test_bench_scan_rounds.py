"""bench/scan_rounds.py: whole-row rounds end at the sequential reference's result (bitwise,
ties included), the verified prefix grows every round, and adversarial chains need many rounds."""

import pytest
import torch
from test_attention_scan import one_hot_ties, randn, saturated

from bench.scan_depth import adversarial_inputs
from bench.scan_rounds import main, whole_row_scan
from screening_attn.attention.reference import _screening_scan


def check(q, k, window, relevant, scale, max_rounds=64):
    out = whole_row_scan(q, k, window, relevant, scale, max_rounds)
    assert all(r is not None for r in out["rounds"]), out["rounds"]
    history, _, _, relevancy, _ = _screening_scan(q, k, window, relevant, scale)
    assert torch.equal(out["sets"], history)
    assert torch.equal(out["relevancy"], relevancy)
    # the prefix of queries with right sets never shrinks, and grows until convergence
    firsts = torch.stack(out["verified"])  # (rounds, N)
    T = q.shape[1]
    assert (firsts[1:] >= firsts[:-1]).all()
    grew = firsts[1:] > firsts[:-1]
    assert (grew | (firsts[:-1] == T)).all()
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    "T, window, relevant, D, scale",
    [(96, 4, 3, 8, 0.5), (96, 4, 3, 8, 4.0), (80, 8, 5, 16, 1.0), (64, 1, 2, 4, 2.0)],
)
def test_random_rows_match_the_reference(dtype, T, window, relevant, D, scale):
    q, k = randn(3, T, D, dtype=dtype, seed=T), randn(3, T, D, dtype=dtype, seed=T + 1)
    out = check(q, k, window, relevant, scale)
    assert min(out["rounds"]) >= 2  # round 1's empty sets are wrong once keys leave the window


@pytest.mark.parametrize("seed", range(3))
def test_exact_ties_match_the_reference(seed):
    q, k = one_hot_ties(2, 60, torch.float64, seed)
    check(q, k, 5, 3, 1.0)
    q, k = saturated(2, 60, 8, torch.float32, seed)
    check(q, k, 4, 4, 3.0)


def test_adversarial_chain_takes_a_round_per_decision():
    # each decision flips the next: the verified prefix grows by about one query per round
    q, k, scale = adversarial_inputs(96, 0, window=8, d=4)
    out = check(q[None], k[None], 8, 4, scale, max_rounds=200)
    assert out["rounds"][0] > 40


def test_main_writes_the_json(tmp_path):
    out = tmp_path / "rounds.json"
    main(["--T", "300", "--rows", "2", "--inputs", "random,ties", "--out", str(out)])
    import json

    rows = json.loads(out.read_text())
    assert [r["inputs"] for r in rows] == ["random", "ties"]
    for r in rows:
        assert r["bitwise_equal"] is True and r["rounds_max"] == max(r["rounds"])
        assert r["verified"][-1] == 300
