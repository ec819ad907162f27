"""Pytest plugin of the mutation harness (``make mutants``; see ``run.py`` beside this file).

With ``SCREENING_ATTN_MUTANT=<name>`` in the environment, it replaces one kernel of the package,
at its ``torch.library`` op, by a deliberately wrong implementation before any test runs. The
suite must then fail. Nothing here touches the package's code: the wrong kernels are written in
plain PyTorch from the definitions in ``docs/`` and registered over the real ones
(``Library.impl`` for the C++ ops, ``torch.library.register_kernel`` for the Triton ops).

A mutant is ``<target>-<mutation>[-f32]``: ``-f32`` applies the mutation to float32 inputs only
(and computes everything else right), the case a tolerant float32 comparison could excuse.
``<target>-control`` installs the plain-PyTorch kernel with no mutation: the selected tests must
pass with it, which shows that a kill comes from the mutation, not from the re-implementation.
"""

from __future__ import annotations

import os

import pytest
import torch

ENV = "SCREENING_ATTN_MUTANT"


class NotModelled(NotImplementedError):
    """A call the mutant does not model (it reports the test as *not applicable*, a skip, never
    as a kill: a refusal says nothing about the tests)."""

    MARK = "[mutant: not modelled]"

    def __init__(self, what: str) -> None:
        super().__init__(f"{self.MARK} {what}")


NOT_APPLICABLE = "mutant not applicable: "

# --------------------------------------------------------------------------------------------
# Screened attention: the screening scan with knobs, returning what the forward ops return:
# (out, lse, relevant_index, relevant_score, relevancy, span).

