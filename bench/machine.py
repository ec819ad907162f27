"""Facts about the machine and the code a benchmark run measured: CPU, cores, load, versions,
the extension's build, git SHA, and the machine's own matmul throughput (the yardstick of the
tables' ``%mm`` column). Everything lands in the result JSON's ``meta``."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from bench._common import measure

ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peak_rss_gb() -> float | None:
    """Peak resident memory of this process so far, in GB."""
    try:
        import resource
    except ImportError:
        return None
    scale = 1e9 if sys.platform == "darwin" else 1e6  # bytes on macOS, KiB elsewhere
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 2)


def machine_info(threads: int) -> dict:
    """The run's ``meta``: platform, CPU, cores, threads, versions, build, git state, date."""
    import screening_attn

    sha = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    build = screening_attn.build_info()
    build.pop("parallel_info", None)
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        # the vector ISA ATen dispatches to: on 2026-12-04 this VM had AVX2 only, and bfloat16
        # CNN-F ran 7.9x its float32 time (0.68x in an earlier run, ISA not recorded then)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "threads": threads,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "screening_attn": screening_attn.__version__,
        "screening_attn_build": build,
        "git_sha": sha,
        "git_dirty": dirty,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": loadavg(),
    }


def machine_slug(info: dict) -> str:
    """``amd-epyc-2c``: the CPU model and core count, the prefix of the result files' names."""
    cpu = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", "", info["cpu"].lower())
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu).strip("-") or "machine"
    return f"{cpu}-{info['cores']}c"


def matmul_gflops() -> float:
    """Throughput of a 1024x1024 fp32 matmul at the set threads, from its fastest call (the
    machine's capability; other load on the machine only ever slows calls down)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = measure(lambda: a @ b, min_time=0.5, max_reps=200)
    return 2 * 1024**3 / min(t.times) / 1e9
