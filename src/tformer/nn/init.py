"""The original Transformer's initialisation, as the implementations that reproduce it draw it.

Xavier-uniform (Glorot & Bengio, 2010) draws a (fan_out, fan_in) matrix from U(-b, b),

    b = gain * sqrt(6 / (fan_in + fan_out)),

which keeps, on average, the variance of a layer's input in its output (and of the gradient
going back). The paper (Vaswani et al., 2017) does not state its initialisation; the
implementations that reproduce it (fairseq, torch.nn.Transformer) and Xiong et al.'s
analysis use Xavier-uniform for every matrix. torch.nn.MultiheadAttention and fairseq draw
attention's W^Q, W^K, W^V as one stacked (3C, C) matrix, so each of the three gets

    b_qkv = sqrt(6 / (C + 3C)) = sqrt(6 / 4C)          not sqrt(6 / 2C), its own C x C bound

(fairseq draws the three separately with gain 1/sqrt(2): the same bound). W^O and the
feed-forward matrices are drawn as they are; biases are 0.

Token embeddings ~ N(0, 1/C) and multiplied by sqrt(C) in the forward pass (sec. 3.4;
tformer.nn.embedding.TokenEmbedding's `scale`), so a token enters the residual stream with
unit-variance entries, as large as the sinusoids added to it. Learned position embeddings,
where a model has them instead, ~ N(0, 1/C) unscaled, as fairseq draws them.
"""

import math

import torch
from torch import nn


def xavier_bound(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    """b of Xavier-uniform's U(-b, b) for a (fan_out, fan_in) matrix."""
    return gain * math.sqrt(6.0 / (fan_in + fan_out))


def init_attention_xavier(
    blocks: list[torch.Tensor], g: torch.Generator, stacked: bool, gain: float = 1.0
) -> None:
    """Xavier-uniform W^Q, W^K, W^V, W^O (four (C, C) tensors, views of the stored weights,
    in that order). stacked: W^Q, W^K, W^V with the bound of one (3C, C) matrix, as the
    original Transformer's implementations draw them; else each with its own C x C bound."""
    *qkv, w_o = blocks
    c = w_o.shape[0]
    qkv_fan_out = 3 * c if stacked else c
    for weight in qkv:
        b = xavier_bound(c, qkv_fan_out, gain)
        nn.init.uniform_(weight, -b, b, generator=g)
    b = xavier_bound(c, c, gain)
    nn.init.uniform_(w_o, -b, b, generator=g)


def init_embedding(weight: torch.Tensor, g: torch.Generator) -> None:
    """A (rows, C) embedding table ~ N(0, 1/C)."""
    nn.init.normal_(weight, 0.0, weight.shape[1] ** -0.5, generator=g)
