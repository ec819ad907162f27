"""Screened attention in transformers models (docs/streaming.md#transformers).

Importing this module (``pip install screening_attn[hf]``) registers ``attn_implementation=
"screened"`` for the attention function and for the attention mask, and provides
``ScreenedCache``, a transformers ``Cache`` whose layers are ``ScreenedKVCache`` streams::

    import screening_attn.hf
    config.screening_window, config.screening_relevant = 64, 32
    model = AutoModelForCausalLM.from_config(config, attn_implementation="screened")
    out = model.generate(ids, cache=ScreenedCache(config=model.config), max_new_tokens=100)

How it fits transformers (checked against 5.24):

* The mask function returns the padding of the new positions only, a ``(B, q)`` bool tensor or
  None: causality, the window and the relevant set are the op's. (A name with no registered mask
  function would get ``attention_mask=None`` and silently drop padding.)
* Keys reach the attention function after the rotary embedding and unexpanded
  (``num_key_value_heads``); the output is ``(B, q, H, Dv)``.
* ``ScreenedCache.update`` stores nothing itself: it hands the new keys and values on, and the
  attention function streams them through the layer's ``ScreenedKVCache`` together with the
  queries (screening needs both). The layer reaches the attention function through the keyword
  arguments that the models pass to ``Cache.update`` and then to the attention function; a layer
  whose keys were never attended raises at its next update instead of computing garbage.
* ``get_seq_length()`` counts positions seen (generate and the position ids use it);
  ``get_mask_sizes`` reports the new positions only, since a window plus slots is not one
  contiguous range.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, Cache
from transformers.cache_utils import CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from screening_attn.attention import ScreenedKVCache, screened_attention

__all__ = ["NAME", "ScreenedCache", "ScreenedLayer", "screened_attention_forward", "screened_mask"]

NAME = "screened"
# The keyword under which ScreenedLayer.update hands itself to the attention function.
_LAYER_KEY = "screened_cache_layer"
_FIELDS = ("screening_window", "screening_relevant")


def screening_params(config: Any) -> tuple[int, int]:
    """``(window, relevant)`` from a model config's ``screening_window`` and
    ``screening_relevant`` (a ValueError naming the fields to set when they are missing)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    missing = [f for f in _FIELDS if getattr(text, f, None) is None]
    if missing:
        raise ValueError(
            f"screened attention takes its window and relevant-set size from the model config: "
            f"set {' and '.join(f'config.{f}' for f in missing)} (ints, e.g. "
            f"config.screening_window = 64; config.screening_relevant = 32)"
        )
    return int(text.screening_window), int(text.screening_relevant)


def screened_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The attention mask of ``attn_implementation="screened"``: the padding of the ``q_length``
    new positions, ``(B, q)`` bool (True = real token), or None when nothing is padded. The
    pattern (``mask_function``: causal, sliding) is the op's business and is ignored."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -q_length:].to(torch.bool)
    return None if bool(mask.all()) else mask


