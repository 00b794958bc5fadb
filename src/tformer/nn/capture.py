"""Run a model and keep its named activations: `logits, cache = run_with_cache(model, ids)`.

Every `HookPoint` in a model has a stable name (`blocks.3.hook_resid_post`,
`blocks.3.attn.hook_pattern`), so capturing activations needs no model surgery: a forward
hook on each hook point copies what flows through it into a dictionary keyed by that name.

Attention weights exist only on the explicit attention path (the fused kernel never forms
them), so the run switches every attention module to it and back afterwards; the two paths
agree to float rounding, so the output is the model's usual one.
"""

from collections.abc import Callable, Collection

import torch
from torch import nn

from tformer.nn.attention import MultiHeadAttention
from tformer.nn.hooks import HookPoint

NameFilter = Callable[[str], bool] | Collection[str] | None


def hook_point_names(model: nn.Module) -> list[str]:
    """The names of every HookPoint in `model`, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, HookPoint)]


def _wanted(names: NameFilter) -> Callable[[str], bool]:
    if names is None:
        return lambda name: True
    if callable(names):
        return names
    chosen = set(names)
    return lambda name: name in chosen


def run_with_cache(
    model: nn.Module,
    *inputs: torch.Tensor,
    names: NameFilter = None,
    detach: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`model(*inputs)` and the activations at its hook points, by name.

    names: which hook points to keep: a collection of names, a predicate on the name, or
    None for all. With detach=False the cached tensors stay in the autograd graph (to read
    gradients with respect to them). Unknown names are an error, so a typo cannot silently
    capture nothing.
    """
    known = hook_point_names(model)
    if names is not None and not callable(names):
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(
                f"no hook point named {', '.join(unknown)}; this model has e.g. "
                f"{', '.join(known[:5])}"
            )
    wanted = _wanted(names)
    cache: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            cache[name] = output.detach() if detach else output

        return hook

    handles = [
        module.register_forward_hook(keep(name))
        for name, module in model.named_modules()
        if isinstance(module, HookPoint) and wanted(name)
    ]
    attention = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    implementations = [m.implementation for m in attention]
    try:
        for m in attention:
            m.implementation = "explicit"
        output = model(*inputs)
    finally:
        for m, implementation in zip(attention, implementations, strict=True):
            m.implementation = implementation
        for handle in handles:
            handle.remove()
    return output, cache
