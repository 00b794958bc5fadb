import pytest
import torch

from tformer.data.parallel import IGNORE_INDEX, ParallelBatches, read_parallel, split_pairs
from tformer.tokenizers import CharTokenizer


def test_reads_tsv_and_jsonl_and_names_the_bad_line(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("hello\tbonjour\n\ncat\tchat\n", encoding="utf-8")
    assert read_parallel(tsv) == [("hello", "bonjour"), ("cat", "chat")]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"src": "dog", "tgt": "chien"}\n', encoding="utf-8")
    assert read_parallel(jsonl) == [("dog", "chien")]
    tsv.write_text("hello\tbonjour\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs.tsv:2: expected source<TAB>target"):
        read_parallel(tsv)
    jsonl.write_text('{"src": "dog"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r'pairs.jsonl:1: expected an object with "src"'):
        read_parallel(jsonl)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_parallel(tmp_path / "missing.tsv")


def make_batches(pairs):
    tokenizer = CharTokenizer.from_text("".join(s + t for s, t in pairs))
    # ids 0..2 are the special tokens here by construction: shift the characters past them
    return ParallelBatches(pairs, ShiftedChars(tokenizer), 0, 1, 2, max_len=32)


class ShiftedChars:
    def __init__(self, chars):
        self.chars = chars

    def encode(self, text):
        return [i + 3 for i in self.chars.encode(text)]


def test_collate_builds_shifted_targets_with_padding_ignored():
    batches = make_batches([("ab", "xyz"), ("abcd", "x")])
    batch = next(batches.sequential(2))
    src, tgt_in = batch.inputs
    # Sorted by length: ("ab", "xyz") first. Source ends with EOS (2), then padding (0).
    assert src[0, 2:].tolist() == [2, 0, 0] and src[1, -1] == 2  # "ab", EOS, padding
    assert tgt_in[0, 0] == 1 and tgt_in[0, 1:].tolist() == batch.targets[0, :-1].tolist()
    assert batch.targets[0, -1] == 2  # "xyz" then EOS
    assert batch.targets[1].tolist()[2:] == [IGNORE_INDEX] * 2  # "x", EOS, then ignored


def test_batches_are_bucketed_by_length_and_sampling_covers_every_example():
    pairs = [("a" * n, "b" * ((7 * n) % 13 + 1)) for n in range(1, 30)]
    batches = make_batches(pairs)
    lengths = [len(src) for src, _ in batches.examples]
    assert lengths == sorted(lengths)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        src, _ = batches.sample(4, g).inputs
        seen.update((src != 0).sum(1).tolist())
    assert seen == set(range(2, 31))  # every source length (+ EOS) was drawn


def test_split_keeps_the_last_pairs_for_test_and_refuses_too_few():
    pairs = [(str(i), str(i)) for i in range(10)]
    train, val, test = split_pairs(pairs, val=2, test=3)
    assert (len(train), len(val), len(test)) == (5, 2, 3) and test[-1] == ("9", "9")
    with pytest.raises(ValueError, match="cannot hold"):
        split_pairs(pairs, val=5, test=5)


def test_only_newlines_end_a_pair(tmp_path):
    # U+2028 (LINE SEPARATOR) may sit inside a sentence; str.splitlines would cut there.
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("one\u2028line\tune\u2028ligne\r\ntwo\tdeux\n", encoding="utf-8")
    assert read_parallel(tsv) == [("one\u2028line", "une\u2028ligne"), ("two", "deux")]
