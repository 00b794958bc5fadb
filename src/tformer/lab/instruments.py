"""Instruments: where the gradient goes, how large the residual stream grows, how spread out
each head's attention is, and what every layer would already predict.

They work on any tformer model whose layers carry the hook points `hook_resid_pre` and
`hook_resid_post` (GPT-2's blocks, the encoder-decoder's encoder and decoder layers). With
x_l the residual stream entering layer l (x_0 the embeddings, x_L what leaves the last
layer), and L the mean cross-entropy loss of one batch:

    parameter gradient norm of a sublayer  ||dL/dθ||_2 over its parameters, its norm included
    residual gradient norm at layer l      ||dL/dx_l||_2 over the whole (B, T, C) tensor
    residual stream norm at layer l        mean over positions of ||x_l[b, t]||_2
    attention entropy of a head            mean over queries of  -Σ_s p_s ln p_s  (nats:
                                           0 for one key, ln S for S keys equally)
    logit lens at layer l                  unembed(final_norm(x_l))   (nostalgebraist, 2020)

Xiong et al. (2020, "On Layer Normalization in the Transformer Architecture") predict with
these: at initialisation, post-LN's parameter gradients grow towards the output layers, and
pre-LN's stay level. `tformer lab` measures it.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from tformer.data.tokens import IGNORE_INDEX
from tformer.nn.capture import run_with_cache
from tformer.nn.hooks import HookPoint


def residual_layers(model: nn.Module) -> list[str]:
    """The names of the layers that read and write the residual stream, input to output."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "hook_resid_pre", None), HookPoint)
        and isinstance(getattr(module, "hook_resid_post", None), HookPoint)
    ]
    if not names:
        raise TypeError(
            f"{type(model).__name__} has no layers with hook_resid_pre/hook_resid_post "
            "hook points; the instruments need a tformer model"
        )
    return names


def sublayer_groups(layer: nn.Module) -> dict[str, list[nn.Parameter]]:
    """A layer's parameters by sublayer: `attn_sublayer` (its LayerNorm) and `attn` go
    together as "attn", `mlp_sublayer` and `mlp` as "mlp", and so on."""
    groups: dict[str, list[nn.Parameter]] = {}
    for child_name, child in layer.named_children():
        params = list(child.parameters())
        if params:
            groups.setdefault(child_name.removesuffix("_sublayer"), []).extend(params)
    return groups


def norm_of(tensors: list[torch.Tensor]) -> float:
    """||(t_1, t_2, ...)||_2: the L2 norm of all the entries together."""
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors))


@dataclass
class GradientReport:
    """The gradients of one batch's loss, layer by layer (input to output)."""

    layers: list[str]
    sublayers: list[dict[str, float]]  # per layer: sublayer -> ||dL/dθ|| of its parameters
    parameters: list[float]  # per layer: ||dL/dθ|| over all of its parameters
    residual: list[float]  # per layer: ||dL/dx_l|| of the stream entering it
    loss: float

    def first_to_last(self) -> float:
        """||dL/dθ|| of the last layer over that of the first: about 1 when every layer
        gets the same gradient, large when the gradient grows towards the output. (In an
        encoder-decoder: the last decoder layer over the first encoder layer.)"""
        return self.parameters[-1] / self.parameters[0] if self.parameters[0] > 0 else math.inf


def gradient_report(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor
) -> GradientReport:
    """Backpropagate the mean cross-entropy of `model(*inputs)` on `targets` (IGNORE_INDEX
    skipped) and measure the gradients. The model's earlier gradients are cleared first;
    this batch's stay in each parameter's `.grad`."""
    layers = residual_layers(model)
    model.zero_grad(set_to_none=True)
    names = [f"{layer}.hook_resid_pre" for layer in layers]
    logits, cache = run_with_cache(model, *inputs, names=names, detach=False)
    streams = [cache[name] for name in names]
    for x in streams:
        if x.requires_grad:
            x.retain_grad()
    loss = nn.functional.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX
    )
    loss.backward()
    modules = dict(model.named_modules())
    sublayers, parameters = [], []
    for layer in layers:
        groups = sublayer_groups(modules[layer])
        grads = {
            name: [p.grad for p in params if p.grad is not None] for name, params in groups.items()
        }
        sublayers.append({name: norm_of(g) for name, g in grads.items()})
        parameters.append(norm_of([g for group in grads.values() for g in group]))
    residual = [norm_of([x.grad]) if x.grad is not None else math.nan for x in streams]
    return GradientReport(layers, sublayers, parameters, residual, float(loss.detach()))


