"""CNN-F recurrent generative feedback (docs/feedback.md).

``reference`` (the ops in plain PyTorch), ``functional`` (the public ops), ``_ops`` (their
registration), ``layers`` / ``linear_maps`` (the layers), ``fusion`` (fused runs of layers),
``sequential`` (the chain of layers), ``models`` (the networks), ``convert`` (the paper's
checkpoints)."""

from screening_attn.feedback.convert import convert_paper_state_dict
from screening_attn.feedback.functional import (
    ada_pool2d,
    ada_relu,
    ada_relu_feedback,
    ada_unpool2d,
    ada_unpool_gate,
    feedback_update,
    ins_bias_ada_relu,
    ins_bias_ada_relu_pool2d,
    ins_norm,
    ins_norm_gate,
)
from screening_attn.feedback.fusion import (
    ada_unpool_gate_layers,
    ins_bias_ada_relu_layers,
    ins_bias_ada_relu_pool_layers,
    ins_norm_gate_layers,
)
from screening_attn.feedback.layers import AdaPool2d, AdaReLU, Bias, FeedbackModule, InsNorm
from screening_attn.feedback.linear_maps import (
    FeedbackConv2d,
    FeedbackLinear,
    Flatten,
    GlobalAvgPool2d,
)
from screening_attn.feedback.models import (
    CNNF,
    CNNFWideResNet,
    FeedbackNetwork,
    WideBasicBlock,
    feedback_step,
)
from screening_attn.feedback.sequential import FeedbackSequential

__all__ = [
    "CNNF",
    "AdaPool2d",
    "AdaReLU",
    "Bias",
    "CNNFWideResNet",
    "FeedbackConv2d",
    "FeedbackLinear",
    "FeedbackModule",
    "FeedbackNetwork",
    "FeedbackSequential",
    "Flatten",
    "GlobalAvgPool2d",
    "InsNorm",
    "WideBasicBlock",
    "ada_pool2d",
    "ada_relu",
    "ada_relu_feedback",
    "ada_unpool2d",
    "ada_unpool_gate",
    "ada_unpool_gate_layers",
    "convert_paper_state_dict",
    "feedback_step",
    "feedback_update",
    "ins_bias_ada_relu",
    "ins_bias_ada_relu_layers",
    "ins_bias_ada_relu_pool2d",
    "ins_bias_ada_relu_pool_layers",
    "ins_norm",
    "ins_norm_gate",
    "ins_norm_gate_layers",
]
