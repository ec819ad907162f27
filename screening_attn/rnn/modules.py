"""The public RelRNN and RelLSTM modules (docs/rnn.md): parameters with the paper's names,
argument checks, backend choice, and ``RelState``. The math is in ``reference.py`` (pure
PyTorch) and the fused C++/CUDA kernels behind ``_ops.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import torch
from torch import Tensor, nn

from screening_attn import _backend, _validate
from screening_attn.rnn import _ops
from screening_attn.rnn.reference import (
    NONLINEARITIES,
    modrelu,
    rel_lstm_reference,
    rel_rnn_reference,
)

__all__ = ["ModReLU", "RelLSTM", "RelRNN", "RelState"]


class _Factory(TypedDict):
    """The factory keywords of the modules' parameters."""

    device: torch.device | str | None
    dtype: torch.dtype | None


@dataclass
class RelState:
    """Screening state after the last step of a RelRNN / RelLSTM forward.

    Attributes:
        relevant_index (Tensor): `(B, ρ)` int64. The time step held by each slot of the relevant
            set after the last step (the screening done at step T-1 included), in slot order;
            `-1` for an empty slot.
        relevant_score (Tensor): `(B, ρ)`. The relevancy of each slot's state; `-inf` for an
            empty slot. float32 for half inputs, else the input dtype. No gradient.
        relevancy (Tensor): `(T, B)`, dtype of `relevant_score`. ``r_j`` for every state: the
            attention mass it received while in the window (for states still in the window at
            the end, the sum so far). No gradient.
    """

    relevant_index: Tensor
    relevant_score: Tensor
    relevancy: Tensor


# Backends per op, each returning ``(h, relevant_index, relevant_score, relevancy)``. "cpu" and
# "cuda" are the same registered ops (csrc/rnn_loops.cpp), which dispatch on the device;
# _backend.resolve says why one can't run (extension not loaded, no CUDA build).
# Half CPU inputs run the float32 kernels (_ops._in_float32).
_KERNELS = {
    "cpu": _backend.CPU_HALF_DTYPES,
    "cuda": _backend.CUDA_DTYPES,
}
_RNN_IMPLS = {"reference": rel_rnn_reference, "cpu": _ops.rel_rnn_fused, "cuda": _ops.rel_rnn_fused}
_LSTM_IMPLS = {
    "reference": rel_lstm_reference,
    "cpu": _ops.rel_lstm_fused,
    "cuda": _ops.rel_lstm_fused,
}


def _resolve(op: str, backend: str, x: Tensor) -> str:
    return _backend.resolve(op, backend, x.device, x.dtype, _KERNELS)


def _check_sizes(
    input_size: object, hidden_size: object, window: object, relevant: object
) -> tuple[int, int, int, int]:
    return (
        _validate.check_int("input_size", input_size, minimum=1),
        _validate.check_int("hidden_size", hidden_size, minimum=1),
        _validate.check_int("window", window, minimum=1),
        _validate.check_int("relevant", relevant, minimum=0),
    )


def _check_forward(module: RelRNN | RelLSTM, x: object, h0: object) -> tuple[Tensor, Tensor | None]:
    x = _validate.check_tensor("x", x, ndim=3)
    T, B, I = x.shape
    if I != module.input_size:
        raise ValueError(
            f"x must have shape (T, B, input_size={module.input_size}), got shape {tuple(x.shape)}"
        )
    if T == 0:
        raise ValueError(f"x must hold at least one time step (T >= 1), got shape {tuple(x.shape)}")
    _validate.check_same_device_dtype("the module's parameters", module.Ua.weight, x=x)
    if h0 is not None:
        h0 = _validate.check_tensor("h0", h0, ndim=2)
        if tuple(h0.shape) != (B, module.hidden_size):
            raise ValueError(
                f"h0 must have shape (B, hidden_size) = ({B}, {module.hidden_size}), "
                f"got shape {tuple(h0.shape)}"
            )
        _validate.check_same_device_dtype("x", x, h0=h0)
    return x, h0


