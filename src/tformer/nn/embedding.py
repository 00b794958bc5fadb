"""Token embeddings and the two kinds of positional information.

Token embedding (Vaswani et al., 2017, sec. 3.4): a lookup table E of shape (V, C);
token id t becomes the row E[t], optionally multiplied by sqrt(d_model) as in the paper.

Sinusoidal positional encoding (sec. 3.5), for position pos and pair index i:

    PE(pos, 2i)     = sin(pos / 10000^(2i / d_model))
    PE(pos, 2i + 1) = cos(pos / 10000^(2i / d_model))

Even dimensions carry the sine, odd dimensions the cosine of the same frequency.

Learned positional embedding (GPT, GPT-2): a second lookup table P of shape (max_len, C),
trained like any other weight; position pos becomes the row P[pos].

A table tied to the output head (GPT-2's E, logits = h E^T) has two gradients that autograd
sums: the head's, dense (V, C), and the lookup's, nonzero in the looked-up rows only,

    dE = dlogits^T h + sum over positions t of e_{x_t} dx_t^T.

autograd would fill a second (V, C) table with the lookup's rows and add the two, passes
over 2 V C floats (GPT-2: 154 MB each) to place T rows. In a training step the two uses
take their weight from a TiedTable instead: two aliases of the table whose gradients meet
in one autograd node (SumTiedGradients), which receives the lookup's part as its T rows
(sparse) and adds them into the head's dense gradient in place.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable


@dataclass
class HeadGradient:
    """The dW that the head's backward (nn/head_product.py's HeadProduct) made for a
    TiedTable's head alias: a tensor of its own, which SumTiedGradients may add into."""

    tensor: torch.Tensor | None = None


class TiedTable:
    """One forward pass's two uses of a table tied to its output head, where `weight` is
    the Parameter: `head` and `lookup` are aliases of it (its storage, no copy) for the
    head's product (nn/head_product.py) and the lookup, whose gradients SumTiedGradients
    sums. Made for each forward pass."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.made = HeadGradient()
        self.head, self.lookup = SumTiedGradients.apply(weight, self.made)


class SumTiedGradients(torch.autograd.Function):
    """table (V, C) -> two aliases of it; backwards, the sum of their gradients, dense: the
    lookup's sparse rows added into the head's dense gradient, in place where that is the
    tensor the head's backward made (`made`: no one else holds it), else into a new one;
    or either gradient alone."""

    @staticmethod
    def forward(ctx, weight, made):
        ctx.set_materialize_grads(False)  # an unused alias gives None, not a zero table
        ctx.made = made
        return weight.detach(), weight.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_head, grad_lookup):
        made, ctx.made.tensor = ctx.made.tensor, None  # dropped: autograd may keep it as is
        if grad_head is None:
            return (None if grad_lookup is None else grad_lookup.to_dense()), None
        if grad_lookup is None:
            return grad_head, None
        rows = grad_lookup.to(grad_head.dtype)  # T rows of (V, C), duplicates summed
        if grad_head is made and grad_head.is_contiguous():
            return grad_head.add_(rows), None
        return grad_head + rows, None


class TiedLookup(torch.autograd.Function):
    """ids (...) and the table's lookup alias (V, C) -> its rows (..., C); backwards the
    rows' gradient sparse (T rows of V), for SumTiedGradients. First-order gradients only."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.num_weights = weight.shape[0]
        return nn.functional.embedding(ids, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        rows, flat = grad_out.reshape(-1, grad_out.shape[-1]), ids.reshape(-1)  # (N, C), (N,)
        grad = torch.ops.aten.embedding_backward(rows, flat, ctx.num_weights, -1, False, True)
        return None, grad


def links_tied_gradients(weight: torch.Tensor) -> bool:
    """Whether a forward pass of a table tied to its head takes a TiedTable: training on
    the CPU under bf16 or float16 autocast (the head's fast path), outside torch.compile.
    Elsewhere the plain lookup keeps second-order gradients and torch.func working."""
    return (
        torch.is_grad_enabled()
        and weight.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16)
        and not torch.compiler.is_compiling()
    )


class TokenEmbedding(nn.Module):
    """Token ids (..., T) -> vectors (..., T, C), scaled by sqrt(C) when `scale` is set."""

    def __init__(self, vocab_size: int, d_model: int, scale: bool = False) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.multiplier = math.sqrt(d_model) if scale else 1.0

    def forward(self, ids: torch.Tensor, tied: TiedTable | None = None) -> torch.Tensor:
        """With `tied`, this forward pass's TiedTable of this table (GPT2.forward): the
        lookup takes its alias, and its gradient goes there as rows (TiedLookup)."""
        if tied is not None:
            x = TiedLookup.apply(ids, tied.lookup)  # (..., T) -> (..., T, C)
        else:
            x = nn.functional.embedding(ids, self.weight)  # (..., T) -> (..., T, C)
        return x * self.multiplier if self.multiplier != 1.0 else x

    def extra_repr(self) -> str:
        v, c = self.weight.shape
        return f"{v}, {c}" + (f", scale={self.multiplier:.3g}" if self.multiplier != 1.0 else "")


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """The (max_len, d_model) table of PE(pos, 2i) = sin(.), PE(pos, 2i+1) = cos(.)."""
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (L, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (ceil(C/2),)
    angle = pos / torch.pow(10000.0, two_i / d_model)  # (L, ceil(C/2))
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])  # an odd d_model has one sine more
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Positions (..., T) -> fixed vectors (..., T, C); nothing is learned or saved."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]  # (..., T) -> (..., T, C)

    def extra_repr(self) -> str:
        return f"{self.table.shape[0]}, {self.table.shape[1]}"


class LearnedPositionalEmbedding(nn.Module):
    """Positions (..., T) -> trained vectors (..., T, C), one row per position."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.empty(max_len, d_model))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(positions, self.weight)  # (..., T) -> (..., T, C)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"
