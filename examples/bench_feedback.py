"""Benchmark of the CNN-F fused kernels on CPU: fp32, one thread, CNNF at batch 64.

Prints ratios measured in the same run (the timings of each pair are interleaved):

Times are the best of ``--repeats`` interleaved runs.

1. the fused InsNorm -> Bias -> AdaReLU op against its eager composition (``backend="reference"``,
   what the layers run unfused), forward and forward + backward, at CNNF's largest stage
   (64 x 32 x 28 x 28), gated;
2. one ``feedback_step`` (no grad) against the same convolution and linear calls alone;
3. ``run_cycles`` forward + backward (to the input and the weights, as adversarial training
   does) against the same convolution and linear calls alone, forward + backward.

"The same calls" are recorded while the model runs (a ``TorchFunctionMode`` logs every
conv2d, conv_transpose2d, linear and matmul with its arguments) and replayed on the same
tensors, so the baseline does exactly the model's convolution work and nothing else.

Page faults: glibc's malloc returns large freed blocks to the OS and every fresh 6 MB
activation then costs ~1500 page faults (several ms on a VM, in the model's ops and in the
baseline's convolutions alike). ``--steady-malloc`` keeps freed memory in the process
(``mallopt``: no trimming, no mmap), as jemalloc / tcmalloc or a long-running process would.

Usage::

    OMP_NUM_THREADS=1 python examples/bench_feedback.py [--batch 64] [--repeats 15]
                                                        [--steady-malloc]
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import time

import torch
from torch.overrides import TorchFunctionMode

from screening_attn.feedback import CNNF, feedback_step, functional, reference

_GEMM_NAMES = {"conv2d", "conv_transpose2d", "linear", "matmul", "__matmul__"}


class _RecordGemms(TorchFunctionMode):
    """Logs the convolution / linear calls (function, args, kwargs) made inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _GEMM_NAMES:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _replay(calls: list[tuple]) -> list[torch.Tensor]:
    return [func(*args, **kwargs) for func, args, kwargs in calls]


