"""Cost model of the screening scan on an H100 (issue #13, item 4): measured pieces, labelled
assumptions, no GPU.

``python -m bench.scan_cost [--sass FILE] [--out P]``

Measured here:

* the per-query loop of the *existing* sequential Triton scan (``screened_attention_scan_kernel``,
  fp16 inputs, D = 64, ν = 128, ρ = 64, compiled for sm_90 with the launchers' own configuration,
  as ``bench/gpu_static.py`` builds it): its SASS from the ``cuobjdump`` of the triton wheel,
  the loop found as the innermost backward branch whose body holds the softmax's ``MUFU``, and
  its instructions counted by class;
* the sequential depth of the chunk-parallel scan from ``bench/results/scan-depth.json``
  (T = 16384) and ``scan-depth-T4096.json`` (T = 4096): verification rounds, exact tie steps and
  one-query steps per (b, h) row.

Assumed (``ASSUMPTIONS``, printed and written with the results): the SM clock, one instruction
per cycle per scheduler, latencies per instruction class, the instructions of a round of the
chunk-parallel scan per element of its work, and the tensor-core throughput of the products
and of FlashAttention's sliding window. Writes ``bench/results/scan-cost.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WINDOW, RELEVANT, D = 128, 64, 64
CHUNK = 32  # bench/scan_depth.py's chunk: the Triton chunked scan's on a GPU
CASES = ({"B": 1, "H": 8, "T": 16384}, {"B": 8, "H": 16, "T": 4096})

ASSUMPTIONS = {
    "clock_ghz": 1.755,  # H100 SXM, sustained SM clock (boost 1.98)
    "sms": 132,
    "schedulers_per_sm": 4,  # each issues <= 1 warp instruction per cycle
    # latency in cycles of an instruction whose result the next one waits for
    "latency": {
        "alu": 4,
        "mufu": 18,
        "shfl": 24,
        "bar": 24,
        "lds": 30,
        "sts": 4,
        "ldg": 250,  # the scan's scratch row, written earlier in the block: an L2 hit
        "stg": 4,
        "branch": 6,
        "other": 6,
    },
    # a round of the chunk-parallel scan (modelled, not read from its kernel): L·BLOCK_L elements of
    # softmax and relevancy work, plus (ρ+L)·L comparisons with prefix counts. Instructions per
    # element: low = a hand count (load, select, max, sub, exp, mul, sum, div, add, store);
    # high = the existing loop's ALU+MUFU instructions per lane (index and slot-rule work too)
    "round_instructions_per_element_low": 10,
    "round_instructions_per_comparison": 4,  # compare, compare, select, add
    "round_phases": 15,  # block-wide dependent phases of a round (docs/kernels/triton.md)
    "tensor_tflops": (150.0, 400.0),  # products of small tiles, ours and FA's sliding window
    "backward_factor": 2.5,  # backward FLOPs / forward FLOPs
}

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_BRANCH = re.compile(r"0x([0-9a-f]+)")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` of every instruction of a ``cuobjdump -sass`` listing."""
    return [(int(m[1], 16), m[3], m[4].strip()) for m in _INSTR.finditer(sass)]


