"""What the quality tasks share: seeding, machine metadata, timing, progress and plot saving."""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import math
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

Log = Callable[[str], None]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's and torch's global generators; return a fresh generator for the data."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; both NaN if a value is not
    finite, e.g. the loss of a diverged run)."""
    xs = list(values)
    if not all(math.isfinite(x) for x in xs):
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its children that have ended."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Stopwatch:
    """Wall-clock seconds since construction; ``cpu()``: the CPU seconds (all threads, and
    worker processes once they have ended) since then, which other jobs on a shared machine
    inflate far less than the wall clock."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.cpu_start = _cpu_seconds()

    def __call__(self) -> float:
        return time.perf_counter() - self.start

    def cpu(self) -> float:
        return _cpu_seconds() - self.cpu_start


def _print(line: str) -> None:
    print(line, flush=True)


def run_part(module: str, quick: bool, seeds: list[int], out: Path, threads: int, unit):
    """Run one part of the task of ``module`` with ``threads`` torch threads, printing its
    progress: the training ``unit`` of its ``units`` (``run_unit``), or with ``unit=None`` the
    whole task (``run``, for a task without units). Returns ``(result, wall s, CPU s)`` of the
    process that ran it. Here, not in ``__main__``, so that worker processes can import it."""
    torch.set_num_threads(threads)
    clock = Stopwatch()
    task = importlib.import_module(module)
    if unit is None:
        result = task.run(quick, seeds, out, _print)
    else:
        result = task.run_unit(quick, unit, _print)
    return result, clock(), clock.cpu()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    """Where and with what the benchmark ran (the JSON's ``meta``)."""
    import screening_attn

    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "matplotlib": _version("matplotlib"),
        "screening_attn": screening_attn.__version__,
        "extension_loaded": bool(screening_attn.build_info().get("loaded")),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": loadavg(),
    }


def machine_slug(info: dict) -> str:
    """A file-name-safe name of the machine, e.g. ``amd-epyc-2c`` (as ``bench.report``)."""
    cpu = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", "", info["cpu"].lower())
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu).strip("-") or "machine"
    return f"{cpu}-{info['cores']}c"


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: Path, name: str) -> str:
    """Write ``fig`` to ``out_dir/name``, close it, and return the file name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    pyplot().close(fig)
    return name


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A GitHub table of ``rows`` with ``columns`` given as (key, header)."""
    lines = [
        "| " + " | ".join(h for _, h in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines)
