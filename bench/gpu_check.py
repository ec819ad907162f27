"""``make gpu-check``: what a machine with one CUDA GPU runs, in under 10 minutes, that this
project's CI (no GPU) cannot:

    .venv/bin/python -m bench.gpu_check [--quick] [--no-tests] [--no-bench] [--dtype fp16|bf16]

1. the tests of the GPU backends on CUDA tensors: ``GPU_TESTS`` with ``-k "cuda or triton"``
   (tests/_env.py puts the Triton and CUDA backends' tensors on the GPU when there is one);
2. a benchmark of screened attention (the Triton kernels, ``triton``; and with the sequential
   scan, ``triton_sequential``: docs/kernels/triton.md's cost model cannot tell which scan is
   faster on a GPU, this run does) against
   ``F.scaled_dot_product_attention`` on its flash kernel (causal, all keys: ``sdpa_dense``) and,
   if flash-attn is importable, flash-attn's sliding window over the same ν+ρ keys per query
   (``flash_window``), forward and forward + backward, in half precision (the flash kernels take
   no float32). Each provider is first checked on a prefix against the float64 screened
   reference (bench.bench_attention's oracle: ``window >= T`` is dense attention, ``relevant =
   0`` a sliding window), then timed interleaved with the others (bench._common). Writes
   ``<out>/gpu-<machine>-<date>.json`` (``meta`` and ``results``, records as ``make bench``'s)
   and bench.plots' PNGs next to it.

Without a CUDA device it says so and exits with status 2 (``make gpu-static`` is the check of
the GPU kernels that runs without one).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench._cases import ATTENTION_BASE, MODES
from bench._common import (
    CheckFailed,
    Timing,
    check_close,
    clear_grads,
    fmt_time,
    measure_group,
    sync_for,
)
from bench.machine import ROOT, machine_info, machine_slug

GPU_TESTS = (
    "tests/test_attention_kernels.py",
    "tests/test_rnn_kernels.py",
    "tests/test_feedback_devices.py",
    "tests/test_determinism.py",
)
T_SWEEP = {"quick": (1024, 4096), "default": (1024, 4096, 16384)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# a half-precision provider against the float64 oracle on float32-drawn inputs: input rounding
# (2^-11, 2^-8 relative) carried through a softmax average and its gradient
TOLERANCE = {"fp16": 1e-2, "bf16": 6e-2}
NO_GPU = (
    "make gpu-check needs a CUDA device (torch.cuda.is_available() is False here); "
    "without one, `make gpu-static` compiles the Triton kernels for sm_80/sm_90 and checks "
    "their resources, and `make test` runs them under the Triton interpreter"
)

SCAN_ENV = "SCREENING_ATTN_TRITON_SCAN"  # kernels/attention.py scan_kernel
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help=f"T in {T_SWEEP['quick']} only")
    p.add_argument("--no-tests", action="store_true", help="skip the CUDA-tensor tests")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    p.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def providers() -> list[str]:
    """The benchmark's providers here: flash_window only if flash-attn is importable."""
    out = ["triton", "triton_sequential", "sdpa_dense"]
    if importlib.util.find_spec("flash_attn") is not None:
        out.append("flash_window")
    return out


def shapes(quick: bool) -> list[dict]:
    """The benchmark's shapes: make bench's attention base (B=1, H=8, D=64, ν=128, ρ=64) on the
    GPU, T swept."""
    base = {**ATTENTION_BASE, "device": "cuda"}
    return [{**base, "T": T} for T in T_SWEEP["quick" if quick else "default"]]


def attention_fn(provider: str, window: int, relevant: int) -> Attention:
    """``(q, k, v) -> out`` of a provider, on ``(B, H, T, D)`` tensors."""
    if provider == "triton":
        from screening_attn import screened_attention

        return lambda q, k, v: screened_attention(q, k, v, window, relevant, backend="triton")
    if provider == "triton_sequential":  # the op as users select it, by the environment
        from screening_attn import screened_attention

        def sequential(q, k, v):
            old = os.environ.get(SCAN_ENV)
            os.environ[SCAN_ENV] = "sequential"
            try:
                return screened_attention(q, k, v, window, relevant, backend="triton")
            finally:
                if old is None:
                    del os.environ[SCAN_ENV]
                else:
                    os.environ[SCAN_ENV] = old

        return sequential
    if provider == "sdpa_dense":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def dense(q, k, v):
            backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return dense
    if provider == "flash_window":
        from flash_attn import flash_attn_func

        w = window + relevant  # keys per query, itself included

        def flash(q, k, v):  # flash-attn takes (B, T, H, D)
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
            return flash_attn_func(q, k, v, causal=True, window_size=(w - 1, 0)).transpose(1, 2)

        return flash
    raise ValueError(f"unknown provider {provider!r}")


def oracle_args(provider: str, T: int, window: int, relevant: int) -> tuple[int, int]:
    """(window, relevant) of the screened op that ``provider`` computes."""
    if provider == "sdpa_dense":
        return T, 0
    if provider == "flash_window":
        return window + relevant, 0
    return window, relevant


