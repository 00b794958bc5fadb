"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule.

AdamW (Loshchilov and Hutter, 2019) shrinks weights by lr * wd each step, separately from
the gradient step. Only matrices (weights of linear layers and embeddings) decay; biases and
LayerNorm gains stay free, as decaying them only hurts.

Schedule (as in GPT-2/3 training and nanoGPT), for step s = 0, 1, ...:

    s < warmup:             lr * (s + 1) / (warmup + 1)                  linear warm-up
    warmup <= s <= decay:   min_lr + (lr - min_lr) * (1 + cos(pi r)) / 2  cosine decay,
                            r = (s - warmup) / (decay - warmup)
    s > decay:              min_lr

The original Transformer's schedule (Vaswani et al., 2017, sec. 5.3), for step n = s + 1:

    lr = d_model^-0.5 * min(n^-0.5, n * warmup^-1.5)  =  peak * min(n / warmup, sqrt(warmup / n))

rises linearly for `warmup` steps to its peak (d_model * warmup)^-0.5, then decays as
1 / sqrt(n) (the paper: warmup 4000). Here the peak is a setting like any learning rate.
"""

import math

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel does the whole update in one pass per tensor (same arithmetic).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def learning_rate(step: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup) / max(1, decay_steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


def inverse_sqrt_learning_rate(step: int, peak_lr: float, warmup: int) -> float:
    """The paper's schedule at step s = 0, 1, ... (n = s + 1): peak_lr * min(n / warmup,
    sqrt(warmup / n)); the paper's own numbers are peak_lr = (d_model * warmup)^-0.5."""
    if warmup <= 0:
        raise ValueError(f"the warm-up must be at least one step, got {warmup}")
    n = step + 1
    return peak_lr * min(n / warmup, math.sqrt(warmup / n))
