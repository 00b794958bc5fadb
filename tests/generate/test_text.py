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


# ------------------------------------------------------------------------------------------
# The incremental stream against decoding everything


def reference(tokenizer, ids, stops):
    """Decode all ids drawn so far after every one, stop at the first text holding a stop
    string, cut there: what the stream must end with, and how many ids it draws."""
    for n in range(1, len(ids) + 1):
        text, stopped = cut_at_stop(tokenizer.decode(ids[:n]), stops)
        if stopped:
            return text, n
    return tokenizer.decode(ids), len(ids)


def random_ids(tokenizer, rng, split_bytes):
    """Random ids, with runs of single-byte tokens that split multi-byte characters."""
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(0, 12))]
    for _ in range(rng.randrange(0, 3)):
        whole = rng.choice(["é", "日本", "😀", "ü!"]).encode()
        at = rng.randrange(len(ids) + 1)
        ids[at:at] = [split_bytes(b) for b in whole[: rng.randrange(1, 8)]]
    return ids


def random_stops(text, rng):
    stops = []
    for _ in range(rng.randrange(0, 4)):
        if text and rng.random() < 0.8:  # a piece of the text: often spans tokens
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randrange(1, 7)])
        else:
            stops.append(rng.choice(["\ufffd", "zz", "a\ufffd", "é", "\n"]))
    return stops


def tokenizers():
    from tformer.tokenizers import GPT2Tokenizer, train_bpe

    gpt2 = GPT2Tokenizer()
    bpe = train_bpe(["héllo wörld ü 日本語 😀 the quick brown fox " * 20], vocab_size=300)
    bpe_bytes = {bpe.decode_bytes([i]): i for i in range(bpe.vocab_size)}
    return {
        "char": (CharTokenizer(list("ab é日😀\n\ufffd")), None),
        "gpt2": (gpt2, lambda b: gpt2.encoding.encode_single_token(bytes([b]))),
        "bpe": (bpe, lambda b: bpe_bytes[bytes([b])]),
    }


@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe"])
def test_the_stream_ends_as_decoding_everything_does_on_random_cases(kind):
    import random

    from tformer.generate.text import StreamedText

    tokenizer, split_bytes = tokenizers()[kind]
    rng = random.Random(kind)
    for _ in range(1500):
        if split_bytes is None:
            ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(0, 15))]
        else:
            ids = random_ids(tokenizer, rng, split_bytes)
        stops = random_stops(tokenizer.decode(ids), rng)
        stream = StreamedText(tokenizer, iter(ids), stops)
        shown = ""
        expected, drawn = reference(tokenizer, ids, stops)
        for piece in stream:
            shown += piece
            assert expected.startswith(shown), (ids, stops)
        assert shown == stream.completion == expected, (ids, stops)
        assert stream.new_tokens == drawn, (ids, stops)


def test_a_tokenizer_without_bytes_streams_by_decoding_everything():
    from tokenizers import Tokenizer, decoders, models

    from tformer.generate.text import StreamedText
    from tformer.tokenizers import HFTokenizer

    vocab = {"[UNK]": 0, "hello": 1, "##lo": 2, "world": 3, "x": 4}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    tokenizer = HFTokenizer(wordpiece)
    ids = [1, 2, 3, 4, 1, 3]
    for stops in ([], ["wor"], ["x hel"]):
        stream = StreamedText(tokenizer, iter(ids), stops)
        assert "".join(stream) == stream.completion == reference(tokenizer, ids, stops)[0]
