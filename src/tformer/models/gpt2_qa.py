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

from tformer.files import atomic_write, atomic_write_json
from tformer.models.checkpoints import (
    CheckpointError,
    config_to_hf,
    load_config,
    name_or_path,
    read_tensors,
    resolve_checkpoint,
    state_dict_from_hf,
    state_dict_to_hf,
    with_settings,
)
from tformer.models.gpt2 import GPT2, GPT2Config, base_of_adapters
from tformer.nn.lora import lora_layers

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
            g = torch.Generator().manual_seed(seed + 1) if seed is not None else None
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
        return sum(p.numel() for p in self.parameters())

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
        from tformer.models.adapters import is_adapter, load_adapted_reader

        directory = resolve_checkpoint(path_or_name)
        if is_adapter(directory):
            settings = dict(dropout=dropout, attention=attention, head_required=head_required)
            return load_adapted_reader(directory, dtype, device, seed, **settings)
        config = with_settings(load_config(directory), dropout, attention)
        tensors = read_tensors(directory)
        head = {name: tensors.pop(name) for name in HEAD if name in tensors}
        if head_required and not head:
            raise CheckpointError(
                f"{directory}: no question-answering head (qa_outputs); train one with "
                "'tformer train --task qa --init ...'"
            )
        if len(head) == 1:
            raise CheckpointError(f"{directory}: has {next(iter(head))} but not the other half")
        body = state_dict_from_hf(tensors, config, str(directory))
        with torch.device("meta"):
            gpt2 = GPT2(config)  # no memory, no initialisation: the weights come from the file
        gpt2.load_state_dict(body, strict=True, assign=True)
        gpt2.name_or_path = name_or_path(path_or_name, directory)
        model = cls(config, seed=seed, gpt2=gpt2)
        if head:
            if tuple(head["qa_outputs.weight"].shape) != (2, config.d_model):
                raise CheckpointError(
                    f"{directory}: qa_outputs.weight has shape "
                    f"{tuple(head['qa_outputs.weight'].shape)}, expected (2, {config.d_model})"
                )
            with torch.no_grad():
                model.qa_outputs.weight.copy_(head["qa_outputs.weight"])
                model.qa_outputs.bias.copy_(head["qa_outputs.bias"])
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json and model.safetensors as transformers' GPT2ForQuestionAnswering
        writes them (no language-model head); with LoRA layers, the adapters and the head
        in PEFT's layout, as GPT2.save_pretrained."""
        from safetensors.torch import save_file

        from tformer.models.adapters import save_adapter

        if lora_layers(self):  # the adapters and the head alone, as PEFT saves them
            save_adapter(self, directory, base=base_of_adapters(self))
            return
        directory = Path(directory)
        tensors = {k: v.detach().cpu() for k, v in state_dict_to_hf(self.gpt2).items()}
        tensors["qa_outputs.weight"] = self.qa_outputs.weight.detach().cpu().contiguous()
        tensors["qa_outputs.bias"] = self.qa_outputs.bias.detach().cpu().contiguous()
        config = config_to_hf(self.config, self.qa_outputs.weight.dtype)
        config["architectures"] = ["GPT2ForQuestionAnswering"]
        metadata = {"format": "pt"}
        atomic_write(
            directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata=metadata)
        )
        atomic_write_json(directory / "config.json", config)


def right_padded(attention_mask: torch.Tensor | None) -> bool:
    """True if there is no mask, or each row's real tokens (1) all come before its padding
    (0): (B, T) non-increasing along T."""
    if attention_mask is None:
        return True
    if attention_mask.dim() != 2:
        return False
    # On a GPU this reads one flag back from the device each forward pass.
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
