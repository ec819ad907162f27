"""``ScreeningState``: what screened attention selected (docs/attention.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ScreeningState"]


@dataclass
class ScreeningState:
    """The relevant set after the last query, and how every key fared.

    Returned by ``screened_attention(..., return_state=True)``. ``ρ`` is ``relevant``; the score
    dtype is float32, or float64 for float64 inputs.

    Attributes:
        relevant_index (torch.Tensor):
            ``(B, H, ρ)`` int64. The position held by each slot of ``R_T`` (the set after the last
            query, the screening of key ``T-ν`` included), in slot order; ``-1`` for empty slots.
        relevant_score (torch.Tensor):
            ``(B, H, ρ)`` float. The relevancy ``r`` of each slot's key; ``-inf`` for empty slots.
        relevancy (torch.Tensor):
            ``(B, H, T)`` float, same dtype as ``relevant_score``. ``r_j`` for every key ``j``: the
            attention mass it received from the ``ν`` queries whose window held it (for keys still
            in the window at the end, the sum so far).
        span (torch.Tensor):
            ``(B, H, T, 2)`` int32. For each key the half-open range ``[start, end)`` of queries
            during which it sat in the relevant set: ``[-1, -1]`` if never, ``end = T`` if still
            there. A key screened in after the last query (key ``T-ν``) has ``[T, T)``.
    """

    relevant_index: torch.Tensor
    relevant_score: torch.Tensor
    relevancy: torch.Tensor
    span: torch.Tensor

    def candidate_mask(self, window: int) -> torch.Tensor:
        """The mask ``M[b, h, t, j] = (j ∈ C_t)`` rebuilt from ``span`` and ``window``.

        ``C_t`` is the window ``max(0, t-ν+1) ≤ j ≤ t`` plus the keys whose span holds ``t``.
        Given this mask, screened attention equals
        ``scaled_dot_product_attention(q, k, v, attn_mask=M)``.

        O(T²) memory: for tests and debugging only.

        Args:
            window (int): the ``window`` (ν) the state was computed with.

        Returns:
            A bool tensor of shape ``(B, H, T, T)`` (queries on dim 2, keys on dim 3).
        """
        T = self.span.shape[-2]
        pos = torch.arange(T, device=self.span.device)
        t, j = pos[:, None], pos[None, :]
        in_window = (j <= t) & (j > t - window)  # (T, T)
        start = self.span[..., 0].unsqueeze(-2)  # (B, H, 1, T): per key
        end = self.span[..., 1].unsqueeze(-2)
        in_relevant = (start <= t) & (t < end)  # (B, H, T, T); never-kept keys have [-1, -1)
        return in_window | in_relevant
