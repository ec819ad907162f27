"""CNN-F recurrent generative feedback (SPEC §3)."""

from screening_attn.feedback.convert import convert_paper_state_dict
from screening_attn.feedback.functional import ada_relu, ada_relu_feedback
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
    ins_norm,
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
    "ada_relu",
    "ada_relu_feedback",
    "convert_paper_state_dict",
    "feedback_step",
    "ins_norm",
]
