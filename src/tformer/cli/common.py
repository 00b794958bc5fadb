"""What several commands share: loading a model with its tokenizer, printing JSON."""

import argparse
import json
import sys
from pathlib import Path

import torch

from tformer.devices import DTYPES, parse_dtype, pick_device
from tformer.files import read_json
from tformer.generate.beam import greedy_search
from tformer.models.adapters import is_adapter
from tformer.models.checkpoints import load_config, load_gpt2, resolve_checkpoint
from tformer.models.gpt2 import GPT2
from tformer.models.seq2seq import MODEL_TYPE, Seq2SeqTransformer
from tformer.nn.lora import merge_lora
from tformer.tokenizers import Tokenizer, load_tokenizer, tokenizer_for_model


def add_device_options(parser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--dtype", default="float32", choices=list(DTYPES), help="weight format (default: float32)"
    )


def load_model(checkpoint: str, device: str, dtype: str) -> tuple[GPT2, Tokenizer]:
    """A checkpoint's model and tokenizer; the tokenizer is checked first, as it is cheaper.
    A LoRA adapter directory gives its base model with the adapters folded in."""
    directory = resolve_checkpoint(checkpoint)
    where = dict(dtype=parse_dtype(dtype), device=pick_device(device))
    if is_adapter(directory):
        model = GPT2.from_pretrained(directory, **where)
        merge_lora(model)  # W + (alpha / r) B A: the same function at the base's cost
        return model.eval(), tokenizer_for_model(directory, model.config.vocab_size)
    tokenizer = tokenizer_for_model(directory, load_config(directory).vocab_size)
    return load_gpt2(directory, **where), tokenizer


def add_text_options(parser) -> None:
    """The checkpoint and the text that `inspect` and `attention` run it on."""
    parser.add_argument("checkpoint", help="run or checkpoint directory")
    parser.add_argument("--text", required=True, help="the text (translation: the source)")
    parser.add_argument("--target", help="translation checkpoints: the target sentence")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...")


def is_translation_checkpoint(directory: Path) -> bool:
    """Whether a resolved checkpoint directory holds an encoder-decoder model."""
    if is_adapter(directory):  # LoRA adapters are GPT-2's
        return False
    return (
        read_json(directory / "config.json", "the model's config").get("model_type") == MODEL_TYPE
    )


def load_translation_model(directory: Path, device: str) -> tuple[Seq2SeqTransformer, Tokenizer]:
    model = Seq2SeqTransformer.from_pretrained(directory, device=pick_device(device))
    return model, load_tokenizer(directory)


def sentence_pair(
    model: Seq2SeqTransformer, tokenizer: Tokenizer, text: str, target: str | None
) -> tuple[list[int], list[int]]:
    """Source ids (ending with the end token) and target ids (no start or end token) of
    `text`: `target` encoded, or else the model's greedy translation."""
    c = model.config
    src = tokenizer.encode(text)[: c.max_len - 1] + [c.eos_id]
    if target is None:
        device = next(model.parameters()).device
        tgt = greedy_search(model, torch.tensor([src], device=device), c.max_len - 1)[0]
        if not tgt:
            raise ValueError("the model's translation is empty; give one with --target")
    else:
        tgt = tokenizer.encode(target)[: c.max_len - 1]
        if not tgt:
            raise ValueError("--target encodes to no tokens")
    return src, tgt


def print_json(obj) -> None:
    """One JSON object on one line: what every --json ends with."""
    print(json.dumps(obj, ensure_ascii=False), file=sys.stdout)


class DefaultsFormatter(argparse.HelpFormatter):
    """--help that shows each option's default, unless it has none or the help names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = action.default is None or action.default is False  # 0 is a default
        if "default" in text or no_default or action.default == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"
