"""`generate`, `translate` and the generation API refuse bad input in one line, naming it.

Every numeric flag meets NaN, infinities, a value out of its range and a word; every
sampling and beam-search field a wrong value; the Python API a prompt of the wrong shape,
type or vocabulary. Nothing here runs a model for long: most cases fail while parsing.
"""

import io
import json
import math
import sys

import pytest
import torch

from tformer import GPT2, GPT2Config
from tformer.errors import ConfigError
from tformer.generate import SamplingConfig, generate, generate_ids, stream_tokens
from tformer.generate.beam import BeamConfig, beam_search, greedy_search
from tformer.generate.decode import continue_batch
from tformer.generate.sampling import (
    apply_temperature,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
)
from tformer.generate.text import StreamedText, TextStream
from tformer.generate.translate import translate
from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from tformer.tokenizers import CharTokenizer, train_bpe

NAN, INF = "nan", "inf"

# flag -> values out of its range (besides nan, inf, -inf and a word, refused for all)
GENERATE_FLAGS = {
    "--num-samples": ["0", "-1", "2.5"],
    "--max-new-tokens": ["-1", "2.5", "1e3"],
    "--temperature": ["-0.5"],
    "--top-k": ["0", "-3", "2.5"],
    "--top-p": ["0", "1.5", "-0.1"],
    "--repetition-penalty": ["0", "-1"],
    "--seed": ["-1", "0.5", str(2**64)],
    "--threads": ["0", "-2", "1.5"],
}
TRANSLATE_FLAGS = {
    "--beam-size": ["0", "-1", "2.5"],
    "--length-penalty": [],  # any finite number is a penalty (negative favours long output)
    "--max-new-tokens": ["0", "2.5"],
    "--batch-size": ["0", "-4", "1.5"],
}


def flag_cases(flags: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [
        (flag, value)
        for flag, out_of_range in flags.items()
        for value in [NAN, INF, "-inf", "many", *out_of_range]
    ]


@pytest.mark.parametrize("flag, value", flag_cases(GENERATE_FLAGS))
def test_generate_refuses_a_bad_number_naming_its_flag(refused, tiny_checkpoint, flag, value):
    line = refused(
        ["generate", tiny_checkpoint, "--prompt", "x", f"{flag}={value}"],
        [flag, repr(value)],
        keep=[tiny_checkpoint],
    )
    assert "must be" in line


@pytest.mark.parametrize("flag, value", flag_cases(TRANSLATE_FLAGS))
def test_translate_refuses_a_bad_number_naming_its_flag(
    refused, translation_checkpoint, tmp_path, flag, value
):
    sentences = tmp_path / "in.txt"
    sentences.write_text("one two\n")
    line = refused(
        ["translate", translation_checkpoint, "--input", sentences, f"{flag}={value}"],
        [flag, repr(value)],
        keep=[translation_checkpoint, sentences],
    )
    assert "must be" in line


def test_an_empty_stop_string_is_refused(refused, tiny_checkpoint):
    refused(["generate", tiny_checkpoint, "--prompt", "x", "--stop", ""], "--stop")


def test_a_prompt_with_undecodable_bytes_is_refused(refused, tiny_checkpoint):
    # What Python makes of a command line's bytes that are not UTF-8: surrogates.
    refused(["generate", tiny_checkpoint, "--prompt", "caf\udce9"], "the prompt is not UTF-8")


@pytest.mark.parametrize("command", ["generate", "translate"])
def test_standard_input_that_is_not_utf8_is_refused_naming_it(
    refused, tiny_checkpoint, translation_checkpoint, monkeypatch, command
):
    checkpoint = tiny_checkpoint if command == "generate" else translation_checkpoint
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("caf\xe9\n".encode("latin-1"))))
    refused([command, checkpoint], ["standard input", "not UTF-8", "byte 3 is 0xe9"])


