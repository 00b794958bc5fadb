"""Cross-entropy with label smoothing (Szegedy et al., 2016; Vaswani et al., 2017, sec. 5.4).

The one-hot target y is replaced by a mixture with the uniform distribution over V classes,

    q_v = (1 - eps) [v = y] + eps / V,

and the loss is the cross-entropy against q:

    loss = -sum_v q_v log p_v = (1 - eps) (-log p_y) + eps * mean_v (-log p_v)

averaged over the target positions that are not padding (ignore_index). The model is
penalised for putting all its mass on one token; the paper used eps = 0.1, which "hurts
perplexity, as the model learns to be more unsure, but improves accuracy and BLEU".
"""

import torch


def label_smoothed_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    smoothing: float = 0.1,
    ignore_index: int = -100,
) -> torch.Tensor:
    """logits (..., V), targets (...) -> the mean loss over non-ignored targets (a scalar)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    # In float32 whatever the logits' dtype, without a float32 copy of the (N, V) logits.
    log_p = torch.log_softmax(logits, dim=-1, dtype=torch.float32).flatten(0, -2)  # (N, V)
    targets = targets.flatten()  # (N,)
    keep = targets != ignore_index
    # Every position is computed and the ignored ones weighted 0: cheaper than selecting
    # the kept rows, which copies the whole (N, V) array.
    nll = -log_p.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)  # (N,) -log p_y
    uniform = -log_p.mean(dim=-1)  # (N,) mean over the vocabulary of -log p_v
    per_token = (1.0 - smoothing) * nll + smoothing * uniform
    return (per_token * keep).sum() / keep.sum()