class ModReLU(nn.Module):
    """``sign(z) · relu(|z| + b)`` with a learned ``b`` of shape `(features,)`.

    Initialized uniform in [-0.01, 0.01], as in the paper's code.
    """

    def __init__(
        self,
        features: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.features = features
        self.b = nn.Parameter(torch.empty(features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.b, -0.01, 0.01)

    def forward(self, z: Tensor) -> Tensor:
        return modrelu(z, self.b)

    def extra_repr(self) -> str:
        return f"features={self.features}"


def _make_nonlinearity(name: object, hidden_size: int, factory: _Factory) -> nn.Module:
    if not isinstance(name, str) or name not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {name!r}")
    if name == "modrelu":
        return ModReLU(hidden_size, **factory)
    return {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "identity": nn.Identity}[
        name
    ]()


class RelRNN(_validate.StateDictChecks, nn.Module):
    r"""Self-attentive RNN with relevancy screening (Kerg et al. 2020, "RelRNN").

    Step t (``φ`` the nonlinearity, ``h0`` zeros when None):

    * t = 0: ``p = U x_0 + V h0``; ``s_0 = p`` (the pre-activation); ``h_0 = φ(p)``.
    * t ≥ 1: over the candidates j (window ``max(0, t-ν) ≤ j ≤ t-1`` and the relevant set),
      ``e_j = v · tanh(Va s_{t-1} + Ua h_j)``, ``α = softmax(e)``, ``c_t = Σ α_j h_j``,
      ``s_t = ½ (h_{t-1} + attn · c_t)``, ``h_t = φ(U x_t + V s_t)``. Window members add α_j
      to their relevancy r_j (no gradient).
    * then, when t ≥ ν, state t-ν leaves the window and is screened into the ρ slots.

    ::

        step t = 7, window=3, relevant=2: the query s_6 attends to
        state   0  1  2  3  4  5  6
                .  R  .  R  W  W  W     W: window (t-ν … t-1), R: relevant set (≤ t-ν-1)

    Parameters have the names and shapes of the paper's code (``bhargav104/MemoryNets``,
    ``RNN.py``, class ``RelMemRNN``), so its state_dicts load (strip the ``rnn.`` prefix of the
    enclosing model): ``U`` Linear(I→Hd, bias), ``V``, ``Ua``, ``Va`` Linear(Hd→Hd, no bias),
    ``v`` `(1, Hd)`, and for modrelu ``nonlinearity.b`` `(Hd,)`.

    Args:
        input_size (int): I, features of ``x``.
        hidden_size (int): Hd.
        window (int): ν ≥ 1, the number of most recent states attended.
        relevant (int): ρ ≥ 0, the size of the relevant set (0: windowed attention only).
        nonlinearity (str): one of ``"tanh"``, ``"relu"``, ``"sigmoid"``, ``"identity"``,
            ``"modrelu"``. The paper's code gives *no* nonlinearity for ``"relu"``; use
            ``"identity"`` to reproduce such a model. Default: ``"tanh"``.
        bias (bool): whether ``U`` has a bias. Default: ``True``.
        device, dtype: factory keywords of the parameters.

    Example::

        >>> import torch
        >>> from screening_attn.nn import RelRNN
        >>> rnn = RelRNN(input_size=10, hidden_size=32, window=4, relevant=2)
        >>> h, state = rnn(torch.randn(50, 8, 10))  # (T, B, I)
        >>> h.shape, state.relevant_index.shape
        (torch.Size([50, 8, 32]), torch.Size([8, 2]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        window: int,
        relevant: int,
        nonlinearity: str = "tanh",
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        input_size, hidden_size, window, relevant = _check_sizes(
            input_size, hidden_size, window, relevant
        )
        bias = _validate.check_bool("bias", bias)
        factory: _Factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.window = window
        self.relevant = relevant
        self.nonlinearity_name = nonlinearity
        # registration order of the paper's RelMemRNN: nonlinearity, U, V, Ua, Va, v
        self.nonlinearity = _make_nonlinearity(nonlinearity, hidden_size, factory)
        self.U = nn.Linear(input_size, hidden_size, bias=bias, **factory)
        self.V = nn.Linear(hidden_size, hidden_size, bias=False, **factory)
        self.Ua = nn.Linear(hidden_size, hidden_size, bias=False, **factory)
        self.Va = nn.Linear(hidden_size, hidden_size, bias=False, **factory)
        self.v = nn.Parameter(torch.empty(1, hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal ``U`` and ``v`` (the paper's defaults), orthogonal ``V`` (the paper
        uses an orthogonal Henaff/Cayley init), ``nn.Linear``'s default for the rest."""
        for lin in (self.U, self.V, self.Ua, self.Va):
            lin.reset_parameters()
        nn.init.xavier_normal_(self.U.weight)
        if self.V.weight.dtype in (torch.float32, torch.float64):
            nn.init.orthogonal_(self.V.weight)
        else:  # QR has no half-precision CPU kernel: draw in float32, then cast
            with torch.no_grad():
                w = torch.empty_like(self.V.weight, dtype=torch.float32)
                self.V.weight.copy_(nn.init.orthogonal_(w))
        nn.init.xavier_normal_(self.v)
        if isinstance(self.nonlinearity, ModReLU):
            self.nonlinearity.reset_parameters()

    def forward(
        self,
        x: Tensor,
        h0: Tensor | None = None,
        *,
        attn: float = 1.0,
        backend: str = "auto",
    ) -> tuple[Tensor, RelState]:
        """Run the whole sequence.

        Args:
            x (Tensor): `(T, B, input_size)`, T ≥ 1 (like ``torch.nn.RNN``; ``T = 0`` is a
                ValueError), B ≥ 0 (``B = 0`` gives an empty ``h`` and state); dtype and device
                of the parameters. A NaN in ``x[t, b]`` reaches row ``b`` from step ``t`` on only.
            h0 (Tensor | None): `(B, hidden_size)`, the state before step 0. Default: zeros.
            attn (float): factor on the context, ``s_t = ½ (h_{t-1} + attn · c_t)``.
                Default: ``1.0``.
            backend (str): ``"auto"`` (the fused C++ kernels for CPU tensors of any floating dtype
                and for CUDA tensors, else the reference), ``"reference"``, ``"cpu"`` or
                ``"cuda"`` (docs/backends.md). Default: ``"auto"``.

        Returns:
            ``h`` `(T, B, hidden_size)`, every h_t; and a :class:`RelState`.

        Gradients flow to every parameter, ``x`` and ``h0`` (full backprop through time) with
        the screening decisions held fixed; the relevancy scores carry no gradient.
        """
        x, h0 = _check_forward(self, x, h0)
        attn = _validate.check_finite_float("attn", attn)
        impl = _resolve("rel_rnn", backend, x)
        b = self.nonlinearity.b if isinstance(self.nonlinearity, ModReLU) else None
        h, *state = _RNN_IMPLS[impl](
            x,
            h0,
            self.U.weight,
            self.U.bias,
            self.V.weight,
            self.Ua.weight,
            self.Va.weight,
            self.v,
            b,
            window=self.window,
            relevant=self.relevant,
            nonlinearity=self.nonlinearity_name,
            attn=attn,
        )
        return h, RelState(*state)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, hidden_size={self.hidden_size}, "
            f"window={self.window}, relevant={self.relevant}, "
            f"nonlinearity={self.nonlinearity_name!r}, bias={self.U.bias is not None}"
        )


class RelLSTM(_validate.StateDictChecks, nn.Module):
    r"""Self-attentive LSTM with relevancy screening (Kerg et al. 2020, "RelLSTM").

    The attention and screening of :class:`RelRNN`, with an LSTM cell: ``s_0 = h0`` (zeros when
    None; no attention at t = 0), for t ≥ 1 ``s_t = ½ (h_{t-1} + c_t)``; then with
    ``z = cat([s_t, x_t])``: ``f, i, o = σ(Wf z), σ(Wi z), σ(Wo z)``, ``g = tanh(Wg z)``,
    ``cell = f ⊙ cell + i ⊙ g`` (cell starts at zeros), ``h_t = o ⊙ tanh(cell)``.

    Parameters have the names and shapes of the paper's code (``bhargav104/MemoryNets``,
    ``LSTM.py``, class ``RelLSTM``): ``Wf, Wi, Wo, Wg`` Linear(Hd+I → Hd, bias), ``Ua``, ``Va``
    Linear(Hd→Hd, no bias), ``v`` `(1, Hd)`.

    Args:
        input_size (int): I, features of ``x``.
        hidden_size (int): Hd.
        window (int): ν ≥ 1, the number of most recent states attended.
        relevant (int): ρ ≥ 0, the size of the relevant set.
        device, dtype: factory keywords of the parameters.

    Example::

        >>> import torch
        >>> from screening_attn.nn import RelLSTM
        >>> lstm = RelLSTM(input_size=10, hidden_size=32, window=4, relevant=2)
        >>> h, state = lstm(torch.randn(50, 8, 10))
        >>> h.shape
        torch.Size([50, 8, 32])
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        window: int,
        relevant: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        input_size, hidden_size, window, relevant = _check_sizes(
            input_size, hidden_size, window, relevant
        )
        factory: _Factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.window = window
        self.relevant = relevant
        n_in = hidden_size + input_size
        self.Wf = nn.Linear(n_in, hidden_size, bias=True, **factory)
        self.Wi = nn.Linear(n_in, hidden_size, bias=True, **factory)
        self.Wo = nn.Linear(n_in, hidden_size, bias=True, **factory)
        self.Wg = nn.Linear(n_in, hidden_size, bias=True, **factory)
        self.Ua = nn.Linear(hidden_size, hidden_size, bias=False, **factory)
        self.Va = nn.Linear(hidden_size, hidden_size, bias=False, **factory)
        self.v = nn.Parameter(torch.empty(1, hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal gate weights and ``v`` (the paper's), ``nn.Linear``'s default for the
        rest."""
        for lin in (self.Wf, self.Wi, self.Wo, self.Wg, self.Ua, self.Va):
            lin.reset_parameters()
        for lin in (self.Wf, self.Wi, self.Wo, self.Wg):
            nn.init.xavier_normal_(lin.weight)
        nn.init.xavier_normal_(self.v)

    def forward(
        self, x: Tensor, h0: Tensor | None = None, *, backend: str = "auto"
    ) -> tuple[Tensor, RelState]:
        """Run the whole sequence.

        Args:
            x (Tensor): `(T, B, input_size)`, T ≥ 1, B ≥ 0, as for :meth:`RelRNN.forward`.
            h0 (Tensor | None): `(B, hidden_size)`, the first attention query and the state fed
                to the gates at t = 0. Default: zeros.
            backend (str): ``"auto"``, ``"reference"``, ``"cpu"`` or ``"cuda"``, as for
                :meth:`RelRNN.forward`. Default: ``"auto"``.

        Returns:
            ``h`` `(T, B, hidden_size)` and a :class:`RelState`.
        """
        x, h0 = _check_forward(self, x, h0)
        impl = _resolve("rel_lstm", backend, x)
        h, *state = _LSTM_IMPLS[impl](
            x,
            h0,
            self.Wf.weight,
            self.Wf.bias,
            self.Wi.weight,
            self.Wi.bias,
            self.Wo.weight,
            self.Wo.bias,
            self.Wg.weight,
            self.Wg.bias,
            self.Ua.weight,
            self.Va.weight,
            self.v,
            window=self.window,
            relevant=self.relevant,
        )
        return h, RelState(*state)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, hidden_size={self.hidden_size}, "
            f"window={self.window}, relevant={self.relevant}"
        )