def bad_prompt_files(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "nokey.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "notjson.jsonl").write_text("{prompt\n")
    (tmp_path / "folder").mkdir()
    return {
        "missing": (["--prompt-file", tmp_path / "nope.txt"], "nope.txt"),
        "a directory": (["--prompt-file", tmp_path / "folder"], "folder"),
        "not UTF-8": (["--prompt-file", tmp_path / "latin1.txt"], "latin1.txt"),
        "no prompts": (["--prompts-file", tmp_path / "empty.txt"], "empty.txt"),
        "no prompt key": (["--prompts-file", tmp_path / "nokey.jsonl"], "nokey.jsonl"),
        "not JSON": (["--prompts-file", tmp_path / "notjson.jsonl"], "notjson.jsonl"),
        "missing list": (["--prompts-file", tmp_path / "nope.jsonl"], "nope.jsonl"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "a directory", "not UTF-8", "no prompts", "no prompt key", "not JSON",
     "missing list"],
)  # fmt: skip
def test_a_bad_prompt_file_is_refused_naming_it(refused, tiny_checkpoint, tmp_path, case):
    argv, name = bad_prompt_files(tmp_path)[case]
    refused(["generate", tiny_checkpoint, *argv], name, keep=[tiny_checkpoint, tmp_path])


@pytest.mark.parametrize("content", [b"caf\xe9\n", None])
def test_a_bad_input_file_for_translate_is_refused_naming_it(
    refused, translation_checkpoint, tmp_path, content
):
    path = tmp_path / "sentences.txt"
    if content is not None:
        path.write_bytes(content)
    refused(["translate", translation_checkpoint, "--input", path], "sentences.txt", [tmp_path])


def test_generate_refuses_a_translation_checkpoint(refused, translation_checkpoint):
    line = refused(["generate", translation_checkpoint, "--prompt", "x"], "tformer translate")
    assert "translation" in line


def test_translate_refuses_a_language_model(refused, tiny_checkpoint, tmp_path):
    sentences = tmp_path / "in.txt"
    sentences.write_text("one\n")
    line = refused(["translate", tiny_checkpoint, "--input", sentences], "tformer generate")
    assert "language model" in line


@pytest.mark.parametrize("command", ["generate", "translate"])
def test_a_missing_checkpoint_is_named(refused, tmp_path, command):
    sentences = tmp_path / "in.txt"
    sentences.write_text("one\n")
    extra = ["--prompt", "x"] if command == "generate" else ["--input", sentences]
    refused([command, tmp_path / "no-such-ckpt", *extra], "no-such-ckpt")


# ------------------------------------------------------------------------------------------
# The Python API

SAMPLING_BAD = {
    "max_new_tokens": [-1, 2.5, math.nan, "5", True, None],
    "temperature": [0, -1.0, math.nan, math.inf, "1", None],
    "top_k": [0, -1, 2.5, math.nan, True, "3"],
    "top_p": [0, 1.5, -0.1, math.nan, math.inf, "0.9"],
    "repetition_penalty": [0, -1.0, math.nan, math.inf, None],
    "do_sample": ["yes", 1, None],
    "seed": [-1, 2.5, "1", 2**64],
    "eos_id": [-1, 2.5, "x", math.nan],
    "vocab_limit": [0, -5, 2.5, "10"],
}
BEAM_BAD = {
    "beam_size": [0, -1, 2.5, math.nan, "4"],
    "length_penalty": [math.nan, math.inf, -math.inf, "1", None],
    "max_new_tokens": [0, 1.5, math.inf],
    "early_stopping": ["no", 0],
    "vocab_limit": [0, 1.5],
}


def field_cases(table):
    return [(field, value) for field, values in table.items() for value in values]


@pytest.mark.parametrize("field, value", field_cases(SAMPLING_BAD))
def test_sampling_config_refuses_a_bad_field_naming_it(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize("field, value", field_cases(BEAM_BAD))
def test_beam_config_refuses_a_bad_field_naming_it(field, value):
    with pytest.raises(ConfigError, match=field):
        BeamConfig(**{field: value})


@pytest.mark.parametrize(
    "sampler, value, name",
    [
        (top_k_filter, 2.5, "top_k"),
        (top_k_filter, 0, "top_k"),
        (top_p_filter, math.nan, "top_p"),
        (apply_temperature, math.inf, "temperature"),
        (apply_temperature, 0.0, "temperature"),
    ],
)
def test_samplers_refuse_bad_settings_naming_them(sampler, value, name):
    with pytest.raises(ConfigError, match=name):
        sampler(torch.randn(2, 10), value)


def test_repetition_penalty_refuses_nan():
    with pytest.raises(ConfigError, match="repetition_penalty"):
        repetition_penalty(torch.randn(1, 10), torch.tensor([[1, 2]]), math.nan)


@pytest.fixture(scope="module")
def model():
    config = GPT2Config(vocab_size=50, max_len=32, d_model=16, n_layers=1, n_heads=2, dropout=0.0)
    return GPT2(config, seed=0).eval()


GREEDY = SamplingConfig(max_new_tokens=4, do_sample=False)


def test_a_plain_list_of_ids_is_one_prompt(model):
    as_tensor = generate(model, torch.tensor([[1, 2, 3]]), GREEDY)
    assert generate(model, [1, 2, 3], GREEDY) == as_tensor
    assert generate(model, [[1, 2, 3]], GREEDY) == as_tensor
    assert generate(model, torch.tensor([1, 2, 3]), GREEDY) == as_tensor
    assert [generate_ids(model, [1, 2, 3], GREEDY)] == as_tensor
    assert [list(stream_tokens(model, [1, 2, 3], GREEDY))] == as_tensor


def test_lists_of_lists_run_as_a_batch(model):
    batch = generate(model, [[1, 2, 3], [4, 5]], GREEDY)
    assert batch == [generate(model, [1, 2, 3], GREEDY)[0], generate(model, [4, 5], GREEDY)[0]]


@pytest.mark.parametrize(
    "prompts, what",
    [
        ([[1, 50]], "50"),  # the vocabulary is 0..49
        ([[1, -1]], "-1"),
        ([1.5, 2.0], "prompts"),
        ([[1, 2], []], r"prompts\[1\] is empty"),
        ([], "prompts is empty"),
        ([[1, True]], "True"),
        (["ab"], r"prompts\[0\]"),
        ("hello", "prompts must be token ids"),
        (torch.tensor([[0.5, 1.0]]), "float32"),
        (torch.tensor([[True]]), "bool"),
        (torch.zeros(1, 2, 3, dtype=torch.long), r"\(1, 2, 3\)"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        (None, "NoneType"),
        (7, "int"),
    ],
)
def test_bad_prompts_are_refused_naming_the_argument(model, prompts, what):
    with pytest.raises(ConfigError, match=what):
        generate(model, prompts, GREEDY)


def test_api_arguments_of_the_wrong_kind_are_named(model):
    with pytest.raises(ConfigError, match="num_samples"):
        generate(model, [1, 2], GREEDY, num_samples=0)
    with pytest.raises(ConfigError, match="config must be a SamplingConfig"):
        generate(model, [1, 2], {"max_new_tokens": 3})
    with pytest.raises(ConfigError, match="prompt must be one prompt"):
        generate_ids(model, [[1], [2]], GREEDY)
    with pytest.raises(ConfigError, match="seeds"):
        continue_batch(model, [[1], [2]], GREEDY, seeds=[1])


def test_text_stream_checks_its_prompt_and_stops(model):
    tokenizer = CharTokenizer([chr(ord("a") + i) for i in range(50)])
    with pytest.raises(ConfigError, match="prompt"):
        TextStream(model, tokenizer, [99], GREEDY, [])
    with pytest.raises(ConfigError, match="stops"):
        TextStream(model, tokenizer, [1], GREEDY, [""])
    with pytest.raises(ConfigError, match="stops"):
        StreamedText(tokenizer, iter([1]), "ab")


@pytest.fixture(scope="module")
def seq2seq():
    config = Seq2SeqConfig(20, 20, max_len=16, d_model=16, n_heads=2, n_encoder_layers=1,
                           n_decoder_layers=1, d_ff=32, dropout=0.0)  # fmt: skip
    return Seq2SeqTransformer(config, seed=0).eval()


def test_searches_take_lists_of_source_ids(seq2seq):
    padded = torch.tensor([[5, 6, 7, 2], [8, 2, 0, 0]])
    lists = [[5, 6, 7, 2], [8, 2]]
    assert greedy_search(seq2seq, lists, 5) == greedy_search(seq2seq, padded, 5)
    config = BeamConfig(beam_size=2, max_new_tokens=5)
    assert beam_search(seq2seq, lists, config) == beam_search(seq2seq, padded, config)


@pytest.mark.parametrize(
    "src, what", [([[5, 20]], "20"), (torch.tensor([[0.5]]), "float32"), ([[]], "empty")]
)
def test_searches_refuse_bad_source_ids(seq2seq, src, what):
    with pytest.raises(ConfigError, match=what):
        greedy_search(seq2seq, src, 5)
    with pytest.raises(ConfigError, match=what):
        beam_search(seq2seq, src, BeamConfig(beam_size=2, max_new_tokens=5))


def test_translate_wants_a_list_of_sentences(seq2seq):
    tokenizer = CharTokenizer(list("abcdefghijklmnopqrst"))
    with pytest.raises(ConfigError, match="sentences must be a list"):
        translate(seq2seq, tokenizer, "abc")
    with pytest.raises(ConfigError, match=r"sentences\[1\]"):
        translate(seq2seq, tokenizer, ["abc", 3])
    with pytest.raises(ConfigError, match="batch_size"):
        translate(seq2seq, tokenizer, ["abc"], batch_size=0)
    with pytest.raises(ConfigError, match=r"sentences\[0\] is not UTF-8"):
        translate(seq2seq, tokenizer, ["ab\udce9"])


@pytest.fixture(scope="session")
def translation_checkpoint(tmp_path_factory):
    """An untrained encoder-decoder checkpoint with its byte-level BPE tokenizer."""
    out = tmp_path_factory.mktemp("badinput") / "translation"
    tokenizer = train_bpe(
        ["one two three four five"] * 4, 280, special_tokens=("<pad>", "<s>", "</s>")
    )
    v = tokenizer.vocab_size
    config = Seq2SeqConfig(v, v, max_len=16, d_model=16, n_heads=2, n_encoder_layers=1,
                           n_decoder_layers=1, d_ff=32, dropout=0.0)  # fmt: skip
    Seq2SeqTransformer(config, seed=0).save_pretrained(out)
    tokenizer.save(out)
    return out


def test_a_tokenizer_larger_than_the_model_is_refused(refused, tmp_path):
    from tformer.tokenizers import GPT2Tokenizer

    small = tmp_path / "small"
    config = GPT2Config(vocab_size=100, max_len=16, d_model=16, n_layers=1, n_heads=2)
    GPT2(config, seed=0).save_pretrained(small)
    GPT2Tokenizer().save(small)
    refused(["generate", small, "--prompt", "x"], ["100", "do not belong together"], [small])


def test_a_translation_tokenizer_larger_than_the_model_is_refused(refused, tmp_path):
    tokenizer = train_bpe(["one two three"] * 4, 280, special_tokens=("<pad>", "<s>", "</s>"))
    config = Seq2SeqConfig(20, 20, max_len=16, d_model=16, n_heads=2, n_encoder_layers=1,
                           n_decoder_layers=1, d_ff=32, dropout=0.0)  # fmt: skip
    small = tmp_path / "small"
    Seq2SeqTransformer(config, seed=0).save_pretrained(small)
    tokenizer.save(small)
    sentences = tmp_path / "in.txt"
    sentences.write_text("one\n")
    refused(["translate", small, "--input", sentences], ["20", "do not belong together"])


def test_a_model_larger_than_its_tokenizer_streams_only_decodable_ids(tmp_path, capsys):
    from tformer.cli.main import main

    tokenizer = CharTokenizer(list("abcdefgh xyz.\n"))  # 14 ids; the model has 64
    ckpt = tmp_path / "padded"
    config = GPT2Config(vocab_size=64, max_len=32, d_model=16, n_layers=1, n_heads=2)
    GPT2(config, seed=0).save_pretrained(ckpt)
    tokenizer.save(ckpt)
    argv = ["generate", ckpt, "--prompt", "abc", "--max-new-tokens", "80", "--temperature", "3"]
    main([str(a) for a in [*argv, "--seed", "0", "--json"]])
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 80 and set(out["completion"]) <= set("abcdefgh xyz.\n")
    assert out["finish_reason"] == "length"
