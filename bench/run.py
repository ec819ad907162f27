"""Scheduling a sweep: the cases of one timing group (an op, shape and mode; the RNNs' two T
together) are set up and checked one by one, then timed together, interleaved (``measure_group``
in ``_common.py``), so the ratios between them are measured side by side. ``run_cases`` returns
one record per case, the ``results`` of the result JSON (bench/README.md lists their fields)."""

from __future__ import annotations

import gc
import sys
import time

from bench import _cases, bench_attention, bench_decode, bench_feedback, bench_rnn
from bench._common import CheckFailed, Unavailable, measure_group, sync_for
from bench.machine import peak_rss_gb

MODULES = {
    "attention": bench_attention,
    "rnn": bench_rnn,
    "feedback": bench_feedback,
    "decode": bench_decode,
}
FLOOR_PROVIDERS = ("matmul_floor", "conv_floor")


class Progress:
    """One status line on stderr (rewritten in place on a terminal)."""

    def __init__(self, total: int) -> None:
        self.total, self.start = total, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def show(self, i: int, text: str) -> None:
        elapsed = time.perf_counter() - self.start
        width = 24
        filled = int(width * i / max(self.total, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {i}/{self.total} "
            f"{int(elapsed // 60):02d}:{int(elapsed % 60):02d} {text}"
        )
        if self.tty:
            sys.stderr.write("\r" + line[:118].ljust(118))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _record(case: _cases.Case) -> dict:
    return {
        "family": case.family,
        "op": case.op,
        "provider": case.provider,
        "mode": case.mode,
        "shape": case.kwargs,
        "status": "ok",
        "reason": None,
    }


def setup_case(case: _cases.Case, rec: dict):
    """The case's callable after its reference check, or None with ``rec`` saying why."""
    t0 = time.perf_counter()
    try:
        fn = MODULES[case.family].SETUPS[case.op](case.provider, case.mode, **case.kwargs)
    except Unavailable as exc:
        rec.update(status="skipped", reason=str(exc))
        return None
    except CheckFailed as exc:
        rec.update(status="failed", reason=f"check against the reference: {exc}")
        return None
    except Exception as exc:  # the report goes on; the case says what happened
        rec.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        return None
    rec["setup_s"] = round(time.perf_counter() - t0, 3)
    if case.provider in FLOOR_PROVIDERS:
        rec["check"] = "n/a (not the op)"
    elif case.family == "feedback" and case.provider == "reference":
        rec["check"] = "n/a (is the reference)"
    else:
        rec["check"] = getattr(fn, "check", "passed")
    return fn


def run_group(group: list[_cases.Case], timing: dict, progress: Progress, done: int) -> list[dict]:
    """Set up (and check) every case of one timing group, then time them interleaved."""
    records, fns = [], {}
    for i, case in enumerate(group):
        progress.show(done + i, f"{case.op} {case.shape_id} {case.mode}: check {case.provider}")
        rec = _record(case)
        fn = setup_case(case, rec)
        records.append(rec)
        if fn is not None:
            fns[i] = fn
    head = group[0]
    progress.show(done + len(group), f"{head.op} {head.shape_id} {head.mode}: timing")
    try:
        timings = measure_group(fns, sync=sync_for(head.kwargs.get("device", "cpu")), **timing)
    except Exception as exc:  # a provider that passed its check but raises later
        timings = {}
        for i in fns:
            records[i].update(status="failed", reason=f"while timing: {type(exc).__name__}: {exc}")
    for i, fn in fns.items():  # what a factory reports about its case after timing (decode: memory)
        if hasattr(fn, "record"):
            records[i].update(fn.record())
    fns.clear()
    gc.collect()
    peak = peak_rss_gb()
    for rec in records:
        rec["peak_rss_gb"] = peak  # of the process so far: to spot a case that blows memory up
    for i, t in timings.items():
        case, rec = group[i], records[i]
        rec.update(median_s=t.median, q1_s=t.q1, q3_s=t.q3, spread=t.spread, n=t.n, times_s=t.times)
        flop = MODULES[case.family].flops(case.op, case.provider, case.mode, case.kwargs)
        if flop is not None:
            rec["flop"] = flop
            rec["gflops"] = flop / t.median / 1e9
    return records


def groups(cases: list[_cases.Case]) -> list[list[_cases.Case]]:
    """Consecutive cases of one timing group (``Case.timing_group``)."""
    out: list[list[_cases.Case]] = []
    for c in cases:
        g = out[-1][0] if out else None
        if g is not None and g.timing_group == c.timing_group:
            out[-1].append(c)
        else:
            out.append([c])
    return out


def run_cases(cases: list[_cases.Case], preset: str) -> list[dict]:
    """Every case's record, group by group, with a progress line on stderr."""
    progress = Progress(len(cases))
    results: list[dict] = []
    for group in groups(cases):
        timing = _cases.timing(group[0], preset)
        results.extend(run_group(group, timing, progress, len(results)))
    progress.show(len(cases), "done")
    progress.done()
    return results
