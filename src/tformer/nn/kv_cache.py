"""A preallocated key/value cache for one attention layer.

In causal self-attention the keys and values of earlier positions never change, so a decoder
keeps them: each new token then costs one position of work instead of the whole sequence.
The tensors are allocated once at full length and filled in place; `update` returns views of
the part written so far.
"""

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(
        self,
        batch_size: int,
        n_heads: int,
        max_len: int,
        d_head: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        zeroed: bool = True,
    ) -> None:
        """zeroed=False leaves the room not yet written as memory holds it: for a caller that
        reads nothing past `length` (update's views), it saves clearing the whole cache."""
        super().__init__()
        shape = (batch_size, n_heads, max_len, d_head)  # (B, H, L, D)
        make = torch.zeros if zeroed else torch.empty
        self.register_buffer("k", make(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", make(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, T, D) keys and values; return all (B, H, length, D) so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache is full: {end} positions requested, room for {self.max_len}"
            )
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def keep(self, rows: torch.Tensor) -> None:
        """Make row rows[i] of the cache its row i, for the N = len(rows) rows kept: beam
        search follows its surviving beams, and a search drops the sentences it has
        finished so that each step computes the live ones. Only the rows that change are
        copied; the cache then has N rows (the first N of its tensors)."""
        end, n = self.length, rows.numel()
        moved = (rows != torch.arange(n, device=rows.device)).nonzero()[:, 0]  # (moved,)
        if moved.numel() > 0:
            sources = rows.index_select(0, moved)
            for tensor in (self.k, self.v):
                written = tensor[:, :, :end]  # (B, H, length, D), a view
                written.index_copy_(0, moved, written.index_select(0, sources))
        self.k, self.v = self.k[:n], self.v[:n]


def fused_step_caches(caches: list, rows: int, heads: int, d_head: int) -> bool:
    """Whether a one-call decoding step (models/gpt2_decode.py, seq2seq_decode.py) can write
    into these caches: every one a KVCache at the same length with room left, its keys and
    values (rows, heads, max_len, d_head) float32, contiguous, on the CPU (the kernel writes
    at (row, head, length) of each, in place)."""
    first = caches[0]
    if type(first) is not KVCache or first.length >= first.max_len:
        return False
    shape = (rows, heads, first.max_len, d_head)
    for cache in caches:
        if type(cache) is not KVCache or cache.length != first.length:
            return False
        for tensor in (cache.k, cache.v):
            if tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
                return False
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                return False
    return True
