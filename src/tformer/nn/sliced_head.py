"""The output head's forward pass a slice of the vocabulary at a time (a fast path).

The head is one matrix product, logits = x W^T: (N, C) x (V, C)^T -> (N, V). Its columns are
independent, so it may be computed in slices of the vocabulary,

    logits[:, a:b] = x W[a:b]^T,

each written straight into its place in the one output. The values are the product's (each
column's sum runs over the same C terms); only the speed differs. With GPT-2's 50,257 words
the whole product writes an output larger than the CPU's caches, and torch's matmul then
runs at a fraction of the speed it reaches on slices of a few thousand columns; the backward
pass's two products (dx = dlogits W, dW = dlogits^T x) are faster whole, so they stay whole
(docs/LOG.md, session 21). That was measured on one CPU: whether the slices win is timed on
the CPU in use, once per shape (nn/measured.py). The plain path is nn.Linear; a test holds
the two to each other.
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from tformer.nn.embedding import TiedGradient
from tformer.nn.measured import dtype_name, fastest, training_runs
from tformer.nn.row_blocks import autocast_dtype, matmul, plain_linear, weight_gradient
from tformer.nn.weight_copies import half_weight

VOCAB_SLICE = 8192  # columns per slice of the forward product (docs/LOG.md)
KIND = "head-v2"  # the measured choices' file and version (nn/measured.py)


def takes_slices(head: nn.Module) -> bool:
    """Whether the head module may be computed here instead: a plain nn.Linear without bias
    that no hook would miss (a forward or backward hook, its own or global)."""
    return plain_linear(head) and head.bias is None


def may_slice(weight: torch.Tensor) -> bool:
    """Whether a head of this weight (V, C) could run in slices at all: more than two
    slices' worth of vocabulary."""
    return weight.shape[0] > 2 * VOCAB_SLICE


def sliced_head_is_faster(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the head's product x W^T (x (..., C), W (V, C), of one dtype) runs in slices:
    on the CPU, with more than two slices' worth of vocabulary, where this CPU trains a
    product of this shape faster so, as timed once (forward and backward, against
    nn.Linear's) at the row count rounded up to a power of two."""
    if x.device.type != "cpu" or x.dtype != weight.dtype or not may_slice(weight):
        return False
    rows = 1 << max(x.numel() // x.shape[-1] - 1, 0).bit_length()  # N, rounded up
    size = f"{rows}x{x.shape[-1]}x{weight.shape[0]}"
    key = f"{size} {dtype_name(x.dtype)} autocast {dtype_name(autocast_dtype(x))}"

    def make_inputs() -> list[torch.Tensor | None]:
        g = torch.Generator().manual_seed(0)
        x_ = torch.randn(rows, x.shape[-1], generator=g).to(x.dtype)
        return [x_, torch.randn(weight.shape, generator=g).to(weight.dtype), None]

    def candidates():
        paths = {"whole": torch.nn.functional.linear, "sliced": sliced_head}
        return training_runs(make_inputs, paths)

    return fastest(KIND, key, ("whole", "sliced"), candidates) == "sliced"


def sliced_head(
    x: torch.Tensor, weight: torch.Tensor, tied: TiedGradient | None = None
) -> torch.Tensor:
    """logits = x W^T, the forward product in slices of VOCAB_SLICE words:
    x (..., C), weight (V, C) -> (..., V). Under autocast float32 inputs are cast to its
    dtype first, as nn.Linear's product would be. With `tied`, the backward pass says there
    that it gave the weight a dense gradient, for the lookup of the table tied to it
    (nn/embedding.py)."""
    return SlicedHead.apply(x, weight, tied)


class SlicedHead(torch.autograd.Function):
    """x W^T with the forward product in vocabulary slices; the backward is the plain one:
    dx = dlogits W, dW = dlogits^T x, in the product's dtype, then cast back to the inputs'.
    First-order gradients only."""

    @staticmethod
    def forward(ctx, x, weight, tied):
        dtype = autocast_dtype(x) or x.dtype
        rows = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, C)
        w = half_weight(weight, dtype)  # (V, C)
        out = torch.empty(*x.shape[:-1], w.shape[0], dtype=dtype, device=x.device)  # (..., V)
        flat = out.view(-1, w.shape[0])  # (N, V)
        with torch.autocast("cpu", enabled=False):
            for start in range(0, w.shape[0], VOCAB_SLICE):
                end = min(start + VOCAB_SLICE, w.shape[0])
                torch.mm(rows, w[start:end].t(), out=flat[:, start:end])  # (N, b - a)
        ctx.save_for_backward(rows, w)
        ctx.x_dtype, ctx.weight_dtype, ctx.shape = x.dtype, weight.dtype, x.shape
        ctx.tied = tied
        return out

    @staticmethod
    @once_differentiable  # the backward's products are not themselves differentiated
    def backward(ctx, grad_out):
        rows, w = ctx.saved_tensors
        grad = grad_out.reshape(-1, w.shape[0]).to(w.dtype)  # (N, V)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul(grad, w).to(ctx.x_dtype).view(ctx.shape)  # (N, C) -> (..., C)
        if ctx.needs_input_grad[1]:
            grad_w = weight_gradient(grad, rows, ctx.weight_dtype)  # (V, C)
            if ctx.tied is not None:  # the tied lookup's part may come sparse
                ctx.tied.head_gave = True
        return grad_x, grad_w, None
