"""Relevancy-screened causal attention (SPEC §1)."""

from screening_attn.attention.interface import screened_attention
from screening_attn.attention.reference import screened_attention_reference
from screening_attn.attention.state import ScreeningState

__all__ = ["ScreeningState", "screened_attention", "screened_attention_reference"]
