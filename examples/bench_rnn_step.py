"""Forward + backward time of RelRNN / RelLSTM on the fused CPU kernels, with ratios measured in
one run:

* against the reference module (``backend="reference"``, pure PyTorch);
* against the fused implementation's own matrix products run alone: the same products, same
  shapes and order, the outputs written to buffers allocated inside the timed region as the
  kernels' are (first-touch page faults included), the inputs prepared beforehand; issued
  from Python (``out=`` variants), so they carry a Python call each, which the C++ loop does
  not; the per-call overhead is measured and printed too;
* the fused time at 4 T against T (linear in T: the target is at most 4.4x).

Usage (one thread by default, as the targets are stated)::

    python examples/bench_rnn_step.py                      # T=1000, B=16, Hd=128, ν=10, ρ=15
    python examples/bench_rnn_step.py --model rnn --repeats 7 --reference-repeats 2

Every timing is the minimum over ``--repeats`` runs (the reference: ``--reference-repeats``),
the runs of all providers interleaved so that a noisy machine hits them alike. Two clocks are
read: wall time, and the CPU time of the process (user + system, page faults included), which
a machine shared with other jobs inflates much less; with one thread both measure the same work.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from screening_attn.nn import RelLSTM, RelRNN


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["rnn", "lstm", "both"], default="both")
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--input", type=int, default=8, help="input features I")
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--relevant", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--reference-repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def fused_run(module, x, g):
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        h, _ = module(x, backend="cpu")
        h.backward(g)

    return run


def reference_run(module, x, g):
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        h, _ = module(x, backend="reference")
        h.backward(g)

    return run


def products_run(kind: str, module, x, g):
    """The matrix products of csrc/rnn.cpp's loops, alone (see the module docstring)."""
    T, B, I = x.shape
    Hd = module.hidden_size
    n = 2 * Hd if kind == "rnn" else 5 * Hd  # per-step product width: [V; Va] or [W_s; Va]
    gen = torch.Generator().manual_seed(1)
    s, h, gK, gpq = (torch.randn(T, B, k, generator=gen) for k in (Hd, Hd, Hd, n))
    h0 = torch.randn(B, Hd, generator=gen)
    x2 = x.detach().reshape(T * B, I)
    with torch.no_grad():
        if kind == "rnn":
            Wx, bias = module.U.weight, module.U.bias  # the input part, up front
            Ws = torch.cat([module.V.weight, module.Va.weight])  # (2Hd, Hd)
        else:
            Wcat = torch.cat(
                [module.Wf.weight, module.Wi.weight, module.Wo.weight, module.Wg.weight]
            )
            Wx, bias = (
                Wcat[:, Hd:].contiguous(),
                torch.cat([module.Wf.bias, module.Wi.bias, module.Wo.bias, module.Wg.bias]),
            )
            Ws = torch.cat([Wcat[:, :Hd], module.Va.weight])  # (5Hd, Hd)
        WsT, Ua, UaT = Ws.t(), module.Ua.weight.detach(), module.Ua.weight.detach().t()
    nx = Wx.shape[0]

    def run():
        with torch.no_grad():
            # forward
            pq = torch.empty(T, B, n)
            uah = torch.empty(T, B, Hd)
            torch.addmm(bias, x2, Wx.t(), out=pq.view(T * B, n)[:, :nx])
            if kind == "rnn":  # step 0: V h0 and Va pre_0 separately
                torch.mm(h0, module.V.weight.t(), out=pq[0, :, :Hd])
                torch.mm(h0, module.Va.weight.t(), out=pq[0, :, Hd:])
            for t in range(1 if kind == "rnn" else 0, T):
                torch.mm(s[t], WsT, out=pq[t])
            for t in range(T):
                torch.mm(h[t], UaT, out=uah[t])
            # backward
            gH = torch.empty(T, B, Hd)
            gs = torch.empty(B, Hd)
            for t in range(T - 1, -1, -1):
                torch.mm(gK[t], Ua, out=gH[t])
                torch.mm(gpq[t], Ws, out=gs)
            gflat = gpq.view(T * B, n)
            torch.mm(gflat[:, :nx], Wx)  # dx
            torch.mm(gflat[:, :nx].t(), x2)  # dW_x
            torch.mm(gflat.t(), s.view(T * B, Hd))  # d[W_s; Va]
            torch.mm(gK.view(T * B, Hd).t(), h.view(T * B, Hd))  # dUa

    calls = 2 + 2 * T + 2 * T + 4 + (2 if kind == "rnn" else 0)
    return run, calls


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def python_call_overhead(calls: int) -> dict:
    """Seconds for `calls` torch.mm(out=) calls on 1x1 matrices: the Python share of
    products_run."""
    a, out = torch.ones(1, 1), torch.empty(1, 1)

    def loop():
        for _ in range(calls):
            torch.mm(a, a, out=out)

    best = dict.fromkeys(CLOCKS, float("inf"))
    for _ in range(5):
        for clock, value in timed(loop).items():
            best[clock] = min(best[clock], value)
    return best


