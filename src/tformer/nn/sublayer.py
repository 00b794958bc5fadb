"""The residual sublayer connection, with the LayerNorm in one of three places.

Every attention and feed-forward sublayer F of a Transformer is wrapped the same way; only
where the norm sits differs (x is the residual stream):

    pre   x + Dropout(F(LN(x)))     GPT-2 (Radford et al., 2019); Xiong et al., 2020
    post  LN(x + Dropout(F(x)))     the original Transformer (Vaswani et al., 2017, sec. 5.4)
    none  x + Dropout(F(x))         no normalisation at all

    pre:                          post:                        none:
    x ──┬──────────────(+)──>     x ──┬──────────(+)─LN──>     x ──┬──────────(+)──>
        └─LN─F─Dropout──┘             └─F─Dropout──┘               └─F─Dropout──┘

With residual=False the skip path is cut ("x +" disappears) and the norm stays where it was:
pre gives Dropout(F(LN(x))), post gives LN(Dropout(F(x))), none gives Dropout(F(x)).
These two switches are what the residual/LayerNorm experiments vary. F begins with matrix
products (attention's projections, the feed-forward's first layer), so a pre-LN norm may
write its output in the precision they read (nn/norm.py).

A stack of pre-LN sublayers never normalises its residual stream, so one final LayerNorm
closes the stack (GPT-2's ln_f; Xiong et al., 2020); post-LN's stream is normalised by its
last sublayer already, and "none" has no norms at all:

    final_norm:   pre  LN(x)        post, none  x
"""

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from tformer.nn.dropout import Dropout
from tformer.nn.norm import LayerNorm

NormPosition = Literal["pre", "post", "none"]
NORM_POSITIONS: tuple[NormPosition, ...] = ("pre", "post", "none")


def final_norm(d_model: int, norm_position: NormPosition, eps: float = 1e-5) -> nn.Module:
    """The norm that closes a stack of sublayers: a LayerNorm for pre-LN, else identity."""
    if norm_position not in NORM_POSITIONS:
        raise ValueError(f"unknown norm position {norm_position!r}: 'pre', 'post' or 'none'")
    return LayerNorm(d_model, eps) if norm_position == "pre" else nn.Identity()


class SublayerConnection(nn.Module):
    def __init__(
        self,
        d_model: int,
        norm_position: NormPosition = "pre",
        residual: bool = True,
        dropout: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if norm_position not in NORM_POSITIONS:
            raise ValueError(f"unknown norm position {norm_position!r}: 'pre', 'post' or 'none'")
        self.norm_position: NormPosition = norm_position
        self.residual = residual
        self.norm = LayerNorm(d_model, eps) if norm_position != "none" else None
        self.dropout = Dropout(dropout)
        # a pre-LN norm may write bf16 for the sublayer's products under CPU autocast
        # (nn/norm.py); off while LoRA adapters read it too (nn/lora.py)
        self.norm_writes_bf16 = True

    def extra_repr(self) -> str:
        return f"norm_position={self.norm_position!r}, residual={self.residual}"

    def branch(
        self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Pre-LN's Dropout(F(LN(x))), what is added to x: (B, T, C) -> (B, T, C)."""
        # the sublayer begins with matrix products (attention's projections, the
        # feed-forward's first layer): the norm may write what they read (nn/norm.py)
        return self.dropout(sublayer(self.norm(x, feeds_matmul=self.norm_writes_bf16)))

    def joins(self, following: "SublayerConnection") -> bool:
        """Whether this sublayer's residual add and `following`'s norm may run as one step
        (nn/norm.py's add_then_norm): both pre-LN with their residual paths, and the norm
        free to write bf16 for its products. The caller checks for hooks."""
        pre = self.norm_position == following.norm_position == "pre"
        return pre and self.residual and following.residual and following.norm_writes_bf16

    def forward(
        self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        if self.norm_position == "pre":
            y = self.branch(x, sublayer)
            return x + y if self.residual else y
        y = self.dropout(sublayer(x))
        z = x + y if self.residual else y
        return self.norm(z) if self.norm_position == "post" else z
