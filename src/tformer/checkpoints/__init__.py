"""Checkpoint file formats that know no model class.

    hf      Hugging Face checkpoint directories: weight files (safetensors, sharded, .bin),
            config.json, Hub downloads, atomic writing
    names   translating a state dict through a model's name table, with error reports
    peft    LoRA adapters in PEFT's layout

Models (tformer.models) supply what only they know: their config.json fields and the table
of their tensor names.
"""

from tformer.checkpoints.errors import CheckpointError
from tformer.checkpoints.hf import (
    name_or_path,
    read_model_config,
    read_tensors,
    resolve_checkpoint,
    safetensor_names,
    write_model,
)
from tformer.checkpoints.names import NameTable, strip_prefix, tensors_from_table, tensors_to_table

__all__ = [
    "CheckpointError",
    "NameTable",
    "name_or_path",
    "read_model_config",
    "read_tensors",
    "resolve_checkpoint",
    "safetensor_names",
    "strip_prefix",
    "tensors_from_table",
    "tensors_to_table",
    "write_model",
]
