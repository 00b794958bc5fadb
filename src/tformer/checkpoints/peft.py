"""LoRA adapters in PEFT's layout, without any model class.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, as
`peft.PeftModel.save_pretrained` writes them. Tensor names are the adapted module's name
in the model's own (Hugging Face) naming under PEFT's prefix:

    base_model.model.<module>.lora_A.weight      A (r, in)
    base_model.model.<module>.lora_B.weight      B (out, r)
    base_model.model.<head>.weight, .bias        a head trained in full (`modules_to_save`)

`target_modules` is a list of module-name suffixes or one regular expression for the whole
name; `base_model_name_or_path` names the checkpoint the adapters were trained on. A
question-answering adapter (task QUESTION_ANS) carries its span head `qa_outputs`. Which
modules a model has, and their names, is the model's knowledge (tformer.models).
"""

import os
import re
from pathlib import Path

import torch

from tformer.checkpoints.errors import CheckpointError
from tformer.files import atomic_write, atomic_write_json, read_json
from tformer.nn.lora import LoRAConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
QA_TASK = "QUESTION_ANS"
QA_HEAD = "qa_outputs"  # transformers' and PEFT's name for a span head
# adapter_config.json options tformer does not compute.
UNSUPPORTED = (
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


def is_adapter(directory: Path) -> bool:
    """A PEFT adapter directory, not a whole model (which has config.json)."""
    return (directory / CONFIG_FILE).is_file() and not (directory / "config.json").is_file()


def lora_name(module: str, part: str) -> str:
    """The stored name of a LoRA matrix: part 'lora_A' or 'lora_B' of `module`."""
    return f"{PREFIX}{module}.{part}.weight"


def targeted(targets: list[str] | str, module: str) -> bool:
    """PEFT's rule: a list names modules by suffix, a string is a regular expression that
    must match the whole module name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def read_config(directory: Path) -> dict:
    """adapter_config.json of a LoRA adapter."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; is this a PEFT adapter?")
    config = read_json(path, "a PEFT adapter configuration")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: only LoRA adapters load, not {config.get('peft_type')}")
    return config


def has_head(config: dict) -> bool:
    """Whether the adapter carries a span head (PEFT's task QUESTION_ANS)."""
    return config.get("task_type") == QA_TASK or config.get("modules_to_save") == [QA_HEAD]


def check_supported(config: dict, directory: Path) -> None:
    """Refuse LoRA options tformer does not compute."""
    unsupported = {key: config[key] for key in UNSUPPORTED if config.get(key)}
    if config.get("modules_to_save") not in (None, [QA_HEAD]):
        unsupported["modules_to_save"] = config["modules_to_save"]
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise CheckpointError(f"{directory / CONFIG_FILE}: unsupported LoRA options {unsupported}")


def base_of(directory: Path) -> str:
    """The checkpoint an adapter names as its base (base_model_name_or_path)."""
    base = read_config(directory).get("base_model_name_or_path")
    if not base:
        raise CheckpointError(
            f"{directory}: a LoRA adapter that does not name the model it adapts "
            "(base_model_name_or_path); load that model, then "
            "tformer.models.adapters.load_adapter(model, directory)"
        )
    return base


def lora_config(config: dict, layers: list[str]) -> LoRAConfig:
    """The LoRAConfig of an adapter that adapts `layers` (tformer's module names)."""
    return LoRAConfig(
        rank=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        targets=tuple(sorted({name.rsplit(".", 1)[-1] for name in layers})),  # e.g. w_qkv
    )


def adapter_config(
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    base: str | None,
    question_answering: bool,
    fan_in_fan_out: bool,
) -> dict:
    """adapter_config.json for LoRA layers of rank r = `rank` scaled by alpha / r."""
    return {
        "peft_type": "LORA",
        "task_type": QA_TASK if question_answering else "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "base_model_name_or_path": base,
        "modules_to_save": [QA_HEAD] if question_answering else None,
    }


def write_adapter(
    directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict
) -> None:
    """adapter_model.safetensors, then adapter_config.json, each atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(flat, tmp))
    atomic_write_json(directory / CONFIG_FILE, config)


def read_adapter_tensors(directory: Path, expected: set[str]) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors, which must hold exactly the `expected` names."""
    from safetensors.torch import load_file

    tensors = load_file(directory / WEIGHTS_FILE)
    if set(tensors) != expected:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE}: tensors do not match the configuration "
            f"(missing {sorted(expected - set(tensors))[:3]}, unexpected "
            f"{sorted(set(tensors) - expected)[:3]})"
        )
    return tensors
