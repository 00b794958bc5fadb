"""GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners").

A decoder-only Transformer:

    h_0 = E[x] + P[0..T-1]                      token + learned position embeddings
    h_l = Block(h_{l-1}),  l = 1..n_layers      pre-LN blocks:
            r = h + Attn(LN_1(h))               causal multi-head self-attention
            h = r + MLP(LN_2(r))                GELU (tanh) feed-forward, d_ff = 4 C
    logits = lm_head(LN_f(h_L)) = LN_f(h_L) E^T  final LayerNorm; head tied to the embedding

The norm placement and the residual are the sublayer connection's switches, so the same
model also runs as post-LN or without norms (the final LayerNorm exists only for pre-LN,
whose residual stream is otherwise never normalised: tformer.nn.sublayer.final_norm). Only
the pre-LN form is GPT-2 and can be saved in the Hugging Face layout (gpt2_layout).

The output head `lm_head` is an nn.Linear whose weight is the token embedding's own
Parameter (weight tying): one tensor, counted once, updated once. Generation lives outside
the model (tformer.generate): the model computes logits for positions, given KV caches.

Initialisation (one place, `init_weights`; GPT2Config.init):
    "gpt2"     every weight matrix and embedding ~ N(0, 0.02), biases 0, LayerNorm gains 1;
               the two projections that write into the residual stream in each block
               (attention output, second MLP layer) ~ N(0, 0.02 / sqrt(2 n_layers)), so
               that the stream's variance does not grow with depth.
    "vaswani"  the original Transformer's (tformer.nn.init): Xavier-uniform matrices,
               U(-b, b) with b = sqrt(6 / (fan_in + fan_out)), W^Q, W^K, W^V with the bound
               of one stacked (3C, C) matrix, sqrt(6 / 4C), as torch.nn.MultiheadAttention
               and fairseq draw them; embeddings ~ N(0, 1/C), token vectors multiplied by
               sqrt(C) (scale_embeddings); nothing scaled by depth. The residual / LayerNorm
               lab uses it, with sinusoidal positions, as Xiong et al. (2020) did.
    "xavier"   as "vaswani" but W^Q, W^K, W^V each with its own C x C bound, sqrt(6 / 2C),
               and token vectors not scaled: the lab's initialisation before "vaswani",
               kept so that its earlier figures can be reproduced.
Neither changes which tensors a checkpoint holds. Scaled token vectors and sinusoidal
positions (positions="sinusoidal": tformer.nn.embedding) change what the model computes:
such a model is not GPT-2, and has no Hugging Face or GGUF layout.
"""

import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from tformer.checkpoints import (
    CheckpointError,
    name_or_path,
    peft,
    read_tensors,
    resolve_checkpoint,
    write_model,
)
from tformer.checkpoints.gguf import is_gguf
from tformer.models import gpt2_adapters, gpt2_gguf
from tformer.models.common import count_parameters, from_state, switch_attention
from tformer.models.gpt2_config import PRESETS, GPT2Config
from tformer.models.gpt2_decode import FusedDecoding
from tformer.models.gpt2_layout import (
    check_hf_architecture,
    config_to_hf,
    load_config,
    state_dict_from_hf,
    state_dict_to_hf,
)
from tformer.nn import (
    Dropout,
    FeedForward,
    HookPoint,
    KVCache,
    LayerNorm,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    SinusoidalPositionalEncoding,
    SublayerConnection,
    TokenEmbedding,
    block_step,
    row_blocks,
)
from tformer.nn.attention import Implementation
from tformer.nn.blocked_attention import any_hooked, hook_dicts
from tformer.nn.capture import NameFilter, run_with_cache
from tformer.nn.checkpointing import run_layer
from tformer.nn.embedding import TiedTable, links_tied_gradients
from tformer.nn.head_product import (
    forward_path,
    head_product,
    may_slice,
    plain_head,
    takes_product,
)
from tformer.nn.init import init_attention_xavier, init_embedding
from tformer.nn.lora import lora_layers
from tformer.nn.norm import add_then_norm
from tformer.nn.packed_linear import packed_layers
from tformer.nn.seeding import seeded_generator
from tformer.nn.slot_cache import SlotCache
from tformer.nn.sublayer import final_norm
from tformer.tokenizers import Tokenizer

