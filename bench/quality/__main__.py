"""The learned-task quality benchmark: ``python -m bench.quality [--quick] [--only
mqar,copy,cnnf] [--seeds N] [--threads N] [--jobs N] [--out DIR]``.

Runs the selected tasks in order, each printing its progress and table, and writes
``<out>/quality-<machine>-<YYYYmmdd-HHMMSS>.json`` (machine, versions, git SHA, threads, preset,
one entry per task) and each task's PNG plots into ``<out>`` (default ``bench/results/``).
A task is a module with ``run(quick, seeds, out_dir, log) -> dict`` (with ``"rows"`` and
``"plots"``) and ``markdown(result) -> str``; ``TASKS`` names them and they are imported only
when selected.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench.quality._common import ROOT, Stopwatch, loadavg, machine_info, machine_slug, run_part

TASKS = {
    "mqar": "bench.quality.mqar",
    "copy": "bench.quality.copy_task",
    "cnnf": "bench.quality.cnnf_digits",
}
# issue #17's tasks; CNN-F (issue #19, about 330 s of CPU with 3 seeds) would not fit beside them
# in the default preset's 15 minutes: it runs when named (--only cnnf, or all three)
DEFAULT_TASKS = ("mqar", "copy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.quality", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="the small preset (<= 3 min in total)")
    p.add_argument(
        "--only",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated tasks of {','.join(TASKS)} (default: {','.join(DEFAULT_TASKS)})",
    )
    p.add_argument(
        "--seeds", type=int, default=None, help="seeds per setting (default: 3; --quick: 1)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS") or 1),
        help="torch threads (default: OMP_NUM_THREADS, else 1: the presets' budgets are for one)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="trainings run at once, one process each (default: as many as the cores hold at "
        "--threads each; 1: all in this process)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        help="directory of the JSON and PNG files (default: bench/results)",
    )
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.only.split(",") if t.strip()]
    bad = [t for t in args.tasks if t not in TASKS]
    if bad or not args.tasks:
        p.error(f"--only takes some of {','.join(TASKS)}, got {args.only!r}")
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.jobs is None:
        args.jobs = max(1, (os.cpu_count() or 1) // args.threads)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    return args


def _log(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> dict:
    """Run the selected tasks; return what was written to the JSON (and its path)."""
    args = parse_args(argv)
    for name in args.tasks:
        try:
            importlib.import_module(TASKS[name])
        except ModuleNotFoundError as e:
            raise SystemExit(f"task {name!r}: cannot import {TASKS[name]} ({e})") from e
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> dict:
    clock = Stopwatch()
    meta = machine_info()
    preset = "quick" if args.quick else "default"
    meta.update(
        preset=preset, tasks=args.tasks, seeds=args.seeds, jobs=args.jobs, argv=sys.argv[1:]
    )
    _log(
        f"quality benchmark, preset {preset!r}, tasks {','.join(args.tasks)}, {args.seeds} "
        f"seed(s), {meta['threads']} threads (OMP_NUM_THREADS={meta['omp_num_threads_env']}); "
        f"torch {meta['torch']}, git {str(meta['git_sha'])[:10]}"
        f"{' (dirty)' if meta['git_dirty'] else ''}; load {meta['loadavg_start']}"
    )
    seeds = list(range(args.seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    # the run's files share one stem: the README quotes a JSON and the plots of that same run
    stem = f"quality-{machine_slug(meta)}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    # the work: every task's independent trainings (its units), or the whole task if it has none
    work = []
    for name in args.tasks:
        task = importlib.import_module(TASKS[name])
        parts = task.units(args.quick, seeds) if hasattr(task, "units") else [None]
        work.append([(name, unit) for unit in parts])
    # interleaved, so that each task's first (longest) units start early
    work = [part for group in itertools.zip_longest(*work) for part in group if part]
    common = (args.quick, seeds, args.out, args.threads)
    if args.jobs == 1:
        done = [run_part(TASKS[name], *common, unit) for name, unit in work]
    else:
        _log(f"\n{len(work)} trainings in {args.jobs} processes of {args.threads} thread(s)")
        spawn = multiprocessing.get_context("spawn")  # no fork of a process with torch threads
        with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            futures = [pool.submit(run_part, TASKS[name], *common, unit) for name, unit in work]
            done = [f.result() for f in futures]
    # the trainings' raw results first: a failure in a task's collect must not lose them
    raw = args.out / f"{stem}-trainings.json"
    raw.write_text(json.dumps(_finite([[n, u, d] for (n, u), d in zip(work, done)]), indent=1))
    tasks = {}
    for name in args.tasks:
        mine = [(unit, d) for (n, unit), d in zip(work, done, strict=True) if n == name]
        task = importlib.import_module(TASKS[name])
        if mine[0][0] is None:
            result = mine[0][1][0]
        else:
            runs = {unit: r for unit, (r, _, _) in mine}
            result = task.collect(args.quick, seeds, runs, args.out, _log)
        # the task's training processes' seconds, summed (they may have run side by side)
        result["elapsed_s"] = round(sum(wall for _, (_, wall, _) in mine), 1)
        result["cpu_s"] = round(sum(cpu for _, (_, _, cpu) in mine), 1)
        result["plots"] = [_rename_plot(args.out, plot, stem) for plot in result["plots"]]
        tasks[name] = result
        _log(
            f"{name}: {result['cpu_s']:.0f} s CPU, {result['elapsed_s']:.0f} s wall in its "
            f"trainings ({args.threads} thread(s)); plots: {', '.join(result['plots'])}"
        )
    meta["elapsed_s"] = round(clock(), 1)
    meta["cpu_s"] = round(clock.cpu(), 1)
    meta["loadavg_end"] = loadavg()
    path = args.out / f"{stem}.json"
    payload = {"meta": meta, "tasks": tasks}
    path.write_text(json.dumps(_finite(payload), indent=1, allow_nan=False) + "\n")
    raw.unlink()
    _log(f"\nwrote {path} ({meta['elapsed_s']:.0f} s in total, {meta['cpu_s']:.0f} s of CPU)")
    return {**payload, "path": str(path)}


def _rename_plot(out: Path, plot: str, stem: str) -> str:
    """Move a task's ``quality-<name>.png`` to ``<stem>-<name>.png``; return the new name."""
    name = f"{stem}-{plot.removeprefix('quality-')}"
    (out / plot).replace(out / name)
    return name


def _finite(x):
    """``x`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


if __name__ == "__main__":
    main()
