"""From prompts to text: encoding a prompt, and decoding a continuation as it streams, cut
at the first stop string, in time linear in its length.

Each new token is decoded once: its bytes go through an incremental UTF-8 decoder, which
keeps a character whose bytes have not all arrived (byte-level BPE splits some characters
between tokens) until they have. Stop strings are searched only in the new text and the
text held back before it: the longest stop string less one character, as far as a stop
string ending in the new text can reach back. Held-back text is shown once no stop string
can begin in it.

What holds: the stream ends with what decoding all the ids drawn and cutting at the first
stop string gives (`cut_at_stop(tokenizer.decode(ids), stops)`), the stream ending at the
token that completes a stop string; the stops are matched against the text as it reads at
each token, where a character still missing bytes reads as U+FFFD, as whole-text decoding
has it. What is shown is always a prefix of that. A tokenizer without token bytes (a
WordPiece or a SentencePiece byte-fallback decoder) is decoded whole at each token
(WholeDecoder), which holds back text that may still change. One case escapes, with Hugging
Face's ByteFallback decoder alone: a run of byte tokens holding an ASCII byte (<0x41>,
which reads as "A" alone) that completes a character and then goes on with an invalid
byte. The decoder then reads the whole run as U+FFFDs, text already shown included; the
stream ends with what it showed followed by the text from where the two differ.
"""

import codecs
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

import torch
from torch import nn

from tformer.errors import ConfigError
from tformer.generate.decode import (
    SamplingConfig,
    check_sampling_config,
    one_prompt,
    stream_tokens,
)
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

    def window(self, held: str) -> str:
        """`held` (the end of what add returned, not yet shown) and how the text reads
        after it now: U+FFFD while a character waits for more of its bytes, as whole-text
        decoding has it."""
        return held + REPLACEMENT if self.utf8.getstate()[0] else held

    def flush(self) -> str:
        """The end: bytes of a character that never completed read as U+FFFD."""
        return self.utf8.decode(b"", final=True)


class WholeDecoder:
    """For a tokenizer whose text is not its tokens' bytes joined (no decode_bytes, e.g. a
    WordPiece or a SentencePiece byte-fallback decoder): decode every id again at each
    token, and return the new text only when it can no longer change.

    A byte-fallback decoder reads a run of byte tokens as one U+FFFD per byte while a
    character misses some, and reads the whole run so again if a later byte in it is
    invalid ("日" then "����"): text is held back while the last token alone reads as U+FFFD
    (a byte of a run), trailing U+FFFDs are held back, and so is everything while the text
    no longer begins with what was returned."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids = tokenizer, []
        self.text = ""  # every id decoded
        self.shown = ""  # what add has returned, joined

    def add(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        if REPLACEMENT in self.tokenizer.decode([token]):
            return ""  # a byte of a run, which the next byte may make read otherwise
        complete = self.text.rstrip(REPLACEMENT)
        if not complete.startswith(self.shown):
            return ""  # the text already returned reads otherwise now: wait until it agrees
        new, self.shown = complete[len(self.shown) :], complete
        return new

    def window(self, held: str) -> str:
        start = len(self.shown) - len(held)  # what is shown for good ends here
        if self.text.startswith(self.shown[:start]):
            return self.text[start:]
        return held + REPLACEMENT  # see flush

    def flush(self) -> str:
        """The rest of the text; if it never agreed again with what was returned (a run
        with an ASCII byte in it, read as U+FFFDs after all), the text from where the two
        differ."""
        agree = len(os.path.commonprefix([self.text, self.shown]))
        new = self.text[len(self.shown) if agree == len(self.shown) else agree :]
        self.shown += new
        return new


def decoder_for(tokenizer: Tokenizer) -> ByteDecoder | WholeDecoder:
    try:
        tokenizer.decode_bytes([])
    except (AttributeError, ValueError):
        return WholeDecoder(tokenizer)
    return ByteDecoder(tokenizer)


class TextCutter:
    """Token ids pushed one at a time -> the text ready to show, cut at the first stop
    string: `add` returns the piece each token makes ready ("" while text is held back),
    `finish` the rest when no more tokens come. `stopped` says a stop string was found
    (then nothing more is added); `completion` is all the text returned so far."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]) -> None:
        self.stops = check_stops(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.decoder = decoder_for(tokenizer)
        self.held = ""  # decoded, not shown: where a stop string may still begin
        self.shown: list[str] = []
        self.stopped = False

    def add(self, token: int) -> str:
        self.held += self.decoder.add(token)
        window = self.decoder.window(self.held)
        before, self.stopped = cut_at_stop(window, self.stops)
        if self.stopped:
            self.shown.append(before)
            return before
        ready = len(self.held) - self.hold
        if ready <= 0:
            return ""
        piece, self.held = self.held[:ready], self.held[ready:]
        self.shown.append(piece)
        return piece

    def finish(self) -> str:
        self.held += self.decoder.flush()
        before, self.stopped = cut_at_stop(self.held, self.stops)
        self.held = ""
        self.shown.append(before)
        return before

    @property
    def completion(self) -> str:
        return "".join(self.shown)


class StreamedText:
    """Pieces of text to show as token ids arrive from `tokens`, cut at the first stop
    string. Afterwards `completion` is the whole text (stop string excluded), `new_tokens`
    how many ids were drawn, `stopped` whether a stop string ended it."""

    def __init__(self, tokenizer: Tokenizer, tokens: Iterable[int], stops: Sequence[str]) -> None:
        self.tokens = tokens
        self.cutter = TextCutter(tokenizer, stops)  # the stops are checked here
        self.completion = ""
        self.new_tokens = 0
        self.stopped = False

    def __iter__(self) -> Iterator[str]:
        cutter = self.cutter
        for token in self.tokens:
            self.new_tokens += 1
            piece = cutter.add(token)
            if cutter.stopped:
                yield piece
                break
            if piece:
                yield piece
        else:
            yield cutter.finish()
        self.completion, self.stopped = cutter.completion, cutter.stopped


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
        config = check_sampling_config(config)
        limit = min(tokenizer.vocab_size, config.vocab_limit or tokenizer.vocab_size)
        self.model, self.tokenizer = model, tokenizer
        self.config = replace(config, vocab_limit=limit)
        self.prompt = one_prompt(model, ids)  # (1, T), checked where it enters
        # The stops are checked here, before anything is generated (stream_tokens is lazy).
        tokens = stream_tokens(model, self.prompt, self.config)
        self.text = StreamedText(tokenizer, tokens, stops)
        self.prompt_truncated = self.prompt.shape[1] >= model.config.max_len
        self.completion = ""
        self.new_tokens = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        text = self.text
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
