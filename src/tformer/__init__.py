"""tformer: the Transformer from first principles, checkpoint-compatible with GPT-2."""

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