def timed(fn) -> dict:
    start = {clock: read() for clock, read in CLOCKS.items()}
    fn()
    return {clock: read() - start[clock] for clock, read in CLOCKS.items()}


def bench(kind: str, args) -> dict:
    torch.manual_seed(args.seed)
    cls = RelRNN if kind == "rnn" else RelLSTM
    module = cls(args.input, args.hidden, args.window, args.relevant)
    T, B = args.T, args.batch
    x = torch.randn(T, B, args.input, requires_grad=True)
    g = torch.randn(T, B, args.hidden)
    x4 = torch.randn(4 * T, B, args.input, requires_grad=True)
    g4 = torch.randn(4 * T, B, args.hidden)

    # the fused kernels agree with the reference at this shape (float32 tolerances)
    h, state = module(x, backend="cpu")
    h_ref, state_ref = module(x, backend="reference")
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
    agree = (state.relevant_index == state_ref.relevant_index).float().mean().item()

    fused, fused4 = fused_run(module, x, g), fused_run(module, x4, g4)
    products, calls = products_run(kind, module, x, g)
    ref = reference_run(module, x, g)
    runs = {"fused": fused, "fused_4T": fused4, "products": products, "reference": ref}
    for fn in (fused, fused4, products):  # warm-up
        fn()
    best = {clock: dict.fromkeys(runs, float("inf")) for clock in CLOCKS}
    for i in range(args.repeats):
        for name, fn in runs.items():
            if name == "reference" and i >= args.reference_repeats:
                continue
            for clock, value in timed(fn).items():
                best[clock][name] = min(best[clock][name], value)
    for clock, value in python_call_overhead(calls).items():
        best[clock]["python_overhead"] = value
    return best, agree


def report(title: str, r: dict, T: int) -> None:
    rows = [
        ("fused (backend='cpu')", f"{r['fused'] * 1e3:9.1f} ms"),
        ("reference", f"{r['reference'] * 1e3:9.1f} ms"),
        ("matrix products alone", f"{r['products'] * 1e3:9.1f} ms"),
        ("  of which Python calls", f"{r['python_overhead'] * 1e3:9.1f} ms"),
        (f"fused at T={4 * T}", f"{r['fused_4T'] * 1e3:9.1f} ms"),
        ("speed-up vs reference", f"{r['reference'] / r['fused']:9.1f} x"),
        ("fused / products", f"{r['fused'] / r['products']:9.2f} x"),
        (
            "fused / products w/o Python",
            f"{r['fused'] / (r['products'] - r['python_overhead']):9.2f} x",
        ),
        ("time(4T) / time(T)", f"{r['fused_4T'] / r['fused']:9.2f} x"),
    ]
    print(f"\n{title}")
    for label, value in rows:
        print(f"  {label:<30} {value}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    kinds = ["rnn", "lstm"] if args.model == "both" else [args.model]
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"threads={torch.get_num_threads()}; T={args.T} B={args.batch} Hd={args.hidden} "
        f"I={args.input} window={args.window} relevant={args.relevant} float32, "
        f"min of {args.repeats} (reference: {args.reference_repeats})"
    )
    for kind in kinds:
        results, agree = bench(kind, args)
        name = "RelRNN" if kind == "rnn" else "RelLSTM"
        for clock, r in results.items():
            report(f"{name}  forward+backward, {clock} time", r, args.T)
        print(f"  final slots equal to reference: {100 * agree:.1f} %")


if __name__ == "__main__":
    main()
