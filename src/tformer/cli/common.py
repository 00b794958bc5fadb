"""What several commands share: loading a model with its tokenizer, printing JSON."""

import argparse
import json
import sys

from tformer.devices import DTYPES, parse_dtype, pick_device
from tformer.models.checkpoints import load_config, load_gpt2, resolve_checkpoint
from tformer.models.gpt2 import GPT2
from tformer.tokenizers import Tokenizer, tokenizer_for_model


def add_device_options(parser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--dtype", default="float32", choices=list(DTYPES), help="weight format (default: float32)"
    )


def load_model(checkpoint: str, device: str, dtype: str) -> tuple[GPT2, Tokenizer]:
    """A checkpoint's model and tokenizer; the tokenizer is checked first, as it is cheaper."""
    directory = resolve_checkpoint(checkpoint)
    tokenizer = tokenizer_for_model(directory, load_config(directory).vocab_size)
    model = load_gpt2(directory, dtype=parse_dtype(dtype), device=pick_device(device))
    return model, tokenizer


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