__all__ = ["GPT2", "PRESETS", "Block", "GPT2Config"]


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
        if block_step.takes(self, x, attention_mask, cache):  # a small model's training step
            return block_step.run(self, x)  # one autograd node (nn/block_step.py)
        x = self.hook_resid_pre(x)

        def attend(h: torch.Tensor) -> torch.Tensor:
            return self.hook_attn_out(self.attn(h, attention_mask=attention_mask, cache=cache))

        def feed_forward(h: torch.Tensor) -> torch.Tensor:
            return self.hook_mlp_out(self.mlp(h))

        if self.attn_sublayer.joins(self.mlp_sublayer) and self.no_hook_skipped():
            # resid_mid = x + Dropout(Attn(LN_1(x))) and LN_2(resid_mid) in one step where
            # the kernels take it (nn/norm.py's add_then_norm)
            y = self.attn_sublayer.branch(x, attend)
            joined = add_then_norm(x, y, self.mlp_sublayer.norm)
            if joined is not None:
                mid, normed = joined
                return self.hook_resid_post(mid + self.mlp_sublayer.dropout(feed_forward(normed)))
            x = self.hook_resid_mid(x + y)
        else:
            x = self.hook_resid_mid(self.attn_sublayer(x, attend))
        x = self.mlp_sublayer(x, feed_forward)
        return self.hook_resid_post(x)

    def no_hook_skipped(self) -> bool:
        """Whether no hook, forward or backward, their own or global, would miss a module
        that the joined step does not call: the two sublayer modules (called through their
        parts), resid_mid's hook point, the second norm."""
        skipped = (self.attn_sublayer, self.mlp_sublayer, self.hook_resid_mid)
        skipped += (self.mlp_sublayer.norm,)
        if any_hooked(hook_dicts(skipped)):
            return False
        if any(m._backward_hooks or m._backward_pre_hooks for m in skipped):
            return False
        global_backward = module_hooks._global_backward_hooks
        return not (global_backward or module_hooks._global_backward_pre_hooks)


