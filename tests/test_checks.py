"""checks.py: numbers in their ranges, choices, flag text parsed as numbers."""

import math
import re

import numpy as np
import pytest

from tformer.checks import (
    check_choice,
    check_number,
    describe_range,
    number_problem,
    parse_number,
)
from tformer.errors import ConfigError
from tformer.generate.decode import SamplingConfig
from tformer.train.trainer import TrainConfig


@pytest.mark.parametrize(
    ("value", "low_open", "ok"),
    [(0, False, True), (0, True, False), (1e-9, True, True), (-1, False, False)],
)
def test_low_end_is_closed_or_open(value, low_open, ok):
    assert (number_problem(value, low=0, low_open=low_open) is None) is ok


@pytest.mark.parametrize(
    ("value", "high_open", "ok"),
    [(1, False, True), (1, True, False), (0.999, True, True), (1.001, False, False)],
)
def test_high_end_is_closed_or_open(value, high_open, ok):
    assert (number_problem(value, high=1, high_open=high_open) is None) is ok


@pytest.mark.parametrize("value", [True, False, np.True_])
def test_bools_are_no_numbers(value):
    assert number_problem(value) is not None
    assert number_problem(value, integer=True) is not None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32("nan")])
def test_nan_and_infinities_are_refused(value):
    assert number_problem(value) == "must be a finite number"
    with pytest.raises(ConfigError, match=re.escape(f"x must be a finite number, got {value!r}")):
        check_number("x", value)


@pytest.mark.parametrize("value", ["3", None, [3], 2.5, 3.0, np.float64(3.0)])
def test_an_integer_must_be_an_integer(value):
    assert number_problem(value, integer=True) is not None


@pytest.mark.parametrize("value", [np.int64(10), np.int32(10), np.uint8(10), 10])
def test_numpy_integers_are_integers(value):
    assert number_problem(value, integer=True, low=1) is None
    assert number_problem(value, integer=True, low=11) is not None


@pytest.mark.parametrize("value", [np.float32(1e-3), np.float64(1e-3), np.int64(1), 1e-3, 1])
def test_numpy_and_integer_values_are_numbers(value):
    assert number_problem(value, low=0, low_open=True) is None


def test_configs_take_numpy_numbers():
    assert TrainConfig(steps=np.int64(10)).steps == 10
    assert TrainConfig(lr=np.float32(1e-3)).lr == pytest.approx(1e-3)
    assert SamplingConfig(max_new_tokens=np.int64(5)).max_new_tokens == 5
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=np.float64(10.0))


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ({}, "a finite number"),
        ({"integer": True}, "an integer"),
        ({"integer": True, "low": 1}, "an integer >= 1"),
        ({"low": 0, "low_open": True}, "a finite number > 0"),
        ({"high": 1.0}, "a finite number <= 1"),
        ({"high": 1, "high_open": True}, "a finite number < 1"),
        ({"low": 0.0, "high": 1.0, "low_open": True}, "a finite number in (0, 1]"),
        ({"low": 0, "high": 1, "high_open": True}, "a finite number in [0, 1)"),
        ({"low": 1e-8}, "a finite number >= 1e-08"),
        ({"low": 0.1, "high": 2.5}, "a finite number in [0.1, 2.5]"),
        ({"integer": True, "low": 0, "high": 2**63 - 1}, "an integer in [0, 9223372036854775807]"),
        ({"integer": True, "low": np.int64(2), "high": 1_000_000}, "an integer in [2, 1000000]"),
    ],
)
def test_describe_range_in_words(args, text):
    assert describe_range(**args) == text


def test_check_number_names_the_value_and_its_range():
    check_number("top_k", 3, integer=True, low=1)
    check_number("top_k", None, integer=True, low=1, optional=True)
    with pytest.raises(ConfigError, match=r"^top_k must be an integer >= 1, got 2\.5$"):
        check_number("top_k", 2.5, integer=True, low=1)
    with pytest.raises(ConfigError, match=r"^top_k must be an integer >= 1, got None$"):
        check_number("top_k", None, integer=True, low=1)


def test_check_choice_lists_the_choices():
    check_choice("norm", "pre", ("pre", "post"))
    with pytest.raises(ConfigError, match=r"^norm must be one of 'pre', 'post', got 'mid'$"):
        check_choice("norm", "mid", ("pre", "post"))


@pytest.mark.parametrize(
    ("text", "args", "value"),
    [
        ("3", {"integer": True, "low": 1}, 3),
        ("0.5", {"low": 0, "high": 1}, 0.5),
        ("1e-3", {"low": 0, "low_open": True}, 1e-3),
        ("9223372036854775807", {"integer": True, "high": 2**63 - 1}, 2**63 - 1),
    ],
)
def test_parse_number_reads_flag_text(text, args, value):
    parsed = parse_number(text, **args)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    ("text", "args", "message"),
    [
        ("2.5", {"integer": True, "low": 1}, "must be an integer >= 1, got '2.5'"),
        ("0", {"integer": True, "low": 1}, "must be an integer >= 1, got '0'"),
        ("nan", {}, "must be a finite number, got 'nan'"),
        ("inf", {"low": 0}, "must be a finite number >= 0, got 'inf'"),
        ("x", {"low": 0, "high": 1}, "must be a finite number in [0, 1], got 'x'"),
        ("", {"integer": True}, "must be an integer, got ''"),
    ],
)
def test_parse_number_refuses_with_the_text_given(text, args, message):
    with pytest.raises(ValueError) as caught:
        parse_number(text, **args)
    assert str(caught.value) == message


def test_model_and_lora_configs_take_numpy_integers():
    from tformer.models.gpt2_config import GPT2Config
    from tformer.models.seq2seq import Seq2SeqConfig
    from tformer.nn.lora import LoRAConfig

    n = np.int64
    GPT2Config(vocab_size=n(50), max_len=n(16), d_model=n(32), n_layers=n(1), n_heads=n(4),
               dropout=np.float32(0.1), eos_id=n(3))  # fmt: skip
    Seq2SeqConfig(src_vocab_size=n(50), tgt_vocab_size=n(50), d_model=n(32), n_heads=n(4))
    LoRAConfig(rank=n(4), alpha=np.float32(8.0))
