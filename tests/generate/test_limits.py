"""Where generation meets its limits: every cut is warned about once, in our words, and
every continuation says why it ended."""

import warnings

import pytest
import torch

from tformer import GPT2, CharTokenizer, GPT2Config
from tformer.generate import SamplingConfig, generate
from tformer.generate.beam import BeamConfig, greedy_search
from tformer.generate.decode import continue_batch, continue_one, continue_prompts
from tformer.generate.limits import CONTEXT, LENGTH, STOP, TruncationWarning
from tformer.generate.text import TextStream
from tformer.generate.translate import translate, translate_sentences
from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer


def tiny_model(vocab_size=50, max_len=32):
    config = GPT2Config(
        vocab_size=vocab_size, max_len=max_len, d_model=16, n_layers=1, n_heads=2, dropout=0.0
    )
    return GPT2(config, seed=0).eval()


def greedy(n, eos_id=None):
    return SamplingConfig(max_new_tokens=n, do_sample=False, eos_id=eos_id)


def test_a_batch_that_fills_the_window_ends_with_context_and_one_warning():
    model = tiny_model()  # max_len 32
    with pytest.warns(TruncationWarning, match=r"filled up after 27 new tokens: 2 of 2") as seen:
        out = continue_batch(model, [[1, 2, 3, 4, 5], [6]], greedy(50))
    assert len(seen) == 1 and seen[0].filename.endswith("decode.py")  # ours, not torch's
    assert [(len(c.ids), c.finish_reason) for c in out] == [(27, CONTEXT), (27, CONTEXT)]


def test_a_batch_within_the_window_ends_with_length_and_no_warning():
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = continue_prompts(model, [[1, 2], [3]], greedy(5))
    assert [(len(c.ids), c.finish_reason, c.prompt_truncated) for c in out] == [
        (5, LENGTH, False),
        (5, LENGTH, False),
    ]


def test_a_batch_cuts_a_long_prompt_to_fit_and_says_which():
    model = tiny_model()
    long = list(range(40))
    with pytest.warns(TruncationWarning, match="1 of 2 prompts are longer"):
        out = continue_batch(model, [long, [1]], greedy(1))
    assert [c.prompt_truncated for c in out] == [True, False]
    alone = continue_batch(model, [long[-31:], [1]], greedy(1))
    assert out[0].ids == alone[0].ids


def test_one_prompt_cut_to_fit_is_reported():
    model = tiny_model()
    with pytest.warns(TruncationWarning, match="only its last 31 are used"):
        out = continue_one(model, list(range(40)), greedy(2))
    assert out.prompt_truncated and out.finish_reason == LENGTH and len(out.ids) == 2


def test_the_end_of_text_token_ends_with_stop():
    model = tiny_model()
    first = generate(model, [1, 2], greedy(1))[0][0]
    out = continue_prompts(model, [[1, 2]], greedy(10, eos_id=first))
    assert out[0].ids == [] and out[0].finish_reason == STOP
    batch = continue_prompts(model, [[1, 2], [1, 2]], greedy(10, eos_id=first))
    assert [c.finish_reason for c in batch] == [STOP, STOP]


def test_text_stream_reports_its_finish_reason_and_a_cut_prompt():
    model = tiny_model()
    tokenizer = CharTokenizer([chr(ord("a") + i) for i in range(50)])
    stream = TextStream(model, tokenizer, list(range(40)), greedy(6), [])
    with pytest.warns(TruncationWarning):
        text = "".join(stream)
    assert stream.finish_reason == LENGTH and stream.prompt_truncated and len(text) == 6
    stop = text[2:4]
    stream = TextStream(model, tokenizer, list(range(40)), greedy(6), [stop])
    with pytest.warns(TruncationWarning):
        assert "".join(stream) == text[: text.find(stop)]
    assert stream.finish_reason == STOP