def loops(instrs: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """``(first, last)`` addresses of every loop: a branch back to an earlier address."""
    out = []
    for addr, op, operands in instrs:
        m = _BRANCH.search(operands)
        if op.startswith("BRA") and m and int(m[1], 16) < addr:
            out.append((int(m[1], 16), addr))
    return out


def classify(op: str) -> str:
    base = op.split(".")[0]
    table = {
        "MUFU": "mufu",
        "SHFL": "shfl",
        "BAR": "bar",
        "LDS": "lds",
        "STS": "sts",
        "LDG": "ldg",
        "STG": "stg",
        "BRA": "branch",
    }
    if base in table:
        return table[base]
    if base in ("WARPGROUP", "HGMMA", "MEMBAR", "LDGSTS", "ATOM", "RED", "CALL"):
        return "other"
    return "alu"


def step_loop(instrs: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The per-query loop: the innermost loop holding a ``MUFU`` (the softmax's exponential)
    and no tensor-core instruction (the block products are the other loops)."""
    best = None
    for first, last in loops(instrs):
        body = [i for i in instrs if first <= i[0] <= last]
        ops = {op.split(".")[0] for _, op, _ in body}
        if "MUFU" in ops and not ops & {"HGMMA", "WARPGROUP"}:
            if best is None or len(body) < len(best):
                best = body
    if best is None:
        raise ValueError("no loop with MUFU and without HGMMA in the SASS")
    return best


def compile_scan_sass(arch: int = 90) -> tuple[str, dict]:
    """SASS of the existing scan kernel for fp16, D = 64, ν = 128, ρ = 64 on ``arch``, and its
    launch configuration (kernels/attention.py ``static_builds``)."""
    os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton is imported
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bench.gpu_static import _cuobjdump, _jsonable
    from screening_attn._kernels.attention import static_builds

    (spec,) = [
        b for b in static_builds(torch.float16, D, D, WINDOW, RELEVANT, arch) if b[0] == "scan"
    ]
    _name, fn, sig, consts, options = spec
    k = triton.compile(
        ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32), options=options
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run(
            [_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    return sass, {**_jsonable(consts), **options}


def step_costs(
    body: list[tuple[int, str, str]], config: dict, a: dict = ASSUMPTIONS, chunk: int = CHUNK
) -> dict:
    """Cycles of one step of the sequential scan and of one round of the chunk-parallel one
    over ``chunk`` queries (the Triton kernel's chunk on a GPU, as bench/scan_depth.py)."""
    counts = Counter(classify(op) for _, op, _ in body)
    n = len(body)
    warps = config["num_warps"]
    lanes_per_thread = config["BLOCK_L"] // (32 * warps)
    # one warp per scheduler: each warp issues the whole body, in parallel with the others
    issue = n * math.ceil(warps / a["schedulers_per_sm"])
    latency = sum(a["latency"][c] * k for c, k in counts.items())  # every instruction waits
    reductions = counts["bar"] or 1
    # elementwise instructions per lane and query: the loop's ALU work spread over its lanes
    per_lane = (counts["alu"] + counts["mufu"]) / lanes_per_thread
    L = chunk
    lanes = config["BLOCK_L"]
    compare = (RELEVANT + L) * L * a["round_instructions_per_comparison"]
    issue_lo, issue_hi = (
        (L * lanes * e + compare) / (32 * a["schedulers_per_sm"])
        for e in (a["round_instructions_per_element_low"], per_lane)
    )
    # a round's dependent phases, each about one block reduction of the step
    round_floor = a["round_phases"] * latency / reductions
    return {
        "loop_instructions": n,
        "by_class": dict(sorted(counts.items())),
        "lanes_per_thread": lanes_per_thread,
        "step_cycles": (issue, latency),
        "round_cycles": (max(issue_lo, round_floor), issue_hi + round_floor),
        "round_issue_cycles": (issue_lo, issue_hi),
        "round_floor_cycles": round_floor,
        "elementwise_instructions_per_lane": round(per_lane, 1),
    }


def _depth(T: int) -> dict[str, dict]:
    name = "scan-depth.json" if T == 16384 else f"scan-depth-T{T}.json"
    records = json.loads((RESULTS / name).read_text())
    out = {}
    for r in records:
        worst = max(range(len(r["depth_per_row"])), key=lambda i: r["depth_per_row"][i])
        out[r["inputs"]] = {
            "rounds": r["rounds_per_row"][worst],
            "exact": r["exact_tie_steps_per_row"][worst],
            "steps": r["fallback_steps_per_row"][worst],
            "depth": r["depth"],
            "source": f"bench/results/{name}",
        }
    return out


def predict(costs: dict, a: dict = ASSUMPTIONS) -> list[dict]:
    """Predicted H100 times (µs, low–high) of the cases of the issue."""
    f = a["clock_ghz"] * 1e3  # cycles per µs
    step, rnd = costs["step_cycles"], costs["round_cycles"]
    tf_lo, tf_hi = a["tensor_tflops"]
    bwd = a["backward_factor"]
    out = []
    for case in CASES:
        B, H, T = case["B"], case["H"], case["T"]
        waves = math.ceil(B * H / a["sms"])  # one (b, h) row per SM
        seq = [waves * T * c / f for c in step]
        bm = 64
        # products of the screened kernels: the scan's block logits and the output kernel
        flops = B * H * T * (2 * (WINDOW + RELEVANT + bm) * D + 4 * (WINDOW + RELEVANT + bm) * D)
        fa = 4 * B * H * T * (WINDOW + RELEVANT) * D
        prod = [flops / (tf * 1e6) for tf in (tf_hi, tf_lo)]
        fa_fwd = [fa / (tf * 1e6) for tf in (tf_hi, tf_lo)]
        row = {
            **case,
            "sequential_scan_us": seq,
            "products_fwd_us": prod,
            "fa_window_fwd_us": fa_fwd,
        }
        for inputs, d in _depth(T).items():
            scan = [
                waves * (d["rounds"] * r + d["steps"] * s + d["exact"] * (r + s)) / f
                for s, r in zip(step, rnd)
            ]
            fwd = [scan[i] + prod[i] for i in range(2)]
            fwdbwd = [fwd[i] + bwd * prod[i] for i in range(2)]
            fa_fb = [(1 + bwd) * x for x in fa_fwd]
            row[inputs] = {
                "depth": d,
                "scan_us": scan,
                "fwd_us": fwd,
                "fwd_bwd_us": fwdbwd,
                "fwd_vs_fa": [fwd[0] / fa_fwd[0], fwd[1] / fa_fwd[1]],
                "fwd_bwd_vs_fa": [fwdbwd[0] / fa_fb[0], fwdbwd[1] / fa_fb[1]],
            }
        out.append(row)
    return out


def _rng(x: list[float], fmt: str = "{:.0f}") -> str:
    lo, hi = sorted(x)
    return f"{fmt.format(lo)}–{fmt.format(hi)}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sass", type=Path, help="a cuobjdump -sass listing instead of compiling")
    p.add_argument("--out", type=Path, default=RESULTS / "scan-cost.json")
    args = p.parse_args(argv)
    if args.sass:
        sass, config = args.sass.read_text(), {"num_warps": 4, "BLOCK_L": 256}
    else:
        sass, config = compile_scan_sass()
    body = step_loop(parse_sass(sass))
    costs = step_costs(body, config)
    rows = predict(costs)
    print(f"existing scan kernel, sm_90, per-query loop: {costs['loop_instructions']} instructions")
    print(f"  by class: {costs['by_class']}")
    print(f"  step: {_rng(costs['step_cycles'])} cycles (issue bound – all dependent)")
    print(f"  round of the chunk-parallel scan (model): {_rng(costs['round_cycles'])} cycles")
    for r in rows:
        print(f"B={r['B']} H={r['H']} T={r['T']}:")
        print(f"  sequential scan {_rng(r['sequential_scan_us'])} µs")
        print(
            f"  FA sliding window ({WINDOW + RELEVANT} keys) fwd "
            f"{_rng(r['fa_window_fwd_us'], '{:.1f}')} µs"
        )
        for inputs in ("random", "adversarial"):
            x = r[inputs]
            print(
                f"  {inputs}: scan {_rng(x['scan_us'])} µs, fwd {_rng(x['fwd_us'])} µs "
                f"({_rng(x['fwd_vs_fa'], '{:.1f}')}x FA), fwd+bwd {_rng(x['fwd_bwd_us'])} µs "
                f"({_rng(x['fwd_bwd_vs_fa'], '{:.1f}')}x FA)"
            )
    args.out.write_text(
        json.dumps(
            {"assumptions": ASSUMPTIONS, "config": config, "costs": costs, "cases": rows}, indent=1
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
