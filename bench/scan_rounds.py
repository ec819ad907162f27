"""Whole-row verification rounds of the screening scan (issue #13): an exact scan that
speculates every query of a row at once, measured in a CPU emulation.

``python -m bench.scan_rounds [--T T] [--rows N] [--inputs F,..] [--max-rounds K] [--out P]``

The chunked scan (``screening_attn.attention.scan``) speculates one chunk of L queries at a
time from the exact set at the chunk's start, so its depth is at least T / L rounds. Here every
query of the row is speculated at once, Jacobi-style:

* round 1: every query sees an empty set; round i > 1: every query sees the set that the
  previous round's relevancies imply;
* in a round, each query's softmax over its window and that set, each key's relevancy summed in
  query order (the reference's order, so equal sets give bitwise equal relevancies), then the
  slot rule over the whole row given those relevancies;
* stop when a round reproduces the sets it was given.

Why it is exact: the set query t sees depends only on the relevancies of keys screened before
t, and the relevancy of key e only on the sets of the queries in its window, which depend on
keys screened before e. So if round i's sets are right for queries ``< p``, round i+1's
relevancies are right for the keys screened before p + 1 and its sets for queries ``< p + 1``
at least (the verified prefix grows every round); a round that reproduces its input is the
unique fixed point, the sequential result. At most T rounds; the question is how many it
takes, which this measures. On inputs where each decision flips the next (``adversarial``, see
bench.scan_depth) the prefix grows by about one decision per round, so a kernel would hand such
a row to the chunked scan once a round verifies little (not emulated here: the JSON reports the
verified prefix after each round).

The emulation applies the slot rule key after key (``scan._exact_step``); on a GPU it would be
the chunked scan's parallel pass (prefix counts) per chunk, from chunk-start sets that a prefix
merge of per-chunk top-ρ lists provides. Writes ``bench/results/scan-rounds.json``: a list of
objects with ``inputs``, ``T``, ``window``, ``relevant``, ``rows``, ``rounds`` (per row, None if
not converged within ``max_rounds``), ``rounds_mean``, ``rounds_max``, ``verified`` (per round,
the smallest verified prefix over the rows, in queries), ``passes`` (per row: query softmaxes
computed over T, when a round recomputes only the queries whose sets changed) and
``bitwise_equal`` (against the sequential reference, for the converged rows). Families: those
of bench.scan_depth and ``sharp`` (random, logits 4x sharper).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.scan_depth import RELEVANT, WINDOW, adversarial_inputs, random_inputs, tie_inputs
from screening_attn.attention.reference import _screening_scan
from screening_attn.attention.scan import _exact_step, _gather_rows, _window_positions

ROOT = Path(__file__).resolve().parent.parent


def sharp_inputs(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``random`` with logits 4x sharper (the issue's second family)."""
    q, k, scale = random_inputs(T, seed)
    return q, k, 4 * scale


FAMILIES = {
    "random": random_inputs,
    "sharp": sharp_inputs,
    "ties": tie_inputs,
    "adversarial": adversarial_inputs,
}


def _sets_from_relevancy(r: torch.Tensor, window: int, relevant: int) -> torch.Tensor:
    """``(N, T, ρ)``: the set each query sees, the slot rule applied to relevancies ``r (N, T)``."""
    N, T = r.shape
    index = torch.full((N, relevant), -1, dtype=torch.long)
    score = torch.full((N, relevant), float("-inf"), dtype=r.dtype)
    sets = torch.empty((N, T, relevant), dtype=torch.long)
    slots = torch.arange(relevant)
    for t in range(T):
        sets[:, t] = index
        e = t - window + 1  # screened after query t
        if e < 0 or relevant == 0:
            continue
        write = _exact_step(index, score, r[:, e])[:, None] == slots
        index = torch.where(write, e, index)
        score = torch.where(write, r[:, e, None], score)
    return sets


def _relevancy(
    q: torch.Tensor, k: torch.Tensor, win_logits: torch.Tensor, sets: torch.Tensor, scale: float
) -> torch.Tensor:
    """``(N, T)``: every key's relevancy when query t sees ``sets[:, t]``, summed in query order."""
    N, T, D = q.shape
    nu, rho = win_logits.shape[-1], sets.shape[-1]
    alpha = torch.empty((N, T, nu + rho), dtype=q.dtype)
    for t0 in range(0, T, 2048):  # blocks of queries bound the gathered keys' memory
        t1 = min(T, t0 + 2048)
        n, s = t1 - t0, sets[:, t0:t1]
        k_set = _gather_rows(k, s.clamp(min=0).reshape(N, n * rho)).view(N * n, rho, D)
        logits = scale * torch.einsum("nd,nsd->ns", q[:, t0:t1].reshape(N * n, D), k_set)
        logits = logits.view(N, n, rho).masked_fill(s < 0, float("-inf"))
        alpha[:, t0:t1] = torch.softmax(torch.cat([win_logits[:, t0:t1], logits], -1), -1)
    rel = torch.zeros((N, nu - 1 + T), dtype=q.dtype)  # key j at j + ν - 1
    for i in range(nu):  # window offset i adds query j+i's weight: query order per key
        col = nu - 1 - i
        rel[:, col : col + T] += alpha[:, :, col]
    return rel[:, nu - 1 :]


