"""Parallel text for translation: reading sentence pairs, a synthetic task, and batches.

A translation example is a pair (source x, target y), tokenised with one joint tokenizer.
The model reads x and the target shifted right, and is scored on predicting y then the end:

    inputs:  x + [EOS],  [BOS] + y        targets:  y + [EOS]

Batches are bucketed by length: examples sorted by (source length, target length), and a
batch is a run of neighbours in that order, so a batch's sentences have similar lengths and
little of it is padding. Training draws runs at random positions (from a seeded generator,
whose state the checkpoint keeps), wrapping around at the end so that every example is
equally likely; evaluation walks the order once.
"""

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tformer.data.sources import read_jsonl_fields, text_lines
from tformer.data.tokens import IGNORE_INDEX, Batch, in_order
from tformer.errors import ConfigError, DataError
from tformer.tokenizers import Tokenizer

Pair = tuple[str, str]


def read_parallel(path: str | Path) -> list[Pair]:
    """Sentence pairs from a TSV file (source<TAB>target per line) or JSONL ({"src", "tgt"});
    a line that is not such a pair, or has an empty side, is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        pairs = read_jsonl_fields(path, ("src", "tgt"), non_empty=True)
    else:
        lines = enumerate(text_lines(path), start=1)
        pairs = [tsv_pair(line, f"{path}:{n}") for n, line in lines if line.strip()]
    if not pairs:
        raise DataError(str(path), "no sentence pairs in it")
    return pairs


def tsv_pair(line: str, where: str) -> Pair:
    """One line source<TAB>target as a pair, both sides non-empty."""
    fields = line.split("\t")
    if len(fields) != 2:
        raise DataError(where, f"expected source<TAB>target, found {len(fields)} field(s)")
    for side, text in zip(("source", "target"), fields, strict=True):
        if not text.strip():
            raise DataError(where, f"expected source<TAB>target; the {side} is empty")
    return fields[0], fields[1]


def number_words(
    count: int = 10_000, seed: int = 0, source: str = "en", target: str = "fr"
) -> list[Pair]:
    """The synthetic task: the numbers 0..count-1 written in words, English to French
    (21 -> "twenty-one" / "vingt et un"), shuffled with `seed`. Real words on both sides,
    with the reorderings and irregular forms of real languages (80 -> "quatre-vingts")."""
    from num2words import num2words

    numbers = list(range(count))
    random.Random(seed).shuffle(numbers)
    return [(num2words(n, lang=source), num2words(n, lang=target)) for n in numbers]


def split_pairs(
    pairs: list[Pair], val: int, test: int
) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """The last `test` pairs for testing, the `val` before them for validation, the rest
    for training."""
    if val + test >= len(pairs):
        raise ValueError(f"{len(pairs)} pairs cannot hold {val} for validation and {test} for test")
    train_end = len(pairs) - val - test
    return pairs[:train_end], pairs[train_end : train_end + val], pairs[train_end + val :]


class ParallelBatches:
    """Length-bucketed batches of tokenised sentence pairs, for the Trainer."""

    def __init__(
        self,
        pairs: list[Pair],
        tokenizer: Tokenizer,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        max_len: int,
        name: str = "data",
    ) -> None:
        if not pairs:
            raise ValueError(f"the {name} set has no sentence pairs")
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        examples = []
        for src, tgt in pairs:
            src_ids = tokenizer.encode(src)[: max_len - 1] + [eos_id]
            tgt_ids = tokenizer.encode(tgt)[: max_len - 1]
            examples.append((src_ids, tgt_ids))
        # Bucketing: neighbours in this order have similar lengths.
        examples.sort(key=lambda e: (len(e[0]), len(e[1])))
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, examples: list[tuple[list[int], list[int]]]) -> Batch:
        """-> inputs (source (B, S), target input (B, T)), targets (B, T)."""
        b = len(examples)
        s = max(len(src) for src, _ in examples)
        t = max(len(tgt) for _, tgt in examples) + 1
        src_ids = torch.full((b, s), self.pad_id, dtype=torch.long)
        tgt_in = torch.full((b, t), self.pad_id, dtype=torch.long)
        targets = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
        for row, (src, tgt) in enumerate(examples):
            src_ids[row, : len(src)] = torch.tensor(src)
            tgt_in[row, : len(tgt) + 1] = torch.tensor([self.bos_id, *tgt])
            targets[row, : len(tgt) + 1] = torch.tensor([*tgt, self.eos_id])
        return Batch((src_ids, tgt_in), targets)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A run of `batch_size` neighbours in length order from a random position (circular:
        the run after the last example goes on with the first)."""
        n = len(self.examples)
        start = int(torch.randint(0, n, (1,), generator=generator))
        return self.collate([self.examples[(start + i) % n] for i in range(batch_size)])

    def sequential(self, batch_size: int) -> Iterator[Batch]:
        """Every example once, in length order."""
        return map(self.collate, in_order(self.examples, batch_size))


BUILTIN_PARALLEL = ("number-words", "bible-en-es")


@dataclass
class ParallelCorpus:
    train: list[Pair]
    val: list[Pair]
    test: list[Pair]
    description: str


def load_parallel(
    data: str | None, train_file: str | None = None, val_file: str | None = None
) -> ParallelCorpus:
    """Sentence pairs for training, validation and test.

    data: 'number-words' (the built-in synthetic task, 10,000 pairs: 500 for validation and
    500 for test), 'bible-en-es' (KJV to Reina-Valera 1909, split by book: see
    tformer.data.bible), or a TSV/JSONL file whose last 5% (at most 2,000 pairs) is held
    out for test and as much again before it for validation. Or explicit train and val
    files, with the validation pairs as the test set too.
    """
    if train_file is not None or val_file is not None:
        if train_file is None or val_file is None or data is not None:
            raise ConfigError("give --train and --val together, instead of --data")
        val = read_parallel(val_file)
        return ParallelCorpus(read_parallel(train_file), val, val, f"{train_file} + {val_file}")
    if data in (None, "number-words"):
        train, val, test = split_pairs(number_words(), val=500, test=500)
        return ParallelCorpus(train, val, test, "number-words (English -> French, 0..9999)")
    if data == "bible-en-es":
        from tformer.data.bible import bible_en_es

        splits, dropped = bible_en_es()
        left_out = ", ".join(f"{n} ({why})" for why, n in dropped.items())
        description = f"bible-en-es (KJV -> Reina-Valera 1909; verses left out: {left_out})"
        return ParallelCorpus(splits["train"], splits["val"], splits["test"], description)
    pairs = read_parallel(data)
    held_out = min(2000, len(pairs) // 20)
    if held_out == 0:
        raise DataError(str(data), f"{len(pairs)} pairs are too few to hold any out (need >= 20)")
    train, val, test = split_pairs(pairs, val=held_out, test=held_out)
    return ParallelCorpus(train, val, test, str(data))
