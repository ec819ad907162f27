"""screening_attn: relevancy-screened attention and CNN-F recurrent feedback kernels."""

from screening_attn._backend import build_info

__all__ = ["build_info"]
