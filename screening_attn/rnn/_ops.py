"""Registration glue of the RelRNN / RelLSTM kernels (schemas in csrc/rnn.cpp, time loops in
csrc/rnn_loops.cpp, step kernels in csrc/cpu/rnn.cpp and csrc/cuda/rnn.cu): fakes for every op,
autograd for the two sequence ops, and the entry points the modules call (``rel_rnn_fused``,
``rel_lstm_fused``: the arguments and results of ``rel_rnn_reference`` / ``rel_lstm_reference``).

The sequence ops ``rel_rnn`` / ``rel_lstm`` run the whole forward (a loop over time of fused
step ops and matrix products) and return, next to ``h`` and the screening state, what their
backward ops need: the per-step states, the softmax weights over each step's candidates and,
on the CPU, the keys' exponentials ``key_exp`` (empty elsewhere). Their backward ops run the
loop in reverse time (exact backpropagation through time with the screening decisions fixed).
The step ops update their state in place (``Tensor(a!)`` arguments) and return nothing; they are
not differentiable on their own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from screening_attn import _backend
from screening_attn._library import acc_dtype as _acc
from screening_attn._library import no_double_backward

_OPS = torch.ops.screening_attn if _backend.C_ERROR is None else None


def _live(T: int, window: int, relevant: int) -> tuple[int, int]:
    """(effective window, slots that can ever fill): as csrc/rnn_loops.cpp's ``Screening``."""
    window = min(window, T)
    return window, min(relevant, max(0, T - window))


def _fake_rel_rnn(x, h0, U_weight, U_bias, V_weight, Ua_weight, Va_weight, v, modrelu_b,
                  window, relevant, nonlinearity, attn):  # fmt: skip
    T, B, _ = x.shape
    Hd = V_weight.shape[0]
    w, live = _live(T, window, relevant)
    acc = _acc(x.dtype)
    state = x.new_empty(T, B, Hd)
    return (
        state,
        x.new_empty(B, relevant, dtype=torch.int64),
        x.new_empty(B, relevant, dtype=acc),
        x.new_empty(T, B, dtype=acc),
        torch.empty_like(state),
        x.new_empty(T, B, 2 * Hd),
        torch.empty_like(state),
        x.new_empty(T, B, w + live, dtype=acc),
        x.new_empty(T, B, live, dtype=torch.int64),
        _key_exp_like(state),
    )


def _key_exp_like(uah: Tensor) -> Tensor:
    """The ``key_exp`` record: e^{2 uah} on the CPU, empty elsewhere (csrc/rnn_loops.cpp)."""
    return torch.empty_like(uah) if uah.device.type == "cpu" else uah.new_empty(0)


def _fake_rel_rnn_backward(grad_h, x, h0, U_weight, V_weight, Ua_weight, Va_weight, v, h, s,
                           pq, uah, alpha, cand, key_exp, window, nonlinearity,
                           attn):  # fmt: skip
    Hd = V_weight.shape[0]
    return (
        x.new_empty(x.shape),
        h0.new_empty(h0.shape),
        U_weight.new_empty(U_weight.shape),
        U_weight.new_empty(Hd),
        V_weight.new_empty(V_weight.shape),
        Ua_weight.new_empty(Ua_weight.shape),
        Va_weight.new_empty(Va_weight.shape),
        v.new_empty(v.shape),
        U_weight.new_empty(Hd),
    )


def _fake_rel_lstm(x, h0, W, bias, Ua_weight, Va_weight, v, window, relevant):
    T, B, _ = x.shape
    Hd = Ua_weight.shape[0]
    w, live = _live(T, window, relevant)
    acc = _acc(x.dtype)
    state = x.new_empty(T, B, Hd)
    return (
        state,
        x.new_empty(B, relevant, dtype=torch.int64),
        x.new_empty(B, relevant, dtype=acc),
        x.new_empty(T, B, dtype=acc),
        torch.empty_like(state),
        torch.empty_like(state),
        x.new_empty(T, B, 5 * Hd),
        torch.empty_like(state),
        x.new_empty(T, B, w + live, dtype=acc),
        x.new_empty(T, B, live, dtype=torch.int64),
        _key_exp_like(state),
    )


