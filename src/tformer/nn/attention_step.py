"""A small model's causal self-attention sublayer as one training step on the CPU.

    qkv = x W_qkv^T + b_qkv,    o = Attention(qkv),    y = o W_O^T + b_O

with Attention the FlashAttention kernel (nn/flash_attention.py), and backwards, from dy,

    do = dy W_O,   dW_O = dy^T o,   db_O = sum over rows of dy,
    dqkv = Attention's backward(qkv, o, do),
    dx = dqkv W_qkv,   dW_qkv = dqkv^T x,   db_qkv = sum over rows of dqkv.

As for the feed-forward network (nn/feedforward_step.py): in a small model's step the two
projections under autocast cast their weights and biases, and their gradients back, each
operation an autograd node of its own, and the path to the kernel asks its questions at
every call. Here the sublayer is one node: the weights' bf16 copies are kept from step to
step (nn/weight_copies.py), each product runs where it was timed fastest in the step
(nn/small_products.py), and the kernel reads the heads where the projection wrote them.
With torch's products every product, cast and sum is one the plain path computes, in its
dtype (products.c's weight gradients are float32 sums, not rounded); tests hold the two to
each other. Taken in bf16 training steps on the CPU, for plain
projections below nn/row_blocks.py's sizes, where the FlashAttention kernel is the short
path chosen on this CPU (nn/attention_choice.py): 0.6 ms of a 20 ms step of nanoGPT's
CPU recipe (docs/LOG.md, session 29).
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from tformer import kernels
from tformer.nn.attention_choice import short_attention_kernel
from tformer.nn.flash_attention import projection_heads
from tformer.nn.row_blocks import MIN_WEIGHT, autocast_dtype, plain_linear
from tformer.nn.small_products import input_gradient, linear, weight_gradient
from tformer.nn.weight_copies import half_weight

BF16 = torch.bfloat16


def takes(attention: nn.Module, x: torch.Tensor) -> bool:
    """Whether attend(attention, x) runs as one step here: attention a causal
    MultiHeadAttention (w_qkv, w_o, n_heads, d_model) over x (B, T, C), whose caller has
    checked that nothing else stands in the way (no mask, cache, memory, dropout or hooked
    pattern: nn/blocked_attention.py's kernel_may_take)."""
    w_qkv, w_o = attention.w_qkv, attention.w_o
    if type(w_qkv) is not nn.Linear or type(w_o) is not nn.Linear:
        return False
    if w_qkv.weight.numel() >= MIN_WEIGHT or w_qkv.bias is None or w_o.bias is None:
        return False  # a larger layer's products take nn/row_blocks.py's paths
    if x.device.type != "cpu" or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if (autocast_dtype(x) or x.dtype) != BF16 or not (plain_linear(w_qkv) and plain_linear(w_o)):
        return False
    library = kernels.load()
    if library is None:
        return False
    b, t, c = x.shape
    shaped = torch.empty((), dtype=BF16).expand(b, t, 3 * c)  # the projection's shape only
    return short_attention_kernel(shaped, attention.n_heads, library) == "flash"


def attend(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """attention(x), (B, T, C) -> (B, T, C), as one step where `takes` says so."""
    w_qkv, w_o = attention.w_qkv, attention.w_o
    y = FusedSelfAttention.apply(
        x, w_qkv.weight, w_qkv.bias, w_o.weight, w_o.bias, attention.n_heads, kernels.load()
    )
    return y.view(x.shape)  # (M, C) -> (B, T, C) outside the Function, as nn/row_blocks.py


class FusedSelfAttention(torch.autograd.Function):
    """y = Attention(x W_qkv^T + b_qkv) W_O^T + b_O in bf16: x (B, T, C), the float32 (or
    bf16) parameters of the two projections -> y (B T, C). Saves x, qkv, o and the
    kernel's log-sum-exp, and the weights' copies."""

    @staticmethod
    def forward(ctx, x, w_qkv, b_qkv, w_o, b_o, n_heads, library):
        ctx.dtypes = [t.dtype for t in (x, w_qkv, b_qkv, w_o, b_o)]
        b, t, c = x.shape
        rows = x.reshape(b * t, c).to(BF16).contiguous()  # (M, C)
        w_qkv_, b_qkv_, w_o_, b_o_ = (half_weight(p, BF16) for p in (w_qkv, b_qkv, w_o, b_o))
        qkv = linear(rows, w_qkv_, b_qkv_).view(b, t, 3 * c)
        o, lse = flash_forward(qkv, n_heads, library)
        ctx.save_for_backward(rows, qkv, o, lse, w_qkv_, w_o_)
        ctx.n_heads, ctx.library = n_heads, library
        return linear(o.view(b * t, c), w_o_, b_o_)  # (M, C)

    @staticmethod
    @once_differentiable  # the products and the kernel's gradient are not differentiated
    def backward(ctx, grad_y):
        rows, qkv, o, lse, w_qkv, w_o = ctx.saved_tensors
        b, t, c = o.shape
        h = ctx.n_heads
        grad_y = grad_y.to(BF16).contiguous()  # (M, C)
        grad_o = input_gradient(grad_y, w_o)  # (M, C), the heads side by side
        grad_qkv = flash_backward(qkv, o, lse, grad_o, h, ctx.library)  # (M, 3C)
        wanted = ctx.needs_input_grad[:5]  # a frozen projection's gradients are not computed
        grads = [
            input_gradient(grad_qkv, w_qkv).view(b, t, c) if wanted[0] else None,  # dx
            weight_gradient(grad_qkv, rows) if wanted[1] else None,  # dW_qkv (3C, C)
            grad_qkv.sum(0) if wanted[2] else None,  # db_qkv (3C,)
            weight_gradient(grad_y, o.view(b * t, c)) if wanted[3] else None,  # dW_O (C, C)
            grad_y.sum(0) if wanted[4] else None,  # db_O (C,)
        ]
        grads = [None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True)]
        return *grads, None, None


def flash_forward(
    qkv: torch.Tensor, n_heads: int, library: kernels.Kernels
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FlashAttention kernel's causal self-attention of the fused projection qkv (B, T,
    3C) bf16: o (B, T, C) bf16, the heads side by side, and the log-sum-exp (B, H, T) its
    backward pass reads."""
    b, t, c3 = qkv.shape
    o = torch.empty(b, t, c3 // 3, dtype=BF16)  # (B, T, H, D) as the kernel writes it
    _, lse = library.flash_attention(*projection_heads(qkv, n_heads), out=o.view(b, t, n_heads, -1))
    return o, lse


def flash_backward(
    qkv: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    grad_o: torch.Tensor,
    n_heads: int,
    library: kernels.Kernels,
) -> torch.Tensor:
    """flash_forward's gradient: from grad_o (B T, C) bf16 to the projection's, (B T, 3C)."""
    b, t, c = o.shape
    heads = grad_o.view(b, t, n_heads, -1).transpose(1, 2)  # (B, H, T, D), a view
    # (B, T, 3, H, D): the projection's own layout
    return library.flash_attention_backward(
        *projection_heads(qkv, n_heads), heads, o.view(b, t, n_heads, -1), lse
    ).view(b * t, 3 * c)
