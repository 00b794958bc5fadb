"""Autoregressive decoding with a KV cache: prefill the prompt once, then one token a step.

    prefill:      logits = model(prompt, caches)[-1]        fills every layer's cache
    decode_step:  logits = model(last_token, caches)        costs one position of work

Only the last position's logits are computed (model.unembed of model.features): a prompt's
other positions need none, and for GPT-2 the output head is a third of the weights. The
model only computes logits; choosing the next token is the samplers' job.
"""

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tformer.generate.sampling import (
    apply_temperature,
    greedy,
    repetition_penalty,
    sample,
    top_k_filter,
    top_p_filter,
)
from tformer.nn import KVCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 50
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # 1: off
    do_sample: bool = True  # False: greedy
    seed: int | None = None
    eos_id: int | None = None  # the end-of-text token: generation stops there

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0; for deterministic output use greedy")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError("top_k must be a positive integer")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0 (1 is off)")


def next_token(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | Sequence[torch.Generator | None] | None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) next-token logits, (B, N) ids so far (for the repetition penalty) -> (B,) ids.

    generator: one for all rows, or one per row (see sample)."""
    if seen is not None and config.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, seen, config.repetition_penalty)
    if not config.do_sample:
        return greedy(logits)
    logits = apply_temperature(logits, config.temperature)
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p is not None:
        logits = top_p_filter(logits, config.top_p)
    return sample(logits, generator)


def prefill(model: nn.Module, prompt: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
    """Run the whole prompt (B, T) once, filling the caches; -> last logits (B, V)."""
    return model.unembed(model.features(prompt, caches=caches)[:, -1])


def decode_step(model: nn.Module, token: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
    """Feed one new token per row (B,), attending to the cache; -> its logits (B, V)."""
    return model.unembed(model.features(token[:, None], caches=caches)[:, -1])


@torch.inference_mode()
def stream_tokens(model: nn.Module, prompt: torch.Tensor, config: SamplingConfig) -> Iterator[int]:
    """Yield new token ids one at a time for a single prompt (1, T).

    Stops after max_new_tokens or at the end-of-text token (which is not yielded). When the
    context window is full, it slides: the last half of the tokens is encoded again into a
    fresh cache and generation goes on from there. A prompt longer than the window keeps its
    last max_len - 1 tokens. The model runs in eval mode (no dropout) while generating.
    """
    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] == 0:
        raise ValueError("stream_tokens takes one non-empty prompt of shape (1, T)")
    max_len = model.config.max_len
    if prompt.shape[1] >= max_len:
        warnings.warn(
            f"the prompt has {prompt.shape[1]} tokens but the context window {max_len}: "
            f"only its last {max_len - 1} are used",
            stacklevel=2,
        )
        prompt = prompt[:, -(max_len - 1) :]
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(config.seed)
    was_training = model.training
    model.eval()
    try:
        tokens = prompt[0].tolist()  # what the model sees (the window)
        history = list(tokens)  # everything so far, for the repetition penalty
        caches = model.new_caches(batch_size=1)
        logits = prefill(model, prompt, caches)
        for _ in range(config.max_new_tokens):
            seen = None
            if config.repetition_penalty != 1.0:
                seen = torch.tensor([history], device=prompt.device)
            token = next_token(logits, config, generator, seen)  # (1,)
            if config.eos_id is not None and token.item() == config.eos_id:
                return
            yield token.item()
            tokens.append(token.item())
            history.append(token.item())
            if len(tokens) < max_len:
                logits = decode_step(model, token, caches)
            else:  # the window is full: keep its last half and encode it again
                kept = torch.tensor([tokens[-(max_len // 2) :]], device=prompt.device)
                caches = model.new_caches(batch_size=1)
                logits = prefill(model, kept, caches)
                tokens = kept[0].tolist()
    finally:
        model.train(was_training)


def generate_ids(model: nn.Module, prompt: torch.Tensor, config: SamplingConfig) -> list[int]:
    """All new token ids for one prompt (1, T)."""
    return list(stream_tokens(model, prompt, config))


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> ids (B, T) padded on the left, and mask (B, T)."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, t - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, t - len(prompt) :] = 1
    return ids, mask


@torch.inference_mode()
def generate_batch(
    model: nn.Module,
    prompts: list[list[int]],
    config: SamplingConfig,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    """New token ids for several prompts at once.

    The prompts are padded on the left; the attention mask hides the padding and each row's
    positions start at 0 where its text starts, so every row gets exactly what it would get
    alone (each row samples from its own generator, seeded with seeds[row], or config.seed
    for every row). Rows stop at their end-of-text; all stop when the context window is full
    (no sliding in a batch).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_batch needs one or more non-empty prompts")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    device = next(model.parameters()).device
    ids, mask = (x.to(device) for x in left_pad(prompts))
    b, t = ids.shape
    max_len = model.config.max_len
    if t >= max_len:
        raise ValueError(f"the longest prompt ({t} tokens) fills the context window ({max_len})")
    if seeds is None:
        seeds = [config.seed] * b
    generators = [
        torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        for seed in seeds
    ]
    was_training = model.training
    model.eval()
    try:
        caches = model.new_caches(batch_size=b, max_len=min(max_len, t + config.max_new_tokens))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 where each text starts
        features = model.features(ids, attention_mask=mask, position_ids=positions, caches=caches)
        logits = model.unembed(features[:, -1])
        next_position = positions[:, -1:] + 1  # (B, 1)
        histories = [list(p) for p in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]
        finished = [False] * b
        for step in range(config.max_new_tokens):
            seen = None
            if config.repetition_penalty != 1.0:
                # (B, N): histories of different lengths, padded by repeating their last id
                # (a duplicate only penalises a token that is already penalised).
                width = max(len(h) for h in histories)
                seen = torch.tensor([h + h[-1:] * (width - len(h)) for h in histories])
                seen = seen.to(device)
            tokens = next_token(logits, config, generators, seen).tolist()  # every row at once
            for row in range(b):
                if finished[row] or tokens[row] == config.eos_id:
                    finished[row] = True
                    tokens[row] = 0  # a finished row keeps feeding padding; nobody reads it
                else:
                    outputs[row].append(tokens[row])
                    histories[row].append(tokens[row])
            last = step == config.max_new_tokens - 1 or t + step + 1 >= max_len
            if all(finished) or last:  # no forward for logits nobody will read
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)
            step_ids = torch.tensor(tokens, device=device)[:, None]  # (B, 1)
            logits = model.unembed(model.features(step_ids, mask, next_position, caches)[:, -1])
            next_position = next_position + 1
        return outputs
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    prompts: torch.Tensor | list[list[int]],
    config: SamplingConfig | None = None,
    num_samples: int = 1,
) -> list[list[int]]:
    """num_samples continuations of every prompt: new token ids, prompt by prompt.

    prompts: token ids (B, T) or (T,), or lists of ids of different lengths. config: the
    sampling controls; by default sampling at temperature 1 for 50 tokens, stopping at the
    model's end-of-text token (model.config.eos_id). Sample j of a prompt is drawn with seed
    config.seed + j, so it equals what generating that prompt alone with that seed gives.
    One row runs `stream_tokens` (which can slide past the context window); several run as
    one left-padded batch.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if config is None:
        config = SamplingConfig(eos_id=model.config.eos_id)
    if isinstance(prompts, torch.Tensor):
        prompts = (prompts[None] if prompts.dim() == 1 else prompts).tolist()
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    seeds = None
    if config.seed is not None:
        seeds = [config.seed + j for _ in prompts for j in range(num_samples)]
    if len(rows) == 1:
        device = next(model.parameters()).device
        return [generate_ids(model, torch.tensor(rows, device=device), config)]
    return generate_batch(model, rows, config, seeds)
