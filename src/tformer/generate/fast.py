"""Fast decoding: pack a model's weights narrower and say which path decoding takes.

Decoding one token reads every weight once, so on a CPU its speed is memory bandwidth
divided by the bytes of weights. `pack_for_decoding(model, "int8")` swaps every linear
layer of the model (the blocks' and the tied output head) for a PackedLinear
(tformer.nn.packed_linear) holding float32, bfloat16, int8 or int4 weights (or w8a8 and
w4a8: int8 or int4 weights and int8 activations); embeddings, norms, attention and the KV
cache stay float32. On the CPU the packed layers run the C kernels in tformer.kernels when
they build.

    path = pack_for_decoding(model, "bfloat16")
    print(path.describe())     # weights bfloat16 (activations float32); linear layers: ...

Packing is one-way (it rounds the weights): load the model again to train or save it.
"""

from dataclasses import dataclass, replace

import torch
from torch import nn

from tformer import kernels
from tformer.models.load import load_gpt2_with_tokenizer
from tformer.nn.packed_linear import WEIGHT_DTYPES, pack_linear_layers, packed_layers
from tformer.tokenizers import Tokenizer


@dataclass(frozen=True)
class DecodingPath:
    """Where decoding's time goes: the stored weights and the kernels that read them."""

    weights: str  # float32, bfloat16, int8, int4, w8a8, w4a8, or "model" (not packed)
    model_dtype: str  # the dtype of the model's parameters (activations, KV cache)
    device: str
    kernels: str | None  # the compiled C kernels' file, when they run the linear layers
    fallback_reason: str | None  # why torch runs them instead, on a CPU
    threads: int
    parameters: int | None = None  # the model's, counted before packing (None: not known)
    fused: bool = False  # a decoding step's blocks in one kernel call (models/gpt2_decode.py)

    def describe(self) -> str:
        if self.weights == "model":
            stored = f"weights {self.model_dtype} (not packed)"
        elif self.weights == "int8":
            stored = "weights int8 (per-row scales, weight-only), activations float32"
        elif self.weights == "w8a8":
            stored = (
                "weights int8 (per-row scales), activations rounded to int8 (a scale per row "
                "at each step)"
            )
        elif self.weights == "int4":
            stored = (
                "weights int4 (a float16 scale per 32 weights of a row, weight-only; "
                "GPT-2's output head int8), activations float32"
            )
        elif self.weights == "w4a8":
            stored = (
                "weights int4 (a float16 scale per 32 weights of a row; GPT-2's output head "
                "int8, weight-only), activations rounded to int8 (a scale per 32 at each step)"
            )
        else:
            stored = f"weights {self.weights}, activations float32"
        if self.kernels is not None:
            linear = f"tformer C kernels, {self.threads} threads"
            if self.fused:
                linear += "; each decoding step's blocks in one call"
        elif self.weights == "model":
            linear = f"torch on {self.device}, {self.threads} threads"
        else:
            why = f" ({self.fallback_reason})" if self.fallback_reason else ""
            linear = f"torch on {self.device}{why}"
        return f"{stored}; linear layers: {linear}"

    def to_dict(self) -> dict:
        return {
            "weights": self.weights,
            "model_dtype": self.model_dtype,
            "device": self.device,
            "kernels": self.kernels,
            "fallback_reason": self.fallback_reason,
            "threads": self.threads,
            "parameters": self.parameters,
            "fused": self.fused,
            "description": self.describe(),
        }


def pack_for_decoding(model: nn.Module, weights: str) -> DecodingPath:
    """Replace every linear layer of the model with a packed one, in place."""
    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
    if packed_layers(model):
        raise ValueError("this model is packed already; load it again to pack it differently")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(
            "pack a float32 model: packing keeps activations in float32 and rounds only the "
            f"weights, but this model is {dtype}"
        )
    # int4 and w4a8 keep a model's output head in int8: the head is the matrix whose rounding
    # costs the most (llama.cpp's quantiser keeps it wider too, and `export gguf --type q4_0`).
    head = {"lm_head": "int8"} if weights in ("int4", "w4a8") else {}
    pack_linear_layers(model, weights, head)
    model.eval()  # the packed layers too
    fuse = getattr(model, "fuse_decoding", None)  # GPT-2's one-call decoding step
    if fuse is not None:
        fuse()
    return decoding_path(model)


def decoding_path(model: nn.Module) -> DecodingPath:
    """Which path a model's decoding takes, packed or not."""
    parameter = next(model.parameters())  # embeddings and norms are never packed
    layer = next(iter(packed_layers(model).values()), None)
    packed = layer is not None
    runs_kernels = packed and layer.kernels is not None
    return DecodingPath(
        weights=layer.weight_dtype if packed else "model",
        model_dtype=str(parameter.dtype).removeprefix("torch."),
        device=str(parameter.device),
        kernels=str(layer.kernels.path) if runs_kernels else None,
        fallback_reason=(
            kernels.unavailable_reason() if packed and parameter.device.type == "cpu" else None
        ),
        threads=torch.get_num_threads(),
        fused=getattr(model, "fused_decoding", None) is not None,
    )


def load_for_decoding(
    checkpoint: str, device: torch.device, dtype: str, quantize: str | None
) -> tuple[nn.Module, Tokenizer, DecodingPath]:
    """A GPT-2 checkpoint ready to decode, with its tokenizer and the path decoding takes:
    on the CPU (or quantized) its weights packed as `dtype` (as `quantize`, "int8", "int4",
    "w8a8" or "w4a8", where given), else the model in `dtype`; attention on the fused kernel, the
    fastest for decoding."""
    if device.type == "cpu" and dtype == "float16":
        raise ValueError("float16 is for GPUs; on the CPU use --dtype bfloat16 or float32")
    pack = device.type == "cpu" or quantize
    weights = torch.float32 if pack else getattr(torch, dtype)
    model, tokenizer = load_gpt2_with_tokenizer(checkpoint, device, weights)
    model.set_attention("sdpa")
    parameters = model.num_parameters()  # packed layers hold buffers, not parameters
    if pack:
        pack_for_decoding(model, quantize or dtype)
    return model, tokenizer, replace(decoding_path(model), parameters=parameters)
