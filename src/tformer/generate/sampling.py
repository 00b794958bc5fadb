"""Samplers: pure functions from next-token logits (B, V) to logits or token ids.

temperature   p_i ∝ exp(z_i / T): T < 1 sharpens, T > 1 flattens
top-k         keep the k largest logits, the rest become -inf
top-p         keep the smallest set of most likely tokens whose probability reaches p
              (Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration")
repetition    for every token already in the text, z / r if z > 0 else z * r
              (Keskar et al., 2019, CTRL): r > 1 makes repeating less likely
occurrence    z - presence * [c > 0] - frequency * c, c = the token's count among those
              drawn so far (OpenAI's presence and frequency penalties)
min-p         keep the tokens with p_i >= min_p * max_j p_j (Nguyen et al., 2024)
vocab limit   ids >= n become -inf: never drawn (the tokenizer knows only n of the ids)
"""

import math
from collections.abc import Sequence

import torch

from tformer.checks import check_number


def mask_beyond(logits: torch.Tensor, limit: int | None) -> torch.Tensor:
    """(B, V) -> (B, V) with the logits of ids >= limit set to -inf; the logits themselves
    when nothing lies beyond (no limit, or one of V or more).

    A model's embedding table can be larger than its tokenizer's vocabulary (padded to a
    multiple of 64, or trained with another tokenizer); an id the tokenizer cannot decode
    must never be drawn."""
    check_number("vocab_limit", limit, integer=True, low=1, optional=True)
    if limit is None or limit >= logits.shape[-1]:
        return logits
    beyond = torch.arange(limit, logits.shape[-1], device=logits.device)
    return logits.index_fill(-1, beyond, float("-inf"))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    check_number("temperature", temperature, low=0, low_open=True)
    return logits / temperature


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """(B, V) logits, (B, N) ids already in each text -> (B, V) with those tokens penalised."""
    check_number("repetition_penalty", penalty, low=0, low_open=True)
    scores = logits.gather(-1, seen)  # (B, N)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, seen, scores)


def occurrence_penalty(
    logits: torch.Tensor, drawn: Sequence[Sequence[int]], presence: float, frequency: float
) -> torch.Tensor:
    """(B, V) logits, each row's ids drawn so far -> (B, V) with z - presence * [c > 0] -
    frequency * c, c a token's count in its row (the rows may differ in length)."""
    check_number("presence_penalty", presence)
    check_number("frequency_penalty", frequency)
    counts = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)  # (B, V)
    for row, ids in enumerate(drawn):
        if ids:
            index = torch.tensor(ids, device=logits.device)
            ones = torch.ones(len(ids), dtype=logits.dtype, device=logits.device)
            counts[row].index_add_(0, index, ones)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """(B, V) -> (B, V) keeping the tokens at least min_p times as likely as the likeliest:
    log p_i >= log min_p + max_j log p_j, which is z_i >= log min_p + max_j z_j."""
    check_number("min_p", min_p, low=0, high=1)
    if min_p == 0:
        return logits
    floor = logits.max(dim=-1, keepdim=True).values + math.log(min_p)  # (B, 1)
    return logits.masked_fill(logits < floor, float("-inf"))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) -> (B, V) with all but the k largest logits set to -inf (ties kept)."""
    check_number("top_k", k, integer=True, low=1)
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(B, V) -> (B, V) keeping the smallest set of top tokens with total probability >= p."""
    check_number("top_p", p, low=0, high=1, low_open=True)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = before >= p  # the set already reached p without this token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) the most likely token."""
    return logits.argmax(dim=-1)


def sample(
    logits: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """(B, V) -> (B,) a token drawn from softmax(logits), by inverting the cumulative sum.

    One uniform number u per row picks the first token whose cumulative probability exceeds
    u (times the total, which float rounding keeps only near 1). This costs one random number
    where torch.multinomial draws one per vocabulary entry: a millisecond per token for
    GPT-2's 50,257, a tenth of a decoding step. `generator` is one generator for all rows,
    or one per row (a batch whose rows must each match their own run alone).
    """
    probs = torch.softmax(logits.double(), dim=-1)  # (B, V); float64 keeps the sum exact
    cdf = probs.cumsum(dim=-1)
    if isinstance(generator, Sequence):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
        u = torch.cat([_uniform(1, g, cdf) for g in generator])  # (B, 1)
    else:
        u = _uniform(probs.shape[0], generator, cdf)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)  # (B,)
    # u * total can round up to the total itself; the draw then belongs to the last token
    # that has any probability.
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)
    return torch.minimum(token, last)


def _uniform(rows: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(rows, 1, generator=generator, device=like.device, dtype=like.dtype)
