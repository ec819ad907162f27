"""Static GPU check of the Triton kernels: compile every specialisation the launchers can
build for sm_80 (A100) and sm_90 (H100/H200) on this machine, without a GPU, and check that
each fits (shared memory, registers, spills) and that half-precision products run on tensor
cores.

    .venv/bin/python -m bench.gpu_static                 # the full sweep (make gpu-static)
    .venv/bin/python -m bench.gpu_static --kernel fwd --dtype fp16 --head-dim 64 --arch 90
    .venv/bin/python -m bench.gpu_static --dtype tf32 --merge   # add/refresh a subset in --out

Writes ``bench/results/gpu-static.json`` (``--out``): a list with one object per build:
``kernel``, ``arch``, ``dtype``, ``head_dim``, ``shared_bytes``, ``registers``, ``spill_bytes``,
``tensor_core_instructions`` (``mma``/``wgmma`` in the PTX), ``build_s``, the launch
configuration, and ``violations`` (empty when within limits). Exit status 1 if any build fails
or violates a limit. ``--merge`` keeps the records of ``--out`` that the run does not rebuild
(same family, kernel, arch, dtype and configuration), so a subset is added without the rest,
and drops those of builds the full sweep no longer makes (a launch configuration changed).

The dtype ``tf32`` stands for float32 inputs with ``torch.backends.cuda.matmul.allow_tf32``:
records with ``dtype`` "fp32" and ``"tf32": true`` (and ``tf32_instructions``, the mma/wgmma on
``.tf32`` operands), for the attention kernels with a TF32 product (not the scan, whose logits
stay IEEE, nor the replay). Tensor cores: every fp16/bf16 and TF32 kernel with products has
one; an IEEE float32 kernel has none (its products would be rounded to TF32).

How: ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch,
32), options)`` with the signatures and constexprs of each kernel family's builds (attention:
``static_builds`` in kernels/attention.py, with the launchers' own ``launch_config``; CNN-F:
``static_builds`` in kernels/feedback.py, kernels prefixed ``feedback.``, ``head_dim`` null);
registers and stack (spills) from the cubin by the ``cuobjdump`` inside the triton wheel.
Under ``TRITON_INTERPRET=1`` ``@triton.jit`` gives interpreted functions that cannot be
compiled, so ``main`` drops the variable before importing triton.

Kernel families register in ``FAMILIES``: a name -> ``(points, builds)``, where
``points(archs, dtypes, head_dims, windows)`` yields the sweep's points as JSON-able dicts
(with ``arch``, ``dtype`` and, where it applies, ``head_dim``) and ``builds(**point)`` returns
that point's ``(kernel, fn, signature, constexprs, options)`` list. Records carry ``family``
and ``point``, so that a worker process rebuilds the arguments from them.

Results are cached in ``build/gpu-static/`` by triton's key of each kernel's
source, the triton version and the build's arguments: a re-run rebuilds only what changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu-static.json"
DEFAULT_CACHE = ROOT / "build" / "gpu-static"

# Dynamic shared memory a block may use (opt-in maximum): H100/H200 227 KB, A100 163 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SPILL_LIMIT = 256  # bytes of stack per thread: "a few hundred"
REG_LIMIT = 255
DTYPES = ("fp16", "bf16", "fp32", "tf32")  # tf32: float32 with allow_tf32 (the docstring)
# (ν, ρ): small, and large enough that the scan's lane vectors and the replay grow
WINDOWS = ((64, 16), (1024, 256))
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_TC = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\b")
# e.g. mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, wgmma.mma_async.sync...f32.tf32.tf32
_TC_TF32 = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync)[\w.]*\.tf32\b")
_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def attention_points(archs, dtypes, head_dims, windows) -> Iterator[dict]:
    """The sweep's points of screened attention: every (arch, dtype, D = Dv, ν, ρ), each
    without and with grouped heads and a key padding mask (``padded``: the kernels'
    ``HAS_MASK`` / ``GROUPED`` variants), and padded as a stream step from an initial state
    (``stream``: ``HAS_STATE``); dtype "tf32" gives float32 points with ``"tf32": True``."""
    for arch in archs:
        for dt in dtypes:
            tf32 = {"dtype": "fp32", "tf32": True} if dt == "tf32" else {"dtype": dt}
            for d in head_dims:
                for window, live in windows:
                    for padded, stream in ((False, False), (True, False), (True, True)):
                        yield {"arch": arch, **tf32, "head_dim": d, "window": window,
                               "relevant": live, "padded": padded,
                               **({"stream": True} if stream else {})}  # fmt: skip


def attention_builds(
    arch: int,
    dtype: str,
    head_dim: int,
    window: int,
    relevant: int,
    tf32: bool = False,
    padded: bool = False,
    stream: bool = False,
):
    """The attention kernels the launchers build at one point (``static_builds``); with
    ``tf32`` (``allow_tf32``) only those with TF32 products: the scan and the replay are the
    IEEE float32 builds."""
    from screening_attn._kernels.attention import static_builds

    dt = _DTYPES[dtype]
    out = static_builds(dt, head_dim, head_dim, window, relevant, arch, tf32, padded, stream)
    return [b for b in out if b[3].get("TF32")] if tf32 else out


def feedback_points(archs, dtypes, head_dims, windows) -> Iterator[dict]:
    """The sweep's points of the CNN-F kernels: every (arch, dtype); no head dim, no window."""
    for arch in archs:
        for dt in dtypes:
            if dt != "tf32":  # no products
                yield {"arch": arch, "dtype": dt}


