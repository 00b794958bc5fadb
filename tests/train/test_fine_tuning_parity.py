"""Full fine-tuning matches transformers: the same weights, data and optimizer settings give
the same losses step after step, so a user gets what they would get with transformers."""

import pytest
import torch

from tformer import GPT2, GPT2Config
from tformer.train.optim import build_optimizer
from tformer.train.trainer import cross_entropy

transformers = pytest.importorskip("transformers")


def test_six_adamw_steps_give_the_losses_of_transformers(tmp_path):
    config = GPT2Config(vocab_size=71, max_len=24, d_model=32, n_layers=2, n_heads=4, dropout=0.0)
    ours = GPT2(config, seed=0).train()
    ours.save_pretrained(tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).train()
    hyper = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    our_optimizer = build_optimizer(ours, **hyper)
    decay = [p for p in theirs.parameters() if p.dim() >= 2]
    no_decay = [p for p in theirs.parameters() if p.dim() < 2]
    their_optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
    )
    g = torch.Generator().manual_seed(1)
    batches = torch.randint(0, 71, (2, 4, 24), generator=g)  # two batches, taken in turns
    our_losses, their_losses = [], []
    for step in range(6):
        ids = batches[step % 2]
        loss = cross_entropy(ours(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        our_optimizer.step()
        our_optimizer.zero_grad()
        their_loss = theirs(input_ids=ids, labels=ids).loss  # shifts the labels itself
        their_loss.backward()
        their_optimizer.step()
        their_optimizer.zero_grad()
        our_losses.append(loss.item())
        their_losses.append(their_loss.item())
    assert our_losses == pytest.approx(their_losses, abs=1e-4)
    assert our_losses[-2] < our_losses[0] - 0.1  # the steps really trained
