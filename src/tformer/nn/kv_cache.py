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
    ) -> None:
        super().__init__()
        shape = (batch_size, n_heads, max_len, d_head)  # (B, H, L, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
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

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows[i] of the cache as row i (B,): beam search follows its surviving beams."""
        end = self.length
        self.k[:, :, :end] = self.k[:, :, :end].index_select(0, rows)
        self.v[:, :, :end] = self.v[:, :, :end].index_select(0, rows)
