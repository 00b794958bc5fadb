"""Supervised fine-tuning on prompt/response pairs.

The pairs come from a JSONL file (its last 10% for validation; or explicit train and val
files), each line {"prompt": ..., "response": ...}. The model starts from --init, in full
or with LoRA, and the same trainer as for language models fits it with the loss on the
response tokens only (tformer.data.prompts). At the end the first validation prompts are
answered greedily, next to the reference responses.

The tokenizer carries SFT_TEMPLATE (tformer.data.prompts), the chat template of that
format, into every checkpoint's tokenizer_config.json: a chat request to the fine-tuned
model is then written out as its training pairs were.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from tformer.data.prompts import (
    SFT_TEMPLATE,
    PromptBatches,
    PromptResponse,
    encode_pairs,
    read_prompt_responses,
)
from tformer.data.prompts import fingerprint as pairs_fingerprint
from tformer.errors import ConfigError, DataError
from tformer.generate import SamplingConfig, generate_ids
from tformer.models.gpt2 import GPT2
from tformer.recipes.run_dir import absolute, data_record
from tformer.recipes.skeleton import Run, window_length
from tformer.recipes.start import init_settings, prepare_init, saved_settings
from tformer.tokenizers import tokenizer_for_model

NAME = "sft"
FINGERPRINT = "pairs_sha256"
DATA = "pairs"
SHOWN = 3  # validation prompts answered at the end


@dataclass
class Pairs:
    train: list[PromptResponse]
    val: list[PromptResponse]


def new_record(run: Run) -> dict:
    spec = run.spec
    if spec.init is None:
        raise ConfigError(
            "supervised fine-tuning starts from a trained model: give it with --init "
            "(a tformer run directory or a Hugging Face GPT-2 directory)"
        )
    return {
        **data_record(spec, ()),
        "init": absolute(spec.init),
        "context": spec.context,
        "threads": torch.get_num_threads(),
        **init_settings(spec, run.attention),
    }


def load_data(saved: dict) -> Pairs:
    if saved["train"] or saved["val"]:
        if not (saved["train"] and saved["val"]) or saved["data"]:
            raise ConfigError("give --train and --val together, instead of --data")
        return Pairs(read_prompt_responses(saved["train"]), read_prompt_responses(saved["val"]))
    if saved["data"] is None:
        raise ConfigError(
            'supervised fine-tuning needs --data: a JSONL file of {"prompt", "response"}'
        )
    pairs = read_prompt_responses(saved["data"])
    if len(pairs) < 2:
        raise DataError(saved["data"], "needs at least 2 pairs (the last 10% validate)")
    split = len(pairs) - max(1, len(pairs) // 10)
    return Pairs(pairs[:split], pairs[split:])


def fingerprint(pairs: Pairs) -> str:
    return pairs_fingerprint(pairs.train + pairs.val)


def new_model(run: Run, pairs: Pairs):
    saved = run.saved
    model = GPT2.from_pretrained(saved["init"], device=run.device, **saved_settings(saved))
    tokenizer = tokenizer_for_model(saved["init"], model.config.vocab_size)
    tokenizer.chat_template = SFT_TEMPLATE  # saved with it; a resumed run reads it back
    prepare_init(model, saved, run.config.seed, run.say)
    return model, tokenizer


def load_model(run: Run, directory: Path) -> GPT2:
    return GPT2.from_pretrained(directory, device=run.device, **saved_settings(run.saved))


def batches(run: Run, model: GPT2, tokenizer, pairs: Pairs):
    max_len = window_length(run, model)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    train_examples, train_counts = encode_pairs(pairs.train, tokenizer, max_len)
    val_examples, val_counts = encode_pairs(pairs.val, tokenizer, max_len)
    train = PromptBatches(train_examples, pad, "training")
    val = PromptBatches(val_examples, pad, "validation")
    cut = train_counts["cut"] + val_counts["cut"]
    left_out = train_counts["left_out"] + val_counts["left_out"]
    description = (
        f"{len(train):,} training and {len(val):,} validation pairs in windows of {max_len} "
        f"tokens ({cut:,} cut at the end of the window, {left_out:,} left out: their prompt "
        "fills it); the loss is on the responses only"
    )
    return train, val, description


def describe_model(run: Run, model: GPT2) -> str:
    return f" from {run.saved['init']}"


def finish(run: Run, model: GPT2, tokenizer, pairs: Pairs) -> dict:
    """The first validation prompts answered greedily, beside their reference responses."""
    max_len = window_length(run, model)
    examples = []
    for pair in pairs.val[:SHOWN] if run.spec.sample_tokens > 0 else []:
        prompt = torch.tensor([tokenizer.encode(pair.prompt)[-max_len:]], device=run.device)
        greedy = SamplingConfig(
            max_new_tokens=min(run.spec.sample_tokens, max_len - prompt.shape[1]),
            do_sample=False,
            eos_id=tokenizer.eos_id,
        )
        reply = tokenizer.decode(generate_ids(model, prompt, greedy))
        examples.append({"prompt": pair.prompt, "response": reply, "reference": pair.response})
    return {"examples": examples}
