"""The CNN-F C++ CPU kernels one by one, at the shapes CNNF gives them, in cache and not.

    python -m bench.feedback_kernels [--threads N] [--repeat R]

Each op is called through ``torch.ops.screening_attn`` (no validation, no autograd: the kernel
and the dispatcher) under ``no_grad``, on the (C, H×W) of each CNNF stage that runs it:

* ``N=8``: the inputs are 0.2-0.8 MB, so they stay in cache between calls: the kernel's
  arithmetic;
* ``N=64, cold``: the batch of the benchmarks; before each call a 128 MB buffer is rewritten,
  so the inputs come from memory, as they do in a network (after a convolution's working set).

Medians of ``--repeat`` calls (default 30), milliseconds; ``torch.add`` of two inputs of the
same shape is the yardstick (it reads two and writes one). The times are context for kernel
work; the targets are `make bench`'s ratios.

glibc serves a block of 6 MB or more with a fresh mmap, and after a free of the same size it
does so again: one op called in a loop would page-fault on all its outputs, every call (several
ms at 28x28), which a network in its steady state does not (larger frees have raised glibc's
threshold). So the mmap and trim thresholds are set to 256 MB first (``mallopt``), as the
``MALLOC_MMAP_THRESHOLD_`` environment variable would.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

import screening_attn  # noqa: F401  (loads the ops)

STAGES = ((16, 28), (32, 28), (64, 14))  # (C, H = W) of CNNF's conv stages at ind=0
ETA, EPS = 0.1, 1e-5


def _inputs(n: int, c: int, hw: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=g)
    out = {
        "x": x,
        "h": torch.randn(x.shape, generator=g),
        "bias": torch.randn(c, generator=g) * 0.1,
        "mask": torch.randn(x.shape, generator=g) > 0,
        "pool_h": torch.randn(n, c, hw // 2, hw // 2, generator=g),
        "z": torch.randn(n, c, hw // 2, hw // 2, generator=g),
    }
    ops = torch.ops.screening_attn
    *_, out["argmax"], out["argmin"] = ops.ins_bias_ada_relu_pool2d(
        x, out["bias"], out["h"], out["pool_h"], ETA, EPS, False, 2
    )
    return out


def _calls(t: dict[str, torch.Tensor], hw: int) -> dict[str, object]:
    ops = torch.ops.screening_attn
    x, h, b, m, ph, z = t["x"], t["h"], t["bias"], t["mask"], t["pool_h"], t["z"]
    am, an = t["argmax"], t["argmin"]
    return {
        "ins_bias_ada_relu": lambda: ops.ins_bias_ada_relu(x, b, h, ETA, EPS, False),
        "ins_bias_ada_relu_pool2d": lambda: ops.ins_bias_ada_relu_pool2d(
            x, b, h, ph, ETA, EPS, False, 2
        ),
        "ins_norm_gate": lambda: ops.ins_norm_gate(x, m, EPS, False),
        "ada_unpool_gate": lambda: ops.ada_unpool_gate(z, ph, am, an, m, 2, hw, hw),
        "ada_relu": lambda: ops.ada_relu(x, h, ETA),
        "torch.add": lambda: torch.add(x, h),
    }


def _median_ms(fn, repeat: int, flush: torch.Tensor | None) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        if flush is not None:
            flush.mul_(1.0)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _no_mmap_churn() -> bool:
    """glibc only: serve large blocks from the heap and keep freed ones (see the module doc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return all(libc.mallopt(k, 256 * 2**20) == 1 for k in (m_trim_threshold, m_mmap_threshold))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    flush = torch.empty(32 * 2**20)  # 128 MB, four times the L3 here
    heap = "heap" if _no_mmap_churn() else "default malloc"
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} thread(s), {heap}; ms, median of {args.repeat}")
    with torch.no_grad():
        for n, cold in ((8, False), (64, True)):
            for c, hw in STAGES:
                calls = _calls(_inputs(n, c, hw), hw)
                row = {
                    k: _median_ms(f, args.repeat, flush if cold else None) for k, f in calls.items()
                }
                label = f"N={n}{', cold' if cold else ''} C={c} {hw}x{hw}"
                print(f"{label:22s}" + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
