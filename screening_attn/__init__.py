"""screening_attn: relevancy-screened attention and CNN-F recurrent feedback kernels.

* :func:`screened_attention` — drop-in for causal ``scaled_dot_product_attention`` that attends
  to a window of recent keys plus a screened set of relevant older ones (Kerg et al., 2020).
* :class:`ScreenedKVCache` — the same attention as a stream (prefill, then decode) holding at
  most ``window - 1 + relevant`` keys and values per KV head, whatever the length.
* :mod:`screening_attn.nn` — ``RelRNN`` and ``RelLSTM``, the paper's self-attentive RNNs.
* :mod:`screening_attn.feedback` — CNN-F recurrent generative feedback (Huang et al., 2020).
"""

from screening_attn import feedback, nn
from screening_attn._backend import build_info
from screening_attn.attention import ScreenedKVCache, ScreeningState, screened_attention

__all__ = [
    "ScreenedKVCache",
    "ScreeningState",
    "build_info",
    "feedback",
    "nn",
    "screened_attention",
]
__version__ = "0.1.0"