@torch.no_grad()
def whole_row_scan(
    q: torch.Tensor, k: torch.Tensor, window: int, relevant: int, scale: float, max_rounds: int
) -> dict:
    """Whole-row rounds on ``q, k (N, T, D)``: ``sets (N, T, ρ)`` and ``relevancy (N, T)`` of
    the last round, ``rounds`` (per row: the round that reproduced its input, None if none did
    within ``max_rounds``), ``verified`` (per round, ``(N,)`` queries whose sets were already
    right in that round's input: the prefix before the first query whose set changed) and
    ``changed`` (per round, ``(N,)`` queries whose set changed: the softmaxes the next round
    has to recompute; the others' weights are the same)."""
    N, T, _ = q.shape
    win_pos = _window_positions(T, window, q.device)
    k_win = _gather_rows(k, win_pos.clamp(min=0).expand(N, T, window))
    win_logits = scale * torch.einsum("ntd,ntid->nti", q, k_win)
    win_logits = win_logits.masked_fill(win_pos < 0, float("-inf"))
    sets = torch.full((N, T, relevant), -1, dtype=torch.long)
    rounds: list[int | None] = [None] * N
    verified, changed_counts = [], []
    for i in range(1, max_rounds + 1):
        rel = _relevancy(q, k, win_logits, sets, scale)
        new = _sets_from_relevancy(rel, window, relevant)
        changed = (new != sets).any(-1)
        first = torch.where(changed.any(1), changed.to(torch.uint8).argmax(1), T)
        verified.append(first)
        changed_counts.append(changed.sum(1))
        for n in range(N):
            if rounds[n] is None and int(first[n]) == T:
                rounds[n] = i
        sets = new
        if all(r is not None for r in rounds):
            break
    return {
        "sets": sets,
        "relevancy": rel,
        "rounds": rounds,
        "verified": verified,
        "changed": changed_counts,
    }


def run(family: str, T: int, rows: int, max_rounds: int) -> dict:
    qs, ks, scales = zip(*(FAMILIES[family](T, seed) for seed in range(rows)))
    q, k, scale = torch.stack(qs), torch.stack(ks), scales[0]
    t0 = time.perf_counter()
    out = whole_row_scan(q, k, WINDOW, RELEVANT, scale, max_rounds)
    seconds = time.perf_counter() - t0
    done = [n for n, r in enumerate(out["rounds"]) if r is not None]
    equal = None
    if done:  # the reference for the converged rows only
        ref = _screening_scan(q[done], k[done], WINDOW, RELEVANT, scale)
        equal = torch.equal(out["sets"][done], ref[0]) and torch.equal(
            out["relevancy"][done], ref[3]
        )
    conv = [r for r in out["rounds"] if r is not None]
    return {
        "inputs": family,
        "T": T,
        "window": WINDOW,
        "relevant": RELEVANT,
        "rows": rows,
        "rounds": out["rounds"],
        "rounds_mean": sum(conv) / len(conv) if conv else None,
        "rounds_max": max(conv) if len(conv) == rows else None,
        "verified": [int(v.min()) for v in out["verified"]],
        # query softmaxes computed, in passes over the row, if a round recomputes only the
        # queries whose set changed in the round before (round 1: all of them)
        "passes": [
            round((T + sum(int(c[n]) for c in out["changed"][: r - 1])) / T, 2) if r else None
            for n, r in enumerate(out["rounds"])
        ],
        "bitwise_equal": equal,
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--inputs", default="random,sharp,ties,adversarial")
    ap.add_argument("--max-rounds", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/scan-rounds.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for family in args.inputs.split(","):
        r = run(family, args.T, args.rows, args.max_rounds)
        results.append(r)
        print(
            f"{family:12s} T={r['T']} rounds per row {r['rounds']} (mean {r['rounds_mean']}, "
            f"max {r['rounds_max']}); passes {r['passes']}; "
            f"verified prefix after each round {r['verified']}; "
            f"bitwise equal to the reference: {r['bitwise_equal']} ({r['seconds']} s)",
            flush=True,
        )
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
