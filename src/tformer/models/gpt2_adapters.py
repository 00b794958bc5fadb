"""LoRA adapters of GPT-2 in PEFT's layout (tformer.checkpoints.peft), in and out.

PEFT names the adapted layers by their Hugging Face module names (gpt2_layout):

    tformer                              adapter_model.safetensors
    blocks.i.attn.w_qkv.lora_A.weight    base_model.model.transformer.h.i.attn.c_attn.lora_A.weight
    blocks.i.mlp.w2.lora_B.weight        base_model.model.transformer.h.i.mlp.c_proj.lora_B.weight

and `target_modules` names the roles ("attn.c_attn", "mlp.c_proj"): "c_proj" alone would
also pick the other output projection. GPT-2's projections are Conv1D layers (weight
stored (in, out)); PEFT wraps them with `fan_in_fan_out=True` but keeps A (r, in) and
B (out, r) as for nn.Linear, so the matrices carry over without transposing. A
question-answering model's span head trains in full next to the adapters and is saved with
them, as PEFT's `modules_to_save` (task QUESTION_ANS):

    qa_outputs.weight                    base_model.model.qa_outputs.weight

The functions take the GPT-2 body that carries the adapters and, for a reader, its head;
the model classes (gpt2, gpt2_qa) call them from from_pretrained and save_pretrained.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from tformer.checkpoints import CheckpointError, peft
from tformer.models.gpt2_config import GPT2Config
from tformer.models.gpt2_layout import linear_layer_names
from tformer.nn.lora import LoRAConfig, add_lora, lora_layers

# Layers by role, in Hugging Face's names (as PEFT's target_modules) and in ours.
ROLES = {"attn.c_attn": "w_qkv", "attn.c_proj": "w_o", "mlp.c_fc": "w1", "mlp.c_proj": "w2"}
PARTS = ("lora_A", "lora_B")
HEAD_PARAMETERS = ("weight", "bias")

Model = TypeVar("Model", bound=nn.Module)


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


def role(hf_name: str) -> str:
    """'transformer.h.3.attn.c_proj' -> 'attn.c_proj': the layer's role, without its block
    (c_proj alone would name the attention's and the MLP's output projections both)."""
    return ".".join(hf_name.split(".")[-2:])


def base_of_adapters(name_or_path: str | None) -> str:
    """The checkpoint a model with LoRA layers was loaded from, which its saved adapters
    name as their base."""
    if name_or_path is None:
        raise ValueError(
            "this model has LoRA layers but was not loaded from a checkpoint, so its adapters "
            "cannot name their base: save the base model and load it with from_pretrained "
            "before adding LoRA, or merge the layers (tformer.nn.lora.merge_lora)"
        )
    return name_or_path


def head_names(head: nn.Linear | None) -> dict[str, str]:
    """Stored name -> parameter name of a reader's span head (none without a head)."""
    if head is None:
        return {}
    return {f"{peft.PREFIX}{peft.QA_HEAD}.{p}": p for p in HEAD_PARAMETERS}


def save_adapter(
    body: nn.Module,
    config: GPT2Config,
    directory: str | os.PathLike,
    base: str | None,
    head: nn.Linear | None = None,
) -> None:
    """Write the LoRA layers of the GPT-2 `body` (and a reader's span `head`) as a PEFT
    adapter, atomically file by file; `base` names the checkpoint they adapt."""
    layers = lora_layers(body)
    if not layers:
        raise ValueError("this model has no LoRA layers to save (see tformer.nn.lora.add_lora)")
    names = linear_layer_names(config)
    tensors = {
        peft.lora_name(names[name], part): getattr(layer, part).weight
        for name, layer in layers.items()
        for part in PARTS
    }
    for stored, parameter in head_names(head).items():
        tensors[stored] = getattr(head, parameter)
    first = next(iter(layers.values()))
    rank = first.lora_A.out_features
    adapter = peft.adapter_config(
        rank=rank,
        alpha=first.scaling * rank,
        dropout=first.lora_dropout.p,
        target_modules=sorted({role(names[name]) for name in layers}),
        base=base,
        question_answering=head is not None,
        fan_in_fan_out=True,  # GPT-2's Conv1D layers
    )
    peft.write_adapter(directory, tensors, adapter)


