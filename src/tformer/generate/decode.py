"""Autoregressive decoding with a KV cache: prefill the prompt once, then one token a step.

    prefill:      logits = model(prompt, caches)[-1]        fills every layer's cache
    decode_step:  logits = model(last_token, caches)        costs one position of work

The same two steps over slot caches (nn/slot_cache.py), where each sequence has its own
length: prefill_slots writes prompts into slots, decode_slots advances every slot by one
token at its own position (a server's continuous batching, tformer.serve.scheduler).

Only the last position's logits are computed (model.unembed of model.features): a prompt's
other positions need none, and for GPT-2 the output head is a third of the weights. The
model only computes logits; choosing the next token is the samplers' job.

Prompts are token ids as a tensor (B, T) or (T,), a numpy array, a list of ids, or a list
of rows; each is checked against the model's vocabulary where it enters (`prompt_rows`).
Every continuation ends for a reason (tformer.generate.limits): "stop", "length" or "context".
"""

import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tformer.checks import MAX_SEED, check_number
from tformer.errors import ConfigError
from tformer.generate.limits import CONTEXT, LENGTH, STOP, warn_truncated
from tformer.generate.sampling import (
    apply_temperature,
    greedy,
    mask_beyond,
    min_p_filter,
    occurrence_penalty,
    repetition_penalty,
    sample,
    top_k_filter,
    top_p_filter,
)
from tformer.nn import KVCache
from tformer.nn.modes import evaluating
from tformer.nn.slot_cache import SlotCache, decode_mask, position_bounds

# What the Python API takes as prompts: see prompt_rows.
# Numpy arrays are taken too (through .tolist()); numpy is not a dependency of this module.
Prompts = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


@dataclass
class SamplingConfig:
    max_new_tokens: int = 50
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0  # subtracted once from every token drawn before; 0: off
    frequency_penalty: float = 0.0  # subtracted per time a token was drawn before; 0: off
    min_p: float | None = None  # keep tokens at least min_p times the likeliest's probability
    do_sample: bool = True  # False: greedy
    seed: int | None = None
    eos_id: int | None = None  # the end-of-text token: generation stops there
    # Ids from here on are never drawn: the tokenizer's size, when the model's embedding
    # table is larger (padded), so every id drawn can be decoded.
    vocab_limit: int | None = None

    def __post_init__(self) -> None:
        check_number("max_new_tokens", self.max_new_tokens, integer=True, low=0)
        check_number("temperature", self.temperature, low=0, low_open=True)
        check_number("top_k", self.top_k, integer=True, low=1, optional=True)
        check_number("top_p", self.top_p, low=0, high=1, low_open=True, optional=True)
        check_number("repetition_penalty", self.repetition_penalty, low=0, low_open=True)
        check_number("presence_penalty", self.presence_penalty, low=-2, high=2)
        check_number("frequency_penalty", self.frequency_penalty, low=-2, high=2)
        check_number("min_p", self.min_p, low=0, high=1, optional=True)
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"do_sample must be True or False, got {self.do_sample!r}")
        check_number("seed", self.seed, integer=True, low=0, high=MAX_SEED, optional=True)
        check_number("eos_id", self.eos_id, integer=True, low=0, optional=True)
        check_number("vocab_limit", self.vocab_limit, integer=True, low=1, optional=True)


@dataclass
class Continuation:
    """One prompt's new token ids, why they ended, and whether the prompt was cut to fit."""

    ids: list[int]
    finish_reason: str  # "stop", "length" or "context" (tformer.generate.limits)
    prompt_truncated: bool = False


