import warnings

import pytest
import torch

from tformer import GPT2, GPT2Config
from tformer.generate import SamplingConfig, TruncationWarning, generate_ids, greedy


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


def test_generation_stops_at_end_of_text():
    model = tiny_model()
    prompt = torch.tensor([[1, 2]])
    first = generate_ids(model, prompt, SamplingConfig(max_new_tokens=10, seed=0))
    k = next(i for i in range(1, 10) if first[i] not in first[:i])  # a token not seen before
    stopped = SamplingConfig(max_new_tokens=10, seed=0, eos_id=first[k])
    assert generate_ids(model, prompt, stopped) == first[:k]


def test_generation_past_the_context_slides_the_window():
    model = tiny_model()  # max_len 32
    prompt = torch.tensor([[1, 2, 3]])
    out = generate_ids(model, prompt, SamplingConfig(max_new_tokens=60, do_sample=False))
    assert len(out) == 60
    tokens = [1, 2, 3, *out]
    assert out[:29] == uncached_greedy(model, prompt, 29)  # up to a full window: as usual
    # the 30th new token is predicted from the last 16 tokens (half the window), re-encoded
    window = torch.tensor([tokens[32 - 16 : 32]])
    assert out[29] == greedy(model(window)[:, -1]).item()


def test_prompt_longer_than_the_context_keeps_its_end():
    model = tiny_model()
    long = torch.randint(0, 50, (1, 40))
    with pytest.warns(UserWarning, match="only its last 31 are used"):
        out = generate_ids(model, long, SamplingConfig(max_new_tokens=1, do_sample=False))
    assert out == uncached_greedy(model, long[:, -31:], 1)


def test_generation_runs_in_eval_mode_and_restores_training_mode():
    config = GPT2Config(vocab_size=50, max_len=32, d_model=16, n_layers=2, n_heads=2, dropout=0.5)
    model = GPT2(config, seed=0).train()
    prompt = torch.tensor([[1, 2, 3]])
    greedy_config = SamplingConfig(max_new_tokens=10, do_sample=False)
    first = generate_ids(model, prompt, greedy_config)
    assert model.training
    assert generate_ids(model, prompt, greedy_config) == first  # no dropout while generating


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_output_equals_transformers_generate(tmp_path, penalty):
    transformers = pytest.importorskip("transformers")
    config = GPT2Config(vocab_size=97, max_len=64, d_model=32, n_layers=2, n_heads=4, dropout=0.0)
    model = GPT2(config, seed=5).eval()
    with torch.no_grad():
        for p in model.parameters():  # a sharper, less uniform model than the initialisation
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    ours = generate_ids(
        model,
        prompt,
        SamplingConfig(max_new_tokens=30, do_sample=False, repetition_penalty=penalty),
    )
    expected = theirs.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=30,
        do_sample=False,
        repetition_penalty=penalty,
        pad_token_id=0,
        eos_token_id=None,
    )[0, 5:].tolist()
    assert ours == expected
    assert len(set(ours)) > 5  # a real continuation, not one token repeated


PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5], [42]]


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(max_new_tokens=12, do_sample=False),
        SamplingConfig(max_new_tokens=12, seed=3, top_k=20, temperature=0.9),
        SamplingConfig(max_new_tokens=12, do_sample=False, repetition_penalty=1.5),
    ],
    ids=["greedy", "sampled", "penalised"],
)
def test_left_padded_batch_equals_each_prompt_alone(config):
    from tformer.generate import generate_batch

    model = tiny_model()
    together = generate_batch(model, PROMPTS, config)
    alone = [generate_ids(model, torch.tensor([p]), config) for p in PROMPTS]
    assert together == alone
    assert all(len(out) == 12 for out in together)


def test_batch_rows_stop_at_their_own_end_of_text():
    from tformer.generate import generate_batch

    model = tiny_model()
    free = generate_batch(model, PROMPTS, SamplingConfig(max_new_tokens=10, do_sample=False))
    eos = free[1][3]
    stopped = SamplingConfig(max_new_tokens=10, do_sample=False, eos_id=eos)
    outputs = generate_batch(model, PROMPTS, stopped)
    for row, out in enumerate(free):
        expected = out[: out.index(eos)] if eos in out else out
        assert outputs[row] == expected


def test_several_samples_per_prompt_each_equal_to_its_own_seed_alone():
    from tformer.generate import generate

    model = tiny_model()
    config = SamplingConfig(max_new_tokens=10, seed=4, top_p=0.9)
    out = generate(model, PROMPTS[:2], config, num_samples=3)
    assert len(out) == 6
    for row, continuation in enumerate(out):
        prompt, sample = PROMPTS[row // 3], row % 3
        seeded = SamplingConfig(max_new_tokens=10, seed=4 + sample, top_p=0.9)
        assert continuation == generate_ids(model, torch.tensor([prompt]), seeded)
    assert len({tuple(c) for c in out[:3]}) > 1  # the samples of one prompt differ


def test_generate_takes_a_tensor_or_lists_and_stops_at_the_model_s_end_of_text():
    from tformer.generate import generate

    config = GPT2Config(
        vocab_size=50, max_len=32, d_model=16, n_layers=2, n_heads=2, dropout=0.0, eos_id=7
    )
    model = GPT2(config, seed=0).eval()
    greedy_config = SamplingConfig(max_new_tokens=8, do_sample=False)
    from_tensor = generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), greedy_config)
    from_lists = generate(model, [[1, 2, 3], [4, 5, 6]], greedy_config)
    assert (
        from_tensor
        == from_lists
        == [generate_ids(model, torch.tensor([p]), greedy_config) for p in ([1, 2, 3], [4, 5, 6])]
    )
    assert generate(model, torch.tensor([1, 2, 3]), greedy_config) == from_tensor[:1]
    # The default config samples and stops at the model's end-of-text token (or the window:
    # 50 new tokens do not fit in 32, which the batch warns about).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        samples = generate(model, torch.tensor([[1, 2, 3]]), num_samples=20)
    for out in samples:
        assert 7 not in out and len(out) <= 50


def test_generate_takes_numpy_prompts_and_numpy_integer_ids():
    import numpy as np

    from tformer.generate import generate

    config = GPT2Config(vocab_size=50, max_len=32, d_model=16, n_layers=1, n_heads=2, dropout=0.0)
    model = GPT2(config, seed=0).eval()
    greedy_config = SamplingConfig(max_new_tokens=4, do_sample=False)
    expected = generate(model, [[1, 2, 3]], greedy_config)
    assert generate(model, np.array([[1, 2, 3]]), greedy_config) == expected
    assert generate(model, np.array([1, 2, 3], dtype=np.int32), greedy_config) == expected
    assert generate(model, [np.array([1, 2, 3])], greedy_config) == expected
    assert generate(model, [[np.int64(1), np.int16(2), 3]], greedy_config) == expected
    assert generate(model, [(1, 2, 3), range(1, 4)], greedy_config) == expected * 2
