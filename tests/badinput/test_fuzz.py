"""Property: whatever a data file holds and whatever a config is given, tformer either
accepts it or raises one of its own errors (TformerError: DataError, ConfigError), whose
message is meant for the user; never a raw KeyError, TypeError or AttributeError.

Hypothesis draws arbitrary JSON values (and JSON shaped almost like the format, where the
bugs hide), text with tabs and line separators, and raw bytes; and for each config field a
value of any type. The runs are derandomised, so a failure reproduces.
"""

import json
import math
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tformer.data.parallel import read_parallel
from tformer.data.prompts import read_prompt_list, read_prompt_responses
from tformer.data.sources import read_source
from tformer.errors import ConfigError, TformerError
from tformer.generate import SamplingConfig
from tformer.generate.beam import BeamConfig
from tformer.models.gpt2_config import GPT2Config
from tformer.models.seq2seq import Seq2SeqConfig
from tformer.nn.lora import LoRAConfig
from tformer.qa.squad import read_qa_file
from tformer.recipes.spec import TrainSpec, with_task_defaults
from tformer.train import TrainConfig

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KEYS = ["data", "paragraphs", "context", "qas", "id", "question", "answers", "text"]
KEYS += ["answer_start", "is_impossible", "prompt", "response", "src", "tgt"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=25,
)
lines_text = st.text(st.sampled_from('ab \t\n\r\u2028{}[]":,é\x00'), max_size=60)


def maybe(strategy):
    """Mostly the right shape, sometimes anything at all."""
    return st.one_of(strategy, strategy, strategy, json_values)


def record(required: dict, optional: dict | None = None):
    """An object whose keys may each be missing and whose values may be of any type."""
    every = {**required, **(optional or {})}
    return st.fixed_dictionaries({}, optional={k: maybe(v) for k, v in every.items()})


words = st.text("abc XY", max_size=12)
answer = record({"text": words, "answer_start": st.integers(-2, 15)})
squad_question = record(
    {"id": words, "question": words, "answers": st.lists(maybe(answer), max_size=3)},
    {"is_impossible": st.booleans()},
)
paragraph = record({"context": words, "qas": st.lists(maybe(squad_question), max_size=3)})
article = record({"paragraphs": st.lists(maybe(paragraph), max_size=3)})
squad_document = maybe(record({"data": st.lists(maybe(article), max_size=3)}))
starts = st.lists(maybe(st.integers(-2, 15)), max_size=3)
datasets_answers = record({"text": st.lists(maybe(words), max_size=3), "answer_start": starts})
jsonl_question = record(
    {"context": words, "question": words, "id": words,
     "answers": st.one_of(st.lists(maybe(answer), max_size=3), datasets_answers)}
)  # fmt: skip


def jsonl(records) -> str:
    return "\n".join(json.dumps(r) for r in records) + "\n"


def assert_one_line(error: TformerError) -> None:
    """The message is there, and one line (the CLI prints it as it is)."""
    message = str(error)
    assert message.strip(), "an error without a message"
    assert "\n" not in message and "\r" not in message, f"more than one line: {message!r}"


def only_our_errors(read, path: Path) -> None:
    """`read(path)` returns, or raises a TformerError with a one-line message."""
    try:
        read(path)
    except TformerError as e:
        assert_one_line(e)


@pytest.fixture
def file_named(tmp_path):
    def make(name: str, content) -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    return make


# --- data readers -------------------------------------------------------------------------


@FUZZ
@given(document=squad_document)
def test_squad_json_of_any_shape(file_named, document):
    only_our_errors(read_qa_file, file_named("s.json", json.dumps(document)))


@FUZZ
@given(value=json_values)
def test_squad_json_any_json_value(file_named, value):
    only_our_errors(read_qa_file, file_named("s.json", json.dumps(value)))


@FUZZ
@given(records=st.lists(maybe(jsonl_question), max_size=4))
def test_qa_jsonl_of_any_shape(file_named, records):
    only_our_errors(read_qa_file, file_named("q.jsonl", jsonl(records)))