@torch.no_grad()
def residual_norms(model: nn.Module, *inputs: torch.Tensor) -> list[float]:
    """Mean per-position L2 norm of the residual stream entering each layer, then of the
    stream leaving the last one (len = layers + 1). Every position counts, padding too:
    measure unpadded batches."""
    layers = residual_layers(model)
    names = [f"{layer}.hook_resid_pre" for layer in layers] + [f"{layers[-1]}.hook_resid_post"]
    _, cache = run_with_cache(model, *inputs, names=names)
    return [float(cache[name].float().norm(dim=-1).mean()) for name in names]


@torch.no_grad()
def attention_entropy(model: nn.Module, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each attention module's mean entropy per head (H,), in nats, by module name.

    Averaged over the batch and over the queries that see at least one key. A query that
    sees none (left padding under causal attention) has no distribution and is left out;
    other padded queries count like real ones, so measure unpadded batches.
    """
    _, cache = run_with_cache(model, *inputs, names=lambda name: name.endswith(".hook_pattern"))
    entropies = {}
    for name, p in cache.items():
        p = p.float()  # (B, H, T, S)
        plogp = torch.where(p > 0, p * p.clamp(min=1e-30).log(), 0.0)
        entropy = -plogp.sum(-1)  # (B, H, T)
        sees = p.sum(-1) > 0.5  # (B, H, T)
        per_head = (entropy * sees).sum((0, 2)) / sees.sum((0, 2)).clamp(min=1)  # (H,)
        entropies[name.removesuffix(".hook_pattern")] = per_head
    return entropies


def output_stack(model: nn.Module) -> tuple[str, nn.Module]:
    """The prefix of the layers whose stream becomes the logits, and the norm closing them."""
    if hasattr(model, "blocks") and hasattr(model, "final_norm"):  # GPT-2
        return "blocks", model.final_norm
    if hasattr(model, "decoder_layers") and hasattr(model, "decoder_norm"):  # encoder-decoder
        return "decoder_layers", model.decoder_norm
    raise TypeError(f"the logit lens needs a tformer model, got {type(model).__name__}")


def lens_streams(model: nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream after the embeddings and after each layer of the output stack,
    through the final norm: L + 1 tensors (B, T, C), ready for the unembedding."""
    prefix, norm = output_stack(model)
    layers = [name for name in residual_layers(model) if name.startswith(prefix + ".")]
    names = [f"{layers[0]}.hook_resid_pre"] + [f"{layer}.hook_resid_post" for layer in layers]
    _, cache = run_with_cache(model, *inputs, names=names)
    return [norm(cache[name]) for name in names]


@torch.no_grad()
def logit_lens(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """The logits each layer's residual stream would give if the model stopped there:
    (L + 1, B, T, V), from the embeddings (0) to the last layer's output (L), each through
    the final norm and the unembedding. The last equals the model's own logits. That is
    (L + 1) x B x T x V numbers: for long texts and large vocabularies, logit_lens_top."""
    return torch.stack([model.unembed(stream) for stream in lens_streams(model, *inputs)])


@torch.no_grad()
def logit_lens_top(
    model: nn.Module, *inputs: torch.Tensor, k: int = 1, vocab_limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit lens's k most likely tokens at every layer and position, and their
    probabilities: ids and probabilities (L + 1, B, T, k), one layer's logits at a time.
    With vocab_limit, over ids 0..vocab_limit-1 only (a tokenizer smaller than the model's
    vocabulary): the softmax over those."""
    tops = [
        torch.softmax(model.unembed(stream)[..., :vocab_limit].float(), dim=-1).topk(k, dim=-1)
        for stream in lens_streams(model, *inputs)
    ]
    return torch.stack([t.indices for t in tops]), torch.stack([t.values for t in tops])
