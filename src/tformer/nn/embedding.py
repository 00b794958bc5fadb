"""Token embeddings and the two kinds of positional information.

Token embedding (Vaswani et al., 2017, sec. 3.4): a lookup table E of shape (V, C);
token id t becomes the row E[t], optionally multiplied by sqrt(d_model) as in the paper.

Sinusoidal positional encoding (sec. 3.5), for position pos and pair index i:

    PE(pos, 2i)     = sin(pos / 10000^(2i / d_model))
    PE(pos, 2i + 1) = cos(pos / 10000^(2i / d_model))

Even dimensions carry the sine, odd dimensions the cosine of the same frequency.

Learned positional embedding (GPT, GPT-2): a second lookup table P of shape (max_len, C),
trained like any other weight; position pos becomes the row P[pos].
"""

import math

import torch
from torch import nn


class TokenEmbedding(nn.Module):
    """Token ids (..., T) -> vectors (..., T, C), scaled by sqrt(C) when `scale` is set."""

    def __init__(self, vocab_size: int, d_model: int, scale: bool = False) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.multiplier = math.sqrt(d_model) if scale else 1.0

    def forward(self, ids: torch.Tensor, sparse_grad: bool = False) -> torch.Tensor:
        """With sparse_grad, the table's gradient is a sparse tensor of the looked-up rows
        only (for a caller that knows it will be added into a dense one: GPT2.forward)."""
        x = nn.functional.embedding(ids, self.weight, sparse=sparse_grad)  # (..., T) -> (..., T, C)
        return x * self.multiplier if self.multiplier != 1.0 else x

    def extra_repr(self) -> str:
        v, c = self.weight.shape
        return f"{v}, {c}" + (f", scale={self.multiplier:.3g}" if self.multiplier != 1.0 else "")


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """The (max_len, d_model) table of PE(pos, 2i) = sin(.), PE(pos, 2i+1) = cos(.)."""
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (L, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (ceil(C/2),)
    angle = pos / torch.pow(10000.0, two_i / d_model)  # (L, ceil(C/2))
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])  # an odd d_model has one sine more
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Positions (..., T) -> fixed vectors (..., T, C); nothing is learned or saved."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]  # (..., T) -> (..., T, C)

    def extra_repr(self) -> str:
        return f"{self.table.shape[0]}, {self.table.shape[1]}"


class LearnedPositionalEmbedding(nn.Module):
    """Positions (..., T) -> trained vectors (..., T, C), one row per position."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.empty(max_len, d_model))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(positions, self.weight)  # (..., T) -> (..., T, C)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"
