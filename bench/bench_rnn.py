"""Benchmark cases of ``RelRNN`` and ``RelLSTM`` (docs/rnn.md).

``setup_rel_rnn`` / ``setup_rel_lstm(provider, mode, **shape)`` build the module and inputs,
check the provider against the reference once, and return the zero-argument callable to time.
Providers:

* ``reference``, ``cpu``, ``triton``: ``module(x, backend=provider)``; backends the module does
  not have yet are skipped with the dispatcher's reason;
* ``products``: the fused kernels' own matrix products alone (csrc/rnn_loops.cpp's loops): the same
  products, shapes, order and routines (the per-step ones through the extension's
  ``rnn_step_mm``), the outputs written to buffers allocated inside the timed region as the
  kernels' are, the inputs prepared beforehand; issued from Python, so each carries a Python
  call the C++ loop does not. The floor of the ``cpu`` provider;
* ``matmul_floor``: the matrix products of one *eager* step (query ``Va s``, scores
  ``(w, Hd) @ v``, context ``α @ values``, ``V s`` or the four LSTM gates, ``Ua h``) run T times
  on fixed inputs, plus ``U x`` once for RelRNN: what an eager step costs before any
  elementwise op, softmax or screening.

The check runs the provider at the benchmark's own shape and compares the first ``CHECK_T``
steps with the float64 reference run on that prefix (the recurrence is causal; with an upstream
gradient that is zero past ``CHECK_T``, every gradient equals the prefix problem's).

pytest-benchmark: ``pytest bench/bench_rnn.py --benchmark-only [--bench-preset quick]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench._common import CheckFailed, Unavailable, check_close, clear_grads, run_pytest_benchmark
from screening_attn.nn import RelLSTM, RelRNN

FAMILY = "rnn"
CHECK_T = 64
SEED = 0
_MODULES = {"rel_rnn": RelRNN, "rel_lstm": RelLSTM}


def make_module(op: str, input_size: int, hidden: int, window: int, relevant: int):
    torch.manual_seed(SEED)
    return _MODULES[op](input_size, hidden, window, relevant)


def make_inputs(T: int, B: int, input_size: int, hidden: int):
    """``x (T, B, I)`` and ``grad_h (T, B, Hd)``; the first ``CHECK_T`` steps are the same for
    every T."""
    t0 = min(T, CHECK_T)
    head = torch.randn(t0, B, input_size + hidden, generator=torch.Generator().manual_seed(SEED))
    tail = torch.randn(
        T - t0, B, input_size + hidden, generator=torch.Generator().manual_seed(SEED + T)
    )
    both = torch.cat([head, tail])
    return both[..., :input_size].contiguous(), both[..., input_size:].contiguous()


@functools.cache
def _oracle(op: str, B: int, input_size: int, hidden: int, window: int, relevant: int, t0: int):
    """Float64 reference: ``h`` and the gradients of x and every parameter on the prefix."""
    module = make_module(op, input_size, hidden, window, relevant).double()
    x, g = make_inputs(t0, B, input_size, hidden)
    x = x.double().requires_grad_()
    h, _ = module(x, backend="reference")
    h.backward(g.double())
    grads = {name: p.grad for name, p in module.named_parameters()}
    return h.detach(), x.grad, grads


def _available(module, provider: str) -> None:
    if provider in ("triton", "cuda"):
        raise Unavailable("GPU kernel: the RNN benchmarks run on CPU tensors")
    tiny = torch.zeros(2, 1, module.input_size)
    try:
        module(tiny, backend=provider)
    except ValueError as exc:
        raise Unavailable(str(exc)) from None


def _check(module, provider, mode, x, g, shape) -> None:
    t0 = min(shape["T"], CHECK_T)
    ref_h, ref_dx, ref_grads = _oracle(
        shape["op"],
        shape["B"],
        shape["input_size"],
        shape["hidden"],
        shape["window"],
        shape["relevant"],
        t0,
    )
    tol = {"rtol": 1e-4, "atol": 1e-4}
    if mode == "fwd":
        with torch.no_grad():
            h, _ = module(x, backend=provider)
        check_close("h", h[:t0], ref_h, **tol)
        return
    g_check = g.clone()
    g_check[t0:] = 0
    module.zero_grad(set_to_none=True)
    clear_grads(x)
    h, _ = module(x, backend=provider)
    h.backward(g_check)
    check_close("h", h[:t0], ref_h, **tol)
    check_close("dx", x.grad[:t0], ref_dx, **tol)
    for name, p in module.named_parameters():
        check_close(f"d{name}", p.grad, ref_grads[name], **tol)
    module.zero_grad(set_to_none=True)
    clear_grads(x)


def _matmul_floor(op: str, mode: str, *, T, B, input_size, hidden, window, relevant):
    """The step's matrix products, T times, on fixed inputs (see the module docstring)."""
    torch.manual_seed(SEED + 1)
    w = window + relevant
    grad = mode == "fwd+bwd"

    def leaf(*size):
        return torch.randn(*size).requires_grad_(grad)

    s, h = leaf(B, hidden), leaf(B, hidden)
    keys, values, alpha = leaf(B, w, hidden), leaf(B, w, hidden), leaf(B, 1, w)
    Va, Ua, v = leaf(hidden, hidden), leaf(hidden, hidden), leaf(hidden)
    if op == "rel_rnn":
        x, U, Ub, V = (
            leaf(T, B, input_size),
            leaf(hidden, input_size),
            leaf(hidden),
            leaf(hidden, hidden),
        )
        gates = [V]
        params = [s, h, keys, values, alpha, Va, Ua, v, x, U, Ub, V]
        step_in = s
    else:
        gates = [leaf(hidden, hidden + input_size) for _ in range(4)]
        gate_bias = [leaf(hidden) for _ in range(4)]
        sx = leaf(B, hidden + input_size)  # cat([s, x_t])
        params = [s, h, keys, values, alpha, Va, Ua, v, *gates, *gate_bias, sx]
        step_in = sx

    def products():
        outs = [F.linear(x, U, Ub)] if op == "rel_rnn" else []
        for _ in range(T):
            outs.append(F.linear(s, Va))
            outs.append(keys @ v)
            outs.append(torch.bmm(alpha, values))
            if op == "rel_rnn":
                outs.append(F.linear(step_in, gates[0]))
            else:
                outs.extend(F.linear(step_in, W, b) for W, b in zip(gates, gate_bias))
            outs.append(F.linear(h, Ua))
        return outs

    if mode == "fwd":

        def run():
            with torch.no_grad():
                return products()

        return run
    with torch.no_grad():
        out_grads = [torch.ones_like(o) for o in products()]

    def run_bwd():
        clear_grads(*params)
        torch.autograd.backward(products(), out_grads)

    return run_bwd


