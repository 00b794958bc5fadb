"""Text as it streams: the pieces shown add up to the continuation, cut at the first stop
string, and nothing of the stop string is ever shown."""

import pytest

from tformer import GPT2, CharTokenizer, GPT2Config
from tformer.generate import SamplingConfig, generate
from tformer.generate.text import TextStream, cut_at_stop, encode_prompt

GREEDY = SamplingConfig(max_new_tokens=40, do_sample=False)


def tiny_model():
    tokenizer = CharTokenizer.from_text("abcdefgh xyz.\n")
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size, max_len=64, d_model=16, n_layers=1, n_heads=2, dropout=0.0
    )
    return GPT2(config, seed=5).eval(), tokenizer


def test_pieces_add_up_to_the_whole_continuation_without_stops():
    model, tokenizer = tiny_model()
    ids = encode_prompt(tokenizer, "abc")
    whole = tokenizer.decode(generate(model, [ids], GREEDY)[0])
    stream = TextStream(model, tokenizer, ids, GREEDY, [])
    pieces = list(stream)
    assert "".join(pieces) == stream.completion == whole
    assert stream.new_tokens == GREEDY.max_new_tokens


def test_a_stop_string_cuts_the_text_and_is_never_shown():
    model, tokenizer = tiny_model()
    ids = encode_prompt(tokenizer, "abc")
    whole = tokenizer.decode(generate(model, [ids], GREEDY)[0])
    stop = whole[10:13]  # three characters that the greedy continuation holds
    stream = TextStream(model, tokenizer, ids, GREEDY, [stop])
    shown = ""
    for piece in stream:
        shown += piece
        assert stop not in shown
    expected, stopped = cut_at_stop(whole, [stop])
    assert stopped and shown == stream.completion == expected
    assert stream.new_tokens < GREEDY.max_new_tokens


def test_an_empty_prompt_needs_an_end_of_text_token_to_start_after():
    _, tokenizer = tiny_model()  # characters: no end-of-text token
    assert encode_prompt(tokenizer, "ab") == tokenizer.encode("ab")
    with pytest.raises(ValueError, match="the prompt is empty"):
        encode_prompt(tokenizer, "")
