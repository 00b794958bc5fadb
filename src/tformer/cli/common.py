"""What several commands share: their device and text flags, loading a checkpoint named
on the command line, printing JSON and warnings."""

import argparse
import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tformer.checks import MAX_SEED, parse_number
from tformer.data.sources import read_text_file, utf8_text
from tformer.devices import DTYPES, parse_dtype, pick_device
from tformer.errors import TformerWarning
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


def read_utf8(path: str | None) -> str:
    """A file's text, or standard input's when path is None; text that is not UTF-8 is
    refused in one line that names where it came from."""
    if path is not None:
        return read_text_file(Path(path))
    # The bytes, decoded here: a non-UTF-8 locale would decode them otherwise, or smuggle
    # undecodable bytes in as surrogates that no tokenizer can encode.
    stdin = getattr(sys.stdin, "buffer", None)
    return sys.stdin.read() if stdin is None else utf8_text(stdin.read(), "standard input")


def non_empty(text: str) -> str:
    """An argparse `type` for text that must not be empty (an empty --stop would stop
    before the first token)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty, got ''")
    return text


@contextmanager
def warnings_as_lines(command: str) -> Iterator[None]:
    """Within: every TformerWarning printed as one line on standard error,
    `tformer COMMAND: warning: ...`, each time it is given; other warnings as usual."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, TformerWarning):
            text = " ".join(str(message).split())
            print(f"tformer {command}: warning: {text}", file=sys.stderr)
        else:
            shown_before(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", TformerWarning)
        shown_before = warnings.showwarning
        warnings.showwarning = show
        yield


# --seed of every command: a seed torch's generators take.
seed = number(integer=True, low=0, high=MAX_SEED)


def add_weight_flags(p) -> None:
    """--dtype and --quantize: how a language model's weights are stored for decoding."""
    p.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="weight format; on the CPU activations stay float32 (default: float32)",
    )
    p.add_argument(
        "--quantize",
        choices=["none", "int8", "int4", "w8a8", "w4a8"],
        default="none",
        help="quantisation: int8, weight-only, one scale per output row, a quarter of "
        "float32's memory traffic; int4, weight-only, a float16 scale per 32 weights of a "
        "row (ggml's q4_0), 14%% of it; w8a8, int8 weights and each step's activations "
        "quantised to int8 per row, integer products: faster where a step has many rows "
        "(batches, beams, prompts); w4a8, int4's weights and the activations quantised to "
        "int8 per 32, integer products, as llama.cpp computes q4_0 (default: none)",
    )