class GPT2(nn.Module):
    """GPT-2 language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: GPT2Config, seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        self.token_embedding = TokenEmbedding(c.vocab_size, c.d_model, scale=c.scale_embeddings)
        self.position_embedding = (
            SinusoidalPositionalEncoding(c.max_len, c.d_model)
            if c.positions == "sinusoidal"
            else LearnedPositionalEmbedding(c.max_len, c.d_model)
        )
        self.embedding_dropout = Dropout(c.embedding_dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.final_norm = final_norm(c.d_model, c.norm_position, c.layer_norm_eps)
        # The output head: the token embedding's Parameter itself (weight tying). Made on the
        # meta device, so that building it neither allocates nor draws random numbers.
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False, device="meta")
        self.tie_weights()
        self.fused_decoding: FusedDecoding | None = None  # set by fuse_decoding, once packed
        # A state dict holds the head under both names; one without it (written before the
        # head was a module) loads too, and loading by assignment is tied again afterwards.
        self.register_load_state_dict_pre_hook(_fill_tied_head)
        self.register_load_state_dict_post_hook(_tie_after_loading)
        self.activation_checkpointing = False  # see set_activation_checkpointing
        # The checkpoint these weights came from (from_pretrained): LoRA adapters trained on
        # them name it as their base when saved.
        self.name_or_path: str | None = None
        self.init_weights(seed)

    def tie_weights(self) -> None:
        """Make the output head's weight the token embedding's Parameter again (after
        loading by assignment, which gives each name its own Parameter)."""
        if type(self.lm_head) is nn.Linear:  # not once packed for decoding
            self.lm_head.weight = self.token_embedding.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """config.init's initialisation (see the module's docstring); the same seed gives
        the same weights."""
        device = self.token_embedding.weight.device
        if device.type == "meta":
            return
        g = seeded_generator(seed, device)
        if self.config.init in ("vaswani", "xavier"):
            self.init_xavier(g, stacked_qkv=self.config.init == "vaswani")
            return
        std = self.config.init_std
        for module in self.modules():
            if module is self.lm_head:  # the token embedding, drawn as such
                continue
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

    def init_xavier(self, g: torch.Generator, stacked_qkv: bool) -> None:
        for block in self.blocks:
            init_attention_xavier(block.attn.weight_blocks(), g, stacked=stacked_qkv)
            for linear in (block.mlp.w1, block.mlp.w2):
                nn.init.xavier_uniform_(linear.weight, generator=g)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, (TokenEmbedding, LearnedPositionalEmbedding)):
                init_embedding(module.weight, g)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_attention(self, implementation: Implementation) -> None:
        """Run attention on the explicit, fused or blocked path from now on (see
        tformer.nn.attention.set_implementation); the config records the choice."""
        switch_attention(self, implementation)

    def layers(self) -> list[nn.Module]:
        """The repeated blocks: the units of activation checkpointing and of FSDP sharding."""
        return list(self.blocks)

    def set_activation_checkpointing(self, on: bool = True) -> None:
        """While training, keep only each block's input and recompute the rest in the
        backward pass (tformer.nn.checkpointing): less memory, ~1/3 more compute."""
        self.activation_checkpointing = on

    def num_parameters(self) -> int:
        """Trainable parameters, the tied embedding/head counted once."""
        return count_parameters(self)

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
            # one pass, and one wait for a GPU's result (a sync per forward pass)
            low, high = torch.stack(torch.aminmax(input_ids)).tolist()
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
            if position_ids.numel() > 0:
                low, high = torch.stack(torch.aminmax(position_ids)).tolist()
                if not 0 <= low <= high < max_len:
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
        tied = self.tied_table()
        h = self.features(input_ids, attention_mask, position_ids, caches, tied=tied)
        return self.unembed(h, tied=tied)

    def tied_table(self) -> TiedTable | None:
        """A TiedTable of the token embedding for one forward pass, where the lookup's rows
        are added into the head's gradient in place (nn/embedding.py): a training step on
        the CPU under half-precision autocast, with the head tied and large enough to
        gain, and head_product's to take. Else None: the plain lookup and head."""
        w, head = self.token_embedding.weight, self.lm_head
        if head.weight is w and links_tied_gradients(w) and may_slice(w) and plain_head(head):
            return TiedTable(w)
        return None

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
        tied: TiedTable | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> the final, normalised residual stream (B, T, C).

        The arguments are forward's. Generation calls this and then `unembed` on the last
        position only: a prompt's other positions need no logits. tied: the forward pass's
        TiedTable (tied_table), for a caller that also runs `unembed` with it.
        """
        past = caches[0].length if caches is not None else 0
        self.check_input(input_ids, position_ids, past)
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"need one KV cache per block ({len(self.blocks)}), got {len(caches)}")
        fused = self.fused_decoding
        if fused is not None and fused.applies(
            self, input_ids, attention_mask, position_ids, caches
        ):
            return fused.features(self, input_ids, caches)  # models/gpt2_decode.py
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device).unsqueeze(0)
        tokens = self.token_embedding(input_ids, tied=tied)  # (B, T, C)
        x = tokens + self.position_embedding(position_ids)
        x = self.embedding_dropout(x)
        recompute = self.activation_checkpointing and self.training
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            x = run_layer(block, x, attention_mask, cache, checkpointed=recompute)
        return self.final_norm(x)

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half() and the like replace the tensors whose addresses the fused
        # step holds: it is dropped, and fuse_decoding makes it again if wanted
        self.fused_decoding = None
        return super()._apply(fn, recurse)

    def fuse_decoding(self) -> bool:
        """Once packed for decoding with the C kernels: run each one-token decoding step's
        blocks in one kernel call (models/gpt2_decode.py). Returns whether it can."""
        self.fused_decoding = FusedDecoding.for_model(self)
        return self.fused_decoding is not None

    def unembed(self, x: torch.Tensor, tied: TiedTable | None = None) -> torch.Tensor:
        """(..., C) -> logits (..., V) = x E^T: the output head, tied to the token embedding.

        A training step on the CPU takes nn/head_product.py's path: with `tied` (the
        forward pass's TiedTable), or where this CPU computes a large vocabulary's product
        faster in slices or (float32) as oneDNN's, as timed there once. The same products:
        only the order of sums may differ (the matmul's own, and the tied table's rows of
        repeated tokens)."""
        head = self.lm_head
        if takes_product(head, x):
            path = forward_path(x, head.weight)
            if path != "whole" or tied is not None:
                return head_product(x, head.weight, tied, path)  # (..., V)
        return row_blocks.linear(head, x)  # without gradients, float32: oneDNN's where faster

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

    def new_slot_caches(self, slots: int, dtype: torch.dtype | None = None) -> list[SlotCache]:
        """One empty slot cache per block: `slots` sequences of up to max_len positions, each
        with its own length (nn/slot_cache.py; a server's continuous batching)."""
        c, w = self.config, self.token_embedding.weight
        d_head = c.d_model // c.n_heads
        return [
            SlotCache(slots, c.n_heads, c.max_len, d_head, dtype or w.dtype, w.device)
            for _ in self.blocks
        ]

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
        weights are the same either way. A GGUF file (llama.cpp's, GPT-2's architecture)
        loads too, its quantised tensors dequantised: see from_gguf."""
        if is_gguf(Path(path_or_name).expanduser()):
            model, _ = cls.from_gguf(
                path_or_name, dtype, device, dropout=dropout, attention=attention
            )
            return model
        directory = resolve_checkpoint(path_or_name)
        if peft.is_adapter(directory):
            model = gpt2_adapters.load_base(
                lambda base: cls.from_pretrained(
                    base, dtype, device, dropout=dropout, attention=attention
                ),
                directory,
            )
            gpt2_adapters.load_adapter(model, model.config, directory)
            return model.eval()
        config = load_config(directory).with_settings(dropout, attention)
        model = cls.from_hf_tensors(config, read_tensors(directory), str(directory), dtype, device)
        model.name_or_path = name_or_path(path_or_name, directory)
        return model.eval()

    @classmethod
    def from_gguf(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        dropout: float | None = None,
        attention: Implementation | None = None,
    ) -> tuple["GPT2", Tokenizer]:
        """A GPT-2 GGUF file's model and tokenizer (models/gpt2_gguf.py): written by
        save_gguf or by llama.cpp's converter; quantised tensors come back dequantised.
        `dropout` and `attention` as in from_pretrained."""
        path = Path(path).expanduser()
        config, state, tokenizer = gpt2_gguf.read_gpt2_gguf(path)
        config = config.with_settings(dropout, attention)
        model = from_state(lambda: cls(config), state, device, dtype)
        model.name_or_path = str(path.resolve())
        return model.eval(), tokenizer

    def save_gguf(
        self,
        path: str | os.PathLike,
        tokenizer: Tokenizer,
        type_name: str = "f32",
        approximate_gelu: bool = False,
        progress=None,
    ) -> None:
        """Write the model and its tokenizer as one GGUF file that llama.cpp runs, its weight
        matrices as `type_name` (f32, f16, bf16, q8_0, q4_0); see models/gpt2_gguf.py for
        the layout and what llama.cpp cannot compute (refused, with the reason)."""
        self.check_plain_weights()
        gpt2_gguf.write_gpt2_gguf(
            path, self.config, self.state_dict(), tokenizer, type_name, approximate_gelu,
            progress,
        )  # fmt: skip

    @classmethod
    def from_hf_tensors(
        cls,
        config: GPT2Config,
        tensors: dict[str, torch.Tensor],
        source: str,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> "GPT2":
        """A model with the weights of GPT-2 tensors in Hugging Face naming; nothing is
        initialised or allocated twice."""
        with torch.device("meta"):
            shapes = {name: tuple(t.shape) for name, t in cls(config).state_dict().items()}
        state = state_dict_from_hf(tensors, config, shapes, source)
        return from_state(lambda: cls(config), state, device, dtype)

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """The weights in Hugging Face naming, refusing what that layout cannot hold."""
        self.check_plain_weights()
        return state_dict_to_hf(self.state_dict(), self.config)

    def check_plain_weights(self) -> None:
        """Refuse to write weights that are not the model's plain ones: packed for decoding,
        or with LoRA layers beside them."""
        if packed_layers(self):
            raise ValueError(
                "this model's weights were packed for decoding (tformer.generate.fast), which "
                "rounds them; save the model before packing it"
            )
        if lora_layers(self):
            raise ValueError(
                "this model has LoRA layers, which a checkpoint's layout cannot hold: merge "
                "them into the weights first (tformer.nn.lora.merge_lora), or save the "
                "adapters alone (GPT2.save_pretrained, tformer.models.adapters.save_adapter)"
            )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors in the Hugging Face layout, atomically;
        `transformers.GPT2LMHeadModel.from_pretrained(directory)` loads the result. A model
        with LoRA layers saves its adapters alone, as PEFT does (gpt2_adapters), naming the
        checkpoint it was loaded from as their base."""
        if lora_layers(self):
            base = gpt2_adapters.base_of_adapters(self.name_or_path)
            gpt2_adapters.save_adapter(self, self.config, directory, base)
            return
        tensors = self.hf_tensors()
        dtype = self.token_embedding.weight.dtype
        write_model(directory, tensors, config_to_hf(self.config, dtype))

    def load_weights(self, directory: str | os.PathLike) -> None:
        """Load, in place, the weights that save_pretrained wrote for a model like this one:
        the whole model's, or with LoRA layers the adapters' (into the existing layers)."""
        directory = Path(directory)
        if lora_layers(self):
            gpt2_adapters.load_adapter_weights(self, self.config, directory)
            return
        check_same_shape(self.config, load_config(directory), directory)
        shapes = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        tensors = read_tensors(directory)
        self.load_state_dict(state_dict_from_hf(tensors, self.config, shapes, str(directory)))


def check_same_shape(config: GPT2Config, saved: GPT2Config, directory: Path) -> None:
    """Refuse weights saved by a model of another shape or architecture."""
    check_hf_architecture(config)
    for name in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "d_ff", "activation"):
        if getattr(saved, name) != getattr(config, name):
            raise CheckpointError(
                f"{directory}: saved with {name}={getattr(saved, name)!r}, this model has "
                f"{getattr(config, name)!r}"
            )


def _fill_tied_head(
    module: GPT2,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """A state dict without the head's name (the head is the token embedding) loads."""
    embedding = prefix + "token_embedding.weight"
    if prefix + "lm_head.weight" not in state_dict and embedding in state_dict:
        state_dict[prefix + "lm_head.weight"] = state_dict[embedding]


def _tie_after_loading(module: GPT2, incompatible_keys: object) -> None:
    module.tie_weights()