def adapted_layers(directory: Path, config: GPT2Config, head: nn.Linear | None) -> list[str]:
    """The GPT-2 layers (tformer names) that the adapter in `directory` adapts, refusing
    what tformer does not compute and an adapter of the other kind (reader or not)."""
    adapter = peft.read_config(directory)
    if peft.has_head(adapter) != (head is not None):
        kind = "question-answering" if peft.has_head(adapter) else "language-model"
        loader = "GPT2ForQuestionAnswering" if peft.has_head(adapter) else "GPT2"
        raise CheckpointError(
            f"{directory}: a {kind} adapter; load it with {loader}.from_pretrained"
        )
    peft.check_supported(adapter, directory)
    chosen = [
        ours
        for ours, hf in linear_layer_names(config).items()
        if peft.targeted(adapter["target_modules"], hf)
    ]
    if not chosen:
        raise CheckpointError(
            f"{directory / peft.CONFIG_FILE}: target modules {adapter['target_modules']!r} "
            "name no GPT-2 linear layer"
        )
    return chosen


def read_adapter(
    directory: Path, config: GPT2Config, adapted: list[str], head: nn.Linear | None
) -> dict[str, torch.Tensor]:
    """The adapter's tensors by tformer name relative to the body ('blocks.0.attn.w_qkv.
    lora_A.weight') and, for a reader, the head's ('weight', 'bias'), checked to be exactly
    the adapter's layers and of the head's shapes."""
    names = linear_layer_names(config)
    ours = {peft.lora_name(names[n], part): f"{n}.{part}.weight" for n in adapted for part in PARTS}
    ours |= head_names(head)
    tensors = peft.read_adapter_tensors(directory, set(ours))
    for stored, parameter in head_names(head).items():
        want = getattr(head, parameter).shape
        if tensors[stored].shape != want:
            raise CheckpointError(
                f"{directory / peft.WEIGHTS_FILE}: {peft.QA_HEAD}.{parameter} has shape "
                f"{tuple(tensors[stored].shape)}, the model's {tuple(want)}"
            )
    return {ours[stored]: tensor for stored, tensor in tensors.items()}


def copy_adapter(
    body: nn.Module, tensors: dict[str, torch.Tensor], head: nn.Linear | None, directory: Path
) -> None:
    """Copy read_adapter's tensors into the body's LoRA layers and the head."""
    layers = lora_layers(body)
    with torch.no_grad():
        for name, tensor in tensors.items():
            if head is not None and name in HEAD_PARAMETERS:
                getattr(head, name).copy_(tensor)
                continue
            layer, part, _ = name.rsplit(".", 2)
            target = getattr(layers[layer], part).weight
            if tensor.shape != target.shape:
                raise CheckpointError(
                    f"{directory}: {layer}.{part} has shape {tuple(tensor.shape)} in the "
                    f"adapter, {tuple(target.shape)} in the model"
                )
            target.copy_(tensor)


def load_adapter(
    body: nn.Module,
    config: GPT2Config,
    directory: str | os.PathLike,
    head: nn.Linear | None = None,
) -> LoRAConfig:
    """Put the LoRA layers of a PEFT adapter directory on the GPT-2 `body` (frozen base,
    trainable adapters; a reader's `head` gets the adapter's, and trains); returns their
    configuration. Everything is checked before the model is changed."""
    directory = Path(directory)
    adapted = adapted_layers(directory, config, head)
    tensors = read_adapter(directory, config, adapted, head)
    lora = peft.lora_config(peft.read_config(directory), adapted)
    add_lora(body, lora, names=adapted)
    copy_adapter(body, tensors, head, directory)
    return lora


def load_adapter_weights(
    body: nn.Module,
    config: GPT2Config,
    directory: str | os.PathLike,
    head: nn.Linear | None = None,
) -> None:
    """Copy an adapter's weights into the body's existing LoRA layers (and the head): the
    adapter must adapt exactly those layers."""
    directory = Path(directory)
    adapted = adapted_layers(directory, config, head)
    if set(adapted) != set(lora_layers(body)):
        raise CheckpointError(
            f"{directory}: adapts {', '.join(sorted(adapted))}, but this model's LoRA layers "
            f"are {', '.join(sorted(lora_layers(body)))}"
        )
    copy_adapter(body, read_adapter(directory, config, adapted, head), head, directory)


def load_base(load: Callable[[str], Model], directory: Path) -> Model:
    """The model an adapter directory names as its base, loaded by `load(name_or_path)`."""
    base = peft.base_of(directory)
    try:
        return load(base)
    except (CheckpointError, FileNotFoundError) as e:
        raise CheckpointError(
            f"{directory}: cannot load the model these adapters were trained on ({e})"
        ) from None
