"""GGUF files, llama.cpp's format: typed metadata, then named tensors of ggml types.

A GGUF file holds key/value metadata (`general.architecture`, the architecture's own keys
such as `gpt2.block_count`, the tokenizer under `tokenizer.ggml.*`) and tensors, each with a
ggml type. ggml lists a shape innermost first: PyTorch's row-major (out, in) weight is ggml's
{in, out}, the same bytes, so nothing is transposed on the way in or out.

The block-quantised types store each run of 32 consecutive values of a row as one float16
scale d and 32 small integers q, x ≈ d · q:

    q8_0   d = max|x| / 127                       q = round(x / d)             int8
    q4_0   d = m / -8, m the x of largest |x|     q = min(15, ⌊x / d + 8.5⌋) - 8   4 bits

Writing goes through the `gguf` package (llama.cpp's own Python code, on the package
index), and so does every tensor's decoding: its numpy quantisers are the reference
implementations of ggml's. Reading parses the file's layout here (GGUFCursor), a few dozen
lines of the spec: the package's reader makes a numpy view of every part of every value,
3 s for GPT-2's 50,257 tokens and 50,000 merges, where this takes 0.3 s (docs/LOG.md).
Reading gives every tensor dequantised to float32, in PyTorch's order.

The layout (GGUF versions 2 and 3, little-endian): "GGUF", version u32, tensor count u64,
metadata count u64; each metadata entry a string key, a value type u32 and the value
(strings are a u64 length and UTF-8 bytes; arrays an item type u32, a count u64 and the
items); each tensor's info: name, dimension count u32, dimensions u64 (innermost first),
ggml type u32, offset u64 from the data's start, which is the end of the infos rounded up
to `general.alignment` (32 when absent).

    write_gguf(path, "gpt2", metadata, {name: (array, "q8_0")})
    gguf = read_gguf(path)      # .metadata, .tensors (float32), .types ("f32", "q8_0", ...)
"""

import math
import os
import struct
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


# The metadata's value types (gguf's GGUFValueType): the fixed-size ones by struct format
# and numpy dtype (for arrays of them, read whole).
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                  11: "q", 12: "d"}  # fmt: skip
SCALAR_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32,
                 5: np.int32, 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64,
                 12: np.float64}  # fmt: skip
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


class GGUFCursor:
    """Reads a GGUF file's little-endian values front to back from a buffer (the file
    mapped into memory). A value that runs past the end raises ValueError."""

    def __init__(self, buffer: np.ndarray) -> None:
        self.buffer, self.at = buffer, 0

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.at + size > len(self.buffer):
            raise ValueError(f"the file ends inside a value at byte {self.at}")
        value = struct.unpack_from("<" + fmt, self.buffer, self.at)[0]
        self.at += size
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.at + n > len(self.buffer):
            raise ValueError(f"the file ends inside a string at byte {self.at}")
        text = bytes(self.buffer[self.at : self.at + n]).decode("utf-8")
        self.at += n
        return text

    def value(self, kind: int) -> Any:
        """One value of a metadata value type: int, float, bool, str or a list of them."""
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, n = self.scalar("I"), self.scalar("Q")
            if item in SCALAR_DTYPES:  # numbers side by side: one read
                array = np.frombuffer(self.buffer, SCALAR_DTYPES[item], n, self.at)
                self.at += array.nbytes
                return array.tolist()
            return [self.value(item) for _ in range(n)]
        if kind not in SCALAR_FORMATS:
            raise ValueError(f"unknown GGUF value type {kind} at byte {self.at}")
        return self.scalar(SCALAR_FORMATS[kind])


def read_gguf(path: str | os.PathLike, with_tensors: bool = True) -> GGUFFile:
    """Every key and every tensor (dequantised to float32) of a GGUF file; with_tensors
    False: the keys and the tensors' shapes and types alone."""
    path = Path(path)
    if not is_gguf(path):
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    try:
        return _read_gguf(path, with_tensors)
    except CheckpointError:
        raise
    except (NotImplementedError, ValueError, KeyError, OSError, struct.error) as e:
        reason = " ".join(str(e).split())  # truncated, foreign
        raise CheckpointError(
            f"{path}: cannot read this GGUF file ({type(e).__name__}: {reason})"
        ) from None


# ggml types whose tensors are arrays of one numpy dtype; the others (block-quantised,
# bfloat16) are bytes, as the gguf package's reader gives them to its dequantiser.
TYPED = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
         "I16": np.int16, "I32": np.int32, "I64": np.int64}  # fmt: skip


def _read_gguf(path: Path, with_tensors: bool) -> GGUFFile:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = GGUFCursor(buffer)
    cursor.at = len(MAGIC)
    version = cursor.scalar("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}: tformer reads versions 2 and 3")
    n_tensors, n_metadata = cursor.scalar("Q"), cursor.scalar("Q")
    metadata = {}
    for _ in range(n_metadata):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.scalar("Q") for _ in range(cursor.scalar("I"))]  # innermost first
        infos.append((name, dims, GGMLQuantizationType(cursor.scalar("I")), cursor.scalar("Q")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    start = -(-cursor.at // alignment) * alignment
    tensors, shapes, types = {}, {}, {}
    for name, dims, ggml, offset in infos:
        if name in types:
            raise ValueError(f"two tensors are named {name!r}")
        types[name] = type_name = ggml.name.lower()
        shapes[name] = shape = tuple(int(n) for n in reversed(dims))
        if not with_tensors:
            continue
        block, size = GGML_QUANT_SIZES[ggml]
        count = math.prod(shape)
        if ggml.name in TYPED:
            data = np.frombuffer(buffer, TYPED[ggml.name], count, start + offset).reshape(shape)
        else:
            data = np.frombuffer(buffer, np.uint8, count * size // block, start + offset)
            data = data.reshape(quant_shape_to_byte_shape(shape, ggml))
        values = decode(data, type_name).reshape(shape)
        tensors[name] = torch.from_numpy(np.array(values, copy=True))
    return GGUFFile(path, metadata, shapes, types, tensors)
