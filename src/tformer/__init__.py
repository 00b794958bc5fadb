"""tformer: the Transformer from first principles, checkpoint-compatible with GPT-2.

The names below are imported on first use (PEP 562), so that `import tformer` alone does
not load torch: the `tformer` program chooses its C allocator before torch is loaded
(tformer/cli/launch.py).
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tformer.checkpoints import CheckpointError
    from tformer.models.gpt2 import GPT2, GPT2Config
    from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
    from tformer.tokenizers import (
        CharTokenizer,
        GPT2Tokenizer,
        HFTokenizer,
        Tokenizer,
        load_tokenizer,
        train_bpe,
    )

# each public name -> the module it comes from
_MODULES = {
    "CheckpointError": "tformer.checkpoints",
    "GPT2": "tformer.models.gpt2",
    "GPT2Config": "tformer.models.gpt2",
    "Seq2SeqConfig": "tformer.models.seq2seq",
    "Seq2SeqTransformer": "tformer.models.seq2seq",
    "CharTokenizer": "tformer.tokenizers",
    "GPT2Tokenizer": "tformer.tokenizers",
    "HFTokenizer": "tformer.tokenizers",
    "Tokenizer": "tformer.tokenizers",
    "load_tokenizer": "tformer.tokenizers",
    "train_bpe": "tformer.tokenizers",
}

__all__ = [
    "GPT2",
    "CharTokenizer",
    "CheckpointError",
    "GPT2Config",
    "GPT2Tokenizer",
    "HFTokenizer",
    "Seq2SeqConfig",
    "Seq2SeqTransformer",
    "Tokenizer",
    "load_tokenizer",
    "train_bpe",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """A public name, or a subpackage (`tformer.nn`), imported on first use."""
    if name in _MODULES:
        value = getattr(importlib.import_module(_MODULES[name]), name)
    else:
        try:
            value = importlib.import_module(f"tformer.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"tformer.{name}":
                raise
            raise AttributeError(f"module 'tformer' has no attribute {name!r}") from None
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULES})
