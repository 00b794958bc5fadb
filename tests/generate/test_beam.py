import itertools

import pytest
import torch

from tformer import kernels
from tformer.generate.beam import (
    BeamConfig,
    beam_search,
    best_token,
    greedy_search,
    most_likely,
)
from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer


def sharp_model(tgt_vocab_size=13, seed=0, noise=0.3):
    config = Seq2SeqConfig(
        src_vocab_size=17,
        tgt_vocab_size=tgt_vocab_size,
        max_len=24,
        d_model=32,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=64,
        dropout=0.0,
    )
    model = Seq2SeqTransformer(config, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # sharper distributions than the initialisation
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return model


SOURCES = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16], [7]]


def padded(sources):
    width = max(len(s) for s in sources)
    return torch.tensor([s + [0] * (width - len(s)) for s in sources])


def uncached_greedy(model, source, n):
    """Re-run the whole decoder on the whole prefix at every step: no cache at all."""
    src = torch.tensor([source])
    tgt = torch.tensor([[model.config.bos_id]])
    out = []
    for _ in range(n):
        logits = model(src, tgt)[0, -1]
        logits[model.config.pad_id] = float("-inf")  # padding is never an output
        token = logits.argmax().item()
        if token == model.config.eos_id:
            break
        out.append(token)
        tgt = torch.cat([tgt, torch.tensor([[token]])], dim=1)
    return out


def test_cached_greedy_search_equals_uncached_and_padding_changes_nothing():
    model = sharp_model()
    batch = greedy_search(model, padded(SOURCES), max_new_tokens=12)
    assert batch == [uncached_greedy(model, s, 12) for s in SOURCES]
    assert any(len(out) > 2 for out in batch)  # real outputs, not all empty


def test_beam_size_one_equals_greedy():
    model = sharp_model()
    for alpha in (0.0, 1.0):
        config = BeamConfig(beam_size=1, length_penalty=alpha, max_new_tokens=12)
        assert beam_search(model, padded(SOURCES), config) == greedy_search(
            model, padded(SOURCES), 12
        )


def test_batched_beam_search_equals_each_sentence_alone():
    model = sharp_model()
    config = BeamConfig(beam_size=3, max_new_tokens=10)
    together = beam_search(model, padded(SOURCES), config)
    alone = [beam_search(model, torch.tensor([s]), config)[0] for s in SOURCES]
    assert together == alone


def exhaustive_best(model, source, max_new_tokens, alpha):
    """Score every target sequence up to max_new_tokens: those ending in EOS, and those of
    full length without it, by sum log p / length^alpha (the padding token is never an
    output: its probability is 0)."""
    c = model.config
    src = torch.tensor([source])
    best = (float("-inf"), None)
    words = [t for t in range(c.tgt_vocab_size) if t not in (c.eos_id, c.pad_id)]
    for n in range(0, max_new_tokens + 1):
        for body in itertools.product(words, repeat=n):
            ends = [c.eos_id] if n < max_new_tokens else [c.eos_id, None]
            for end in ends:
                ids = list(body) + ([end] if end is not None else [])
                if not ids:
                    continue
                tgt = torch.tensor([[c.bos_id, *ids]])
                logits = model(src, tgt[:, :-1])[0].double()
                logits[:, c.pad_id] = float("-inf")
                log_p = torch.log_softmax(logits, -1)
                total = log_p.gather(-1, tgt[0, 1:, None]).sum().item()
                score = total / len(ids) ** alpha
                if score > best[0]:
                    best = (score, list(body))
    return best[1]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_a_beam_wide_enough_finds_the_best_sequence_of_an_exhaustive_search(alpha):
    # 3 words (5 tokens less the end and padding), up to 3 of them: 40 targets. Flat
    # distributions (little sharpening) make the greedy choice a poor one for some sources,
    # so the search is really tested.
    model = sharp_model(tgt_vocab_size=5, seed=7, noise=0.2)
    config = BeamConfig(beam_size=64, length_penalty=alpha, max_new_tokens=3)
    differs_from_greedy = False
    for source in ([5, 6, 7], [11], [12, 13, 14, 15]):
        found = beam_search(model, torch.tensor([source]), config)[0]
        assert found == exhaustive_best(model, source, 3, alpha)
        differs_from_greedy |= found != greedy_search(model, torch.tensor([source]), 3)[0]
    assert differs_from_greedy


@pytest.mark.skipif(kernels.load() is None, reason="no C kernels here")
def test_the_kernels_choose_each_beam_s_candidates_as_torch_does(monkeypatch):
    logits = torch.randn(12, 50, generator=torch.Generator().manual_seed(0)) * 3
    logits[:, 0] = float("-inf")
    fast = most_likely(logits, 6)
    monkeypatch.setattr(kernels, "load", lambda: None)  # torch's log-sum-exp and top-n
    plain = most_likely(logits, 6)
    assert torch.equal(fast[1], plain[1])
    torch.testing.assert_close(fast[0], plain[0], rtol=0, atol=1e-5)
    assert torch.allclose(plain[0], torch.log_softmax(logits, -1).topk(6).values)
    model = sharp_model(tgt_vocab_size=29, seed=3)
    config = BeamConfig(beam_size=4, max_new_tokens=10)
    searched_by_torch = beam_search(model, padded(SOURCES), config)
    monkeypatch.undo()
    assert beam_search(model, padded(SOURCES), config) == searched_by_torch


@pytest.mark.skipif(kernels.load() is None, reason="no C kernels here")
def test_greedy_s_best_token_is_argmax_with_ties_to_the_lower_id(monkeypatch):
    logits = torch.randint(-3, 3, (40, 97), generator=torch.Generator().manual_seed(1)).float()
    logits[5] = float("-inf")  # no token can follow: id 0, as argmax
    logits[6, 40:] = 9.0  # a tie far from the start of the row
    chosen = best_token(logits)
    assert chosen.shape == (40, 1) and chosen[6, 0] == 40
    assert torch.equal(chosen, logits.argmax(-1, keepdim=True))
    monkeypatch.setattr(kernels, "load", lambda: None)  # torch's argmax
    assert torch.equal(best_token(logits), chosen)


def test_a_window_of_one_position_leaves_no_room_for_a_word():
    config = Seq2SeqConfig(src_vocab_size=17, tgt_vocab_size=13, max_len=1, d_model=8,
                           n_heads=2, n_encoder_layers=1, n_decoder_layers=1, d_ff=8)  # fmt: skip
    model = Seq2SeqTransformer(config, seed=0).eval()
    sources = torch.tensor([[5], [3], [7]])  # the source fits; the target has BOS alone
    assert beam_search(model, sources, BeamConfig(beam_size=2)) == [[], [], []]


def test_bad_beam_settings_are_rejected():
    with pytest.raises(ValueError, match="beam_size"):
        BeamConfig(beam_size=0)