def feedback_builds(arch: int, dtype: str):
    """The CNN-F kernels the launchers build for one dtype (``static_builds`` in
    kernels/feedback.py; names prefixed ``feedback.``, several configurations per kernel)."""
    from screening_attn._kernels.feedback import static_builds

    return static_builds(_DTYPES[dtype], arch)


# family -> (points, builds): see the module docstring
FAMILIES: dict[str, tuple[Callable[..., Iterable[dict]], Callable[..., list]]] = {
    "attention": (attention_points, attention_builds),
    "feedback": (feedback_points, feedback_builds),
}
# kernels whose build records name the (ν, ρ) point (the others don't depend on it)
_WINDOWED = {("attention", "scan"), ("attention", "chunk_scan"), ("attention", "replay")}


def plan(archs, dtypes, head_dims, kernels, windows=WINDOWS, families=None) -> list[dict]:
    """The builds of the sweep, deduplicated by their constexprs (fwd/dq/dkdv don't depend on
    ν and ρ, the replay not on the head dim): plain dicts, so that worker processes rebuild
    the arguments from them."""
    seen, out = set(), []
    for family, (points, builds) in FAMILIES.items():
        if families and family not in families:
            continue
        for point in points(archs, dtypes, head_dims, windows):
            for name, _fn, _sig, consts, options in builds(**point):
                if kernels and name not in kernels:
                    continue
                key = (family, name, point["arch"], point["dtype"],
                       json.dumps(_jsonable(consts), sort_keys=True))  # fmt: skip
                if key in seen:
                    continue
                seen.add(key)
                rec = {"family": family, "kernel": name, "arch": point["arch"],
                       "dtype": point["dtype"], "head_dim": point.get("head_dim")}  # fmt: skip
                if point.get("tf32"):
                    rec["tf32"] = True
                if (family, name) in _WINDOWED:
                    rec.update(window=point["window"], relevant=point["relevant"])
                rec["config"] = {**_jsonable(consts), **options}
                rec["point"] = point
                out.append(rec)
    return out