CHUNK = 64  # csrc/rnn_loops.cpp's kChunk: the backward's weight gradients are products per chunk


def _products(op: str, mode: str, module, x: torch.Tensor) -> Callable[[], object]:
    """The matrix products of the ``cpu`` provider's loops, alone (see the module docstring),
    on the routines csrc/rnn_loops.cpp uses: per-step products through ``rnn_step_mm`` (its
    ``step_mm``), the rest through torch.mm / addmm.

    Forward: ``U x + b`` (the gates' input part) for all steps up front; per step
    ``pq_t += s_t [V; Va]ᵀ`` (RelRNN, width n = 2Hd) or ``s_t [W_s; Va]ᵀ`` (RelLSTM, n = 5Hd) and
    ``uah_t = Ua h_t``. Backward, in reverse time: per step ``gH_t += gK_t Ua`` and
    ``gs = g_t [W_s; Va]``; per chunk of 64 steps ``dx``, ``dW_x`` and ``d[W_s; Va]``; ``dUa``
    at the end."""
    T, B, I = x.shape
    Hd = module.hidden_size
    rnn = op == "rel_rnn"
    n, nx = (2 * Hd, Hd) if rnn else (5 * Hd, 4 * Hd)
    step_mm = torch.ops.screening_attn.rnn_step_mm
    gen = torch.Generator().manual_seed(SEED + 2)
    s, h, gK, gpq = (torch.randn(T, B, k, generator=gen) for k in (Hd, Hd, Hd, n))
    h0 = torch.randn(B, Hd, generator=gen)
    x2 = x.detach().reshape(T * B, I)
    with torch.no_grad():
        if rnn:
            Wx, bias, V = module.U.weight, module.U.bias, module.V.weight
            Ws = torch.cat([V, module.Va.weight])  # (2Hd, Hd)
        else:
            gates = (module.Wf, module.Wi, module.Wo, module.Wg)
            Wcat = torch.cat([g.weight for g in gates])
            Wx, bias = Wcat[:, Hd:].contiguous(), torch.cat([g.bias for g in gates])
            Ws = torch.cat([Wcat[:, :Hd], module.Va.weight])  # (5Hd, Hd)
        WsT, Ua = Ws.t().contiguous(), module.Ua.weight.detach()
        UaT = Ua.t().contiguous()

    def forward():
        pq, uah = torch.empty(T, B, n), torch.empty(T, B, Hd)
        torch.addmm(bias, x2, Wx.t(), out=pq.view(T * B, n)[:, :nx])
        if rnn:  # step 0: V h0 and Va pre_0 separately
            pq[0, :, :Hd].addmm_(h0, V.t())
            torch.mm(pq[0, :, :Hd], module.Va.weight.t(), out=pq[0, :, Hd:])
        for t in range(1 if rnn else 0, T):
            step_mm(pq[t], s[t], WsT, True)
            step_mm(uah[t], h[t], UaT, False)

    def backward():
        gH, gs = torch.empty(T, B, Hd), torch.empty(B, Hd)
        grad_x = torch.empty(T, B, I)
        grad_Wx, grad_Ws = torch.zeros(nx, I), torch.zeros(n, Hd)
        for t1 in range(T, 0, -CHUNK):
            t0 = max(0, t1 - CHUNK)
            for t in range(t1 - 1, t0 - 1, -1):
                step_mm(gH[t], gK[t], Ua, True)
                step_mm(gs, gpq[t], Ws, False)
            flat = gpq[t0:t1].reshape(-1, n)
            torch.mm(flat[:, :nx], Wx, out=grad_x[t0:t1].view(-1, I))
            grad_Wx.addmm_(flat[:, :nx].t(), x2[t0 * B : t1 * B])
            grad_Ws.addmm_(flat.t(), s[t0:t1].reshape(-1, Hd))
        torch.mm(gK.view(T * B, Hd).t(), h.view(T * B, Hd))  # dUa

    def run():
        with torch.no_grad():
            forward()
            if mode == "fwd+bwd":
                backward()

    return run


