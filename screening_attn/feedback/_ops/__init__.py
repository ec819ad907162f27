"""Registration glue of the CNN-F ops: fakes and autograd for the C++ ops
(``torch.ops.screening_attn.*``, schemas in csrc/feedback.cpp) and the Triton ops made with
``torch.library.custom_op`` (stubs calling the launchers of kernels/feedback.py).

One module per sub-family, each with the same ops in every implementation: ``CPP`` (the C++
ops, CPU and CUDA when compiled) and ``TRITON`` (None where that implementation is missing):

* :mod:`.gates`: the AdaReLU gate, ``ada_relu``, ``ada_relu_backward``, ``ada_relu_feedback``;
  linear in their gradient inputs, so double backward works;
* :mod:`.norms`: the instance-norm family, ``ins_norm``, ``ins_bias_ada_relu`` (bottom-up
  InsNorm -> Bias -> AdaReLU in one pass) and ``ins_norm_gate`` (top-down InsNorm -> AdaReLU
  feedback), each with its ``*_backward`` op; double backward raises;
* :mod:`.pools`: AdaPool, ``ada_pool2d``, ``ada_unpool2d`` (its feedback and its backward) and
  ``ada_pool2d_gather`` (the unpool's backward); each is the others' backward, so any order of
  derivatives works;
* :mod:`.stages`: the CPU stage fusions ``ins_bias_ada_relu_pool2d`` and ``ada_unpool_gate``
  and their backward ops (C++ only).
"""

from screening_attn.feedback._ops import gates, norms, pools, stages

__all__ = ["gates", "norms", "pools", "stages"]
