"""Cross-entropy with label smoothing (Szegedy et al., 2016; Vaswani et al., 2017, sec. 5.4).

The one-hot target y is replaced by a mixture with the uniform distribution over V classes,

    q_v = (1 - eps) [v = y] + eps / V,

and the loss is the cross-entropy against q. With p = softmax(x) and lse = log sum_v e^{x_v},

    loss = -sum_v q_v log p_v = lse - (1 - eps) x_y - (eps / V) sum_v x_v
    d loss / d x_v = p_v - q_v

averaged over the target positions that are not padding (ignore_index). The model is
penalised for putting all its mass on one token; the paper used eps = 0.1, which "hurts
perplexity, as the model learns to be more unsure, but improves accuracy and BLEU".
eps = 0 is the ordinary cross-entropy.

Both lines are computed here directly, a block of rows at a time, in float32 (or wider)
from logits of any dtype: the (N, V) log-probabilities are never stored, and the gradient
is written once, in the logits' dtype: cheaper than log_softmax with autograd's chain
behind it for a large vocabulary (docs/LOG.md). For float32 and bfloat16 logits on the CPU
the same two lines run as one compiled C loop each (tformer/kernels/cross_entropy.c) when a
compiler is there; and when the logits need a gradient, as one loop that writes the
gradient during the forward pass, for d(total)/d(loss) = 1, computing softmax(x) once where
the two loops compute it twice. The backward pass then hands that gradient on, scaled by
d(total)/d(loss) where that is not 1 (the loss divided for gradient accumulation, say): one
more rounding in the logits' dtype, none for a power of two.
"""

import torch
from torch.autograd.function import once_differentiable

from tformer import kernels

ROWS_PER_BLOCK = 64  # a (64, V) float32 block stays in the CPU's cache for V up to ~8k
# elsewhere (a GPU) a block is sized for few kernel launches instead: up to 2^26 float32
# values (256 MiB), 1,335 rows of GPT-2's vocabulary, where 64 rows made 256 blocks of a
# 16 x 1024 batch, each a handful of launches, forward and backward
DEVICE_BLOCK = 1 << 26