def _setup(op: str, provider: str, mode: str, **shape) -> Callable[[], object]:
    T, B, I, Hd = shape["T"], shape["B"], shape["input_size"], shape["hidden"]
    if provider == "matmul_floor":
        return _matmul_floor(op, mode, **shape)
    module = make_module(op, I, Hd, shape["window"], shape["relevant"])
    if provider == "products":
        _available(module, "cpu")  # it runs the extension's rnn_step_mm
        return _products(op, mode, module, make_inputs(T, B, I, Hd)[0])
    _available(module, provider)
    x, g = make_inputs(T, B, I, Hd)
    if mode == "fwd+bwd":
        x.requires_grad_()
    try:
        _check(module, provider, mode, x, g, {**shape, "op": op})
    except CheckFailed:
        raise
    except Exception as exc:  # a provider that raises is FAILED, not a crash
        raise CheckFailed(f"raised {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc

    if mode == "fwd":

        def run():
            with torch.no_grad():
                return module(x, backend=provider)

    else:

        def run():
            module.zero_grad(set_to_none=True)
            clear_grads(x)
            h, _ = module(x, backend=provider)
            h.backward(g)

    return run


def setup_rel_rnn(provider: str, mode: str, **shape) -> Callable[[], object]:
    """RelRNN (tanh) forward, or forward + backward to x and every parameter."""
    return _setup("rel_rnn", provider, mode, **shape)


def setup_rel_lstm(provider: str, mode: str, **shape) -> Callable[[], object]:
    """RelLSTM forward, or forward + backward to x and every parameter."""
    return _setup("rel_lstm", provider, mode, **shape)


SETUPS = {"rel_rnn": setup_rel_rnn, "rel_lstm": setup_rel_lstm}


def flops(op: str, provider: str, mode: str, shape: dict) -> float | None:
    """The products of the eager matmul floor (2 FLOPs per MAC); backward twice the forward."""
    T, B, I, Hd = shape["T"], shape["B"], shape["input_size"], shape["hidden"]
    w = shape["window"] + shape["relevant"]
    attend = 2 * B * Hd * Hd + 2 * B * w * Hd * 2  # Va s; scores and context
    if op == "rel_rnn":
        step = attend + 2 * B * Hd * Hd * 2 + 2 * B * I * Hd  # V s, Ua h, U x
    else:
        step = attend + 4 * 2 * B * (Hd + I) * Hd + 2 * B * Hd * Hd  # gates, Ua h
    fwd = float(T * step)
    return fwd if mode == "fwd" else 3.0 * fwd


def test_rnn(benchmark, case):
    run_pytest_benchmark(benchmark, case, SETUPS[case.op])
