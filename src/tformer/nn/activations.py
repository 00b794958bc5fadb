"""The feed-forward network's activations: ReLU and the two GELUs.

The original Transformer (Vaswani et al., 2017) uses ReLU; GPT-2 the tanh approximation of
GELU (Hendrycks and Gimpel, 2016); nanoGPT and BERT the exact GELU:

    relu(z)      = max(0, z)
    gelu_tanh(z) = 0.5 z (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3)))
    gelu(z)      = z Phi(z) = 0.5 z (1 + erf(z / sqrt(2)))

with Phi the standard normal's distribution function.

torch's own functions are the reference, and the path under torch.compile. On the CPU both
GELUs run in the compiled kernels (tformer/kernels/gelu.c) where they are built: the same
functions, written with one exp per value, because torch's tanh is slow on the CPU; the
exact gelu writes its derivative in the forward pass, so its backward pass is one multiply
(docs/LOG.md). `compiled=False` always takes torch's.
"""

from typing import Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from tformer import kernels

Activation = Literal["relu", "gelu_tanh", "gelu"]
ACTIVATIONS = ("relu", "gelu_tanh", "gelu")
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the dtypes gelu.c is written for


def activation_fn(name: Activation, z: torch.Tensor) -> torch.Tensor:
    """The activation called `name`, applied elementwise to z."""
    if name == "relu":
        return torch.relu(z)
    if name == "gelu_tanh":
        return gelu_tanh(z)
    if name == "gelu":
        return gelu(z)
    raise unknown_activation(name)


def unknown_activation(name: str) -> ValueError:
    return ValueError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}")


def gelu_tanh(z: torch.Tensor, compiled: bool = True) -> torch.Tensor:
    """0.5 z (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3))); compiled=False: always torch's."""
    library = kernels.load_for(z, KERNEL_DTYPES) if compiled else None
    if library is None:
        return nn.functional.gelu(z, approximate="tanh")
    return CompiledGeluTanh.apply(z.contiguous(), library)


def gelu(z: torch.Tensor, compiled: bool = True) -> torch.Tensor:
    """z Phi(z) = 0.5 z (1 + erf(z / sqrt(2))); compiled=False: always torch's."""
    library = kernels.load_for(z, KERNEL_DTYPES) if compiled else None
    if library is None:
        return nn.functional.gelu(z)
    if z.requires_grad and torch.is_grad_enabled():
        return CompiledGelu.apply(z.contiguous(), library)
    return library.gelu(z.contiguous())  # no gradient to come: no derivative to keep


class CompiledGeluTanh(torch.autograd.Function):
    """gelu_tanh and its gradient from the compiled CPU kernels. When a gradient is to come,
    the forward pass keeps the derivative dy/dz in float32 (its one pass over z computes
    most of it anyway), and the backward pass only multiplies: the same numbers as computing
    the derivative there, from a z long out of the cache, in a quarter of the time
    (docs/LOG.md). For bf16 that keeps 4 bytes an element where z took 2: the largest
    activation of a layer, 6 MB more for GPT-2's at 1 x 1024."""

    @staticmethod
    def forward(ctx, z, library):
        ctx.library, ctx.dtype = library, z.dtype
        if not ctx.needs_input_grad[0]:
            return library.gelu_tanh(z)
        y, derivative = library.gelu_tanh_and_derivative(z)
        ctx.save_for_backward(derivative)
        return y

    @staticmethod
    @once_differentiable  # the kernel's derivative is not itself differentiable
    def backward(ctx, grad):
        (derivative,) = ctx.saved_tensors
        grad = grad.contiguous().to(ctx.dtype)
        if ctx.dtype == torch.bfloat16:
            return ctx.library.scale_bf16(grad, derivative), None
        return grad * derivative, None


class CompiledGelu(torch.autograd.Function):
    """The exact gelu from the compiled CPU kernels; the forward pass saves dy/dz."""

    @staticmethod
    def forward(ctx, z, library):
        y, derivative = library.gelu_and_derivative(z)
        ctx.save_for_backward(derivative)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (derivative,) = ctx.saved_tensors
        return grad.to(derivative.dtype) * derivative, None
