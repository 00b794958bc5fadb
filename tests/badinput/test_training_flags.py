"""Every numeric flag of `train`, `answer`, `eval` and `attention` refuses NaN, infinity, a
value outside its range and a value of the wrong kind, naming the flag, in one line; and
TrainSpec refuses the same values from Python, naming the field."""

import math

import pytest

from tformer.errors import ConfigError
from tformer.recipes import TrainSpec

# Values go as --flag=VALUE, as a user would write a negative one.
# flag -> its valid range, written out here (not read from the code under test):
# (integer, low, high, low_open, high_open)
COUNT = (True, 1, None, False, False)  # an integer >= 1
NATURAL = (True, 0, None, False, False)  # an integer >= 0
POSITIVE = (False, 0, None, True, False)  # a number > 0
NON_NEGATIVE = (False, 0, None, False, False)  # a number >= 0
UNIT = (False, 0, 1, False, True)  # a number in [0, 1)
ANY = (False, None, None, False, False)  # any finite number
TRAIN = {
    "--bpe-vocab-size": (True, 257, None, False, False),
    "--stride": COUNT,
    "--max-answer-tokens": COUNT,
    "--null-threshold": ANY,
    "--lora-rank": COUNT,
    "--lora-alpha": POSITIVE,
    "--lora-dropout": UNIT,
    "--n-layers": COUNT,
    "--n-heads": COUNT,
    "--d-model": COUNT,
    "--d-ff": COUNT,
    "--context": COUNT,
    "--dropout": UNIT,
    "--steps": COUNT,
    "--batch-size": COUNT,
    "--grad-accum": COUNT,
    "--lr": POSITIVE,
    "--min-lr": POSITIVE,
    "--warmup-steps": NATURAL,
    "--decay-steps": COUNT,
    "--label-smoothing": UNIT,
    "--weight-decay": NON_NEGATIVE,
    "--beta1": UNIT,
    "--beta2": UNIT,
    "--grad-clip": NON_NEGATIVE,
    "--eval-every": NATURAL,
    "--eval-batches": COUNT,
    "--checkpoint-every": NATURAL,
    "--seed": NATURAL,
    "--threads": COUNT,
    "--sample-tokens": NATURAL,
}
ANSWER = {"--top-passages": COUNT, "--top-answers": COUNT, "--max-answer-tokens": COUNT}
ANSWER["--stride"] = COUNT
EVAL = {"--beam-size": COUNT, "--context": COUNT, "--batch-size": COUNT}
ATTENTION = {"--layer": NATURAL, "--head": NATURAL}


def bad_values(integer, low, high, low_open, high_open) -> list[str]:
    """What the flag must refuse: not numbers, NaN and infinities, fractions for an integer,
    and the nearest values outside its range."""
    values = ["nan", "inf", "-inf", "x", ""]
    if integer:
        values += ["2.5", "1e3"]
    if low is not None:
        values.append(str(low) if low_open else str(low - 1 if integer else low - 0.5))
        values.append("-1e300")
    if high is not None:
        values.append(str(high) if high_open else str(high + 1))
        values.append("1e300")
    return values


def cases(flags: dict) -> list:
    return [
        pytest.param(flag, value, id=f"{flag}={value}")
        for flag, wanted in flags.items()
        for value in bad_values(*wanted)
    ]


@pytest.fixture
def users_file(tmp_path):
    """A file of the user's beside the run directory: it must come through untouched."""
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    return path


@pytest.mark.parametrize("flag, value", cases(TRAIN))
def test_train_refuses_a_bad_number(refused, tmp_path, users_file, flag, value):
    argv = ["train", "--data", users_file, f"{flag}={value}", "--out", tmp_path / "run"]
    line = refused(argv, [flag, "must be"], keep=[tmp_path])
    assert not (tmp_path / "run").exists(), line


@pytest.mark.parametrize("flag, value", cases(ANSWER))
def test_answer_refuses_a_bad_number(refused, tmp_path, flag, value):
    argv = ["answer", tmp_path, "--corpus", tmp_path, "--question", "who?", f"{flag}={value}"]
    refused(argv, [flag, "must be"])


