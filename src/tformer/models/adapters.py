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
carry over without transposing. A question-answering model's span head trains in full next
to the adapters and is saved with them, as PEFT's `modules_to_save` (task QUESTION_ANS):

    qa_outputs.weight                    base_model.model.qa_outputs.weight

`base_model_name_or_path` names the checkpoint the adapters were trained on, so that
`GPT2.from_pretrained(adapter_dir)` (and GPT2ForQuestionAnswering's) loads that base and
puts the adapters on it, as transformers does with PEFT installed.
"""

import os
import re
from pathlib import Path

import torch

from tformer.files import atomic_write, atomic_write_json, read_json
from tformer.models.checkpoints import CheckpointError, name_table
from tformer.models.gpt2 import GPT2
from tformer.models.gpt2_qa import HEAD, GPT2ForQuestionAnswering
from tformer.nn.lora import LoRAConfig, add_lora, lora_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.transformer."
HEAD_PREFIX = "base_model.model."  # + qa_outputs.weight, qa_outputs.bias
# Layers by role, in Hugging Face's names (as PEFT's target_modules) and in ours.
ROLES = {"attn.c_attn": "w_qkv", "attn.c_proj": "w_o", "mlp.c_fc": "w1", "mlp.c_proj": "w2"}

Adaptable = GPT2 | GPT2ForQuestionAnswering


def body(model: Adaptable) -> GPT2:
    """The GPT-2 that carries the adapters (a QA model's head trains in full)."""
    return model.gpt2 if isinstance(model, GPT2ForQuestionAnswering) else model


def lora_targets(names: list[str]) -> tuple[str, ...]:
    """Target layers named either way, e.g. ['c_attn', 'mlp.c_proj'] or ['w_qkv', 'w2'] ->
    ('w_qkv', 'w2'); 'c_proj' alone is ambiguous (two output projections) and refused."""
    by_name = {**ROLES, "c_attn": "w_qkv", "c_fc": "w1"}
    ours = set(ROLES.values())
    chosen = []
    for name in names:
        if name in ours:
            chosen.append(name)
        elif name in by_name:
            chosen.append(by_name[name])
        else:
            known = ", ".join([*ROLES, *ROLES.values()])
            hint = " (say attn.c_proj or mlp.c_proj)" if name == "c_proj" else ""
            raise ValueError(f"unknown LoRA target {name!r}{hint}; choose from {known}")
    return tuple(dict.fromkeys(chosen))


def is_adapter(directory: Path) -> bool:
    """A PEFT adapter directory, not a whole model (which has config.json)."""
    return (directory / CONFIG_FILE).is_file() and not (directory / "config.json").is_file()


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


def save_adapter(model: Adaptable, directory: str | os.PathLike, base: str | None = None) -> None:
    """Write the model's LoRA layers (and a QA model's head) as a PEFT adapter, atomically
    file by file; `base` names the checkpoint they adapt."""
    from safetensors.torch import save_file

    layers = lora_layers(body(model))
    if not layers:
        raise ValueError("this model has no LoRA layers to save (see tformer.nn.lora.add_lora)")
    names = module_names(body(model))
    first = next(iter(layers.values()))
    targets = sorted({role(names[name]) for name in layers})
    tensors = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part).weight.detach().cpu().contiguous()
            tensors[f"{PREFIX}{names[name]}.{part}.weight"] = weight
    question_answering = isinstance(model, GPT2ForQuestionAnswering)
    if question_answering:
        for name in HEAD:
            tensor = model.get_parameter(name).detach().cpu().contiguous()
            tensors[HEAD_PREFIX + name] = tensor
    config = {
        "peft_type": "LORA",
        "task_type": "QUESTION_ANS" if question_answering else "CAUSAL_LM",
        "r": first.lora_A.out_features,
        "lora_alpha": first.scaling * first.lora_A.out_features,
        "lora_dropout": first.lora_dropout.p,
        "target_modules": targets,
        "fan_in_fan_out": True,  # GPT-2's Conv1D layers
        "bias": "none",
        "inference_mode": True,
        "base_model_name_or_path": base,
        "modules_to_save": ["qa_outputs"] if question_answering else None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write_json(directory / CONFIG_FILE, config)


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; is this a PEFT adapter?")
    config = read_json(path, "a PEFT adapter configuration")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: only LoRA adapters load, not {config.get('peft_type')}")
    return config


def has_head(config: dict) -> bool:
    """Whether the adapter carries a span head (PEFT's task QUESTION_ANS)."""
    return config.get("task_type") == "QUESTION_ANS" or config.get("modules_to_save") == [
        "qa_outputs"
    ]


def read_adapter_config(directory: Path, model: Adaptable) -> tuple[LoRAConfig, list[str]]:
    """The LoRAConfig of a PEFT adapter directory and the names of the layers it adapts (in
    the GPT-2 body), refusing what tformer does not compute."""
    path = directory / CONFIG_FILE
    config = read_config(directory)
    question_answering = isinstance(model, GPT2ForQuestionAnswering)
    if has_head(config) != question_answering:
        kind = "question-answering" if has_head(config) else "language-model"
        raise CheckpointError(
            f"{directory}: a {kind} adapter; load it with "
            f"{'GPT2ForQuestionAnswering' if has_head(config) else 'GPT2'}.from_pretrained"
        )
    unsupported = {
        key: config[key]
        for key in (
            "use_dora",
            "use_rslora",
            "lora_bias",
            "layers_to_transform",
            "rank_pattern",
            "alpha_pattern",
            "exclude_modules",
            "layer_replication",
            "target_parameters",
        )
        if config.get(key)
    }
    if config.get("modules_to_save") not in (None, ["qa_outputs"]):
        unsupported["modules_to_save"] = config["modules_to_save"]
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise CheckpointError(f"{path}: unsupported LoRA options {unsupported}")
    chosen = [
        ours
        for ours, hf in module_names(body(model)).items()
        if targeted(config["target_modules"], hf)
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


def load_adapter(model: Adaptable, directory: str | os.PathLike) -> LoRAConfig:
    """Put the LoRA layers of a PEFT adapter directory on `model` (frozen base, trainable
    adapters; a QA model's head is the adapter's, and trainable); returns their
    configuration."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config, adapted = read_adapter_config(directory, model)
    gpt2 = body(model)
    names = module_names(gpt2)
    tensors = load_file(directory / WEIGHTS_FILE)
    parts = ("lora_A", "lora_B")
    expected = {f"{PREFIX}{names[name]}.{part}.weight" for name in adapted for part in parts}
    head = {HEAD_PREFIX + name: name for name in HEAD} if gpt2 is not model else {}
    expected |= set(head)
    if set(tensors) != expected:  # checked before the model is changed
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE}: tensors do not match the configuration "
            f"(missing {sorted(expected - set(tensors))[:3]}, unexpected "
            f"{sorted(set(tensors) - expected)[:3]})"
        )
    targets = {
        f"{name}.{part}.weight": f"{PREFIX}{names[name]}.{part}.weight"
        for name in adapted
        for part in parts
    }
    for ours, theirs in head.items():
        if tensors[ours].shape != model.get_parameter(theirs).shape:
            raise CheckpointError(
                f"{directory / WEIGHTS_FILE}: {theirs} has shape {tuple(tensors[ours].shape)}, "
                f"the model's {tuple(model.get_parameter(theirs).shape)}"
            )
    add_lora(gpt2, config, names=adapted)
    layers = lora_layers(gpt2)
    with torch.no_grad():
        for ours, theirs in targets.items():
            name, part, _ = ours.rsplit(".", 2)
            target = getattr(layers[name], part).weight
            source = tensors[theirs]
            if source.shape != target.shape:
                raise CheckpointError(
                    f"{name}.{part}: shape {tuple(source.shape)} in the adapter, "
                    f"{tuple(target.shape)} in the model"
                )
            target.copy_(source)
        for stored, name in head.items():
            model.get_parameter(name).copy_(tensors[stored])
    return config


def load_base(
    model_class: type,
    directory: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    dropout: float | None,
    attention: str | None,
) -> Adaptable:
    """The model an adapter directory names as its base (base_model_name_or_path)."""
    base = read_config(directory).get("base_model_name_or_path")
    if not base:
        raise CheckpointError(
            f"{directory}: a LoRA adapter that does not name the model it adapts "
            "(base_model_name_or_path); load that model, then "
            "tformer.models.adapters.load_adapter(model, directory)"
        )
    try:
        return model_class.from_pretrained(
            base, dtype, device, dropout=dropout, attention=attention
        )
    except (CheckpointError, FileNotFoundError) as e:
        raise CheckpointError(
            f"{directory}: cannot load the model these adapters were trained on ({e})"
        ) from None


def load_adapted_gpt2(
    directory: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    dropout: float | None = None,
    attention: str | None = None,
) -> GPT2:
    """A language model's adapter directory: its base with the adapters on it; dropout and
    attention as in GPT2.from_pretrained."""
    if has_head(read_config(directory)):
        raise CheckpointError(
            f"{directory}: a question-answering adapter; load it with "
            "GPT2ForQuestionAnswering.from_pretrained"
        )
    model = load_base(GPT2, directory, dtype, device, dropout, attention)
    load_adapter(model, directory)
    return model.eval()


def load_adapted_reader(
    directory: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    *,
    dropout: float | None = None,
    attention: str | None = None,
    head_required: bool = False,
) -> GPT2ForQuestionAnswering:
    """A reader's adapter directory: its base with the adapters and the span head on it. A
    language model's adapter gives its base and adapters under a new head drawn from `seed`
    (an error instead with head_required)."""
    if has_head(read_config(directory)):
        model = load_base(GPT2ForQuestionAnswering, directory, dtype, device, dropout, attention)
        load_adapter(model, directory)
        return model.eval()
    if head_required:
        raise CheckpointError(
            f"{directory}: a language model's adapters, without a question-answering head; "
            "train one with 'tformer train --task qa --init ...'"
        )
    gpt2 = load_adapted_gpt2(directory, dtype, device, dropout=dropout, attention=attention)
    model = GPT2ForQuestionAnswering(gpt2.config, seed=seed, gpt2=gpt2)
    return model.to(device=device, dtype=dtype).eval()
