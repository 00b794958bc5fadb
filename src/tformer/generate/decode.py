"""Autoregressive decoding with a KV cache: prefill the prompt once, then one token a step.

    prefill:      logits = model(prompt, caches)        fills every layer's cache
    decode_step:  logits = model(last_token, caches)    costs one position of work

The model only computes logits; choosing the next token is the samplers' job.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tformer.generate.sampling import apply_temperature, greedy, sample, top_k_filter, top_p_filter
from tformer.nn import KVCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 50
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    do_sample: bool = True  # False: greedy
    seed: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0; for deterministic output use greedy")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError("top_k must be a positive integer")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")


def next_token(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) next-token logits -> (B,) token ids."""
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
    return model(prompt, caches=caches)[:, -1]


def decode_step(model: nn.Module, token: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
    """Feed one new token per row (B,), attending to the cache; -> its logits (B, V)."""
    return model(token[:, None], caches=caches)[:, -1]


@torch.inference_mode()
def stream_tokens(model: nn.Module, prompt: torch.Tensor, config: SamplingConfig) -> Iterator[int]:
    """Yield new token ids one at a time for a single prompt (1, T).

    Stops after max_new_tokens, at the end-of-text token (which is not yielded), or at the
    end of the context window. The model runs in eval mode (no dropout) while generating.
    """
    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] == 0:
        raise ValueError("stream_tokens takes one non-empty prompt of shape (1, T)")
    max_len = model.config.max_len
    if prompt.shape[1] >= max_len:
        raise ValueError(f"the prompt ({prompt.shape[1]} tokens) fills the context ({max_len})")
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(config.seed)
    was_training = model.training
    model.eval()
    try:
        caches = model.new_caches(batch_size=1)
        logits = prefill(model, prompt, caches)
        length = prompt.shape[1]
        for _ in range(config.max_new_tokens):
            token = next_token(logits, config, generator)  # (1,)
            if config.eos_token_id is not None and token.item() == config.eos_token_id:
                return
            yield token.item()
            length += 1
            if length >= max_len:
                return
            logits = decode_step(model, token, caches)
    finally:
        model.train(was_training)


def generate_ids(model: nn.Module, prompt: torch.Tensor, config: SamplingConfig) -> list[int]:
    """All new token ids for one prompt (1, T)."""
    return list(stream_tokens(model, prompt, config))
