"""GPT-2 as a GGUF file, the layout of llama.cpp's `gpt2` architecture.

    tformer                                GGUF tensor              type written
    token_embedding.weight      (V, C)     token_embd.weight        the file's (q4_0: q8_0)
    position_embedding.weight   (T, C)     position_embd.weight     f32
    blocks.i.attn_sublayer.norm            blk.i.attn_norm          f32
    blocks.i.attn.w_qkv         (3C, C)    blk.i.attn_qkv           the file's; biases f32
    blocks.i.attn.w_o           (C, C)     blk.i.attn_output        the file's
    blocks.i.mlp_sublayer.norm             blk.i.ffn_norm           f32
    blocks.i.mlp.w1             (F, C)     blk.i.ffn_up             the file's
    blocks.i.mlp.w2             (C, F)     blk.i.ffn_down           the file's
    final_norm                             output_norm              f32
    (the head, tied)                       output.weight: omitted; llama.cpp uses token_embd

tformer's linear weights are nn.Linear's (out, in), which is ggml's {in, out}: written as
they are (Hugging Face's Conv1D layout is the transpose; its converter transposes it). The
fused Q/K/V rows are q, k, v, as llama.cpp's `build_qkv` splits them. A q4_0 file keeps the
token embedding, which is also the output head, in q8_0: the head is the matrix whose
rounding costs the most, and llama.cpp's own quantiser keeps it wider too.

Metadata: gpt2.{context_length, embedding_length, feed_forward_length, block_count,
attention.head_count, attention.layer_norm_epsilon}, general.file_type, the tokenizer
(tformer.checkpoints.gguf_vocab), and `tformer.config`, the GPT2Config as JSON, which
llama.cpp ignores and tformer reads back for what GGUF has no key for (dropout, the exact
epsilon, the activation a GELU model was trained with).

llama.cpp computes GPT-2 and nothing else here: pre-LN blocks with residual connections and
GELU's tanh approximation. A model trained with exact GELU (`tformer train`'s default) is
refused unless `approximate_gelu`: llama.cpp will then compute the tanh form, which differs
by at most 1e-3 per activation; tformer reading the file back computes the exact form.
"""

import json
import os
from dataclasses import fields

import numpy as np
import torch

from tformer.checkpoints import CheckpointError
from tformer.checkpoints.gguf import TYPE_NAMES, GGUFFile, read_gguf, write_gguf
from tformer.checkpoints.gguf_vocab import (
    check_tokenizer,
    tokenizer_from_metadata,
    tokenizer_metadata,
)
from tformer.models.gpt2_config import GPT2Config
from tformer.tokenizers import Tokenizer

ARCH = "gpt2"
CONFIG_KEY = "tformer.config"
# general.file_type: llama.cpp's "mostly" type of the file (LLAMA_FTYPE_*).
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}
# Settings GGUF has no key for, taken from tformer.config when the file has it.
SETTINGS = ("dropout", "attention_dropout", "embedding_dropout", "init_std", "init",
            "attention", "activation", "layer_norm_eps")  # fmt: skip

PER_BLOCK = [  # (tformer name, GGUF name, a weight matrix)
    ("attn_sublayer.norm.weight", "attn_norm.weight", False),
    ("attn_sublayer.norm.bias", "attn_norm.bias", False),
    ("attn.w_qkv.weight", "attn_qkv.weight", True),
    ("attn.w_qkv.bias", "attn_qkv.bias", False),
    ("attn.w_o.weight", "attn_output.weight", True),
    ("attn.w_o.bias", "attn_output.bias", False),
    ("mlp_sublayer.norm.weight", "ffn_norm.weight", False),
    ("mlp_sublayer.norm.bias", "ffn_norm.bias", False),
    ("mlp.w1.weight", "ffn_up.weight", True),
    ("mlp.w1.bias", "ffn_up.bias", False),
    ("mlp.w2.weight", "ffn_down.weight", True),
    ("mlp.w2.bias", "ffn_down.bias", False),
]