def test_translate_cuts_a_long_source_with_a_warning():
    tokenizer = CharTokenizer(list("abcdefghijklmnopqrst"))
    config = Seq2SeqConfig(20, 20, max_len=8, d_model=16, n_heads=2, n_encoder_layers=1,
                           n_decoder_layers=1, d_ff=32, dropout=0.0)  # fmt: skip
    model = Seq2SeqTransformer(config, seed=0).eval()
    with pytest.warns(TruncationWarning, match="1 of 2 source sentences"):
        out = translate_sentences(model, tokenizer, ["abcdefghijkl", "abc"], None, 4, 4)
    assert [t.source_truncated for t in out] == [True, False]
    same = translate_sentences(model, tokenizer, ["abcdefg", "abc"], None, 4, 4)
    assert out[0].text == same[0].text  # its first max_len - 1 tokens


def test_a_translation_that_fills_the_window_ends_with_context():
    tokenizer = CharTokenizer(list("abcdefghijklmnopqrst"))
    config = Seq2SeqConfig(20, 20, max_len=8, d_model=16, n_heads=2, n_encoder_layers=1,
                           n_decoder_layers=1, d_ff=32, dropout=0.0)  # fmt: skip
    model = Seq2SeqTransformer(config, seed=0).eval()
    with torch.no_grad():  # the end token never wins
        model.tgt_embedding.weight[config.eos_id] = -model.tgt_embedding.weight.sum(0)
    for beam in (None, BeamConfig(beam_size=2, max_new_tokens=30)):
        short = BeamConfig(beam_size=2, max_new_tokens=3) if beam else None
        short = translate_sentences(model, tokenizer, ["abc"], short, 4, 3)
        assert short[0].finish_reason == LENGTH and len(short[0].text) == 3
        with pytest.warns(TruncationWarning, match="1 of 1 translations filled the context"):
            full = translate_sentences(model, tokenizer, ["abc"], beam, 4, 30)
        assert full[0].finish_reason == CONTEXT and len(full[0].text) == 7


def test_ids_beyond_the_vocab_limit_are_never_drawn():
    model = tiny_model(vocab_size=64)
    torch.manual_seed(0)
    hot = SamplingConfig(max_new_tokens=200, temperature=5.0, seed=1)
    free = generate(model, [1, 2], hot)[0]
    assert max(free) >= 10  # without the limit, high ids come up
    limited = generate(model, [1, 2], SamplingConfig(max_new_tokens=200, temperature=5.0,
                                                     seed=1, vocab_limit=10))[0]  # fmt: skip
    assert len(limited) == 200 and max(limited) < 10
    batch = generate(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=20, temperature=5.0,
                                                          seed=1, vocab_limit=10))  # fmt: skip
    assert max(max(row) for row in batch) < 10


def test_a_tokenizer_smaller_than_the_model_decodes_every_token_streamed():
    tokenizer = CharTokenizer(list("abcdefgh xyz.\n"))  # 14 ids, the model has 64
    model = tiny_model(vocab_size=64)
    ids = tokenizer.encode("abc")
    stream = TextStream(model, tokenizer, ids, SamplingConfig(max_new_tokens=60, temperature=5.0,
                                                              seed=0), [])  # fmt: skip
    text = "".join(stream)
    assert stream.new_tokens == 60 and len(text) == 60 and set(text) <= set("abcdefgh xyz.\n")


def test_translation_never_chooses_an_id_the_tokenizer_lacks():
    tokenizer = CharTokenizer(list("abcdefghij"))  # 10 ids, the model's target has 40
    config = Seq2SeqConfig(40, 40, max_len=12, d_model=16, n_heads=2, n_encoder_layers=1,
                           n_decoder_layers=1, d_ff=32, dropout=0.0, pad_id=0, bos_id=1,
                           eos_id=2)  # fmt: skip
    model = Seq2SeqTransformer(config, seed=3).eval()
    with torch.no_grad():  # make the ids the tokenizer lacks the model's favourites
        model.tgt_embedding.weight[10:] *= 5
    src = [tokenizer.encode("abc") + [2]]
    assert max(greedy_search(model, src, 8)[0]) >= 10  # unlimited, it would choose them
    for beam in (None, BeamConfig(beam_size=3, max_new_tokens=8)):
        out = translate(model, tokenizer, ["abc", "hij"], beam, max_new_tokens=8)
        assert all(set(t) <= set("abcdefghij") for t in out)
