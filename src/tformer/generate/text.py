"""From prompts to text: encoding a prompt, and decoding a continuation as it streams, cut
at the first stop string.

A continuation is decoded from all its tokens so far; what could still turn out to begin a
stop string is held back (the longest stop string less one character), and so is a
character whose bytes have not all arrived (it decodes as U+FFFD until they have). What is
shown is always a prefix of the final text.
"""

from collections.abc import Iterator

import torch
from torch import nn

from tformer.generate.decode import SamplingConfig, stream_tokens
from tformer.tokenizers import Tokenizer


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts after an end-of-text token, as GPT-2 was
    trained to begin a document."""
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eos_id is None:
            raise ValueError("the prompt is empty, and this tokenizer has no end-of-text token")
        ids = [tokenizer.eos_id]
    return ids


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TextStream:
    """Iterate for the pieces of text that are ready to show; afterwards `completion` is
    the whole continuation (stop string excluded) and `new_tokens` how many were drawn."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        ids: list[int],
        config: SamplingConfig,
        stops: list[str],
    ) -> None:
        self.model, self.tokenizer, self.ids, self.config = model, tokenizer, ids, config
        self.stops = stops
        self.completion = ""
        self.new_tokens = 0

    def __iter__(self) -> Iterator[str]:
        device = next(self.model.parameters()).device
        prompt = torch.tensor([self.ids], device=device)
        hold = max((len(s) for s in self.stops), default=1) - 1
        new_ids: list[int] = []
        shown = 0
        for token in stream_tokens(self.model, prompt, self.config):
            new_ids.append(token)
            self.new_tokens = len(new_ids)
            self.completion, stopped = cut_at_stop(self.tokenizer.decode(new_ids), self.stops)
            if stopped:
                break
            ready = self.completion[: len(self.completion) - hold]
            if not ready.endswith("\ufffd") and len(ready) > shown:
                yield ready[shown:]
                shown = len(ready)
        yield self.completion[shown:]  # the rest, held back until now
