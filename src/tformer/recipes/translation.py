"""Translation: the encoder-decoder Transformer on sentence pairs.

Length-bucketed batches of pairs; a joint byte-level BPE learned from the training pairs
(both languages) with <pad>, <s>, </s> as ids 0, 1, 2; the original Transformer's settings
where the spec does not override them (post-LN, label smoothing 0.1, shared embeddings).
At the end the test pairs are translated (greedy and beam search) and scored with
sacrebleu's BLEU and chrF.
"""

import time
from pathlib import Path

import torch

from tformer.data.parallel import BUILTIN_PARALLEL, ParallelBatches, ParallelCorpus, load_parallel
from tformer.errors import ConfigError
from tformer.files import sha256_of
from tformer.generate.beam import BeamConfig
from tformer.generate.translate import corpus_scores, translate
from tformer.models.seq2seq import PRESETS, Seq2SeqConfig, Seq2SeqTransformer
from tformer.recipes.run_dir import data_record
from tformer.recipes.skeleton import Run
from tformer.recipes.spec import TrainSpec
from tformer.tokenizers import train_bpe

NAME = "translation"
FINGERPRINT = "pairs_sha256"
DATA = "sentence pairs"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the model's pad, bos and eos
DEFAULT_MAX_LEN = 128
SHOWN = 3  # test translations in the result


def new_record(run: Run) -> dict:
    spec = run.spec
    return {
        **data_record(spec, BUILTIN_PARALLEL),
        "bpe_vocab_size": spec.bpe_vocab_size,
        "threads": torch.get_num_threads(),
    }


def load_data(saved: dict) -> ParallelCorpus:
    return load_parallel(saved["data"], saved["train"], saved["val"])


def fingerprint(corpus: ParallelCorpus) -> str:
    return sha256_of(f"{src}\t{tgt}\n" for src, tgt in corpus.train + corpus.val)


def model_config(spec: TrainSpec, vocab_size: int, attention: str) -> Seq2SeqConfig:
    """The preset (small by default) with the sizes the spec gives."""
    preset = spec.preset or "small"
    if preset not in PRESETS:
        raise ConfigError(
            f"--preset {preset!r} is a GPT-2 size; translation presets: {', '.join(PRESETS)}"
        )
    overrides = {
        "n_encoder_layers": spec.n_layers,
        "n_decoder_layers": spec.n_layers,
        "n_heads": spec.n_heads,
        "d_model": spec.d_model,
        "d_ff": spec.d_ff,
        "dropout": spec.dropout,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return Seq2SeqConfig.from_preset(
        preset,
        vocab_size,
        vocab_size,
        max_len=spec.context or DEFAULT_MAX_LEN,
        share_embeddings=True,
        norm_position=spec.norm_position,
        attention=attention,
        **overrides,
    )


def new_model(run: Run, corpus: ParallelCorpus):
    texts = [s for pair in corpus.train for s in pair]
    tokenizer = train_bpe(texts, run.saved["bpe_vocab_size"], special_tokens=SPECIAL_TOKENS)
    config = model_config(run.spec, tokenizer.vocab_size, run.attention)
    return Seq2SeqTransformer(config, seed=run.config.seed).to(run.device), tokenizer


def load_model(run: Run, directory: Path) -> Seq2SeqTransformer:
    return Seq2SeqTransformer.from_pretrained(directory, device=run.device).train()


def batches(run: Run, model: Seq2SeqTransformer, tokenizer, corpus: ParallelCorpus):
    c = model.config
    ids = (c.pad_id, c.bos_id, c.eos_id)
    train = ParallelBatches(corpus.train, tokenizer, *ids, c.max_len, "training")
    val = ParallelBatches(corpus.val, tokenizer, *ids, c.max_len, "validation")
    description = (
        f"{corpus.description}: {len(corpus.train):,} training, {len(corpus.val):,} "
        f"validation, {len(corpus.test):,} test pairs (joint BPE, vocabulary "
        f"{tokenizer.vocab_size:,})"
    )
    return train, val, description


def describe_model(run: Run, model: Seq2SeqTransformer) -> str:
    c = model.config
    layers = f"{c.n_encoder_layers}+{c.n_decoder_layers}"
    return f" ({layers} layers, d_model {c.d_model}, {c.norm_position}-LN)"


def finish(run: Run, model, tokenizer, corpus: ParallelCorpus) -> dict:
    """The test pairs translated greedily and with a beam of 4, scored."""
    sources = [src for src, _ in corpus.test]
    references = [tgt for _, tgt in corpus.test]
    model.set_attention("sdpa")  # saved already; decoding is faster on the fused kernel
    started = time.perf_counter()
    greedy = translate(model, tokenizer, sources, None)
    beam = translate(model, tokenizer, sources, BeamConfig(beam_size=4))
    return {
        "test_pairs": len(corpus.test),
        "test_greedy": {k: round(v, 2) for k, v in corpus_scores(greedy, references).items()},
        "test_beam4": {k: round(v, 2) for k, v in corpus_scores(beam, references).items()},
        "decode_seconds": round(time.perf_counter() - started, 1),
        "examples": [
            {"source": src, "translation": hyp, "reference": ref}
            for src, hyp, ref in list(zip(sources, beam, references, strict=True))[:SHOWN]
        ],
    }
