"""GGUF files, llama.cpp's format: typed metadata, then named tensors of ggml types.

A GGUF file holds key/value metadata (`general.architecture`, the architecture's own keys
such as `gpt2.block_count`, the tokenizer under `tokenizer.ggml.*`) and tensors, each with a
ggml type. ggml lists a shape innermost first: PyTorch's row-major (out, in) weight is ggml's
{in, out}, the same bytes, so nothing is transposed on the way in or out.

The block-quantised types store each run of 32 consecutive values of a row as one float16
scale d and 32 small integers q, x ≈ d · q:

    q8_0   d = max|x| / 127                       q = round(x / d)             int8
    q4_0   d = m / -8, m the x of largest |x|     q = min(15, ⌊x / d + 8.5⌋) - 8   4 bits

Writing and reading go through the `gguf` package (llama.cpp's own Python code, on the
package index); its numpy quantisers are the reference implementations of ggml's. Reading
gives every tensor dequantised to float32, in PyTorch's order.

    write_gguf(path, "gpt2", metadata, {name: (array, "q8_0")})
    gguf = read_gguf(path)      # .metadata, .tensors (float32), .types ("f32", "q8_0", ...)
"""

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tformer.checkpoints.errors import CheckpointError
from tformer.files import atomic_write

MAGIC = b"GGUF"
# tformer's names for the ggml types it writes; reading takes any type gguf can dequantise.
TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # values per scale in q8_0 and q4_0


def ggml_type(name: str):
    """The gguf package's GGMLQuantizationType for one of TYPE_NAMES."""
    from gguf import GGMLQuantizationType

    if name not in TYPE_NAMES:
        raise ValueError(f"unknown GGUF type {name!r}; choose one of {', '.join(TYPE_NAMES)}")
    return GGMLQuantizationType[name.upper()]


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts as a GGUF file does."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def encode(array: np.ndarray, type_name: str) -> np.ndarray:
    """A float32 array in a ggml type's bytes (rows of whole blocks for q8_0 and q4_0)."""
    from gguf import quants

    array = np.ascontiguousarray(array, dtype=np.float32)
    if type_name == "f32":
        return array
    if type_name == "f16":
        return array.astype(np.float16)
    if type_name in ("q8_0", "q4_0") and array.shape[-1] % BLOCK:
        raise ValueError(
            f"{type_name} needs rows whose length is a multiple of {BLOCK}, not {array.shape[-1]}"
        )
    return quants.quantize(array, ggml_type(type_name))


def decode(data: np.ndarray, type_name: str) -> np.ndarray:
    """The float32 values of a tensor's data as `encode` gives (or a reader returns) it."""
    from gguf import GGMLQuantizationType, quants

    return quants.dequantize(data, GGMLQuantizationType[type_name.upper()]).astype(np.float32)


def write_gguf(
    path: str | os.PathLike,
    architecture: str,
    metadata: dict[str, Any],
    tensors: Iterable[tuple[str, np.ndarray, str]],
    progress: Callable[[str], None] | None = None,
) -> None:
    """Write a GGUF file atomically. `metadata` values are typed by their Python type: str,
    bool, int (uint32), float (float32), and lists of str or of int (int32). `tensors` are
    (name, float32 array in PyTorch's order, type name), encoded one by one; `progress`
    is called with each name once it is encoded."""
    from gguf import GGUFValueType, GGUFWriter

    def value_type(key: str, value: Any) -> tuple[GGUFValueType, GGUFValueType | None]:
        scalar = {bool: GGUFValueType.BOOL, int: GGUFValueType.UINT32,
                  float: GGUFValueType.FLOAT32, str: GGUFValueType.STRING}  # fmt: skip
        if type(value) in scalar:
            return scalar[type(value)], None
        if isinstance(value, list) and value and type(value[0]) in (str, int):
            item = GGUFValueType.STRING if isinstance(value[0], str) else GGUFValueType.INT32
            return GGUFValueType.ARRAY, item
        raise TypeError(f"GGUF metadata {key!r}: cannot store a {type(value).__name__}")

    def write(tmp: str) -> None:
        writer = GGUFWriter(tmp, architecture)
        try:
            for key, value in metadata.items():
                kind, item = value_type(key, value)
                writer.add_key_value(key, value, kind, sub_type=item)
            for name, array, type_name in tensors:  # encoded (quantised) here, the slow part
                raw = ggml_type(type_name) if type_name not in ("f32", "f16") else None
                writer.add_tensor(name, encode(array, type_name), raw_dtype=raw)
                if progress is not None:
                    progress(name)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:  # the file is closed, then atomic_write removes it if this failed
            writer.close()

    atomic_write(path, write)


@dataclass
class GGUFFile:
    """A GGUF file read whole: metadata by key, tensors float32 in PyTorch's order."""

    path: Path
    metadata: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]  # every tensor's, in PyTorch's order
    types: dict[str, str]  # every tensor's ggml type, lower case: "f32", "q4_0", ...
    tensors: dict[str, torch.Tensor] = field(repr=False)  # empty if read without them

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def require(self, key: str) -> Any:
        """A metadata value that must be there."""
        if key not in self.metadata:
            raise CheckpointError(f"{self.path}: the GGUF metadata lacks {key}")
        return self.metadata[key]


def read_gguf(path: str | os.PathLike, with_tensors: bool = True) -> GGUFFile:
    """Every key and every tensor (dequantised to float32) of a GGUF file; with_tensors
    False: the keys and the tensors' shapes and types alone."""
    from gguf import GGUFReader, GGUFValueType

    path = Path(path)
    if not is_gguf(path):
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    try:
        reader = GGUFReader(path)
        metadata = {}
        for key, item in reader.fields.items():
            if key.startswith("GGUF."):  # the header's own fields (version, counts)
                continue
            value = item.contents()
            if item.types and item.types[0] == GGUFValueType.ARRAY and not isinstance(value, list):
                value = list(value)
            metadata[key] = value
        tensors, shapes, types = {}, {}, {}
        for tensor in reader.tensors:
            types[tensor.name] = type_name = tensor.tensor_type.name.lower()
            shapes[tensor.name] = shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
            if with_tensors:
                values = decode(np.asarray(tensor.data), type_name).reshape(shape)
                tensors[tensor.name] = torch.from_numpy(np.array(values, copy=True))
    except CheckpointError:
        raise
    except (NotImplementedError, ValueError, KeyError, OSError) as e:  # truncated, foreign
        reason = " ".join(str(e).split())
        raise CheckpointError(
            f"{path}: cannot read this GGUF file ({type(e).__name__}: {reason})"
        ) from None
    return GGUFFile(path, metadata, shapes, types, tensors)
