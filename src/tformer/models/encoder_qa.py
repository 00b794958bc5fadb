"""Extractive question answering with a bidirectional reader: the original Transformer's
encoder stack under the same span head as GPT-2's reader (tformer.models.gpt2_qa).

    h = Encoder(Embed(ids) sqrt(C) + PE)           (B, T, C), every token sees every other
    [s_t, e_t] = h_t W^T + b                         W (2, C), b (2,)
    loss = (CE(s, start) + CE(e, end)) / 2

GPT-2's reader is causal: a context token has read the question and the text before it,
never the text after. Here each token attends both ways (padding aside), as BERT's readers
do; docs/qa.md compares the two. The model is an encoder-decoder Transformer with no
decoder (n_decoder_layers = 0) and one embedding, so the encoder of a translation run
(`tformer train --task translation`) loads as a reader with a new head.

A checkpoint is config.json (model_type "tformer-encoder-qa", the Seq2SeqConfig's fields)
and model.safetensors (the encoder under `transformer.`, the head as `qa_outputs.`), read
and written as the encoder-decoder's are (seq2seq).
"""

import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from tformer.checkpoints import CheckpointError, write_model
from tformer.models.common import count_parameters
from tformer.models.seq2seq import (
    INIT_GAIN,
    Seq2SeqConfig,
    Seq2SeqTransformer,
    config_from_saved,
    current_name,
    load_state,
    load_weights_into,
    read_config,
    read_state,
    sinusoids,
    state_to_save,
)
from tformer.models.seq2seq import MODEL_TYPE as SEQ2SEQ_TYPE
from tformer.nn.seeding import seeded_generator

MODEL_TYPE = "tformer-encoder-qa"


class EncoderForQuestionAnswering(nn.Module):
    """The encoder with a span head: token ids (B, T), attention mask (B, T) -> span logits
    (B, 2, T), row 0 the start logits and row 1 the end logits; padding gets -inf."""

    def __init__(
        self,
        config: Seq2SeqConfig,
        seed: int | None = None,
        transformer: Seq2SeqTransformer | None = None,
    ) -> None:
        """A new reader from `seed`, or a new head on the given encoder."""
        super().__init__()
        if config.n_decoder_layers != 0 or not config.share_embeddings:
            raise ValueError("a reader's config has no decoder and one embedding")
        self.config = config
        self.transformer = (
            transformer if transformer is not None else Seq2SeqTransformer(config, seed)
        )
        self.qa_outputs = nn.Linear(config.d_model, 2)
        with torch.no_grad():  # as the encoder's own linear layers, drawn after them
            g = seeded_generator(seed + 1) if seed is not None else None
            weight = torch.empty(self.qa_outputs.weight.shape)
            nn.init.xavier_uniform_(weight, gain=INIT_GAIN, generator=g)
            self.qa_outputs.weight.copy_(weight)
            self.qa_outputs.bias.zero_()

    @staticmethod
    def config_for(
        vocab_size: int,
        max_len: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        d_ff: int,
        dropout: float = 0.0,
        norm_position: str = "post",
        activation: str = "relu",
        attention: str = "sdpa",
    ) -> Seq2SeqConfig:
        """A reader's Seq2SeqConfig: one vocabulary, n_layers encoder layers, no decoder
        (post-LN and ReLU by default, the paper's layer)."""
        return Seq2SeqConfig(
            vocab_size,
            vocab_size,
            max_len=max_len,
            d_model=d_model,
            n_heads=n_heads,
            n_encoder_layers=n_layers,
            n_decoder_layers=0,
            d_ff=d_ff,
            dropout=dropout,
            norm_position=norm_position,
            activation=activation,
            share_embeddings=True,
            attention=attention,
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        real = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones_like(input_ids, dtype=torch.bool)
        )  # (B, T); the mask is always given: a pad id may also be a real token here
        h = self.transformer.encode(input_ids, real)  # (B, T, C)
        logits = self.qa_outputs(h).transpose(1, 2)  # (B, T, 2) -> (B, 2, T)
        return logits.masked_fill(~real[:, None, :], float("-inf"))

    def layers(self) -> list[nn.Module]:
        """The encoder's layers (the units of activation checkpointing and FSDP)."""
        return list(self.transformer.encoder_layers)

    def set_activation_checkpointing(self, on: bool = True) -> None:
        self.transformer.set_activation_checkpointing(on)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json and model.safetensors, each written atomically; the one embedding
        stored once."""
        state = state_to_save(self, True, prefix=PREFIX)
        write_model(directory, state, {"model_type": MODEL_TYPE, **asdict(self.config)})

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        device: torch.device | str = "cpu",
        seed: int = 0,
        *,
        dropout: float | None = None,
        attention: str | None = None,
        head_required: bool = False,
    ) -> "EncoderForQuestionAnswering":
        """A reader saved by save_pretrained, or the encoder of an encoder-decoder
        checkpoint with a new head drawn from `seed` (an error instead with head_required).
        `dropout` (every dropout) and `attention` replace the saved settings."""
        directory = Path(directory)
        kind, saved = read_config(directory, (MODEL_TYPE, SEQ2SEQ_TYPE), WRONG_TYPE)
        if kind == SEQ2SEQ_TYPE and head_required:
            raise CheckpointError(
                f"{directory}: an encoder-decoder model without a question-answering head; "
                "train one with 'tformer train --task qa --init ...'"
            )
        config = config_from_saved(saved)
        if kind == MODEL_TYPE:
            config = config.with_settings(dropout, attention)
            state = read_state(directory, True, prefix=PREFIX)
            model = load_state(lambda: cls(config), state, device, directory)
            model.transformer.positions = sinusoids(config, device)
            return model.eval()
        # The encoder of a translation model: its source side, with a new head.
        full = Seq2SeqTransformer.from_pretrained(directory, device=device)
        config = replace(
            config, n_decoder_layers=0, tgt_vocab_size=config.src_vocab_size, share_embeddings=True
        ).with_settings(dropout, attention)
        state = {
            name: tensor
            for name, tensor in full.state_dict().items()
            if not name.startswith(("decoder_layers.", "decoder_norm.", "tgt_embedding."))
        }
        state["tgt_embedding.weight"] = state["src_embedding.weight"]  # one module, two names
        transformer = load_state(lambda: Seq2SeqTransformer(config), state, device, directory)
        transformer.positions = sinusoids(config, device)
        return cls(config, seed=seed, transformer=transformer).to(device).eval()

    @staticmethod
    def current_name(name: str) -> str:
        """A parameter's name today, given the one an earlier version saved it under (an
        old run's optimizer state is keyed by such names)."""
        return current_name(name)

    def load_weights(self, directory: str | os.PathLike) -> None:
        """Load, in place, the weights that save_pretrained wrote for a reader like this one."""
        load_weights_into(self, self.config, Path(directory), MODEL_TYPE, WRONG_TYPE, PREFIX)


PREFIX = "transformer."  # the encoder's tensors; the head's are qa_outputs.*
WRONG_TYPE = "neither a bidirectional reader nor an encoder-decoder checkpoint"
