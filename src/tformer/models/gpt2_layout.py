"""GPT-2 in the Hugging Face layout: config.json's fields and the tensors' names.

This is the only module that speaks Hugging Face's GPT-2 vocabulary; the file formats
themselves are tformer.checkpoints'. Everything is translated here:

    config.json          tformer              tensor                  tformer
    n_embd               d_model              wte                     token_embedding
    n_layer / n_head     n_layers / n_heads   wpe                     position_embedding
    n_positions          max_len              h.i.ln_1, h.i.ln_2      blocks.i.attn_sublayer.norm,
    n_inner              d_ff                                         blocks.i.mlp_sublayer.norm
    *_pdrop              *dropout             h.i.attn.c_attn, c_proj blocks.i.attn.w_qkv, w_o
    layer_norm_epsilon   layer_norm_eps       h.i.mlp.c_fc, c_proj    blocks.i.mlp.w1, w2
    eos_token_id         eos_id               ln_f                    final_norm

GPT-2's projections are `Conv1D` layers whose weight is stored (in, out), the transpose of
`nn.Linear`'s (out, in). Tensor names may carry a `transformer.` prefix (GPT2LMHeadModel) or
not (GPT2Model, the original OpenAI upload); both load. The output head `lm_head` is tied to
`wte` and stored once, as `wte`.
"""

from pathlib import Path

import torch

from tformer.checkpoints import (
    CheckpointError,
    NameTable,
    read_model_config,
    strip_prefix,
    tensors_from_table,
    tensors_to_table,
)
from tformer.models.gpt2_config import GPT2Config

PREFIX = "transformer."  # GPT2LMHeadModel's body
# Hugging Face activation names -> tformer's. GPT-2's tanh GELU goes by several names.
ACTIVATION_NAMES = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}
HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
# Buffers that old GPT-2 checkpoints carry (the causal mask); they are not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def config_to_hf(config: GPT2Config, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.max_len,
        "n_ctx": config.max_len,
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "activation_function": HF_ACTIVATION[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.embedding_dropout,
        "attn_pdrop": config.attention_dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": config.init_std,
        "bos_token_id": config.eos_id,
        "eos_token_id": config.eos_id,
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # Which attention path computed it; other tools ignore the key. A resumed run must
        # take the same path to repeat its losses to the last digit.
        "tformer_attention": config.attention,
    }