class ScreenedLayer(CacheLayerMixin):
    """One layer of a ``ScreenedCache``: a ``ScreenedKVCache`` of ``window - 1 + relevant``
    keys and values per (batch row, KV head) at most.

    ``keys``/``values`` stay None: what is stored is the stream's state (``self.stream``)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, window: int, relevant: int) -> None:
        super().__init__()
        self.window, self.relevant = window, relevant
        self.stream: ScreenedKVCache | None = None  # made by the first attend (it fixes scale)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold the new keys and values for the attention function and return them unchanged."""
        if self._pending is not None:
            raise RuntimeError(
                "ScreenedCache: the keys of the previous forward never reached the screened "
                "attention function; run the model with attn_implementation='screened'"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = (key_states, value_states)
        forwarded = kwargs.get("kwargs")
        if isinstance(forwarded, dict):  # the models pass these on to the attention function
            forwarded[_LAYER_KEY] = self
        return key_states, value_states

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        scale: float | None,
    ) -> torch.Tensor:
        """Stream the pending keys and values with their queries; ``(B, H, q, Dv)``."""
        if self._pending is None or key is not self._pending[0]:
            raise RuntimeError("ScreenedLayer.attend: these keys did not come from update()")
        self._pending = None
        if self.stream is None:
            self.stream = ScreenedKVCache(self.window, self.relevant, scale=scale)
        elif self.stream.scale != scale:
            raise ValueError(f"ScreenedCache: scale {scale} differs from {self.stream.scale}")
        return self.stream.attend(query, key, value, key_padding_mask)

    def get_seq_length(self) -> int:
        """Positions seen, padded ones included (not the number stored)."""
        pending = 0 if self._pending is None else self._pending[0].shape[-2]
        return (0 if self.stream is None else self.stream.seen) + pending

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The attention function gets the new keys only; the mask it gets is their padding.
        return query_length, 0

    def get_max_length(self) -> int:
        return -1

    def stored(self) -> int:
        """Keys (and values) held per (batch row, KV head): at most ``window - 1 + relevant``."""
        return 0 if self.stream is None else self.stream.stored

    def nbytes(self) -> int:
        """Bytes of every tensor the layer holds."""
        return 0 if self.stream is None else self.stream.nbytes()

    def reset(self) -> None:
        self.stream, self._pending = None, None
        self.is_initialized = False

    def offload(self) -> None:  # the state is small by design: it stays where it is
        pass

    def prefetch(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                "ScreenedCache cannot crop: the screening decisions of the removed positions "
                "cannot be undone (assisted decoding needs a croppable cache)"
            )

    def _select(self, index: torch.Tensor) -> None:
        if self.stream is not None and self.stream.seen > 0:
            self.stream.select(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch_size = None if self.stream is None else self.stream.batch_size
        if self.stream is not None and batch_size is not None:
            rows = torch.arange(batch_size, device=self.device)
            self.stream.select(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)


class ScreenedCache(Cache):
    """A transformers ``Cache`` of ``ScreenedLayer`` s, one per decoder layer: generating keeps
    at most ``window - 1 + relevant`` keys and values per layer, batch row and KV head.

    Args:
        config: the model config; ``config.screening_window`` and
            ``config.screening_relevant`` give ν and ρ, ``num_hidden_layers`` the layers.
    """

    def __init__(self, config: Any) -> None:
        self.window, self.relevant = screening_params(config)
        text = config.get_text_config(decoder=True)
        self.screened_layers = [
            ScreenedLayer(self.window, self.relevant) for _ in range(text.num_hidden_layers)
        ]
        super().__init__(layers=[*self.screened_layers])

    def stored(self) -> list[int]:
        """Per layer, the keys held per (batch row, KV head)."""
        return [layer.stored() for layer in self.screened_layers]

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds."""
        return sum(layer.nbytes() for layer in self.screened_layers)


def screened_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function of ``attn_implementation="screened"``.

    ``query (B, H, q, D)``, ``key``/``value (B, Hkv, kv, D)`` after the rotary embedding;
    ``attention_mask`` is ``screened_mask``'s padding of the new positions. With a
    ``ScreenedCache`` the new positions continue the layer's stream; without a cache, the ``q``
    queries and keys are the whole sequence. Returns ``(B, q, H, Dv)`` and no weights.
    """
    window, relevant = screening_params(module.config)
    if dropout:
        raise ValueError("screened attention has no attention dropout; set attention_dropout=0")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"screened attention takes the 2-d padding mask of its mask function, got an "
            f"attention_mask of shape {tuple(attention_mask.shape)}"
        )
    layer = kwargs.get(_LAYER_KEY)
    if layer is not None:
        if (layer.window, layer.relevant) != (window, relevant):
            raise ValueError(
                f"ScreenedCache was made for screening_window={layer.window}, "
                f"screening_relevant={layer.relevant}; the model has {window}, {relevant}"
            )
        out = layer.attend(query, key, value, attention_mask, scaling)
    else:
        if key.shape[2] != query.shape[2]:
            raise ValueError(
                f"screened attention needs every query of a stream: got {query.shape[2]} "
                f"queries for {key.shape[2]} keys, i.e. a cache other than ScreenedCache; pass "
                f"cache=ScreenedCache(config=model.config), or use_cache=False"
            )
        out = screened_attention(
            query, key, value, window, relevant, scale=scaling, key_padding_mask=attention_mask
        )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, screened_attention_forward)
AttentionMaskInterface.register(NAME, screened_mask)
