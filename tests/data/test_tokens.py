import numpy as np
import pytest
import torch

from tformer import CharTokenizer
from tformer.data.tokens import Batch, LMBatches, stacked, tokenize_cached


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))


def test_tokens_are_cached_and_reused(tmp_path):
    text = "hello world " * 50
    tok = CharTokenizer.from_text(text)
    first = tokenize_cached(text, tok)
    assert first.dtype == np.uint16 and isinstance(first, np.memmap)
    assert first.tolist() == tok.encode(text)
    files = list((tmp_path / "cache" / "tokens").iterdir())
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("encoded again")

    tok.encode = fail
    assert np.array_equal(tokenize_cached(text, tok), first)  # served from the file
    other = CharTokenizer.from_text(text + "!")  # another tokenizer: another cache entry
    tokenize_cached(text, other)
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2


def test_large_vocabulary_uses_uint32():
    tok = CharTokenizer(list("ab"))
    tok.vocab_size = 70_000  # as a big BPE would have
    assert tokenize_cached("abba", tok).dtype == np.uint32


def test_windows_are_contiguous_and_targets_are_shifted_inputs():
    tokens = np.arange(100, dtype=np.uint16)
    data = LMBatches(tokens, context=8)
    batch = data.sample(5, torch.Generator().manual_seed(0))
    (x,) = batch.inputs
    assert x.shape == batch.targets.shape == (5, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, 7, dtype=torch.int64))
    assert torch.equal(batch.targets, x + 1)
    assert int(batch.targets.max()) <= 99


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_windows_of_a_read_only_map_are_its_slices_up_to_the_last(tmp_path, dtype, recwarn):
    path = tmp_path / "ids.bin"
    values = (np.arange(40) * 977 % 65_536).astype(dtype)  # the top of uint16's range too
    values.tofile(path)
    data = LMBatches(np.memmap(path, dtype=dtype, mode="r"), context=6)
    assert not recwarn.list  # torch's warning about a read-only array is not the user's
    starts = torch.tensor([0, 33, 17])  # 33: the last window that fits
    batch = data.windows(starts)
    expected = torch.tensor(
        np.stack([values[s : s + 7] for s in starts.tolist()]), dtype=torch.int64
    )
    assert torch.equal(batch.inputs[0], expected[:, :-1])
    assert torch.equal(batch.targets, expected[:, 1:])
    assert batch.token_count() == 3 * 6
    firsts = [data.sample(64, torch.Generator().manual_seed(i)).inputs[0][:, 0] for i in range(8)]
    position = {int(v): i for i, v in enumerate(values)}  # the values are distinct
    drawn = {position[int(v)] for v in torch.cat(firsts)}
    assert drawn == set(range(34))  # every start that fits is drawn in time, none past it


def test_windows_of_a_strided_array_are_its_own_elements():
    every_other = np.arange(40, dtype=np.uint16)[::2]  # 0, 2, 4, ...
    batch = LMBatches(every_other, context=3).windows(torch.tensor([0, 5]))
    assert batch.inputs[0].tolist() == [[0, 2, 4], [10, 12, 14]]
    assert batch.targets.tolist() == [[2, 4, 6], [12, 14, 16]]


def test_same_generator_state_same_batch():
    data = LMBatches(np.arange(1000, dtype=np.uint16), context=16)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a = data.sample(4, g)
    g.set_state(state)
    assert torch.equal(data.sample(4, g).inputs[0], a.inputs[0])


def test_sequential_windows_score_every_token_once():
    tokens = np.arange(50, dtype=np.uint16)
    targets = torch.cat([b.targets.flatten() for b in LMBatches(tokens, 8).sequential(2)])
    assert targets.tolist() == list(range(1, 49))  # the last incomplete window is dropped


def test_corpus_shorter_than_one_window_is_refused():
    with pytest.raises(ValueError, match="fewer than one context window needs"):
        LMBatches(np.arange(8, dtype=np.uint16), context=8, name="validation")


def test_batches_stacked_for_scoring_keep_their_rows_in_order():
    data = LMBatches(np.arange(500, dtype=np.uint16), 8)
    g = torch.Generator().manual_seed(0)
    batches = [data.sample(3, g) for _ in range(10)]
    joined = stacked(batches, 4)
    assert [len(b) for b in joined] == [12, 12, 6]
    assert torch.equal(
        torch.cat([b.inputs[0] for b in joined]), torch.cat([b.inputs[0] for b in batches])
    )
    assert torch.equal(
        torch.cat([b.targets for b in joined]), torch.cat([b.targets for b in batches])
    )


def test_batches_of_other_shapes_stay_apart_and_token_counts_add_up():
    def batch(rows, length, tokens=None):
        return Batch((torch.zeros(rows, length),), torch.zeros(rows, length), tokens)

    joined = stacked([batch(2, 5, 7), batch(1, 5, 3), batch(2, 6), batch(2, 6), batch(1, 5)], 8)
    assert [tuple(b.targets.shape) for b in joined] == [(3, 5), (4, 6), (1, 5)]
    assert [b.tokens for b in joined] == [10, None, None]
    assert stacked([], 4) == []
