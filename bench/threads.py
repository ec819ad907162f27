"""Thread scaling: each family's time at 1 and at 2 threads, measured side by side in one run.

Every case of ``CASES[preset]`` runs in two worker processes (``python -m bench.threads
--worker``), one per thread count, each started with ``OMP_NUM_THREADS`` and
``torch.set_num_threads`` at that count. A worker sets the case up (with its check against the
reference) and warms it, then times one call per request; the parent alternates its requests
between the two workers, so both thread counts see the same machine load, and only one of them
runs at a time. The speed-up is the median time at 1 thread over the median at 2.

A record of the result JSON's ``threads``: ``family``, ``op``, ``provider``, ``mode``,
``shape``, ``label``, ``status`` (``ok``, ``skipped``, ``failed``) and ``reason``, and when
timed, ``times`` (per thread count: ``median_s``, ``q1_s``, ``q3_s``, ``n``) and ``speedup``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from bench import _cases
from bench._common import fmt_time
from bench.machine import ROOT, loadavg

THREADS = (1, 2)


@dataclass(frozen=True)
class ThreadCase:
    label: str  # what the issue and the targets call it
    case: _cases.Case
    target: float  # the speed-up to reach, time(1 thread) / time(2 threads)


def _case(family: str, op: str, shape: dict) -> _cases.Case:
    return _cases.Case(family, op, "cpu", "fwd+bwd", tuple(shape.items()))


def _preset_cases(attention_t: tuple[int, int], cnnf_n: int, rnn_t: int) -> list[ThreadCase]:
    """Attention at T0 with B·H = 8 and at T1 with B·H = 1, CNNF.run_cycles at batch N, the
    RNNs at T steps: the issue's families (#15) and speed-up targets."""
    att = {**_cases.ATTENTION_BASE}
    rnn = {**_cases.RNN_BASE, "T": rnn_t}
    t0, t1 = attention_t
    return [
        ThreadCase(
            f"screened attention T={t0} B·H=8",
            _case("attention", "screened_attention", {**att, "T": t0}),
            1.6,
        ),
        ThreadCase(
            f"screened attention T={t1} B·H=1",
            _case("attention", "screened_attention", {**att, "H": 1, "T": t1}),
            1.5,
        ),
        ThreadCase(
            f"CNNF.run_cycles N={cnnf_n}",
            _case("feedback", "run_cycles", {"N": cnnf_n, **_cases.FEEDBACK_MODEL}),
            1.6,
        ),
        ThreadCase(f"RelRNN T={rnn_t} B=16", _case("rnn", "rel_rnn", rnn), 1.3),
        ThreadCase(f"RelLSTM T={rnn_t} B=16", _case("rnn", "rel_lstm", rnn), 1.3),
    ]


# fwd+bwd, one thread against two. The quick preset keeps the shapes small (seconds in all).
CASES = {
    "quick": _preset_cases((1024, 4096), 8, 100),
    "default": _preset_cases((8192, 65536), 64, 1000),
    "full": _preset_cases((8192, 65536), 64, 1000),
}
# Timing budget per thread count (seconds of calls, at least MIN_REPS, at most MAX_REPS).
MIN_TIME = {"quick": 0.3, "default": 3.0, "full": 6.0}
MIN_REPS, MAX_REPS = 3, 50