ATTENTION_MUTATIONS = (
    "control",
    "ge",  # a key evicts the weakest slot on a tie (>= instead of >)
    "tie-high",  # among tied weakest slots, the highest slot number is overwritten
    "screen-early",  # the leaving key is screened before its last window query's weight
    "rel-from-set",  # attention received in the relevant set also counts as relevancy
    "drop-tail",  # the relevancy of the last ν-1 keys (still in the window) is dropped
    "window-off-by-one",  # the window holds ν+1 keys
    "slot-order",  # the state's slots come sorted by position, not in slot order
)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, T, D), index (N, ...) in [0, T) -> (N, ..., D)."""
    n = torch.arange(x.shape[0]).view(-1, *([1] * (index.dim() - 1)))
    return x[n, index]


def _screened_attention(q, k, v, window, relevant, scale, mutation):
    B, H, T, _ = q.shape
    Dv, N, rho = v.shape[-1], B * H, relevant
    acc = _acc(q.dtype)
    nu = min(window, T + 1) + (1 if mutation == "window-off-by-one" else 0)
    q_, k_, v_ = (x.detach().reshape(N, T, x.shape[-1]).to(acc) for x in (q, k, v))
    neg = float("-inf")
    slot_index = torch.full((N, rho), -1, dtype=torch.int64)
    slot_score = torch.full((N, rho), neg, dtype=acc)
    history = torch.full((N, T, rho), -1, dtype=torch.int64)
    relevancy = torch.zeros(N, T, dtype=acc)
    span = torch.full((N, T, 2), -1, dtype=torch.int32)
    rows = torch.arange(N)
    offs = torch.arange(nu - 1, -1, -1)  # window column i holds key t - ν + 1 + i

    def screen(t: int) -> None:
        e = t - nu + 1
        if e < 0 or rho == 0:
            return
        r_e = relevancy[:, e]
        empty = slot_index < 0
        has_empty = empty.any(-1)
        first_empty = empty.to(torch.uint8).argmax(-1)
        score = slot_score.masked_fill(slot_score.isnan(), neg)
        if mutation == "tie-high":
            weakest = rho - 1 - score.flip(-1).argmin(-1)
        else:
            weakest = score.argmin(-1)
        target = torch.where(has_empty, first_empty, weakest)
        old = slot_index[rows, target]
        beat = (
            r_e >= slot_score[rows, target] if mutation == "ge" else r_e > slot_score[rows, target]
        )
        insert = has_empty | beat
        evicted = insert & (old >= 0)
        old_safe = old.clamp(min=0)
        span[rows, old_safe, 1] = torch.where(evicted, t + 1, span[rows, old_safe, 1])
        span[:, e, 0] = torch.where(insert, t + 1, -1)
        span[:, e, 1] = torch.where(insert, T, -1)
        slot_index[rows, target] = torch.where(insert, e, old)
        slot_score[rows, target] = torch.where(insert, r_e, slot_score[rows, target])

    lse = torch.empty(N, T, dtype=acc)
    for t in range(T):
        history[:, t] = slot_index
        pos = t - offs
        valid = pos >= 0
        k_win = k_[:, pos.clamp(min=0)]  # (N, ν, D)
        logits = scale * torch.einsum("nd,nwd->nw", q_[:, t], k_win)
        logits = logits.masked_fill(~valid, neg)
        if rho:
            k_slot = _rows(k_, slot_index.clamp(min=0))
            slot_logits = scale * torch.einsum("nd,nsd->ns", q_[:, t], k_slot)
            logits = torch.cat([logits, slot_logits.masked_fill(slot_index < 0, neg)], -1)
        m = logits.max(-1, keepdim=True).values  # as the kernels: an Inf logit gives NaN
        lse[:, t] = (m + (logits - m).exp().sum(-1, keepdim=True).log())[:, 0]
        alpha = torch.softmax(logits, -1)
        if mutation == "screen-early":
            screen(t)
        lo = max(0, t - nu + 1)
        relevancy[:, lo : t + 1] += alpha[:, nu - (t + 1 - lo) : nu]
        if mutation == "rel-from-set" and rho:
            member = slot_index >= 0
            safe = slot_index.clamp(min=0)
            relevancy.scatter_add_(1, safe, torch.where(member, alpha[:, nu:], 0.0))
            slot_score.copy_(torch.where(member, relevancy.gather(1, safe), slot_score))
        if mutation != "screen-early":
            screen(t)
    if mutation == "drop-tail":
        relevancy[:, max(0, T - nu + 1) :] = 0

    # out with the sets fixed: gather each query's candidates
    pos = torch.arange(T)[:, None] - offs  # (T, ν)
    cand = torch.cat([pos.expand(N, T, nu), history], -1)
    valid = cand >= 0
    cand = cand.clamp(min=0)
    k_c = _rows(k_, cand).masked_fill(~valid[..., None], 0)
    v_c = _rows(v_, cand).masked_fill(~valid[..., None], 0)
    logits = (scale * torch.einsum("ntd,ntcd->ntc", q_, k_c)).masked_fill(~valid, neg)
    out = torch.einsum("ntc,ntcd->ntd", torch.softmax(logits, -1), v_c)

    if mutation == "slot-order":
        key = torch.where(slot_index < 0, torch.iinfo(torch.int64).max, slot_index)
        order = key.argsort(-1)
        slot_index, slot_score = slot_index.gather(-1, order), slot_score.gather(-1, order)
    return (
        out.to(q.dtype).reshape(B, H, T, Dv).contiguous(),
        lse.reshape(B, H, T),
        slot_index.reshape(B, H, rho),
        slot_score.reshape(B, H, rho),
        relevancy.reshape(B, H, T),
        span.reshape(B, H, T, 2),
    )


# --------------------------------------------------------------------------------------------
# RelRNN / RelLSTM: the attention step op (the sequence ops call it through the dispatcher when
# SCREENING_ATTN_RNN_STEP_OPS=1, which install sets; else their CPU loops call the kernels
# directly).

RNN_MUTATIONS = ("control", "ge", "tie-high")


def _rnn_attend_step(query, hidden, uah, v, slot_index, slot_score, relevancy, s, alpha, cand,
                     t, window, attn, mutation):  # fmt: skip
    """In place, as the C++ step: scores over the window (columns 0..nw-1) and the slots
    (columns window + slot), softmax, s = ½ (h_{t-1} + attn c), the window's relevancy, then the
    screening of step t - window."""
    B, Hd = query.shape
    rho = slot_index.shape[1]
    nw = min(t, window)
    rows = torch.arange(B)
    cand.copy_(slot_index)
    win_pos = torch.arange(t - nw, t)
    keys = uah[win_pos].transpose(0, 1)  # (B, nw, Hd)
    vals = hidden[win_pos].transpose(0, 1)
    valid = torch.ones(B, nw, dtype=torch.bool)
    if rho:
        safe = slot_index.clamp(min=0)
        keys = torch.cat([keys, uah[safe, rows[:, None]]], 1)
        vals = torch.cat([vals, hidden[safe, rows[:, None]]], 1)
        valid = torch.cat([valid, slot_index >= 0], 1)
    e = (torch.tanh(query[:, None] + keys) * v.reshape(1, 1, Hd)).sum(-1)
    a = torch.softmax(e.masked_fill(~valid, float("-inf")), -1)
    alpha.zero_()
    alpha[:, :nw] = a[:, :nw]
    if rho:
        alpha[:, window : window + rho] = a[:, nw:]
    c = (a[..., None] * vals.masked_fill(~valid[..., None], 0)).sum(1)
    s.copy_(0.5 * (hidden[t - 1] + attn * c))
    relevancy[win_pos] += a[:, :nw].T
    if t < window or rho == 0:
        return
    r = relevancy[t - window]
    empty = slot_index < 0
    has_empty = empty.any(-1)
    first_empty = empty.to(torch.uint8).argmax(-1)
    score = slot_score.masked_fill(slot_score.isnan(), float("-inf"))
    weakest = rho - 1 - score.flip(-1).argmin(-1) if mutation == "tie-high" else score.argmin(-1)
    target = torch.where(has_empty, first_empty, weakest)
    old_score = slot_score[rows, target]
    beat = r >= old_score if mutation == "ge" else r > old_score
    insert = has_empty | beat
    slot_index[rows, target] = torch.where(insert, t - window, slot_index[rows, target])
    slot_score[rows, target] = torch.where(insert, r, old_score)


# --------------------------------------------------------------------------------------------
# CNN-F: AdaPool positions and the AdaReLU gate.

POOL_MUTATIONS = ("control", "last-index", "shifted-argmax")
GATE_MUTATIONS = ("control", "flip-near-zero")
FLIP_BAND = 1e-3  # |x'| below this flips the gate: far above any rounding of x'


def _pool(x, hidden, k, mutation):
    """(y, argmax, argmin) with uint8 window positions; first element on ties unless mutated."""
    win = x.unfold(2, k, k).unfold(3, k, k)
    win = win.reshape(*win.shape[:4], k * k)
    if mutation == "last-index":
        amax = k * k - 1 - win.flip(-1).argmax(-1)
        amin = k * k - 1 - win.flip(-1).argmin(-1)
    else:
        amax, amin = win.argmax(-1), win.argmin(-1)
    ymax = win.gather(-1, amax[..., None])[..., 0]
    ymin = win.gather(-1, amin[..., None])[..., 0]
    if mutation == "shifted-argmax" and k >= 3:
        amax = (amax + 1) % (k * k)
    y = ymax if hidden is None else ymax * (hidden > 0) + ymin * (hidden < 0)
    return y.contiguous(), amax.to(torch.uint8), amin.to(torch.uint8)


def _gate(u, hidden, eta, mutation):
    """AdaReLU on u: (y, mask), in float32 for half inputs (as the kernels: docs/backends.md)."""
    dtype = u.dtype
    if dtype in (torch.float16, torch.bfloat16):
        u, hidden = u.float(), None if hidden is None else hidden.float()
    if hidden is None:
        mask = u > 0
    else:
        u = u + eta * (hidden - u)
        mask = u * hidden > 0
    if mutation == "flip-near-zero":
        mask = torch.where(u.abs() < FLIP_BAND, ~mask, mask)
    return (u * mask).to(dtype).contiguous(), mask.contiguous()


def _norm(x, eps, centered):
    """(x r, r) with r = 1 / sqrt(mean(x²) + eps) per plane, or the unbiased variance."""
    acc = _acc(x.dtype)
    xa = x.contiguous().to(acc)  # the sums in one order whatever the layout, as the kernels
    power = xa.var(dim=(2, 3)) if centered else xa.square().mean(dim=(2, 3))
    rstd = 1.0 / torch.sqrt(power + eps)
    return (xa * rstd[..., None, None]).to(x.dtype), rstd


# --------------------------------------------------------------------------------------------
# Installation


def _parse(name: str) -> tuple[str, str, bool]:
    f32 = name.endswith("-f32")
    base = name.removesuffix("-f32")
    target, _, mutation = base.partition(":")
    return target, mutation, f32


def _active(mutation: str, f32_only: bool, dtype: torch.dtype) -> str:
    """The mutation to apply to inputs of ``dtype`` (``-f32`` mutants compute others right)."""
    return "control" if f32_only and dtype != torch.float32 else mutation


def install(name: str) -> None:
    """Register the mutant ``name`` (``<target>:<mutation>[-f32]``) over the real kernel."""
    target, mutation, f32 = _parse(name)
    lib = torch.library.Library("screening_attn", "IMPL")  # kept alive in _LIBS
    _LIBS.append(lib)
    from screening_attn import _backend  # noqa: F401  (loads _C: its ops must exist first)

    if target in ("attention-cpu", "attention-triton"):
        if mutation not in ATTENTION_MUTATIONS:
            raise ValueError(f"unknown attention mutation {mutation!r}")

        def attention(q, k, v, window, relevant, scale):
            return _screened_attention(q, k, v, window, relevant, scale,
                                       _active(mutation, f32, q.dtype))  # fmt: skip

        if target == "attention-cpu":
            lib.impl("screened_attention", attention, "CPU")
        else:
            import screening_attn.attention

            def attention_triton(q, k, v, window, relevant, scale, key_padding_mask=None):
                # the mutants model the one-head op without padding
                if key_padding_mask is not None or k.shape[1] != q.shape[1]:
                    raise NotModelled("no mutant for grouped heads or key padding")
                return attention(q, k, v, window, relevant, scale)

            torch.library.register_kernel(
                "screening_attn::screened_attention_triton", "cpu", attention_triton
            )
    elif target == "rnn-cpu":
        if mutation not in RNN_MUTATIONS:
            raise ValueError(f"unknown rnn mutation {mutation!r}")

        def step(query, hidden, uah, v, slot_index, slot_score, relevancy, s, alpha, cand, t,
                 window, attn, key_exp=None):  # fmt: skip
            # key_exp: the C++ kernels' cache of exp(2 uah); the scores here take tanh of uah
            with torch.no_grad():
                _rnn_attend_step(query, hidden, uah, v, slot_index, slot_score, relevancy, s,
                                 alpha, cand, t, window, attn,
                                 _active(mutation, f32, query.dtype))  # fmt: skip

        lib.impl("rnn_attend_step", step, "CPU")
        os.environ["SCREENING_ATTN_RNN_STEP_OPS"] = "1"  # csrc/rnn_loops.cpp row_loops
    elif target in ("pool-cpu", "pool-triton"):
        if mutation not in POOL_MUTATIONS:
            raise ValueError(f"unknown pool mutation {mutation!r}")

        def pool(x, hidden, kernel_size):
            with torch.no_grad():
                return _pool(x, hidden, kernel_size, _active(mutation, f32, x.dtype))

        if target == "pool-triton":
            import screening_attn.feedback

            torch.library.register_kernel("screening_attn::ada_pool2d_triton", "cpu", pool)
            return
        lib.impl("ada_pool2d", pool, "CPU")

        def norm_pool(x, bias, hidden, pool_hidden, eta, eps, centered, kernel_size):
            with torch.no_grad():
                u, rstd = _norm(x, eps, centered)
                if bias is not None:
                    u = u + bias.view(1, -1, 1, 1)
                y, mask = _gate(u, hidden, eta, "control")
                yp, amax, amin = _pool(y, pool_hidden, kernel_size,
                                       _active(mutation, f32, x.dtype))  # fmt: skip
                return yp, mask, rstd, amax, amin

        lib.impl("ins_bias_ada_relu_pool2d", norm_pool, "CPU")
    elif target in ("gate-cpu", "gate-triton"):
        if mutation not in GATE_MUTATIONS:
            raise ValueError(f"unknown gate mutation {mutation!r}")

        def gate(x, hidden, eta):
            with torch.no_grad():
                return _gate(x, hidden, eta, _active(mutation, f32, x.dtype))

        if target == "gate-triton":
            import screening_attn.feedback  # noqa: F401

            torch.library.register_kernel("screening_attn::ada_relu_triton", "cpu", gate)
            return
        lib.impl("ada_relu", gate, "CPU")

        def norm_gate(x, bias, hidden, eta, eps, centered):
            with torch.no_grad():
                u, rstd = _norm(x, eps, centered)
                if bias is not None:
                    u = u + bias.view(1, -1, 1, 1)
                y, mask = _gate(u, hidden, eta, _active(mutation, f32, x.dtype))
                return y, mask, rstd

        lib.impl("ins_bias_ada_relu", norm_gate, "CPU")
    else:
        raise ValueError(f"unknown mutant target {target!r}")


_LIBS: list = []


def pytest_configure(config) -> None:
    name = os.environ.get(ENV)
    if name:
        install(name)
        config.stash_mutant = name  # for the report header


def _not_modelled(exc: BaseException | None) -> str | None:
    """The refusal's message if ``exc`` is, wraps or quotes a NotModelled (torch.compile and the
    dispatcher may re-raise it as another exception with the message inside)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, NotModelled) or NotModelled.MARK in str(exc):
            message = str(exc).split(NotModelled.MARK, 1)[-1].strip().splitlines()[0]
            return message.split(" (scroll up")[0]  # dynamo's suffix
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    refusal = _not_modelled(call.excinfo.value) if call.excinfo is not None else None
    if report.failed and refusal is not None:
        # a skip with the location pytest expects of one: (path, line, reason)
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, NOT_APPLICABLE + refusal)


def pytest_report_header(config) -> str:
    name = os.environ.get(ENV)
    return f"mutant: {name}" if name else "mutant: none"
