"""What every benchmark family shares: the two ways a case can fail to be timed, the output
check, and the timing loop."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


class Unavailable(Exception):
    """The provider can't run here (no CUDA, backend not built or not implemented yet...).
    The report skips the case and prints the reason."""


class CheckFailed(Exception):
    """The provider's output disagrees with the reference; the case is reported as FAILED."""


def check_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float):
    """Raise ``CheckFailed`` naming ``name`` and the worst error unless ``actual`` matches."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    if actual.shape != expected.shape:
        raise CheckFailed(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bad.any() or not torch.isfinite(actual).all():
        raise CheckFailed(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements off "
            f"(max abs error {err.max().item():.3g}, rtol={rtol}, atol={atol})"
        )


def check_equal(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    if not torch.equal(actual.detach().cpu(), expected.detach().cpu()):
        raise CheckFailed(f"{name}: not equal to the reference")


def clear_grads(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None:
            t.grad = None


def sync_for(device: torch.device | str) -> Callable[[], None]:
    """What to call before reading the clock: a CUDA synchronize for GPU work, else nothing."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@dataclass
class Timing:
    """Seconds per call: the median and the quartiles of ``n`` timed calls."""

    median: float
    q1: float
    q3: float
    n: int
    times: list[float]

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0 with fewer than 2 samples)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, q2, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q2, q1, q3


SLOW_CALL = 1.0  # seconds: a call this long is timed at most twice
VERY_SLOW_CALL = 4.0  # seconds: ... and this long, once


class _Timer:
    """The samples of one callable, and whether it has enough."""

    def __init__(self, fn, sync, min_time, max_reps, warmup_time):
        self.fn, self.sync = fn, sync
        self.min_time, self.max_reps, self.warmup_time = min_time, max_reps, warmup_time
        self.times: list[float] = []
        self.need = 3
        self.first: float | None = None
        prior = getattr(fn, "check_call_s", None)
        if prior is not None and prior >= VERY_SLOW_CALL:
            self.first, self.times, self.need = prior, [prior], 1

    def once(self) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.fn()
        self.sync()
        return time.perf_counter() - t0

    def start(self) -> None:
        if self.first is not None:
            return
        self.first = self.once()
        if self.first >= self.warmup_time:
            self.times.append(self.first)
        else:
            warm, n_warm = self.first, 1
            while warm < self.warmup_time and n_warm < 50:
                warm += self.once()
                n_warm += 1
        if self.first >= VERY_SLOW_CALL:
            self.need = 1
        elif self.first >= SLOW_CALL:
            self.need = 2

    @property
    def done(self) -> bool:
        n = len(self.times)
        if n >= self.max_reps:
            return True
        if n < self.need:
            return False
        return self.first >= SLOW_CALL or sum(self.times) >= self.min_time

    def step(self) -> None:
        self.times.append(self.once())

    def result(self) -> Timing:
        median, q1, q3 = _quartiles(self.times)
        return Timing(median, q1, q3, len(self.times), list(self.times))


def measure_group(
    fns: dict[str, Callable[[], object]],
    *,
    min_time: float = 0.5,
    max_reps: int = 100,
    warmup_time: float = 0.1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, Timing]:
    """Time several callables *interleaved*: one call of each in turn, round after round, so
    that load from elsewhere and thermal throttling hit them alike and their ratios hold.

    Each gets calls until ``min_time`` seconds and at least 3 calls, or ``max_reps`` calls.
    The factory's reference check already ran the code once, so a first call of at least
    ``warmup_time`` counts as a sample; faster ones are first repeated for ``warmup_time``
    untimed. So that a default run stays within minutes, a call over ``SLOW_CALL`` is timed
    twice and one over ``VERY_SLOW_CALL`` once; if ``fn.check_call_s`` (the time of the check's
    own call on the same inputs and code path) is over ``VERY_SLOW_CALL``, that is the one
    sample and ``fn`` is not called again. The garbage collector is off while timing (autograd
    graphs are freed by refcount).
    """
    timers = {name: _Timer(fn, sync, min_time, max_reps, warmup_time) for name, fn in fns.items()}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for t in timers.values():
            t.start()
        while True:
            pending = [t for t in timers.values() if not t.done]
            if not pending:
                break
            for t in pending:
                t.step()
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: t.result() for name, t in timers.items()}


def measure(fn: Callable[[], object], **kwargs) -> Timing:
    """``measure_group`` of one callable."""
    return measure_group({"fn": fn}, **kwargs)["fn"]


def fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def run_pytest_benchmark(benchmark, case, setup: Callable[..., Callable[[], object]]) -> None:
    """Body of the pytest-benchmark tests: skip an unavailable provider, fail a wrong one,
    else time it with a number of rounds that fits ~0.5 s."""
    import pytest

    try:
        fn = setup(case.provider, case.mode, **case.kwargs)
    except Unavailable as exc:
        pytest.skip(str(exc))
    sync = sync_for(case.kwargs.get("device", "cpu"))

    def timed():
        fn()
        sync()

    t0 = time.perf_counter()
    timed()  # warm-up, and a guess of how many rounds fit
    one = time.perf_counter() - t0
    rounds = max(1, min(20, int(0.5 / max(one, 1e-9))))
    benchmark.group = f"{case.op}-{case.shape_id}-{case.mode}"
    benchmark.extra_info.update(provider=case.provider, mode=case.mode, **case.kwargs)
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
