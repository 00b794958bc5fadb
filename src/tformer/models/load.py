"""A checkpoint directory's model with its tokenizer, whichever model it holds.

load_gpt2_with_tokenizer(checkpoint, device, dtype)   GPT-2 (a LoRA adapter directory:
                                                      its base, the updates folded in; a
                                                      GGUF file)
is_translation_checkpoint(directory)                  an encoder-decoder's (tformer's or
                                                      a Marian directory)?
checkpoint_kind(directory)                            "language", "translation" or "qa"
load_translation_model(directory, device)             the encoder-decoder and its tokenizer
"""

from pathlib import Path

import torch

from tformer.checkpoints import peft, read_model_config, resolve_checkpoint
from tformer.checkpoints.gguf import is_gguf
from tformer.checkpoints.peft import is_adapter
from tformer.models import encoder_qa
from tformer.models.gpt2 import GPT2
from tformer.models.gpt2_layout import load_config
from tformer.models.seq2seq import MODEL_TYPE, Seq2SeqTransformer
from tformer.models.seq2seq_marian import is_marian
from tformer.nn.lora import merge_lora
from tformer.tokenizers import Tokenizer, load_tokenizer, tokenizer_for_model


def load_gpt2_with_tokenizer(
    checkpoint: str, device: torch.device, dtype: torch.dtype
) -> tuple[GPT2, Tokenizer]:
    """A checkpoint's GPT-2 and tokenizer; the tokenizer is checked first, as it is cheaper.
    A LoRA adapter directory gives its base model with the adapters folded in."""
    directory = resolve_checkpoint(checkpoint)
    if is_gguf(directory):  # one file: the model and its tokenizer together
        return GPT2.from_gguf(directory, dtype=dtype, device=device)
    if is_adapter(directory):
        model = GPT2.from_pretrained(directory, dtype=dtype, device=device)
        merge_lora(model)  # W + (alpha / r) B A: the same function at the base's cost
        return model.eval(), tokenizer_for_model(directory, model.config.vocab_size)
    tokenizer = tokenizer_for_model(directory, load_config(directory).vocab_size)
    return GPT2.from_pretrained(directory, dtype=dtype, device=device), tokenizer


def is_translation_checkpoint(directory: Path) -> bool:
    """Whether a resolved checkpoint directory holds an encoder-decoder model."""
    if is_gguf(directory) or is_adapter(directory):  # GGUF files, LoRA adapters: GPT-2's
        return False
    saved = read_model_config(directory)
    return saved.get("model_type") == MODEL_TYPE or is_marian(saved)


def load_translation_model(
    directory: Path, device: torch.device
) -> tuple[Seq2SeqTransformer, Tokenizer]:
    """The encoder-decoder and its tokenizer, refused together if the tokenizer has ids the
    model's source vocabulary lacks (a smaller tokenizer is fine: decoding never chooses an
    id it cannot decode)."""
    tokenizer = load_tokenizer(directory)
    model = Seq2SeqTransformer.from_pretrained(directory, device=device)
    if tokenizer.vocab_size > model.config.src_vocab_size:
        raise ValueError(
            f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"source vocabulary only {model.config.src_vocab_size}: they do not belong together"
        )
    return model, tokenizer


LANGUAGE, TRANSLATION, QA = "language", "translation", "qa"


def checkpoint_kind(directory: Path) -> str:
    """What a resolved checkpoint directory holds: a language model (GPT-2, or a LoRA
    adapter on one), a translation model (the encoder-decoder) or a question-answering
    reader (GPT-2's or the encoder's span head). A GGUF file holds a language model."""
    if is_gguf(directory):
        return LANGUAGE
    if is_adapter(directory):
        return QA if peft.has_head(peft.read_config(directory)) else LANGUAGE
    config = read_model_config(directory)
    if config.get("model_type") == MODEL_TYPE or is_marian(config):
        return TRANSLATION
    if config.get("model_type") == encoder_qa.MODEL_TYPE:
        return QA
    if "GPT2ForQuestionAnswering" in (config.get("architectures") or []):
        return QA
    return LANGUAGE
