"""Extractive question answering with GPT-2: a span head on the final residual stream.

For a sequence of T tokens (the question, then the context) the head scores every position
as the answer's first token and as its last:

    [s_t, e_t] = h_t W^T + b,     W (2, C), b (2,), h (B, T, C) the final normalised stream

The answer is the span i <= j with the largest s_i + e_j. Training minimises the mean of the
two cross-entropies over positions,

    loss = (CE(s, start) + CE(e, end)) / 2,

where a gold position outside 0..T-1 (an answer cut off by the window) is left out. A
causal model sees only what comes before, so the question goes before the context: then
every context token has read the question.

The layer is transformers' `GPT2ForQuestionAnswering.qa_outputs` and the checkpoint its
layout (GPT-2's tensors under `transformer.`, plus `qa_outputs.weight` and `.bias`), so
checkpoints go both ways; a plain GPT-2 language-model checkpoint loads too, with a new
head drawn like the rest of GPT-2's weights, N(0, init_std^2), and a zero bias.
"""

import os
from pathlib import Path

import torch
from torch import nn

from tformer.checkpoints import (
    CheckpointError,
    name_or_path,
    peft,
    read_tensors,
    resolve_checkpoint,
    write_model,
)
from tformer.models import gpt2_adapters
from tformer.models.common import count_parameters
from tformer.models.gpt2 import GPT2, GPT2Config, check_same_shape
from tformer.models.gpt2_layout import config_to_hf, load_config, state_dict_from_hf
from tformer.nn.lora import lora_layers
from tformer.nn.seeding import seeded_generator

HEAD = ("qa_outputs.weight", "qa_outputs.bias")


