"""Cost model of the screening scan on an H100 (issue #13, item 4): measured pieces, labelled
assumptions, no GPU.

``python -m bench.scan_cost [--out P]``

Measured here, from the kernels compiled for sm_90 (fp16, D = 64, ν = 128, ρ = 64, the
launchers' own configuration, as ``bench/gpu_static.py`` builds them):

* the per-query loop of the sequential Triton scan (``screened_attention_scan_kernel``): its SASS
  from the triton wheel's ``cuobjdump``, the loop found as the innermost backward branch whose
  body holds the softmax's ``MUFU``, and its instructions counted by class;
* the chunked scan (``screened_attention_chunk_scan_kernel``): its SASS from the wheel's
  ``nvdisasm -gi``, which names the source line (and the calls inlined through) of every
  instruction. Loops are backward branches; each loop's trip count per chunk follows from the
  source statement of its branch and the launch configuration (``_trips``; a loop it does not
  know is an error). So a verification round, a one-query fallback step, an exact tie's extra
  slot-rule pass and a chunk's fixed work are counted as executed instructions per warp;
* the sequential depth of the chunked scan from ``bench/results/scan-depth.json``
  (T = 16384) and ``scan-depth-T4096.json`` (T = 4096): verification rounds, exact tie steps and
  one-query steps per (b, h) row.

Assumed (``ASSUMPTIONS``, printed and written with the results): the SM clock, one instruction
per cycle per scheduler, latencies per instruction class (a piece costs between its issue count
and the sum of its latencies), and the tensor-core throughput of the products and of
FlashAttention's sliding window. Writes ``bench/results/scan-cost.json``.
"""

from __future__ import annotations

import argparse
import json
import linecache
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


