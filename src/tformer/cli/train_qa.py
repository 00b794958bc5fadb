"""`tformer train --task qa`: train an extractive reader (GPT-2 with a span head).

Questions come from a SQuAD JSON or JSONL file (--data: its last 10% of contexts are held
out for validation; or --train and --val), or from a built-in cloze task (`bible-qa`,
`shakespeare-qa`; tformer.qa.cloze), whose held-out books give validation and test. The
model starts from --init (a GPT-2 language model, which gets a new span head, or a QA
checkpoint), or is a new GPT-2 of the sizes given, with a tokenizer learned from the data.
Every question and its context become windows of --context tokens whose context slices
overlap by --stride; the same trainer as for language models fits the span logits. At the
end the held-out questions (for the built-in tasks, the test books') are answered and
scored with SQuAD's exact match and F1.
"""

import json
import sys
import time

import torch

from tformer.cli.train import (
    SMALL_MODEL,
    absolute,
    attention_for,
    build_tokenizer,
    init_settings,
    model_config_from,
    new_train_config,
    prepare_init,
    read_run,
    saved_settings,
    scale_note,
    start_run,
    start_run_directory,
    train_model,
)
from tformer.files import atomic_write_json
from tformer.models.encoder_qa import EncoderForQuestionAnswering
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering
from tformer.models.seq2seq import Seq2SeqConfig
from tformer.qa import QAExample, make_windows, read_qa_file, squad_scores
from tformer.qa.batches import QABatches
from tformer.qa.cloze import BUILTIN_QA, builtin_qa
from tformer.qa.download import cached_squad
from tformer.qa.read import answer, load_reader, vocab_size
from tformer.qa.squad import fingerprint, split_by_context
from tformer.qa.windows import marker_tokens
from tformer.tokenizers import load_tokenizer, tokenizer_for_model
from tformer.train.plots import read_metrics

SQUAD = {"squad": "1.1", "squad-2.0": "2.0"}  # --data names of the cached SQuAD versions
DEFAULT_CONTEXT = 256  # tokens per window of a new model


def load_questions(spec: dict) -> tuple[list[QAExample], list[QAExample], list[QAExample]]:
    """Training, validation and test questions; a file's test questions are its validation
    ones (the built-in tasks hold out other books for test)."""
    if spec["train"] or spec["val"]:
        if not (spec["train"] and spec["val"]) or spec["data"]:
            raise ValueError("give --train and --val together, instead of --data")
        val = read_qa_file(spec["val"])
        return read_qa_file(spec["train"]), val, val
    if spec["data"] is None:
        raise ValueError(
            "question answering needs --data: a SQuAD .json or .jsonl file, "
            + ", ".join(BUILTIN_QA)
            + ", or squad / squad-2.0 (after 'tformer data squad')"
        )
    if spec["data"] in BUILTIN_QA:
        splits = builtin_qa(spec["data"])
        return splits["train"], splits["val"], splits["test"]
    if spec["data"] in SQUAD:  # downloaded with 'tformer data squad'; dev validates
        paths = cached_squad(SQUAD[spec["data"]])
        val = read_qa_file(paths["dev"])
        return read_qa_file(paths["train"]), val, val
    train, val = split_by_context(read_qa_file(spec["data"]))
    return train, val, val


def reader_kind(args) -> str | None:
    """--reader for a new model; a checkpoint (--init) is the reader it is."""
    if args.init is not None:
        if args.reader is not None:
            raise ValueError(f"--init {args.init} decides the kind of reader; drop --reader")
        return None
    return args.reader or "gpt2"


def encoder_config(args, tokenizer, attention: str) -> Seq2SeqConfig:
    """A new bidirectional reader's config: the flags' sizes, else the small model's."""
    if args.preset is not None:
        raise ValueError(
            "--preset names GPT-2's sizes; give the encoder reader's with --n-layers, "
            "--n-heads, --d-model and --d-ff"
        )
    d_model = args.d_model or SMALL_MODEL["d_model"]
    return EncoderForQuestionAnswering.config_for(
        tokenizer.vocab_size,
        max_len=args.context,
        d_model=d_model,
        n_heads=args.n_heads or SMALL_MODEL["n_heads"],
        n_layers=args.n_layers or SMALL_MODEL["n_layers"],
        d_ff=args.d_ff or 4 * d_model,
        dropout=args.dropout,
        activation=args.activation,
        norm_position=args.norm_position,
        attention=attention,
    )