@FUZZ
@given(content=st.binary(max_size=80) | lines_text)
def test_qa_files_of_any_bytes(file_named, content):
    only_our_errors(read_qa_file, file_named("q.jsonl", content))
    only_our_errors(read_qa_file, file_named("s.json", content))


@FUZZ
@given(records=st.lists(maybe(record({"text": words})), max_size=4))
def test_lm_jsonl_of_any_shape(file_named, records):
    only_our_errors(read_source, file_named("d.jsonl", jsonl(records)))


@FUZZ
@given(content=st.binary(max_size=80) | lines_text)
def test_text_and_jsonl_of_any_bytes(file_named, content):
    only_our_errors(read_source, file_named("d.jsonl", content))
    only_our_errors(read_source, file_named("d.txt", content))


@FUZZ
@given(content=st.binary(max_size=80) | lines_text)
def test_tsv_pairs_of_any_text(file_named, content):
    only_our_errors(read_parallel, file_named("p.tsv", content))


@FUZZ
@given(records=st.lists(maybe(record({"src": words, "tgt": words})), max_size=4))
def test_jsonl_pairs_of_any_shape(file_named, records):
    only_our_errors(read_parallel, file_named("p.jsonl", jsonl(records)))


@FUZZ
@given(records=st.lists(maybe(record({"prompt": words, "response": words})), max_size=4))
def test_prompt_response_pairs_of_any_shape(file_named, records):
    only_our_errors(read_prompt_responses, file_named("pairs.jsonl", jsonl(records)))


@FUZZ
@given(content=st.binary(max_size=80) | lines_text, records=st.lists(json_values, max_size=3))
def test_prompt_files_of_any_content(file_named, content, records):
    only_our_errors(read_prompt_list, file_named("p.txt", content))
    only_our_errors(read_prompt_list, file_named("p.jsonl", content))
    only_our_errors(read_prompt_list, file_named("p.jsonl", jsonl(records)))
    only_our_errors(read_prompt_responses, file_named("pairs.jsonl", content))


# --- configs: each field given a value of any type ---------------------------------------

odd_values = (
    st.none()
    | st.booleans()
    | st.integers(-3, 5)
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([math.nan, math.inf, -0.0, 0.5, 1.0, 1e-9, ""])
    | st.text(max_size=6)
    | st.lists(st.integers(), max_size=2)
)


def config_kwargs(cls, valid: dict, choices: dict | None = None):
    """Keyword arguments for `cls`: each field left out (unless it has no default), given a
    valid value (from `valid` or `choices`), or given an odd one."""
    options = {}
    for f in fields(cls):
        good = ([valid[f.name]] if f.name in valid else []) + (choices or {}).get(f.name, [])
        options[f.name] = st.one_of(st.sampled_from(good), odd_values) if good else odd_values
    required = [f.name for f in fields(cls) if f.default is MISSING]
    return st.fixed_dictionaries({name: options.pop(name) for name in required}, optional=options)


CHOICES = {
    "task": ["lm", "translation", "qa", "sft"],
    "tokenizer": ["char", "gpt2", "bpe"],
    "norm_position": ["pre", "post", "none"],
    "activation": ["gelu", "relu", "gelu_tanh"],
    "attention": ["auto", "sdpa", "explicit", "blocked"],
    "schedule": ["cosine", "inverse_sqrt"],
    "dtype": ["auto", "float32", "bfloat16"],
    "parallel": ["ddp", "fsdp"],
    "final_eval": ["full", "sample"],
}


def only_config_errors(make) -> None:
    try:
        make()
    except TformerError as e:
        assert_one_line(e)


def make_train_spec(**kwargs):
    return with_task_defaults(TrainSpec(**kwargs))