def _jsonable(consts: dict) -> dict:
    return {k: (v if isinstance(v, (bool, int, float)) else str(v)) for k, v in consts.items()}


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def build(rec: dict) -> dict:
    """Compile one planned build and measure it; errors are recorded, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _name, fn, sig, consts, options = _spec(rec)
    rec = dict(rec)
    t0 = time.perf_counter()
    try:
        k = triton.compile(
            ASTSource(fn, sig, consts),
            target=GPUTarget("cuda", rec["arch"], 32),
            options=options,
        )
    except Exception as e:  # a build that fails is a finding, not a crash of the sweep
        rec.update(
            build_s=round(time.perf_counter() - t0, 1), error=f"{type(e).__name__}: {e}"[:2000]
        )
        return rec
    rec["build_s"] = round(time.perf_counter() - t0, 1)
    rec["shared_bytes"] = int(k.metadata.shared)
    rec["tensor_core_instructions"] = len(_TC.findall(k.asm["ptx"]))
    if rec.get("tf32"):
        rec["tf32_instructions"] = len(_TC_TF32.findall(k.asm["ptx"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    m = _USAGE.search(usage)
    if m is None:
        rec["error"] = f"no resource usage in cuobjdump output: {usage[:500]}"
        return rec
    rec["registers"], rec["spill_bytes"] = int(m[1]), int(m[2])
    return rec


def violations(rec: dict) -> list[str]:
    """Why a measured build would not launch or not run as intended on its target."""
    if "error" in rec:
        return ["build failed: " + rec["error"].splitlines()[0]]
    out = []
    if rec["shared_bytes"] > SHARED_LIMIT[rec["arch"]]:
        out.append(f"shared {rec['shared_bytes']} B > {SHARED_LIMIT[rec['arch']]} B")
    if rec["registers"] > REG_LIMIT:
        out.append(f"registers {rec['registers']} > {REG_LIMIT}")
    if rec["spill_bytes"] > SPILL_LIMIT:
        out.append(f"stack (spills) {rec['spill_bytes']} B > {SPILL_LIMIT} B")
    # the replay copies sets; the CNN-F kernels are elementwise and per-plane sums
    has_products = rec.get("family", "attention") == "attention" and rec["kernel"] != "replay"
    if rec["dtype"] in ("fp16", "bf16") and has_products and rec["tensor_core_instructions"] == 0:
        out.append("no mma/wgmma: half-precision products off the tensor cores")
    if rec.get("tf32") and has_products and rec.get("tf32_instructions", 0) == 0:
        out.append("no mma/wgmma on .tf32: TF32 products off the tensor cores")
    if rec["dtype"] == "fp32" and not rec.get("tf32") and rec["tensor_core_instructions"] > 0:
        out.append("mma/wgmma in an IEEE float32 kernel: products rounded to TF32")
    return out


def _identity(rec: dict) -> str:
    """What a record measures: two records with the same identity are the same build."""
    keys = ("family", "kernel", "arch", "dtype", "config")
    return json.dumps([rec.get("family", "attention"), *(rec[k] for k in keys[1:])], sort_keys=True)


def merge(old: list[dict], new: list[dict], current: set[str] | None = None) -> list[dict]:
    """``old`` with each record that ``new`` rebuilds replaced in place, then the rest of
    ``new`` in order (``--merge``). With ``current`` (the identities of the full sweep's
    builds), old records of builds the launchers no longer make are dropped."""
    fresh = {_identity(r): r for r in new}
    out = [
        fresh.pop(i, r)
        for r in old
        if (i := _identity(r)) in fresh or current is None or i in current
    ]
    return out + [r for r in new if _identity(r) in fresh]


def _spec(rec: dict) -> tuple:
    """The ``(kernel, fn, signature, constexprs, options)`` of a planned build."""
    builds = FAMILIES[rec["family"]][1]
    (spec,) = [
        b
        for b in builds(**rec["point"])
        if b[0] == rec["kernel"] and {**_jsonable(b[3]), **b[4]} == rec["config"]
    ]
    return spec


def _kernel_hash(rec: dict) -> str:
    """Triton's own key of the kernel's source and the jit functions it calls, with the triton
    version: editing one kernel rebuilds only its builds."""
    import triton

    return triton.__version__ + _spec(rec)[1].cache_key


def _cached_build(args: tuple[dict, str | None]) -> dict:
    rec, cache_dir = args
    path = None
    if cache_dir:
        key = _kernel_hash(rec) + json.dumps(rec, sort_keys=True)
        key = hashlib.sha256(key.encode()).hexdigest()
        path = Path(cache_dir) / f"{key[:24]}.json"
        if path.exists():
            return json.loads(path.read_text())
    # a fresh triton cache per build: build_s is a real build's time, never a hit of ~/.triton
    # or of an identical kernel built earlier in the run (the replay has no dtype)
    with tempfile.TemporaryDirectory(prefix="gpu-static-triton-") as tmp:
        os.environ["TRITON_CACHE_DIR"] = tmp
        out = build(rec)
    if path is not None and "error" not in out:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
    return out


def run(builds: list[dict], jobs: int, cache_dir: str | None) -> list[dict]:
    """Measure ``builds`` (in ``jobs`` processes) and attach their violations."""
    work = [(b, cache_dir) for b in builds]
    if jobs > 1 and len(work) > 1:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            results = []
            for r in pool.imap(_cached_build, work):
                results.append(r)
                _progress(r)
    else:
        results = []
        for w in work:
            results.append(_cached_build(w))
            _progress(results[-1])
    for r in results:
        r["violations"] = violations(r)
    return results


def _progress(r: dict) -> None:
    what = f"{r['kernel']:8} sm_{r['arch']} {_dtype_label(r)}"
    if r["head_dim"] is not None:
        what += f" D={r['head_dim']:<3}"
    if "window" in r:
        what += f" ν={r['window']} ρ={r['relevant']}"
    if "error" in r:
        print(f"{what}: ERROR {r['error'].splitlines()[0][:200]}", flush=True)
    else:
        print(
            f"{what}: shared {r['shared_bytes']:>6} B, {r['registers']} regs, "
            f"stack {r['spill_bytes']} B, {r['tensor_core_instructions']} mma, "
            f"{r['build_s']} s",
            flush=True,
        )


def _dtype_label(r: dict) -> str:
    return "tf32" if r.get("tf32") else r["dtype"]


def table(results: list[dict]) -> str:
    """A markdown summary of a sweep (docs/kernels/triton.md): per family, kernel and dtype,
    the largest shared memory per arch, registers and stack, the fewest tensor-core
    instructions and the longest build over head dims and (ν, ρ)."""
    rows = {}
    for r in results:
        if "error" not in r:
            key = (r.get("family", "attention"), r["kernel"], _dtype_label(r))
            rows.setdefault(key, []).append(r)
    out = [
        "| kernel | dtype | head dims | builds | shared KB sm_80 / sm_90 | registers | stack B "
        "| mma (min) | build s (max) | within limits |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (family, kernel, dt), rs in rows.items():
        shared = [max((x["shared_bytes"] for x in rs if x["arch"] == a), default=0) / 1024
                  for a in (80, 90)]  # fmt: skip
        dims = sorted({x["head_dim"] for x in rs if x["head_dim"] is not None})
        ok = sum(not x.get("violations", violations(x)) for x in rs)
        name = kernel if family == "attention" else f"{family}.{kernel}"
        out.append(
            f"| {name} | {dt} | {','.join(map(str, dims)) or '-'} | {len(rs)} "
            f"| {shared[0]:.0f} / {shared[1]:.0f} | ≤ {max(x['registers'] for x in rs)} "
            f"| ≤ {max(x['spill_bytes'] for x in rs)} "
            f"| {min(x['tensor_core_instructions'] for x in rs)} "
            f"| {max(x['build_s'] for x in rs)} | {ok}/{len(rs)} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    # before any triton import (see the docstring); spawned workers inherit the environment
    os.environ.pop("TRITON_INTERPRET", None)
    from screening_attn._kernels.attention import GPU_ARCHS, HEAD_DIMS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=",".join(map(str, GPU_ARCHS)))
    ap.add_argument("--dtype", default=",".join(DTYPES), help="tf32: float32 with allow_tf32")
    ap.add_argument("--head-dim", default=",".join(map(str, HEAD_DIMS)))
    ap.add_argument("--family", default="", help="comma-separated: " + ",".join(FAMILIES))
    ap.add_argument(
        "--kernel", default="", help="comma-separated, e.g. scan,fwd,replay,dq,dkdv,dq_fix"
    )
    ap.add_argument("--small-only", action="store_true", help="only the small (ν, ρ)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument(
        "--merge", action="store_true", help="keep the records of --out this run doesn't rebuild"
    )
    ap.add_argument("--table", action="store_true", help="print --out as markdown, no builds")
    a = ap.parse_args(argv)
    if a.table:
        print(table(json.loads(Path(a.out).read_text())))
        return 0
    builds = plan(
        [int(x) for x in a.arch.split(",")],
        a.dtype.split(","),
        [int(x) for x in a.head_dim.split(",")],
        set(filter(None, a.kernel.split(","))),
        WINDOWS[:1] if a.small_only else WINDOWS,
        set(filter(None, a.family.split(","))),
    )
    print(f"{len(builds)} builds, {a.jobs} processes", flush=True)
    t0 = time.perf_counter()
    results = run(builds, a.jobs, None if a.no_cache else a.cache_dir)
    print(f"built in {time.perf_counter() - t0:.0f} s, {sum(r['build_s'] for r in results):.0f} s "
          "summed", flush=True)  # fmt: skip
    if a.merge and Path(a.out).exists():
        old = json.loads(Path(a.out).read_text())
        current = {_identity(r) for r in plan(GPU_ARCHS, DTYPES, HEAD_DIMS, set())}
        results = merge(old, results, current)
        print(f"merged into {len(old)} records of {a.out}: "
              f"{len(old) + len(builds) - len(results)} replaced or dropped as stale")  # fmt: skip
        for r in results:  # the kept records under today's limits
            r["violations"] = violations(r)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    bad = [r for r in results if r["violations"]]
    for r in bad:
        what = f"{r['family']} {r['kernel']} sm_{r['arch']} {_dtype_label(r)} D={r['head_dim']}"
        print(f"FAIL {what}: " + "; ".join(r["violations"]))
    print(f"{len(results) - len(bad)}/{len(results)} builds within limits; wrote {a.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
