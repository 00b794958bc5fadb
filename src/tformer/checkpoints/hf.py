"""Checkpoint directories in the Hugging Face layout: weight files, config.json, the Hub.

A checkpoint is a directory with `config.json` and the weights in `model.safetensors` (or a
sharded `model.safetensors.index.json`, or the older `pytorch_model.bin`), read here into a
flat dictionary name -> tensor whatever the format. Writing is always one safetensors file
and config.json, each replaced atomically (tformer.files). Which tensors a model has, and
what config.json means, is each model's own knowledge (tformer.models).
"""

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from tformer.checkpoints.errors import CheckpointError
from tformer.checkpoints.gguf import is_gguf
from tformer.files import atomic_write, atomic_write_json, read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# A Hub model id: "gpt2" or "owner/name".
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, from whichever weight format it holds."""
    from safetensors.torch import load_file

    if (directory / WEIGHTS_FILE).is_file():
        return _load(load_file, directory / WEIGHTS_FILE)
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


def _load(loader: Callable[[str], dict], path: Path) -> dict[str, torch.Tensor]:
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


def safetensor_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file (none if it cannot be read: loading says why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (OSError, RuntimeError, ValueError):
        return []


def read_model_config(directory: Path) -> dict:
    """The checkpoint's config.json as a dictionary."""
    try:
        return read_json(directory / CONFIG_FILE, "the model's config")
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None


def write_model(
    directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict
) -> None:
    """Write model.safetensors, then config.json, each atomically. Tensors must not share
    memory: a model with tied weights passes each once."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    atomic_write(
        directory / WEIGHTS_FILE, lambda tmp: save_file(flat, tmp, metadata={"format": "pt"})
    )
    atomic_write_json(directory / CONFIG_FILE, config)


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """A local checkpoint directory, a GGUF file (llama.cpp's; returned as it is), or a Hub
    name downloaded through huggingface_hub."""
    path = Path(path_or_name).expanduser()
    if path.is_dir() or is_gguf(path):
        return path
    if path.exists():
        raise CheckpointError(
            f"{path} is a file and not a GGUF file; pass the directory that holds config.json "
            "and the weights, or a .gguf file"
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
