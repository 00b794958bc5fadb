"""The feed-forward network's first layer and its GELU as one training step on the CPU.

    z = x W1^T + b1,    h = gelu_tanh(z)

and backwards, from dh,

    dz = dh * gelu_tanh'(z),    dx = dz W1,    dW1 = dz^T x,    db1 = sum over rows of dz.

Apart, the GELU's backward pass writes dz and the linear layer's then reads all of it once
more to sum its rows for db1 (5 ms of a character-model step, docs/LOG.md). Here the GELU's
pass adds each row of dz into the column sums as it writes it (kernels/gelu.c). Everything
else is what the two parts do alone: the products of nn/row_blocks.py (with its measured
choices), the GELU and its saved derivative of nn/activations.py; db1 is summed in float32
and kept so, where the plain path rounds it to bf16 first. Taken for bf16 products (bf16
autocast, or a bf16 model without autocast) on the CPU in a training step, for the layers
nn/row_blocks.py takes; nn.Linear and torch's GELU otherwise (a test holds the two paths to
each other).
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from tformer import kernels
from tformer.nn.row_blocks import autocast_dtype, large_plain_linear, matmul, weight_gradient
from tformer.nn.weight_copies import half_weight


def takes(module: nn.Linear, x: torch.Tensor) -> bool:
    """Whether linear_gelu_tanh(module, x) runs as one step here."""
    if x.device.type != "cpu" or module.bias is None:
        return False
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if (autocast_dtype(x) or x.dtype) != torch.bfloat16 or not large_plain_linear(module, x):
        return False
    return kernels.load() is not None


def linear_gelu_tanh(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(module(x)), (..., K) -> (..., N), as one step where `takes` says so."""
    library = kernels.load()
    rows = x.reshape(-1, x.shape[-1])  # (M, K)
    h = LinearGeluTanh.apply(rows, module.weight, module.bias, library)  # (M, N)
    return h.view(*x.shape[:-1], -1)  # viewed outside the Function, as nn/row_blocks.py


class LinearGeluTanh(torch.autograd.Function):
    """h = gelu_tanh(x W^T + b) in bf16: x (M, K), weight (N, K), bias (N,) -> h (M, N).
    Saves x and W in bf16 and the GELU's derivative in float32, as the two parts would."""

    @staticmethod
    def forward(ctx, x, weight, bias, library):
        rows = x.to(torch.bfloat16)  # (M, K)
        w = half_weight(weight, torch.bfloat16)  # (N, K)
        with torch.autocast("cpu", enabled=False):
            z = matmul(rows, w.t(), bias.to(torch.bfloat16))  # (M, N)
        h, derivative = library.gelu_tanh_and_derivative(z)
        ctx.save_for_backward(rows, w, derivative)
        ctx.library = library
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        return h

    @staticmethod
    @once_differentiable  # the products and the kernel's derivative are not differentiated
    def backward(ctx, grad_h):
        rows, w, derivative = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad_h = grad_h.to(torch.bfloat16).contiguous()  # (M, N)
        grad_z, grad_b = ctx.library.scale_bf16_column_sums(grad_h, derivative)
        grad_x = grad_w = None
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = matmul(grad_z, w).to(x_dtype)  # (M, K)
            if ctx.needs_input_grad[1]:
                grad_w = weight_gradient(grad_z, rows, weight_dtype)  # (N, K)
        grad_b = grad_b.to(bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None
