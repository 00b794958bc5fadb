import pytest
import torch

from tformer import GPT2, GPT2Config
from tformer.generate import (
    SamplingConfig,
    apply_temperature,
    generate_ids,
    greedy,
    top_k_filter,
    top_p_filter,
)


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


def tiny_model():
    config = GPT2Config(vocab_size=50, max_len=32, d_model=16, n_layers=2, n_heads=2, dropout=0.0)
    return GPT2(config, seed=0).eval()


def uncached_greedy(model, prompt, n):
    ids = prompt
    for _ in range(n):
        ids = torch.cat([ids, greedy(model(ids)[:, -1])[:, None]], dim=1)
    return ids[0, prompt.shape[1] :].tolist()


def test_cached_greedy_equals_uncached_greedy():
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3, 4]])
    cached = generate_ids(model, prompt, SamplingConfig(max_new_tokens=20, do_sample=False))
    assert cached == uncached_greedy(model, prompt, 20)


def test_top_k_one_equals_greedy():
    model = tiny_model()
    prompt = torch.tensor([[5, 6]])
    sampled = generate_ids(model, prompt, SamplingConfig(max_new_tokens=15, top_k=1, seed=3))
    assert sampled == generate_ids(
        model, prompt, SamplingConfig(max_new_tokens=15, do_sample=False)
    )


def test_same_seed_same_tokens():
    model = tiny_model()
    prompt = torch.tensor([[7]])
    a = generate_ids(model, prompt, SamplingConfig(max_new_tokens=15, seed=11))
    b = generate_ids(model, prompt, SamplingConfig(max_new_tokens=15, seed=11))
    c = generate_ids(model, prompt, SamplingConfig(max_new_tokens=15, seed=12))
    assert a == b and a != c


def test_generation_stops_at_end_of_text_and_context():
    model = tiny_model()
    prompt = torch.tensor([[1, 2]])
    first = generate_ids(model, prompt, SamplingConfig(max_new_tokens=10, seed=0))
    k = next(i for i in range(1, 10) if first[i] not in first[:i])  # a token not seen before
    stopped = SamplingConfig(max_new_tokens=10, seed=0, eos_token_id=first[k])
    assert generate_ids(model, prompt, stopped) == first[:k]
    long = generate_ids(model, prompt, SamplingConfig(max_new_tokens=100, do_sample=False))
    assert len(long) == 32 - 2  # the context is full


def test_generation_runs_in_eval_mode_and_restores_training_mode():
    config = GPT2Config(vocab_size=50, max_len=32, d_model=16, n_layers=2, n_heads=2, dropout=0.5)
    model = GPT2(config, seed=0).train()
    prompt = torch.tensor([[1, 2, 3]])
    greedy_config = SamplingConfig(max_new_tokens=10, do_sample=False)
    first = generate_ids(model, prompt, greedy_config)
    assert model.training
    assert generate_ids(model, prompt, greedy_config) == first  # no dropout while generating