def block_rows(logits: torch.Tensor) -> int:
    """Rows of logits (N, V) per block of the loss's loops (torch's path)."""
    if logits.device.type == "cpu":
        return ROWS_PER_BLOCK
    return max(ROWS_PER_BLOCK, DEVICE_BLOCK // max(logits.shape[-1], 1))


def cpu_kernels(logits: torch.Tensor) -> kernels.Kernels | None:
    """The compiled kernels, for float32 or bfloat16 logits on the CPU where they can be
    built."""
    return kernels.load_for(logits, (torch.float32, torch.bfloat16))


def wants_gradient(logits: torch.Tensor) -> bool:
    """Whether the loss of `logits` will have a backward pass to give them a gradient."""
    return torch.is_grad_enabled() and logits.requires_grad


class SmoothedCrossEntropy(torch.autograd.Function):
    """sum_n w_n loss_n for logits (N, V), targets (N,) in [0, V), row weights w (N,);
    with_gradient: whether a backward pass is expected (the compiled path then writes the
    gradient in the forward pass)."""

    @staticmethod
    def forward(ctx, logits, targets, weights, smoothing, with_gradient):
        ctx.smoothing = smoothing
        ctx.compiled = compiled = cpu_kernels(logits)
        ctx.grad = None  # the gradient for d(total)/d(loss) = 1, written by the forward pass
        if compiled is not None and with_gradient:
            per_row, lse, ctx.grad = compiled.smoothed_ce_forward_backward(
                logits, targets, weights, smoothing
            )  # (N,) x2, (N, V); weights are float32 beside float32 or bf16 logits
            ctx.save_for_backward(logits, targets, weights, lse)
            return (per_row * weights).sum()
        if compiled is not None:
            per_row, lse = compiled.smoothed_ce_forward(logits, targets, smoothing)  # (N,) x2
            ctx.save_for_backward(logits, targets, weights, lse)
            return (per_row * weights).sum()
        n, v = logits.shape
        dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> float32
        per_row = torch.empty(n, dtype=dtype, device=logits.device)  # (N,)
        size = block_rows(logits)
        for start in range(0, n, size):
            rows = slice(start, start + size)
            log_p = torch.log_softmax(logits[rows], dim=-1, dtype=dtype)  # (n_b, V)
            log_p_target = log_p.gather(-1, targets[rows, None]).squeeze(-1)  # (n_b,)
            # -sum_v q_v log p_v with q = (1 - eps) one-hot + eps / V
            per_row[rows] = -(1.0 - smoothing) * log_p_target
            if smoothing > 0:  # (at 0 the term is left out, so -inf logits stay finite)
                per_row[rows] -= (smoothing / v) * log_p.sum(-1)
        ctx.save_for_backward(logits, targets, weights, None)
        return (per_row * weights).sum()

    @staticmethod
    @once_differentiable  # the gradient is computed, not traced: no second derivative
    def backward(ctx, grad_loss):
        if ctx.grad is not None:  # once: a second backward pass computes it afresh
            grad, ctx.grad = ctx.grad, None
            if not bool(grad_loss == 1.0):
                grad.mul_(grad_loss)  # in float32, rounded once to the logits' dtype
            return grad, None, None, None, None
        logits, targets, weights, lse = ctx.saved_tensors
        eps, (n, v) = ctx.smoothing, logits.shape
        dtype = torch.promote_types(logits.dtype, torch.float32)
        row_scale = (weights * grad_loss).to(dtype)  # (N,)
        if ctx.compiled is not None:  # the forward pass ran the compiled kernel
            return (
                ctx.compiled.smoothed_ce_backward(logits, targets, lse, row_scale, eps),
                None,
                None,
                None,
                None,
            )
        row_scale = row_scale[:, None]  # (N, 1)
        grad = torch.empty_like(logits)  # (N, V), the logits' dtype
        size = block_rows(logits)
        for start in range(0, n, size):
            rows = slice(start, start + size)
            block = torch.softmax(logits[rows], dim=-1, dtype=dtype)  # p, (n_b, V)
            if eps > 0:
                block.sub_(eps / v)  # p - eps / V
            # p - q: the target's column loses 1 - eps more
            block.scatter_add_(-1, targets[rows, None], torch.full_like(row_scale[rows], eps - 1))
            grad[rows] = block.mul_(row_scale[rows])
        return grad, None, None, None, None


def label_smoothed_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    smoothing: float = 0.1,
    ignore_index: int = -100,
) -> torch.Tensor:
    """logits (..., V), targets (...) -> the mean loss over non-ignored targets (a scalar)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    logits = logits.flatten(0, -2)  # (N, V)
    targets = targets.flatten()  # (N,)
    n, v = logits.shape
    weight_dtype = torch.promote_types(logits.dtype, torch.float32)
    if logits.device.type == "cpu" and n:  # (on a GPU, an index out of range fails in gather)
        lowest, highest = (int(bound) for bound in torch.aminmax(targets))
        scored = not lowest <= ignore_index <= highest  # no target is ignore_index
        if lowest >= 0 and highest < v and scored:  # every target scored, all in range
            weights = torch.full((n,), 1.0 / n, dtype=weight_dtype)  # the mean, in fewer calls
            return SmoothedCrossEntropy.apply(
                logits.contiguous(),
                targets.long().contiguous(),
                weights,
                float(smoothing),
                wants_gradient(logits),
            )
    keep = targets != ignore_index
    if logits.device.type == "cpu":
        kept = targets[keep]
        if kept.numel() and not 0 <= int(kept.min()) <= int(kept.max()) < logits.shape[-1]:
            raise ValueError(
                f"targets must be in [0, {logits.shape[-1]}) or {ignore_index} (ignored); "
                f"got values from {int(kept.min())} to {int(kept.max())}"
            )
    # Every position is computed and the ignored ones weighted 0: cheaper than selecting
    # the kept rows, which copies the whole (N, V) array.
    weights = keep.to(weight_dtype) / keep.sum().clamp(min=1)  # (N,) 1 / (kept rows) or 0
    return SmoothedCrossEntropy.apply(
        logits.contiguous(),
        targets.clamp(min=0).long(),  # ignored positions weigh 0; any class stands in
        weights,
        float(smoothing),
        wants_gradient(logits),
    )
