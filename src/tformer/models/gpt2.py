"""GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners").

A decoder-only Transformer:

    h_0 = E[x] + P[0..T-1]                      token + learned position embeddings
    h_l = Block(h_{l-1}),  l = 1..n_layers      pre-LN blocks:
            r = h + Attn(LN_1(h))               causal multi-head self-attention
            h = r + MLP(LN_2(r))                GELU (tanh) feed-forward, d_ff = 4 C
    logits = LN_f(h_L) E^T                      final LayerNorm; head tied to the embedding

The norm placement and the residual are the sublayer connection's switches, so the same
model also runs as post-LN or without norms (the final LayerNorm exists only for pre-LN,
whose residual stream is otherwise never normalised). Only the pre-LN form is GPT-2 and can
be saved in the Hugging Face layout.

Initialisation (one place, `init_weights`): every weight matrix and embedding ~ N(0, 0.02),
biases 0, LayerNorm gains 1; the two projections that write into the residual stream in each
block (attention output, second MLP layer) ~ N(0, 0.02 / sqrt(2 n_layers)), so that the
stream's variance does not grow with depth. `init="xavier"` instead gives the original
Transformer's: Xavier-uniform matrices, U(-b, b) with b = sqrt(6 / (fan_in + fan_out)) (W^Q,
W^K, W^V each as its own C x C matrix), embeddings ~ N(0, 1/C), nothing scaled by depth;
the residual / LayerNorm lab uses it, as Xiong et al. (2020) did.
"""

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from tformer.nn import (
    Dropout,
    FeedForward,
    HookPoint,
    KVCache,
    LayerNorm,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    SublayerConnection,
    TokenEmbedding,
)
from tformer.nn.attention import IMPLEMENTATIONS, Implementation, set_implementation
from tformer.nn.capture import NameFilter, run_with_cache
from tformer.nn.checkpointing import run_layer
from tformer.nn.feedforward import ACTIVATIONS, Activation
from tformer.nn.lora import lora_layers
from tformer.nn.sublayer import NormPosition

if TYPE_CHECKING:  # generation lives outside the model; generate() only calls it
    from tformer.generate.decode import SamplingConfig