@pytest.mark.parametrize("flag, value", cases(EVAL))
def test_eval_refuses_a_bad_number(refused, tmp_path, flag, value):
    refused(["eval", tmp_path, f"{flag}={value}"], [flag, "must be"])


@pytest.mark.parametrize("flag, value", cases(ATTENTION))
def test_attention_refuses_a_bad_number(refused, tmp_path, flag, value):
    out = tmp_path / "a.png"
    argv = ["attention", tmp_path, "--text", "hi", f"{flag}={value}", "--out", out]
    refused(argv, [flag, "must be"])
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--out", "--data", "--init", "--train", "--val"])
def test_train_refuses_an_empty_path(refused, tmp_path, flag):
    refused(["train", flag, "", "--steps", "1"], [flag, "empty"], keep=[tmp_path])


def test_a_lora_rank_above_the_layer_is_refused_with_its_size(
    refused, tmp_path, users_file, tiny_checkpoint
):
    users_file.write_text("some text to fine-tune on. " * 40)
    argv = ["train", "--init", tiny_checkpoint, "--data", users_file, "--lora-rank", "33"]
    argv += ["--steps", "1", "--out", tmp_path / "run"]
    line = refused(argv, ["--lora-rank 33", "96 x 32", "at most 32"], keep=[tmp_path])
    assert not (tmp_path / "run").exists(), line


def test_the_new_flags_parse(tmp_path):
    from tformer.cli.main import build_parser
    from tformer.cli.train import spec_from

    args = build_parser().parse_args(["train", "--overwrite", "--out", str(tmp_path)])
    spec = spec_from(args)
    assert spec.overwrite is True and spec.steps is None  # steps not given
    args = build_parser().parse_args(["train", "--steps", "7"])
    assert spec_from(args).steps == 7 and spec_from(args).overwrite is False


# --- the same refusals from Python: TrainSpec names the field --------------------------

FIELD_CASES = [
    # (field, a value it must refuse)
    *[(name, value) for name in ("steps", "batch_size", "grad_accum", "eval_batches")
      for value in (0, -1, 2.5, True, "3", math.nan)],
    *[(name, value) for name in ("lr", "min_lr") for value in (0.0, -1e-3, math.nan, math.inf)],
    *[(name, value) for name in ("beta1", "beta2", "dropout", "label_smoothing", "lora_dropout")
      for value in (1.0, -0.1, math.nan, math.inf, "0.5")],
    *[(name, value) for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed",
                                 "sample_tokens") for value in (-1, 1.5, None)],
    *[(name, value) for name in ("stride", "max_answer_tokens", "lora_rank", "threads",
                                 "n_layers", "n_heads", "d_model", "d_ff", "context",
                                 "decay_steps") for value in (0, -3, 1.5, math.inf)],
    ("lora_alpha", 0.0), ("lora_alpha", math.nan), ("weight_decay", -0.1),
    ("grad_clip", math.inf), ("null_threshold", math.nan), ("bpe_vocab_size", 100),
    ("seed", 2**64), ("tokenizer", "words"), ("reader", "bert"), ("preset", "huge"),
    ("norm_position", "middle"), ("activation", "tanh"), ("attention", "fast"),
    ("schedule", "linear"), ("final_eval", "none"), ("dtype", "int8"), ("parallel", "tp"),
    ("merge", "yes"), ("resume", 1), ("overwrite", None), ("compile", "no"),
    ("progress", 0), ("device", 0), ("lora_targets", ["c_attn"]), ("data", 3),
    ("out", ""), ("out", "  "), ("init", ""), ("task", "chat"),
]  # fmt: skip


@pytest.mark.parametrize("field, value", FIELD_CASES, ids=lambda v: repr(v)[:20])
def test_train_spec_refuses_a_bad_field_naming_it(field, value):
    with pytest.raises(ConfigError) as error:
        TrainSpec(**{field: value})
    assert field in str(error.value)


def test_train_spec_takes_its_defaults_and_good_values():
    spec = TrainSpec()
    assert spec.steps is None and spec.overwrite is False
    TrainSpec(steps=1, lr=1e-4, beta1=0.0, dropout=0.5, lora_rank=4, seed=0, out="runs/x")
