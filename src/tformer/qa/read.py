"""Reading with a trained model: questions over contexts of any length -> answers.

Each example is cut into windows (tformer.qa.windows), the windows are run through the
reader in batches, and the best span over an example's windows is its answer.
"""

from collections.abc import Sequence

import torch

from tformer.qa.batches import QABatches
from tformer.qa.windows import Prediction, QAExample, best_answer, make_windows, marker_tokens


@torch.inference_mode()
def answer(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[QAExample],
    max_len: int,
    stride: int,
    max_answer_tokens: int = 30,
    null_threshold: float | None = None,
    batch_size: int = 16,
) -> list[Prediction]:
    """The best answer to each example's question in its context (see best_answer)."""
    separator, null = marker_tokens(tokenizer)
    device = next(model.parameters()).device
    per_example = [make_windows(tokenizer, e, max_len, stride, separator, null) for e in examples]
    flat = [w for windows in per_example for w in windows]
    collate = QABatches(flat, separator).collate
    was_training = model.training
    model.eval()
    logits = []
    for i in range(0, len(flat), batch_size):
        rows = flat[i : i + batch_size]
        spans = model(*collate(rows).to(device).inputs).float().cpu()  # (B, 2, T)
        logits += [span[:, : len(w.ids)] for span, w in zip(spans, rows, strict=True)]
    model.train(was_training)
    predictions, position = [], 0
    for example, windows in zip(examples, per_example, strict=True):
        mine = logits[position : position + len(windows)]
        position += len(windows)
        predictions.append(
            best_answer(windows, mine, example.context, max_answer_tokens, null_threshold)
        )
    return predictions