class GPT2ForQuestionAnswering(nn.Module):
    """GPT-2 with a span head: token ids (B, T) -> span logits (B, 2, T), row 0 the start
    logits and row 1 the end logits.

    Stacked this way the loss is one cross-entropy over positions for 2B rows, so tformer's
    trainer trains it as it trains a language model (targets (B, 2): start, end)."""

    def __init__(self, config: GPT2Config, seed: int | None = None, gpt2: GPT2 | None = None):
        """A new model from `seed`, or a new head on the given (e.g. pre-trained) `gpt2`."""
        super().__init__()
        self.config = config
        self.gpt2 = gpt2 if gpt2 is not None else GPT2(config, seed=seed)
        self.qa_outputs = nn.Linear(config.d_model, 2)
        with torch.no_grad():  # GPT-2's N(0, init_std^2), drawn after the body's weights
            g = seeded_generator(seed + 1) if seed is not None else None
            shape = self.qa_outputs.weight.shape
            self.qa_outputs.weight.copy_(torch.randn(shape, generator=g) * config.init_std)
            self.qa_outputs.bias.zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Padding (attention_mask 0) gets logit -inf: it can be neither start nor end, and a
        window's loss does not depend on how far the batch pads it. (transformers leaves
        padded positions in; without padding the two agree.)

        Padding at the end of the rows (as tformer.qa.batches pads) is not given to the
        attention: under the causal mask no real token sees a later position anyway, so the
        key mask would change only the padded positions, whose logits are -inf here. The
        attention then takes its causal fast path."""
        key_mask = None if right_padded(attention_mask) else attention_mask
        h = self.gpt2.features(input_ids, key_mask, position_ids)  # (B, T, C)
        logits = self.qa_outputs(h).transpose(1, 2)  # (B, T, 2) -> (B, 2, T)
        if attention_mask is not None:
            logits = logits.masked_fill(attention_mask[:, None, :] == 0, float("-inf"))
        return logits

    @property
    def name_or_path(self) -> str | None:
        """The checkpoint the body came from: the base its LoRA adapters name."""
        return self.gpt2.name_or_path

    def layers(self) -> list[nn.Module]:
        """GPT-2's blocks (the units of activation checkpointing and FSDP)."""
        return self.gpt2.layers()

    def set_activation_checkpointing(self, on: bool = True) -> None:
        self.gpt2.set_activation_checkpointing(on)

    @staticmethod
    def loss(
        span_logits: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor
    ) -> torch.Tensor:
        """(CE(s, start) + CE(e, end)) / 2 over the batch; positions outside 0..T-1 (which
        are clamped to T, as transformers does) are left out. The trainer computes the same
        as one cross-entropy over the (B, 2, T) logits; this is the reference for it."""
        t = span_logits.shape[-1]
        starts, ends = start_positions.clamp(0, t), end_positions.clamp(0, t)
        start_loss = nn.functional.cross_entropy(span_logits[:, 0].float(), starts, ignore_index=t)
        end_loss = nn.functional.cross_entropy(span_logits[:, 1].float(), ends, ignore_index=t)
        return (start_loss + end_loss) / 2

    def num_parameters(self) -> int:
        return count_parameters(self)

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int = 0,
        *,
        dropout: float | None = None,
        attention: str | None = None,
        head_required: bool = False,
    ) -> "GPT2ForQuestionAnswering":
        """A QA checkpoint (its head included), or a GPT-2 language model with a new head
        drawn from `seed` (an error instead with head_required); `dropout` and `attention`
        as in GPT2.from_pretrained. A LoRA adapter directory of a reader (PEFT's layout,
        task QUESTION_ANS) loads the base it names, with the adapters and the head on it."""
        directory = resolve_checkpoint(path_or_name)
        if peft.is_adapter(directory):
            return cls.from_adapter(
                directory, dtype, device, seed, dropout, attention, head_required
            )
        config = load_config(directory).with_settings(dropout, attention)
        tensors = read_tensors(directory)
        head = {name: tensors.pop(name) for name in HEAD if name in tensors}
        if head_required and not head:
            raise CheckpointError(
                f"{directory}: no question-answering head (qa_outputs); train one with "
                "'tformer train --task qa --init ...'"
            )
        if len(head) == 1:
            raise CheckpointError(f"{directory}: has {next(iter(head))} but not the other half")
        gpt2 = GPT2.from_hf_tensors(config, tensors, str(directory), dtype, device)
        gpt2.name_or_path = name_or_path(path_or_name, directory)
        model = cls(config, seed=seed, gpt2=gpt2)
        if head:
            check_head(head, config, directory)
            with torch.no_grad():
                model.qa_outputs.weight.copy_(head["qa_outputs.weight"])
                model.qa_outputs.bias.copy_(head["qa_outputs.bias"])
        return model.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_adapter(
        cls,
        directory: Path,
        dtype: torch.dtype,
        device: torch.device | str,
        seed: int,
        dropout: float | None,
        attention: str | None,
        head_required: bool,
    ) -> "GPT2ForQuestionAnswering":
        """A reader's adapter directory: its base with the adapters and the span head on it.
        A language model's adapter gives its base and adapters under a new head drawn from
        `seed` (an error instead with head_required)."""
        if peft.has_head(peft.read_config(directory)):
            model = gpt2_adapters.load_base(
                lambda base: cls.from_pretrained(
                    base, dtype, device, seed, dropout=dropout, attention=attention
                ),
                directory,
            )
            gpt2_adapters.load_adapter(model.gpt2, model.config, directory, model.qa_outputs)
            return model.eval()
        if head_required:
            raise CheckpointError(
                f"{directory}: a language model's adapters, without a question-answering head; "
                "train one with 'tformer train --task qa --init ...'"
            )
        gpt2 = GPT2.from_pretrained(directory, dtype, device, dropout=dropout, attention=attention)
        model = cls(gpt2.config, seed=seed, gpt2=gpt2)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json and model.safetensors as transformers' GPT2ForQuestionAnswering
        writes them (no language-model head); with LoRA layers, the adapters and the head
        in PEFT's layout, as GPT2.save_pretrained."""
        if lora_layers(self):  # the adapters and the head alone, as PEFT saves them
            base = gpt2_adapters.base_of_adapters(self.name_or_path)
            gpt2_adapters.save_adapter(self.gpt2, self.config, directory, base, self.qa_outputs)
            return
        tensors = self.gpt2.hf_tensors()
        tensors["qa_outputs.weight"] = self.qa_outputs.weight
        tensors["qa_outputs.bias"] = self.qa_outputs.bias
        config = config_to_hf(self.config, self.qa_outputs.weight.dtype)
        config["architectures"] = ["GPT2ForQuestionAnswering"]
        write_model(directory, tensors, config)

    def load_weights(self, directory: str | os.PathLike) -> None:
        """Load, in place, the weights that save_pretrained wrote for a reader like this one:
        body and head, or with LoRA layers the adapters and the head."""
        directory = Path(directory)
        if lora_layers(self):
            gpt2_adapters.load_adapter_weights(self.gpt2, self.config, directory, self.qa_outputs)
            return
        check_same_shape(self.config, load_config(directory), directory)
        tensors = read_tensors(directory)
        head = {name: tensors.pop(name) for name in HEAD if name in tensors}
        if len(head) != len(HEAD):
            raise CheckpointError(f"{directory}: no question-answering head (qa_outputs)")
        check_head(head, self.config, directory)
        shapes = {name: tuple(t.shape) for name, t in self.gpt2.state_dict().items()}
        state = state_dict_from_hf(tensors, self.config, shapes, str(directory))
        self.gpt2.load_state_dict(state)
        with torch.no_grad():
            self.qa_outputs.weight.copy_(head["qa_outputs.weight"])
            self.qa_outputs.bias.copy_(head["qa_outputs.bias"])


def check_head(head: dict[str, torch.Tensor], config: GPT2Config, directory: Path) -> None:
    if tuple(head["qa_outputs.weight"].shape) != (2, config.d_model):
        raise CheckpointError(
            f"{directory}: qa_outputs.weight has shape "
            f"{tuple(head['qa_outputs.weight'].shape)}, expected (2, {config.d_model})"
        )


def right_padded(attention_mask: torch.Tensor | None) -> bool:
    """True if there is no mask, or each row's real tokens (1) all come before its padding
    (0): (B, T) non-increasing along T."""
    if attention_mask is None:
        return True
    if attention_mask.dim() != 2:
        return False
    # On a GPU this reads one flag back from the device each forward pass.
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
