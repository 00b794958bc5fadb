"""Activation checkpointing (Chen et al., 2016, "Training deep nets with sublinear memory cost").

Backpropagation needs every layer's intermediate activations, so a plain forward pass keeps
them all: for a Transformer about L x (B T C x ~34 + B H T^2 x 5) bytes in 16-bit precision
(Korthikanti et al., 2022). With checkpointing, a layer keeps only its input (B, T, C) during
the forward pass and runs its forward again during the backward pass, just before its
gradients are needed: activation memory falls to L inputs plus one layer's intermediates,
for one more forward pass of every layer (about a third more arithmetic per step).

Random draws (dropout) are replayed exactly in the recomputation: torch's checkpoint saves
and restores the random state.
"""

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def run_layer(layer: Callable[..., torch.Tensor], *args, checkpointed: bool) -> torch.Tensor:
    """layer(*args), with its activations recomputed in the backward pass if `checkpointed`
    (and gradients are being recorded)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)
