"""The position-wise feed-forward network (Vaswani et al., 2017, sec. 3.3).

    FFN(x) = act(x W1 + b1) W2 + b2

applied to every position separately, with W1: (C, d_ff) and W2: (d_ff, C). The activation
is ReLU in the original Transformer and the tanh approximation of GELU in GPT-2; they, and
the exact GELU, are in nn/activations.py. There is no activation after W2: the output goes
straight back to the residual stream.
"""

import torch
from torch import nn

from tformer.nn import feedforward_step, linear_gelu
from tformer.nn.activations import ACTIVATIONS, Activation, activation_fn, unknown_activation
from tformer.nn.row_blocks import linear

__all__ = ["ACTIVATIONS", "Activation", "FeedForward"]


class FeedForward(nn.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2, (B, T, C) -> (B, T, C)."""

    def __init__(self, d_model: int, d_ff: int, activation: Activation = "gelu_tanh") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise unknown_activation(activation)
        self.activation: Activation = activation
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if feedforward_step.takes(self, x):  # a small model's, one step (its module)
            return feedforward_step.feed_forward(self, x)
        if self.activation == "gelu_tanh" and linear_gelu.takes(self.w1, x):
            hidden = linear_gelu.linear_gelu_tanh(self.w1, x)  # one step (nn/linear_gelu.py)
        else:
            hidden = activation_fn(self.activation, linear(self.w1, x))  # (B, T, d_ff)
        return linear(self.w2, hidden)  # (B, T, d_ff) -> (B, T, C)
