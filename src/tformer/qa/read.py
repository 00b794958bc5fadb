"""Reading with a trained model: questions over contexts of any length -> answers.

Each example is cut into windows (tformer.qa.windows), the windows are run through the
reader in batches, and the best span over an example's windows is its answer. Over a whole
corpus, BM25 first picks the passages worth reading (tformer.qa.retrieval), and the answers
found in them are ranked by the reader's span score.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tformer.checkpoints import resolve_checkpoint
from tformer.files import read_json
from tformer.models import encoder_qa, seq2seq
from tformer.models.encoder_qa import EncoderForQuestionAnswering
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering
from tformer.nn.modes import evaluating
from tformer.qa.batches import QABatches
from tformer.qa.retrieval import Passage, PassageIndex
from tformer.qa.windows import Prediction, QAExample, best_answer, make_windows, marker_tokens

Reader = GPT2ForQuestionAnswering | EncoderForQuestionAnswering


def load_reader(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    seed: int = 0,
    *,
    dropout: float | None = None,
    attention: str | None = None,
    head_required: bool = False,
) -> Reader:
    """A reader of either kind, as its checkpoint says: GPT-2's (the Hugging Face layout, or
    a LoRA adapter on one) or the bidirectional encoder's. A plain GPT-2 language model or
    an encoder-decoder model loads with a new span head drawn from `seed` (an error instead
    with head_required)."""
    directory = resolve_checkpoint(path)
    config = directory / "config.json"
    kind = read_json(config, "the model's config").get("model_type") if config.is_file() else None
    settings = dict(dropout=dropout, attention=attention, head_required=head_required)
    if kind in (encoder_qa.MODEL_TYPE, seq2seq.MODEL_TYPE):
        return EncoderForQuestionAnswering.from_pretrained(directory, device, seed, **settings)
    return GPT2ForQuestionAnswering.from_pretrained(directory, device=device, seed=seed, **settings)


def vocab_size(model: Reader) -> int:
    if isinstance(model, EncoderForQuestionAnswering):
        return model.config.src_vocab_size
    return model.config.vocab_size


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
    logits = []
    with evaluating(model):
        for i in range(0, len(flat), batch_size):
            rows = flat[i : i + batch_size]
            spans = model(*collate(rows).to(device).inputs).float().cpu()  # (B, 2, T)
            logits += [span[:, : len(w.ids)] for span, w in zip(spans, rows, strict=True)]
    predictions, position = [], 0
    for example, windows in zip(examples, per_example, strict=True):
        mine = logits[position : position + len(windows)]
        position += len(windows)
        predictions.append(
            best_answer(windows, mine, example.context, max_answer_tokens, null_threshold)
        )
    return predictions


@dataclass(frozen=True)
class CorpusAnswer:
    text: str
    score: float  # the reader's span score s_i + e_j
    passage: Passage
    retrieval_score: float  # the passage's BM25 score


def answer_from_corpus(
    model: torch.nn.Module,
    tokenizer,
    index: PassageIndex,
    question: str,
    max_len: int,
    stride: int,
    top_passages: int = 5,
    max_answer_tokens: int = 30,
) -> list[CorpusAnswer]:
    """The answers the reader finds in the top_passages passages BM25 ranks highest for the
    question, best first (one per passage)."""
    found = index.search(question, top_passages)
    if not found:
        raise ValueError(f"no passage shares a word with the question {question!r}")
    examples = [QAExample(f"passage-{i}", question, p.text) for i, (p, _) in enumerate(found)]
    predictions = answer(model, tokenizer, examples, max_len, stride, max_answer_tokens)
    answers = [
        CorpusAnswer(prediction.text, prediction.score, passage, bm25)
        for prediction, (passage, bm25) in zip(predictions, found, strict=True)
    ]
    return sorted(answers, key=lambda a: a.score, reverse=True)
