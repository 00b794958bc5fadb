"""`tformer translate`: translate sentences, one a line, with an encoder-decoder checkpoint."""

import json
import sys
import time
from pathlib import Path

import torch

from tformer import kernels
from tformer.checkpoints import resolve_checkpoint
from tformer.cli.common import add_weight_flags, number, read_utf8
from tformer.devices import pick_device
from tformer.errors import ConfigError
from tformer.generate.beam import BeamConfig
from tformer.generate.fast import pack_for_decoding
from tformer.generate.translate import translate_sentences
from tformer.models.load import is_translation_checkpoint, load_translation_model
from tformer.nn.packed_linear import calibrate_kernel_rows


def add_parser(sub) -> None:
    p = sub.add_parser(
        "translate",
        help="translate sentences with an encoder-decoder checkpoint",
        description="Translate one sentence per line, from standard input (or --input FILE) "
        "to standard output, with a model trained by 'tformer train --task translation'. "
        "Beam search by default; --greedy for greedy search. A sentence longer than the "
        "context window is cut to fit, with a warning on standard error (and "
        "source_truncated in --json). On the CPU the weights are packed for tformer's C "
        "kernels (--dtype, --quantize), as `tformer generate` does.",
    )
    p.add_argument("checkpoint", help="run or checkpoint directory")
    p.add_argument("--input", help="a file of sentences, one a line (default: standard input)")
    p.add_argument("--beam-size", type=number(integer=True, low=1), default=4, help="(default: 4)")
    p.add_argument(
        "--length-penalty",
        type=number(),
        default=1.0,
        help="alpha in score = log p / length^alpha; 0 favours short outputs (default: 1.0)",
    )
    p.add_argument("--greedy", action="store_true", help="greedy search instead of beams")
    p.add_argument(
        "--early-stopping",
        action="store_true",
        help="stop a sentence once it has --beam-size finished hypotheses",
    )
    p.add_argument(
        "--max-new-tokens", type=number(integer=True, low=1), default=128, help="(default: 128)"
    )
    p.add_argument(
        "--batch-size",
        type=number(integer=True, low=1),
        default=32,
        help="sentences at once (default: 32)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    add_weight_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with the results")
    p.set_defaults(run=run)


def read_lines(path: str | None) -> list[str]:
    if path is None and sys.stdin.isatty():
        raise ValueError("no input: pipe sentences in, one a line, or give --input FILE")
    return read_utf8(path).splitlines()


def check_is_translation_model(checkpoint: str) -> Path:
    """The checkpoint's directory, refused with a clear message unless it holds a
    translation (encoder-decoder) model."""
    directory = resolve_checkpoint(checkpoint)
    if not is_translation_checkpoint(directory):
        raise ConfigError(
            f"{checkpoint} holds a language model (GPT-2), not a translation model: "
            "run it with 'tformer generate'"
        )
    return directory


def run(args) -> None:
    beam = None
    if not args.greedy:
        beam = BeamConfig(
            beam_size=args.beam_size,
            length_penalty=args.length_penalty,
            max_new_tokens=args.max_new_tokens,
            early_stopping=args.early_stopping,
        )
    sentences = read_lines(args.input)
    directory = check_is_translation_model(args.checkpoint)
    device = pick_device(args.device)
    if device.type == "cpu" and args.dtype == "float16":  # before loading anything
        raise ValueError("--dtype float16 is for GPUs; on the CPU use bfloat16 or float32")
    model, tokenizer = load_translation_model(directory, device)
    model.set_attention("sdpa")  # the fused kernel decodes faster, whatever trained the model
    quantize = None if args.quantize == "none" else args.quantize
    if device.type == "cpu" or quantize:  # the C kernels' panels and one-call decoder step
        pack_for_decoding(model, quantize or args.dtype)
        if device.type == "cpu" and kernels.load() is not None:  # measured once a CPU
            rows = args.batch_size * (1 if beam is None else beam.beam_size)
            # the output projection sees only the decoder's rows
            calibrate_kernel_rows(model, rows, cached=True, heads=("fused_decoding.head",))
    elif args.dtype != "float32":
        model.to(getattr(torch, args.dtype))
    start = time.perf_counter()
    # Empty lines stay empty: nothing to translate.
    todo = [i for i, s in enumerate(sentences) if s.strip()]
    done = translate_sentences(
        model, tokenizer, [sentences[i] for i in todo], beam, args.batch_size, args.max_new_tokens
    )
    translations = [""] * len(sentences)
    truncated = [False] * len(sentences)
    reasons: list[str | None] = [None] * len(sentences)  # None: an empty line, untouched
    for i, t in zip(todo, done, strict=True):
        translations[i], truncated[i], reasons[i] = t.text, t.source_truncated, t.finish_reason
    seconds = time.perf_counter() - start
    if args.json:
        tokens = sum(len(tokenizer.encode(t)) for t in translations)
        print(
            json.dumps(
                {
                    "translations": translations,
                    "source_truncated": truncated,
                    "finish_reason": reasons,
                    "sentences": len(sentences),
                    "seconds": round(seconds, 3),
                    "target_tokens_per_second": round(tokens / seconds, 1) if seconds else None,
                },
                ensure_ascii=False,
            )
        )
        return
    for t in translations:
        print(t)
