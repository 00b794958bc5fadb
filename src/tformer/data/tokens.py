"""Tokenised text as a memory-mapped array, and batches of windows drawn from it.

A text is tokenised once; the ids are stored as a flat array (uint16 when the vocabulary
fits, else uint32) under the cache directory, keyed by a hash of the text and of the
tokenizer, so the next run maps the file and starts at once.

A language-model example is a window of T + 1 consecutive tokens: the model reads the first
T and is scored on predicting each of the T that follow (x = w[:-1], y = w[1:]).
"""

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from tformer.files import atomic_write, cache_dir
from tformer.tokenizers import Tokenizer

T = TypeVar("T")

IGNORE_INDEX = -100  # a target the loss skips (padding), as in torch's cross_entropy


@dataclass
class Batch:
    """What the trainer feeds a model: `model(*inputs)` gives logits scored on `targets`.
    `tokens` is what the batch counts for throughput when that is not its scored targets
    (a reader's input tokens, say: it has two targets per window)."""

    inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor
    tokens: int | None = None

    def rows(self, start: int, end: int) -> "Batch":
        """Rows start..end; they count their scored targets (the trainer counts tokens on
        whole batches)."""
        return Batch(tuple(x[start:end] for x in self.inputs), self.targets[start:end])

    def to(self, device: torch.device) -> "Batch":
        inputs = tuple(x.to(device) for x in self.inputs)
        return Batch(inputs, self.targets.to(device), self.tokens)

    def token_count(self) -> int:
        """Tokens for throughput: `tokens` if given, else the targets the loss scores."""
        if self.tokens is not None:
            return self.tokens
        return int((self.targets != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return self.targets.shape[0]


def stacked(batches: Sequence[Batch], most: int) -> list[Batch]:
    """The batches with runs of up to `most` consecutive ones of the same shape (but for
    their rows) joined into one: the same rows in the same order, in fewer and larger
    forward passes, for scoring. Batches of other shapes (padded to other lengths) stay
    apart."""
    if most < 1:
        raise ValueError(f"stacked: most must be at least 1, got {most}")
    out: list[Batch] = []
    group: list[Batch] = []

    def close() -> None:
        if len(group) == 1:
            out.append(group[0])
        elif group:
            inputs = tuple(
                torch.cat(parts) for parts in zip(*(b.inputs for b in group), strict=True)
            )
            counts = [b.tokens for b in group]
            tokens = None if None in counts else sum(counts)
            out.append(Batch(inputs, torch.cat([b.targets for b in group]), tokens))
        group.clear()

    def shapes(batch: Batch) -> list[tuple[int, ...]]:
        return [tuple(x.shape[1:]) for x in (*batch.inputs, batch.targets)]

    for batch in batches:
        if group and (len(group) == most or shapes(batch) != shapes(group[0])):
            close()
        group.append(batch)
    close()
    return out


def draw(items: Sequence[T], n: int, generator: torch.Generator) -> list[T]:
    """n items drawn uniformly, with replacement, from `generator`: a training batch's rows."""
    rows = torch.randint(0, len(items), (n,), generator=generator)
    return [items[i] for i in rows.tolist()]


def in_order(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Every item once, in order, `size` at a time: an evaluation's batches."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_cached(text: str, tokenizer: Tokenizer) -> np.ndarray:
    """The token ids of `text` as a read-only memory map, computed once per text and tokenizer."""
    dtype = token_dtype(tokenizer.vocab_size)
    key = hashlib.sha256()
    key.update(tokenizer.fingerprint().encode())
    key.update(b"\0")
    key.update(text.encode("utf-8"))
    path = cache_dir() / "tokens" / f"{key.hexdigest()[:32]}.{dtype.name}.bin"
    if not path.is_file():
        ids = np.asarray(tokenizer.encode(text), dtype=dtype)
        if len(ids) == 0:
            raise ValueError("the text encodes to no tokens at all")
        atomic_write(path, lambda tmp: ids.tofile(tmp))
    return np.memmap(path, dtype=dtype, mode="r")


class LMBatches:
    """Windows of T + 1 tokens from one array: random ones for training, in order for eval."""

    def __init__(self, tokens: np.ndarray, context: int, name: str = "data") -> None:
        if len(tokens) < context + 1:
            raise ValueError(
                f"the {name} text has {len(tokens):,} tokens, fewer than one context window "
                f"needs ({context} + 1); use more text or a shorter --context"
            )
        self.tokens = tokens
        self.context = context
        with warnings.catch_warnings():  # a read-only map: torch warns, and it is never written
            warnings.simplefilter("ignore", UserWarning)
            ids = torch.from_numpy(np.ascontiguousarray(tokens))  # a memmap's memory, no copy
        # every window as a row of one strided view, (N - T, T + 1): a batch is one gather
        # of its rows, in torch (a training step's numpy calls ran from a cold cache)
        self.all_windows = ids.as_strided((len(tokens) - context, context + 1), (1, 1))

    def __len__(self) -> int:
        """Number of tokens."""
        return len(self.tokens)

    def windows(self, starts: torch.Tensor) -> Batch:
        """The windows at `starts` (B,) int64: (B, T) inputs, (B, T) targets, all scored."""
        w = self.all_windows.index_select(0, starts).long()  # (B, T + 1)
        return Batch((w[:, :-1],), w[:, 1:], tokens=w.shape[0] * self.context)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """`batch_size` windows at uniformly random positions drawn from `generator`."""
        high = len(self.tokens) - self.context  # last start whose window fits
        return self.windows(torch.randint(0, high, (batch_size,), generator=generator))

    def sequential(self, batch_size: int) -> Iterator[Batch]:
        """Non-overlapping windows from the start: every token after the first is a target
        exactly once (up to the last incomplete window)."""
        starts = torch.arange(0, len(self.tokens) - self.context, self.context)
        for i in range(0, len(starts), batch_size):
            yield self.windows(starts[i : i + batch_size])
