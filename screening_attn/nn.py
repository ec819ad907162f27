"""Public modules: ``screening_attn.nn.RelRNN``, ``screening_attn.nn.RelLSTM``."""

from screening_attn.rnn import RelLSTM, RelRNN, RelState

__all__ = ["RelLSTM", "RelRNN", "RelState"]
