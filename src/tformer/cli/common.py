"""What several commands share: loading a model with its tokenizer, printing JSON."""

import json
import sys
from pathlib import Path

from tformer.devices import DTYPES, parse_dtype, pick_device
from tformer.models.gpt2 import GPT2
from tformer.tokenizers import Tokenizer, tokenizer_for_model


def add_device_options(parser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--dtype", default="float32", choices=list(DTYPES), help="weight format (default: float32)"
    )


def load_model(checkpoint: str, device: str, dtype: str) -> tuple[GPT2, Tokenizer]:
    model = GPT2.from_pretrained(checkpoint, dtype=parse_dtype(dtype), device=pick_device(device))
    directory = Path(checkpoint) if Path(checkpoint).is_dir() else None
    if directory is None:  # a Hub name: the tokenizer came with the download
        from tformer.models.checkpoints import resolve_checkpoint

        directory = resolve_checkpoint(checkpoint)
    return model, tokenizer_for_model(directory, model.config.vocab_size)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    print()
