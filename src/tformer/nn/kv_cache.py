"""A preallocated key/value cache for one attention layer.

In causal self-attention the keys and values of earlier positions never change, so a decoder
keeps them: each new token then costs one position of work instead of the whole sequence.
The tensors are allocated once at full length and filled in place; `update` returns views of
the part written so far.

A search whose rows branch (beam search: two beams may continue one, and a finished
sentence's rows leave) need not copy any history: every step writes one new position, and
the positions before it are never written again, so a row's past may stay in whichever
slots it was written in. `follow_paths` records, for each row and position, the slot
holding it (`paths`, (B, max_len)). The one-call decoding steps of the C kernels read and
write along the paths; `update` (the plain path) first lays each row's past out in a slot
of its own, once per follow_paths, and then returns views again.
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
        self.paths: torch.Tensor | None = None  # (B, max_len) int64 slots, follow_paths
        self.spare: tuple[torch.Tensor, torch.Tensor] | None = None  # lay_out_paths' room

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, T, D) keys and values; return all (B, H, length, D) so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache is full: {end} positions requested, room for {self.max_len}"
            )
        if self.paths is not None:
            self.lay_out_paths()
        rows = k.shape[0]  # rows 0..B-1 of the slots (fewer once a search has dropped some)
        self.k[:rows, :, start:end] = k
        self.v[:rows, :, start:end] = v
        self.length = end
        return self.k[:rows, :, :end], self.v[:rows, :, :end]

    def lay_out_paths(self) -> None:
        """Copy each row's past along its path into slot b for row b (the plain path reads
        the cache as views): one gather per follow_paths, as a search that copied rows
        paid; the one-call decoding step reads along the paths instead."""
        path, past = self.paths[:, : self.length], self.positions(0, self.length)
        rows = path.shape[0]
        if self.spare is None:  # the tensors it lays out into; the old ones are then spare
            self.spare = (torch.empty_like(self.k), torch.empty_like(self.v))
        laid_out = self.spare
        for old, new in zip((self.k, self.v), laid_out, strict=True):
            new[:rows, :, : self.length] = old[path, :, past].transpose(1, 2)  # (B, H, t, D)
        self.spare = (self.k, self.v)
        self.k, self.v = laid_out
        self.paths = None

    def positions(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.k.device)


def follow_paths(
    caches: list[KVCache], rows: torch.Tensor, slots: torch.Tensor | None = None
) -> None:
    """The rows of a search go on as rows (N,) of the batch before (a row may go on twice,
    or not at all), each writing its next positions in slots (N,), distinct (by default
    row i in slot i: every slot's next position is free, whoever wrote its earlier ones):
    each row's past stays where it was written, and every cache's `paths` (the same
    tensor) record which slot holds each position of each row. Nothing is copied but the
    (N, max_len) table of slots."""
    first = caches[0]
    n_slots, length = first.k.shape[0], first.length
    if slots is None:  # distinct and in range as long as the rows fit the slots
        if rows.numel() > n_slots:
            raise ValueError(f"{rows.numel()} rows for {n_slots} slots")
        slots = torch.arange(rows.numel(), device=rows.device)
    else:
        if slots.shape != rows.shape or slots.unique().numel() != slots.numel():
            raise ValueError("follow_paths needs one distinct slot for each row that goes on")
        if slots.numel() and not 0 <= int(slots.min()) <= int(slots.max()) < n_slots:
            raise ValueError(f"slots must lie in 0..{n_slots - 1}")
    paths = first.paths
    if paths is None:  # so far row b's positions are all in slot b
        paths = torch.arange(n_slots, device=rows.device)[:, None].expand(n_slots, first.max_len)
    paths = paths.index_select(0, rows)
    paths[:, length:] = slots[:, None]  # the positions to come: each row's own slot
    for cache in caches:
        if cache.length != length or cache.k.shape[0] != n_slots:
            raise ValueError("the caches of one search must have the same slots and length")
        cache.paths = paths


def fused_step_caches(caches: list, rows: int, heads: int, d_head: int) -> bool:
    """Whether a one-call decoding step (models/gpt2_decode.py, seq2seq_decode.py) can write
    into these caches: every one a KVCache at the same length with room left, its keys and
    values (slots, heads, max_len, d_head) float32, contiguous, on the CPU (the kernel
    writes at (slot, head, length) of each, in place), with one slot per row, or paths
    (follow_paths) for the rows, the same for all."""
    first = caches[0]
    if type(first) is not KVCache or first.length >= first.max_len:
        return False
    slots = first.k.shape[0]
    if first.paths is None and slots != rows:
        return False
    if first.paths is not None:
        paths = first.paths
        if paths.shape != (rows, first.max_len) or paths.device.type != "cpu":
            return False
        if paths.dtype != torch.int64 or not paths.is_contiguous():
            return False
        written = paths[:, : first.length + 1]  # the kernel reads and writes these slots
        if not 0 <= int(written.min()) <= int(written.max()) < slots:
            return False
    shape = (slots, heads, first.max_len, d_head)
    for cache in caches:
        if type(cache) is not KVCache or cache.length != first.length:
            return False
        if cache.paths is not first.paths:
            return False
        for tensor in (cache.k, cache.v):
            if tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
                return False
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                return False
    return True
