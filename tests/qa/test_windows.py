"""Overlapping windows over long contexts, their labels, and the best span back in text."""

import pytest
import torch

from tformer import CharTokenizer, GPT2Tokenizer
from tformer.qa.windows import Answer, QAExample, best_answer, make_windows

CONTEXT = "abcdefghijklmnopqrst"  # 20 characters: with characters as tokens, 20 tokens
TOK = CharTokenizer.from_text(CONTEXT + "?#|")
SEP, NULL = TOK.encode("|")[0], TOK.encode("#")[0]


def windows_of(answer_start=11, answer="lmn", max_len=12, stride=3):
    example = QAExample("e1", "q?", CONTEXT, [Answer(answer, answer_start)])
    return make_windows(TOK, example, max_len, stride, SEP, NULL)


def test_windows_hold_the_question_a_slice_and_the_null_token():
    # room for 12 - 2 (question) - 2 (separator, null) = 8 context tokens, 3 shared
    windows = windows_of()
    slices = [TOK.decode(w.ids[w.context_start : w.context_end]) for w in windows]
    assert slices == ["abcdefgh", "fghijklm", "klmnopqr", "pqrst"]
    for w in windows:
        assert len(w.ids) <= 12
        assert w.ids[:3] == TOK.encode("q?") + [SEP] and w.ids[-1] == NULL
    # the answer "lmn" (characters 11-13) is whole only in the third window
    labels = [(w.start, w.end) for w in windows]
    assert labels[2] == (3 + 11 - 10, 3 + 13 - 10)
    for w, label in zip(windows, labels, strict=True):
        if w is not windows[2]:
            assert label == (w.null_position, w.null_position)
    third = windows[2]
    assert TOK.decode(third.ids[third.start : third.end + 1]) == "lmn"


def test_a_question_without_answer_points_every_window_at_null():
    example = QAExample("e2", "q?", CONTEXT, [])
    for w in make_windows(TOK, example, 12, 3, SEP, NULL):
        assert w.start == w.end == w.null_position


def test_a_question_too_long_for_the_window_is_refused():
    example = QAExample("e3", "q?" * 5, CONTEXT, [])
    with pytest.raises(ValueError, match="shorten the question or lower --stride"):
        make_windows(TOK, example, 12, 3, SEP, NULL)


def test_an_answer_that_is_not_in_its_context_is_refused():
    with pytest.raises(ValueError, match="is not at character 3"):
        QAExample("e4", "q?", CONTEXT, [Answer("xyz", 3)])


def span_logits(window, start, end, strength=10.0, null=0.0):
    logits = torch.zeros(2, len(window.ids))
    logits[0, start] = logits[1, end] = strength
    logits[:, window.null_position] = null / 2
    return logits


def test_the_best_span_over_windows_comes_back_as_text():
    windows = windows_of()
    logits = [torch.zeros(2, len(w.ids)) for w in windows]
    third = windows[2]
    logits[2] = span_logits(third, third.start, third.end)
    prediction = best_answer(windows, logits, CONTEXT)
    assert (prediction.text, prediction.start, prediction.end) == ("lmn", 11, 14)
    assert prediction.score == pytest.approx(20.0)
    # a longest-answer limit of 2 tokens rules "lmn" out
    assert len(best_answer(windows, logits, CONTEXT, max_answer_tokens=2).text) <= 2


def test_no_answer_wins_only_by_more_than_the_threshold():
    windows = windows_of()
    logits = [
        span_logits(w, w.context_start, w.context_start, strength=1.0, null=5.0) for w in windows
    ]
    # best span scores 2.0, the null 5.0: no answer with threshold 0, the span with 4
    assert best_answer(windows, logits, CONTEXT, null_threshold=0.0).text == ""
    assert best_answer(windows, logits, CONTEXT, null_threshold=4.0).text != ""
    assert best_answer(windows, logits, CONTEXT).text != ""  # SQuAD 1.1: always a span


def test_offsets_cut_the_answer_from_the_text_with_gpt2_tokens():
    tok = GPT2Tokenizer()
    context = "Der Kölner Dom ist eine römisch-katholische Kirche in Köln. 🤖 " * 6
    start = context.index("römisch-katholische")
    example = QAExample("e5", "Was ist der Dom?", context, [Answer("römisch-katholische", start)])
    windows = make_windows(
        tok, example, max_len=40, stride=8, separator=tok.eos_id, null=tok.eos_id
    )
    assert len(windows) > 2
    labelled = [w for w in windows if w.start != w.null_position]
    assert labelled
    w = labelled[0]
    logits = [torch.zeros(2, len(x.ids)) for x in windows]
    logits[windows.index(w)] = span_logits(w, w.start, w.end)
    assert best_answer(windows, logits, context).text == "römisch-katholische"


def test_a_batch_of_windows_counts_its_input_tokens_for_throughput():
    from tformer.qa.batches import QABatches

    windows = windows_of() + windows_of(answer_start=2, answer="cde", max_len=10)
    batch = QABatches(windows, SEP).collate(windows)
    assert batch.tokens == sum(len(w.ids) for w in windows) == int(batch.inputs[1].sum())
    assert batch.tokens > batch.targets.numel()  # not the two targets per window
