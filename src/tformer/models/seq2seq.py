"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

    source ids (B, S) ─ Embed·sqrt(C) + PE ─ Dropout ─ N x EncoderLayer ─────── memory (B, S, C)
                                                                                   │
    target ids (B, T) ─ Embed·sqrt(C) + PE ─ Dropout ─ N x DecoderLayer(memory) ─ logits (B, T, V)

    EncoderLayer:  x ─ [self-attention] ─ [feed-forward]
    DecoderLayer:  x ─ [causal self-attention] ─ [cross-attention over memory] ─ [feed-forward]

Each [sublayer] sits in a SublayerConnection: post-LN, LN(x + Dropout(F(x))), as in the paper
(sec. 5.4), or pre-LN, x + Dropout(F(LN(x))), with a final LayerNorm after each stack.
Embeddings are multiplied by sqrt(d_model) (sec. 3.4), the positions are the fixed
sinusoids (sec. 3.5), the activation is ReLU (sec. 3.3). The output projection is the target
embedding matrix (sec. 3.4, weight tying); with `share_embeddings` source and target also
share one embedding over a joint vocabulary.

The teacher-forced forward pass is for training: the target input is the target shifted
right (BOS first), the labels the target itself (EOS last). Decoding uses `encode` once and
then `decode` with a KV cache per decoder layer (tformer.generate.beam).

