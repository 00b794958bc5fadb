"""The lab: instruments for looking inside a model, and the residual / LayerNorm experiment."""

from tformer.lab.instruments import (
    GradientReport,
    attention_entropy,
    gradient_report,
    logit_lens,
    residual_norms,
)

__all__ = [
    "GradientReport",
    "attention_entropy",
    "gradient_report",
    "logit_lens",
    "residual_norms",
]
