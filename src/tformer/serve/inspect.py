"""POST /v1/inspect: what the served language model does inside, on a piece of text.

tformer's own endpoint, for the playground's Inside tab (and anyone curious). The text is
run through the model once per instrument of tformer.lab.instruments, on the scheduler's
thread between two decoding steps (the hooks must not see other requests' steps), and the
numbers are made JSON on another thread:

    attention        every head's pattern in `layer`: softmax(Q K^T / sqrt(d) + M),
                     (H, T, T), row t the distribution token t puts over tokens 0..t
    logit lens       at every layer l = 0 (embeddings) .. L and position t, the `top` most
                     likely next tokens of unembed(final_norm(x_l[t])) and their probabilities
    residual norms   the mean ||x_l[t]||_2 over positions, entering each layer, then leaving
                     the last (L + 1 values)

For a translation model the text is the source and `target` its translation (the model's
own greedy one if not given); the attention is that of `stack`'s layer `layer`: "cross"
(the default), (H, T, S), row t the distribution target token t (after the start token)
puts over the source tokens, its alignment; "encoder", source over source; "decoder",
target over the target before it. The logit lens runs over the decoder's positions, the
residual norms over the encoder's layers, then the decoder's. It runs on the service's
worker thread, in turn with the translations.

Bounds: the text (and the target) at most MAX_INSPECT_TOKENS tokens and the model's context
window, the smaller; beyond it, or with a layer the model does not have, a 400 naming the
field.
"""

import asyncio
from contextlib import contextmanager

import torch

from tformer.generate.beam import greedy_search
from tformer.lab.instruments import logit_lens_top, residual_layers, residual_norms
from tformer.models.load import TRANSLATION
from tformer.serve.applications import encode_text, on_worker
from tformer.serve.errors import APIError, busy, invalid
from tformer.serve.protocol import InspectRequest
from tformer.serve.scheduler import QueueFull
from tformer.serve.service import Service

# Attention for T tokens is H x T x T numbers: 256 tokens and 12 heads are 0.8M, ~6 MB of
# JSON; past that a heatmap is no longer readable anyway.
MAX_INSPECT_TOKENS = 256


async def inspect(service: Service, req: InspectRequest) -> dict:
    translation = service.kind == TRANSLATION
    # a translation's source ends with </s>, which takes a place of the window
    window = service.context_length - 1 if translation else service.context_length
    ids = checked_text(service, "text", req.text, window)
    if translation:
        stack = req.stack or "cross"
        config = service.model.config
        n_layers = config.n_encoder_layers if stack == "encoder" else config.n_decoder_layers
        target = None  # the model's own translation
        if req.target is not None:
            target = checked_text(service, "target", req.target, service.context_length - 1)
    else:
        n_layers = service.model.config.n_layers
        for name in ("target", "stack"):
            if getattr(req, name) is not None:
                raise invalid(f"{name} is for translation models; this is a language model", name)
    if req.layer >= n_layers:
        raise invalid(
            f"layer is {req.layer}, but this model's layers are 0..{n_layers - 1}", "layer"
        )
    if translation:
        result = await on_worker(
            service, lambda: inside_translation(service, ids, target, stack, req.layer, req.top)
        )
        return {"object": "inspection", "model": service.model_id, **result}
    try:
        future = service.scheduler.call(lambda: look_inside(service, ids, req.layer, req.top))
    except QueueFull as e:
        raise busy(str(e)) from None
    try:
        measured = await asyncio.wrap_future(future)
    except QueueFull as e:  # the server shut down before the call ran
        raise APIError(503, str(e), code="shutting_down") from None
    # Formatting H x T x T weights as JSON takes a while: off the scheduler's thread.
    result = await asyncio.to_thread(as_json, service, ids, req.layer, *measured)
    return {"object": "inspection", "model": service.model_id, **result}


def checked_text(service: Service, name: str, text: str, window: int) -> list[int]:
    """A text's ids, or a 400 naming `name` when it is empty or too long to inspect."""
    ids = encode_text(service, name, text, name)
    most = min(MAX_INSPECT_TOKENS, window)
    if len(ids) > most:
        raise invalid(
            f"the {name} is {len(ids)} tokens long; /v1/inspect takes at most {most} "
            f"(the model's context window or {MAX_INSPECT_TOKENS}, the smaller)",
            name,
        )
    return ids


@contextmanager
def explicit_attention(model):
    """The model's attention on the explicit path, the only one that forms the pattern a
    hook can capture, then back on the path it was on."""
    previous = model.config.attention
    model.set_attention("explicit")
    try:
        yield
    finally:
        model.set_attention(previous)


def vocab_limit(service: Service) -> int:
    """Ids a prediction may take: those both the model and its tokenizer have."""
    return min(service.tokenizer.vocab_size, service.model.config.vocab_size)


