"""What every model here does the same way: count its parameters, switch its attention
path, and come to life from a checkpoint's tensors without drawing weights first."""

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from tformer.nn.attention import Implementation, set_implementation

Model = TypeVar("Model", bound=nn.Module)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, a tied or shared weight counted once."""
    return sum(p.numel() for p in model.parameters())


def switch_attention(model: nn.Module, implementation: Implementation) -> None:
    """Run the model's attention on the explicit, fused or blocked path from now on (see
    tformer.nn.attention.set_implementation); model.config records the choice."""
    set_implementation(model, implementation)
    model.config.attention = implementation


def from_state(
    build: Callable[[], Model],
    state: dict[str, torch.Tensor],
    device: torch.device | str,
    dtype: torch.dtype,
) -> Model:
    """`build()` on the meta device (no memory, no initialisation), then every tensor taken
    from `state` as it is, moved to `device` and `dtype`. Buffers that checkpoints do not
    hold stay on the meta device: the caller makes them."""
    with torch.device("meta"):
        model = build()
    state = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model
