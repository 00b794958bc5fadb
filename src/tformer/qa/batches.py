"""Batches of question-answering windows for tformer's trainer.

Each window (tformer.qa.windows) becomes one row: its ids, right-padded to the longest row
of the batch with an attention mask, and the targets (start, end), the positions of the
answer's first and last token (or of the null token). The reader returns span logits
(B, 2, T), so the trainer's cross-entropy over positions is the usual QA loss,
(CE(start) + CE(end)) / 2.
"""

from collections.abc import Iterator

import torch

from tformer.data.tokens import Batch, draw, in_order
from tformer.qa.windows import Window


class QABatches:
    def __init__(self, windows: list[Window], pad_id: int, name: str = "data") -> None:
        if not windows:
            raise ValueError(f"the {name} questions give no windows")
        self.windows = windows
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.windows)

    def collate(self, windows: list[Window]) -> Batch:
        """-> inputs (ids (B, T), attention mask (B, T)), targets (B, 2): start, end; the
        batch counts its unpadded input tokens for throughput."""
        t = max(len(w.ids) for w in windows)
        ids = torch.full((len(windows), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(windows), t, dtype=torch.long)
        for row, window in enumerate(windows):
            ids[row, : len(window.ids)] = torch.tensor(window.ids)
            mask[row, : len(window.ids)] = 1
        targets = torch.tensor([[w.start, w.end] for w in windows], dtype=torch.long)
        return Batch((ids, mask), targets, tokens=int(mask.sum()))

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """`batch_size` windows drawn uniformly (with replacement) from `generator`."""
        return self.collate(draw(self.windows, batch_size, generator))

    def sequential(self, batch_size: int) -> Iterator[Batch]:
        """Every window once, in order."""
        return map(self.collate, in_order(self.windows, batch_size))
