"""`tformer train --task translation`: train the encoder-decoder Transformer on sentence pairs.

The same Trainer as for GPT-2, fed length-bucketed batches of pairs; a joint byte-level BPE
learned from the training pairs (both languages) with <pad>, <s>, </s> as ids 0, 1, 2; the
original Transformer's settings where the command line does not override them (post-LN,
label smoothing 0.1, shared embeddings). At the end the test pairs are translated (greedy
and beam search) and scored with sacrebleu's BLEU and chrF.
"""

import hashlib
import json
import sys
import time

import torch

from tformer.cli.train import (
    absolute,
    attention_for,
    new_train_config,
    read_run,
    scale_note,
    start_run,
    start_run_directory,
    train_model,
)
from tformer.data.parallel import BUILTIN_PARALLEL, ParallelBatches, load_parallel
from tformer.generate.beam import BeamConfig
from tformer.generate.translate import corpus_scores, translate
from tformer.models.seq2seq import PRESETS, Seq2SeqConfig, Seq2SeqTransformer
from tformer.tokenizers import load_tokenizer, train_bpe
from tformer.train.plots import read_metrics

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the model's pad, bos and eos
DEFAULT_MAX_LEN = 128


def pairs_fingerprint(pairs: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for src, tgt in pairs:
        digest.update(src.encode("utf-8") + b"\t" + tgt.encode("utf-8") + b"\n")
    return digest.hexdigest()


def model_config(args, vocab_size: int, attention: str) -> Seq2SeqConfig:
    preset = args.preset or "small"
    if preset not in PRESETS:
        raise ValueError(
            f"--preset {preset!r} is a GPT-2 size; translation presets: {', '.join(PRESETS)}"
        )
    overrides = {
        "n_encoder_layers": args.n_layers,
        "n_decoder_layers": args.n_layers,
        "n_heads": args.n_heads,
        "d_model": args.d_model,
        "d_ff": args.d_ff,
        "dropout": args.dropout,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return Seq2SeqConfig.from_preset(
        preset,
        vocab_size,
        vocab_size,
        max_len=args.context or DEFAULT_MAX_LEN,
        share_embeddings=True,
        norm_position=args.norm_position,
        attention=attention,
        **overrides,
    )


def run(args) -> None:
    started = time.perf_counter()
    device, dist, out, say = start_run(args)
    if args.resume:
        spec, config = read_run(out, args)
    else:
        config = new_train_config(args, device)
        builtin = args.data in (None, *BUILTIN_PARALLEL)
        spec = {
            "task": "translation",
            "data": args.data if builtin else absolute(args.data),
            "train": absolute(args.train_file),
            "val": absolute(args.val_file),
            "bpe_vocab_size": args.bpe_vocab_size,
            "threads": torch.get_num_threads(),
        }
    corpus = load_parallel(spec["data"], spec["train"], spec["val"])
    fingerprint = pairs_fingerprint(corpus.train + corpus.val)
    if args.resume:
        if spec.get("pairs_sha256") != fingerprint:
            raise ValueError(f"the sentence pairs of {out} have changed since the run started")
        model = Seq2SeqTransformer.from_pretrained(out / "last", device=device).train()
        tokenizer = load_tokenizer(out / "last")
    else:
        texts = [s for pair in corpus.train for s in pair]
        tokenizer = train_bpe(texts, spec["bpe_vocab_size"], special_tokens=SPECIAL_TOKENS)
        attention = attention_for(args.attention, device, config.dtype)
        model_config_ = model_config(args, tokenizer.vocab_size, attention)
        model = Seq2SeqTransformer(model_config_, seed=config.seed)
        model = model.to(device)
    c = model.config
    ids = (c.pad_id, c.bos_id, c.eos_id)
    train_data = ParallelBatches(corpus.train, tokenizer, *ids, c.max_len, "training")
    val_data = ParallelBatches(corpus.val, tokenizer, *ids, c.max_len, "validation")
    if not args.resume:
        start_run_directory(out, {**spec, "pairs_sha256": fingerprint}, dist)
    say(
        f"data: {corpus.description}: {len(corpus.train):,} training, {len(corpus.val):,} "
        f"validation, {len(corpus.test):,} test pairs (joint BPE, vocabulary "
        f"{tokenizer.vocab_size:,})"
    )
    say(
        f"model: {model.num_parameters():,} parameters ({c.n_encoder_layers}+"
        f"{c.n_decoder_layers} layers, d_model {c.d_model}, {c.norm_position}-LN); {device}, "
        f"{config.dtype}, {dist.world_size} process(es){scale_note(dist, config)}; "
        f"run directory {out}"
    )
    history, model, _ = train_model(args, model, train_data, val_data, config, out, tokenizer)
    if model is None:  # not the main process
        return
    val = [r for r in read_metrics(out) if r["type"] == "eval"][-1]
    sources = [src for src, _ in corpus.test]
    references = [tgt for _, tgt in corpus.test]
    model.set_attention("sdpa")  # saved already; decoding is faster on the fused kernel
    decode_start = time.perf_counter()
    greedy = translate(model, tokenizer, sources, None)
    beam = translate(model, tokenizer, sources, BeamConfig(beam_size=4))
    decode_seconds = time.perf_counter() - decode_start
    train_records = [r for r in history if r["type"] == "train"]
    result = {
        "run_dir": str(out),
        "steps": config.steps,
        "val_loss": round(val["val_loss"], 4),
        "val_accuracy": round(val["val_accuracy"], 4),
        "test_pairs": len(corpus.test),
        "test_greedy": {k: round(v, 2) for k, v in corpus_scores(greedy, references).items()},
        "test_beam4": {k: round(v, 2) for k, v in corpus_scores(beam, references).items()},
        "tokens_per_second": train_records[-1]["tokens_per_second"] if train_records else None,
        "seconds": round(time.perf_counter() - started, 1),
        "decode_seconds": round(decode_seconds, 1),
        "device": str(device),
        "dtype": config.dtype,
        "parameters": model.num_parameters(),
    }
    if args.json:
        print(json.dumps(result), file=sys.stdout)
        return
    print(f"validation: loss {result['val_loss']:.4f}, token accuracy {result['val_accuracy']:.3f}")
    for name in ("greedy", "beam4"):
        scores = result[f"test_{name}"]
        print(
            f"test ({len(corpus.test):,} pairs), {name}: BLEU {scores['bleu']:.2f}, chrF "
            f"{scores['chrf']:.2f}"
        )
    print(f"{result['seconds']} s in all; model {out}")
    for src, hyp, ref in list(zip(sources, beam, references, strict=True))[:3]:
        print(f"  {src}\n    -> {hyp}\n    (reference: {ref})")