# Per config: arguments it must accept, and changes to them that it must refuse (each a
# ConfigError naming the field), so that a check that accepts everything, or refuses
# everything, fails here and not only in the fuzzing below.
KNOWN = [
    pytest.param(
        make_train_spec,
        {"task": "qa", "steps": 3, "lr": 1e-3, "out": "r"},
        [("steps", 0), ("steps", 2.5), ("lr", math.nan), ("tokenizer", "words"),
         ("progress", "yes"), ("dropout", 1.0)],
        id="TrainSpec",
    ),
    pytest.param(
        TrainConfig,
        {"steps": 3, "batch_size": 4, "lr": 1e-3},
        [("steps", -1), ("batch_size", True), ("lr", 0), ("schedule", "linear")],
        id="TrainConfig",
    ),
    pytest.param(
        GPT2Config,
        {"d_model": 32, "n_heads": 4, "vocab_size": 50},
        [("d_model", 0), ("vocab_size", "50"), ("norm_position", "middle"), ("dropout", -0.1)],
        id="GPT2Config",
    ),
    pytest.param(
        Seq2SeqConfig,
        {"src_vocab_size": 50, "tgt_vocab_size": 50, "d_model": 32},
        [("src_vocab_size", 0), ("d_model", 32.0), ("dropout", math.inf)],
        id="Seq2SeqConfig",
    ),
    pytest.param(
        SamplingConfig,
        {"temperature": 0.7, "top_k": 5},
        [("temperature", 0), ("top_k", 0), ("top_p", 1.5), ("do_sample", 1)],
        id="SamplingConfig",
    ),
    pytest.param(
        BeamConfig,
        {"beam_size": 2},
        [("beam_size", 0), ("max_new_tokens", None), ("length_penalty", math.nan)],
        id="BeamConfig",
    ),
    pytest.param(
        LoRAConfig,
        {"rank": 4, "alpha": 8.0, "targets": ("w_qkv",)},
        [("rank", 0), ("alpha", -1.0), ("dropout", 1.0)],
        id="LoRAConfig",
    ),
]  # fmt: skip


@pytest.mark.parametrize("make, good, bad", KNOWN)
def test_known_good_configs_are_accepted_and_known_bad_refused(make, good, bad):
    make(**good)
    for name, value in bad:
        with pytest.raises(ConfigError) as caught:
            make(**{**good, name: value})
        assert name in str(caught.value), str(caught.value)
        assert_one_line(caught.value)


@FUZZ
@given(kwargs=config_kwargs(TrainSpec, {"task": "qa", "steps": 3, "lr": 1e-3, "out": "r"}, CHOICES))
def test_train_spec_fields_of_any_type(kwargs):
    def make():
        with_task_defaults(TrainSpec(**kwargs))

    only_config_errors(make)


@FUZZ
@given(kwargs=config_kwargs(TrainConfig, {"steps": 3, "batch_size": 4, "lr": 1e-3}, CHOICES))
def test_train_config_fields_of_any_type(kwargs):
    only_config_errors(lambda: TrainConfig(**kwargs))


@FUZZ
@given(kwargs=config_kwargs(GPT2Config, {"d_model": 32, "n_heads": 4, "vocab_size": 50}, CHOICES))
def test_gpt2_config_fields_of_any_type(kwargs):
    only_config_errors(lambda: GPT2Config(**kwargs))


@FUZZ
@given(
    kwargs=config_kwargs(
        Seq2SeqConfig, {"src_vocab_size": 50, "tgt_vocab_size": 50, "d_model": 32}, CHOICES
    )
)
def test_seq2seq_config_fields_of_any_type(kwargs):
    only_config_errors(lambda: Seq2SeqConfig(**kwargs))


@FUZZ
@given(kwargs=config_kwargs(SamplingConfig, {"temperature": 0.7, "top_k": 5}))
def test_sampling_config_fields_of_any_type(kwargs):
    only_config_errors(lambda: SamplingConfig(**kwargs))


@FUZZ
@given(kwargs=config_kwargs(BeamConfig, {"beam_size": 2}))
def test_beam_config_fields_of_any_type(kwargs):
    only_config_errors(lambda: BeamConfig(**kwargs))


@FUZZ
@given(kwargs=config_kwargs(LoRAConfig, {"rank": 4, "alpha": 8.0, "targets": ("w_qkv",)}))
def test_lora_config_fields_of_any_type(kwargs):
    only_config_errors(lambda: LoRAConfig(**kwargs))
