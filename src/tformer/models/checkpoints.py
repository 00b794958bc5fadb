"""GPT-2 checkpoints in the Hugging Face layout, in and out.

A checkpoint is a directory with `config.json` and the weights in `model.safetensors` (or a
sharded `model.safetensors.index.json`, or the older `pytorch_model.bin`). This is the only
module that speaks Hugging Face's vocabulary; everything is translated here:

    config.json          tformer              tensor                  tformer
    n_embd               d_model              wte                     token_embedding
    n_layer / n_head     n_layers / n_heads   wpe                     position_embedding
    n_positions          max_len              h.i.ln_1, h.i.ln_2      blocks.i.attn_sublayer.norm,
    n_inner              d_ff                                         blocks.i.mlp_sublayer.norm
    *_pdrop              *dropout              h.i.attn.c_attn, c_proj blocks.i.attn.w_qkv, w_o
    layer_norm_epsilon   layer_norm_eps       h.i.mlp.c_fc, c_proj    blocks.i.mlp.w1, w2
                                              ln_f                    final_norm

GPT-2's projections are `Conv1D` layers whose weight is stored (in, out), the transpose of
`nn.Linear`'s (out, in). Tensor names may carry a `transformer.` prefix (GPT2LMHeadModel) or
not (GPT2Model, the original OpenAI upload); both load. The output head is tied to `wte`.
"""

import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from tformer.files import atomic_write, atomic_write_json, read_json
from tformer.models.gpt2 import GPT2, GPT2Config
from tformer.nn.lora import lora_layers


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked, with the reason and what to do."""


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
        "bos_token_id": config.eos_token_id,
        "eos_token_id": config.eos_token_id,
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
            eos_token_id=eos,
            attention=hf.get("tformer_attention", "sdpa"),
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def name_table(config: GPT2Config) -> list[tuple[str, str, bool]]:
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


def state_dict_to_hf(model: GPT2) -> dict[str, torch.Tensor]:
    """tformer tensors -> GPT2LMHeadModel tensors (`transformer.` prefix, Conv1D layout)."""
    if model.config.norm_position != "pre" or not model.config.residual:
        raise CheckpointError(
            "only the GPT-2 architecture (pre-LN with residuals) has a Hugging Face layout; "
            f"this model has norm_position={model.config.norm_position!r}, "
            f"residual={model.config.residual}"
        )
    ours = model.state_dict()
    return {
        f"transformer.{hf}": (ours[name].t() if transposed else ours[name]).contiguous()
        for hf, name, transposed in name_table(model.config)
    }


def state_dict_from_hf(
    tensors: dict[str, torch.Tensor], config: GPT2Config, source: str
) -> dict[str, torch.Tensor]:
    """GPT-2 tensors in Hugging Face naming -> tformer's, checking that every one is there."""
    unprefixed = {k.removeprefix("transformer.") for k in tensors}
    if len(unprefixed) != len(tensors):
        both = sorted(
            k for k in tensors if not k.startswith("transformer.") and "transformer." + k in tensors
        )
        raise CheckpointError(
            f"{source}: tensors stored twice, with and without the 'transformer.' prefix: "
            f"{_short(both)}"
        )
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
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
    expected = expected_shapes(config)
    missing, mismatched, out = [], [], {}
    for hf, name, transposed in table:
        if hf not in tensors:
            missing.append(hf)
            continue
        want = expected[name][::-1] if transposed else expected[name]
        tensor = tensors[hf]
        if tuple(tensor.shape) != want:
            mismatched.append(f"{hf} {tuple(tensor.shape)}, config.json implies {want}")
            continue
        out[name] = tensor.t().contiguous() if transposed else tensor
    known = {hf for hf, _, _ in table}
    unexpected = sorted(k for k in tensors if k not in known and not k.endswith(IGNORED_SUFFIXES))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if mismatched:
        problems.append(f"tensors whose shape does not match config.json: {_short(mismatched)}")
    if unexpected:
        problems.append(f"tensors a GPT-2 does not have: {_short(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{source}: not a GPT-2 checkpoint that matches its config.json; " + "; ".join(problems)
        )
    return out


