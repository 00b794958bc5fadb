"""LoRA adapters of GPT-2 in PEFT's layout, in and out.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, as
`peft.PeftModel.save_pretrained` writes them, so that

    peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base), dir)

loads an adapter trained here, and `load_adapter` one trained with PEFT. The names are
Hugging Face's (tformer.models.checkpoints.name_table):

    tformer                              adapter_model.safetensors
    blocks.i.attn.w_qkv.lora_A.weight    base_model.model.transformer.h.i.attn.c_attn.lora_A.weight
    blocks.i.mlp.w2.lora_B.weight        base_model.model.transformer.h.i.mlp.c_proj.lora_B.weight

and `target_modules` names the roles ("attn.c_attn", "mlp.c_proj"): "c_proj" alone would
also pick the other output projection.

GPT-2's projections are Conv1D layers (weight stored (in, out)); PEFT wraps them with
`fan_in_fan_out=True` but keeps A (r, in) and B (out, r) as for nn.Linear, so the matrices
carry over without transposing.
"""

import os
import re
from pathlib import Path

import torch

from tformer.files import atomic_write, atomic_write_json, read_json
from tformer.models.checkpoints import CheckpointError, name_table
from tformer.models.gpt2 import GPT2
from tformer.nn.lora import LoRAConfig, add_lora, lora_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.transformer."


def module_names(model: GPT2) -> dict[str, str]:
    """tformer linear-layer name -> Hugging Face module name, e.g. 'blocks.0.attn.w_qkv' ->
    'h.0.attn.c_attn'."""
    return {
        ours.removesuffix(".weight"): hf.removesuffix(".weight")
        for hf, ours, transposed in name_table(model.config)
        if transposed  # the Conv1D weights: exactly the linear layers
    }


def role(hf_name: str) -> str:
    """'h.3.attn.c_proj' -> 'attn.c_proj': the layer's role, without its block (c_proj alone
    would name the attention's and the MLP's output projections both)."""
    return ".".join(hf_name.split(".")[-2:])


def targeted(targets: list[str] | str, hf_name: str) -> bool:
    """PEFT's rule: a list names modules by suffix, a string is a regular expression that
    must match the whole module name."""
    full = "transformer." + hf_name
    if isinstance(targets, str):
        return re.fullmatch(targets, full) is not None
    return any(full == t or full.endswith("." + t) for t in targets)


def save_adapter(model: GPT2, directory: str | os.PathLike) -> None:
    """Write the model's LoRA layers as a PEFT adapter (atomically, file by file)."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA layers to save (see tformer.nn.lora.add_lora)")
    names = module_names(model)
    first = next(iter(layers.values()))
    targets = sorted({role(names[name]) for name in layers})
    tensors = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part).weight.detach().cpu().contiguous()
            tensors[f"{PREFIX}{names[name]}.{part}.weight"] = weight
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.lora_A.out_features,
        "lora_alpha": first.scaling * first.lora_A.out_features,
        "lora_dropout": first.lora_dropout.p,
        "target_modules": targets,
        "fan_in_fan_out": True,  # GPT-2's Conv1D layers
        "bias": "none",
        "inference_mode": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write_json(directory / CONFIG_FILE, config)


def read_adapter_config(directory: Path, model: GPT2) -> tuple[LoRAConfig, list[str]]:
    """The LoRAConfig of a PEFT adapter directory and the names of the layers it adapts,
    refusing what tformer does not compute."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; is this a PEFT adapter?")
    config = read_json(path, "a PEFT adapter configuration")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: only LoRA adapters load, not {config.get('peft_type')}")
    unsupported = {
        key: config[key]
        for key in (
            "use_dora",
            "use_rslora",
            "lora_bias",
            "modules_to_save",
            "layers_to_transform",
            "rank_pattern",
            "alpha_pattern",
            "exclude_modules",
            "layer_replication",
            "target_parameters",
        )
        if config.get(key)
    }
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise CheckpointError(f"{path}: unsupported LoRA options {unsupported}")
    chosen = [
        ours for ours, hf in module_names(model).items() if targeted(config["target_modules"], hf)
    ]
    if not chosen:
        raise CheckpointError(
            f"{path}: target modules {config['target_modules']!r} name no GPT-2 linear layer"
        )
    lora = LoRAConfig(
        rank=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        targets=tuple(sorted({name.rsplit(".", 1)[-1] for name in chosen})),  # e.g. w_qkv
    )
    return lora, chosen


def load_adapter(model: GPT2, directory: str | os.PathLike) -> LoRAConfig:
    """Put the LoRA layers of a PEFT adapter directory on `model` (frozen base, trainable
    adapters); returns their configuration."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config, adapted = read_adapter_config(directory, model)
    names = module_names(model)
    tensors = load_file(directory / WEIGHTS_FILE)
    parts = ("lora_A", "lora_B")
    expected = {f"{PREFIX}{names[name]}.{part}.weight" for name in adapted for part in parts}
    if set(tensors) != expected:  # checked before the model is changed
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE}: tensors do not match the configuration "
            f"(missing {sorted(expected - set(tensors))[:3]}, unexpected "
            f"{sorted(set(tensors) - expected)[:3]})"
        )
    add_lora(model, config, names=adapted)
    layers = lora_layers(model)
    with torch.no_grad():
        for name in adapted:
            for part in ("lora_A", "lora_B"):
                target = getattr(layers[name], part).weight
                source = tensors[f"{PREFIX}{names[name]}.{part}.weight"]
                if source.shape != target.shape:
                    raise CheckpointError(
                        f"{name}.{part}: shape {tuple(source.shape)} in the adapter, "
                        f"{tuple(target.shape)} in the model"
                    )
                target.copy_(source)
    return config
