"""LoRA adapters on GPT-2 or its reader, in PEFT's layout: the entry points for callers
that hold either model. gpt2_adapters does the work; tformer.checkpoints.peft knows the
files.

    save_adapter(model, directory, base)     the LoRA layers (and a reader's head)
    load_adapter(model, directory)           puts an adapter's LoRA layers on a model

`GPT2.from_pretrained(adapter_dir)` (and GPT2ForQuestionAnswering's) loads the base the
adapter names and puts the adapters on it, as transformers does with PEFT installed.
"""

import os

from torch import nn

from tformer.checkpoints.peft import CONFIG_FILE, WEIGHTS_FILE, is_adapter
from tformer.models import gpt2_adapters
from tformer.models.gpt2 import GPT2
from tformer.models.gpt2_adapters import lora_targets
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering
from tformer.nn.lora import LoRAConfig

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "body",
    "is_adapter",
    "load_adapter",
    "lora_targets",
    "save_adapter",
]

Adaptable = GPT2 | GPT2ForQuestionAnswering


def body(model: Adaptable) -> GPT2:
    """The GPT-2 that carries the adapters (a reader's head trains in full)."""
    return model.gpt2 if isinstance(model, GPT2ForQuestionAnswering) else model


def head(model: Adaptable) -> nn.Linear | None:
    """A reader's span head, saved with its adapters; None for a language model."""
    return model.qa_outputs if isinstance(model, GPT2ForQuestionAnswering) else None


def save_adapter(model: Adaptable, directory: str | os.PathLike, base: str | None = None) -> None:
    """Write the model's LoRA layers (and a reader's head) as a PEFT adapter, atomically
    file by file; `base` names the checkpoint they adapt."""
    gpt2_adapters.save_adapter(body(model), model.config, directory, base, head(model))


def load_adapter(model: Adaptable, directory: str | os.PathLike) -> LoRAConfig:
    """Put the LoRA layers of a PEFT adapter directory on `model` (frozen base, trainable
    adapters; a reader's head is the adapter's, and trainable); returns their
    configuration."""
    return gpt2_adapters.load_adapter(body(model), model.config, directory, head(model))
