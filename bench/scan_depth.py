"""Sequential depth of the chunk-parallel screening scan (issue #13, item 2).

``python -m bench.scan_depth [--quick|--T T] [--rows N] [--chunk L] [--inputs F,..]
[--fallback-rounds K] [--check] [--out P]``

Runs ``screening_attn.attention.scan.chunked_screening_scan``, the CPU emulation of the Triton
chunked scan (``screened_attention_chunk_scan_kernel``: tests/test_attention_chunk_scan.py checks
that the kernel counts the same rounds, tie steps and one-query steps), at T = 16384, ν = 128,
ρ = 64, D = 64, chunks of 32 queries (the kernel's on a GPU), on three input families, and
reports per family
the sequential depth per (b, h) row (verification rounds of every chunk summed, plus 2 per exact
tie step, plus 1 per one-query step of the fallback), the rounds per chunk (mean and max), the
tie steps and the fallback's steps. The fallback finishes a chunk sequentially after
``--fallback-rounds`` (default 2; 0: never) rounds that each made fewer than ⌈L/8⌉ decisions
final. Writes
``bench/results/scan-depth.json``: a list of objects with ``inputs``, ``T``, ``window``,
``relevant``, ``depth`` (the largest over the rows), ``rounds_mean``, ``rounds_max`` and more.
``--quick`` runs T = 2048 (``--T``: any length) and writes ``scan-depth-T<T>.json``; ``--check``
also runs the sequential reference and requires bitwise equal outputs. Everything is seeded.

Input families (row n uses seed n):

* ``random``: q, k standard normal, float32, scale 1/sqrt(D).
* ``ties``: tie-heavy, float32. Keys are drawn from 1024 sign vectors; a query is 1000 x the
  key of one "hub" of its window (every h-th key, h growing from 2 to 16 along the sequence),
  or zero (10%). The softmax is saturated (other sign vectors score >= 250 lower: weight exactly
  0), so a query gives weight exactly 1 to its hub (1/m if m candidates share the vector) or
  exactly 1/|C| to every candidate: relevancies are hit counts and small fractions, tied
  everywhere, and growing h makes later hubs beat earlier ones, so evictions go on all along.
* ``adversarial``: built so that each screening decision flips the next one, which makes
  speculation fix one decision per round. float64 (the construction needs precise logits).
  Keys lie on a circle in dims 0-1, ``k_j = (cos jδ, sin jδ)``, δ = 2π/1024 (no two keys that
  can meet in a candidate set alias). Query t points between keys ``t-ν`` (just screened) and
  ``t-ν+1`` (screened after query t), a quarter step from ``t-ν``; with ``|q_t|`` chosen so
  that the logit of key j is ``-G (j - t + ν - 1/4)²`` up to a constant, the candidate
  ``t-ν`` (if the set holds it) out-scores ``t-ν+1`` by ``G/2`` and every other key is at least
  ``G`` below ``t-ν+1``. Key ``t-ν+1`` gets nearly all its relevancy from query t: about
  ``1/(1+e^{G/2})`` if key ``t-ν`` was kept (a "low"), about ``1 - e^{-G}`` if it was dropped
  (a "high"). G grows from 6 to 12 along the sequence, so lows keep falling below every slot
  and highs keep rising above the oldest one: a key enters exactly when its predecessor did
  not, and the decisions alternate. Speculating "nothing enters" makes every key of a chunk
  look high; each round then corrects one more decision of the chain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from screening_attn.attention.reference import _screening_scan
from screening_attn.attention.scan import chunked_screening_scan

ROOT = Path(__file__).resolve().parent.parent
WINDOW, RELEVANT, D = 128, 64, 64
CHUNK = 32  # the Triton kernel's chunk on a GPU (launch_config("chunk_scan", ...).block_m)


def random_inputs(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g), torch.randn(T, D, generator=g), D**-0.5


def tie_inputs(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1024, D, generator=g).sign()
    k = pool[torch.randint(0, 1024, (T,), generator=g)]
    # Hubs: every h-th key, h growing from 2 to 16, so later hubs collect more hits.
    j = torch.arange(T)
    hub = j % (2 + (14 * j) // T) == 0
    hubs = j[hub]
    before = torch.cat([torch.zeros(1, dtype=torch.long), hub.long().cumsum(0)])  # hubs < j
    lo = (j - WINDOW + 1).clamp(min=0)
    count = before[j + 1] - before[lo]
    pick = before[lo] + (torch.rand(T, generator=g) * count).long().clamp(max=count - 1)
    target = torch.where(count > 0, hubs[pick.clamp(max=len(hubs) - 1)], j)
    q = 1000.0 * k[target]
    q[torch.rand(T, generator=g) < 0.1] = 0.0
    return q, k, D**-0.5


def adversarial_inputs(
    T: int, seed: int, window: int = WINDOW, d: int = D
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The alternating chain of the module docstring; ``seed`` only adds a tiny phase jitter
    (``window``, ``d``: other ν and head dims, for tests)."""
    g = torch.Generator().manual_seed(seed)
    delta = 2 * math.pi / 1024
    j = torch.arange(T, dtype=torch.float64)
    k = torch.zeros(T, d, dtype=torch.float64)
    k[:, 0], k[:, 1] = torch.cos(j * delta), torch.sin(j * delta)
    gain = 6.0 + 6.0 * j / T  # G_t
    # logit_tj = |q_t| cos((j - p_t) δ) ≈ |q_t| - |q_t| δ² (j - p_t)² / 2 = const - G_t (j-p_t)²
    radius = 2 * gain / delta**2
    phase = (j - window + 0.25 + 1e-3 * torch.rand(T, generator=g, dtype=torch.float64)) * delta
    q = torch.zeros(T, d, dtype=torch.float64)
    q[:, 0], q[:, 1] = radius * torch.cos(phase), radius * torch.sin(phase)
    return q, k, 1.0


