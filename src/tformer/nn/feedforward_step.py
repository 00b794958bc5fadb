"""A small model's feed-forward network as one training step on the CPU.

    z = x W1^T + b1,    h = act(z),    y = h W2^T + b2

and backwards, from dy,

    dh = dy W2,   dW2 = dy^T h,   db2 = sum over rows of dy,
    dz = dh * act'(z),   dx = dz W1,   dW1 = dz^T x,   db1 = sum over rows of dz.

For a small model a training step is mostly the fixed cost of each operation: under bf16
autocast each nn.Linear casts its weight and bias to bf16 in the forward pass and its two
gradients back to float32 in the backward pass, each operation an autograd node of its
own. Here the whole network is one node: the weights' bf16 copies are kept from step to
step (nn/weight_copies.py), each product runs where it was timed fastest in the step on the
CPU in use (nn/small_products.py: torch's, or kernels/products.c, whose threads keep to the
rows the other kernels give them), the activation's derivative is kept from the forward
pass (nn/activations.py), and db1 comes out of the pass that multiplies by it
(kernels/gelu.c), summed in float32 where the plain path rounds its sum to bf16 first. With
torch's products every other product, cast and sum is one the plain path computes, in its
dtype (products.c's weight gradients are float32 sums, not rounded); tests hold the two to
each other. Taken in bf16 training
steps on the CPU, for plain layers below nn/row_blocks.py's sizes (its paths take the
larger ones), with either GELU. It does less than the plain path on any CPU (docs/LOG.md,
session 29).
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from tformer import kernels
from tformer.nn.row_blocks import MIN_WEIGHT, autocast_dtype, plain_linear
from tformer.nn.small_products import input_gradient, linear, weight_gradient
from tformer.nn.weight_copies import half_weight

STEP_ACTIVATIONS = ("gelu", "gelu_tanh")  # the activations whose kernels keep the derivative
BF16 = torch.bfloat16


def takes(ffn: nn.Module, x: torch.Tensor) -> bool:
    """Whether feed_forward(ffn, x) runs as one step here: ffn a FeedForward (w1, w2,
    activation)."""
    w1, w2 = ffn.w1, ffn.w2
    if type(w1) is not nn.Linear or type(w2) is not nn.Linear or w1.bias is None:
        return False
    if w1.weight.numel() >= MIN_WEIGHT or ffn.activation not in STEP_ACTIVATIONS:
        return False  # a larger layer's products take nn/row_blocks.py's paths
    if x.device.type != "cpu" or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if (autocast_dtype(x) or x.dtype) != BF16 or w2.bias is None:
        return False
    return plain_linear(w1) and plain_linear(w2) and kernels.load() is not None


def feed_forward(ffn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ffn(x), (..., C) -> (..., C), as one step where `takes` says so."""
    rows = x.reshape(-1, x.shape[-1])  # (M, C)
    w1, w2 = ffn.w1, ffn.w2
    y = FusedFeedForward.apply(
        rows, w1.weight, w1.bias, w2.weight, w2.bias, ffn.activation, kernels.load()
    )
    return y.view(*x.shape[:-1], -1)  # viewed outside the Function, as nn/row_blocks.py


class FusedFeedForward(torch.autograd.Function):
    """y = act(x W1^T + b1) W2^T + b2 in bf16: x (M, C), the float32 (or bf16) parameters of
    the two layers, the activation's name -> y (M, C). Saves x, h and act'(z) in bf16 (the
    tanh GELU's derivative in float32, as its kernel writes it) and the weights' copies."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, activation, library):
        x = x.to(BF16).contiguous()
        w1_, b1_, w2_, b2_ = (half_weight(t, BF16) for t in (w1, b1, w2, b2))
        y, h, derivative = network_forward(x, w1_, b1_, w2_, b2_, activation, library)
        ctx.save_for_backward(x, h, derivative, w1_, w2_)
        ctx.library = library
        return y  # (M, C)

    @staticmethod
    @once_differentiable  # the products and the kernel's derivative are not differentiated
    def backward(ctx, grad_y):
        x, h, derivative, w1, w2 = ctx.saved_tensors
        grad_y = grad_y.to(BF16).contiguous()  # (M, C)
        wanted = ctx.needs_input_grad[:5]  # a frozen layer's gradients are not computed
        grads = network_backward(grad_y, x, h, derivative, w1, w2, ctx.library, wanted)
        return *grads, None, None  # bf16: autograd casts each to its input's dtype


def network_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    activation: str,
    library: kernels.Kernels,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass in bf16, x (M, C) and the weights' copies: y (M, C), and what the
    backward pass reads, h (M, F) and act'(z)."""
    z = linear(x, w1, b1)  # (M, F)
    if activation == "gelu":
        h, derivative = library.gelu_and_derivative(z)
    else:
        h, derivative = library.gelu_tanh_and_derivative(z)
    return linear(h, w2, b2), h, derivative


def network_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    derivative: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    library: kernels.Kernels,
    wanted: tuple[bool, ...],
) -> list[torch.Tensor | None]:
    """From grad_y (M, C) bf16: [dx, dW1, db1, dW2, db2] in bf16 (db1 float32), each None
    where `wanted` (five flags, in that order) says it is not."""
    grad_h = input_gradient(grad_y, w2)  # (M, F)
    # dz = dh * act'(z) rounded to bf16 once, as CompiledGelu(Tanh) gives it, and db1, its
    # column sums, summed in float32 in the same pass
    grad_z, grad_b1 = library.scale_bf16_column_sums(grad_h, derivative)
    return [
        input_gradient(grad_z, w1) if wanted[0] else None,  # dx (M, C)
        weight_gradient(grad_z, x) if wanted[1] else None,  # dW1 (F, C)
        grad_b1 if wanted[2] else None,  # db1 (F,)
        weight_gradient(grad_y, h) if wanted[3] else None,  # dW2 (C, F)
        grad_y.sum(0) if wanted[4] else None,  # db2 (C,)
    ]