def check(provider: str, fn: Attention, mode: str, q, k, v, g, shape: dict, tol: float) -> None:
    """One call of ``fn``, its first ``check_len`` positions (output and, for ``fwd+bwd``, the
    gradients) against the float64 screened reference on that prefix; raises CheckFailed."""
    from bench.bench_attention import _oracle, check_len

    T, window, relevant = shape["T"], shape["window"], shape["relevant"]
    t0 = check_len(T, window, relevant)
    w, r = oracle_args(provider, t0, window, relevant)
    ref = _oracle(shape["B"], shape["H"], shape["D"], t0, w, r)
    if mode == "fwd":
        with torch.no_grad():
            out = fn(q, k, v)
        check_close("out", out[:, :, :t0], ref[0], tol, tol)
        return
    g_check = g.clone()
    g_check[:, :, t0:] = 0  # causal: the prefix's gradient is the prefix problem's
    clear_grads(q, k, v)
    out = fn(q, k, v)
    out.backward(g_check)
    check_close("out", out[:, :, :t0], ref[0], tol, tol)
    for name, x, want in zip(("dq", "dk", "dv"), (q, k, v), ref[1:]):
        check_close(name, x.grad[:, :, :t0], want, tol, tol)
    clear_grads(q, k, v)


def _timed(fn: Attention, mode: str, q, k, v, g) -> Callable[[], object]:
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return fn(q, k, v)

        return run

    def run_bwd():
        clear_grads(q, k, v)
        fn(q, k, v).backward(g)

    return run_bwd


def record(provider: str, mode: str, shape: dict, dtype: str) -> dict:
    """A result record as ``make bench`` writes them (bench/run.py), plus the dtype."""
    return {
        "family": "attention",
        "op": "screened_attention",
        "provider": provider,
        "mode": mode,
        "shape": dict(shape),
        "dtype": dtype,
        "status": "ok",
        "reason": None,
    }


def add_timing(rec: dict, t: Timing) -> dict:
    rec.update(median_s=t.median, q1_s=t.q1, q3_s=t.q3, spread=t.spread, n=t.n, times_s=t.times)
    return rec


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    return fmt_time(r["median_s"]) if r["status"] == "ok" else r["status"].upper()


def table(results: list[dict]) -> str:
    """One line per (T, mode): each provider's time, and each peer's time over the Triton
    kernels' (> 1: screened attention is faster)."""
    provs = list(dict.fromkeys(r["provider"] for r in results))
    peers = [p for p in provs if p != "triton"]
    lines = [
        f"{'T':>6} {'mode':8}"
        + "".join(f" {p:>13}" for p in provs)
        + "".join(f" {p + '/triton':>20}" for p in peers)
    ]
    for T, mode in dict.fromkeys((r["shape"]["T"], r["mode"]) for r in results):
        row = {r["provider"]: r for r in results if (r["shape"]["T"], r["mode"]) == (T, mode)}
        mine = row.get("triton")
        ratios = []
        for p in peers:
            r = row.get(p)
            ok = mine is not None and r is not None and mine["status"] == r["status"] == "ok"
            ratios.append(f"{r['median_s'] / mine['median_s']:.2f}x" if ok else "-")
        lines.append(
            f"{T:>6} {mode:8}"
            + "".join(f" {_cell(row.get(p)):>13}" for p in provs)
            + "".join(f" {x:>20}" for x in ratios)
        )
    return "\n".join(lines)


def run_bench(cases: list[dict], dtype: str, provs: list[str], min_time: float = 0.3) -> list[dict]:
    """Check, then time, each of ``provs`` at each shape of ``cases`` and each mode (see the
    module docstring), on each shape's ``device``."""
    from bench.bench_attention import make_inputs

    results = []
    for shape in cases:
        B, H, T, D = shape["B"], shape["H"], shape["T"], shape["D"]
        for mode in MODES:
            q, k, v, g = make_inputs(B, H, T, D, T, shape["device"], requires_grad=False)
            q, k, v, g = (x.to(DTYPES[dtype]) for x in (q, k, v, g))
            if mode != "fwd":
                q, k, v = (x.requires_grad_() for x in (q, k, v))
            recs, fns = {}, {}
            for p in provs:
                recs[p] = rec = record(p, mode, shape, dtype)
                fn = attention_fn(p, shape["window"], shape["relevant"])
                try:
                    check(p, fn, mode, q, k, v, g, shape, TOLERANCE[dtype])
                except CheckFailed as exc:
                    rec.update(status="failed", reason=f"check against the reference: {exc}")
                    continue
                except Exception as exc:  # the run goes on; the record says what happened
                    rec.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
                    continue
                fns[p] = _timed(fn, mode, q, k, v, g)
            timings = measure_group(fns, sync=sync_for(shape["device"]), min_time=min_time)
            for p, t in timings.items():
                add_timing(recs[p], t)
            results.extend(recs.values())
            print(f"T={T} {mode}: " + ", ".join(_summary(r) for r in recs.values()), flush=True)
    return results


def _summary(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['provider']} {r['status'].upper()} ({r['reason']})"
    return f"{r['provider']} {fmt_time(r['median_s'])}"


def run_tests() -> int:
    """The CUDA-tensor tests (``GPU_TESTS``); pytest's exit status."""
    cmd = [sys.executable, "-m", "pytest", *GPU_TESTS, "-q", "-k", "cuda or triton"]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def write(results: list[dict], out: Path, plots: bool) -> list[Path]:
    """The JSON (and plots) of a run; their paths."""
    from bench.plots import write_plots

    meta = machine_info(torch.get_num_threads())
    meta.update(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = out / f"gpu-{machine_slug(meta)}-{stamp}"
    path = stem.with_suffix(".json")
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n")
    return [path, *(write_plots(results, stem) if plots else [])]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    status = 0 if args.no_tests else run_tests()
    if not args.no_bench:
        results = run_bench(shapes(args.quick), args.dtype, providers())
        print(table(results))
        for path in write(results, args.out, not args.no_plots):
            print(f"wrote {path}")
        if any(r["status"] == "failed" for r in results):
            status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
