"""A weight's bf16 copy, kept from one training step to the next while the weight is
unchanged, and rewritten by the optimizer in the pass that updates the weight.

Under bf16 autocast a linear layer multiplies x W^T with W cast to bf16, so every step
reads each float32 weight once more and writes its bf16 copy (6 bytes a weight) before the
first product can start. The optimizer already reads and writes every weight once a step:
written there, the copy costs 2 bytes a weight more in a pass that is running anyway
(kernels/adamw.c, train/optim.py), and the forward pass reads it as it is.

A copy is used only while it is the weight's current value: it remembers the weight's
version counter, which torch bumps at every in-place change made through the weight (the
optimizer's included), and its storage; either changed, half_weight casts afresh. A write
that bypasses the counter (through `p.data`, or a NumPy view of the storage) would leave
the copy stale, so copies are kept only inside `kept_between_steps()`, which tformer's
trainer wraps around its loop, where nothing writes so, and all are dropped on leaving it;
and only for weights that an optimizer which writes their copies holds (`register`:
tformer's AdamW), so that weights written another way (a sharded model's, gathered into
place for each step by the collective) cast afresh every time.
The copy is bf16(W) rounded to nearest even, the cast's own value, so the products are
the same with or without it. Only float32 Parameters that train on the CPU keep one (2
bytes a weight of memory).
"""

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Copy:
    tensor: torch.Tensor  # bf16, the weight's shape
    version: int  # the weight's _version when the copy was its value
    address: int  # the weight's data_ptr then: a Parameter given new storage is not the same


class KeyReference(weakref.ref):
    """A weak reference that remembers the id it is filed under."""

    __slots__ = ("key",)


class ByIdentity:
    """A mapping keyed by a tensor's identity (a tensor's == is elementwise) that holds
    each key weakly: an entry goes when its tensor does. torch's WeakIdKeyDictionary does
    the same, but makes a weak reference at every lookup: a small model's step asks ~150
    times, and spent ~0.3 ms a step so (docs/LOG.md). Here an entry keeps its key's weak
    reference, and a lookup checks that it still points at the key (ids are reused)."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[weakref.ref, Any]] = {}

    def get(self, key: torch.Tensor) -> Any:
        entry = self.entries.get(id(key))
        return entry[1] if entry is not None and entry[0]() is key else None

    def __contains__(self, key: torch.Tensor) -> bool:
        entry = self.entries.get(id(key))
        return entry is not None and entry[0]() is key

    def __setitem__(self, key: torch.Tensor, value: Any) -> None:
        entry = self.entries.get(id(key))
        if entry is not None and entry[0]() is key:
            reference = entry[0]
        else:
            reference = KeyReference(key, self.forget)
            reference.key = id(key)
        self.entries[id(key)] = (reference, value)

    def forget(self, reference: "KeyReference") -> None:
        """The weak reference's callback, when its tensor goes: its entry goes too (unless
        another tensor has taken the id, and an entry, since)."""
        entry = self.entries.get(reference.key)
        if entry is not None and entry[0] is reference:
            self.entries.pop(reference.key, None)  # (a clear() may have come between)

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()


_COPIES = ByIdentity()  # forgotten when the weight goes
_KEEPING = 0  # how many kept_between_steps blocks are open
_REGISTERED = ByIdentity()  # the weights an optimizer writes the copies of


def register(weights: list[torch.Tensor]) -> None:
    """For an optimizer that writes the copies of `weights` when it updates them (with
    copy_to_write and written): they may keep one."""
    for w in weights:
        _REGISTERED[w] = True


@contextlib.contextmanager
def kept_between_steps() -> Iterator[None]:
    """Within this block trainable weights keep their bf16 copies from step to step; every
    copy is dropped when the outermost block ends. For a training loop whose weights change
    only through the optimizer and torch's in-place operations."""
    global _KEEPING
    _KEEPING += 1
    try:
        yield
    finally:
        _KEEPING -= 1
        if _KEEPING == 0:
            _COPIES.clear()


def keeps_copy(weight: torch.Tensor) -> bool:
    """Whether `weight` keeps a bf16 copy: inside kept_between_steps, a float32 Parameter
    that trains, on the CPU, registered by its optimizer."""
    return (
        _KEEPING > 0
        and weight in _REGISTERED
        and isinstance(weight, torch.nn.Parameter)
        and weight.requires_grad
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
    )


def half_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight in `dtype` (not a view: a tensor that may be saved for the backward pass):
    the kept bf16 copy where it is current, else the cast, kept for the next use where
    keeps_copy(weight)."""
    if dtype != torch.bfloat16 or not keeps_copy(weight):
        return weight.to(dtype)
    kept = _COPIES.get(weight)
    if kept is not None and is_current(kept, weight):
        return kept.tensor
    copy = weight.detach().to(dtype)  # (N, K), a tensor of its own
    _COPIES[weight] = Copy(copy, weight._version, weight.data_ptr())
    return copy


def is_current(kept: Copy, weight: torch.Tensor) -> bool:
    return kept.version == weight._version and kept.address == weight.data_ptr()


def any_kept() -> bool:
    """Whether any weight keeps a copy now."""
    return len(_COPIES) > 0


def copy_to_write(weight: torch.Tensor) -> torch.Tensor | None:
    """The bf16 copy the optimizer should write with weight's next value, or None where the
    weight keeps none (or it is stale: then the next use casts afresh)."""
    kept = _COPIES.get(weight)
    if kept is None or not is_current(kept, weight) or not kept.tensor.is_contiguous():
        return None
    return kept.tensor


def written(weight: torch.Tensor, copy: torch.Tensor) -> None:
    """Record that `copy` (copy_to_write's) now holds bf16 of weight's new value: call after
    the weight's own version was bumped for the update."""
    _COPIES[weight] = Copy(copy, weight._version, weight.data_ptr())
