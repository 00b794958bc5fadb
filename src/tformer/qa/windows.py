"""Questions over contexts longer than the model's window: overlapping windows, and spans.

A reader sees at most `max_len` tokens, so a long context is cut into windows that each
hold the whole question and a slice of the context, neighbouring slices sharing `stride`
tokens (Hugging Face's "doc stride") so that an answer cut by one window's edge is whole
in the next:

    [question tokens] [separator] [context tokens a .. b) [null]

A causal model reads left to right, so the question comes first (every context token has
read it) and the "null" token comes last (it has read everything): its start and end
logits give the score of "no answer in this window", s_null + e_null, as BERT's [CLS] does
for SQuAD 2.0. A training window whose slice does not hold the answer points at the null
token, like one whose question has none.

Prediction scores every span i <= j of context tokens, at most `max_answer_tokens` long, in
every window, by s_i + e_j; the best one wins unless no-answer is allowed and the smallest
null score beats it by more than `null_threshold`. Each token keeps its character span in
the original context, so the answer is cut from the text itself, not decoded from ids.
"""

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # its first character in the context


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[Answer] = field(default_factory=list)  # none: the context holds no answer

    def __post_init__(self) -> None:
        for answer in self.answers:
            found = self.context[answer.start : answer.start + len(answer.text)]
            if found != answer.text:
                raise ValueError(
                    f"question {self.id!r}: the answer {answer.text!r} is not at character "
                    f"{answer.start} of its context (found {found!r} there)"
                )


@dataclass
class Window:
    """One model input: ids (T,), where the context tokens sit, and the answer's labels."""

    example_id: str
    ids: list[int]
    context_start: int  # position of the first context token in ids
    offsets: list[tuple[int, int]]  # character span in the context of each context token
    start: int  # the answer's first and last token position in ids; the null token's if
    end: int  # the answer is not in this window

    @property
    def null_position(self) -> int:
        return len(self.ids) - 1

    @property
    def context_end(self) -> int:
        return self.context_start + len(self.offsets)


def marker_tokens(tokenizer) -> tuple[int, int]:
    """The separator after the question and the null token at the end of a window: the
    end-of-text token where the vocabulary has one, else a newline."""
    if tokenizer.eos_id is not None:
        return tokenizer.eos_id, tokenizer.eos_id
    try:
        (newline,) = tokenizer.encode("\n")
    except ValueError:
        raise ValueError(
            "this tokenizer has neither an end-of-text token nor a newline to mark the end "
            "of the question and the no-answer position"
        ) from None
    return newline, newline


def make_windows(
    tokenizer,
    example: QAExample,
    max_len: int,
    stride: int,
    separator: int,
    null: int,
) -> list[Window]:
    """The windows of one example (see the module's docstring), labelled with its first
    answer."""
    question = tokenizer.encode(example.question)
    context, offsets = tokenizer.encode_with_offsets(example.context)
    room = max_len - len(question) - 2  # context tokens per window
    if room <= stride:
        raise ValueError(
            f"the question {example.question[:60]!r} ({example.id}) takes {len(question)} "
            f"tokens, which leaves {max(room, 0)} "
            f"for the context in a window of {max_len} (with an overlap of {stride}); shorten "
            "the question or lower --stride"
        )
    span = token_span(offsets, example.answers[0]) if example.answers else None
    windows, first = [], 0
    while True:
        last = min(first + room, len(context))  # this window holds context tokens [first, last)
        ids = [*question, separator, *context[first:last], null]
        context_start = len(question) + 1
        null_position = len(ids) - 1
        start = end = null_position
        if span is not None and first <= span[0] and span[1] < last:
            start, end = context_start + span[0] - first, context_start + span[1] - first
        windows.append(Window(example.id, ids, context_start, offsets[first:last], start, end))
        if last == len(context):
            return windows
        first += room - stride


def token_span(offsets: list[tuple[int, int]], answer: Answer) -> tuple[int, int] | None:
    """The first and last token that overlap the answer's characters, or None if it is
    empty."""
    begin, finish = answer.start, answer.start + len(answer.text)
    inside = [i for i, (s, e) in enumerate(offsets) if s < finish and e > begin]
    return (inside[0], inside[-1]) if inside else None


@dataclass(frozen=True)
class Prediction:
    text: str  # "" for no answer
    score: float  # s_i + e_j of the chosen span (or the null score)
    start: int  # character span in the context; (0, 0) for no answer
    end: int
    null_score: float


def best_answer(
    windows: list[Window],
    span_logits: list[torch.Tensor],
    context: str,
    max_answer_tokens: int = 30,
    null_threshold: float | None = None,
) -> Prediction:
    """The best span over all windows of one example, from each window's (2, T) logits.
    null_threshold None: always a span (SQuAD 1.1); a number: no answer when the smallest
    null score exceeds the best span's score by more than it (SQuAD 2.0)."""
    best = (-float("inf"), 0, 0)
    null_score = float("inf")
    for window, logits in zip(windows, span_logits, strict=True):
        start_logits, end_logits = logits.float()[0], logits.float()[1]
        null_score = min(null_score, float(start_logits[-1] + end_logits[-1]))
        a, b = window.context_start, window.context_end
        if a == b:  # an empty context
            continue
        scores = start_logits[a:b, None] + end_logits[None, a:b]  # (n, n): start i, end j
        n = b - a
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (j >= i) & (j - i < max_answer_tokens)
        scores = scores.masked_fill(~allowed, -float("inf"))
        flat = int(scores.argmax())
        score = float(scores.flatten()[flat])
        if score > best[0]:
            first, last = divmod(flat, n)
            best = (score, window.offsets[first][0], window.offsets[last][1])
    score, start, end = best
    if null_threshold is not None and null_score - score > null_threshold:
        return Prediction("", null_score, 0, 0, null_score)
    while start < end and context[start].isspace():  # byte-level BPE tokens carry the
        start += 1  # space before a word
    while end > start and context[end - 1].isspace():
        end -= 1
    return Prediction(context[start:end], score, start, end, null_score)