def _short(items: list[str], limit: int = 6) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = GPT2(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, from whichever weight format it holds."""
    from safetensors.torch import load_file

    if (directory / "model.safetensors").is_file():
        return _load(load_file, directory / "model.safetensors")
    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index_path = directory / index_name
        if index_path.is_file():
            weight_map = read_json(index_path, "a sharded checkpoint index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: has no 'weight_map'")
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(_load(loader, directory / shard))
            return tensors
    if (directory / "pytorch_model.bin").is_file():
        return _load(_load_bin, directory / "pytorch_model.bin")
    raise CheckpointError(
        f"{directory}: no weights found; expected model.safetensors (or "
        "model.safetensors.index.json, or pytorch_model.bin)"
    )


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: a .bin is a pickle, and unpickling arbitrary objects runs arbitrary code.
    return torch.load(path, map_location="cpu", weights_only=True)


def _load(loader, path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file missing")
    try:
        tensors = loader(str(path))
    except Exception as e:  # a truncated or foreign file: say which file and why
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if not isinstance(tensors, dict) or not all(
        isinstance(v, torch.Tensor) for v in tensors.values()
    ):
        raise CheckpointError(f"{path}: does not hold a flat dictionary of tensors")
    return tensors


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a Hub name downloaded through huggingface_hub."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{path} is a file; pass the directory that holds config.json and the weights"
        )
    name = str(path_or_name)
    if not HUB_ID.match(name):
        raise CheckpointError(f"{name}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["config.json", "*.safetensors", "*.safetensors.index.json"]
        patterns += ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"]
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:
        reason = " ".join(str(e).split())  # one line, however the library formats it
        raise CheckpointError(
            f"{name!r} is not a local directory, and downloading it from the Hugging Face Hub "
            f"failed ({type(e).__name__}: {reason}). Without network access, point at a local "
            "directory that holds config.json and model.safetensors (or pytorch_model.bin), "
            "for example one written by save_pretrained or copied from a machine that has "
            "the model."
        ) from None


def name_or_path(path_or_name: str | os.PathLike, directory: Path) -> str:
    """How a saved adapter names its base: a local directory by its absolute path, a Hub
    model by its name (not the cache directory it was downloaded to), as PEFT does."""
    if Path(path_or_name).expanduser().is_dir():
        return str(directory.resolve())
    return str(path_or_name)


def load_config(directory: Path) -> GPT2Config:
    """The GPT2Config of a checkpoint directory, from its config.json."""
    try:
        hf_config = read_json(directory / "config.json", "the model's config")
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    return config_from_hf(hf_config, str(directory))


def with_settings(
    config: GPT2Config, dropout: float | None = None, attention: str | None = None
) -> GPT2Config:
    """The config with every dropout and the attention path replaced where given: settings
    that change how a model trains or runs, not its weights."""
    if dropout is not None:
        config = replace(
            config, dropout=dropout, attention_dropout=dropout, embedding_dropout=dropout
        )
    if attention is not None:
        config = replace(config, attention=attention)
    return config


def load_gpt2(
    path_or_name: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    dropout: float | None = None,
    attention: str | None = None,
) -> GPT2:
    directory = resolve_checkpoint(path_or_name)
    config = with_settings(load_config(directory), dropout, attention)
    ours = state_dict_from_hf(read_tensors(directory), config, str(directory))
    with torch.device("meta"):
        model = GPT2(config)  # no memory, no initialisation: every tensor comes from the file
    ours = {k: v.to(device=device, dtype=dtype) for k, v in ours.items()}
    model.load_state_dict(ours, strict=True, assign=True)
    model.name_or_path = name_or_path(path_or_name, directory)
    return model.eval()


def save_gpt2(model: GPT2, directory: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    if model.packed_head is not None:
        raise ValueError(
            "this model's weights were packed for decoding (tformer.generate.fast), which "
            "rounds them; save the model before packing it"
        )
    if lora_layers(model):
        raise ValueError(
            "this model has LoRA layers, which the GPT-2 layout cannot hold: merge them into "
            "the weights first (tformer.nn.lora.merge_lora), or save the adapters alone "
            "(GPT2.save_pretrained, tformer.models.adapters.save_adapter)"
        )
    directory = Path(directory)
    tensors = {k: v.detach().cpu() for k, v in state_dict_to_hf(model).items()}
    dtype = model.token_embedding.weight.dtype
    atomic_write(
        directory / "model.safetensors",
        lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
    )
    atomic_write_json(directory / "config.json", config_to_hf(model.config, dtype))
