"""TrainConfig refuses every field out of its range or of the wrong type, naming the field
and its range (NaN and infinity included): a bad beta must not surface later as a NaN loss
blamed on --lr."""

import math

import pytest

from tformer.errors import ConfigError
from tformer.train import TrainConfig

NAN, INF = math.nan, math.inf

# field -> values it refuses (out of range, not finite, the wrong type)
REFUSED = {
    "steps": [0, -1, 2.5, "10", None, True, NAN],
    "batch_size": [0, -4, 4.0, "8", None],
    "grad_accum": [0, 1.5, None],
    "eval_batches": [0, 2.0, None],
    "warmup_steps": [-1, 0.5, None, INF],
    "eval_every": [-1, 1.0, None],
    "checkpoint_every": [-1, 2.5, None],
    "decay_steps": [0, -3, 4.5, "100", INF],
    "seed": [-1, 1.5, None, "1"],
    "lr": [0, -1e-3, NAN, INF, -INF, "1e-3", None, True],
    "min_lr": [0, -1e-4, NAN, INF, None],
    "weight_decay": [-0.1, NAN, INF, None],
    "grad_clip": [-1.0, NAN, INF, None],
    "beta1": [1.0, 1.5, -0.1, NAN, INF, None],
    "beta2": [1.0, 2.0, -1e-9, NAN, None],
    "label_smoothing": [1.0, -0.1, NAN, INF, None],
    "schedule": ["linear", None, 1],
    "final_eval": ["half", None],
    "dtype": ["int8", "fp16", None],
    "parallel": ["zero3", None],
    "activation_checkpointing": [1, "yes", None],
    "compile": [0, "no", None],
}
CASES = [(field, value) for field, values in REFUSED.items() for value in values]


@pytest.mark.parametrize("field, value", CASES, ids=[f"{f}={v!r}" for f, v in CASES])
def test_every_field_out_of_its_range_is_refused_by_name(field, value):
    overrides = {field: value}
    if field == "min_lr" and isinstance(value, int | float):
        overrides["lr"] = 1.0  # so that only min_lr's own range is at stake
    with pytest.raises(ConfigError, match=f"^{field} must be"):
        TrainConfig(**overrides)


def test_beta1_of_1_5_says_its_range():
    with pytest.raises(ConfigError, match=r"^beta1 must be a finite number in \[0, 1\), got 1.5$"):
        TrainConfig(beta1=1.5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(min_lr=1e-2, lr=1e-3), "min_lr must be <= lr"),
        (dict(batch_size=10, grad_accum=4), "batch_size (10) must be divisible by grad_accum"),
        (dict(schedule="inverse_sqrt", warmup_steps=0), "needs warmup_steps >= 1"),
    ],
)
def test_fields_that_do_not_go_together_are_refused(overrides, message):
    with pytest.raises(ConfigError) as refused:
        TrainConfig(**overrides)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(beta1=0.0, beta2=0.0, label_smoothing=0.0, weight_decay=0.0, grad_clip=0.0),
        dict(beta1=0.999, beta2=0.9999, label_smoothing=0.999, decay_steps=1),
        dict(warmup_steps=0, eval_every=0, checkpoint_every=0, seed=0, min_lr=1e-3, lr=1e-3),
        dict(compile=True, activation_checkpointing=True, parallel="fsdp", dtype="bfloat16"),
    ],
)
def test_the_edges_of_every_range_are_accepted(overrides):
    TrainConfig(**overrides)
