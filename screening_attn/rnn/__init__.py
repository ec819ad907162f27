"""Self-attentive recurrent networks with relevancy screening, RelRNN and RelLSTM (SPEC §2)."""

from screening_attn.rnn.reference import RelLSTM, RelRNN, RelState

__all__ = ["RelLSTM", "RelRNN", "RelState"]
