"""Registration of screened attention's ops: fakes and autograd for the C++ ops
``torch.ops.screening_attn.screened_attention`` / ``screened_attention_backward`` (schemas in
csrc/attention.cpp, CPU kernel in csrc/cpu/attention.cpp), and the Triton ops
``screened_attention_triton`` / ``screened_attention_backward_triton``, stubs made here with
``torch.library.custom_op`` around the launchers of kernels/attention.py. Both forward ops
return ``(out, lse, relevant_index, relevant_score, relevancy, span)``.

The C++ op ``screened_attention_stream`` (grouped heads, key padding, a stream's initial state;
docs/streaming.md) has its own fake and autograd, and ``screened_attention_stream_cpu`` runs it as
the reference's ``screened_attention_stream`` runs its scan. The Triton ops
``screened_attention_stream_triton`` / ``screened_attention_stream_backward_triton`` take the
same initial state (with the cached keys and values apart from the new ones, which alone get
gradients), and ``screened_attention_stream_triton_state`` runs them for the cache."""

from __future__ import annotations

import torch
from torch import Tensor

from screening_attn import _backend
from screening_attn._library import acc_dtype as score_dtype
from screening_attn._library import no_double_backward
from screening_attn._validate import check_attention_inputs, check_key_padding_mask
from screening_attn.attention.reference import StreamState, _finish, stream_start


def _fake_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    relevant: int,
    scale: float,
    key_padding_mask: Tensor | None = None,
):
    B, H, T, _ = q.shape
    Hkv = k.shape[1]  # the state has the KV heads (= H for the C++ op)
    acc = score_dtype(q.dtype)
    return (
        q.new_empty(B, H, T, v.shape[-1]),
        q.new_empty(B, H, T, dtype=acc),
        q.new_empty(B, Hkv, relevant, dtype=torch.int64),
        q.new_empty(B, Hkv, relevant, dtype=acc),
        q.new_empty(B, Hkv, T, dtype=acc),
        q.new_empty(B, Hkv, T, 2, dtype=torch.int32),
    )


def _fake_backward(
    grad_out, q, k, v, out, lse, span, window: int, scale: float, relevant=-1, mask=None
):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    # the C++ op's inputs, or the Triton op's with its key_padding_mask (None: no padding)
    q, k, v, window, relevant, scale, *mask = inputs
    out, lse, *_, span = output
    ctx.window, ctx.scale, ctx.relevant, ctx.n_inputs = window, scale, relevant, len(inputs)
    ctx.save_for_backward(q, k, v, out, lse, span, *mask)
    ctx.set_materialize_grads(False)  # no zero tensors for the state outputs, never read


def _make_backward(backward_op, triton: bool = False):
    """Autograd backward of a forward op whose gradients come from ``backward_op``
    (``triton``: it also takes ρ, which sizes its buffers without a host sync, and the
    key padding mask)."""

    def backward(ctx, grad_out, *_side_outputs):
        # The state outputs carry no gradient (r is a statistic; the sets are piecewise constant).
        q, k, v, out, lse, span, *mask = ctx.saved_tensors
        if grad_out is None:  # only a state output was used: zero gradients, as before
            grad_out = torch.zeros_like(out)
        args = (grad_out, q, k, v, out, lse, span, ctx.window, ctx.scale)
        dq, dk, dv = backward_op(*args, *((ctx.relevant, *mask) if triton else ()))
        return dq, dk, dv, *[None] * (ctx.n_inputs - 3)

    return backward


if _backend.C_ERROR is None:
    screened_attention_cpp = torch.ops.screening_attn.screened_attention.default
    screened_attention_backward_cpp = torch.ops.screening_attn.screened_attention_backward.default
    torch.library.register_fake(screened_attention_cpp)(_fake_forward)
    torch.library.register_fake(screened_attention_backward_cpp)(_fake_backward)
    torch.library.register_autograd(
        screened_attention_cpp,
        _make_backward(screened_attention_backward_cpp),
        setup_context=_setup_context,
    )
    no_double_backward(screened_attention_backward_cpp, "screened_attention")


def _fake_stream(
    q,
    k,
    v,
    key_padding_mask,
    relevancy0,
    slot_index0,
    slot_score0,
    window: int,
    relevant: int,
    scale: float,
):
    B, H, n, _ = q.shape
    Hkv, X = k.shape[1], k.shape[2]
    acc = score_dtype(q.dtype)
    return (
        q.new_empty(B, H, n, v.shape[-1]),
        q.new_empty(B, H, n, dtype=acc),
        q.new_empty(B, Hkv, relevant, dtype=torch.int64),
        q.new_empty(B, Hkv, relevant, dtype=acc),
        q.new_empty(B, Hkv, relevancy0.shape[-1] + n, dtype=acc),
        q.new_empty(B, Hkv, X, 2, dtype=torch.int32),
    )


