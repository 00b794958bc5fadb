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

from tformer.nn.measured import fastest

VOCAB_SLICE = 8192  # columns per slice of the forward product (docs/LOG.md)
KIND = "head"  # the measured choices' file (nn/measured.py)


def sliced_head_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the head's product x W^T (x (..., C), W (V, C)) runs in slices: on the CPU,
    with more than two slices' worth of vocabulary, where this CPU trains a product of this
    shape faster so (timed once, forward and backward, against nn.Linear's)."""
    if x.device.type != "cpu" or weight.shape[0] <= 2 * VOCAB_SLICE:
        return False
    rows = x.numel() // x.shape[-1]
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    key = f"{rows}x{x.shape[-1]}x{weight.shape[0]} {x.dtype} {weight.dtype} autocast {autocast}"
    inputs: list[torch.Tensor] = []  # made only if the shape is timed

    def train(head):
        def step() -> None:
            if not inputs:
                g = torch.Generator().manual_seed(0)
                inputs.append(torch.randn(rows, x.shape[-1], generator=g).to(x.dtype))
                inputs.append(torch.randn(weight.shape, generator=g).to(weight.dtype))
            x_, w_ = (t.detach().requires_grad_() for t in inputs)
            with torch.enable_grad():
                out = head(x_, w_)
                out.backward(torch.ones_like(out))

        return step

    candidates = {"whole": train(torch.nn.functional.linear), "sliced": train(sliced_head)}
    return fastest(KIND, key, candidates) == "sliced"


def sliced_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """logits = x W^T, the forward product in slices of VOCAB_SLICE words:
    x (..., C), weight (V, C) -> (..., V). Under autocast both are cast to its dtype first,
    as nn.Linear's product would be."""
    return SlicedHead.apply(x, weight)


class SlicedHead(torch.autograd.Function):
    """x W^T with the forward product in vocabulary slices; the backward is the plain one:
    dx = dlogits W, dW = dlogits^T x, in the product's dtype, then cast back to the inputs'."""

    @staticmethod
    def forward(ctx, x, weight):
        dtype = x.dtype
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        rows = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, C)
        w = weight.to(dtype)  # (V, C)
        with torch.autocast("cpu", enabled=False):
            out = torch.empty(rows.shape[0], w.shape[0], dtype=dtype, device=x.device)
            for start in range(0, w.shape[0], VOCAB_SLICE):
                end = min(start + VOCAB_SLICE, w.shape[0])
                torch.mm(rows, w[start:end].t(), out=out[:, start:end])  # (N, b - a)
        ctx.save_for_backward(rows, w)
        ctx.x_dtype, ctx.weight_dtype, ctx.shape = x.dtype, weight.dtype, x.shape
        return out.view(*x.shape[:-1], w.shape[0])  # (..., V)

    @staticmethod
    def backward(ctx, grad_out):
        rows, w = ctx.saved_tensors
        grad = grad_out.reshape(-1, w.shape[0]).to(w.dtype)  # (N, V)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ w).to(ctx.x_dtype).view(ctx.shape)  # (N, C) -> (..., C)
        if ctx.needs_input_grad[1]:
            grad_w = (grad.t() @ rows).to(ctx.weight_dtype)  # (V, C)
        return grad_x, grad_w
