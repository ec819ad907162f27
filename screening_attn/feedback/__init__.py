"""CNN-F recurrent generative feedback (SPEC §3)."""

from screening_attn.feedback.convert import convert_paper_state_dict
from screening_attn.feedback.functional import (
    ada_pool2d,
    ada_relu,
    ada_relu_feedback,
    ada_unpool2d,
    feedback_update,
    ins_bias_ada_relu,
    ins_norm_gate,
)
from screening_attn.feedback.layers import (
    AdaPool2d,
    AdaReLU,
    Bias,
    FeedbackConv2d,
    FeedbackLinear,
    FeedbackModule,
    FeedbackSequential,
    Flatten,
    GlobalAvgPool2d,
    InsNorm,
    ins_bias_ada_relu_layers,
    ins_norm,
    ins_norm_gate_layers,
)
from screening_attn.feedback.models import (
    CNNF,
    CNNFWideResNet,
    FeedbackNetwork,
    WideBasicBlock,
    feedback_step,
)

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
    "convert_paper_state_dict",
    "feedback_step",
    "feedback_update",
    "ins_bias_ada_relu",
    "ins_bias_ada_relu_layers",
    "ins_norm",
    "ins_norm_gate",
    "ins_norm_gate_layers",
]
