"""From prompts to text: encoding a prompt, and decoding a continuation as it streams, cut
at the first stop string, in time linear in its length.

Each new token is decoded once: its bytes go through an incremental UTF-8 decoder, which
keeps a character whose bytes have not all arrived (byte-level BPE splits some characters
between tokens) until they have. Stop strings are searched only in the new text and the
text held back before it: the longest stop string less one character, as far as a stop
string ending in the new text can reach back. Held-back text is shown once no stop string
can begin in it, so what is shown is always a prefix of the final text.

The result is exactly what decoding all the ids drawn and cutting at the first stop string
gives (`cut_at_stop(tokenizer.decode(ids), stops)`), the stream ending at the token that
completes a stop string. The stops are matched against the text as it reads at each token,
where a character still missing bytes reads as U+FFFD, as whole-text decoding has it.
"""

import codecs
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

import torch
from torch import nn

from tformer.errors import ConfigError
from tformer.generate.decode import SamplingConfig, one_prompt, stream_tokens
from tformer.generate.limits import LENGTH, STOP
from tformer.tokenizers import Tokenizer

REPLACEMENT = "\ufffd"  # what a character reads as while some of its bytes are missing


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts after an end-of-text token, as GPT-2 was
    trained to begin a document. Text that is not Unicode (undecodable bytes of a command
    line, smuggled in as surrogates) is refused."""
    check_unicode("the prompt", prompt)
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eos_id is None:
            raise ValueError("the prompt is empty, and this tokenizer has no end-of-text token")
        ids = [tokenizer.eos_id]
    return ids


def check_unicode(name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(
            f"{name} is not UTF-8 text: character {e.start} stands for an undecodable byte"
        ) from None


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def check_stops(stops: object) -> list[str]:
    """Stop strings: a list of non-empty strings (an empty one would stop at once)."""
    if isinstance(stops, str) or not isinstance(stops, Sequence):
        raise ConfigError(f"stops must be a list of strings, got {type(stops).__name__}")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ConfigError(f"stops must be non-empty strings, got {s!r}")
    return list(stops)


class ByteDecoder:
    """Token ids in, newly complete text out: every token's bytes are decoded once."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        # errors="replace" as every tokenizer's decode: invalid bytes read as U+FFFD.
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self.utf8.decode(self.tokenizer.decode_bytes([token]))

    def pending(self) -> bool:
        """Whether a character waits for more of its bytes."""
        return bool(self.utf8.getstate()[0])

    def flush(self) -> str:
        """The end: bytes of a character that never completed read as U+FFFD."""
        return self.utf8.decode(b"", final=True)


class WholeDecoder:
    """For a tokenizer whose text is not its tokens' bytes joined (no decode_bytes, e.g. a
    WordPiece decoder): decode every id again at each token, as streams once all did."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids, self.done = tokenizer, [], 0
        self.text = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        complete = self.text.removesuffix(REPLACEMENT)
        new, self.done = complete[self.done :], max(self.done, len(complete))
        return new

    def pending(self) -> bool:
        return len(self.text) > self.done

    def flush(self) -> str:
        new, self.done = self.text[self.done :], len(self.text)
        return new


def decoder_for(tokenizer: Tokenizer) -> ByteDecoder | WholeDecoder:
    try:
        tokenizer.decode_bytes([])
    except (AttributeError, ValueError):
        return WholeDecoder(tokenizer)
    return ByteDecoder(tokenizer)


class StreamedText:
    """Pieces of text to show as token ids arrive from `tokens`, cut at the first stop
    string. Afterwards `completion` is the whole text (stop string excluded), `new_tokens`
    how many ids were drawn, `stopped` whether a stop string ended it."""

    def __init__(self, tokenizer: Tokenizer, tokens: Iterable[int], stops: Sequence[str]) -> None:
        self.tokenizer, self.tokens, self.stops = tokenizer, tokens, check_stops(stops)
        self.completion = ""
        self.new_tokens = 0
        self.stopped = False

    def __iter__(self) -> Iterator[str]:
        hold = max((len(s) for s in self.stops), default=1) - 1
        decoder = decoder_for(self.tokenizer)
        shown: list[str] = []
        held = ""  # decoded, not shown: where a stop string may still begin
        for token in self.tokens:
            self.new_tokens += 1
            held += decoder.add(token)
            window = held + REPLACEMENT if decoder.pending() else held
            before, self.stopped = cut_at_stop(window, self.stops)
            if self.stopped:
                shown.append(before)
                yield before
                break
            ready = len(held) - hold
            if ready > 0:
                shown.append(held[:ready])
                yield held[:ready]
                held = held[ready:]
        else:
            held += decoder.flush()
            before, self.stopped = cut_at_stop(held, self.stops)
            shown.append(before)
            yield before
        self.completion = "".join(shown)


class TextStream:
    """Iterate for the pieces of text that are ready to show; afterwards `completion` is
    the whole continuation (stop string excluded), `new_tokens` how many were drawn,
    `finish_reason` why it ended ("stop" or "length": one prompt slides past the context
    window), and `prompt_truncated` whether the prompt was cut to fit the window. Ids the
    tokenizer cannot decode are never drawn (config.vocab_limit)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        ids: Sequence[int] | torch.Tensor,
        config: SamplingConfig,
        stops: Sequence[str],
    ) -> None:
        if not isinstance(config, SamplingConfig):
            raise ConfigError(f"config must be a SamplingConfig, got {type(config).__name__}")
        limit = min(tokenizer.vocab_size, config.vocab_limit or tokenizer.vocab_size)
        self.model, self.tokenizer = model, tokenizer
        self.config = replace(config, vocab_limit=limit)
        self.prompt = one_prompt(model, ids)  # (1, T), checked where it enters
        self.stops = check_stops(stops)
        self.prompt_truncated = self.prompt.shape[1] >= model.config.max_len
        self.completion = ""
        self.new_tokens = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        tokens = stream_tokens(self.model, self.prompt, self.config)
        text = StreamedText(self.tokenizer, tokens, self.stops)
        try:
            for piece in text:
                self.new_tokens = text.new_tokens
                if piece:
                    yield piece
        finally:
            self.completion, self.new_tokens = text.completion, text.new_tokens
            if text.stopped or self.new_tokens < self.config.max_new_tokens:
                self.finish_reason = STOP  # a stop string, or the end-of-text token
            else:
                self.finish_reason = LENGTH