def _fake_stream_backward(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    span,
    key_padding_mask,
    initial_slots: int,
    window: int,
    scale: float,
):
    return _fake_backward(grad_out, q, k, v, out, lse, span, window, scale)


def _setup_stream(ctx, inputs, output):
    q, k, v, mask, _rel0, slot_index0, _score0, window, _relevant, scale = inputs
    out, lse, *_, span = output
    ctx.window, ctx.scale, ctx.initial_slots = window, scale, slot_index0.shape[-1]
    ctx.save_for_backward(q, k, v, out, lse, span, mask)
    ctx.set_materialize_grads(False)


def _stream_backward(ctx, grad_out, *_side_outputs):
    q, k, v, out, lse, span, mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = screened_attention_stream_backward_cpp(
        grad_out, q, k, v, out, lse, span, mask, ctx.initial_slots, ctx.window, ctx.scale
    )
    return dq, dk, dv, None, None, None, None, None, None, None


if _backend.C_ERROR is None:
    screened_attention_stream_cpp = torch.ops.screening_attn.screened_attention_stream.default
    screened_attention_stream_backward_cpp = (
        torch.ops.screening_attn.screened_attention_stream_backward.default
    )
    torch.library.register_fake(screened_attention_stream_cpp)(_fake_stream)
    torch.library.register_fake(screened_attention_stream_backward_cpp)(_fake_stream_backward)
    torch.library.register_autograd(
        screened_attention_stream_cpp, _stream_backward, setup_context=_setup_stream
    )
    no_double_backward(screened_attention_stream_backward_cpp, "screened_attention")


