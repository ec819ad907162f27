"""Public ``screened_attention`` (docs/attention.md): check the arguments, pick a backend, run
it (the reference, or a registered op of ``_ops.py``), and wrap the state."""

from __future__ import annotations

import math

import torch

from screening_attn import _backend, _validate
from screening_attn.attention import _ops
from screening_attn.attention.reference import screened_attention_reference
from screening_attn.attention.state import ScreeningState

__all__ = ["KERNELS", "screened_attention"]

# The compiled backends of this op and the dtypes they take.
KERNELS = {"cpu": _backend.CPU_HALF_DTYPES, "triton": _backend.TRITON_DTYPES}


def screened_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    relevant: int,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_state: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, ScreeningState]:
    r"""Relevancy-screened causal dot-product attention (Kerg et al., NeurIPS 2020).

    Each query attends to the last ``window`` positions (itself included) plus a *relevant set*
    of at most ``relevant`` older positions. A key's relevancy ``r`` is the attention mass it
    received while inside the window; when it leaves the window it takes the first empty slot
    of the relevant set, or overwrites the least relevant slot (ties: lowest slot number) if its
    ``r`` is strictly larger, or is dropped for good. Cost per query is ``O(window + relevant)``.
    A drop-in for ``scaled_dot_product_attention(q, k, v, is_causal=True)``: same layout, same
    default scale. Every batch row and KV head is screened independently.

    Which keys query ``t = 9`` sees with ``window=3, relevant=2``::

        key j       0  1  2  3  4  5  6  7  8  9  10 11
        query 9     .  R  .  .  R  .  .  W  W  W  -  -

        W  window: j = t-window+1 .. t
        R  relevant set: slots filled by screening keys <= t-window as they left the window
        .  screened out (dropped or evicted; never comes back)
        -  future (causal)

    Args:
        q (torch.Tensor):
            queries of shape `(B, H, T, D)`.
        k (torch.Tensor):
            keys of shape `(B, Hkv, T, D)`, same dtype and device as `q`. `Hkv` divides `H`
            (grouped-query attention, docs/streaming.md): the `G = H / Hkv` query heads
            `h` with `h // G` equal read one KV head and share its window and relevant set,
            each with its own softmax; the relevancy is the mean over the group. `Hkv = H` is
            ordinary multi-head attention.
        v (torch.Tensor):
            values of shape `(B, Hkv, T, Dv)`, same dtype and device as `q`; `Dv` may differ
            from `D`.
        window (int):
            `ν >= 1`, the number of most recent positions every query sees (itself included).
        relevant (int):
            `ρ >= 0`, the number of slots of the relevant set. `relevant=0` gives causal
            sliding-window attention; `relevant >= T - window` gives full causal attention.
        scale (Optional[float]):
            factor on the logits `<q_t, k_j>`. Default: `None`, meaning `1 / sqrt(D)`.
        key_padding_mask (Optional[torch.Tensor]):
            `(B, T)` bool, True for a real token (transformers' `attention_mask` convention). A
            padded key is never a candidate, gets no relevancy and takes no slot; a padded
            query adds no relevancy; a query without any candidate outputs zeros. Positions
            still count for the window. Default: `None`, no padding.
        return_state (bool):
            also return the `ScreeningState` (final slots, per-key relevancy, and the span of
            queries during which each key was in the relevant set). Default: `False`.
        backend (str):
            `"auto"`, `"reference"`, `"cpu"`, `"triton"` or `"cuda"`. `"auto"` picks the compiled
            kernel for the tensors' device and falls back to the pure-PyTorch reference where
            there is none; asking for a backend that can't run raises a `ValueError` saying why.
            Grouped heads (`Hkv < H`) and `key_padding_mask` run on every backend
            (docs/backends.md). Default: `"auto"`.

    Returns:
        out (torch.Tensor):
            `(B, H, T, Dv)`, dtype of `q`. float16/bfloat16 inputs are computed in float32.
        state (ScreeningState):
            only with `return_state=True`. `relevant_index (B, Hkv, ρ)` int64 (`-1` when
            empty), `relevant_score (B, Hkv, ρ)` and `relevancy (B, Hkv, T)` in float32
            (float64 for float64 inputs; `-inf` for empty slots), `span (B, Hkv, T, 2)` int32.

    Gradients flow to `q`, `k` and `v` with the screening decisions held fixed (the relevancy
    is a statistic and carries none): they are the gradients of masked softmax attention with
    the mask `state.candidate_mask(window)`.

    Empty inputs are fine: `T = 0` or `B = 0` (or `H = 0`) returns an empty `(B, H, T, Dv)`
    output, and with `return_state=True` a state whose slots are all empty (`-1`, `-inf`).
    With `D = 0` every logit is 0, so each query averages the values of its candidates.
    Without `return_state`, `relevant` is capped at `T - window` (the same output), so a huge
    value for full attention allocates nothing. A NaN or Inf in a query row reaches that
    output row only, in a key or value only the outputs of the queries whose candidate set
    holds it (and, through the relevancy, possibly the selection of its own (b, h) row).

    Raises:
        TypeError: a non-tensor, integer or mixed-dtype input, a non-integer (or bool)
            `window`/`relevant` (numpy integers are fine), or a non-real `scale`.
        TypeError: (also) a `key_padding_mask` that is not a bool tensor.
        ValueError: wrong rank, mismatched `(B, H, T, D)`, `H % Hkv != 0`, a
            `key_padding_mask` not of shape `(B, T)`, tensors on different devices,
            `window < 1`, `relevant < 0`, non-finite `scale`, or an unknown or unavailable
            `backend`.

    Examples::
        >>> import torch
        >>> from screening_attn import attention
        >>> B, H, T, D = 2, 4, 256, 64
        >>> q, k, v = torch.randn(3, B, H, T, D).unbind(0)
        >>> out, state = attention.screened_attention(
        ...     q, k, v, window=16, relevant=8, return_state=True
        ... )
        >>> out.shape, state.relevant_index.shape
        (torch.Size([2, 4, 256, 64]), torch.Size([2, 4, 8]))
        >>> full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> torch.allclose(attention.screened_attention(q, k, v, T, 0), full, atol=1e-5)
        True
    """
    window, relevant, scale = _validate.check_attention_inputs(
        q, k, v, window, relevant, scale, grouped=True
    )
    key_padding_mask = _validate.check_key_padding_mask(key_padding_mask, q)
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be a bool, got {return_state!r}")
    if not return_state:
        # At most T - window keys ever reach the set before the last query, so a larger ρ gives
        # the same output; capping it keeps a huge ρ ("full attention") from allocating slots.
        relevant = min(relevant, max(q.shape[2] - window, 0))
    impl = _backend.resolve("screened_attention", backend, q.device, q.dtype, KERNELS)
    if scale is None:
        D = q.shape[-1]
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0  # D = 0: every logit is 0 anyway
    if impl == "reference":
        out, *state = screened_attention_reference(
            q, k, v, window, relevant, scale, key_padding_mask
        )
    elif impl == "cpu" and (key_padding_mask is not None or k.shape[1] != q.shape[1]):
        out, *state = _ops.screened_attention_grouped_cpu(
            q, k, v, window, relevant, scale, key_padding_mask
        )
    elif impl == "cpu":
        out, _lse, *state = _ops.screened_attention_cpp(q, k, v, window, relevant, scale)
    else:  # the Triton kernels take grouped heads and the mask natively
        out, _lse, *state = _ops.screened_attention_triton(
            q, k, v, window, relevant, scale, key_padding_mask
        )
    if not return_state:
        return out
    return out, ScreeningState(*state)