def run(args) -> None:
    started = time.perf_counter()
    device, dist, out, say = start_run(args)
    if args.resume:
        spec, config = read_run(out, args)
    else:
        config = new_train_config(args, device)
        spec = {
            "task": "qa",
            "data": args.data if args.data in (*BUILTIN_QA, *SQUAD) else absolute(args.data),
            "train": absolute(args.train_file),
            "val": absolute(args.val_file),
            "init": absolute(args.init),
            "tokenizer": args.tokenizer,
            "bpe_vocab_size": args.bpe_vocab_size,
            "context": args.context,
            "stride": args.stride,
            "max_answer_tokens": args.max_answer_tokens,
            "null_threshold": args.null_threshold,
            "threads": torch.get_num_threads(),
            "reader": reader_kind(args),
            **init_settings(
                args, args.dropout, attention_for(args.attention, device, config.dtype)
            ),
        }
    if spec["max_answer_tokens"] < 1:
        raise ValueError(f"--max-answer-tokens must be at least 1, got {spec['max_answer_tokens']}")
    train, val, test = load_questions(spec)
    digest = fingerprint(train + val)
    attention = attention_for(args.attention, device, config.dtype)
    if args.resume:
        if spec.get("questions_sha256") != digest:
            raise ValueError(f"the questions of {out} have changed since the run started")
        model = load_reader(out / "last", device, **saved_settings(spec))
        tokenizer = load_tokenizer(out / "last")
    elif spec["init"] is not None:
        model = load_reader(
            spec["init"], device, config.seed, dropout=args.dropout, attention=attention
        )
        tokenizer = tokenizer_for_model(spec["init"], vocab_size(model))
        prepare_init(model, spec, config.seed, say)
    else:
        text = "\n".join(f"{e.question}\n{e.context}" for e in train + val + test)
        tokenizer = build_tokenizer(spec["tokenizer"], text, spec["bpe_vocab_size"])
        args.context = args.context or DEFAULT_CONTEXT
        args.dropout = 0.0 if args.dropout is None else args.dropout
        if spec["reader"] == "encoder":
            model = EncoderForQuestionAnswering(
                encoder_config(args, tokenizer, attention), seed=config.seed
            ).to(device)
        else:
            gpt2_config = model_config_from(args, tokenizer, device, config.dtype)
            model = GPT2ForQuestionAnswering(gpt2_config, seed=config.seed).to(device)
    max_len = spec["context"] or model.config.max_len
    if max_len > model.config.max_len:
        raise ValueError(
            f"--context {max_len} is longer than the model's window ({model.config.max_len})"
        )
    separator, null = marker_tokens(tokenizer)

    def windows(examples):
        return [
            w
            for e in examples
            for w in make_windows(tokenizer, e, max_len, spec["stride"], separator, null)
        ]

    train_data = QABatches(windows(train), separator, "training")
    val_data = QABatches(windows(val), separator, "validation")
    if not args.resume:
        start_run_directory(out, {**spec, "questions_sha256": digest}, dist)
    say(
        f"data: {len(train):,} training and {len(val):,} validation questions, "
        f"{len(train_data):,} and {len(val_data):,} windows of up to {max_len} tokens "
        f"(overlap {spec['stride']})"
    )
    say(
        f"model: {model.num_parameters():,} parameters"
        f"{' from ' + spec['init'] if spec['init'] else ''}; {device}, {config.dtype}, "
        f"{dist.world_size} process(es){scale_note(dist, config)}; run directory {out}"
    )
    history, model, trainable = train_model(
        args, model, train_data, val_data, config, out, tokenizer, merge=spec.get("merge", False)
    )
    if model is None:  # not the main process
        return
    unanswerable = any(not e.answers for e in train + val + test)
    threshold = spec["null_threshold"]
    if threshold is None and unanswerable:
        threshold = 0.0
    predictions = answer(
        model, tokenizer, test, max_len, spec["stride"], spec["max_answer_tokens"], threshold
    )
    scores = squad_scores(
        (p.text, [a.text for a in e.answers]) for p, e in zip(predictions, test, strict=True)
    )
    val_record = [r for r in read_metrics(out) if r["type"] == "eval"][-1]
    train_records = [r for r in history if r["type"] == "train"]
    result = {
        "run_dir": str(out),
        "steps": config.steps,
        "val_loss": round(val_record["val_loss"], 4),
        "exact_match": round(scores["exact_match"], 2),
        "f1": round(scores["f1"], 2),
        "questions": scores["count"],
        "scored_on": "test" if test is not val else "validation",
        "train_loss": round(train_records[-1]["loss"], 4) if train_records else None,
        "seconds": round(time.perf_counter() - started, 1),
        "parameters": model.num_parameters(),
        "trainable_parameters": trainable,
        "examples": [
            {"question": e.question, "answer": p.text, "gold": [a.text for a in e.answers]}
            for e, p in list(zip(test, predictions, strict=True))[:3]
        ],
    }
    atomic_write_json(out / "qa_scores.json", result)
    if args.json:
        print(json.dumps(result), file=sys.stdout)
        return
    print(
        f"validation loss {result['val_loss']}; {result['scored_on']}: exact match "
        f"{result['exact_match']:.2f}, F1 {result['f1']:.2f} over {result['questions']:,} "
        f"questions; {result['seconds']:.1f} s in all; model {out}"
    )
    for example in result["examples"]:
        print(f"  Q: {example['question']}\n  A: {example['answer']!r} (gold {example['gold']})")
