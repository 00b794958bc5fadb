"""`tformer eval`: loss, next-token accuracy and perplexity of a checkpoint on some text."""

import json

from tformer.cli.common import add_device_options, load_model
from tformer.data.sources import load_corpus, read_source
from tformer.data.tokens import LMBatches, tokenize_cached
from tformer.train import evaluate


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a checkpoint on text: loss, accuracy, perplexity",
        description="Score a checkpoint (a run directory, or any GPT-2 checkpoint directory) "
        "on every window of the text. A source is split 90/10 as in training and the last "
        "10%% is scored, unless --split all.",
    )
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument("--data", default="shakespeare", help="file, directory, .jsonl or 'shakespeare'")
    p.add_argument("--split", default="val", choices=["val", "train", "all"], help="(default: val)")
    p.add_argument("--context", type=int, help="tokens per window (default: the model's max_len)")
    p.add_argument("--batch-size", type=int, default=16)
    add_device_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON line of results")
    p.set_defaults(run=run)


def run(args) -> None:
    model, tokenizer = load_model(args.checkpoint, args.device, args.dtype)
    if args.split == "all":
        text = read_source(args.data)
    else:
        corpus = load_corpus(args.data)
        text = corpus.val if args.split == "val" else corpus.train
    context = model.config.max_len if args.context is None else args.context
    if not 0 < context <= model.config.max_len:
        raise ValueError(f"--context must be in 1..{model.config.max_len}")
    data = LMBatches(tokenize_cached(text, tokenizer), context, args.split)
    metrics = evaluate(model, data, args.batch_size)
    result = {
        "checkpoint": args.checkpoint,
        "data": args.data,
        "split": args.split,
        "tokens": len(data),
        **{k: round(v, 5) for k, v in metrics.items()},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.checkpoint} on {args.data} ({args.split}, {len(data):,} tokens): loss "
            f"{metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}, perplexity "
            f"{metrics['perplexity']:.3f}"
        )
