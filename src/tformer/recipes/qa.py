"""Question answering: train an extractive reader (a span head on GPT-2 or on the original
Transformer's encoder).

Questions come from a SQuAD JSON or JSONL file (its last 10% of contexts held out for
validation; or explicit train and val files), from a built-in cloze task (`bible-qa`,
`shakespeare-qa`; tformer.qa.cloze), whose held-out books give validation and test, or
from SQuAD itself once `tformer data squad` has fetched it. The model starts from --init (a
GPT-2 language model, which gets a new span head, or a reader checkpoint), or is a new
reader of the sizes given with a tokenizer learned from the data. Every question and its
context become windows of `context` tokens whose context slices overlap by `stride`; the
same trainer as for language models fits the span logits. At the end the held-out
questions (for the built-in tasks, the test books') are answered and scored with SQuAD's
exact match and F1.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tformer.errors import ConfigError
from tformer.files import atomic_write_json
from tformer.models.encoder_qa import EncoderForQuestionAnswering
from tformer.models.gpt2_qa import GPT2ForQuestionAnswering
from tformer.qa import QAExample, make_windows, read_qa_file, squad_scores
from tformer.qa.batches import QABatches
from tformer.qa.cloze import BUILTIN_QA, builtin_qa
from tformer.qa.download import cached_squad
from tformer.qa.read import answer, load_reader, vocab_size
from tformer.qa.squad import fingerprint as questions_fingerprint
from tformer.qa.squad import split_by_context
from tformer.qa.windows import marker_tokens
from tformer.recipes.run_dir import absolute, data_record
from tformer.recipes.skeleton import Run, window_length
from tformer.recipes.start import (
    SMALL_MODEL,
    init_settings,
    new_gpt2_config,
    prepare_init,
    saved_settings,
)
from tformer.tokenizers import build_tokenizer, tokenizer_for_model

NAME = "qa"
FINGERPRINT = "questions_sha256"
DATA = "questions"
SQUAD = {"squad": "1.1", "squad-2.0": "2.0"}  # names of the cached SQuAD versions
DEFAULT_CONTEXT = 256  # tokens per window of a new model
SHOWN = 3  # answered questions in the result
SCORES_FILE = "qa_scores.json"


@dataclass
class Questions:
    train: list[QAExample]
    val: list[QAExample]
    test: list[QAExample]  # a file's are its validation questions


def new_record(run: Run) -> dict:
    spec = run.spec
    if spec.init is not None and spec.reader is not None:
        raise ConfigError(f"--init {spec.init} decides the kind of reader; drop --reader")
    return {
        **data_record(spec, (*BUILTIN_QA, *SQUAD)),
        "init": absolute(spec.init),
        "tokenizer": spec.tokenizer,
        "bpe_vocab_size": spec.bpe_vocab_size,
        "context": spec.context,
        "stride": spec.stride,
        "max_answer_tokens": spec.max_answer_tokens,
        "null_threshold": spec.null_threshold,
        "threads": torch.get_num_threads(),
        "reader": None if spec.init is not None else spec.reader or "gpt2",
        **init_settings(spec, run.attention),
    }


def load_data(saved: dict) -> Questions:
    if saved["train"] or saved["val"]:
        if not (saved["train"] and saved["val"]) or saved["data"]:
            raise ConfigError("give --train and --val together, instead of --data")
        val = read_qa_file(saved["val"])
        return Questions(read_qa_file(saved["train"]), val, val)
    if saved["data"] is None:
        raise ConfigError(
            "question answering needs --data: a SQuAD .json or .jsonl file, "
            + ", ".join(BUILTIN_QA)
            + ", or squad / squad-2.0 (after 'tformer data squad')"
        )
    if saved["data"] in BUILTIN_QA:
        splits = builtin_qa(saved["data"])
        return Questions(splits["train"], splits["val"], splits["test"])
    if saved["data"] in SQUAD:  # downloaded with 'tformer data squad'; dev validates
        paths = cached_squad(SQUAD[saved["data"]])
        val = read_qa_file(paths["dev"])
        return Questions(read_qa_file(paths["train"]), val, val)
    train, val = split_by_context(read_qa_file(saved["data"]), saved["data"])
    return Questions(train, val, val)


def fingerprint(questions: Questions) -> str:
    return questions_fingerprint(questions.train + questions.val)


def new_model(run: Run, questions: Questions):
    spec, saved = run.spec, run.saved
    if saved["init"] is not None:
        model = load_reader(
            saved["init"],
            run.device,
            run.config.seed,
            dropout=spec.dropout,
            attention=run.attention,
        )
        tokenizer = tokenizer_for_model(saved["init"], vocab_size(model))
        prepare_init(model, saved, run.config.seed, run.say)
        return model, tokenizer
    everything = questions.train + questions.val + questions.test
    text = "\n".join(f"{e.question}\n{e.context}" for e in everything)
    tokenizer = build_tokenizer(saved["tokenizer"], text, saved["bpe_vocab_size"])
    context = spec.context or DEFAULT_CONTEXT
    dropout = 0.0 if spec.dropout is None else spec.dropout
    if saved["reader"] == "encoder":
        if spec.preset is not None:
            raise ConfigError(
                "--preset names GPT-2's sizes; give the encoder reader's with --n-layers, "
                "--n-heads, --d-model and --d-ff"
            )
        d_model = spec.d_model or SMALL_MODEL["d_model"]
        config = EncoderForQuestionAnswering.config_for(
            tokenizer.vocab_size,
            max_len=context,
            d_model=d_model,
            n_heads=spec.n_heads or SMALL_MODEL["n_heads"],
            n_layers=spec.n_layers or SMALL_MODEL["n_layers"],
            d_ff=spec.d_ff or 4 * d_model,
            dropout=dropout,
            activation=spec.activation,
            norm_position=spec.norm_position,
            attention=run.attention,
        )
        model = EncoderForQuestionAnswering(config, seed=run.config.seed)
    else:
        sizes = replace(spec, context=context, dropout=dropout)
        config = new_gpt2_config(sizes, tokenizer.vocab_size, tokenizer.eos_id, run.attention)
        model = GPT2ForQuestionAnswering(config, seed=run.config.seed)
    return model.to(run.device), tokenizer


def load_model(run: Run, directory: Path):
    return load_reader(directory, run.device, **saved_settings(run.saved))


def batches(run: Run, model, tokenizer, questions: Questions):
    max_len, stride = window_length(run, model), run.saved["stride"]
    separator, null = marker_tokens(tokenizer)

    def windows(examples):
        return [
            w
            for e in examples
            for w in make_windows(tokenizer, e, max_len, stride, separator, null)
        ]

    train = QABatches(windows(questions.train), separator, "training")
    val = QABatches(windows(questions.val), separator, "validation")
    description = (
        f"{len(questions.train):,} training and {len(questions.val):,} validation questions, "
        f"{len(train):,} and {len(val):,} windows of up to {max_len} tokens (overlap {stride})"
    )
    return train, val, description


def describe_model(run: Run, model) -> str:
    return f" from {run.saved['init']}" if run.saved["init"] else ""


def finish(run: Run, model, tokenizer, questions: Questions) -> dict:
    """The test questions answered and scored; also written to RUN_DIR/qa_scores.json."""
    saved, test = run.saved, questions.test
    everything = questions.train + questions.val + test
    threshold = saved["null_threshold"]
    if threshold is None and any(not e.answers for e in everything):
        threshold = 0.0
    max_len = window_length(run, model)
    predictions = answer(
        model, tokenizer, test, max_len, saved["stride"], saved["max_answer_tokens"], threshold
    )
    scores = squad_scores(
        (p.text, [a.text for a in e.answers]) for p, e in zip(predictions, test, strict=True)
    )
    result = {
        "exact_match": round(scores["exact_match"], 2),
        "f1": round(scores["f1"], 2),
        "questions": scores["count"],
        "scored_on": "test" if test is not questions.val else "validation",
        "examples": [
            {"question": e.question, "answer": p.text, "gold": [a.text for a in e.answers]}
            for e, p in list(zip(test, predictions, strict=True))[:SHOWN]
        ],
    }
    atomic_write_json(run.out / SCORES_FILE, result)
    return result
