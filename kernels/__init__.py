"""Triton kernels of screening_attn (installed as screening_attn._kernels)."""
