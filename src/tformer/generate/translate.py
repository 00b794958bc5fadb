"""Translating sentences with an encoder-decoder model, and scoring the translations.

    translate(model, tokenizer, sentences, BeamConfig(beam_size=4))  -> list of strings
    corpus_scores(translations, references)  -> BLEU and chrF (sacrebleu's standard settings)

Sentences are encoded with an end token, sorted by length into batches (little padding),
decoded with beam search (or greedy search without a BeamConfig) and returned in the
order given. BLEU (Papineni et al., 2002) and chrF (Popović, 2015) come from sacrebleu, so
the numbers are comparable with published ones.

A source longer than the context window keeps its first max_len - 1 tokens (and its end
token), and a translation cannot be longer than max_len - 1 tokens: `translate_sentences`
reports both (source_truncated, finish_reason "context"), with a TruncationWarning each;
finish_reason is "stop" for a translation that ended with its end token, "length" for one
cut at max_new_tokens. The search never chooses an id the tokenizer cannot decode (the
model's target vocabulary may be larger than the tokenizer's).
"""

from dataclasses import dataclass, replace

import torch
from torch import nn

from tformer.checks import check_number
from tformer.errors import ConfigError
from tformer.generate.beam import BeamConfig, beam_search, greedy_search
from tformer.generate.limits import CONTEXT, LENGTH, STOP, warn_truncated
from tformer.generate.text import check_unicode
from tformer.tokenizers import Tokenizer


@dataclass
class Translation:
    text: str
    source_truncated: bool  # the source was longer than the window and lost its end
    finish_reason: str  # "stop", "length" or "context" (tformer.generate.limits)


def check_sentences(sentences: object) -> list[str]:
    if isinstance(sentences, str) or not isinstance(sentences, list | tuple):
        raise ConfigError(f"sentences must be a list of strings, got {type(sentences).__name__}")
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise ConfigError(f"sentences[{i}] must be a string, got {type(s).__name__}")
        check_unicode(f"sentences[{i}]", s)
    return list(sentences)


def encode_sources(
    tokenizer: Tokenizer, sentences: list[str], max_len: int, eos_id: int
) -> tuple[list[list[int]], list[bool]]:
    """Each sentence's ids with the end token, cut to the window -> ids, and which were cut
    (one TruncationWarning for all of them)."""
    encoded = [tokenizer.encode(s) for s in sentences]
    cut = [len(ids) > max_len - 1 for ids in encoded]
    if any(cut):
        longest = max(len(ids) for ids in encoded)
        warn_truncated(
            f"{sum(cut)} of {len(sentences)} source sentences are longer than the context "
            f"window holds ({longest} tokens, window {max_len}): only their first "
            f"{max_len - 1} are used"
        )
    return [ids[: max_len - 1] + [eos_id] for ids in encoded], cut


def translate(
    model: nn.Module,
    tokenizer: Tokenizer,
    sentences: list[str],
    config: BeamConfig | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 128,
) -> list[str]:
    """translate_sentences' texts alone."""
    translations = translate_sentences(
        model, tokenizer, sentences, config, batch_size, max_new_tokens
    )
    return [t.text for t in translations]


def translate_sentences(
    model: nn.Module,
    tokenizer: Tokenizer,
    sentences: list[str],
    config: BeamConfig | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 128,
) -> list[Translation]:
    """Each sentence's translation, whether its source was cut to fit the window, and why
    the translation ended; greedy search when config is None."""
    sentences = check_sentences(sentences)
    if config is not None and not isinstance(config, BeamConfig):
        raise ConfigError(f"config must be a BeamConfig or None, got {type(config).__name__}")
    check_number("batch_size", batch_size, integer=True, low=1)
    check_number("max_new_tokens", max_new_tokens, integer=True, low=1)
    c = model.config
    device = next(model.parameters()).device
    limit = tokenizer.vocab_size  # never choose an id the tokenizer cannot decode
    if config is not None:
        limit = min(limit, config.vocab_limit or limit)
        config = replace(config, vocab_limit=limit)
        max_new_tokens = config.max_new_tokens
    encoded, cut = encode_sources(tokenizer, sentences, c.max_len, c.eos_id)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[str] = [""] * len(sentences)
    reasons: list[str] = [STOP] * len(sentences)
    # Both searches run at most `steps` steps (BOS takes position 0), and a translation that
    # ended with its end token is shorter than that (the end token took a step).
    steps = min(max_new_tokens, c.max_len - 1)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        src = torch.full((len(rows), width), c.pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            src[r, : len(encoded[i])] = torch.tensor(encoded[i])
        src = src.to(device)
        if config is None:
            outputs = greedy_search(model, src, max_new_tokens, limit)
        else:
            outputs = beam_search(model, src, config)
        for i, ids in zip(rows, outputs, strict=True):
            results[i] = tokenizer.decode(ids)
            if len(ids) >= steps:
                reasons[i] = LENGTH if steps == max_new_tokens else CONTEXT
    full = reasons.count(CONTEXT)
    if full:
        warn_truncated(
            f"{full} of {len(sentences)} translations filled the context window ({c.max_len} "
            f"tokens) before their end token: they may be cut short"
        )
    return [Translation(*row) for row in zip(results, cut, reasons, strict=True)]


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
    inspect` and `tformer attention` show a translation model on). Either one longer than
    the context window is cut to fit, with a TruncationWarning; a target that encodes to
    nothing is refused, naming --target."""
    c = model.config
    (src,), _ = encode_sources(tokenizer, [text], c.max_len, c.eos_id)
    if target is None:
        device = next(model.parameters()).device
        tgt = greedy_search(model, torch.tensor([src], device=device), c.max_len - 1)[0]
        if not tgt:
            raise ValueError("the model's translation is empty; give one with --target")
    else:
        tgt = tokenizer.encode(target)
        if not tgt:
            raise ValueError("--target encodes to no tokens")
        if len(tgt) > c.max_len - 1:
            warn_truncated(
                f"the target has {len(tgt)} tokens but the context window holds {c.max_len}: "
                f"only its first {c.max_len - 1} are used"
            )
            tgt = tgt[: c.max_len - 1]
    return src, tgt