def _with_grad_inputs(calls: list[tuple]) -> list[tuple]:
    """The recorded calls on leaf copies of their activations (weights stay the parameters), so
    a backward computes the input and the weight gradients, as in the model."""
    out = []
    for func, args, kwargs in calls:
        first = args[0].detach().requires_grad_()
        out.append((func, (first, *args[1:]), kwargs))
    return out


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up (allocator, kernels' first call)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _paired(a, b, repeats: int) -> tuple[float, float]:
    """Best times (ms) of a and b over `repeats` interleaved runs: drift hits both alike, and
    on a shared machine the fastest run is the one least disturbed by other processes."""
    ta, tb = [], []
    for _ in range(repeats):
        ta += _time(a, 1)
        tb += _time(b, 1)
    return min(ta) * 1e3, min(tb) * 1e3


def _steady_malloc() -> None:
    """glibc: never trim the heap nor mmap large blocks, so freed memory is reused."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise RuntimeError("mallopt failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steady-malloc", action="store_true", help="see the module doc")
    args = parser.parse_args()
    if args.steady_malloc:
        _steady_malloc()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, r = args.batch, args.repeats
    cpu = platform.processor() or platform.machine()
    malloc = "steady (mallopt)" if args.steady_malloc else "default"
    print(f"torch {torch.__version__}, {cpu}, 1 thread, float32, batch {n}, malloc {malloc}")

    # 1. fused norm-bias-gate vs the eager composition, CNNF's stage 3 shape
    x = torch.randn(n, 32, 28, 28)
    bias, hidden = torch.randn(32), torch.randn(n, 32, 28, 28)

    def fused():
        return functional.ins_bias_ada_relu(x, bias, hidden, 0.1, backend="cpu")

    def eager():
        return reference.ada_relu(reference.ins_norm(x) + bias.view(1, -1, 1, 1), hidden, 0.1)

    y_f, _ = fused()
    y_e, _ = eager()
    torch.testing.assert_close(y_f, y_e, rtol=1e-5, atol=1e-4)
    t_fused, t_eager = _paired(fused, eager, r)

    xg, bg, hg = (t.clone().requires_grad_() for t in (x, bias, hidden))
    grad = torch.randn_like(x)

    def fused_bwd():
        y, _ = functional.ins_bias_ada_relu(xg, bg, hg, 0.1, backend="cpu")
        torch.autograd.grad(y, (xg, bg, hg), grad)

    def eager_bwd():
        y, _ = reference.ada_relu(reference.ins_norm(xg) + bg.view(1, -1, 1, 1), hg, 0.1)
        torch.autograd.grad(y, (xg, bg, hg), grad)

    t_fused_b, t_eager_b = _paired(fused_bwd, eager_bwd, r)

    # 2. one feedback_step vs its convolutions and linear maps alone
    model = CNNF(10, backend="cpu")
    image = torch.randn(n, 1, 28, 28)
    with torch.no_grad():
        model.reset()
        out, ff = model.forward_capture(image, model.ff_unit)
        feedback_step(model, out, ff)  # sets every gate (the steady state of the cycles)
        rec = _RecordGemms()
        with rec:
            feedback_step(model, out, ff)
        calls = rec.calls
        t_step, t_gemm = _paired(lambda: feedback_step(model, out, ff), lambda: _replay(calls), r)
        ref_model = CNNF(10, backend="reference")
        ref_model.load_state_dict(model.state_dict())
        ref_model.reset()
        out_r, ff_r = ref_model.forward_capture(image, ref_model.ff_unit)
        feedback_step(ref_model, out_r, ff_r)
        t_step_ref = min(_time(lambda: feedback_step(ref_model, out_r, ff_r), 3)) * 1e3

    # 3. run_cycles forward + backward vs its convolutions and linear maps, forward + backward
    img = image.clone().requires_grad_()

    def cycles_fwd_bwd():
        model.zero_grad(set_to_none=True)
        logits = model.run_cycles(img)
        torch.autograd.grad(logits.logsumexp(1).sum(), [img, *model.parameters()])

    rec = _RecordGemms()
    with rec:
        model.run_cycles(img)
    grad_calls = _with_grad_inputs(rec.calls)
    outs = _replay(grad_calls)
    grads = [torch.randn_like(o) for o in outs]
    leaves = [c[1][0] for c in grad_calls] + list(model.parameters())

    def gemms_fwd_bwd():
        outs = _replay(grad_calls)
        torch.autograd.grad(outs, leaves, grads, allow_unused=True)

    t_cyc, t_cyc_gemm = _paired(cycles_fwd_bwd, gemms_fwd_bwd, max(3, r // 3))

    print(f"\nfused InsNorm-Bias-AdaReLU, {n}x32x28x28, gated (target >= 2x faster than eager)")
    print(
        f"  forward        fused {t_fused:8.2f} ms   eager {t_eager:8.2f} ms   "
        f"speed-up {t_eager / t_fused:5.1f}x"
    )
    print(
        f"  fwd + bwd      fused {t_fused_b:8.2f} ms   eager {t_eager_b:8.2f} ms   "
        f"speed-up {t_eager_b / t_fused_b:5.1f}x"
    )
    print(
        f"\nCNNF batch {n}: time / time of its {len(calls)} conv and linear calls alone "
        "(target <= 1.2)"
    )
    print(
        f"  feedback_step           {t_step:8.2f} ms   convs+linears {t_gemm:8.2f} ms   "
        f"ratio {t_step / t_gemm:5.2f}   (backend='reference': {t_step_ref:.1f} ms)"
    )
    print(
        f"  run_cycles fwd+bwd      {t_cyc:8.2f} ms   convs+linears {t_cyc_gemm:8.2f} ms   "
        f"ratio {t_cyc / t_cyc_gemm:5.2f}   ({model.cycles} cycles, {len(grad_calls)} calls)"
    )


if __name__ == "__main__":
    main()