The layers' feed-forward parts and hook points have GPT-2's names (`mlp`, `mlp_sublayer`,
`hook_attn_out`, `hook_mlp_out`; the decoder also has `hook_cross_attn_out`); attention is
`self_attn`, beside the decoder's `cross_attn`. A checkpoint is
config.json (model_type "tformer-seq2seq", the Seq2SeqConfig's fields) and model.safetensors
(tformer's own tensor names; shared embeddings stored once). Checkpoints written before the
feed-forward sublayer was called `mlp` (`ff.`, `ff_sublayer.`) load too.
"""

import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from tformer.checkpoints import (
    CheckpointError,
    read_model_config,
    read_tensors,
    safetensor_names,
    write_model,
)
from tformer.checkpoints.hf import WEIGHTS_FILE
from tformer.checks import check_choice, check_number
from tformer.errors import ConfigError
from tformer.files import atomic_write_json
from tformer.models import seq2seq_marian as marian
from tformer.models.common import Model, count_parameters, from_state, switch_attention
from tformer.models.seq2seq_decode import FusedCrossDecoding
from tformer.nn import (
    Dropout,
    FeedForward,
    HookPoint,
    KVCache,
    LayerNorm,
    MultiHeadAttention,
    SinusoidalPositionalEncoding,
    SublayerConnection,
    TokenEmbedding,
)
from tformer.nn.attention import IMPLEMENTATIONS, Implementation
from tformer.nn.capture import NameFilter, run_with_cache
from tformer.nn.checkpointing import run_layer
from tformer.nn.feedforward import ACTIVATIONS, Activation
from tformer.nn.init import init_attention_xavier, init_embedding
from tformer.nn.packed_linear import packed_layers
from tformer.nn.seeding import seeded_generator
from tformer.nn.sublayer import NORM_POSITIONS, NormPosition, final_norm

MODEL_TYPE = "tformer-seq2seq"  # config.json's model_type for this model
INIT_GAIN = 0.5  # init "xavier-half": Xavier bounds halved (Seq2SeqTransformer.init_weights)
INITS = ("xavier-half", "vaswani")

# name -> (d_model, n_heads, layers per stack, d_ff, dropout)
PRESETS: dict[str, tuple[int, int, int, int, float]] = {
    "base": (512, 8, 6, 2048, 0.1),  # the paper's base model (Table 3)
    "small": (256, 4, 3, 1024, 0.1),  # trains on a CPU in minutes
}


@dataclass
class Seq2SeqConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    max_len: int = 256  # longest source or target sequence, in tokens
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1  # on every sublayer output and on the embedding sums (sec. 5.4)
    attention_dropout: float = 0.0  # on the attention weights (not in the paper)
    activation: Activation = "relu"
    norm_position: NormPosition = "post"
    residual: bool = True
    layer_norm_eps: float = 1e-5
    share_embeddings: bool = False  # one embedding for source and target (a joint vocabulary)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    attention: Implementation = "sdpa"
    init: str = "xavier-half"  # or "vaswani", the paper's (Seq2SeqTransformer.init_weights)

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "max_len", "d_model", "n_heads", "d_ff"):
            check_number(f"Seq2SeqConfig.{name}", getattr(self, name), integer=True, low=1)
        for name in ("n_encoder_layers", "n_decoder_layers"):
            check_number(f"Seq2SeqConfig.{name}", getattr(self, name), integer=True, low=0)
        for name in ("dropout", "attention_dropout"):
            check_number(
                f"Seq2SeqConfig.{name}", getattr(self, name), low=0.0, high=1.0, high_open=True
            )
        check_number("Seq2SeqConfig.layer_norm_eps", self.layer_norm_eps, low=0.0, low_open=True)
        for name in ("residual", "share_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"Seq2SeqConfig.{name} must be True or False, got {getattr(self, name)!r}"
                )
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        check_choice("Seq2SeqConfig.activation", self.activation, ACTIVATIONS)
        check_choice("Seq2SeqConfig.norm_position", self.norm_position, NORM_POSITIONS)
        check_choice("Seq2SeqConfig.attention", self.attention, IMPLEMENTATIONS)
        check_choice("Seq2SeqConfig.init", self.init, INITS)
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ConfigError(
                "share_embeddings needs one joint vocabulary: src_vocab_size "
                f"({self.src_vocab_size}) != tgt_vocab_size ({self.tgt_vocab_size})"
            )
        for name in ("pad_id", "bos_id", "eos_id"):
            check_number(f"Seq2SeqConfig.{name}", getattr(self, name), integer=True, low=0)
            if not getattr(self, name) < self.tgt_vocab_size:
                raise ConfigError(f"Seq2SeqConfig.{name} is outside the target vocabulary")

    @classmethod
    def from_preset(
        cls, name: str, src_vocab_size: int, tgt_vocab_size: int, **overrides
    ) -> "Seq2SeqConfig":
        """'base' (the paper's) or 'small' (3+3 layers, 256 wide), with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        d_model, n_heads, n_layers, d_ff, dropout = PRESETS[name]
        preset = dict(
            d_model=d_model,
            n_heads=n_heads,
            n_encoder_layers=n_layers,
            n_decoder_layers=n_layers,
            d_ff=d_ff,
            dropout=dropout,
        )
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown Seq2SeqConfig field(s): {', '.join(sorted(unknown))}")
        return cls(src_vocab_size, tgt_vocab_size, **{**preset, **overrides})

    def with_settings(
        self, dropout: float | None = None, attention: Implementation | None = None
    ) -> "Seq2SeqConfig":
        """This config with the sublayer and embedding dropout and the attention path
        replaced where given: settings that change how a model trains or runs, not its
        weights."""
        config = self
        if dropout is not None:
            config = replace(config, dropout=dropout)
        if attention is not None:
            config = replace(config, attention=attention)
        return config

    def to_dict(self) -> dict:
        return asdict(self)


def sublayer(c: Seq2SeqConfig) -> SublayerConnection:
    return SublayerConnection(c.d_model, c.norm_position, c.residual, c.dropout, c.layer_norm_eps)


def attention(c: Seq2SeqConfig, causal: bool = False, cross: bool = False) -> MultiHeadAttention:
    return MultiHeadAttention(
        c.d_model,
        c.n_heads,
        causal=causal,
        cross=cross,
        dropout=c.attention_dropout,
        implementation=c.attention,
    )


class EncoderLayer(nn.Module):
    """Self-attention over the source, then the feed-forward network: (B, S, C) -> (B, S, C).

    resid_pre ─[self-attention: attn_out]─ resid_mid ─[MLP: mlp_out]─ resid_post
    """

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.attn_sublayer = sublayer(config)
        self.self_attn = attention(config)
        self.mlp_sublayer = sublayer(config)
        self.mlp = FeedForward(config.d_model, config.d_ff, config.activation)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, S, C), src_mask (B, S) -> (B, S, C)."""
        x = self.hook_resid_pre(x)

        def attend(h: torch.Tensor) -> torch.Tensor:
            return self.hook_attn_out(self.self_attn(h, attention_mask=src_mask))

        x = self.hook_resid_mid(self.attn_sublayer(x, attend))
        x = self.mlp_sublayer(x, lambda h: self.hook_mlp_out(self.mlp(h)))
        return self.hook_resid_post(x)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the memory, feed-forward: (B, T, C).

    resid_pre ─[self-attention: attn_out]─ resid_mid ─[cross-attention: cross_attn_out]─
        resid_cross ─[MLP: mlp_out]─ resid_post
    """

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.self_attn_sublayer = sublayer(config)
        self.self_attn = attention(config, causal=True)
        self.cross_attn_sublayer = sublayer(config)
        self.cross_attn = attention(config, cross=True)
        self.mlp_sublayer = sublayer(config)
        self.mlp = FeedForward(config.d_model, config.d_ff, config.activation)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()  # after self-attention
        self.hook_cross_attn_out = HookPoint()
        self.hook_resid_cross = HookPoint()  # after cross-attention
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        src_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, T, C), memory (B, S, C), src_mask (B, S) -> (B, T, C).

        memory_kv: the cross-attention keys and values of the memory, when precomputed.
        """
        x = self.hook_resid_pre(x)
        x = self.self_attn_sublayer(x, lambda h: self.hook_attn_out(self.self_attn(h, cache=cache)))
        x = self.hook_resid_mid(x)

        def cross(h: torch.Tensor) -> torch.Tensor:
            if memory_kv is not None:
                out = self.cross_attn(h, attention_mask=src_mask, memory_kv=memory_kv)
            else:
                out = self.cross_attn(h, memory=memory, attention_mask=src_mask)
            return self.hook_cross_attn_out(out)

        x = self.hook_resid_cross(self.cross_attn_sublayer(x, cross))
        x = self.mlp_sublayer(x, lambda h: self.hook_mlp_out(self.mlp(h)))
        return self.hook_resid_post(x)


# Tensor names of checkpoints written before the feed-forward sublayer was called `mlp`.
OLD_NAMES = re.compile(r"(^|\.)(encoder_layers|decoder_layers)\.(\d+)\.ff(_sublayer)?\.")


def current_name(name: str) -> str:
    """'encoder_layers.0.ff.w1.weight' -> 'encoder_layers.0.mlp.w1.weight', and likewise
    `ff_sublayer` -> `mlp_sublayer`; other names as they are."""
    return OLD_NAMES.sub(r"\1\2.\3.mlp\4.", name)


def upgrade_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under today's names (current_name)."""
    return {current_name(name): t for name, t in state.items()}


def load_weights_into(
    module: nn.Module,
    config: "Seq2SeqConfig",
    directory: Path,
    model_type: str,
    wrong_type: str,
    prefix: str = "",
) -> None:
    """Load, in place, the weights of a tformer checkpoint of `model_type` into `module`,
    refusing one of another shape; `prefix` is where the Transformer's tensors sit."""
    _, saved = read_config(directory, (model_type,), wrong_type)
    check_same_shape(config, config_from_saved(saved), directory)
    try:
        module.load_state_dict(read_state(directory, config.share_embeddings, prefix=prefix))
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: cannot load model.safetensors ({e})") from None


def read_config(directory: Path, model_types: tuple[str, ...], what: str) -> tuple[str, dict]:
    """A tformer checkpoint's model_type and config.json, refusing any other model_type."""
    saved = read_model_config(directory)
    kind = saved.get("model_type")
    if kind not in model_types:
        raise CheckpointError(f"{directory}: {what} (model_type {kind!r})")
    return kind, saved


def config_from_saved(saved: dict) -> Seq2SeqConfig:
    """The Seq2SeqConfig in a config.json (other keys, such as model_type, left out)."""
    known = {f.name for f in fields(Seq2SeqConfig)}
    return Seq2SeqConfig(**{k: v for k, v in saved.items() if k in known})


def read_state(
    directory: Path, share_embeddings: bool, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """model.safetensors of a tformer checkpoint, by today's names; a shared embedding,
    stored once, under both of its names."""
    if any(
        key.endswith("self_attn.w_k.weight") for key in safetensor_names(directory / WEIGHTS_FILE)
    ):
        raise CheckpointError(
            f"{directory}: saved by an earlier tformer that kept attention's W^Q, W^K, W^V "
            "as separate matrices; this version stores them stacked (self_attn.w_qkv, "
            "cross_attn.w_q + w_kv). Train the model again with this version"
        )
    state = upgrade_names(read_tensors(directory))
    if share_embeddings:  # one module under two names
        src, tgt = prefix + "src_embedding.weight", prefix + "tgt_embedding.weight"
        shared = state.get(src, state.get(tgt))
        if shared is not None:
            state[src] = state[tgt] = shared
    return state


def state_to_save(
    model: nn.Module, share_embeddings: bool, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The model's tensors for model.safetensors: a shared embedding once, under its source
    name."""
    state = model.state_dict()
    if share_embeddings:
        del state[prefix + "tgt_embedding.weight"]
    return state


class Seq2SeqTransformer(nn.Module):
    """Source ids (B, S) and target input ids (B, T) -> next-target-token logits (B, T, V)."""

    def __init__(self, config: Seq2SeqConfig, seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        self.tgt_embedding = TokenEmbedding(c.tgt_vocab_size, c.d_model, scale=True)
        self.src_embedding = (
            self.tgt_embedding
            if c.share_embeddings
            else TokenEmbedding(c.src_vocab_size, c.d_model, scale=True)
        )
        self.positions = SinusoidalPositionalEncoding(c.max_len, c.d_model)
        self.embedding_dropout = Dropout(c.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.n_decoder_layers))
        self.encoder_norm = final_norm(c.d_model, c.norm_position, c.layer_norm_eps)
        self.decoder_norm = final_norm(c.d_model, c.norm_position, c.layer_norm_eps)
        self.activation_checkpointing = False  # see set_activation_checkpointing
        self.fused_decoding: FusedCrossDecoding | None = None  # fuse_decoding, once packed
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Xavier-uniform matrices, zero biases, LayerNorm gains 1, embeddings N(0, 1/d_model),
        so that after the sqrt(d_model) scaling a token vector has unit-variance entries, like
        the sinusoids it is added to (tformer.nn.init). Xavier's bound is
        sqrt(6 / (fan_in + fan_out)); config.init chooses how it is applied:

            "vaswani"      the paper's, as torch.nn.MultiheadAttention and fairseq draw it:
                           W^Q, W^K, W^V with the bound of one stacked (3C, C) matrix,
                           sqrt(6 / 4C); every other matrix with its own bound
            "xavier-half"  (the default) every matrix, W^Q, W^K, W^V each as C x C, with half
                           its own bound: each post-LN sublayer starts small next to the
                           residual stream it is added to, which trained faster than the
                           full per-matrix bound or GPT-2's and Marian's N(0, 0.02^2)
                           (measured: docs/LOG.md; not compared with "vaswani")"""
        device = self.tgt_embedding.weight.device
        if device.type == "meta":
            return
        g = seeded_generator(seed, device)
        stacked = self.config.init == "vaswani"
        gain = 1.0 if stacked else INIT_GAIN

        done: set[nn.Module] = set()
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                # W^Q, W^K, W^V are C x C matrices even where they are stored stacked.
                init_attention_xavier(module.weight_blocks(), g, stacked=stacked, gain=gain)
                for linear in module.children():
                    if isinstance(linear, nn.Linear):
                        if linear.bias is not None:
                            nn.init.zeros_(linear.bias)
                        done.add(linear)
            elif isinstance(module, nn.Linear) and module not in done:
                nn.init.xavier_uniform_(module.weight, gain=gain, generator=g)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, TokenEmbedding):
                init_embedding(module.weight, g)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_attention(self, implementation: Implementation) -> None:
        """Run attention on the explicit, fused or blocked path from now on (see
        tformer.nn.attention.set_implementation); the config records the choice."""
        switch_attention(self, implementation)

    def layers(self) -> list[nn.Module]:
        """The encoder's and the decoder's layers: the units of activation checkpointing and
        of FSDP sharding."""
        return [*self.encoder_layers, *self.decoder_layers]

    def set_activation_checkpointing(self, on: bool = True) -> None:
        """While training, keep only each layer's input and recompute the rest in the
        backward pass (tformer.nn.checkpointing): less memory, ~1/3 more compute."""
        self.activation_checkpointing = on

    def num_parameters(self) -> int:
        """Trainable parameters, shared embeddings counted once."""
        return count_parameters(self)

    def check_ids(self, ids: torch.Tensor, vocab_size: int, what: str, offset: int = 0) -> None:
        if ids.dim() != 2:
            raise ValueError(f"{what} ids must have shape (batch, time), got {tuple(ids.shape)}")
        if offset + ids.shape[1] > self.config.max_len:
            raise ValueError(
                f"{what} of {offset + ids.shape[1]} tokens is longer than max_len "
                f"({self.config.max_len}); shorten it or build the model with a larger max_len"
            )
        if ids.numel() > 0 and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
            raise ValueError(f"{what} token ids lie outside the vocabulary (0..{vocab_size - 1})")

    def embed(self, embedding: TokenEmbedding, ids: torch.Tensor, offset: int) -> torch.Tensor:
        """ids (B, T) at positions offset.. -> Dropout(E[ids] sqrt(C) + PE[pos]), (B, T, C)."""
        positions = torch.arange(offset, offset + ids.shape[1], device=ids.device)
        return self.embedding_dropout(embedding(ids) + self.positions(positions))

    def source_mask(self, src_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) True at real source tokens, False at padding."""
        return src_ids != self.config.pad_id

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S) -> memory (B, S, C). src_mask defaults to the non-pad tokens."""
        self.check_ids(src_ids, self.config.src_vocab_size, "source")
        if src_mask is None:
            src_mask = self.source_mask(src_ids)
        x = self.embed(self.src_embedding, src_ids, 0)
        recompute = self.activation_checkpointing and self.training
        for layer in self.encoder_layers:
            x = run_layer(layer, x, src_mask, checkpointed=recompute)
        return self.encoder_norm(x)

    def decode(
        self,
        tgt_ids: torch.Tensor,
        memory: torch.Tensor,
        src_mask: torch.Tensor,
        caches: list[KVCache] | None = None,
        memory_kvs: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Target ids (B, T) after the cached ones, memory (B, S, C) -> features (B, T, C).

        caches: one self-attention KVCache per decoder layer; memory_kvs: the layers'
        cross-attention keys and values from `project_memory`, computed once per sentence.
        With memory_kvs, memory and src_mask may hold one row per sentence for G
        consecutive target rows each (N = B / G rows; beam search's G beams of a sentence).
        Target padding needs no mask: it is on the right, where causal attention keeps every
        real position from seeing it, and the loss ignores the padded positions themselves.
        """
        past = caches[0].length if caches is not None else 0
        self.check_ids(tgt_ids, self.config.tgt_vocab_size, "target", past)
        fused = self.fused_decoding
        if fused is not None and fused.applies(self, tgt_ids, src_mask, caches, memory_kvs):
            return fused.features(self, tgt_ids, src_mask, caches, memory_kvs)  # seq2seq_decode
        x = self.embed(self.tgt_embedding, tgt_ids, past)
        recompute = self.activation_checkpointing and self.training
        for i, layer in enumerate(self.decoder_layers):
            cache = caches[i] if caches is not None else None
            memory_kv = memory_kvs[i] if memory_kvs is not None else None
            x = run_layer(layer, x, memory, src_mask, cache, memory_kv, checkpointed=recompute)
        return self.decoder_norm(x)

    def _apply(self, fn, recurse=True):
        # .to(), .half() and the like replace the tensors whose addresses the fused step
        # holds: it is dropped, and fuse_decoding makes it again if wanted
        self.fused_decoding = None
        return super()._apply(fn, recurse)

    def fuse_decoding(self) -> bool:
        """Once packed for decoding with the C kernels: run each one-token decoding step's
        decoder layers in one kernel call (models/seq2seq_decode.py). Returns whether it
        can."""
        self.fused_decoding = FusedCrossDecoding.for_model(self)
        return self.fused_decoding is not None

    def packed_outside_modules(self) -> dict[str, nn.Module]:
        """The packed output projection of the fused decoding step, which is no module of
        the model, for the kernels' calibration (nn.packed_linear.packed_layers)."""
        fused = self.fused_decoding
        return {"fused_decoding.head": fused.head} if fused is not None else {}

    def project_memory(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention keys and values (B, H, S, D) of the memory."""
        return [layer.cross_attn.project_memory(memory) for layer in self.decoder_layers]

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> logits (..., V): the target embedding matrix as the output projection
        (once packed for decoding, its packed copy where no gradient is recorded)."""
        fused = self.fused_decoding
        if fused is not None and not torch.is_grad_enabled() and x.device.type == "cpu":
            return fused.head(x)  # seq2seq_decode
        return nn.functional.linear(x, self.tgt_embedding.weight)

    def forward(
        self,
        src_ids: torch.Tensor,
        tgt_ids: torch.Tensor,
        src_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher forcing: source (B, S), target input (B, T) -> logits (B, T, V)."""
        return self.unembed(self.features(src_ids, tgt_ids, src_mask))

    def features(
        self,
        src_ids: torch.Tensor,
        tgt_ids: torch.Tensor,
        src_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher forcing up to the decoder's output (B, T, C), before the unembedding."""
        if src_mask is None:
            src_mask = self.source_mask(src_ids)
        memory = self.encode(src_ids, src_mask)
        return self.decode(tgt_ids, memory, src_mask)

    def run_with_cache(
        self, src_ids: torch.Tensor, tgt_ids: torch.Tensor, names: NameFilter = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher-forced logits (B, T, V) and the activations at the hook points, by name
        (e.g. `decoder_layers.0.cross_attn.hook_pattern`, (B, H, T, S)); see
        tformer.nn.capture."""
        return run_with_cache(self, src_ids, tgt_ids, names=names)

    def new_caches(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """One empty self-attention KV cache per decoder layer."""
        c, w = self.config, self.tgt_embedding.weight
        return [
            KVCache(
                batch_size,
                c.n_heads,
                max_len or c.max_len,
                c.d_model // c.n_heads,
                w.dtype,
                w.device,
                zeroed=False,  # the decoder reads its cache up to its length only
            )
            for _ in self.decoder_layers
        ]

    def save_pretrained(
        self, directory: str | os.PathLike, format: str = "tformer", tokenizer=None
    ) -> None:
        """config.json and model.safetensors, each written atomically: tformer's own
        (model_type "tformer-seq2seq"; shared embeddings stored once), or with
        format="marian" a Hugging Face MarianMTModel that transformers and CTranslate2 load
        (tformer.models.seq2seq_marian; a post-LN model only), with generation_config.json
        and, given the model's tokenizer (a Hugging Face `tokenizers` one), its
        tokenizer.json renumbered as the model is."""
        if format == "tformer":
            state = state_to_save(self, self.config.share_embeddings)
            write_model(directory, state, {"model_type": MODEL_TYPE, **asdict(self.config)})
            return
        if format != "marian":
            raise ValueError(f"format {format!r}: 'tformer' or 'marian'")
        c = self.config
        if packed_layers(self):
            raise ValueError("this model is packed for decoding; export the model as loaded")
        files = {}
        if tokenizer is not None:  # checked before anything is written
            if not hasattr(tokenizer, "tokenizer") or not hasattr(tokenizer.tokenizer, "to_str"):
                raise ValueError(
                    f"a {type(tokenizer).__name__} has no tokenizer.json; a Marian directory "
                    "takes a Hugging Face `tokenizers` tokenizer (a BPE trained here)"
                )
            if tokenizer.vocab_size > c.tgt_vocab_size:
                raise ValueError(
                    f"the tokenizer has {tokenizer.vocab_size} tokens, the model "
                    f"{c.tgt_vocab_size}: they do not belong together"
                )
            order = marian.vocabulary_order(c.tgt_vocab_size, c.pad_id)
            files = marian.marian_tokenizer_files(
                tokenizer.tokenizer.to_str(), order, c.eos_id, c.bos_id, c.pad_id, c.max_len
            )
        state = {k: v.detach().float().cpu() for k, v in self.state_dict().items()}
        fields, tensors = marian.to_marian(c, state)
        write_model(directory, tensors, fields)
        atomic_write_json(Path(directory) / "generation_config.json",
                          marian.generation_fields(fields))  # fmt: skip
        for name, data in files.items():
            atomic_write_json(Path(directory) / name, data)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: torch.device | str = "cpu"
    ) -> "Seq2SeqTransformer":
        """A model saved by save_pretrained, either format (a Marian directory written by
        transformers too, where tformer's model can compute it)."""
        directory = Path(directory)
        saved = read_model_config(directory)
        if marian.is_marian(saved):  # transformers' MarianMTModel (seq2seq_marian)
            fields = marian.config_fields_from_marian(saved, str(directory))
            config = Seq2SeqConfig(**fields)
            state = marian.from_marian(fields, read_tensors(directory), str(directory))
            model = load_state(lambda: cls(config), state, device, directory)
            model.positions = sinusoids(config, device)
            return model.eval()
        _, saved = read_config(directory, (MODEL_TYPE,), WRONG_TYPE)
        config = config_from_saved(saved)
        state = read_state(directory, config.share_embeddings)
        model = load_state(lambda: cls(config), state, device, directory)
        model.positions = sinusoids(config, device)
        return model.eval()

    @staticmethod
    def current_name(name: str) -> str:
        """A parameter's name today, given the one an earlier version saved it under (an
        old run's optimizer state is keyed by such names)."""
        return current_name(name)

    def load_weights(self, directory: str | os.PathLike) -> None:
        """Load, in place, the weights that save_pretrained wrote for a model like this one."""
        load_weights_into(self, self.config, Path(directory), MODEL_TYPE, WRONG_TYPE)


WRONG_TYPE = f"not an encoder-decoder tformer checkpoint (expected model_type {MODEL_TYPE!r})"
SHAPE_FIELDS = (
    "src_vocab_size",
    "tgt_vocab_size",
    "d_model",
    "n_heads",
    "n_encoder_layers",
    "n_decoder_layers",
    "d_ff",
    "norm_position",
    "share_embeddings",
)


def check_same_shape(config: Seq2SeqConfig, saved: Seq2SeqConfig, directory: Path) -> None:
    """Refuse weights saved by a model of another shape or architecture."""
    for name in SHAPE_FIELDS:
        if getattr(saved, name) != getattr(config, name):
            raise CheckpointError(
                f"{directory}: saved with {name}={getattr(saved, name)!r}, this model has "
                f"{getattr(config, name)!r}"
            )


def load_state(
    build: Callable[[], Model],
    state: dict[str, torch.Tensor],
    device: torch.device | str,
    directory: Path,
) -> Model:
    """from_state with the checkpoint named in the error when the tensors do not fit."""
    try:
        return from_state(build, state, device, torch.float32)
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: cannot load model.safetensors ({e})") from None


def sinusoids(config: Seq2SeqConfig, device: torch.device | str) -> SinusoidalPositionalEncoding:
    """The fixed position table (a buffer that checkpoints do not hold)."""
    return SinusoidalPositionalEncoding(config.max_len, config.d_model).to(device)
