"""Prompt/response pairs for supervised fine-tuning, with the loss on the response only.

A pair becomes one sequence, the prompt's tokens p_1..p_m followed by the response's
r_1..r_n and the end-of-text token (when the tokenizer has one, so the model learns to
stop). The model reads the sequence and predicts each next token, but only the response's
predictions are scored:

    loss = -(1 / N) sum over response positions t of log P(x_{t+1} | x_1..x_t),

which means the targets of the first m - 1 positions (predicting the prompt) are
IGNORE_INDEX. The prompt and the response are tokenised separately, so the boundary
between them is exact whatever the tokenizer merges. A sequence longer than the window is
cut at its end (the response's tail); a prompt that fills the window leaves nothing to
score and is left out. Batches are right-padded with targets IGNORE_INDEX: under causal
attention no real position sees the padding, so no attention mask is needed.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tformer.data.sources import read_jsonl_fields, text_lines
from tformer.data.tokens import IGNORE_INDEX, Batch, draw, in_order
from tformer.errors import DataError
from tformer.files import sha256_of
from tformer.tokenizers import Tokenizer

# The same sequences as a chat template (tformer.generate.chat renders it): the prompt's
# text, the response's and the end-of-text token, with no separator and no role names. The
# SFT task saves it with the tokenizer, so a fine-tuned checkpoint is prompted as it was
# trained.
SFT_TEMPLATE = """\
{% for message in messages %}
    {% if message['role'] == 'assistant' %}
{{ message['content'] + eos_token }}
    {%- else %}
{{ message['content'] }}
    {%- endif %}
{% endfor %}
"""


@dataclass
class PromptResponse:
    prompt: str
    response: str


def read_prompt_responses(path: str | Path) -> list[PromptResponse]:
    """A JSONL file of {"prompt": ..., "response": ...} objects, one per line, with errors
    that name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a JSONL file of prompt/response pairs)")
    fields = read_jsonl_fields(path, ("prompt", "response"), non_empty=True)
    pairs = [PromptResponse(prompt, response) for prompt, response in fields]
    if not pairs:
        raise DataError(str(path), "no prompt/response pairs")
    return pairs


def read_prompt_list(path: Path) -> list[str]:
    """Prompts to continue: a .jsonl file of {"prompt": ...} objects, else one per
    non-blank line."""
    if path.suffix == ".jsonl":
        prompts = [prompt for (prompt,) in read_jsonl_fields(path, ("prompt",))]
    else:
        prompts = [line for line in text_lines(path) if line.strip()]
    if not prompts:
        raise DataError(str(path), "no prompts in it")
    return prompts


def fingerprint(pairs: list[PromptResponse]) -> str:
    """A hash of the pairs, so that a resumed run can tell that its data changed."""
    return sha256_of(json.dumps([pair.prompt, pair.response]) for pair in pairs)


@dataclass
class Example:
    ids: list[int]  # prompt + response (+ end of text), at most max_len + 1 tokens
    prompt_length: int  # m

    def inputs_and_targets(self) -> tuple[list[int], list[int]]:
        """x = ids[:-1]; y = ids[1:], with the prompt's own predictions (the first m - 1)
        left out of the loss."""
        targets = self.ids[1:]
        masked = [IGNORE_INDEX] * (self.prompt_length - 1) + targets[self.prompt_length - 1 :]
        return self.ids[:-1], masked


def encode_pairs(
    pairs: list[PromptResponse], tokenizer: Tokenizer, max_len: int
) -> tuple[list[Example], dict[str, int]]:
    """-> examples of at most max_len inputs, and counts of pairs cut and left out."""
    examples, cut, left_out = [], 0, 0
    for pair in pairs:
        prompt = tokenizer.encode(pair.prompt)
        response = tokenizer.encode(pair.response)
        if tokenizer.eos_id is not None:
            response.append(tokenizer.eos_id)
        if len(prompt) >= max_len + 1:  # no response token left to predict
            left_out += 1
            continue
        ids = prompt + response
        if len(ids) > max_len + 1:
            cut += 1
            ids = ids[: max_len + 1]
        examples.append(Example(ids, len(prompt)))
    return examples, {"cut": cut, "left_out": left_out}


class PromptBatches:
    """Batches of prompt/response sequences for tformer's trainer."""

    def __init__(self, examples: list[Example], pad_id: int, name: str = "data") -> None:
        if not examples:
            raise ValueError(
                f"no {name} pair fits the window: every prompt is longer than --context"
            )
        self.examples = examples
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, examples: list[Example]) -> Batch:
        """-> inputs (ids (B, T),), targets (B, T), right-padded to the longest row."""
        rows = [e.inputs_and_targets() for e in examples]
        t = max(len(x) for x, _ in rows)
        ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.long)
        for row, (x, y) in enumerate(rows):
            ids[row, : len(x)] = torch.tensor(x)
            targets[row, : len(y)] = torch.tensor(y)
        return Batch((ids,), targets)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """`batch_size` pairs drawn uniformly (with replacement) from `generator`."""
        return self.collate(draw(self.examples, batch_size, generator))

    def sequential(self, batch_size: int) -> Iterator[Batch]:
        """Every pair once, in order."""
        return map(self.collate, in_order(self.examples, batch_size))
