"""The benchmark report: ``python -m bench.report [--quick|--full]
[--only attention,rnn,feedback,decode] [--threads N] [--no-thread-scaling]
[--baseline JSON [--fail-on-regression]] [--device cpu|cuda] [--out DIR] [--no-plots]``.

Runs the standard sweep of bench/_cases.py (bench.run), prints one table per op with ratios
measured in the same run (bench.tables), each family's 1 -> 2 thread speed-up (bench.threads),
the targets (bench.targets), the screening scan's sequential depth as
bench/results/scan-depth.json holds it (written by ``python -m bench.scan_depth``), the
comparison with a baseline (bench.baseline), and writes ``<out>/<machine>-<date>.json`` (every
figure, the machine, versions, git SHA: bench.machine) and PNG plots (bench.plots). ``python -m
bench.readme`` then puts the latest full run into README.md. See bench/README.md for the columns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch

from bench import _cases
from bench.baseline import compare_baseline
from bench.machine import ROOT, loadavg, machine_info, machine_slug, matmul_gflops
from bench.plots import write_plots
from bench.ratios import add_ratios
from bench.run import run_cases
from bench.tables import print_scan_depth, print_tables
from bench.targets import print_targets, targets, thread_targets
from bench.threads import print_threads, run_threads


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--quick", action="store_const", dest="preset", const="quick", help="small sweep (~1 min)"
    )
    g.add_argument(
        "--full",
        action="store_const",
        dest="preset",
        const="full",
        help="adds T=32768 and a window/relevant sweep",
    )
    p.set_defaults(preset="default")
    p.add_argument(
        "--only",
        default=",".join(_cases.ALL_FAMILIES),
        help="comma-separated families (default: attention,rnn,feedback,decode)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument(
        "--no-thread-scaling",
        action="store_true",
        help="skip the 1 -> 2 thread speed-ups (bench.threads)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="device of the attention cases (default: cpu)",
    )
    p.add_argument("--baseline", type=Path, help="earlier result JSON to compare with")
    p.add_argument(
        "--fail-on-regression",
        action="store_true",
        help="exit 1 when --baseline finds a case more than 10%% slower",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        help="directory of the JSON and PNG files (default: bench/results)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    args.families = [f.strip() for f in args.only.split(",") if f.strip()]
    bad = [f for f in args.families if f not in _cases.ALL_FAMILIES]
    if bad:
        p.error(f"--only takes {','.join(_cases.ALL_FAMILIES)}, got {','.join(bad)}")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.baseline is not None and not args.baseline.is_file():
        p.error(f"--baseline {args.baseline}: no such file")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    meta = machine_info(args.threads)
    meta.update(preset=args.preset, families=args.families, device=args.device, argv=sys.argv[1:])
    print(f"screening_attn benchmark report, preset {args.preset!r}")
    print(f"  machine: {meta['cpu']}, {meta['cores']} cores ({meta['platform']})")
    print(f"  threads: {args.threads} (OMP_NUM_THREADS={meta['omp_num_threads_env']})")
    print(
        f"  python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}; "
        f"git {str(meta['git_sha'])[:10]}{' (dirty)' if meta['git_dirty'] else ''}; "
        f"{meta['date']}"
    )
    load = meta["loadavg_start"]
    if load and load[0] > max(1, (meta["cores_usable"] or 1) - args.threads) + 0.5:
        print(
            f"  WARNING: load average {load[0]} at start: other work on this machine will "
            f"skew the timings"
        )
    meta["matmul_gflops"] = matmul_gflops()
    print(f"  1024x1024 fp32 matmul: {meta['matmul_gflops']:.1f} GFLOP/s (at the start)")
    sys.stdout.flush()

    cases = _cases.cases(args.preset, args.families, device=args.device)
    mm_start = meta["matmul_gflops"]
    results = run_cases(cases, args.preset)
    threads = [] if args.no_thread_scaling else run_threads(args.preset, args.families)

    # measured again at the end: the machine's throughput is the better of the two (other load
    # or throttling only ever lowers it)
    meta["matmul_gflops_end"] = matmul_gflops()
    meta["matmul_gflops_start"] = mm_start
    meta["matmul_gflops"] = max(mm_start, meta["matmul_gflops_end"])
    print(
        f"  1024x1024 fp32 matmul: {mm_start:.1f} GFLOP/s at the start, "
        f"{meta['matmul_gflops_end']:.1f} at the end; %mm uses {meta['matmul_gflops']:.1f}"
    )
    add_ratios(results, meta["matmul_gflops"])
    print_tables(results)
    print_threads(threads)
    target_items = targets(results) + thread_targets(threads)
    if target_items:
        print_targets(target_items)
    scan_depth = None
    if "attention" in args.families:
        scan_depth = print_scan_depth(ROOT / "bench" / "results" / "scan-depth.json")

    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    meta["loadavg_end"] = loadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = args.out / f"{machine_slug(meta)}-{stamp}"
    slower = []
    if args.baseline is not None:
        slower = compare_baseline(results, meta, args.baseline)
    payload = {"meta": meta, "results": results, "threads": threads, "targets": target_items}
    if scan_depth is not None:
        payload["scan_depth"] = scan_depth
    if args.baseline is not None:
        payload["baseline"] = {"path": str(args.baseline), "slower": slower}
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    print(f"\nwrote {_rel(json_path)}")
    if not args.no_plots:
        for path in write_plots(results, stem):
            print(f"wrote {_rel(path)}")
    n_failed = sum(r["status"] == "failed" for r in results)
    print(
        f"{len(results)} cases ({sum(r['status'] == 'ok' for r in results)} timed, "
        f"{sum(r['status'] == 'skipped' for r in results)} skipped, {n_failed} FAILED) "
        f"in {meta['elapsed_s']:.0f} s"
    )
    if args.fail_on_regression and slower:
        return 1
    return 0


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