def config_from_hf(hf: dict, source: str) -> GPT2Config:
    """Translate a GPT-2 config.json, refusing variants this implementation does not compute."""
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise CheckpointError(f"{source}: model_type is {model_type!r}, only 'gpt2' is supported")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATION_NAMES:
        raise CheckpointError(
            f"{source}: activation_function {activation!r} is not supported "
            f"({', '.join(sorted(ACTIVATION_NAMES))})"
        )
    unsupported = {
        "scale_attn_weights": (False, "unscaled attention"),
        "scale_attn_by_inverse_layer_idx": (True, "attention scaled by layer index"),
        "add_cross_attention": (True, "cross-attention"),
        "tie_word_embeddings": (False, "an output head not tied to the embedding"),
    }
    for key, (bad, what) in unsupported.items():
        if hf.get(key) is bad:
            raise CheckpointError(f"{source}: {key}={bad} ({what}) is not supported")
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: config.json lacks {', '.join(missing)}")
    eos, vocab = hf.get("eos_token_id"), hf["vocab_size"]
    if not (isinstance(eos, int) and isinstance(vocab, int) and 0 <= eos < vocab):
        eos = None  # GPT-2's configs name 50256 whatever the vocabulary; keep only a real one
    try:
        return GPT2Config(
            vocab_size=hf["vocab_size"],
            max_len=hf.get("n_positions", hf.get("n_ctx", 1024)),
            d_model=hf["n_embd"],
            n_layers=hf["n_layer"],
            n_heads=hf["n_head"],
            d_ff=hf.get("n_inner"),
            activation=ACTIVATION_NAMES[activation],
            dropout=hf.get("resid_pdrop", 0.1),
            attention_dropout=hf.get("attn_pdrop", 0.1),
            embedding_dropout=hf.get("embd_pdrop", 0.1),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            init_std=hf.get("initializer_range", 0.02),
            eos_id=eos,
            attention=hf.get("tformer_attention", "sdpa"),
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def load_config(directory: Path) -> GPT2Config:
    """The GPT2Config of a checkpoint directory, from its config.json."""
    return config_from_hf(read_model_config(directory), str(directory))


def name_table(config: GPT2Config) -> NameTable:
    """(Hugging Face name without prefix, tformer name, stored transposed) for every tensor."""
    table = [
        ("wte.weight", "token_embedding.weight", False),
        ("wpe.weight", "position_embedding.weight", False),
    ]
    per_block = [
        ("ln_1.weight", "attn_sublayer.norm.weight", False),
        ("ln_1.bias", "attn_sublayer.norm.bias", False),
        ("attn.c_attn.weight", "attn.w_qkv.weight", True),
        ("attn.c_attn.bias", "attn.w_qkv.bias", False),
        ("attn.c_proj.weight", "attn.w_o.weight", True),
        ("attn.c_proj.bias", "attn.w_o.bias", False),
        ("ln_2.weight", "mlp_sublayer.norm.weight", False),
        ("ln_2.bias", "mlp_sublayer.norm.bias", False),
        ("mlp.c_fc.weight", "mlp.w1.weight", True),
        ("mlp.c_fc.bias", "mlp.w1.bias", False),
        ("mlp.c_proj.weight", "mlp.w2.weight", True),
        ("mlp.c_proj.bias", "mlp.w2.bias", False),
    ]
    for i in range(config.n_layers):
        table += [(f"h.{i}.{hf}", f"blocks.{i}.{ours}", t) for hf, ours, t in per_block]
    table += [("ln_f.weight", "final_norm.weight", False), ("ln_f.bias", "final_norm.bias", False)]
    return table


def check_hf_architecture(config: GPT2Config) -> None:
    """Only GPT-2 itself (pre-LN, with residuals, learned positions, token vectors as they
    are stored) has a Hugging Face layout."""
    if config.norm_position != "pre" or not config.residual:
        raise CheckpointError(
            "only the GPT-2 architecture (pre-LN with residuals) has a Hugging Face layout; "
            f"this model has norm_position={config.norm_position!r}, "
            f"residual={config.residual}"
        )
    if config.positions != "learned" or config.scale_embeddings:
        raise CheckpointError(
            "only the GPT-2 architecture (learned positions, unscaled token embeddings) has a "
            f"Hugging Face layout; this model has positions={config.positions!r}, "
            f"scale_embeddings={config.scale_embeddings}"
        )


def state_dict_to_hf(state: dict[str, torch.Tensor], config: GPT2Config) -> dict[str, torch.Tensor]:
    """tformer tensors -> GPT2LMHeadModel tensors (`transformer.` prefix, Conv1D layout)."""
    check_hf_architecture(config)
    return tensors_to_table(state, name_table(config), PREFIX)


def state_dict_from_hf(
    tensors: dict[str, torch.Tensor],
    config: GPT2Config,
    shapes: dict[str, tuple[int, ...]],
    source: str,
) -> dict[str, torch.Tensor]:
    """GPT-2 tensors in Hugging Face naming -> tformer's, checking each against the model's
    `shapes` (by tformer name) and that every one is there."""
    tensors = strip_prefix(tensors, PREFIX, source)
    head = tensors.pop("lm_head.weight", None)
    if (
        head is not None
        and "wte.weight" in tensors
        and not torch.equal(head, tensors["wte.weight"])
    ):
        raise CheckpointError(
            f"{source}: lm_head.weight differs from wte.weight; GPT-2's output head is tied "
            "to the token embedding, and an untied head is not supported"
        )
    table = name_table(config)
    return tensors_from_table(tensors, table, shapes, source, "GPT-2", IGNORED_SUFFIXES)


def linear_layer_names(config: GPT2Config) -> dict[str, str]:
    """tformer linear-layer name -> Hugging Face module name (with the `transformer.`
    prefix), e.g. 'blocks.0.attn.w_qkv' -> 'transformer.h.0.attn.c_attn'."""
    return {
        ours.removesuffix(".weight"): PREFIX + hf.removesuffix(".weight")
        for hf, ours, transposed in name_table(config)
        if transposed  # the Conv1D weights: exactly the linear layers of the blocks
    }
