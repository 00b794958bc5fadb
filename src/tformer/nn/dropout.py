"""Dropout (Srivastava et al., 2014).

While training, every element is kept with probability 1 - p and scaled up, or zeroed:

    y_i = x_i m_i / (1 - p),    m_i ~ Bernoulli(1 - p), independently

so E[y] = x, and at evaluation y = x needs no correction. The gradient is the same mask:
dL/dx_i = m_i / (1 - p) dL/dy_i.

On the CPU the mask is cut from 64-bit random words, four 16-bit lanes per word. A lane u is
uniform on 0..65535 and m = [u < k] with k = round((1 - p) 65536), so the keep probability
is k / 65536 (within 1/131072 of 1 - p) and the scale is exactly its inverse, 65536 / k.
One random draw makes four mask elements, where torch's `bernoulli_` draws one number per
element (docs/LOG.md compares them). The words come from the compiled kernels'
counter-based generator (tformer/kernels/dropout.c), seeded by one draw from torch's
generator, so torch.manual_seed still fixes every mask; without the kernels from torch's
`random_`. Elsewhere (CUDA) torch's fused dropout is used.
"""

import math

import torch
from torch import nn

from tformer import kernels

LANES = 65536  # values of one 16-bit lane


def keep_threshold(p: float) -> int:
    """k with P(u < k) = k / 65536 closest to 1 - p, for a lane u uniform on 0..65535."""
    return round((1.0 - p) * LANES)


def dropout_mask(
    shape: torch.Size,
    p: float,
    device: torch.device,
    compiled: bool = True,
) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask of `shape` (True with probability ~1 - p) and its scale 1 / P(keep).

    compiled=False draws the words with torch even where the C kernels are there.
    """
    n, k = math.prod(shape), keep_threshold(p)
    scale = LANES / k if k > 0 else 0.0
    library = kernels.load() if compiled and device.type == "cpu" else None
    if library is not None:
        seed = int(torch.randint(-(2**63), 2**63 - 1, ())) % 2**64
        return library.dropout_mask(n, seed, k).view(shape), scale
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1)  # all 64 bits random, torch's default generator
    lanes = words.view(torch.int16)[:n].view(shape)  # as signed 16-bit: u - 32768
    return lanes < k - LANES // 2, scale


def masked_scale(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """x m s: in one pass of the compiled kernels where they take it (x contiguous, float32
    or bfloat16, on the CPU, with a bool mask of its shape there, and no gradient to record
    through x), else torch's three operations (the mask widened, two products). The values
    are the same (a test holds them to each other)."""
    library = kernels.load_for(x, (torch.float32, torch.bfloat16))
    takes = library is not None and mask.dtype == torch.bool and mask.device == x.device
    takes = takes and mask.shape == x.shape and x.is_contiguous() and mask.is_contiguous()
    if takes and not (x.requires_grad and torch.is_grad_enabled()):
        return library.masked_scale(x, mask, scale)
    return x.mul(mask).mul_(scale)


class MaskedScale(torch.autograd.Function):
    """y = x m s; the backward pass multiplies by the same m s."""

    @staticmethod
    def forward(ctx, x, mask, scale):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return masked_scale(x, mask, scale)

    @staticmethod
    def backward(ctx, grad_y):
        (mask,) = ctx.saved_tensors
        # its own adjoint: a gradient of the gradient (create_graph) multiplies by m s again
        return MaskedScale.apply(grad_y, mask, ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """x * m / (1 - p) with a fresh mask m while training; x itself otherwise."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return nn.functional.dropout(x, p, training=True)
    mask, scale = dropout_mask(x.shape, p, x.device)
    return MaskedScale.apply(x, mask, scale)


class Dropout(nn.Module):
    """Zeroes each element with probability p while training, scaling the rest by 1/(1-p)."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
