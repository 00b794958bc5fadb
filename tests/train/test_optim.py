import math

import pytest
import torch

from tformer import GPT2, GPT2Config
from tformer.train.optim import build_optimizer, learning_rate


def test_weight_decay_only_on_matrices():
    model = GPT2(GPT2Config(vocab_size=20, max_len=8, d_model=8, n_layers=2, n_heads=2))
    decay, no_decay = build_optimizer(model, 1e-3, 0.1, (0.9, 0.99)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    counted = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert counted == model.num_parameters()  # every parameter once, the tied one included


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    lr, low, warmup, decay = 1e-3, 1e-4, 100, 2000
    assert learning_rate(0, lr, low, warmup, decay) == pytest.approx(lr / 101)
    assert learning_rate(99, lr, low, warmup, decay) == pytest.approx(lr * 100 / 101)
    assert learning_rate(100, lr, low, warmup, decay) == pytest.approx(lr)
    middle = (100 + 2000) // 2
    assert learning_rate(middle, lr, low, warmup, decay) == pytest.approx((lr + low) / 2)
    assert learning_rate(2000, lr, low, warmup, decay) == pytest.approx(low)
    assert learning_rate(5000, lr, low, warmup, decay) == low
    r = (1500 - 100) / 1900
    expected = low + (lr - low) * 0.5 * (1 + math.cos(math.pi * r))
    assert learning_rate(1500, lr, low, warmup, decay) == pytest.approx(expected)


def test_adamw_decay_is_decoupled_from_the_gradient():
    w = torch.nn.Parameter(torch.ones(2, 2))
    model = torch.nn.Module()
    model.w = w
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5, betas=(0.9, 0.99))
    w.grad = torch.zeros(2, 2)  # no gradient: only the decay acts
    opt.step()
    torch.testing.assert_close(w.data, torch.full((2, 2), 1 - 0.1 * 0.5))
