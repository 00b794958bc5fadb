"""The position-wise feed-forward network (Vaswani et al., 2017, sec. 3.3).

    FFN(x) = act(x W1 + b1) W2 + b2

applied to every position separately, with W1: (C, d_ff) and W2: (d_ff, C). The activation
is ReLU, max(0, z), in the original Transformer and the tanh approximation of GELU in GPT-2:

    gelu_tanh(z) = 0.5 z (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3)))
    gelu(z)      = z Phi(z) = 0.5 z (1 + erf(z / sqrt(2)))      (exact; nanoGPT, BERT)

There is no activation after W2: the output goes straight back to the residual stream.
"""

from typing import Literal

import torch
from torch import nn

Activation = Literal["relu", "gelu_tanh", "gelu"]
ACTIVATIONS = ("relu", "gelu_tanh", "gelu")


def activation_fn(name: Activation, z: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(z)
    if name == "gelu_tanh":
        return nn.functional.gelu(z, approximate="tanh")
    if name == "gelu":
        return nn.functional.gelu(z)
    raise ValueError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}")


class FeedForward(nn.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2, (B, T, C) -> (B, T, C)."""

    def __init__(self, d_model: int, d_ff: int, activation: Activation = "gelu_tanh") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}"
            )
        self.activation: Activation = activation
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(activation_fn(self.activation, self.w1(x)))  # (B, T, C) -> (B, T, C)