def _fake_rel_lstm_backward(grad_h, x, W, Ua_weight, Va_weight, v, h, cell, s, pq, uah, alpha,
                            cand, key_exp, window):  # fmt: skip
    return (
        x.new_empty(x.shape),
        h.new_empty(h.shape[1:]),
        W.new_empty(W.shape),
        W.new_empty(W.shape[0]),
        Ua_weight.new_empty(Ua_weight.shape),
        Va_weight.new_empty(Va_weight.shape),
        v.new_empty(v.shape),
    )


def _fake_nothing(*args):
    return None


def _setup_rnn(ctx, inputs, output):
    x, h0, U_weight, U_bias, V_weight, Ua_weight, Va_weight, v, modrelu_b = inputs[:9]
    ctx.window, _, ctx.nonlinearity, ctx.attn = inputs[9:]
    ctx.has_bias, ctx.has_b = U_bias is not None, modrelu_b is not None
    h, _, _, _, s, pq, uah, alpha, cand, key_exp = output
    ctx.save_for_backward(x, h0, U_weight, V_weight, Ua_weight, Va_weight, v, h, s, pq, uah,
                          alpha, cand, key_exp)  # fmt: skip
    ctx.mark_non_differentiable(*output[1:])
    # Else autograd hands the backward a zero tensor for each of them, pq (T, B, 2Hd or 5Hd)
    # included: allocated, zeroed (page faults) and never read.
    ctx.set_materialize_grads(False)


def _backward_rnn(ctx, grad_h, *_):
    if grad_h is None:  # only the state was used (grads are not materialized): no gradient
        return (None,) * 13
    x, h0, U_weight, V_weight, Ua_weight, Va_weight, v, h, *records = ctx.saved_tensors
    gx, gh0, gU, gUb, gV, gUa, gVa, gv, gb = _OPS.rel_rnn_backward.default(
        grad_h, x, h0, U_weight, V_weight, Ua_weight, Va_weight, v, h, *records, ctx.window,
        ctx.nonlinearity, ctx.attn,
    )  # fmt: skip
    return (gx, gh0, gU, gUb if ctx.has_bias else None, gV, gUa, gVa, gv,
            gb if ctx.has_b else None, None, None, None, None)  # fmt: skip


def _setup_lstm(ctx, inputs, output):
    x, _, W, _, Ua_weight, Va_weight, v, window, _ = inputs
    ctx.window = window
    h, _, _, _, cell, s, pq, uah, alpha, cand, key_exp = output
    ctx.save_for_backward(x, W, Ua_weight, Va_weight, v, h, cell, s, pq, uah, alpha, cand, key_exp)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # as for RelRNN


def _backward_lstm(ctx, grad_h, *_):
    if grad_h is None:
        return (None,) * 9
    x, W, Ua_weight, Va_weight, v, h, *records = ctx.saved_tensors
    gx, gh0, gW, gbias, gUa, gVa, gv = _OPS.rel_lstm_backward.default(
        grad_h, x, W, Ua_weight, Va_weight, v, h, *records, ctx.window
    )
    return gx, gh0, gW, gbias, gUa, gVa, gv, None, None


if _OPS is not None:
    torch.library.register_fake(_OPS.rel_rnn.default)(_fake_rel_rnn)
    torch.library.register_fake(_OPS.rel_rnn_backward.default)(_fake_rel_rnn_backward)
    torch.library.register_fake(_OPS.rel_lstm.default)(_fake_rel_lstm)
    torch.library.register_fake(_OPS.rel_lstm_backward.default)(_fake_rel_lstm_backward)
    for _name in ("rnn_attend_step", "rnn_attend_step_backward", "rnn_key_exp",
                  "rnn_activation", "rnn_activation_backward", "lstm_cell", "lstm_cell_backward",
                  "rnn_step_mm"):  # fmt: skip
        torch.library.register_fake(getattr(_OPS, _name).default)(_fake_nothing)
    torch.library.register_autograd(_OPS.rel_rnn.default, _backward_rnn, setup_context=_setup_rnn)
    torch.library.register_autograd(
        _OPS.rel_lstm.default, _backward_lstm, setup_context=_setup_lstm
    )
    no_double_backward(_OPS.rel_rnn_backward.default, "rel_rnn")
    no_double_backward(_OPS.rel_lstm_backward.default, "rel_lstm")


