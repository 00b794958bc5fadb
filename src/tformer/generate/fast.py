"""Fast decoding: pack a model's weights narrower and say which path decoding takes.

Decoding one token reads every weight once, so on a CPU its speed is memory bandwidth
divided by the bytes of weights. `pack_for_decoding(model, "int8")` swaps every linear layer
of the blocks and the tied output head for a PackedLinear (tformer.nn.packed_linear) holding
float32, bfloat16 or int8 weights; embeddings, norms, attention and the KV cache stay
float32. On the CPU the packed layers run the C kernels in tformer.kernels when they build.

    path = pack_for_decoding(model, "bfloat16")
    print(path.describe())     # weights bfloat16 (activations float32); linear layers: ...

Packing is one-way (it rounds the weights): load the model again to train or save it.
"""

from dataclasses import dataclass

import torch
from torch import nn

from tformer import kernels
from tformer.nn.packed_linear import WEIGHT_DTYPES, PackedLinear


@dataclass(frozen=True)
class DecodingPath:
    """Where decoding's time goes: the stored weights and the kernels that read them."""

    weights: str  # float32, bfloat16, int8, or "model" (not packed: the model's own dtype)
    model_dtype: str  # the dtype of the model's parameters (activations, KV cache)
    device: str
    kernels: str | None  # the compiled C kernels' file, when they run the linear layers
    fallback_reason: str | None  # why torch runs them instead, on a CPU
    threads: int

    def describe(self) -> str:
        if self.weights == "model":
            stored = f"weights {self.model_dtype} (not packed)"
        elif self.weights == "int8":
            stored = "weights int8 (per-row scales, weight-only), activations float32"
        else:
            stored = f"weights {self.weights}, activations float32"
        if self.kernels is not None:
            linear = f"tformer C kernels, {self.threads} threads"
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
            "description": self.describe(),
        }


def pack_for_decoding(model: nn.Module, weights: str) -> DecodingPath:
    """Replace the linear layers of model.blocks and its output head with packed ones."""
    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
    if model.token_embedding.weight.dtype != torch.float32:
        raise ValueError(
            "pack a float32 model: packing keeps activations in float32 and rounds only the "
            f"weights, but this model is {model.token_embedding.weight.dtype}"
        )
    if model.packed_head is not None:
        raise ValueError("this model is packed already; load it again to pack it differently")
    model.eval()
    with torch.no_grad():
        for block in model.blocks:
            for module in list(block.modules()):
                for child_name, child in list(module.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(module, child_name, PackedLinear.from_linear(child, weights))
        model.packed_head = PackedLinear(model.token_embedding.weight, None, weights)
    return decoding_path(model)


def decoding_path(model: nn.Module) -> DecodingPath:
    """Which path a model's decoding takes, packed or not."""
    device = model.token_embedding.weight.device
    head = model.packed_head
    packed = isinstance(head, PackedLinear)
    runs_kernels = packed and head.kernels is not None
    return DecodingPath(
        weights=head.weight_dtype if packed else "model",
        model_dtype=str(model.token_embedding.weight.dtype).removeprefix("torch."),
        device=str(device),
        kernels=str(head.kernels.path) if runs_kernels else None,
        fallback_reason=kernels.unavailable_reason() if packed and device.type == "cpu" else None,
        threads=torch.get_num_threads(),
    )
