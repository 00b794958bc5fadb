"""`tformer inspect`: a checkpoint's insides, layer by layer, on a piece of text."""

import math

import torch

from tformer.checkpoints import resolve_checkpoint
from tformer.cli.common import DefaultsFormatter, add_text_options, load_model, print_json
from tformer.devices import pick_device
from tformer.generate.limits import warn_truncated
from tformer.generate.translate import sentence_pair
from tformer.lab.attention_plot import token_label
from tformer.lab.instruments import (
    attention_entropy,
    gradient_report,
    logit_lens,
    residual_norms,
)
from tformer.lab.report import json_safe
from tformer.models.load import is_translation_checkpoint, load_translation_model


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="per-layer gradients, residual norms, attention entropy and the logit lens",
        formatter_class=DefaultsFormatter,
        description="Run a checkpoint on --text (each token predicting the next) and report, "
        "layer by layer: the residual stream's mean norm, the gradient norm of each "
        "sublayer's parameters and of the residual stream entering the layer, each head's "
        "attention entropy (nats), and the logit lens: the loss, and the top prediction at "
        "the last position, if the model stopped after that layer. For a translation "
        "checkpoint --text is the source and the target is --target or the model's greedy "
        "translation.",
    )
    add_text_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def gpt_inputs(args):
    if args.target is not None:
        raise ValueError("--target is for translation checkpoints")
    model, tokenizer = load_model(args.checkpoint, args.device, "float32")
    ids = tokenizer.encode(args.text)
    if len(ids) > model.config.max_len + 1:  # inputs and the targets one token on
        warn_truncated(
            f"--text is {len(ids)} tokens; only its first {model.config.max_len + 1} fit the "
            f"model's window of {model.config.max_len} and are inspected"
        )
        ids = ids[: model.config.max_len + 1]
    if len(ids) < 2:
        raise ValueError("--text must be at least two tokens long: each predicts the next")
    ids = torch.tensor([ids], device=next(model.parameters()).device)
    return model, tokenizer, (ids[:, :-1],), ids[:, 1:]


def seq2seq_inputs(args, directory):
    model, tokenizer = load_translation_model(directory, pick_device(args.device))
    src, target = sentence_pair(model, tokenizer, args.text, args.target)
    c, device = model.config, next(model.parameters()).device
    src_ids = torch.tensor([src], device=device)
    tgt_in = torch.tensor([[c.bos_id, *target]], device=device)
    targets = torch.tensor([[*target, c.eos_id]], device=device)
    return model, tokenizer, (src_ids, tgt_in), targets


def run(args) -> None:
    directory = resolve_checkpoint(args.checkpoint)
    if is_translation_checkpoint(directory):
        model, tokenizer, inputs, targets = seq2seq_inputs(args, directory)
    else:
        model, tokenizer, inputs, targets = gpt_inputs(args)
    model.eval()  # no dropout: the numbers describe the model itself
    grads = gradient_report(model, inputs, targets)
    model.zero_grad(set_to_none=True)
    norms = residual_norms(model, *inputs)
    entropy = attention_entropy(model, *inputs)
    lens = logit_lens(model, *inputs)  # (L + 1, 1, T, V)
    lens_loss = [
        float(torch.nn.functional.cross_entropy(layer[0].float(), targets[0])) for layer in lens
    ]
    lens_top = [token_label(tokenizer.decode([int(layer[0, -1].argmax())])) for layer in lens]
    layers = []
    for i, name in enumerate(grads.layers):
        heads = {k: v.tolist() for k, v in entropy.items() if k.startswith(name + ".")}
        layers.append(
            {
                "layer": name,
                "residual_norm_in": norms[i],
                "residual_grad_in": grads.residual[i],
                "parameter_grads": grads.sublayers[i],
                "attention_entropy": heads,
            }
        )
    result = {
        "checkpoint": args.checkpoint,
        "tokens": int(targets.numel()),
        "loss": grads.loss,
        "residual_norm_out": norms[-1],
        "layers": layers,
        "logit_lens": {"loss": lens_loss, "top_token_at_last_position": lens_top},
    }
    if args.json:
        print_json(json_safe(result))
        return
    print(f"{result['tokens']} tokens, loss {grads.loss:.4f}")
    print(f"{'layer':<20} {'|x| in':>8} {'|dL/dx| in':>11}  parameter gradients; entropy")
    for row in layers:
        grad_text = ", ".join(f"{k} {v:.2e}" for k, v in row["parameter_grads"].items())
        entropy_text = "; ".join(
            f"{k.rsplit('.', 1)[-1]} " + " ".join(f"{h:.2f}" for h in v)
            for k, v in row["attention_entropy"].items()
        )
        print(
            f"{row['layer']:<20} {row['residual_norm_in']:>8.3f} "
            f"{row['residual_grad_in']:>11.3e}  {grad_text}; {entropy_text}"
        )
    print(f"{'(out)':<20} {norms[-1]:>8.3f}")
    print("logit lens (0 = embeddings): loss, top token at the last position")
    for i, (loss, top) in enumerate(zip(lens_loss, lens_top, strict=True)):
        loss_text = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
        print(f"  {i:>3}  {loss_text:>8}  {top}")