class _Worker:
    """A process running one case at a fixed thread count: ``time()`` times one call there."""

    def __init__(self, case: _cases.Case, threads: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        spec = json.dumps(
            {
                "family": case.family,
                "op": case.op,
                "provider": case.provider,
                "mode": case.mode,
                "shape": case.kwargs,
                "threads": threads,
            }
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.threads", "--worker", spec],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = self._read()  # {"threads": n} or {"status": ..., "reason": ...}

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            return {"status": "failed", "reason": f"worker exited ({self.proc.wait()})"}
        return json.loads(line)

    def time(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "seconds" not in reply:
            raise RuntimeError(reply.get("reason", "worker failed"))
        return float(reply["seconds"])

    def close(self) -> None:
        if self.proc.stdin is not None and self.proc.poll() is None:
            self.proc.stdin.close()
        self.proc.wait()


def measure(
    tc: ThreadCase, min_time: float, min_reps: int = MIN_REPS, max_reps: int = MAX_REPS
) -> dict:
    """The record of one case: its median time at each thread count, alternating calls."""
    case = tc.case
    rec = {
        "family": case.family,
        "op": case.op,
        "provider": case.provider,
        "mode": case.mode,
        "shape": case.kwargs,
        "label": tc.label,
        "target": tc.target,
        "status": "ok",
        "reason": None,
        "loadavg": loadavg(),  # at the start: the cores other work already occupies
    }
    workers: list[_Worker] = []
    try:
        for n in THREADS:  # one at a time: each setup (and check) gets the machine alone
            workers.append(_Worker(case, n))
            if "status" in workers[-1].ready:
                rec.update(workers[-1].ready)
                return rec
            if workers[-1].ready["threads"] != n:
                rec.update(
                    status="failed",
                    reason=f"worker ran {workers[-1].ready['threads']} threads, asked for {n}",
                )
                return rec
        samples: dict[int, list[float]] = {n: [] for n in THREADS}
        while True:
            for n, w in zip(THREADS, workers):
                samples[n].append(w.time())
            reps = len(samples[THREADS[0]])
            enough = all(sum(s) >= min_time for s in samples.values())
            if reps >= max_reps or (reps >= min_reps and enough):
                break
    except RuntimeError as exc:
        rec.update(status="failed", reason=f"while timing: {exc}")
        return rec
    finally:
        for w in workers:
            w.close()
    rec["times"] = {}
    for n, s in samples.items():
        q1, median, q3 = statistics.quantiles(s, n=4, method="inclusive")
        rec["times"][str(n)] = {"median_s": median, "q1_s": q1, "q3_s": q3, "n": len(s)}
    rec["speedup"] = rec["times"]["1"]["median_s"] / rec["times"]["2"]["median_s"]
    return rec


def run_threads(preset: str, families: list[str]) -> list[dict]:
    """The records of ``preset``'s thread cases of ``families``, with a progress line."""
    chosen = [tc for tc in CASES[preset] if tc.case.family in families]
    out = []
    for i, tc in enumerate(chosen):
        sys.stderr.write(f"[threads {i + 1}/{len(chosen)}] {tc.label}: 1 and 2 threads\n")
        sys.stderr.flush()
        out.append(measure(tc, MIN_TIME[preset]))
    return out


def busy(records: list[dict], cores: int) -> float | None:
    """The highest 1-minute load average at the start of a case if it left no core free for a
    second thread (>= cores - 0.5), else None."""
    loads = [r["loadavg"][0] for r in records if r.get("loadavg")]
    worst = max(loads, default=0.0)
    return worst if worst >= cores - 0.5 else None


def print_threads(records: list[dict], out=sys.stdout) -> None:
    if not records:
        return
    print("\n== 1 -> 2 threads: fwd+bwd, cpu, median time per call ==", file=out)
    rows = [("case", "1 thread", "2 threads", "speed-up", "target")]
    for r in records:
        if r["status"] != "ok":
            rows.append((r["label"], r["status"].upper(), r["reason"] or "", "", ""))
            continue
        t = r["times"]
        rows.append(
            (
                r["label"],
                fmt_time(t["1"]["median_s"]),
                fmt_time(t["2"]["median_s"]),
                f"{r['speedup']:.2f}x",
                f">= {r['target']:g}x",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  " + "  ".join(cells).rstrip(), file=out)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = busy(records, cores or 1)
    if load is not None:
        print(
            f"  WARNING: load average {load} on {cores} cores: other work holds the cores a "
            "second thread needs, and every barrier waits for a descheduled thread; these "
            "speed-ups measure that contention, not the kernels",
            file=out,
        )


def _worker(spec: dict) -> int:
    """The worker's loop: set the case up, report, then one timed call per "run" line."""
    import torch

    from bench._common import CheckFailed, Unavailable
    from bench.run import MODULES

    torch.set_num_threads(spec["threads"])
    # replies only on stdout: anything the setup prints goes to stderr
    channel, sys.stdout = sys.stdout, sys.stderr

    def reply(**kw) -> None:
        channel.write(json.dumps(kw) + "\n")
        channel.flush()

    try:
        fn = MODULES[spec["family"]].SETUPS[spec["op"]](
            spec["provider"], spec["mode"], **spec["shape"]
        )
        fn()  # warm-up
    except Unavailable as exc:
        reply(status="skipped", reason=str(exc))
        return 0
    except CheckFailed as exc:
        reply(status="failed", reason=f"check against the reference: {exc}")
        return 0
    except Exception as exc:
        reply(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        return 0
    reply(threads=torch.get_num_threads())
    for line in sys.stdin:
        if line.strip() != "run":
            break
        try:
            t0 = time.perf_counter()
            fn()
            reply(seconds=time.perf_counter() - t0)
        except Exception as exc:
            reply(status="failed", reason=f"{type(exc).__name__}: {exc}")
            return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker(json.loads(sys.argv[2])))
    sys.exit("usage: python -m bench.threads --worker SPEC (run by bench.report)")