def screened_attention_grouped_cpu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    relevant: int,
    scale: float,
    key_padding_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One ``screened_attention`` call with grouped heads or padding on the C++ kernel:
    ``q (B, H, T, D)``, ``k (B, Hkv, T, D)``, ``v (B, Hkv, T, Dv)``, ``key_padding_mask (B, T)``
    or None. Returns ``(out, relevant_index, relevant_score, relevancy, span)``, the state with
    Hkv heads and ρ = ``relevant`` slots."""
    B, Hkv = k.shape[:2]
    acc = score_dtype(q.dtype)
    none = q.new_empty(B, Hkv, 0, dtype=acc)
    out, _lse, *state = screened_attention_stream_cpp(
        q, k, v, key_padding_mask, none, none.long(), none, window, relevant, scale
    )
    return out, *state


def screened_attention_stream_cpu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    relevant: int,
    scale: float,
    key_padding_mask: Tensor | None = None,
    state: StreamState | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, StreamState]:
    """``reference.screened_attention_stream`` on the C++ kernel: the same arguments (checked by
    the caller) and results. The kernel takes ``state`` as its initial state; the buffers it
    reads are the state's slot keys, its last keys and the new ones, one ``cat`` (none without
    a state), so prefill and single-token decode are one op call each."""
    B, n = q.shape[0], q.shape[2]
    state, rho = stream_start(q, k, v, window, relevant, state)
    P, R0 = state.keys.shape[2], state.slot_keys.shape[2]
    if key_padding_mask is None:
        key_padding_mask = torch.ones((B, n), dtype=torch.bool, device=q.device)
    valid_b = torch.cat([state.valid, key_padding_mask], dim=1)  # (B, S)
    if R0 + P > 0:
        k_all = torch.cat([state.slot_keys, state.keys, k], dim=2)
        v_all = torch.cat([state.slot_values, state.values, v], dim=2)
    else:
        k_all, v_all = k, v
    out, _lse, slot_x, slot_score, relevancy, span = screened_attention_stream_cpp(
        q,
        k_all,
        v_all,
        valid_b,
        state.relevancy,
        state.slot_index,
        state.slot_score,
        window,
        rho,
        scale,
    )
    return _finish(out, state, window, k_all, v_all, valid_b, relevancy, slot_x, slot_score, span)


if _backend.HAS_TRITON:
    # Stubs: the launchers (grid, block sizes, buffers) sit beside their kernels in
    # kernels/attention.py, imported on first call so that importing the package never
    # imports triton.

    @torch.library.custom_op("screening_attn::screened_attention_triton", mutates_args=())
    def screened_attention_triton(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        window: int,
        relevant: int,
        scale: float,
        key_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        # k, v may have Hkv heads dividing H (grouped-query attention); key_padding_mask is
        # (B, T) bool, True = a real token. The state has Hkv heads.
        from screening_attn._kernels.attention import screened_attention_fwd

        check_attention_inputs(q, k, v, window, relevant, scale, grouped=True)
        check_key_padding_mask(key_padding_mask, q)
        return screened_attention_fwd(q, k, v, window, relevant, scale, key_padding_mask)

    @torch.library.custom_op("screening_attn::screened_attention_backward_triton", mutates_args=())
    def screened_attention_backward_triton(
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        span: Tensor,
        window: int,
        scale: float,
        relevant: int = -1,
        key_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # relevant: the forward's ρ; -1 (unknown) costs a host sync that reads it off `span`
        from screening_attn._kernels.attention import screened_attention_bwd

        check_attention_inputs(q, k, v, window, max(relevant, 0), scale, grouped=True)
        check_key_padding_mask(key_padding_mask, q)
        args = (grad_out, q, k, v, out, lse, span, window, scale)
        return screened_attention_bwd(*args, relevant=relevant, key_padding_mask=key_padding_mask)

    screened_attention_triton.register_fake(_fake_forward)
    screened_attention_backward_triton.register_fake(_fake_backward)
    torch.library.register_autograd(
        screened_attention_triton,
        _make_backward(screened_attention_backward_triton, triton=True),
        setup_context=_setup_context,
    )
    no_double_backward(screened_attention_backward_triton, "screened_attention")


def _check_stream_state(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    slot_keys: Tensor,
    slot_values: Tensor,
    keys: Tensor,
    values: Tensor,
    relevant: int,
    relevancy0: Tensor | None = None,
    slot_index0: Tensor | None = None,
    slot_score0: Tensor | None = None,
) -> None:
    """The state arguments of the Triton stream ops, against ``q``, ``k``, ``v`` (checked):
    the kernels index them by raw offsets, so a wrong shape must not reach them."""
    for name, kx in [("slot_keys", slot_keys), ("keys", keys)]:
        if kx.dim() != 4:
            raise ValueError(f"{name} must be 4-d (B, Hkv, ·, D), got shape {tuple(kx.shape)}")
    B, Hkv, n, D = k.shape
    Dv = v.shape[-1]
    R0, P = slot_keys.shape[2], keys.shape[2]
    acc = score_dtype(q.dtype)
    expected: list[tuple[str, Tensor | None, tuple[int, ...], torch.dtype]] = [
        ("slot_keys", slot_keys, (B, Hkv, R0, D), q.dtype),
        ("slot_values", slot_values, (B, Hkv, R0, Dv), q.dtype),
        ("keys", keys, (B, Hkv, P, D), q.dtype),
        ("values", values, (B, Hkv, P, Dv), q.dtype),
        ("relevancy0", relevancy0, (B, Hkv, P), acc),
        ("slot_index0", slot_index0, (B, Hkv, R0), torch.int64),
        ("slot_score0", slot_score0, (B, Hkv, R0), acc),
        ("key_padding_mask", key_padding_mask, (B, P + n), torch.bool),
    ]
    for name, x, shape, dtype in expected:
        if x is None:
            continue
        if tuple(x.shape) != shape or x.dtype != dtype or x.device != q.device:
            raise ValueError(
                f"{name} must be a {dtype} tensor of shape {shape} on {q.device} (R0={R0} "
                f"initial slots, P={P} earlier positions, n={n} new ones), got {x.dtype} "
                f"{tuple(x.shape)} on {x.device}"
            )
    if relevant < R0:
        raise ValueError(f"relevant must be >= the {R0} initial slots, got {relevant}")


def _fake_stream_triton(
    q, k, v, key_padding_mask, slot_keys, slot_values, keys, values, relevancy0, slot_index0,
    slot_score0, window: int, relevant: int, scale: float,
):  # fmt: skip
    B, H, n, _ = q.shape
    Hkv, P, R0 = k.shape[1], relevancy0.shape[-1], slot_index0.shape[-1]
    acc = score_dtype(q.dtype)
    return (
        q.new_empty(B, H, n, v.shape[-1]),
        q.new_empty(B, H, n, dtype=acc),
        q.new_empty(B, Hkv, relevant, dtype=torch.int64),
        q.new_empty(B, Hkv, relevant, dtype=acc),
        q.new_empty(B, Hkv, P + n, dtype=acc),
        q.new_empty(B, Hkv, R0 + P + n, 2, dtype=torch.int32),
    )


def _fake_stream_triton_backward(
    grad_out, q, k, v, slot_keys, slot_values, keys, values, out, lse, span, key_padding_mask,
    window: int, scale: float, relevant: int,
):  # fmt: skip
    return _fake_backward(grad_out, q, k, v, out, lse, span, window, scale)


def _setup_stream_triton(ctx, inputs, output):
    q, k, v, mask, slot_keys, slot_values, keys, values, *_, window, relevant, scale = inputs
    out, lse, *_, span = output
    ctx.window, ctx.scale, ctx.relevant = window, scale, relevant
    ctx.save_for_backward(q, k, v, slot_keys, slot_values, keys, values, out, lse, span, mask)
    ctx.set_materialize_grads(False)


def _stream_triton_backward(ctx, grad_out, *_side_outputs):
    q, k, v, slot_keys, slot_values, keys, values, out, lse, span, mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = screened_attention_stream_backward_triton(
        grad_out, q, k, v, slot_keys, slot_values, keys, values, out, lse, span, mask,
        ctx.window, ctx.scale, ctx.relevant,
    )  # fmt: skip
    return dq, dk, dv, *[None] * 11


def screened_attention_stream_triton_state(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    relevant: int,
    scale: float,
    key_padding_mask: Tensor | None = None,
    state: StreamState | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, StreamState]:
    """``reference.screened_attention_stream`` on the Triton kernels: the same arguments
    (checked by the caller) and results. One call of the op ``screened_attention_stream_triton``
    per prefill or decode step, which takes ``state`` as its initial state."""
    B, n = q.shape[0], q.shape[2]
    state, rho = stream_start(q, k, v, window, relevant, state)
    P, R0 = state.keys.shape[2], state.slot_keys.shape[2]
    S = P + n
    if R0 + P == 0:  # the start: the kernels of one screened_attention call
        mask = key_padding_mask
        valid_b = torch.ones((B, S), dtype=torch.bool, device=q.device) if mask is None else mask
    else:  # the kernels read the state's padding too: one build for every later step
        if key_padding_mask is None:
            key_padding_mask = torch.ones((B, n), dtype=torch.bool, device=q.device)
        valid_b = mask = torch.cat([state.valid, key_padding_mask], dim=1)  # (B, S)
    out, _lse, slot_x, slot_score, relevancy, span = screened_attention_stream_triton(
        q, k, v, mask, state.slot_keys, state.slot_values, state.keys, state.values,
        state.relevancy, state.slot_index, state.slot_score, window, rho, scale,
    )  # fmt: skip
    # the next state gathers its rows from the buffer the kernels read (detached)
    k_all = torch.cat([state.slot_keys, state.keys, k.detach()], dim=2)
    v_all = torch.cat([state.slot_values, state.values, v.detach()], dim=2)
    return _finish(out, state, window, k_all, v_all, valid_b, relevancy, slot_x, slot_score, span)


if _backend.HAS_TRITON:

    @torch.library.custom_op("screening_attn::screened_attention_stream_triton", mutates_args=())
    def screened_attention_stream_triton(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None,
        slot_keys: Tensor,
        slot_values: Tensor,
        keys: Tensor,
        values: Tensor,
        relevancy0: Tensor,
        slot_index0: Tensor,
        slot_score0: Tensor,
        window: int,
        relevant: int,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        # A stream step (docs/streaming.md): the n new q, k, v from the initial state of
        # R0 slots (slot_*) and P earlier positions (keys, values, relevancy0);
        # key_padding_mask (B, P + n). Results as the C++ op screened_attention_stream's.
        from screening_attn._kernels.attention import screened_attention_stream_fwd

        check_attention_inputs(q, k, v, window, relevant, scale, grouped=True)
        state = (slot_keys, slot_values, keys, values, relevancy0, slot_index0, slot_score0)
        _check_stream_state(q, k, v, key_padding_mask, *state[:4], relevant, *state[4:])
        return screened_attention_stream_fwd(
            q, k, v, key_padding_mask, *state, window, relevant, scale
        )

    @torch.library.custom_op(
        "screening_attn::screened_attention_stream_backward_triton", mutates_args=()
    )
    def screened_attention_stream_backward_triton(
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        slot_keys: Tensor,
        slot_values: Tensor,
        keys: Tensor,
        values: Tensor,
        out: Tensor,
        lse: Tensor,
        span: Tensor,
        key_padding_mask: Tensor | None,
        window: int,
        scale: float,
        relevant: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # gradients of the new q, k, v only: the cached keys and values are detached
        from screening_attn._kernels.attention import screened_attention_stream_bwd

        check_attention_inputs(q, k, v, window, relevant, scale, grouped=True)
        state = (slot_keys, slot_values, keys, values)
        _check_stream_state(q, k, v, key_padding_mask, *state, relevant)
        return screened_attention_stream_bwd(
            grad_out, q, k, v, slot_keys, slot_values, keys, values, out, lse, span,
            key_padding_mask, window, scale, relevant,
        )  # fmt: skip

    screened_attention_stream_triton.register_fake(_fake_stream_triton)
    screened_attention_stream_backward_triton.register_fake(_fake_stream_triton_backward)
    torch.library.register_autograd(
        screened_attention_stream_triton,
        _stream_triton_backward,
        setup_context=_setup_stream_triton,
    )
    no_double_backward(screened_attention_stream_backward_triton, "screened_attention")