# name -> (n_layers, n_heads, d_model), as published.
PRESETS: dict[str, tuple[int, int, int]] = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    max_len: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int | None = None  # None: 4 * d_model
    dropout: float = 0.1  # on each sublayer's output, before it joins the residual stream
    attention_dropout: float | None = None  # on the attention weights; None: same as dropout
    embedding_dropout: float | None = None  # on token + position embeddings; None: same
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    eos_token_id: int | None = None
    activation: Activation = "gelu_tanh"  # GPT-2's; "gelu" (exact) is nanoGPT's and faster on CPU
    norm_position: NormPosition = "pre"
    residual: bool = True
    attention: Implementation = "sdpa"
    init: str = "gpt2"  # "gpt2", or "xavier": the original Transformer's (see init_weights)

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.attention_dropout is None:
            self.attention_dropout = self.dropout
        if self.embedding_dropout is None:
            self.embedding_dropout = self.dropout
        for name in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        for name in ("layer_norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive number, got {value!r}")
        for name in ("dropout", "attention_dropout", "embedding_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"GPT2Config.{name} must be a number, got {value!r}")
            if not 0.0 <= value < 1.0:
                raise ValueError(f"GPT2Config.{name} must be in [0, 1), got {value}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"GPT2Config: d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )
        if self.norm_position not in ("pre", "post", "none"):
            raise ValueError(
                "GPT2Config.norm_position must be 'pre', 'post' or 'none', "
                f"got {self.norm_position!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"GPT2Config.activation must be one of {', '.join(ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if self.init not in ("gpt2", "xavier"):
            raise ValueError(f"GPT2Config.init must be 'gpt2' or 'xavier', got {self.init!r}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(
                f"GPT2Config.attention must be one of {', '.join(IMPLEMENTATIONS)}, "
                f"got {self.attention!r}"
            )
        if self.eos_token_id is not None and (
            not isinstance(self.eos_token_id, int) or not 0 <= self.eos_token_id < self.vocab_size
        ):
            raise ValueError(
                f"GPT2Config.eos_token_id {self.eos_token_id} is outside the vocabulary "
                f"(size {self.vocab_size})"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2Config":
        """A published size by name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {', '.join(PRESETS)}")
        n_layers, n_heads, d_model = PRESETS[name]
        preset = dict(n_layers=n_layers, n_heads=n_heads, d_model=d_model, eos_token_id=50256)
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown GPT2Config field(s): {', '.join(sorted(unknown))}")
        return cls(**{**preset, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """One decoder block, (B, T, C) -> (B, T, C).

        resid_pre ──┬─────────────────────(+)── resid_mid ──┬──────────────────(+)── resid_post
                    └─ LN_1 ─ Attn ─ attn_out ─┘            └─ LN_2 ─ MLP ─ mlp_out ─┘

    (drawn pre-LN; the sublayer connections move the norms for post-LN or remove them.)
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        c = config
        self.attn_sublayer = SublayerConnection(
            c.d_model, c.norm_position, c.residual, c.dropout, c.layer_norm_eps
        )
        self.attn = MultiHeadAttention(
            c.d_model,
            c.n_heads,
            causal=True,
            dropout=c.attention_dropout,
            implementation=c.attention,
        )
        self.mlp_sublayer = SublayerConnection(
            c.d_model, c.norm_position, c.residual, c.dropout, c.layer_norm_eps
        )
        self.mlp = FeedForward(c.d_model, c.d_ff, activation=c.activation)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = self.hook_resid_pre(x)

        def attend(h: torch.Tensor) -> torch.Tensor:
            return self.hook_attn_out(self.attn(h, attention_mask=attention_mask, cache=cache))

        x = self.hook_resid_mid(self.attn_sublayer(x, attend))
        x = self.mlp_sublayer(x, lambda h: self.hook_mlp_out(self.mlp(h)))
        return self.hook_resid_post(x)


class GPT2(nn.Module):
    """GPT-2 language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: GPT2Config, seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        self.token_embedding = TokenEmbedding(c.vocab_size, c.d_model)
        self.position_embedding = LearnedPositionalEmbedding(c.max_len, c.d_model)
        self.embedding_dropout = Dropout(c.embedding_dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.final_norm = (
            LayerNorm(c.d_model, c.layer_norm_eps) if c.norm_position == "pre" else nn.Identity()
        )
        # For fast decoding, tformer.generate.fast puts a packed copy of the output head (the
        # token embedding) here; see unembed.
        self.packed_head: nn.Module | None = None
        self.activation_checkpointing = False  # see set_activation_checkpointing
        # The checkpoint these weights came from (from_pretrained): LoRA adapters trained on
        # them name it as their base when saved.
        self.name_or_path: str | None = None
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2's initialisation, or with config.init == "xavier" the original Transformer's
        (see the module's docstring); the same seed gives the same weights."""
        device = self.token_embedding.weight.device
        if device.type == "meta":
            return
        g = torch.Generator(device=device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(seed)
        if self.config.init == "xavier":
            self.init_xavier(g)
            return
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std, generator=g)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (TokenEmbedding, LearnedPositionalEmbedding)):
                nn.init.normal_(module.weight, 0.0, std, generator=g)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.w_o.weight, 0.0, residual_std, generator=g)
            nn.init.normal_(block.mlp.w2.weight, 0.0, residual_std, generator=g)

    def init_xavier(self, g: torch.Generator) -> None:
        for block in self.blocks:
            for weight in block.attn.weight_blocks():  # W^Q, W^K, W^V, W^O
                nn.init.xavier_uniform_(weight, generator=g)
            for linear in (block.mlp.w1, block.mlp.w2):
                nn.init.xavier_uniform_(linear.weight, generator=g)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, (TokenEmbedding, LearnedPositionalEmbedding)):
                nn.init.normal_(module.weight, 0.0, self.config.d_model**-0.5, generator=g)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_attention(self, implementation: Implementation) -> None:
        """Run attention on the explicit, fused or blocked path from now on (see
        tformer.nn.attention.set_implementation); the config records the choice."""
        set_implementation(self, implementation)
        self.config.attention = implementation

    def layers(self) -> list[nn.Module]:
        """The repeated blocks: the units of activation checkpointing and of FSDP sharding."""
        return list(self.blocks)

    def set_activation_checkpointing(self, on: bool = True) -> None:
        """While training, keep only each block's input and recompute the rest in the
        backward pass (tformer.nn.checkpointing): less memory, ~1/3 more compute."""
        self.activation_checkpointing = on

    def num_parameters(self) -> int:
        """Trainable parameters, the tied embedding/head counted once."""
        return sum(p.numel() for p in self.parameters())

    def check_input(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, past: int
    ) -> None:
        """Reject what the model cannot compute, with a message that says why."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape (batch, time), got {tuple(input_ids.shape)}; "
                "add a batch dimension with input_ids[None]"
            )
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
        t, v, max_len = input_ids.shape[1], self.config.vocab_size, self.config.max_len
        if past + t > max_len:
            raise ValueError(
                f"sequence of {past + t} tokens is longer than the context window "
                f"(max_len={max_len}); cut the input to its last {max_len} tokens"
            )
        if input_ids.numel() > 0:
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= v:
                bad = low if low < 0 else high
                raise ValueError(
                    f"token id {bad} is outside the vocabulary (0..{v - 1}); was the text "
                    "encoded with the tokenizer this model was trained with?"
                )
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[1] != t:
                raise ValueError(
                    f"position_ids must have shape (batch, {t}) like input_ids, "
                    f"got {tuple(position_ids.shape)}"
                )
            if (
                position_ids.numel() > 0
                and not 0 <= int(position_ids.min()) <= int(position_ids.max()) < max_len
            ):
                raise ValueError(f"position_ids must lie in 0..{max_len - 1}")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V).

        attention_mask (B, S): 1 for real tokens, 0 for padding, over every position the
        attention sees (with caches, the cached ones too). position_ids (B, T): defaults to
        0..T-1 after the cached positions, as in transformers; with left padding pass
        `(attention_mask.cumsum(-1) - 1).clamp(min=0)` so each row's text starts at position
        0. caches: one KVCache per block, for decoding.
        """
        return self.unembed(self.features(input_ids, attention_mask, position_ids, caches))

    def run_with_cache(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        names: NameFilter = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """logits (B, T, V) and the activations at the hook points, by name:
        `logits, cache = model.run_with_cache(ids)`, then e.g.
        `cache["blocks.0.hook_resid_post"]` (B, T, C) or `cache["blocks.0.attn.hook_pattern"]`
        (B, H, T, T). See tformer.nn.capture."""
        return run_with_cache(self, input_ids, attention_mask, names=names)

    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> the final, normalised residual stream (B, T, C).

        The arguments are forward's. Generation calls this and then `unembed` on the last
        position only: a prompt's other positions need no logits.
        """
        past = caches[0].length if caches is not None else 0
        self.check_input(input_ids, position_ids, past)
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"need one KV cache per block ({len(self.blocks)}), got {len(caches)}")
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device).unsqueeze(0)
        x = self.token_embedding(input_ids) + self.position_embedding(position_ids)  # (B, T, C)
        x = self.embedding_dropout(x)
        recompute = self.activation_checkpointing and self.training
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            x = run_layer(block, x, attention_mask, cache, checkpointed=recompute)
        return self.final_norm(x)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> logits (..., V). The output head is the token embedding itself (weight
        tying); fast decoding puts a packed copy of it in `packed_head`."""
        if self.packed_head is not None:
            return self.packed_head(x)
        return nn.functional.linear(x, self.token_embedding.weight)

    def new_caches(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> list[KVCache]:
        """One empty, preallocated KV cache per block."""
        c, w = self.config, self.token_embedding.weight
        return [
            KVCache(
                batch_size,
                c.n_heads,
                max_len or c.max_len,
                c.d_model // c.n_heads,
                dtype or w.dtype,
                w.device,
            )
            for _ in self.blocks
        ]

    def generate(
        self,
        prompts: torch.Tensor | list[list[int]],
        config: "SamplingConfig | None" = None,
        num_samples: int = 1,
    ) -> list[list[int]]:
        """Continue prompts: token ids (B, T) or (T,), or lists of ids of different lengths.

        Returns the new token ids of num_samples continuations per prompt, prompt by prompt.
        config: the sampling controls (tformer.generate.SamplingConfig); by default sampling
        at temperature 1 for 50 tokens, stopping at this model's end-of-text token. The
        decoding itself lives in tformer.generate (KV cache, samplers, batching).
        """
        from tformer.generate.decode import SamplingConfig, generate

        if config is None:
            config = SamplingConfig(eos_token_id=self.config.eos_token_id)
        if isinstance(prompts, torch.Tensor):
            prompts = (prompts[None] if prompts.dim() == 1 else prompts).tolist()
        return generate(self, prompts, config, num_samples)

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        dropout: float | None = None,
        attention: Implementation | None = None,
    ) -> "GPT2":
        """Load a GPT-2 checkpoint in the Hugging Face layout: a local directory with
        config.json and model.safetensors (or pytorch_model.bin), or a Hub name such as
        'gpt2' when the network allows; or a LoRA adapter directory (PEFT's layout), which
        loads the base model it names with the adapters on it. `dropout` (every dropout of
        the model) and `attention` replace the saved settings, e.g. for fine-tuning; the
        weights are the same either way."""
        from tformer.models.adapters import is_adapter, load_adapted_gpt2
        from tformer.models.checkpoints import load_gpt2, name_or_path, resolve_checkpoint

        directory = resolve_checkpoint(path_or_name)
        if is_adapter(directory):
            settings = dict(dropout=dropout, attention=attention)
            return load_adapted_gpt2(directory, dtype, device, **settings)
        model = load_gpt2(directory, dtype, device, dropout=dropout, attention=attention)
        model.name_or_path = name_or_path(path_or_name, directory)
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors in the Hugging Face layout, atomically;
        `transformers.GPT2LMHeadModel.from_pretrained(directory)` loads the result. A model
        with LoRA layers saves its adapters alone, as PEFT does (tformer.models.adapters),
        naming the checkpoint it was loaded from as their base."""
        from tformer.models.adapters import save_adapter
        from tformer.models.checkpoints import save_gpt2

        if lora_layers(self):
            save_adapter(self, directory, base=base_of_adapters(self))
            return
        save_gpt2(self, directory)


def base_of_adapters(model: nn.Module) -> str:
    """The checkpoint a model with LoRA layers was loaded from, which its saved adapters
    name as their base."""
    if model.name_or_path is None:
        raise ValueError(
            "this model has LoRA layers but was not loaded from a checkpoint, so its adapters "
            "cannot name their base: save the base model and load it with from_pretrained "
            "before adding LoRA, or merge the layers (tformer.nn.lora.merge_lora)"
        )
    return model.name_or_path
