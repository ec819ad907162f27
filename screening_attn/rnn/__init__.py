"""Self-attentive recurrent networks with relevancy screening, RelRNN and RelLSTM (docs/rnn.md)."""

from screening_attn.rnn.modules import RelLSTM, RelRNN, RelState

__all__ = ["RelLSTM", "RelRNN", "RelState"]
