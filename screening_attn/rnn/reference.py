"""Pure-PyTorch reference of RelRNN and RelLSTM (docs/rnn.md): readable, float64-capable, the
definition of correct for every fused kernel. Imports only torch: the modules that use it
(``RelRNN``, ``RelLSTM``) are in ``modules.py``.

Both networks attend, at every step t >= 1, from a query state ``s_{t-1}`` to

* the *window*: the last ν hidden states ``h_{t-ν} … h_{t-1}`` (fewer at the start), and
* the *relevant set*: at most ρ older states, kept in ρ numbered slots per batch row,

with additive scores ``e_j = v · tanh(Va s_{t-1} + Ua h_j)``. A state's relevancy ``r_j`` is the
attention mass it received while in the window (no gradient). When it leaves the window it is
screened by the slot rule of docs/attention.md: first empty slot; else it overwrites the slot
with the smallest score (lowest slot number on ties) if its score is strictly larger; else it
is dropped.

Layout is time-major like ``torch.nn.RNN``: ``x (T, B, I)``, ``h (T, B, Hd)``; ``h0 (B, Hd)`` as in
the paper's code (``x.new_zeros(x.shape[0], hidden_size)`` per step), not ``(layers, B, Hd)``.

The time loop is in Python; everything inside a step is batched over the B rows, each of which
has its own window contents and relevant set (screening uses gather/where, not a loop over rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NONLINEARITIES", "modrelu", "rel_lstm_reference", "rel_rnn_reference"]

NONLINEARITIES = ("tanh", "relu", "sigmoid", "identity", "modrelu")


def modrelu(z: Tensor, b: Tensor) -> Tensor:
    """``sign(z) · relu(|z| + b)`` (Arjovsky et al. 2016), with ``b`` of shape `(Hd,)`."""
    return torch.sign(z) * F.relu(z.abs() + b)


def _activate(z: Tensor, nonlinearity: str, modrelu_b: Tensor | None) -> Tensor:
    if nonlinearity == "tanh":
        return torch.tanh(z)
    if nonlinearity == "relu":
        return F.relu(z)
    if nonlinearity == "sigmoid":
        return torch.sigmoid(z)
    if nonlinearity == "identity":
        return z
    if nonlinearity == "modrelu":
        if modrelu_b is None:
            raise ValueError("nonlinearity='modrelu' needs modrelu_b, got None")
        return modrelu(z, modrelu_b)
    raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    # softmax and r accumulate in float32 for half inputs (docs/numerics.md)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Memory:
    """Window and relevant set of every batch row, plus the relevancy of every state.

    Each state is stored next to ``Ua h_j``, computed once when the state is produced: the
    attention of later steps only adds ``Va s`` to it.
    """

    def __init__(self, window: int, relevant: int, T: int, like: Tensor) -> None:
        B, Hd = like.shape
        self.window = window
        self.relevant = relevant
        self.score_dtype = _score_dtype(like.dtype)
        self.win_h: list[Tensor] = []  # each (B, Hd), oldest first
        self.win_uah: list[Tensor] = []
        self.win_start = 0  # time step of win_h[0]
        self.slot_h = like.new_zeros(B, relevant, Hd)
        self.slot_uah = like.new_zeros(B, relevant, Hd)
        self.slot_index = torch.full((B, relevant), -1, dtype=torch.int64, device=like.device)
        self.slot_score = torch.full(
            (B, relevant), float("-inf"), dtype=self.score_dtype, device=like.device
        )
        self.relevancy = torch.zeros(T, B, dtype=self.score_dtype, device=like.device)

    def attend(self, s: Tensor, Va_weight: Tensor, v: Tensor) -> Tensor:
        """Context ``c = Σ_j α_j h_j`` for the query ``s (B, Hd)``; adds α to the window's r."""
        query = F.linear(s, Va_weight)  # (B, Hd)
        keys = torch.stack(self.win_uah, 1)  # (B, w, Hd)
        values = torch.stack(self.win_h, 1)
        w = keys.shape[1]
        if self.relevant:
            keys = torch.cat([keys, self.slot_uah], 1)  # (B, w+ρ, Hd)
            values = torch.cat([values, self.slot_h], 1)
        e = torch.tanh(query.unsqueeze(1) + keys) @ v.reshape(-1)  # (B, w+ρ)
        if self.relevant:
            empty = self.slot_index < 0  # (B, ρ)
            e = e.masked_fill(torch.cat([empty.new_zeros(empty.shape[0], w), empty], 1), -torch.inf)
        alpha = torch.softmax(e, dim=1, dtype=self.score_dtype)  # window never empty: no NaN
        self.relevancy[self.win_start : self.win_start + w] += alpha[:, :w].detach().T
        return (alpha.to(values.dtype).unsqueeze(1) @ values).squeeze(1)  # (B, Hd)

    def push(self, h: Tensor, uah: Tensor) -> None:
        """Append the newest state; the one that leaves the window is screened."""
        self.win_h.append(h)
        self.win_uah.append(uah)
        if len(self.win_h) > self.window:
            self._screen(self.win_start, self.win_h.pop(0), self.win_uah.pop(0))
            self.win_start += 1

    def _screen(self, pos: int, h: Tensor, uah: Tensor) -> None:
        if not self.relevant:
            return
        r = self.relevancy[pos]  # (B,) final: pos has left the window
        empty = self.slot_index < 0  # (B, ρ)
        has_empty = empty.any(1)
        first_empty = empty.to(torch.int8).argmax(1)  # argmax/argmin: first index on ties
        weakest = self.slot_score.argmin(1)
        target = torch.where(has_empty, first_empty, weakest)  # (B,)
        target_score = self.slot_score.gather(1, target.unsqueeze(1)).squeeze(1)
        take = has_empty | (r > target_score)  # strictly larger evicts
        slots = torch.arange(self.relevant, device=target.device)
        hit = (slots == target.unsqueeze(1)) & take.unsqueeze(1)  # (B, ρ), one True at most
        self.slot_index = torch.where(hit, pos, self.slot_index)
        self.slot_score = torch.where(hit, r.unsqueeze(1), self.slot_score)
        self.slot_h = torch.where(hit.unsqueeze(2), h.unsqueeze(1), self.slot_h)
        self.slot_uah = torch.where(hit.unsqueeze(2), uah.unsqueeze(1), self.slot_uah)

    def state(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(relevant_index, relevant_score, relevancy)`` after the last step."""
        return self.slot_index, self.slot_score, self.relevancy


def rel_rnn_reference(
    x: Tensor,
    h0: Tensor | None,
    U_weight: Tensor,
    U_bias: Tensor | None,
    V_weight: Tensor,
    Ua_weight: Tensor,
    Va_weight: Tensor,
    v: Tensor,
    modrelu_b: Tensor | None = None,
    *,
    window: int,
    relevant: int,
    nonlinearity: str = "tanh",
    attn: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RelRNN forward on checked arguments (docs/rnn.md); the module is ``RelRNN``.

    Args:
        x (Tensor): inputs of shape `(T, B, I)`, `T >= 1`.
        h0 (Optional[Tensor]): the state before step 0, `(B, Hd)`; `None` means zeros.
        U_weight (Tensor): `(Hd, I)`; with `U_bias` `(Hd,)` or `None`, the input map.
        V_weight, Ua_weight, Va_weight (Tensor): `(Hd, Hd)` each, as in ``nn.Linear``.
        v (Tensor): `(1, Hd)`, the additive score's vector.
        modrelu_b (Optional[Tensor]): `(Hd,)`, needed for `nonlinearity="modrelu"`.
            Default: `None`.
        window (int): `ν >= 1`, the states attended most recently produced.
        relevant (int): `ρ >= 0`, slots of the relevant set.
        nonlinearity (str): one of :data:`NONLINEARITIES`. Default: `"tanh"`.
        attn (float): factor on the context. Default: `1.0`.

    Returns:
        h (Tensor): `(T, B, Hd)`, every `h_t`.
        relevant_index (Tensor): `(B, ρ)` int64, the step held by each slot; `-1` if empty.
        relevant_score (Tensor): `(B, ρ)`, each slot's relevancy; `-inf` if empty.
        relevancy (Tensor): `(T, B)`, every state's relevancy. Scores are float32 for half
            inputs, else the input dtype, and carry no gradient.
    """
    T, B, _ = x.shape
    Hd = U_weight.shape[0]
    if h0 is None:
        h0 = x.new_zeros(B, Hd)
    # The input part of every step at once; unbind, not ux[t]: the backward of T indexing ops
    # would write T full-size (T, B, Hd) gradients (quadratic time), unbind's stacks them once.
    ux = F.linear(x, U_weight, U_bias).unbind(0)
    memory = _Memory(window, relevant, T, h0)
    hs: list[Tensor] = []
    for t in range(T):
        if t == 0:
            pre = ux[0] + F.linear(h0, V_weight)
            s = pre  # the first query is the pre-activation (as in the paper's code)
        else:
            c = memory.attend(s, Va_weight, v)
            s = 0.5 * (hs[-1] + attn * c)
            pre = ux[t] + F.linear(s, V_weight)
        h = _activate(pre, nonlinearity, modrelu_b)
        hs.append(h)
        memory.push(h, F.linear(h, Ua_weight))
    return torch.stack(hs), *memory.state()


def rel_lstm_reference(
    x: Tensor,
    h0: Tensor | None,
    Wf_weight: Tensor,
    Wf_bias: Tensor,
    Wi_weight: Tensor,
    Wi_bias: Tensor,
    Wo_weight: Tensor,
    Wo_bias: Tensor,
    Wg_weight: Tensor,
    Wg_bias: Tensor,
    Ua_weight: Tensor,
    Va_weight: Tensor,
    v: Tensor,
    *,
    window: int,
    relevant: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RelLSTM forward on checked arguments (docs/rnn.md); the module is ``RelLSTM``.

    The cell state starts at zeros.

    Args:
        x (Tensor): inputs of shape `(T, B, I)`, `T >= 1`.
        h0 (Optional[Tensor]): `(B, Hd)`, the first attention query and the state fed to the
            gates at step 0; `None` means zeros.
        Wf_weight, Wi_weight, Wo_weight, Wg_weight (Tensor): `(Hd, Hd + I)` each, acting on
            `cat([s_t, x_t])` (state first); with the biases `Wf_bias` … `Wg_bias` `(Hd,)`.
        Ua_weight, Va_weight (Tensor): `(Hd, Hd)` each, as in ``nn.Linear``.
        v (Tensor): `(1, Hd)`, the additive score's vector.
        window (int): `ν >= 1`.
        relevant (int): `ρ >= 0`.

    Returns:
        `(h, relevant_index, relevant_score, relevancy)`, as :func:`rel_rnn_reference`.
    """
    T, B, _ = x.shape
    Hd = Ua_weight.shape[0]
    if h0 is None:
        h0 = x.new_zeros(B, Hd)
    memory = _Memory(window, relevant, T, h0)
    cell = x.new_zeros(B, Hd)
    s = h0  # s_0 = h0, no attention at t = 0
    xs = x.unbind(0)  # not x[t]: see rel_rnn_reference
    hs: list[Tensor] = []
    for t in range(T):
        if t > 0:
            s = 0.5 * (hs[-1] + memory.attend(s, Va_weight, v))
        inp = torch.cat([s, xs[t]], 1)
        f = torch.sigmoid(F.linear(inp, Wf_weight, Wf_bias))
        i = torch.sigmoid(F.linear(inp, Wi_weight, Wi_bias))
        o = torch.sigmoid(F.linear(inp, Wo_weight, Wo_bias))
        g = torch.tanh(F.linear(inp, Wg_weight, Wg_bias))
        cell = f * cell + i * g
        h = o * torch.tanh(cell)
        hs.append(h)
        memory.push(h, F.linear(h, Ua_weight))
    return torch.stack(hs), *memory.state()
