"""Long sequences on the C++ CPU kernels: peak memory and time, each case in a fresh process.

    python -m bench.long_sequences [--quick] [--threads N]

* screened attention forward at T = 1,000,000 (B = H = 1, D = 64, float32, ν = 128, ρ = 64),
  with and without ``return_state``: the peak memory increase against the bytes of q, k, v and
  out (docs/attention.md: O(T·D) memory, nothing T×T);
* RelRNN forward + backward at T = 12.5k ... 100k: the peak increase at each T, its growth
  (linear: doubling T at most doubles it, plus noise) and the bytes per step against what the
  saved activations and the backward's buffers need (``rnn_step_bytes``);
* the reference RelRNN (a Python loop under autograd) at T = 500, 1k, 2k: linear too (its
  increments double; the peak itself has a negative offset, memory the warm-up freed).

How peak memory is measured (``_Peak``): in a subprocess, after importing torch and the package
and after a warm-up run of the same op on a short sequence (thread pool, allocator, lazy
initialisation), the kernel's high-water mark of resident memory (VmHWM in /proc/self/status) is
reset to the current resident size by writing 5 to /proc/self/clear_refs, and that size is the
baseline. Then the inputs are allocated (q, k, v or x and the module) and the op runs; the peak is
VmHWM afterwards. The increase (peak - baseline) therefore counts the inputs, the outputs, the
state, everything saved for backward and every temporary, from any allocator. Where clear_refs is
not writable, VmHWM keeps the warm-up's peak, so the increase (VmHWM after - VmRSS before) can
only overstate the op's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ATTENTION = {"T": 1_000_000, "D": 64, "window": 128, "relevant": 64}
RNN = {"B": 2, "I": 4, "Hd": 16, "window": 8, "relevant": 4}
RNN_STEPS = (12_500, 25_000, 50_000, 100_000)
REFERENCE_STEPS = (500, 1_000, 2_000)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class _Peak:
    """Peak resident memory increase over the resident size at construction."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            self.reset = True
        except OSError:
            self.reset = False
        self.base = _status_bytes("VmRSS")

    def increase(self) -> int:
        return _status_bytes("VmHWM") - self.base


# ---- children (run in a fresh process) ----------------------------------------------------------


def _child_attention(T: int, D: int, window: int, relevant: int, return_state: bool) -> dict:
    import torch

    import screening_attn

    def run(T: int):
        q, k, v = (torch.randn(1, 1, T, D) for _ in range(3))
        t0 = time.perf_counter()
        res = screening_attn.screened_attention(
            q, k, v, window, relevant, return_state=return_state, backend="cpu"
        )
        return (q, k, v, res), time.perf_counter() - t0

    run(4 * window)  # warm-up
    peak = _Peak()
    (q, k, v, res), seconds = run(T)
    out = res[0] if return_state else res
    increase = peak.increase()
    qkvo = sum(x.numel() * x.element_size() for x in (q, k, v, out))
    state = 0
    if return_state:
        st = res[1]
        state = sum(
            x.numel() * x.element_size()
            for x in (st.relevant_index, st.relevant_score, st.relevancy, st.span)
        )
    return {"peak_increase": increase, "qkvo_bytes": qkvo, "state_bytes": state,
            "seconds": seconds, "reset": peak.reset}  # fmt: skip


def rnn_step_bytes(B: int, I: int, Hd: int, window: int, relevant: int, T: int) -> dict:
    """Bytes per time step a float32 RelRNN forward + backward through the C++ kernels must
    hold at the backward's peak: the input, the records the forward saves for the backward
    (csrc/rnn_loops.cpp: h, s, uah and e^{2 uah} for the CPU step kernels (B, Hd), the queries
    pq (B, 2Hd), the softmax weights over the w + live candidates, the candidates' positions
    (int64), the relevancy), and the backward's per-step buffers (the dL/dh and dL/duah
    accumulators, dL/dx). The incoming dL/dh of ``h.sum()`` is a stride-0 expansion: nothing
    per step."""
    w = min(window, T)
    live = min(relevant, max(0, T - w))
    f = 4
    saved = B * (I + 6 * Hd + (w + live) + 1) * f + B * live * 8
    backward = B * (2 * Hd + I) * f
    return {"saved": saved, "backward": backward, "total": saved + backward}


def _child_rnn(T: int, B: int, I: int, Hd: int, window: int, relevant: int,
               backend: str) -> dict:  # fmt: skip
    import torch

    from screening_attn.nn import RelRNN

    torch.manual_seed(0)
    m = RelRNN(I, Hd, window, relevant)

    def run(T: int) -> float:
        x = torch.randn(T, B, I, requires_grad=True)
        t0 = time.perf_counter()
        h, _ = m(x, backend=backend)
        h.sum().backward()
        return time.perf_counter() - t0

    run(200)  # warm-up
    m.zero_grad(set_to_none=False)
    peak = _Peak()
    seconds = run(T)
    return {"peak_increase": peak.increase(), "seconds": seconds, "reset": peak.reset}


CHILDREN = {"attention": _child_attention, "rnn": _child_rnn}


def measure(kind: str, threads: int = 1, **kwargs) -> dict:
    """Run one case in a fresh interpreter and return its figures."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "bench.long_sequences", "--child", kind, json.dumps(kwargs)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- report -------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="T = 100k for attention, RNN to 50k")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.child:
        kind, kwargs = args.child
        print(json.dumps(CHILDREN[kind](**json.loads(kwargs))))
        return

    att = dict(ATTENTION, T=100_000 if args.quick else ATTENTION["T"])
    print(f"screened attention, backend='cpu', float32, B=H=1, {att}, {args.threads} thread(s)")
    for return_state in (False, True):
        r = measure("attention", args.threads, return_state=return_state, **att)
        ratio = r["peak_increase"] / r["qkvo_bytes"]
        print(f"  return_state={return_state!s:5}  peak increase {_mib(r['peak_increase'])}"
              f"  q+k+v+out {_mib(r['qkvo_bytes'])}  ratio {ratio:.3f}"
              f"  (state {_mib(r['state_bytes'])})  forward {r['seconds']:.2f} s")  # fmt: skip

    steps = RNN_STEPS[:-1] if args.quick else RNN_STEPS
    print(f"\nRelRNN forward + backward, backend='cpu', float32, {RNN}")
    prev = None
    for T in steps:
        r = measure("rnn", args.threads, T=T, backend="cpu", **RNN)
        need = rnn_step_bytes(T=T, **RNN)
        growth = "" if prev is None else f"  x{r['peak_increase'] / prev:.2f} over T/2"
        print(f"  T={T:>7,}  peak increase {_mib(r['peak_increase'])}"
              f"  {r['peak_increase'] / T:,.0f} B/step (expected {need['total']:,}: saved"
              f" {need['saved']:,} + backward {need['backward']:,}){growth}"
              f"  {r['seconds']:.2f} s")  # fmt: skip
        prev = r["peak_increase"]

    print(f"\nRelRNN forward + backward, backend='reference', float32, {RNN}")
    prev = None
    for T in REFERENCE_STEPS:
        r = measure("rnn", args.threads, T=T, backend="reference", **RNN)
        step = "" if prev is None else f"  {(r['peak_increase'] - prev) / (T / 2):,.0f} B/step"
        print(
            f"  T={T:>7,}  peak increase {_mib(r['peak_increase'])}{step}"
            f" over the last T/2  {r['seconds']:.2f} s"
        )
        prev = r["peak_increase"]


if __name__ == "__main__":
    main()