def look_inside(service: Service, ids: list[int], layer: int, top: int) -> tuple:
    """The instruments on one text (on the scheduler's thread): the layer's attention
    (H, T, T), the residual norms, and the logit lens's ids and probabilities."""
    model = service.model
    x = torch.tensor([ids], device=next(model.parameters()).device)  # (1, T)
    limit = vocab_limit(service)
    with explicit_attention(model), torch.inference_mode():
        name = f"blocks.{layer}.attn.hook_pattern"
        _, cache = model.run_with_cache(x, names=[name])
        norms = residual_norms(model, x)
        lens = logit_lens_top(model, x, k=min(top, limit), vocab_limit=limit)
    return cache[name][0].float().cpu(), norms, lens[0].cpu(), lens[1].cpu()


def as_json(
    service: Service,
    ids: list[int],
    layer: int,
    pattern: torch.Tensor,
    norms: list[float],
    lens_ids: torch.Tensor,
    lens_probs: torch.Tensor,
) -> dict:
    """What look_inside measured, as the response's fields."""
    tokenizer, model = service.tokenizer, service.model
    return {
        "tokens": [tokenizer.decode([i]) for i in ids],
        "token_ids": ids,
        "n_layers": model.config.n_layers,
        "n_heads": model.config.n_heads,
        "layer": layer,
        "attention": weights_json(pattern),
        "logit_lens": lens_json(tokenizer, lens_ids, lens_probs),
        "residual_norms": norms,  # entering each layer, then leaving the last
        "residual_layers": [*residual_layers(model), "out"],
    }


def weights_json(pattern: torch.Tensor) -> list:
    """(H, T, S) attention weights -> nested lists, 4 decimals."""
    return [[[round(w, 4) for w in row] for row in head] for head in pattern.tolist()]


def lens_json(tokenizer, lens_ids: torch.Tensor, lens_probs: torch.Tensor) -> list:
    """The logit lens's (L + 1, 1, T, k) ids and probabilities -> [layer 0..L][position]
    [rank] -> {token, id, probability}."""
    text = {i: tokenizer.decode([i]) for i in set(lens_ids.flatten().tolist())}
    return [
        [
            [
                {"token": text[i], "id": i, "probability": round(p, 5)}
                for i, p in zip(ids_t.tolist(), probs_t.tolist(), strict=True)
            ]
            for ids_t, probs_t in zip(layer_ids[0], layer_probs[0], strict=True)
        ]
        for layer_ids, layer_probs in zip(lens_ids, lens_probs, strict=True)
    ]


def inside_translation(
    service: Service,
    source: list[int],
    target: list[int] | None,
    stack: str,
    layer: int,
    top: int,
) -> dict:
    """A translation model's instruments on a source and target (on the worker thread)."""
    model, tokenizer = service.model, service.tokenizer
    c = model.config
    device = next(model.parameters()).device
    src = [*source, c.eos_id]  # as the model reads a source: ending with </s>
    limit = min(tokenizer.vocab_size, c.tgt_vocab_size)
    if target is None:  # as long as an inspected text may be, in the tokenizer's ids
        most = min(MAX_INSPECT_TOKENS, c.max_len - 1)
        with torch.inference_mode():
            target = greedy_search(model, torch.tensor([src], device=device), most, limit)[0]
        if not target:
            raise invalid("the model's translation of the text is empty: give a target", "text")
    module = {
        "encoder": f"encoder_layers.{layer}.self_attn",
        "decoder": f"decoder_layers.{layer}.self_attn",
        "cross": f"decoder_layers.{layer}.cross_attn",
    }[stack]
    name = f"{module}.hook_pattern"
    tgt_in = [c.bos_id, *target]
    inputs = (torch.tensor([src], device=device), torch.tensor([tgt_in], device=device))
    with explicit_attention(model), torch.inference_mode():
        _, cache = model.run_with_cache(*inputs, names=[name])
        norms = residual_norms(model, *inputs)
        lens_ids, lens_probs = logit_lens_top(model, *inputs, k=min(top, limit), vocab_limit=limit)
    source_tokens = [tokenizer.decode([i]) for i in src[:-1]] + ["</s>"]
    target_tokens = ["<s>"] + [tokenizer.decode([i]) for i in target]
    queries = source_tokens if stack == "encoder" else target_tokens
    keys = target_tokens if stack == "decoder" else source_tokens
    return {
        "tokens": source_tokens,
        "target_tokens": target_tokens,
        "query_tokens": queries,
        "key_tokens": keys,
        "text": tokenizer.decode(src[:-1]),
        "target": tokenizer.decode(target),
        "stack": stack,
        "n_layers": c.n_encoder_layers if stack == "encoder" else c.n_decoder_layers,
        "n_heads": c.n_heads,
        "layer": layer,
        "attention": weights_json(cache[name][0].float()),
        "logit_lens": lens_json(tokenizer, lens_ids.cpu(), lens_probs.cpu()),  # target positions
        "residual_norms": norms,  # encoder layers, then decoder layers, then leaving the last
        "residual_layers": [*residual_layers(model), "out"],
    }