def name_table(config: GPT2Config) -> list[tuple[str, str, bool]]:
    """(tformer name, GGUF name, quantised with the file's type) for every tensor."""
    table = [
        ("token_embedding.weight", "token_embd.weight", True),
        ("position_embedding.weight", "position_embd.weight", False),
    ]
    for i in range(config.n_layers):
        table += [(f"blocks.{i}.{ours}", f"blk.{i}.{theirs}", m) for ours, theirs, m in PER_BLOCK]
    table += [
        ("final_norm.weight", "output_norm.weight", False),
        ("final_norm.bias", "output_norm.bias", False),
    ]
    return table


def check_writable(
    config: GPT2Config, type_name: str, approximate_gelu: bool, tokenizer: Tokenizer
) -> None:
    """Refuse, before anything is written, what llama.cpp's gpt2 architecture cannot
    compute, what the type cannot store, and a tokenizer GGUF cannot carry."""
    check_tokenizer(tokenizer, config.vocab_size)
    if type_name not in TYPE_NAMES:
        raise ValueError(f"unknown GGUF type {type_name!r}; choose one of {', '.join(TYPE_NAMES)}")
    if config.norm_position != "pre" or not config.residual:
        raise ValueError(
            "llama.cpp's gpt2 architecture computes pre-LN blocks with residual connections; "
            f"this model has norm_position={config.norm_position!r}, residual={config.residual}"
        )
    if config.positions != "learned" or config.scale_embeddings:
        raise ValueError(
            "llama.cpp's gpt2 architecture adds learned positions to unscaled token "
            f"embeddings; this model has positions={config.positions!r}, "
            f"scale_embeddings={config.scale_embeddings}"
        )
    if config.activation == "relu":
        raise ValueError("llama.cpp's gpt2 architecture computes GELU; this model uses ReLU")
    if config.activation == "gelu" and not approximate_gelu:
        raise ValueError(
            "this model was trained with exact GELU, and llama.cpp's gpt2 architecture "
            "computes GELU's tanh approximation (at most 1e-3 apart per activation); pass "
            "--approximate-gelu to export it anyway"
        )
    for width, name in ((config.d_model, "d_model"), (config.d_ff, "d_ff")):
        if type_name in ("q8_0", "q4_0") and width % 32:
            raise ValueError(
                f"{type_name} quantises rows in blocks of 32, and this model's {name} is "
                f"{width}: export it as f32, f16 or bf16"
            )


def metadata(config: GPT2Config, tokenizer: Tokenizer, type_name: str) -> dict:
    return {
        "general.name": "tformer GPT-2",
        "general.file_type": FILE_TYPES[type_name],
        "general.quantization_version": 2,
        f"{ARCH}.context_length": config.max_len,
        f"{ARCH}.embedding_length": config.d_model,
        f"{ARCH}.feed_forward_length": config.d_ff,
        f"{ARCH}.block_count": config.n_layers,
        f"{ARCH}.attention.head_count": config.n_heads,
        f"{ARCH}.attention.layer_norm_epsilon": float(config.layer_norm_eps),
        **tokenizer_metadata(tokenizer, config.vocab_size),
        CONFIG_KEY: json.dumps(config.to_dict()),
    }


def tensor_type(gguf_name: str, quantised: bool, type_name: str) -> str:
    """The type one tensor is written in (see the table above)."""
    if not quantised:
        return "f32"
    if type_name == "q4_0" and gguf_name == "token_embd.weight":
        return "q8_0"
    return type_name


def write_gpt2_gguf(
    path: str | os.PathLike,
    config: GPT2Config,
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    type_name: str = "f32",
    approximate_gelu: bool = False,
    progress=None,
) -> None:
    """A GPT-2's weights (tformer's state dict) and tokenizer as a GGUF file for llama.cpp."""
    check_writable(config, type_name, approximate_gelu, tokenizer)

    def tensors():
        for ours, theirs, quantised in name_table(config):
            array = state[ours].detach().to("cpu", torch.float32).numpy()
            yield theirs, np.ascontiguousarray(array), tensor_type(theirs, quantised, type_name)

    write_gguf(path, ARCH, metadata(config, tokenizer, type_name), tensors(), progress)


