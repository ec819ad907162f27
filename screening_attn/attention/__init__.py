"""Relevancy-screened causal attention (docs/attention.md): the public ``screened_attention``
(``interface.py``), its pure-PyTorch ``screened_attention_reference`` (``reference.py``), the
streaming ``ScreenedKVCache`` (``cache.py``, docs/streaming.md), the registered ops
(``_ops.py``; Triton kernels and launchers in ``kernels/attention.py``)."""

from screening_attn.attention.cache import ScreenedKVCache
from screening_attn.attention.interface import screened_attention
from screening_attn.attention.reference import screened_attention_reference
from screening_attn.attention.state import ScreeningState

__all__ = [
    "ScreenedKVCache",
    "ScreeningState",
    "screened_attention",
    "screened_attention_reference",
]
