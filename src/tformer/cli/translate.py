"""`tformer translate`: translate sentences, one a line, with an encoder-decoder checkpoint."""

import json
import sys
import time

from tformer.checkpoints import resolve_checkpoint
from tformer.devices import pick_device
from tformer.generate.beam import BeamConfig
from tformer.generate.translate import translate
from tformer.models.seq2seq import Seq2SeqTransformer
from tformer.tokenizers import load_tokenizer


def add_parser(sub) -> None:
    p = sub.add_parser(
        "translate",
        help="translate sentences with an encoder-decoder checkpoint",
        description="Translate one sentence per line, from standard input (or --input FILE) "
        "to standard output, with a model trained by 'tformer train --task translation'. "
        "Beam search by default; --greedy for greedy search.",
    )
    p.add_argument("checkpoint", help="run or checkpoint directory")
    p.add_argument("--input", help="a file of sentences, one a line (default: standard input)")
    p.add_argument("--beam-size", type=int, default=4, help="(default: 4)")
    p.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="alpha in score = log p / length^alpha; 0 favours short outputs (default: 1.0)",
    )
    p.add_argument("--greedy", action="store_true", help="greedy search instead of beams")
    p.add_argument(
        "--early-stopping",
        action="store_true",
        help="stop a sentence once it has --beam-size finished hypotheses",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="(default: 128)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences at once (default: 32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the results")
    p.set_defaults(run=run)


def read_lines(path: str | None) -> list[str]:
    if path is None:
        if sys.stdin.isatty():
            raise ValueError("no input: pipe sentences in, one a line, or give --input FILE")
        text = sys.stdin.read()
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    return text.splitlines()


def run(args) -> None:
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    beam = None
    if not args.greedy:
        beam = BeamConfig(
            beam_size=args.beam_size,
            length_penalty=args.length_penalty,
            max_new_tokens=args.max_new_tokens,
            early_stopping=args.early_stopping,
        )
    sentences = read_lines(args.input)
    directory = resolve_checkpoint(args.checkpoint)
    model = Seq2SeqTransformer.from_pretrained(directory, device=pick_device(args.device))
    model.set_attention("sdpa")  # the fused kernel decodes faster, whatever trained the model
    tokenizer = load_tokenizer(directory)
    start = time.perf_counter()
    # Empty lines stay empty: nothing to translate.
    todo = [i for i, s in enumerate(sentences) if s.strip()]
    done = translate(
        model, tokenizer, [sentences[i] for i in todo], beam, args.batch_size, args.max_new_tokens
    )
    translations = [""] * len(sentences)
    for i, t in zip(todo, done, strict=True):
        translations[i] = t
    seconds = time.perf_counter() - start
    if args.json:
        tokens = sum(len(tokenizer.encode(t)) for t in translations)
        print(
            json.dumps(
                {
                    "translations": translations,
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
