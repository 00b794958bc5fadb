"""The output head's product in a training step: logits = x W^T (a fast path).

The head is one matrix product, (N, C) x (V, C)^T -> (N, V), and its backward pass two more,

    dx = dlogits W,    dW = dlogits^T x.

Here they run as one autograd step (HeadProduct) beside nn.Linear's path, for three reasons:

- Its columns are independent, so the forward product may be computed in slices of the
  vocabulary, logits[:, a:b] = x W[a:b]^T, each written straight into its place in the one
  output: the same sums, only the speed differs. With GPT-2's 50,257 words the whole product
  writes an output larger than the CPU's caches, and on some CPUs torch's matmul then runs
  at a fraction of the speed it reaches on slices of a few thousand columns (docs/LOG.md,
  session 21). Whether the slices win is timed on the CPU in use, once per shape
  (nn/measured.py); in float32 also oneDNN's product, twice as fast as torch's (MKL's) on
  some CPUs (nn/row_blocks.py). The backward's two products are faster whole, so they stay
  whole, each on nn/row_blocks.py's fastest path for its shape.
- Under bf16 autocast it multiplies by the weight's kept bf16 copy (nn/weight_copies.py)
  and casts dW to float32 in the pass that transposes it anyway (nn/row_blocks.py's
  weight_gradient), where nn.Linear casts the weight to bf16 and its gradient back in
  passes of their own (the same values).
- For a head tied to the token embedding (GPT-2's E) it takes its weight from the forward
  pass's TiedTable (nn/embedding.py), where the lookup's rows are added into its dense
  gradient in place.

A test holds it to nn.Linear's values and gradients.
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from tformer.nn.embedding import TiedTable
from tformer.nn.measured import dtype_name, fastest
from tformer.nn.row_blocks import (
    autocast_dtype,
    matmul,
    onednn_available,
    onednn_product,
    plain_linear,
    weight_gradient,
)
from tformer.nn.weight_copies import half_weight

VOCAB_SLICE = 8192  # columns per slice of the forward product (docs/LOG.md)
PATHS = ("whole", "sliced", "onednn")  # the forward product's ways (forward_path)
KIND = "head-v4"  # the measured choices' file and version (nn/measured.py)


def product_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype t is multiplied in: CPU autocast's where it casts t, else its own."""
    return autocast_dtype(t) or t.dtype


def plain_head(head: nn.Module) -> bool:
    """Whether the head module may be computed by head_product instead: a plain nn.Linear
    without bias that no hook would miss (a forward or backward hook, its own or global)."""
    return plain_linear(head) and head.bias is None


def takes_product(head: nn.Module, x: torch.Tensor) -> bool:
    """Whether head(x) may be computed by head_product: a plain_head, training on the CPU,
    where x and the weight are multiplied in one dtype (else nn.Linear's own error says
    why)."""
    return (  # the cheapest first: decoding asks at every step
        torch.is_grad_enabled()
        and x.device.type == "cpu"
        and plain_head(head)
        and product_dtype(x) == product_dtype(head.weight)
    )


def may_slice(weight: torch.Tensor) -> bool:
    """Whether a head of this weight (V, C) could run in slices at all: more than two
    slices' worth of vocabulary."""
    return weight.shape[0] > 2 * VOCAB_SLICE


def forward_path(x: torch.Tensor, weight: torch.Tensor) -> str:
    """How the forward product x W^T (x (..., C), W (V, C)) runs fastest on this CPU: "whole"
    (torch's one product), "sliced" (in slices of VOCAB_SLICE words) or, in float32,
    "onednn" (oneDNN's one product), as timed once at the row count rounded up to a power
    of two. On the CPU with more than two slices' worth of vocabulary; else "whole"."""
    if x.device.type != "cpu" or not may_slice(weight):
        return "whole"
    dtype = product_dtype(x)
    rows = 1 << max(x.numel() // x.shape[-1] - 1, 0).bit_length()  # N, rounded up
    key = f"{rows}x{x.shape[-1]}x{weight.shape[0]} {dtype_name(dtype)}"
    names = ("whole", "sliced")
    if dtype == torch.float32 and onednn_available(dtype):
        names += ("onednn",)

    def candidates():
        g = torch.Generator().manual_seed(0)
        x_ = torch.randn(rows, x.shape[-1], generator=g).to(dtype)  # (N, C)
        w_ = torch.randn(weight.shape, generator=g).to(dtype)  # (V, C)
        out = torch.empty(rows, weight.shape[0], dtype=dtype)  # (N, V)
        runs = {
            "whole": lambda: product_into(x_, w_, out, weight.shape[0]),
            "sliced": lambda: product_into(x_, w_, out, VOCAB_SLICE),
            "onednn": lambda: onednn_product(x_, w_.t()),
        }
        return {name: runs[name] for name in names}

    return fastest(KIND, key, names, candidates)


def product_into(rows: torch.Tensor, w: torch.Tensor, out: torch.Tensor, columns: int) -> None:
    """out = rows w^T, `columns` of the vocabulary at a time: rows (N, C), w (V, C), out (N, V)."""
    for start in range(0, w.shape[0], columns):
        end = min(start + columns, w.shape[0])
        torch.mm(rows, w[start:end].t(), out=out[:, start:end])  # (N, b - a)


def head_product(
    x: torch.Tensor, weight: torch.Tensor, tied: TiedTable | None = None, path: str = "whole"
) -> torch.Tensor:
    """logits = x W^T: x (..., C), weight (V, C) -> (..., V), the forward product on `path`
    (forward_path's names: which is fastest here). Under autocast the inputs are cast to its
    dtype first (any floating dtype but float64), as nn.Linear's would be. With `tied`, this
    forward pass's TiedTable of `weight`, the gradient goes to its head alias, which sums it
    with the lookup's rows."""
    if path not in PATHS:
        raise ValueError(f"head_product: unknown path {path!r}: choose one of {', '.join(PATHS)}")
    if tied is None:
        return HeadProduct.apply(x, weight, weight, path, None)
    if tied.weight is not weight:
        raise ValueError("head_product: `tied` is the TiedTable of another weight")
    return HeadProduct.apply(x, tied.head, weight, path, tied.made)


class HeadProduct(torch.autograd.Function):
    """x W^T; the backward is the plain one: dx = dlogits W, dW = dlogits^T x, in the
    product's dtype, then cast back to the inputs'. `weight` is the tensor the gradient goes
    to, `table` the one whose bf16 copy is multiplied (the same, or the Parameter that
    `weight` aliases); `made`, a TiedTable's record of the dW made for its head alias, or
    None. First-order gradients only."""

    @staticmethod
    def forward(ctx, x, weight, table, path, made):
        dtype = product_dtype(x)
        rows = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, C)
        w = half_weight(table, dtype)  # (V, C)
        with torch.autocast("cpu", enabled=False):
            if path == "onednn":
                out = onednn_product(rows, w.t()).view(*x.shape[:-1], w.shape[0])  # (..., V)
            else:
                out = torch.empty(*x.shape[:-1], w.shape[0], dtype=dtype, device=x.device)
                columns = VOCAB_SLICE if path == "sliced" else w.shape[0]
                product_into(rows, w, out.view(-1, w.shape[0]), columns)  # (N, V)
        ctx.save_for_backward(rows, w)
        ctx.x_dtype, ctx.weight_dtype, ctx.shape = x.dtype, weight.dtype, x.shape
        ctx.made = made
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
            if ctx.made is not None:
                ctx.made.tensor = grad_w
        return grad_x, grad_w, None, None, None
