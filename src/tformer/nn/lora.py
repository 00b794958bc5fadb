"""Low-rank adaptation, LoRA (Hu et al., 2021).

Fine-tuning changes a pre-trained weight W (out x in) by some dW, and dW tends to have low
"intrinsic rank". LoRA freezes W and learns dW as a product of two thin matrices:

    h = x W^T + b + (alpha / r) dropout(x) A^T B^T,     A (r x in), B (out x r)

A starts random (Kaiming-uniform with a = sqrt(5), nn.Linear's own initialisation, as PEFT
does), B at zero, so the adapted model starts exactly equal to the base. Only A and B
train: r (in + out) numbers per layer instead of in x out. Merging folds the update into
the weight for inference at no extra cost:

    W' = W + (alpha / r) B A

The names follow PEFT's (`lora_A`, `lora_B`), and a LoRA layer is an nn.Linear whose own
`weight` and `bias` are the frozen base, so the base keeps its parameter names.
"""

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from tformer.checks import check_number
from tformer.errors import ConfigError
from tformer.nn.dropout import Dropout
from tformer.nn.sublayer import SublayerConnection


@dataclass
class LoRAConfig:
    rank: int = 8  # r
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapter's input only
    targets: tuple[str, ...] = ("w_qkv",)  # linear layers, by the last part of their name

    def __post_init__(self) -> None:
        rank = self.rank
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ConfigError(
                f"the LoRA rank must be positive (an integer >= 1), got {self.rank!r}"
            )
        check_number("LoRA alpha", self.alpha, low=0.0, low_open=True)
        check_number("LoRA dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        names = isinstance(self.targets, list | tuple)
        if not names or not all(isinstance(t, str) for t in self.targets):
            raise ConfigError(f"LoRA targets must be layer names, got {self.targets!r}")
        self.targets = tuple(self.targets)
        if not self.targets:
            raise ConfigError("LoRA needs at least one target module")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable rank-r update: (..., in) -> (..., out)."""

    def __init__(
        self, base: nn.Linear, config: LoRAConfig, generator: torch.Generator | None = None
    ) -> None:
        """`generator` (on the CPU) draws A; None: torch's global generator."""
        has_bias = base.bias is not None
        super().__init__(base.in_features, base.out_features, bias=has_bias, device="meta")
        self.weight = base.weight  # the same tensors: no copy of the base
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, config.rank, bias=False, **factory)
        self.lora_B = nn.Linear(config.rank, base.out_features, bias=False, **factory)
        a = torch.empty(self.lora_A.weight.shape)  # drawn on the CPU, the same everywhere
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = Dropout(config.dropout)
        self.scaling = config.scaling

    def reset_parameters(self) -> None:
        """The base weights are given, never drawn (nn.Linear's constructor calls this)."""
        return

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))  # (..., out)
        return super().forward(x) + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A: (out, in), the update as one matrix."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain linear layer computing the same function: W + (alpha / r) B A, frozen like
        the rest of the adapted model (requires_grad_(True) to train it further)."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        merged = merged.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.weight + self.delta_weight())
            if self.bias is not None:
                merged.bias.copy_(self.bias)
        return merged.requires_grad_(False)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer of `model`, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(
    model: nn.Module, config: LoRAConfig, names: list[str] | None = None, seed: int | None = None
) -> list[str]:
    """Freeze `model` and put a LoRA update on each linear layer named by config.targets
    (the last part of its name, e.g. every block's `w_qkv`), or on exactly the layers
    `names` (full module names). Returns the adapted layers' names; a target that matches
    nothing is an error. The A matrices are drawn from `seed` (None: torch's global
    generator), layer by layer in the model's order."""
    if lora_layers(model):
        raise ValueError("this model already has LoRA layers; merge them first")
    linear = {name for name, module in model.named_modules() if type(module) is nn.Linear}
    if names is not None:
        unknown = [name for name in names if name not in linear]
        if unknown:
            raise ValueError(f"not linear layers of this model: {', '.join(unknown)}")
        return _adapt(model, config, list(names), seed)
    return _adapt(model, config, target_layers(model, config), seed)


def target_layers(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The full names of the linear layers config.targets names (by the last part of their
    name); a target that matches nothing is an error."""
    chosen = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in config.targets
    ]
    found = {name.rsplit(".", 1)[-1] for name in chosen}
    missing = [t for t in config.targets if t not in found]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear}
        )
        raise ValueError(
            f"no linear layer named {', '.join(missing)}; this model's are: {', '.join(linear)}"
        )
    return chosen


def _adapt(model: nn.Module, config: LoRAConfig, names: list[str], seed: int | None) -> list[str]:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), config, generator))
    norms_write_bf16(model, False)
    return names


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every LoRA update into its weight (W + (alpha / r) B A) and drop the adapters;
    the model computes the same function, at the base model's cost."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        _replace(model, name, layer.merged())
    norms_write_bf16(model, True)
    return list(layers)


def norms_write_bf16(model: nn.Module, on: bool) -> None:
    """Whether the pre-LN norms of `model` may write bf16 for their sublayers' products
    (nn/sublayer.py): not while LoRA adapters read a norm's output beside their base
    layer, where autograd would sum the two gradients in bf16 instead of float32."""
    for module in model.modules():
        if isinstance(module, SublayerConnection):
            module.norm_writes_bf16 = on


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
