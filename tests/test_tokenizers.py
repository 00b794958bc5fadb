import json

import pytest

import tformer.tokenizers
from tformer import CharTokenizer, GPT2Tokenizer, HFTokenizer, load_tokenizer, train_bpe
from tformer.tokenizers import bytes_to_unicode, tokenizer_for_model

MULTILINGUAL = [
    "Hello world",
    "  runs   of spaces\n\n\nand newlines\r\n\ttabs  \n",
    "你好，世界！这是一个测试。",
    "emoji 🤖🎉 and a family 👩‍👩‍👧 with joiners",
    "It's, I'll, we've, they'd: contractions",
    "Ünïcödé façade naïve Ωμέγα русский العربية हिन्दी",
    "numbers 1234567 3.14159 -42",
    "",
    " ",
    "\u00a0non-breaking\u200bzero-width",
]


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


def test_gpt2_known_answers(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.encode(" Hello") == [18435]
    assert gpt2.encode("<|endoftext|>", allow_special=True) == [50256]
    assert gpt2.eos_id == 50256 and gpt2.vocab_size == 50257


def test_special_token_text_is_ordinary_text_unless_allowed(gpt2):
    ids = gpt2.encode("a<|endoftext|>b")
    assert 50256 not in ids and gpt2.decode(ids) == "a<|endoftext|>b"
    assert 50256 in gpt2.encode("a<|endoftext|>b", allow_special=True)


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_gpt2_round_trips(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


@pytest.fixture(scope="module")
def saved_gpt2(gpt2, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2_tokenizer")
    gpt2.save(directory)
    return directory


def test_saved_vocabulary_has_gpt2_layout(saved_gpt2):
    vocab = json.loads((saved_gpt2 / "vocab.json").read_text(encoding="utf-8"))
    merges = (saved_gpt2 / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256
    assert vocab["Hello"] == 15496 and vocab["Ġworld"] == 995  # Ġ stands for the space byte
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 50000
    assert merges[1] == "Ġ t"  # GPT-2's first merge


@pytest.mark.parametrize("text", MULTILINGUAL + ["text<|endoftext|>more text"])
def test_gpt2_matches_reference_tokenizers_token_for_token(gpt2, saved_gpt2, text):
    transformers = pytest.importorskip("transformers")
    # transformers' two independent BPE implementations (Python and Rust), reading the
    # vocabulary that tformer wrote, must agree with tiktoken on every token.
    slow = transformers.GPT2Tokenizer.from_pretrained(saved_gpt2)
    fast = transformers.GPT2TokenizerFast.from_pretrained(saved_gpt2)
    ours = gpt2.encode(text, allow_special=True)
    assert ours == slow.encode(text) == fast.encode(text)


def test_saved_gpt2_tokenizer_loads_back_as_gpt2(saved_gpt2):
    assert isinstance(load_tokenizer(saved_gpt2), GPT2Tokenizer)


def test_plain_vocab_and_merges_load_with_hf_tokenizers(gpt2, saved_gpt2, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((saved_gpt2 / name).read_bytes())
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer) and loaded.eos_id == 50256
    for text in MULTILINGUAL:
        assert loaded.encode(text) == gpt2.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


def test_bytes_to_unicode_is_a_bijection_onto_printable_characters():
    mapping = bytes_to_unicode()
    assert len(set(mapping.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in mapping.values())
    assert mapping[ord(" ")] == "Ġ" and mapping[ord("A")] == "A"


def test_char_tokenizer_round_trip_and_save(tmp_path):
    text = "hello, wörld!\n"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text))
    assert tok.encode("hello") == [tok.chars.index(c) for c in "hello"]
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, CharTokenizer) and loaded.chars == tok.chars


def test_char_tokenizer_names_unknown_characters():
    with pytest.raises(ValueError, match=r"not in this tokenizer's vocabulary: \['z'\]"):
        CharTokenizer.from_text("abc").encode("abz")


def test_trained_bpe_round_trips_and_saves(tmp_path):
    corpus = ["the quick brown fox jumps over the lazy dog. " * 20, "日本語のテキストも。" * 10]
    tok = train_bpe(corpus, vocab_size=300)
    assert tok.vocab_size == 300 and tok.eos_id is not None
    text = "the lazy fox, and an unseen word: zebra 🦓"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the quick brown fox")) < len(b"the quick brown fox")  # merges learned
    assert tok.encode("<|endoftext|>", allow_special=True) == [tok.eos_id]
    assert tok.eos_id not in tok.encode("<|endoftext|>")
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(text) == tok.encode(text)


def test_bpe_vocabulary_too_small_is_rejected():
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["abc"], vocab_size=100)


def test_tokenizer_that_does_not_fit_the_model_is_rejected(tmp_path):
    CharTokenizer.from_text("abcdef").save(tmp_path)
    with pytest.raises(ValueError, match="tokenizer has 6 tokens but the model only 4"):
        tokenizer_for_model(tmp_path, vocab_size=4)
    assert tokenizer_for_model(tmp_path, vocab_size=6).vocab_size == 6


def test_directory_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not GPT-2's"):
        tokenizer_for_model(tmp_path, vocab_size=100)
    assert isinstance(tokenizer_for_model(tmp_path, vocab_size=50257), GPT2Tokenizer)


def test_saved_gpt2_tokenizer_loads_without_the_cached_ranks(saved_gpt2, monkeypatch):
    def offline():
        raise RuntimeError("no network")

    monkeypatch.setattr(tformer.tokenizers, "gpt2_ranks_file", offline)
    loaded = load_tokenizer(saved_gpt2)
    assert isinstance(loaded, GPT2Tokenizer)
    assert loaded.encode("Hello world") == [15496, 995]


def test_saving_a_tokenizer_replaces_the_one_already_there(gpt2, tmp_path):
    gpt2.save(tmp_path)
    trained = train_bpe(["some text to learn from " * 10], vocab_size=280)
    trained.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    assert load_tokenizer(tmp_path).vocab_size == trained.vocab_size < 50257
    CharTokenizer.from_text("abc").save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["char_tokenizer.json"]


@pytest.mark.parametrize("bad", [[-1], [50257], [10**9]])
def test_decoding_ids_outside_the_vocabulary_is_a_clear_error(gpt2, bad):
    with pytest.raises(ValueError, match=f"token id {bad[0]} is outside the vocabulary"):
        gpt2.decode(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        CharTokenizer.from_text("abc").decode([3 if bad[0] > 0 else -1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        train_bpe(["abc abc"], vocab_size=260).decode(bad)


def test_hf_tokenizer_encode_leaves_the_wrapped_tokenizer_unchanged():
    tok = train_bpe(["hello world " * 5], vocab_size=270)
    before = tok.tokenizer.encode_special_tokens
    tok.encode("<|endoftext|>")
    tok.encode("<|endoftext|>", allow_special=True)
    assert tok.tokenizer.encode_special_tokens == before


def test_char_tokenizer_file_with_bad_entries_is_rejected(tmp_path):
    (tmp_path / "char_tokenizer.json").write_text('{"type": "char", "chars": [1, 2]}')
    with pytest.raises(ValueError, match="distinct single characters"):
        load_tokenizer(tmp_path)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_tokenizer(tmp_path / "nope")


def assert_offsets_cover_the_text(tok, text):
    """Every token's span, in order, tiles the text (tokens inside one character share it),
    and each span decodes to the token's own text where the token is whole characters."""
    ids, spans = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) and len(spans) == len(ids)
    position = 0
    for token, (start, end) in zip(ids, spans, strict=True):
        assert start <= end and (start == position or start == position - 1)
        piece = tok.decode([token])
        if "\ufffd" not in piece:  # a whole-character token: its span is exactly its text
            assert text[start:end] == piece
        position = end
    assert position == len(text)


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_gpt2_offsets_map_tokens_back_to_characters(gpt2, text):
    assert_offsets_cover_the_text(gpt2, text)


def test_offsets_of_a_character_split_across_tokens(gpt2):
    # '🤖' is 4 UTF-8 bytes that GPT-2 splits into several tokens: each spans the emoji.
    ids, spans = gpt2.encode_with_offsets("a🤖")
    assert len(ids) > 2 and spans[0] == (0, 1) and all(span == (1, 2) for span in spans[1:])


def test_char_and_trained_bpe_offsets():
    text = "the lazy fox, and an unseen word: zebra 🦓"
    assert_offsets_cover_the_text(CharTokenizer.from_text(text), text)
    tok = train_bpe(["the quick brown fox jumps over the lazy dog. " * 20], vocab_size=300)
    assert_offsets_cover_the_text(tok, text)