def read_gpt2_gguf(
    path: str | os.PathLike,
) -> tuple[GPT2Config, dict[str, torch.Tensor], Tokenizer]:
    """A GPT-2 GGUF file (tformer's or llama.cpp's converter's): its config, its tensors in
    tformer's naming (float32, dequantised) and its tokenizer."""
    gguf = read_gguf(path)
    source = str(path)
    config = config_from_file(gguf)
    embedding = gguf.tensors["token_embd.weight"]
    head = gguf.tensors.pop("output.weight", None)
    if head is not None and not torch.equal(head, embedding):
        types = gguf.types["output.weight"], gguf.types["token_embd.weight"]
        # llama.cpp's quantiser rounds the head wider than the embedding: the same matrix
        # in two roundings, within their error (4 bits: ~10% of the norm)
        rounded = types[0] != types[1] and (head - embedding).norm() <= 0.2 * embedding.norm()
        if not rounded:
            raise CheckpointError(
                f"{source}: output.weight differs from token_embd.weight; tformer's GPT-2 "
                "ties its output head to the token embedding, and an untied head is not "
                "supported"
            )
        if bits_per_weight(types[0]) > bits_per_weight(types[1]):
            embedding = head  # the tied matrix: the wider rounding of the two
    gguf.tensors["token_embd.weight"] = embedding
    state, table = {}, name_table(config)
    missing = [theirs for _, theirs, _ in table if theirs not in gguf.tensors]
    if missing:
        raise CheckpointError(f"{source}: the file lacks {', '.join(missing[:5])}")
    for ours, theirs, _ in table:
        state[ours] = gguf.tensors.pop(theirs)
    if gguf.tensors:
        raise CheckpointError(
            f"{source}: tensors GPT-2 does not have: {', '.join(sorted(gguf.tensors)[:5])}"
        )
    tokenizer = tokenizer_from_metadata(gguf.metadata, source)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{config.vocab_size}"
        )
    return config, state, tokenizer


def bits_per_weight(type_name: str) -> float:
    """The bits a weight of a ggml type takes, its share of the block's scales included."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    return 8 * size / block


def read_gpt2_gguf_config(path: str | os.PathLike) -> GPT2Config:
    """The GPT2Config of a GGUF file, without reading its tensors."""
    return config_from_file(read_gguf(path, with_tensors=False))


def config_from_file(gguf: GGUFFile) -> GPT2Config:
    """The GPT2Config the GGUF keys describe, with tformer.config's settings where present."""
    source = str(gguf.path)
    if gguf.architecture != ARCH:
        raise CheckpointError(
            f"{source}: general.architecture is {gguf.architecture!r}; tformer reads GPT-2 "
            f"GGUF files ({ARCH!r})"
        )
    if "token_embd.weight" not in gguf.shapes:
        raise CheckpointError(f"{source}: the file has no token_embd.weight")
    vocab_size = gguf.shapes["token_embd.weight"][0]
    eos = gguf.metadata.get("tokenizer.ggml.eos_token_id")
    shapes = {
        "vocab_size": vocab_size,
        "max_len": gguf.require(f"{ARCH}.context_length"),
        "d_model": gguf.require(f"{ARCH}.embedding_length"),
        "n_layers": gguf.require(f"{ARCH}.block_count"),
        "n_heads": gguf.require(f"{ARCH}.attention.head_count"),
        "d_ff": gguf.require(f"{ARCH}.feed_forward_length"),
        "layer_norm_eps": gguf.require(f"{ARCH}.attention.layer_norm_epsilon"),
        "eos_id": eos if isinstance(eos, int) and 0 <= eos < vocab_size else None,
        "activation": "gelu_tanh",
        # what llama.cpp's gpt2 computes, whatever tformer.config's init was
        "positions": "learned",
        "scale_embeddings": False,
    }
    saved = _saved_config(gguf.metadata.get(CONFIG_KEY), source)
    known = {f.name for f in fields(GPT2Config)}
    settings = {k: v for k, v in saved.items() if k in SETTINGS and k in known}
    if "layer_norm_eps" in settings and not np.isclose(
        np.float32(settings["layer_norm_eps"]), np.float32(shapes["layer_norm_eps"])
    ):
        del settings["layer_norm_eps"]  # the GGUF key was changed since: it wins
    try:
        return GPT2Config(**{**shapes, **settings})
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _saved_config(text, source: str) -> dict:
    if text is None:
        return {}
    try:
        saved = json.loads(text)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: {CONFIG_KEY} is not JSON") from None
    return saved if isinstance(saved, dict) else {}