FAMILIES = {"random": random_inputs, "adversarial": adversarial_inputs, "ties": tie_inputs}


def run(family: str, T: int, rows: int, chunk: int, check: bool, fallback_rounds: int) -> dict:
    qs, ks, scale = zip(*(FAMILIES[family](T, seed) for seed in range(rows)))
    q, k = torch.stack(qs), torch.stack(ks)
    stats: dict = {}
    start = time.perf_counter()
    fallback = {"fallback_rounds": fallback_rounds or None}
    _, slot_index, _, _, span = chunked_screening_scan(
        q, k, WINDOW, RELEVANT, scale[0], chunk=chunk, stats=stats, **fallback
    )
    seconds = time.perf_counter() - start
    if check:  # bitwise against the sequential reference (slow and O(T ν D) memory)
        expected = _screening_scan(q, k, WINDOW, RELEVANT, scale[0])
        got = chunked_screening_scan(q, k, WINDOW, RELEVANT, scale[0], chunk=chunk, **fallback)
        for name, e, a in zip(("history", "slots", "scores", "relevancy", "span"), expected, got):
            if not torch.equal(e, a):
                raise SystemExit(f"{family}: {name} differs from the reference")
    rounds = stats["rounds"].double()
    evicted = ((span[..., 1] >= 0) & (span[..., 1] < T)).sum(dim=1)
    return {
        "inputs": family,
        "T": T,
        "window": WINDOW,
        "relevant": RELEVANT,
        "D": D,
        "dtype": str(q.dtype).removeprefix("torch."),
        "chunk": stats["chunk"],
        "fallback_rounds": fallback_rounds,
        "rows": rows,
        "depth": int(stats["depth"].max()),
        "depth_per_row": stats["depth"].tolist(),
        "rounds_mean": round(float(rounds.mean()), 4),
        "rounds_max": int(rounds.max()),
        "rounds_distribution": {str(r): n for r, n in stats["rounds_distribution"].items()},
        "rounds_per_row": stats["rounds"].sum(dim=1).tolist(),
        "exact_tie_steps_per_row": stats["exact_steps"].tolist(),
        "fallback_steps_per_row": stats["fallback_steps"].tolist(),
        "fallback_chunks_per_row": stats["fallback_chunks"].tolist(),
        "evictions_per_row": evicted.tolist(),
        "slots_filled_per_row": (slot_index >= 0).sum(dim=1).tolist(),
        "emulation_seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 2048 instead of 16384")
    parser.add_argument("--T", type=int, default=None, help="sequence length (overrides --quick)")
    parser.add_argument("--rows", type=int, default=4, help="(b, h) rows per family")
    parser.add_argument(
        "--chunk", type=int, default=CHUNK, help="queries per chunk (the GPU kernel's: 32)"
    )
    parser.add_argument(
        "--inputs", default=",".join(FAMILIES), help="comma-separated families to run"
    )
    parser.add_argument(
        "--fallback-rounds",
        type=int,
        default=2,
        help="slow rounds before a chunk finishes sequentially (0: never)",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--check", action="store_true", help="also compare with the reference, bitwise (slow)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    T = args.T or (2048 if args.quick else 16384)
    name = "scan-depth.json" if T == 16384 else f"scan-depth-T{T}.json"
    out = args.out or ROOT / "bench" / "results" / name

    families = args.inputs.split(",")
    results = [
        run(family, T, args.rows, args.chunk, args.check, args.fallback_rounds)
        for family in families
    ]
    for r in results:
        r["threads"] = torch.get_num_threads()
        r["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
        r["machine"] = platform.machine()
        r["torch"] = torch.__version__
        r["checked_against_reference"] = args.check
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")

    print(
        f"T={T} window={WINDOW} relevant={RELEVANT} D={D} chunk={args.chunk} "
        f"fallback_rounds={args.fallback_rounds}, {args.rows} rows each"
    )
    header = f"{'inputs':<12} {'depth':>6} {'T/depth':>8} {'rounds mean':>11} {'max':>4} "
    print(header + f"{'tie steps':>9} {'seq steps':>9} {'evictions':>10} {'seconds':>8}")
    for r in results:
        print(
            f"{r['inputs']:<12} {r['depth']:>6} {T / r['depth']:>8.1f} {r['rounds_mean']:>11.3f} "
            f"{r['rounds_max']:>4} {max(r['exact_tie_steps_per_row']):>9} "
            f"{max(r['fallback_steps_per_row']):>9} "
            f"{min(r['evictions_per_row']):>10} {r['emulation_seconds']:>8.1f}"
        )
    for r in results:
        if r["inputs"] == "random":
            verdict = "yes" if r["depth"] <= T / 16 else "NO"
            print(f"depth <= T/16 = {T // 16} on random inputs: {verdict} (max {r['depth']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