_HALF = (torch.float16, torch.bfloat16)


def _in_float32(x: Tensor) -> bool:
    """Half CPU inputs run the float32 kernels (docs/backends.md): the arguments are cast once
    at entry (autograd casts their gradients back) and ``h`` is rounded to the input dtype once
    at the end; the state is float32, as for half inputs on any backend."""
    return x.device.type == "cpu" and x.dtype in _HALF


def _float(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def rel_rnn_fused(
    x: Tensor,
    h0: Tensor | None,
    U_weight: Tensor,
    U_bias: Tensor | None,
    V_weight: Tensor,
    Ua_weight: Tensor,
    Va_weight: Tensor,
    v: Tensor,
    modrelu_b: Tensor | None = None,
    *,
    window: int,
    relevant: int,
    nonlinearity: str = "tanh",
    attn: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RelRNN forward through the fused kernels: ``(h, relevant_index, relevant_score,
    relevancy)``; differentiable in ``h`` (backpropagation through time)."""
    assert _OPS is not None  # callers resolve to a compiled backend: the extension loaded
    if _in_float32(x):
        h, *state = rel_rnn_fused(
            x.float(), _float(h0), U_weight.float(), _float(U_bias), V_weight.float(),
            Ua_weight.float(), Va_weight.float(), v.float(), _float(modrelu_b),
            window=window, relevant=relevant, nonlinearity=nonlinearity, attn=attn,
        )  # fmt: skip
        return h.to(x.dtype), state[0], state[1], state[2]
    if h0 is None:
        h0 = x.new_zeros(x.shape[1], V_weight.shape[0])
    out = _OPS.rel_rnn.default(
        x, h0, U_weight, U_bias, V_weight, Ua_weight, Va_weight, v,
        modrelu_b if nonlinearity == "modrelu" else None, window, relevant, nonlinearity, attn,
    )  # fmt: skip
    return out[0], out[1], out[2], out[3]


def rel_lstm_fused(
    x: Tensor,
    h0: Tensor | None,
    Wf_weight: Tensor,
    Wf_bias: Tensor,
    Wi_weight: Tensor,
    Wi_bias: Tensor,
    Wo_weight: Tensor,
    Wo_bias: Tensor,
    Wg_weight: Tensor,
    Wg_bias: Tensor,
    Ua_weight: Tensor,
    Va_weight: Tensor,
    v: Tensor,
    *,
    window: int,
    relevant: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RelLSTM forward through the fused kernels; as :func:`rel_rnn_fused`. The four gate
    weights are concatenated (autograd splits their gradient)."""
    assert _OPS is not None  # as in rel_rnn_fused
    if _in_float32(x):
        h, *state = rel_lstm_fused(
            x.float(), _float(h0), Wf_weight.float(), Wf_bias.float(), Wi_weight.float(),
            Wi_bias.float(), Wo_weight.float(), Wo_bias.float(), Wg_weight.float(),
            Wg_bias.float(), Ua_weight.float(), Va_weight.float(), v.float(),
            window=window, relevant=relevant,
        )  # fmt: skip
        return h.to(x.dtype), state[0], state[1], state[2]
    if h0 is None:
        h0 = x.new_zeros(x.shape[1], Ua_weight.shape[0])
    W = torch.cat([Wf_weight, Wi_weight, Wo_weight, Wg_weight])
    bias = torch.cat([Wf_bias, Wi_bias, Wo_bias, Wg_bias])
    out = _OPS.rel_lstm.default(x, h0, W, bias, Ua_weight, Va_weight, v, window, relevant)
    return out[0], out[1], out[2], out[3]
