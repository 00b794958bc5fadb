import pytest
import torch

from tformer.generate import apply_temperature, sample, top_k_filter, top_p_filter


def test_temperature_divides_logits():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    torch.testing.assert_close(apply_temperature(logits, 0.5), logits * 2)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, 0.0)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = top_k_filter(logits, 2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    logits = probs.log()
    # sorted: 0.5, 0.3 (sum 0.8), 0.1 (sum 0.9), ...
    assert top_p_filter(logits, 0.45).isfinite().tolist() == [[False, True, False, False, False]]
    assert top_p_filter(logits, 0.75).isfinite().tolist() == [[False, True, False, True, False]]
    assert top_p_filter(logits, 0.85).isfinite().tolist() == [[False, True, True, True, False]]
    assert top_p_filter(logits, 1.0).isfinite().all()


def test_top_p_against_brute_force_on_random_distributions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 30, generator=g) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        kept = top_p_filter(logits, p).isfinite()
        probs = torch.softmax(logits, -1)
        for row in range(20):
            order = probs[row].argsort(descending=True)
            total, expected = 0.0, torch.zeros(30, dtype=torch.bool)
            for i in order:  # add tokens until the set's probability reaches p
                expected[i] = True
                total += probs[row, i].item()
                if total >= p:
                    break
            assert torch.equal(kept[row], expected)


def test_repetition_penalty_matches_the_ctrl_rule_and_transformers():
    from tformer.generate import repetition_penalty

    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])
    seen = torch.tensor([[0, 1, 1]])  # repeats count once
    out = repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0, 1.0]]
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits, seen = torch.randn(3, 50, generator=g), torch.randint(0, 50, (3, 12), generator=g)
    reference = transformers.RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    torch.testing.assert_close(repetition_penalty(logits, seen, 1.3), reference)


def test_sample_draws_tokens_with_their_probabilities():
    logits = torch.tensor([[2.0, 0.0, float("-inf"), 1.0, -1.0]]).expand(20000, 5)
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logits, generator), minlength=5).double()
    expected = torch.softmax(logits[0].double(), -1) * 20000
    assert counts[2] == 0  # a token with probability 0 is never drawn
    # Each count is binomial: within 5 standard deviations of its expectation.
    std = (expected * (1 - expected / 20000)).sqrt()
    assert ((counts - expected).abs() <= 5 * std + 1e-9).all(), (counts, expected)


def test_sample_never_draws_a_zero_probability_token_at_the_top_of_the_range(monkeypatch):
    # The worst uniform number: u * total rounds up to the total. The draw must still land
    # on the last token that has probability, not on the masked ones after it.
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=kw["dtype"]))
    assert sample(logits).item() == 1


def test_mask_beyond_hides_the_ids_past_the_limit_and_nothing_without_one():
    from tformer.generate import mask_beyond

    logits = torch.arange(6.0).view(1, 6)
    assert mask_beyond(logits, 4).tolist() == [[0.0, 1.0, 2.0, 3.0, float("-inf"), float("-inf")]]
    assert mask_beyond(logits, None) is logits and mask_beyond(logits, 6) is logits


def test_occurrence_penalty_subtracts_presence_and_frequency_per_row():
    from tformer.generate.sampling import occurrence_penalty

    logits = torch.zeros(2, 5)
    out = occurrence_penalty(logits, [[1, 1, 3], []], presence=0.5, frequency=0.25)
    expected = torch.zeros(2, 5)
    expected[0, 1] = -(0.5 + 2 * 0.25)  # drawn twice
    expected[0, 3] = -(0.5 + 0.25)
    torch.testing.assert_close(out, expected)


def test_min_p_keeps_tokens_at_least_min_p_of_the_likeliest():
    from tformer.generate.sampling import min_p_filter

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(min_p_filter(logits, 0.2))  # floor: 0.2 * 0.5 = 0.1
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.equal(min_p_filter(logits, 0.0), logits)
