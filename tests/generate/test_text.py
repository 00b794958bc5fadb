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


def byte_fallback_tokenizer():
    """A SentencePiece-style BPE: characters outside its vocabulary are spelled by byte
    tokens <0x00>..<0xFF>, which its decoder (ByteFallback, Fuse) reads as one U+FFFD per
    byte of a character that is not complete. It has no token bytes (no decode_bytes)."""
    from tokenizers import Tokenizer, decoders, models

    from tformer.tokenizers import HFTokenizer

    vocab = {"<unk>": 0, "a": 1, "b": 2, "▁": 3, "ab": 4, "é": 5}
    vocab |= {f"<0x{b:02X}>": len(vocab) + b for b in range(256)}
    bpe = Tokenizer(models.BPE(vocab, [("a", "b")], unk_token="<unk>", byte_fallback=True))
    bpe.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return HFTokenizer(bpe), lambda b: vocab[f"<0x{b:02X}>"], len(vocab) - 256


def tokenizers():
    from tformer.tokenizers import GPT2Tokenizer, train_bpe

    gpt2 = GPT2Tokenizer()
    bpe = train_bpe(["héllo wörld ü 日本語 😀 the quick brown fox " * 20], vocab_size=300)
    bpe_bytes = {bpe.decode_bytes([i]): i for i in range(bpe.vocab_size)}
    fallback, fallback_byte, _ = byte_fallback_tokenizer()
    return {
        "char": (CharTokenizer(list("ab é日😀\n\ufffd")), None),
        "gpt2": (gpt2, lambda b: gpt2.encoding.encode_single_token(bytes([b]))),
        "bpe": (bpe, lambda b: bpe_bytes[bytes([b])]),
        "byte-fallback": (fallback, fallback_byte),
    }


def fallback_ids(rng):
    """Random ids for byte_fallback_tokenizer: ordinary tokens and non-ASCII byte tokens,
    with runs of bytes that spell characters, whole or cut short. (An ASCII byte token in a
    run is the one case the stream cannot follow: see the next test.)"""
    _, byte, ordinary = byte_fallback_tokenizer()
    ids = [
        rng.randrange(ordinary) if rng.random() < 0.7 else byte(rng.randrange(0x80, 0x100))
        for _ in range(rng.randrange(0, 12))
    ]
    for _ in range(rng.randrange(0, 4)):
        whole = rng.choice(["é", "日本", "😀", "ü", "\ufffd"]).encode()
        at = rng.randrange(len(ids) + 1)
        ids[at:at] = [byte(b) for b in whole[: rng.randrange(1, 8)]]
    return ids


@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe", "byte-fallback"])
def test_the_stream_ends_as_decoding_everything_does_on_random_cases(kind):
    import random

    from tformer.generate.text import StreamedText

    tokenizer, split_bytes = tokenizers()[kind]
    rng = random.Random(kind)
    for _ in range(1500):
        if split_bytes is None:
            ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(0, 15))]
        elif kind == "byte-fallback":
            ids = fallback_ids(rng)
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


def test_a_byte_fallback_character_streams_once_all_its_bytes_are_in():
    from tformer.generate.text import StreamedText

    tokenizer, byte, _ = byte_fallback_tokenizer()
    ids = [1, byte(0xE6), byte(0x97), byte(0xA5), 1]  # a 日 a
    assert tokenizer.decode(ids[:3]) == "a\ufffd\ufffd"  # one U+FFFD per byte
    stream = StreamedText(tokenizer, iter(ids), [])
    pieces = list(stream)
    assert "".join(pieces) == stream.completion == tokenizer.decode(ids) == "a日a"
    assert [p for p in pieces if p] == ["a", "日a"]
    # A run of bytes is held back until it ends: after 日, the byte E6 makes the decoder
    # read the whole run as four U+FFFDs.
    ids = [1, byte(0xE6), byte(0x97), byte(0xA5), byte(0xE6), byte(0x97), byte(0xA5)]
    assert tokenizer.decode(ids[:5]) == "a" + "\ufffd" * 4
    stream = StreamedText(tokenizer, iter(ids), [])
    pieces = [p for p in stream if p]
    assert pieces == ["a", "日日"] and stream.completion == tokenizer.decode(ids)
    # Stops are matched against the text as it reads at each token: four U+FFFDs here.
    stream = StreamedText(tokenizer, iter(ids), ["\ufffd" * 4])
    assert "".join(stream) == stream.completion == "a" and stream.new_tokens == 5
    # The one case that escapes: an ASCII byte in a run, read as "A" until the invalid
    # byte after it makes the decoder read the whole run as U+FFFDs.
    ids = [1, byte(0xE6), byte(0x97), byte(0xA5), byte(0x41), byte(0xE6), 1]
    assert tokenizer.decode(ids) == "a" + "\ufffd" * 5 + "a"
    stream = StreamedText(tokenizer, iter(ids), [])
    assert "".join(stream) == stream.completion == "a日A" + "\ufffd" * 5 + "a"


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
