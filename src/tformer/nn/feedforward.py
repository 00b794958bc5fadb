"""The position-wise feed-forward network (Vaswani et al., 2017, sec. 3.3).

    FFN(x) = act(x W1 + b1) W2 + b2

applied to every position separately, with W1: (C, d_ff) and W2: (d_ff, C). The activation
is ReLU, max(0, z), in the original Transformer and the tanh approximation of GELU in GPT-2:

    gelu_tanh(z) = 0.5 z (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3)))
    gelu(z)      = z Phi(z) = 0.5 z (1 + erf(z / sqrt(2)))      (exact; nanoGPT, BERT)

There is no activation after W2: the output goes straight back to the residual stream.

On the CPU both GELUs run in the compiled kernels (tformer/kernels/gelu.c) where they are
built: the same functions. gelu_tanh is 2-3x faster than torch's, whose tanh is slow on the
CPUs measured; the exact gelu writes its derivative in the forward pass, so its backward
pass is one multiply (docs/LOG.md). torch's own are the reference, and the path under
torch.compile.
"""

from typing import Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from tformer import kernels

Activation = Literal["relu", "gelu_tanh", "gelu"]
ACTIVATIONS = ("relu", "gelu_tanh", "gelu")


class CompiledGeluTanh(torch.autograd.Function):
    """gelu_tanh and its gradient from the compiled CPU kernels."""

    @staticmethod
    def forward(ctx, z, library):
        ctx.save_for_backward(z)
        ctx.library = library
        return library.gelu_tanh(z)

    @staticmethod
    @once_differentiable  # the kernel's derivative is not itself differentiable
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return ctx.library.gelu_tanh_backward(grad.contiguous().to(z.dtype), z), None


def gelu_tanh(z: torch.Tensor, compiled: bool = True) -> torch.Tensor:
    """0.5 z (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3))); compiled=False: always torch's."""
    fast = compiled and z.device.type == "cpu" and z.dtype in (torch.float32, torch.bfloat16)
    library = kernels.load() if fast and not torch.compiler.is_compiling() else None
    if library is None:
        return nn.functional.gelu(z, approximate="tanh")
    return CompiledGeluTanh.apply(z.contiguous(), library)


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


def gelu(z: torch.Tensor, compiled: bool = True) -> torch.Tensor:
    """z Phi(z) = 0.5 z (1 + erf(z / sqrt(2))); compiled=False: always torch's."""
    fast = compiled and z.device.type == "cpu" and z.dtype in (torch.float32, torch.bfloat16)
    library = kernels.load() if fast and not torch.compiler.is_compiling() else None
    if library is None:
        return nn.functional.gelu(z)
    if z.requires_grad and torch.is_grad_enabled():
        return CompiledGelu.apply(z.contiguous(), library)
    return library.gelu(z.contiguous())


def activation_fn(name: Activation, z: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(z)
    if name == "gelu_tanh":
        return gelu_tanh(z)
    if name == "gelu":
        return gelu(z)
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
