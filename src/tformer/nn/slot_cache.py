"""A key/value cache of independent sequences, one per slot, each with its own length.

A server decodes many requests at once, and they come and go at every step: a request
starts with its prompt while others are halfway through theirs. KVCache (nn/kv_cache.py)
keeps one length for its whole batch, so its rows must start together. Here slot i holds
sequence i's keys and values at positions 0..length_i - 1, and a decoding step appends
one token to each of the first B slots, row i at its own position p_i:

    K[i, :, p_i] = k_i,   V[i, :, p_i] = v_i,   row i attends to positions 0..p_i

The slots in use are always 0..B-1 (the scheduler moves the last one into a hole when a
sequence leaves, `move`), so attention reads plain views K[:B, :, :P], P = max_i p_i + 1,
and a mask (B, P) hides each row's positions beyond its own. Filling a slot with a
prompt (`prefill`) writes positions 0..T-1 of its slot: several prompts are prefilled
as one right-padded batch, an ordinary causal forward pass (a prompt's tokens never see
the padding after them, and what the padding leaves in the cache lies beyond the prompt,
where decoding's mask hides it until decoding overwrites it).

The model sees the same interface as KVCache: `update(k, v)` stores the new keys and
values and returns those attention should read; `length` is the positions already
cached, as far as the model's own checks are concerned. A decoding step on the CPU in
float32 goes faster through `attend(qkv)`: one C kernel (kernels/slot_attention.c) stores
every row's key and value and attends over that row's own positions only, where the
general path reads every row up to the longest one and masks.
"""

import torch
from torch import nn

from tformer import kernels


class SlotCache(nn.Module):
    def __init__(
        self,
        slots: int,
        n_heads: int,
        max_len: int,
        d_head: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (slots, n_heads, max_len, d_head)  # (slots, H, L, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.slots, self.max_len = slots, max_len
        self.length = 0  # positions before the new ones, as the model's checks read it
        self._slot: int | None = None  # prefill: the first slot written from position 0
        self._count = 1  # prefill: how many slots
        self._positions: torch.Tensor | None = None  # decode: (B,) each row's new position
        self._span = 0  # decode: positions attention reads, max_i p_i + 1
        self._mask: torch.Tensor | None = None  # decode: decode_mask(positions)

    def prefill(self, first: int, count: int = 1) -> None:
        """The next update writes `count` sequences (count, H, T, D) into slots first,
        first + 1, ... from position 0."""
        if not (first >= 0 and count >= 1 and first + count <= self.slots):
            raise ValueError(
                f"slots {first}..{first + count - 1} are not within 0..{self.slots - 1}"
            )
        self._slot, self._count, self._positions, self.length = first, count, None, 0

    def decode(
        self,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        bounds: tuple[int, int] | None = None,
    ) -> None:
        """The next update writes one token (B, H, 1, D) to each of slots 0..B-1, row i at
        positions[i]; attention then reads positions 0..max(positions). `mask`, if given,
        is decode_mask(positions), and `bounds` (min, max) of positions, both found once for
        every layer's cache (on a GPU, reading them is a wait for the device)."""
        lowest, highest = position_bounds(positions) if bounds is None else bounds
        span = highest + 1
        if span > self.max_len:
            raise ValueError(f"KV cache slot is full: position {span - 1} of {self.max_len}")
        if lowest < 0 or positions.shape[0] > self.slots:
            raise ValueError(f"decode takes up to {self.slots} positions, none negative")
        self._slot, self._positions, self._span = None, positions, span
        self._mask = decode_mask(positions, span) if mask is None else mask  # what `attend` applies
        self.length = span - 1

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values; return what attention reads: (count, H, T, D)
        after a prefill, (B, H, P, D) after a decode step (mask what lies beyond each row's own
        position)."""
        if self._positions is None:
            if self._slot is None:
                raise RuntimeError("call prefill(slot) or decode(positions) before update")
            s, n, t = self._slot, self._count, k.shape[2]
            self.k[s : s + n, :, :t] = k
            self.v[s : s + n, :, :t] = v
            return self.k[s : s + n, :, :t], self.v[s : s + n, :, :t]
        b = k.shape[0]
        rows = torch.arange(b, device=k.device)
        self.k[rows, :, self._positions] = k[:, :, 0]  # (B, H, D) into (B, H) cells
        self.v[rows, :, self._positions] = v[:, :, 0]
        return self.k[:b, :, : self._span], self.v[:b, :, : self._span]

    def attend(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """A decoding step's attention from the fused projection qkv (B, 1, 3C) of each row's
        new token: store its key and value at its position and attend over positions
        0..p_i of its own slot -> (B, 1, C), heads side by side. The kernel applies exactly
        decode_mask(positions), so it runs only when `mask` (B, P) is that mask. None
        where it does not take the step (another mask, not a decoding step, not float32
        on the CPU, no kernels): the caller then splits qkv, calls update and attends."""
        if self._positions is None or qkv.shape[1] != 1 or self.k.dtype != torch.float32:
            return None
        if mask is None or not (mask is self._mask or torch.equal(mask.bool(), self._mask)):
            return None
        library = kernels.load_for(qkv, (torch.float32,))
        if library is None:
            return None
        b = qkv.shape[0]
        out = library.slot_attention(
            qkv.reshape(b, -1).contiguous(),
            self.k,
            self.v,
            self._positions.to(torch.int64).contiguous(),
        )
        return out[:, None]  # (B, 1, C)

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into slot `target`."""
        self.k[target, :, :length] = self.k[source, :, :length]
        self.v[target, :, :length] = self.v[source, :, :length]


def position_bounds(positions: torch.Tensor) -> tuple[int, int]:
    """(B,) positions -> their (min, max), read in one transfer."""
    lowest, highest = torch.stack(torch.aminmax(positions)).tolist()
    return lowest, highest


def decode_mask(positions: torch.Tensor, span: int | None = None) -> torch.Tensor:
    """(B,) each row's new position -> (B, P) True where row i may attend: 0..p_i; P is
    span, max(positions) + 1, given or found."""
    if span is None:
        span = position_bounds(positions)[1] + 1
    return torch.arange(span, device=positions.device)[None, :] <= positions[:, None]
