"""`tformer eval`: loss, next-token accuracy and perplexity of a checkpoint on some text;
for a translation checkpoint also BLEU and chrF on sentence pairs."""

import json
import time

from tformer.checkpoints import resolve_checkpoint
from tformer.cli.common import add_device_options, load_model, number
from tformer.data.parallel import ParallelBatches, load_parallel
from tformer.data.sources import load_corpus, read_source
from tformer.data.tokens import LMBatches, tokenize_cached
from tformer.devices import pick_device
from tformer.generate.beam import BeamConfig
from tformer.generate.translate import corpus_scores, translate
from tformer.models.load import is_translation_checkpoint
from tformer.models.seq2seq import Seq2SeqTransformer
from tformer.tokenizers import load_tokenizer
from tformer.train import evaluate


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a checkpoint on text: loss, accuracy, perplexity",
        description="Score a checkpoint (a run directory, or any GPT-2 checkpoint directory) "
        "on every window of the text. A source is split 90/10 as in training and the last "
        "10%% is scored, unless --split all. A translation checkpoint is scored on sentence "
        "pairs (--data number-words, a TSV or JSONL file; its held-out test pairs, or every "
        "pair with --split all): loss and token accuracy, and BLEU and chrF of its "
        "translations (sacrebleu).",
    )
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument(
        "--data",
        help="file, directory, .jsonl or 'shakespeare' (default); translation: 'number-words' "
        "(default), a .tsv or .jsonl file of pairs",
    )
    p.add_argument(
        "--split",
        choices=["val", "train", "test", "all"],
        help="(default: val; translation: test)",
    )
    count = number(integer=True, low=1)
    p.add_argument(
        "--beam-size", type=count, default=4, help="translation: 1 is greedy (default: 4)"
    )
    p.add_argument("--context", type=count, help="tokens per window (default: the model's max_len)")
    p.add_argument("--batch-size", type=count, default=16, help="windows per batch (default: 16)")
    add_device_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON line of results")
    p.set_defaults(run=run)


def run(args) -> None:
    directory = resolve_checkpoint(args.checkpoint)
    if is_translation_checkpoint(directory):
        return run_translation(args, directory)
    if args.split == "test":
        raise ValueError("text is split 90/10 into train and val; there is no test split")
    if args.split is None:
        args.split = "val"
    if args.data is None:
        args.data = "shakespeare"
    model, tokenizer = load_model(args.checkpoint, args.device, args.dtype)
    model.set_attention("sdpa")  # scoring only: the fused kernel is faster
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


def run_translation(args, directory) -> None:
    model = Seq2SeqTransformer.from_pretrained(directory, device=pick_device(args.device))
    model.set_attention("sdpa")  # the fused kernel scores and decodes faster
    tokenizer = load_tokenizer(directory)
    corpus = load_parallel(args.data)
    split = args.split or "test"
    pairs = {
        "train": corpus.train,
        "val": corpus.val,
        "test": corpus.test,
        "all": corpus.train + corpus.val + corpus.test,
    }[split]
    c = model.config
    data = ParallelBatches(pairs, tokenizer, c.pad_id, c.bos_id, c.eos_id, c.max_len, split)
    metrics = evaluate(model, data, args.batch_size)
    beam = BeamConfig(beam_size=args.beam_size) if args.beam_size > 1 else None
    start = time.perf_counter()
    translations = translate(model, tokenizer, [src for src, _ in pairs], beam)
    seconds = time.perf_counter() - start
    scores = corpus_scores(translations, [tgt for _, tgt in pairs])
    result = {
        "checkpoint": args.checkpoint,
        "data": args.data or "number-words",
        "split": split,
        "pairs": len(pairs),
        "loss": round(metrics["loss"], 5),
        "accuracy": round(metrics["accuracy"], 5),
        "bleu": round(scores["bleu"], 2),
        "chrf": round(scores["chrf"], 2),
        "beam_size": args.beam_size,
        "translate_seconds": round(seconds, 2),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{args.checkpoint} on {result['data']} ({split}, {len(pairs):,} pairs): loss "
        f"{result['loss']:.4f}, token accuracy {result['accuracy']:.4f}, BLEU "
        f"{result['bleu']:.2f}, chrF {result['chrf']:.2f} (beam {args.beam_size})"
    )
