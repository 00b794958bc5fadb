"""Language modelling: a GPT on text (a file, a directory of .txt files, a JSONL file, or the
built-in Shakespeare), split 90/10, next-token loss on every position; at the end a sample.

A new model learns its tokenizer from the data (characters, GPT-2's BPE, or a BPE trained
on the training text); --init starts from a checkpoint's weights and tokenizer, in full or
under LoRA (tformer.recipes.start).
"""

from dataclasses import replace
from pathlib import Path

import torch

from tformer.data.sources import BUILTIN_CORPORA, Corpus, load_corpus
from tformer.data.tokens import LMBatches, tokenize_cached
from tformer.files import sha256_of
from tformer.generate import SamplingConfig, generate_ids
from tformer.models.gpt2 import GPT2
from tformer.recipes.run_dir import absolute, data_record
from tformer.recipes.skeleton import Run, window_length
from tformer.recipes.start import init_settings, new_gpt2_config, prepare_init, saved_settings
from tformer.tokenizers import build_tokenizer, tokenizer_for_model

NAME = "lm"
FINGERPRINT = "text_sha256"
DATA = "training text"
DEFAULT_CONTEXT = 64  # tokens per window of a new model


def new_record(run: Run) -> dict:
    spec = run.spec
    return {
        **data_record(spec, BUILTIN_CORPORA),
        "tokenizer": spec.tokenizer,
        "bpe_vocab_size": spec.bpe_vocab_size,
        "threads": torch.get_num_threads(),
        "init": absolute(spec.init),
        **init_settings(spec, run.attention),
    }


def load_data(saved: dict) -> Corpus:
    return load_corpus(saved["data"], saved["train"], saved["val"])


def fingerprint(corpus: Corpus) -> str:
    return sha256_of([corpus.train, "\0", corpus.val])


def new_model(run: Run, corpus: Corpus):
    spec, saved = run.spec, run.saved
    if spec.init is not None:
        model = GPT2.from_pretrained(
            spec.init, device=run.device, dropout=spec.dropout, attention=run.attention
        )
        tokenizer = tokenizer_for_model(spec.init, model.config.vocab_size)
        prepare_init(model, saved, run.config.seed, run.say)
        saved["context"] = spec.context or model.config.max_len  # may be shorter
        run.say(f"starting from {spec.init} ({model.num_parameters():,} parameters)")
        return model, tokenizer
    # BPE merges are learned from the training text only; a character vocabulary covers
    # both parts, or a validation character unseen in training could not be encoded.
    text = corpus.train if saved["tokenizer"] == "bpe" else corpus.train + corpus.val
    tokenizer = build_tokenizer(saved["tokenizer"], text, saved["bpe_vocab_size"])
    sizes = replace(
        spec,
        context=spec.context or DEFAULT_CONTEXT,
        dropout=0.0 if spec.dropout is None else spec.dropout,
    )
    config = new_gpt2_config(sizes, tokenizer.vocab_size, tokenizer.eos_id, run.attention)
    return GPT2(config, seed=run.config.seed).to(run.device), tokenizer


def load_model(run: Run, directory: Path) -> GPT2:
    return GPT2.from_pretrained(directory, device=run.device, **saved_settings(run.saved))


def batches(run: Run, model: GPT2, tokenizer, corpus: Corpus):
    context = window_length(run, model)
    train = LMBatches(tokenize_cached(corpus.train, tokenizer), context, "training")
    val = LMBatches(tokenize_cached(corpus.val, tokenizer), context, "validation")
    description = (
        f"{corpus.description}: {len(train):,} training and {len(val):,} validation tokens "
        f"({type(tokenizer).__name__}, vocabulary {tokenizer.vocab_size:,})"
    )
    return train, val, description


def describe_model(run: Run, model: GPT2) -> str:
    return ""


def finish(run: Run, model: GPT2, tokenizer, corpus: Corpus) -> dict:
    """An unprompted sample of spec.sample_tokens tokens."""
    sample = ""
    if run.spec.sample_tokens > 0:
        prompt = torch.tensor([[start_token(tokenizer)]], device=run.device)
        sampling = SamplingConfig(
            max_new_tokens=run.spec.sample_tokens, temperature=0.8, top_k=200, seed=run.config.seed
        )
        sample = tokenizer.decode(generate_ids(model, prompt, sampling))
    return {"sample": sample}


def start_token(tokenizer) -> int:
    """Where an unprompted sample starts: after an end-of-text token, else on a new line."""
    if tokenizer.eos_id is not None:
        return tokenizer.eos_id
    try:
        return tokenizer.encode("\n")[0]
    except (ValueError, IndexError):  # a character vocabulary without a newline
        return 0