def compile_sass(kernel: str = "scan", arch: int = 90) -> tuple[str, dict]:
    """SASS of a scan kernel (``"scan"``: the sequential one, ``"chunk_scan"``) for fp16,
    D = 64, ν = 128, ρ = 64 on ``arch``, and its launch configuration (kernels/attention.py
    ``static_builds``). The chunked scan's listing comes from the wheel's ``nvdisasm -gi``: every
    instruction annotated with its source line and the call sites it was inlined through."""
    os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton is imported
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bench.gpu_static import _cuobjdump, _jsonable
    from screening_attn._kernels.attention import static_builds

    (spec,) = [
        b for b in static_builds(torch.float16, D, D, WINDOW, RELEVANT, arch) if b[0] == kernel
    ]
    _name, fn, sig, consts, options = spec
    k = triton.compile(
        ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32), options=options
    )
    if kernel == "scan":
        cmd = [_cuobjdump(), "-sass"]
    else:
        cmd = [str(Path(_cuobjdump()).with_name("nvdisasm")), "-gi", "-c"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([*cmd, f.name], capture_output=True, text=True, check=True).stdout
    return sass, {**_jsonable(consts), **options}


# ------------------------------------------------------------------------------------------------
# The chunked scan's round, read from its SASS (nvdisasm -gi): loops are backward branches, and
# each loop's trip count comes from the source statement its branch was compiled from.

_LOC = re.compile(r'\s*//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")

Loc = tuple[tuple[str, int], ...]  # (file, line) innermost first, then the call sites


def parse_nvdisasm(text: str) -> list[tuple[int, str, str, Loc]]:
    """``(address, opcode, operands, location)`` of every instruction of an ``nvdisasm -gi``
    listing; branch targets (labels) are replaced by addresses."""
    out, labels, pending, chain, block = [], {}, [], (), []
    for line in text.splitlines():
        if m := _LOC.match(line):
            block.append((m[1], int(m[2])))
            continue
        if block:
            chain, block = tuple(block), []
        if m := _LABEL.match(line):
            pending.append(m[1])
            continue
        if m := _INSTR.search(line):
            addr = int(m[1], 16)
            labels.update(dict.fromkeys(pending, addr))
            pending = []
            out.append((addr, m[3], m[4].strip(), chain))
    fix = lambda ops: _TARGET.sub(lambda t: hex(labels[t[1]]), ops)  # noqa: E731
    return [(a, op, fix(ops) if op.startswith("BRA") else ops, loc) for a, op, ops, loc in out]


def _text(loc: tuple[str, int]) -> str:
    return linecache.getline(loc[0], loc[1]).strip()


def _calls(instr, name: str) -> bool:
    return any(_text(loc).find(name + "(") >= 0 for loc in instr[3][1:])


# Trip count of each loop of the chunked scan, by the statement of its backward branch (and for
# `_window_sums`' query loop, by its call): per chunk of L queries, G = 1, no exact tie.
def _trips(loop: dict, c: dict) -> int:
    stmt, caller = loop["stmt"], loop["caller"]
    used = c["BLOCK_M"] + WINDOW - 1  # the range columns of a full chunk
    table = {
        "for c0 in range(0, R_PAD, BLOCK_M):": c["R_PAD"] // c["BLOCK_M"],
        "for c0 in range(0, R_PAD, BLOCK_N):": c["R_PAD"] // c["BLOCK_M"],
        "for c0 in range(0, x1 - base, BLOCK_M):": math.ceil(used / c["BLOCK_M"]),
        "for c0 in range(0, x1 - col0, BLOCK_N):": math.ceil(used / c["BLOCK_M"]),
        "for c0 in range(0, x1 - base, 8 * BLOCK_M):": math.ceil(used / (8 * c["BLOCK_M"])),
        # _slot_rule's `while pending > 0:` (its branch sits at the `if` in the body): one pass
        # in a round without an exact tie (chunk_costs: unless the pass is peeled out of it)
        "while pending > 0:": 1,
        "if pending > 0:": 1,
        "for g in range(G):": c["G"],
        "for s in range(verified, stop):": 1,  # the one-query step: its cost is per step
    }
    key = stmt.split("  #")[0].strip()
    if key == "for i in range(i0, i1):":  # _window_sums: the round's queries, or one step's
        if ", 0, nq," in caller:
            return c["BLOCK_M"]
        if ", s, s + 1," in caller:
            return 1
        if ", 0, verified," in caller:
            return c["BLOCK_M"] // 2  # a fallback's final prefix: half a chunk on average
    if key not in table:
        raise ValueError(f"no trip count for the loop at {loop['loc']}: {stmt!r}")
    return table[key]


def chunk_loops(instrs: list[tuple[int, str, str, Loc]]) -> list[dict]:
    """Every loop of the listing: ``first``, ``last`` address, the branch's source statement
    and the call it was inlined through."""
    out = []
    for addr, op, ops, loc in instrs:
        m = _BRANCH.search(ops)
        if op.startswith("BRA") and m and int(m[1], 16) < addr and loc:
            caller = _text(loc[1]) if len(loc) > 1 else ""
            where = f"{Path(loc[0][0]).name}:{loc[0][1]}"
            out.append(
                {
                    "first": int(m[1], 16),
                    "last": addr,
                    "stmt": _text(loc[0]),
                    "caller": caller,
                    "loc": where,
                }
            )
    return out


def dynamic_counts(
    instrs, loops_: list[dict], region: dict, config: dict, skip=(), rare: frozenset = frozenset()
) -> Counter:
    """Instructions (by class) that one pass over ``region`` executes per warp: each
    instruction times the trip counts of the loops inside the region that hold it; the loops
    in ``skip`` (and what they hold) are left out, and so are instructions compiled from the
    source lines ``rare`` (a branch that a pass does not take)."""
    inner = [lp for lp in loops_ if _inside(lp, region) and lp is not region]
    counts: Counter = Counter()
    for addr, op, _, loc in instrs:
        if not region["first"] <= addr <= region["last"] or rare.intersection(loc):
            continue
        held = [lp for lp in inner if lp["first"] <= addr <= lp["last"]]
        if any(lp in skip for lp in held):
            continue
        counts[classify(op)] += math.prod(_trips(lp, config) for lp in held)
    return counts


def _block(path: str, header: str) -> frozenset:
    """``(path, line)`` of the statements under the line ``header`` of a source file (none if
    it has no such line)."""
    lines = Path(path).read_text().splitlines()
    found = [i for i, x in enumerate(lines) if x.strip() == header]
    if not found:
        return frozenset()
    at = found[0]
    indent = len(lines[at]) - len(lines[at].lstrip())
    body = set()
    for i in range(at + 1, len(lines)):
        x = lines[i]
        if x.strip() and len(x) - len(x.lstrip()) <= indent:
            break
        body.add((path, i + 1))
    return frozenset(body)


def _inside(a: dict, b: dict) -> bool:
    return b["first"] <= a["first"] and a["last"] <= b["last"]


def _smallest(loops_: list[dict], instrs, *names: str, outside: dict | None = None) -> dict:
    """The smallest loop holding a call of each of ``names`` (and strictly holding
    ``outside``)."""
    found = []
    for lp in loops_:
        body = [i for i in instrs if lp["first"] <= i[0] <= lp["last"]]
        holds = outside is None or (_inside(outside, lp) and lp is not outside)
        if holds and all(any(_calls(i, nm) for i in body) for nm in names):
            found.append(lp)
    if not found:
        raise ValueError(f"no loop holds calls of {names}")
    return min(found, key=lambda lp: lp["last"] - lp["first"])


def chunk_costs(instrs, config: dict, a: dict = ASSUMPTIONS) -> dict:
    """Cycles of the chunked scan's pieces, each ``(issue, latency)``: a verification round, a
    one-query fallback step, an exact tie's extra slot-rule pass, and a chunk's fixed work (its
    block logits and commit). Issue: every warp issues each executed instruction, one warp per
    scheduler; latency: every instruction waits for the one before it."""
    config = {**config, "R_PAD": -(-RELEVANT // config["BLOCK_M"]) * config["BLOCK_M"]}
    loops_ = chunk_loops(instrs)
    rnd = _smallest(loops_, instrs, "_slot_rule", "_chunk_softmax")
    verify = _smallest(loops_, instrs, "_slot_rule", outside=rnd)
    chunk = _smallest(loops_, instrs, "_block_logits", outside=verify)
    (step,) = [lp for lp in loops_ if lp["stmt"] == "for s in range(verified, stop):"]
    pending = ("while pending > 0:", "if pending > 0:")
    (tie,) = [lp for lp in loops_ if lp["stmt"] in pending and _inside(lp, rnd)]
    # a round runs the slot rule's pass once; the compiler may peel that pass out of the
    # `while pending` loop, which then runs only at exact ties (else: one iteration, without
    # its one-key rule)
    peeled = any(
        _inside({"first": i[0], "last": i[0]}, rnd)
        and not _inside({"first": i[0], "last": i[0]}, tie)
        and _calls(i, "_slot_pass")
        for i in instrs
    )
    path = next(loc[0][0] for *_, loc in instrs if loc and _text(loc[0]) == tie["stmt"])
    tie_only = frozenset() if peeled else _block(path, "if pending > 0:")
    warps = math.ceil(config["num_warps"] / a["schedulers_per_sm"])
    skip = (tie,) if peeled else ()
    pieces = {
        "round": dynamic_counts(instrs, loops_, rnd, config, skip=skip, rare=tie_only),
        "step": dynamic_counts(instrs, loops_, step, config),
        "exact_tie": dynamic_counts(instrs, loops_, tie, config),
        "chunk": dynamic_counts(instrs, loops_, chunk, config, skip=(verify, rnd)),
    }
    out = {}
    for name, counts in pieces.items():
        n = sum(counts.values())
        latency = sum(a["latency"][c] * k for c, k in counts.items())
        out[name] = {
            "instructions": n,
            "by_class": dict(sorted(counts.items())),
            "cycles": (n * warps, latency),
        }
    out["loops"] = [
        {"loc": lp["loc"], "stmt": lp["stmt"], "trips": _trips(lp, config)}
        for lp in loops_
        if _inside(lp, chunk) and lp not in (chunk, verify, rnd)
    ]
    return out


def step_costs(body: list[tuple[int, str, str]], config: dict, a: dict = ASSUMPTIONS) -> dict:
    """Cycles of one step of the sequential scan, ``(issue, latency)``."""
    counts = Counter(classify(op) for _, op, _ in body)
    n = len(body)
    # one warp per scheduler: each warp issues the whole body, in parallel with the others
    issue = n * math.ceil(config["num_warps"] / a["schedulers_per_sm"])
    latency = sum(a["latency"][c] * k for c, k in counts.items())  # every instruction waits
    return {
        "loop_instructions": n,
        "by_class": dict(sorted(counts.items())),
        "step_cycles": (issue, latency),
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


def predict(costs: dict, chunked: dict, a: dict = ASSUMPTIONS) -> list[dict]:
    """Predicted H100 times (µs, low–high) of the cases of the issue: the sequential scan from
    its step (``costs``), the chunked scan from its pieces (``chunked``, chunk_costs) and the
    measured depths."""
    f = a["clock_ghz"] * 1e3  # cycles per µs
    step = costs["step_cycles"]
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
        chunks = math.ceil(T / CHUNK)
        for inputs, d in _depth(T).items():
            count = {
                "chunk": chunks,
                "round": d["rounds"],
                "step": d["steps"],
                "exact_tie": d["exact"],
            }
            scan = [
                waves * sum(n * chunked[p]["cycles"][i] for p, n in count.items()) / f
                for i in range(2)
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
    p.add_argument("--out", type=Path, default=RESULTS / "scan-cost.json")
    args = p.parse_args(argv)
    sass, config = compile_sass("scan")
    costs = step_costs(step_loop(parse_sass(sass)), config)
    sass, chunk_config = compile_sass("chunk_scan")
    chunked = chunk_costs(parse_nvdisasm(sass), chunk_config)
    rows = predict(costs, chunked)
    print(f"sequential scan, sm_90, per-query loop: {costs['loop_instructions']} instructions")
    print(f"  by class: {costs['by_class']}")
    print(f"  step: {_rng(costs['step_cycles'])} cycles (issue bound – all dependent)")
    print(f"chunked scan, sm_90, L = {chunk_config['BLOCK_M']}, per warp:")
    for piece in ("round", "step", "exact_tie", "chunk"):
        x = chunked[piece]
        print(f"  {piece}: {x['instructions']} instructions, {_rng(x['cycles'])} cycles")
    print(
        "  loops (statement: trips): "
        + "; ".join(f"{lp['loc']} {lp['stmt']} {lp['trips']}" for lp in chunked["loops"])
    )
    for r in rows:
        print(f"B={r['B']} H={r['H']} T={r['T']}:")
        print(f"  sequential scan {_rng(r['sequential_scan_us'])} µs")
        print(
            f"  FA sliding window ({WINDOW + RELEVANT} keys) fwd "
            f"{_rng(r['fa_window_fwd_us'], '{:.1f}')} µs"
        )
        for inputs in ("random", "ties", "adversarial"):
            x = r[inputs]
            print(
                f"  {inputs}: scan {_rng(x['scan_us'])} µs, fwd {_rng(x['fwd_us'])} µs "
                f"({_rng(x['fwd_vs_fa'], '{:.1f}')}x FA), fwd+bwd {_rng(x['fwd_bwd_us'])} µs "
                f"({_rng(x['fwd_bwd_vs_fa'], '{:.1f}')}x FA)"
            )
    result = {
        "assumptions": ASSUMPTIONS,
        "config": config,
        "costs": costs,
        "chunk_config": chunk_config,
        "chunked": chunked,
        "cases": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
