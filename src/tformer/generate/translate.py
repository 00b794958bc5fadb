"""Translating sentences with an encoder-decoder model, and scoring the translations.

    translate(model, tokenizer, sentences, BeamConfig(beam_size=4))  -> list of strings
    corpus_scores(translations, references)  -> BLEU and chrF (sacrebleu's standard settings)

Sentences are encoded with an end token, sorted by length into batches (little padding),
decoded with beam search (or greedy search without a BeamConfig) and returned in the
order given. BLEU (Papineni et al., 2002) and chrF (Popović, 2015) come from sacrebleu, so
the numbers are comparable with published ones.
"""

import torch
from torch import nn

from tformer.generate.beam import BeamConfig, beam_search, greedy_search
from tformer.tokenizers import Tokenizer


def translate(
    model: nn.Module,
    tokenizer: Tokenizer,
    sentences: list[str],
    config: BeamConfig | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 128,
) -> list[str]:
    """Each sentence's translation; greedy search when config is None."""
    c = model.config
    device = next(model.parameters()).device
    encoded = [tokenizer.encode(s)[: c.max_len - 1] + [c.eos_id] for s in sentences]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[str] = [""] * len(sentences)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        src = torch.full((len(rows), width), c.pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            src[r, : len(encoded[i])] = torch.tensor(encoded[i])
        src = src.to(device)
        if config is None:
            outputs = greedy_search(model, src, max_new_tokens)
        else:
            outputs = beam_search(model, src, config)
        for i, ids in zip(rows, outputs, strict=True):
            results[i] = tokenizer.decode(ids)
    return results


def corpus_scores(translations: list[str], references: list[str]) -> dict[str, float]:
    """Corpus-level BLEU and chrF of the translations against one reference each."""
    import sacrebleu

    if len(translations) != len(references):
        raise ValueError(f"{len(translations)} translations for {len(references)} references")
    return {
        "bleu": sacrebleu.corpus_bleu(translations, [references]).score,
        "chrf": sacrebleu.corpus_chrf(translations, [references]).score,
    }


def sentence_pair(
    model: nn.Module, tokenizer: Tokenizer, text: str, target: str | None
) -> tuple[list[int], list[int]]:
    """Source ids (ending with the end token) and target ids (no start or end token) of
    `text`: `target` encoded, or else the model's greedy translation (what `tformer
    inspect` and `tformer attention` show a translation model on). A target that encodes to
    nothing is refused, naming --target."""
    c = model.config
    src = tokenizer.encode(text)[: c.max_len - 1] + [c.eos_id]
    if target is None:
        device = next(model.parameters()).device
        tgt = greedy_search(model, torch.tensor([src], device=device), c.max_len - 1)[0]
        if not tgt:
            raise ValueError("the model's translation is empty; give one with --target")
    else:
        tgt = tokenizer.encode(target)[: c.max_len - 1]
        if not tgt:
            raise ValueError("--target encodes to no tokens")
    return src, tgt
