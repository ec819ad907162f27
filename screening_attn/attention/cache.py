"""``ScreenedKVCache``: screened attention as a stream, with bounded memory (docs/streaming.md).

The cache holds exactly what later queries can still see, per (b, KV head): the last ν-1 keys
and values with their relevancy so far, the ρ slots of the relevant set (keys, values, scores,
positions) and the number of positions seen. ``attend`` runs the next positions from that state
(the C++ kernel on CPU, the Triton kernels on CUDA, else the reference's
``screened_attention_stream``), so any split of a sequence into calls gives the one-call result.
"""

from __future__ import annotations

import math

import torch

from screening_attn import _backend, _validate
from screening_attn.attention import _ops
from screening_attn.attention.reference import StreamState, screened_attention_stream

__all__ = ["ScreenedKVCache"]

# The compiled backends of the stream form and the dtypes they take (docs/backends.md).
KERNELS = {"cpu": _backend.CPU_HALF_DTYPES, "triton": _backend.TRITON_DTYPES}
_STREAMS = {
    "cpu": _ops.screened_attention_stream_cpu,
    "triton": _ops.screened_attention_stream_triton_state,
    "reference": screened_attention_stream,
}


class ScreenedKVCache:
    """A streaming KV cache for screened attention: at most ``window - 1 + relevant`` keys and
    values per (batch row, KV head), whatever the length of the stream.

    Args:
        window (int): `ν >= 1`, the most recent positions every query sees (itself included).
        relevant (int): `ρ >= 0`, the slots of the relevant set (one set per KV head).
        scale (Optional[float]): factor on the logits; `None` means `1 / sqrt(D)`.
        backend (str): `"auto"` (the C++ kernel for CPU tensors, the Triton kernels for CUDA
            tensors, else the reference), `"reference"`, `"cpu"` or `"triton"`; checked on
            each ``attend`` against its tensors.

    The first ``attend`` fixes the batch size, the heads, the head dims, the dtype and the
    device; later calls must match them (a ``ValueError``/``TypeError`` says what differs).
    ``reset()`` empties the cache for a new stream.

    Examples::
        >>> import torch
        >>> from screening_attn import ScreenedKVCache, screened_attention
        >>> q, k, v = torch.randn(3, 1, 2, 10, 8, dtype=torch.float64).unbind(0)
        >>> cache = ScreenedKVCache(window=3, relevant=2)
        >>> out = torch.cat([cache.attend(q[:, :, :6], k[:, :, :6], v[:, :, :6]),
        ...                  cache.attend(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:])], dim=2)
        >>> torch.allclose(out, screened_attention(q, k, v, 3, 2), rtol=0, atol=1e-12)
        True
        >>> cache.seen, cache.stored
        (10, 4)
    """

    def __init__(
        self, window: int, relevant: int, *, scale: float | None = None, backend: str = "auto"
    ) -> None:
        self.window = _validate.check_int("window", window, minimum=1)
        self.relevant = _validate.check_int("relevant", relevant, minimum=0)
        self.scale = _validate.check_finite_scale("scale", scale)
        self.backend = _backend.check_backend(backend)
        self._state: StreamState | None = None
        self._heads: int | None = None  # H, the query heads, fixed by the first call

    @property
    def seen(self) -> int:
        """The number of positions seen so far (padded ones included), not the number stored."""
        return 0 if self._state is None else self._state.seen

    @property
    def stored(self) -> int:
        """Keys (and values) held per (batch row, KV head): at most ``window - 1 + relevant``."""
        s = self._state
        return 0 if s is None else s.keys.shape[2] + s.slot_keys.shape[2]

    @property
    def batch_size(self) -> int | None:
        """The batch size fixed by the first ``attend`` (None before it)."""
        return None if self._state is None else self._state.keys.shape[0]

    @property
    def relevant_index(self) -> torch.Tensor | None:
        """``(B, Hkv, ρ)`` int64: the position held by each slot, ``-1`` when empty, as in
        ``ScreeningState.relevant_index`` of one ``screened_attention`` call over everything
        seen (None before the first ``attend``)."""
        if self._state is None:
            return None
        missing = self.relevant - self._state.slot_index.shape[-1]
        return torch.nn.functional.pad(self._state.slot_index, (0, missing), value=-1)

    @property
    def relevant_score(self) -> torch.Tensor | None:
        """``(B, Hkv, ρ)``: each slot's relevancy, ``-inf`` when empty (None before the first
        ``attend``)."""
        if self._state is None:
            return None
        missing = self.relevant - self._state.slot_score.shape[-1]
        return torch.nn.functional.pad(self._state.slot_score, (0, missing), value=-math.inf)

    def nbytes(self) -> int:
        """Bytes of memory the cache's tensors keep alive (their storages, counted once)."""
        s = self._state
        if s is None:
            return 0
        tensors = (s.keys, s.values, s.relevancy, s.valid, s.slot_keys, s.slot_values)
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in (*tensors, s.slot_index, s.slot_score)
        }
        return sum(storages.values())

    def reset(self) -> None:
        """Forget everything: the next ``attend`` starts a new stream."""
        self._state = None
        self._heads = None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Screened attention of the next ``n >= 1`` positions, and update the cache.

        Args:
            q: ``(B, H, n, D)``; k: ``(B, Hkv, n, D)``; v: ``(B, Hkv, n, Dv)``, one dtype and
                device, ``H % Hkv == 0``.
            key_padding_mask: ``(B, n)`` bool, True for a real token; None: all real.

        Returns:
            ``(B, H, n, Dv)``: what one ``screened_attention`` call over every position seen
            gives for these n. Differentiable in q, k, v of this call (the cached keys and
            values are detached).
        """
        _validate.check_attention_inputs(q, k, v, 1, 0, grouped=True)
        key_padding_mask = _validate.check_key_padding_mask(key_padding_mask, q)
        if q.shape[2] < 1:
            raise ValueError(f"q, k, v must hold n >= 1 new positions, got n = {q.shape[2]}")
        self._check_matches(q, k, v)
        impl = _backend.resolve("ScreenedKVCache", self.backend, q.device, q.dtype, KERNELS)
        D = q.shape[-1]
        scale = self.scale
        if scale is None:
            scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
        out, *_, self._state = _STREAMS[impl](
            q, k, v, self.window, self.relevant, scale, key_padding_mask, self._state
        )
        self._heads = q.shape[1]
        return out

    def _check_matches(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        s = self._state
        if s is None:
            return
        B, Hkv, _, D = s.keys.shape
        got = {
            "batch size": (q.shape[0], B),
            "number of query heads": (q.shape[1], self._heads),
            "number of KV heads": (k.shape[1], Hkv),
            "head dim of q and k": (q.shape[-1], D),
            "head dim of v": (v.shape[-1], s.values.shape[-1]),
        }
        for what, (new, old) in got.items():
            if new != old:
                raise ValueError(
                    f"ScreenedKVCache holds a stream with {what} {old}, got {new}; call "
                    f"reset() to start a new stream, or reorder()/select() batch rows"
                )
        if q.dtype != s.keys.dtype:
            raise TypeError(f"ScreenedKVCache holds {s.keys.dtype} keys, got {q.dtype} inputs")
        if q.device != s.keys.device:
            raise ValueError(f"ScreenedKVCache is on {s.keys.device}, got inputs on {q.device}")

    def _rows(self, index: object, name: str) -> tuple[StreamState, torch.Tensor]:
        """The state and ``index`` as int64 batch rows, checked."""
        state = self._state
        if state is None:
            raise ValueError(f"ScreenedKVCache.{name}: the cache is empty (no attend yet)")
        B = state.keys.shape[0]
        if not isinstance(index, torch.Tensor) or index.dim() != 1:
            raise TypeError(f"index must be a 1-d tensor of batch rows, got {index!r}")
        if index.dtype == torch.bool:
            if index.shape[0] != B:
                raise ValueError(f"a bool index must have B = {B} entries, got {index.shape[0]}")
            index = index.nonzero().flatten()
        if index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"index must hold integer or bool batch rows, got {index.dtype}")
        index = index.to(device=state.keys.device, dtype=torch.int64)
        if index.numel() and (index.min() < 0 or index.max() >= B):
            raise ValueError(f"index must hold batch rows in [0, {B}), got {index.tolist()}")
        return state, index

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder the batch rows (beam search): row ``i`` becomes old row ``index[i]``.

        Args:
            index: ``(B,)`` integer tensor of rows in ``[0, B)``; repeats allowed.
        """
        state, index = self._rows(index, "reorder")
        B = state.keys.shape[0]
        if index.shape[0] != B:
            raise ValueError(
                f"reorder keeps the batch size: index must have B = {B} entries, got "
                f"{index.shape[0]}; select() changes the batch size"
            )
        self._state = state.index_select(index)

    def select(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (integers, repeats allowed, or a ``(B,)`` bool mask):
        the batch size becomes their number."""
        state, index = self._rows(index, "select")
        self._state = state.index_select(index)