def _is_id(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _as_list(x: object) -> object:
    """A numpy array (or anything else with .tolist() that is not a Sequence) as nested
    lists of Python numbers, which the checks below read; anything else as it is."""
    if isinstance(x, torch.Tensor | Sequence) or not callable(getattr(x, "tolist", None)):
        return x
    return x.tolist()


def prompt_rows(prompts: Prompts, vocab_size: int, name: str = "prompts") -> list[list[int]]:
    """Token ids as a tensor (B, T) or (T,), a numpy array, a list of ids or a list of rows
    (lists, tuples, tensors or arrays) -> rows of ints; ids may be numpy integers.
    ConfigError naming `name` for anything else (a float tensor, an empty row, an id outside
    the vocabulary)."""
    prompts = _as_list(prompts)
    if isinstance(prompts, torch.Tensor):
        if (
            prompts.dtype.is_floating_point
            or prompts.dtype.is_complex
            or prompts.dtype == torch.bool
        ):
            dtype = str(prompts.dtype).removeprefix("torch.")
            raise ConfigError(f"{name} must hold integer token ids, got a {dtype} tensor")
        if prompts.dim() not in (1, 2):
            shape = tuple(prompts.shape)
            raise ConfigError(f"{name} must have shape (B, T) or (T,), got {shape}")
        prompts = (prompts[None] if prompts.dim() == 1 else prompts).tolist()
    elif not isinstance(prompts, Sequence) or isinstance(prompts, str | bytes):
        raise ConfigError(
            f"{name} must be token ids (a tensor, a list of ids or a list of lists), "
            f"got {type(prompts).__name__}"
        )
    elif prompts and all(_is_id(x) for x in prompts):
        prompts = [prompts]  # one prompt as a plain list of ids
    if len(prompts) == 0:
        raise ConfigError(f"{name} is empty: give at least one prompt of token ids")
    rows = []
    for i, row in enumerate(prompts):
        row = _as_list(row)
        if isinstance(row, torch.Tensor) and row.dim() == 1 and not row.dtype.is_floating_point:
            row = row.tolist()
        if not isinstance(row, Sequence) or isinstance(row, str | bytes):
            raise ConfigError(f"{name}[{i}] must be a list of token ids, got {row!r:.40}")
        if len(row) == 0:
            raise ConfigError(f"{name}[{i}] is empty: a prompt needs at least one token")
        for x in row:
            if not _is_id(x) or not 0 <= x < vocab_size:
                raise ConfigError(
                    f"{name}[{i}] holds {x!r:.40}, not a token id in 0..{vocab_size - 1} "
                    "(the model's vocabulary)"
                )
        rows.append([int(x) for x in row])
    return rows


def next_token(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | Sequence[torch.Generator | None] | None,
    seen: torch.Tensor | None = None,
    drawn: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """(B, V) next-token logits, (B, N) ids so far (for the repetition penalty), each row's
    ids drawn so far (for the presence and frequency penalties) -> (B,) ids.

    generator: one for all rows, or one per row (see sample). Ids from config.vocab_limit on
    are never chosen."""
    logits = mask_beyond(logits, config.vocab_limit)
    if seen is not None and config.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, seen, config.repetition_penalty)
    if drawn is not None and (config.presence_penalty or config.frequency_penalty):
        logits = occurrence_penalty(
            logits, drawn, config.presence_penalty, config.frequency_penalty
        )
    if not config.do_sample:
        return greedy(logits)
    logits = apply_temperature(logits, config.temperature)
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p is not None:
        logits = top_p_filter(logits, config.top_p)
    if config.min_p is not None:
        logits = min_p_filter(logits, config.min_p)
    return sample(logits, generator)


def prefill(model: nn.Module, prompt: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
    """Run the whole prompt (B, T) once, filling the caches; -> last logits (B, V)."""
    return model.unembed(model.features(prompt, caches=caches)[:, -1])


def decode_step(model: nn.Module, token: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
    """Feed one new token per row (B,), attending to the cache; -> its logits (B, V)."""
    return model.unembed(model.features(token[:, None], caches=caches)[:, -1])


def prefill_slots(
    model: nn.Module, prompts: list[list[int]], caches: list[SlotCache], first: int
) -> torch.Tensor:
    """Prompts of different lengths into slots first, first + 1, ... of the slot caches, as
    one right-padded batch; -> their features (N, T, C), row i's own at 0..len_i - 1.

    Under causal attention a prompt's tokens never see the padding after them; what the
    padding leaves in a slot lies beyond its prompt, hidden by decode_slots' mask until
    decoding overwrites it."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])  # (N, T)
    for cache in caches:
        cache.prefill(first, len(prompts))
    device = next(model.parameters()).device
    return model.features(ids.to(device), caches=caches)  # (N, T, C)


def decode_slots(
    model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, caches: list[SlotCache]
) -> torch.Tensor:
    """One new token per slot 0..B-1 (B,), each at its own position (B,), attending to its
    own slot only up to there; -> the tokens' logits (B, V)."""
    bounds = position_bounds(positions)  # one read of the positions for every layer
    mask = decode_mask(positions, bounds[1] + 1)  # (B, P)
    for cache in caches:
        cache.decode(positions, mask, bounds)
    features = model.features(tokens[:, None], mask, positions[:, None], caches)  # (B, 1, C)
    return model.unembed(features[:, -1])


def check_sampling_config(config: object) -> SamplingConfig:
    """config itself if it is a SamplingConfig; ConfigError otherwise."""
    if not isinstance(config, SamplingConfig):
        raise ConfigError(f"config must be a SamplingConfig, got {type(config).__name__}")
    return config


def one_prompt(model: nn.Module, prompt: Prompts) -> torch.Tensor:
    """A single prompt, (1, T), (T,) or a list of ids, checked -> (1, T) on the model's device."""
    rows = prompt_rows(prompt, model.config.vocab_size, "prompt")
    if len(rows) != 1:
        raise ConfigError(f"prompt must be one prompt, shape (1, T) or (T,), got {len(rows)} rows")
    return torch.tensor(rows, device=next(model.parameters()).device)


@torch.inference_mode()
def stream_tokens(model: nn.Module, prompt: Prompts, config: SamplingConfig) -> Iterator[int]:
    """Yield new token ids one at a time for a single prompt (1, T), (T,) or a list of ids.

    Stops after max_new_tokens or at the end-of-text token (which is not yielded). When the
    context window is full, it slides: the last half of the tokens is encoded again into a
    fresh cache and generation goes on from there. A prompt longer than the window keeps its
    last max_len - 1 tokens, with a TruncationWarning. The model runs in eval mode (no
    dropout) while generating.
    """
    config = check_sampling_config(config)
    prompt = one_prompt(model, prompt)
    max_len = model.config.max_len
    if prompt.shape[1] >= max_len:
        warn_truncated(
            f"the prompt has {prompt.shape[1]} tokens but the context window holds {max_len}: "
            f"only its last {max_len - 1} are used"
        )
        prompt = prompt[:, -(max_len - 1) :]
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(config.seed)
    with evaluating(model):
        tokens = prompt[0].tolist()  # what the model sees (the window)
        history = list(tokens)  # everything so far, for the repetition penalty
        caches = model.new_caches(batch_size=1)
        logits = prefill(model, prompt, caches)
        for _ in range(config.max_new_tokens):
            seen = None
            if config.repetition_penalty != 1.0:
                seen = torch.tensor([history], device=prompt.device)
            drawn = None
            if config.presence_penalty or config.frequency_penalty:
                drawn = [history[prompt.shape[1] :]]
            token = next_token(logits, config, generator, seen, drawn)  # (1,)
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


def generate_ids(model: nn.Module, prompt: Prompts, config: SamplingConfig) -> list[int]:
    """All new token ids for one prompt (1, T), (T,) or a list of ids."""
    return list(stream_tokens(model, prompt, config))


def continue_one(model: nn.Module, prompt: Prompts, config: SamplingConfig) -> Continuation:
    """One prompt's continuation (sliding past the context window), with its finish reason:
    fewer than max_new_tokens means the end-of-text token came."""
    prompt = one_prompt(model, prompt)
    ids = generate_ids(model, prompt, config)
    reason = LENGTH if len(ids) == config.max_new_tokens else STOP
    return Continuation(ids, reason, prompt.shape[1] >= model.config.max_len)


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> ids (B, T) padded on the left, and mask (B, T)."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, t - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, t - len(prompt) :] = 1
    return ids, mask


def fit_batch(prompts: list[list[int]], max_len: int) -> tuple[list[list[int]], list[bool]]:
    """Cut every prompt to its last max_len - 1 tokens (room for one new token), with one
    TruncationWarning for all that were cut -> the prompts, and which were cut."""
    cut = [len(p) >= max_len for p in prompts]
    if any(cut):
        longest = max(len(p) for p in prompts)
        warn_truncated(
            f"{sum(cut)} of {len(prompts)} prompts are longer than the context window holds "
            f"({longest} tokens, window {max_len}): only their last {max_len - 1} are used"
        )
    return [p[-(max_len - 1) :] if c else p for p, c in zip(prompts, cut, strict=True)], cut


@torch.inference_mode()
def continue_batch(
    model: nn.Module,
    prompts: Prompts,
    config: SamplingConfig,
    seeds: list[int] | None = None,
) -> list[Continuation]:
    """New token ids for several prompts at once, with each one's finish reason.

    The prompts are padded on the left; the attention mask hides the padding and each row's
    positions start at 0 where its text starts, so every row gets exactly what it would get
    alone (each row samples from its own generator, seeded with seeds[row], or config.seed
    for every row). Rows stop at their end-of-text; all stop when the context window is full
    (no sliding in a batch): those rows end with "context", and a TruncationWarning says so.
    A prompt longer than the window keeps its last max_len - 1 tokens (a warning too).
    """
    config = check_sampling_config(config)
    prompts = prompt_rows(prompts, model.config.vocab_size)
    if seeds is not None and len(seeds) != len(prompts):
        raise ConfigError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    max_len = model.config.max_len
    prompts, cut = fit_batch(prompts, max_len)
    device = next(model.parameters()).device
    ids, mask = (x.to(device) for x in left_pad(prompts))
    b, t = ids.shape
    if seeds is None:
        seeds = [config.seed] * b
    generators = [
        torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        for seed in seeds
    ]
    with evaluating(model):
        outputs, finished = _decode_batch(model, ids, mask, prompts, config, generators)
    reasons = [
        STOP if done else LENGTH if len(out) == config.max_new_tokens else CONTEXT
        for out, done in zip(outputs, finished, strict=True)
    ]
    short = reasons.count(CONTEXT)
    if short:
        warn_truncated(
            f"the context window ({max_len} tokens) filled up after {max_len - t} new tokens: "
            f"{short} of {b} continuations stopped short of max_new_tokens "
            f"({config.max_new_tokens}); a batch does not slide its window, one prompt alone does"
        )
    return [Continuation(*row) for row in zip(outputs, reasons, cut, strict=True)]


def _decode_batch(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    prompts: list[list[int]],
    config: SamplingConfig,
    generators: list[torch.Generator | None],
) -> tuple[list[list[int]], list[bool]]:
    """The decoding loop of continue_batch -> each row's new ids and whether it ended with
    the end-of-text token."""
    b, t = ids.shape
    device = ids.device
    max_len = model.config.max_len
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
        tokens = next_token(logits, config, generators, seen, outputs).tolist()  # every row
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
    return outputs, finished


def generate_batch(
    model: nn.Module,
    prompts: Prompts,
    config: SamplingConfig,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    """New token ids for several prompts at once: continue_batch's ids alone."""
    return [c.ids for c in continue_batch(model, prompts, config, seeds)]


def continue_prompts(
    model: nn.Module,
    prompts: Prompts,
    config: SamplingConfig | None = None,
    num_samples: int = 1,
) -> list[Continuation]:
    """num_samples continuations of every prompt, prompt by prompt, with finish reasons.

    prompts: token ids (B, T) or (T,), a list of ids, or lists of ids of different lengths.
    config: the sampling controls; by default sampling at temperature 1 for 50 tokens,
    stopping at the model's end-of-text token (model.config.eos_id). Sample j of a prompt is
    drawn with seed config.seed + j, so it equals what generating that prompt alone with
    that seed gives. One row runs `stream_tokens` (which can slide past the context window);
    several run as one left-padded batch (continue_batch).
    """
    check_number("num_samples", num_samples, integer=True, low=1)
    if config is None:
        config = SamplingConfig(eos_id=model.config.eos_id)
    config = check_sampling_config(config)
    prompts = prompt_rows(prompts, model.config.vocab_size)
    rows = [p for p in prompts for _ in range(num_samples)]
    seeds = None
    if config.seed is not None:
        seeds = [config.seed + j for _ in prompts for j in range(num_samples)]
    if len(rows) == 1:
        return [continue_one(model, rows[0], config)]
    return continue_batch(model, rows, config, seeds)


def generate(
    model: nn.Module,
    prompts: Prompts,
    config: SamplingConfig | None = None,
    num_samples: int = 1,
) -> list[list[int]]:
    """num_samples continuations of every prompt: new token ids, prompt by prompt (see
    continue_prompts, which says why each ended too)."""
    return [c.ids for c in continue_prompts(model, prompts, config, num_samples)]
