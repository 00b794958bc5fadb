"""`tformer attention`: a picture of the attention weights on a piece of text."""

import torch

from tformer.checkpoints import resolve_checkpoint
from tformer.cli.common import (
    DefaultsFormatter,
    add_text_options,
    load_model,
    number,
    print_json,
)
from tformer.devices import pick_device
from tformer.generate.translate import sentence_pair
from tformer.lab.attention_plot import plot_attention
from tformer.models.load import is_translation_checkpoint, load_translation_model

MAX_TOKENS = 96  # beyond this a heatmap's labels are unreadable


def add_parser(sub) -> None:
    p = sub.add_parser(
        "attention",
        help="draw attention weights as heatmaps (PNG)",
        formatter_class=DefaultsFormatter,
        description="Run a checkpoint on --text and draw the attention weights of one layer: "
        "one head (--head) or all of them in a grid, with the tokens as axis labels. For a "
        "translation checkpoint --text is the source sentence; the target is --target or "
        "else the model's own greedy translation, and --stack picks the encoder's "
        "self-attention, the decoder's self-attention or its cross-attention (which source "
        "tokens each target token looks at).",
    )
    add_text_options(p)
    index = number(integer=True, low=0)
    p.add_argument("--layer", type=index, default=0, help="layer index, from 0")
    p.add_argument("--head", type=index, help="one head (default: all heads in a grid)")
    p.add_argument(
        "--stack",
        choices=["encoder", "decoder", "cross"],
        help="translation checkpoints: which attention to draw (default: cross)",
    )
    p.add_argument("--out", default="attention.png", help="the PNG to write")
    p.add_argument("--json", action="store_true", help="also print the weights as JSON")
    p.set_defaults(run=run)


def pick_heads(n_heads: int, head: int | None) -> list[int]:
    if head is None:
        return list(range(n_heads))
    if not 0 <= head < n_heads:
        raise ValueError(f"--head must be in 0..{n_heads - 1}, got {head}")
    return [head]


def check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise ValueError(f"--layer must be in 0..{n_layers - 1}, got {layer}")


def check_length(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"the {what} encodes to no tokens")
    if n > MAX_TOKENS:
        raise ValueError(
            f"the {what} has {n} tokens; a heatmap is readable up to {MAX_TOKENS}: shorten it"
        )


def gpt_weights(args) -> tuple[torch.Tensor, list[str], list[str], int, str]:
    if args.target is not None or args.stack is not None:
        raise ValueError("--target and --stack are for translation checkpoints")
    model, tokenizer = load_model(args.checkpoint, args.device, "float32")
    check_layer(args.layer, model.config.n_layers)
    ids = tokenizer.encode(args.text)
    check_length(len(ids), "text")
    if len(ids) > model.config.max_len:
        raise ValueError(f"the text is longer than the model's context ({model.config.max_len})")
    name = f"blocks.{args.layer}.attn.hook_pattern"
    with torch.inference_mode():
        device = next(model.parameters()).device
        _, cache = model.eval().run_with_cache(torch.tensor([ids], device=device), names=[name])
    tokens = [tokenizer.decode([i]) for i in ids]
    return cache[name][0], tokens, tokens, model.config.n_heads, "causal self-attention"


def seq2seq_weights(args, directory) -> tuple[torch.Tensor, list[str], list[str], int, str]:
    model, tokenizer = load_translation_model(directory, pick_device(args.device))
    c, stack = model.config, args.stack or "cross"
    check_layer(args.layer, c.n_encoder_layers if stack == "encoder" else c.n_decoder_layers)
    check_length(len(tokenizer.encode(args.text)), "text")
    with torch.inference_mode():
        src, target = sentence_pair(model, tokenizer, args.text, args.target)
        check_length(len(target), "target")
        device = next(model.parameters()).device
        src_ids = torch.tensor([src], device=device)
        tgt_in = torch.tensor([[c.bos_id, *target]], device=device)
        module, kind = {
            "encoder": (f"encoder_layers.{args.layer}.self_attn", "encoder self-attention"),
            "decoder": (f"decoder_layers.{args.layer}.self_attn", "decoder self-attention"),
            "cross": (f"decoder_layers.{args.layer}.cross_attn", "cross-attention"),
        }[stack]
        name = f"{module}.hook_pattern"
        _, cache = model.eval().run_with_cache(src_ids, tgt_in, names=[name])
    src_tokens = [tokenizer.decode([i]) for i in src[:-1]] + ["</s>"]
    tgt_tokens = ["<s>"] + [tokenizer.decode([i]) for i in target]
    queries = src_tokens if stack == "encoder" else tgt_tokens
    keys = tgt_tokens if stack == "decoder" else src_tokens
    return cache[name][0], queries, keys, c.n_heads, kind


def run(args) -> None:
    directory = resolve_checkpoint(args.checkpoint)
    if is_translation_checkpoint(directory):
        weights, queries, keys, n_heads, kind = seq2seq_weights(args, directory)
    else:
        weights, queries, keys, n_heads, kind = gpt_weights(args)
    heads = pick_heads(n_heads, args.head)
    title = f"layer {args.layer}, {kind}"
    path = plot_attention(weights, queries, keys, heads, title, args.out)
    if args.json:
        print_json(
            {
                "png": str(path),
                "layer": args.layer,
                "kind": kind,
                "query_tokens": queries,
                "key_tokens": keys,
                "weights": {str(h): weights[h].float().tolist() for h in heads},
            }
        )
    else:
        print(path)
