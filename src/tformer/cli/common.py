"""What several commands share: their device and text flags, loading a checkpoint named
on the command line, printing JSON."""

import argparse
import json
import sys

from tformer.checks import parse_number
from tformer.devices import DTYPES, parse_dtype, pick_device
from tformer.models.gpt2 import GPT2
from tformer.models.load import load_gpt2_with_tokenizer
from tformer.tokenizers import Tokenizer


def add_device_options(parser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--dtype", default="float32", choices=list(DTYPES), help="weight format (default: float32)"
    )


def load_model(checkpoint: str, device: str, dtype: str) -> tuple[GPT2, Tokenizer]:
    """--device and --dtype as given, then tformer.models.load."""
    return load_gpt2_with_tokenizer(checkpoint, pick_device(device), parse_dtype(dtype))


def add_text_options(parser) -> None:
    """The checkpoint and the text that `inspect` and `attention` run it on."""
    parser.add_argument("checkpoint", help="run or checkpoint directory")
    parser.add_argument("--text", required=True, help="the text (translation: the source)")
    parser.add_argument("--target", help="translation checkpoints: the target sentence")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...")


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


def number(
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
):
    """An argparse `type` for a number in a range: a flag given NaN, infinity, a value out of
    range or not a number is refused as `argument --flag: must be ..., got '...'`."""

    def parse(text: str) -> int | float:
        try:
            return parse_number(text, integer, low, high, low_open, high_open)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse
