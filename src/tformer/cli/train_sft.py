"""`tformer train --task sft`: supervised fine-tuning on prompt/response pairs.

The pairs come from a JSONL file (--data: its last 10% for validation; or --train and
--val), each line {"prompt": ..., "response": ...}. The model starts from --init, in full
or with LoRA, and the same trainer as for language models fits it with the loss on the
response tokens only (tformer.data.prompts). At the end the first validation prompts are
answered greedily, next to the reference responses.
"""

import json
import sys
import time

import torch

from tformer.cli.train import (
    absolute,
    attention_for,
    init_settings,
    new_train_config,
    prepare_init,
    read_run,
    saved_settings,
    scale_note,
    start_run,
    start_run_directory,
    train_model,
)
from tformer.data.prompts import (
    PromptBatches,
    encode_pairs,
    fingerprint,
    read_prompt_responses,
)
from tformer.generate import SamplingConfig, generate_ids
from tformer.models.gpt2 import GPT2
from tformer.tokenizers import load_tokenizer, tokenizer_for_model
from tformer.train.plots import read_metrics

SHOWN = 3  # validation prompts answered at the end


def load_pairs(spec: dict):
    if spec["train"] or spec["val"]:
        if not (spec["train"] and spec["val"]) or spec["data"]:
            raise ValueError("give --train and --val together, instead of --data")
        return read_prompt_responses(spec["train"]), read_prompt_responses(spec["val"])
    if spec["data"] is None:
        raise ValueError(
            'supervised fine-tuning needs --data: a JSONL file of {"prompt", "response"}'
        )
    pairs = read_prompt_responses(spec["data"])
    if len(pairs) < 2:
        raise ValueError(f"{spec['data']}: needs at least 2 pairs (the last 10% validate)")
    split = len(pairs) - max(1, len(pairs) // 10)
    return pairs[:split], pairs[split:]


def run(args) -> None:
    started = time.perf_counter()
    device, dist, out, say = start_run(args)
    if args.resume:
        spec, config = read_run(out, args)
    else:
        if args.init is None:
            raise ValueError(
                "supervised fine-tuning starts from a trained model: give it with --init "
                "(a tformer run directory or a Hugging Face GPT-2 directory)"
            )
        config = new_train_config(args, device)
        attention = attention_for(args.attention, device, config.dtype)
        spec = {
            "task": "sft",
            "data": absolute(args.data),
            "train": absolute(args.train_file),
            "val": absolute(args.val_file),
            "init": absolute(args.init),
            "context": args.context,
            "threads": torch.get_num_threads(),
            **init_settings(args, args.dropout, attention),
        }
    train, val = load_pairs(spec)
    digest = fingerprint(train + val)
    if args.resume:
        if spec.get("pairs_sha256") != digest:
            raise ValueError(f"the pairs of {out} have changed since the run started")
        model = GPT2.from_pretrained(out / "last", device=device, **saved_settings(spec))
        tokenizer = load_tokenizer(out / "last")
    else:
        model = GPT2.from_pretrained(
            spec["init"], device=device, dropout=spec["dropout"], attention=spec["attention"]
        )
        tokenizer = tokenizer_for_model(spec["init"], model.config.vocab_size)
        prepare_init(model, spec, config.seed, say)
    max_len = spec["context"] or model.config.max_len
    if max_len > model.config.max_len:
        raise ValueError(
            f"--context {max_len} is longer than the model's window ({model.config.max_len})"
        )
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    train_examples, train_counts = encode_pairs(train, tokenizer, max_len)
    val_examples, val_counts = encode_pairs(val, tokenizer, max_len)
    train_data = PromptBatches(train_examples, pad, "training")
    val_data = PromptBatches(val_examples, pad, "validation")
    if not args.resume:
        start_run_directory(out, {**spec, "pairs_sha256": digest}, dist)
    cut = train_counts["cut"] + val_counts["cut"]
    left_out = train_counts["left_out"] + val_counts["left_out"]
    say(
        f"data: {len(train_data):,} training and {len(val_data):,} validation pairs in "
        f"windows of {max_len} tokens ({cut:,} cut at the end of the window, {left_out:,} "
        "left out: their prompt fills it); the loss is on the responses only"
    )
    say(
        f"model: {model.num_parameters():,} parameters from {spec['init']}; {device}, "
        f"{config.dtype}, {dist.world_size} process(es){scale_note(dist, config)}; "
        f"run directory {out}"
    )
    history, model, trainable = train_model(
        args, model, train_data, val_data, config, out, tokenizer, merge=spec.get("merge", False)
    )
    if model is None:  # not the main process
        return
    val_record = [r for r in read_metrics(out) if r["type"] == "eval"][-1]
    train_records = [r for r in history if r["type"] == "train"]
    examples = []
    for pair in val[:SHOWN] if args.sample_tokens > 0 else []:
        prompt = torch.tensor([tokenizer.encode(pair.prompt)[-max_len:]], device=device)
        greedy = SamplingConfig(
            max_new_tokens=min(args.sample_tokens, max_len - prompt.shape[1]),
            do_sample=False,
            eos_token_id=tokenizer.eos_id,
        )
        reply = tokenizer.decode(generate_ids(model, prompt, greedy))
        examples.append({"prompt": pair.prompt, "response": reply, "reference": pair.response})
    result = {
        "run_dir": str(out),
        "steps": config.steps,
        "val_loss": round(val_record["val_loss"], 4),
        "val_accuracy": round(val_record["val_accuracy"], 4),
        "val_perplexity": round(val_record["val_perplexity"], 3),
        "train_loss": round(train_records[-1]["loss"], 4) if train_records else None,
        "seconds": round(time.perf_counter() - started, 1),
        "parameters": model.num_parameters(),
        "trainable_parameters": trainable,
        "examples": examples,
    }
    if args.json:
        print(json.dumps(result), file=sys.stdout)
        return
    print(
        f"validation (response tokens): loss {result['val_loss']:.4f}, accuracy "
        f"{result['val_accuracy']:.3f}, perplexity {result['val_perplexity']:.2f}; "
        f"{result['seconds']:.1f} s in all; model {out}"
    )
    for example in examples:
        print(
            f"  prompt: {example['prompt']!r}\n  response: {example['response']!r}\n"
            f"  reference: {example['reference']!r}"
        )
