"""The blocked attention path: causal self-attention for training on a CPU.

The reference is nn/attention.py's explicit path, softmax(Q K^T / sqrt(d_k) + M) V written
out. MultiHeadAttention(implementation="blocked") computes the same causal self-attention
in one of two ways that skip the work the causal mask would throw away:

  * more than QUERY_BLOCK positions and no cache: one block of queries at a time
    (BlockedCausalAttention). Queries [a, b) may only see keys [0, b), so the key blocks
    above the diagonal are never computed, in the forward pass or the backward. Where torch's
    fused kernel or a FlashAttention kernel trains faster on the CPU in use, a step without
    padding or attention dropout takes that instead (nn/attention_choice.py).
  * at most QUERY_BLOCK positions, with no padding, cache, attention dropout or hook on the
    weights, and the fused Q, K, V projection in bfloat16 on the CPU: the compiled kernel
    tformer/kernels/attention.c (CompiledCausalAttention). It runs each head in float32
    straight from the projection to the output projection's layout, so no head is ever
    transposed in memory, and comes closer to the exact values than torch's bf16 operations.

Anything else on this switch takes the explicit path in bf16, torch's fused kernel in
float32 (nn/attention.py; the explicit path where a hook wants the weights). Both ways
give first-order gradients only (a gradient of their gradient raises): for second-order
ones (or torch.func) use the explicit path in float32 or float64 (nn/attention.py's
set_implementation). What chose this path and QUERY_BLOCK was measured: docs/LOG.md.
"""

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as module_hooks

from tformer import kernels
from tformer.nn.causal_softmax import masked_softmax, softmax_kernels
from tformer.nn.dropout import dropout_mask

QUERY_BLOCK = 128  # queries per block, and the most positions the kernel takes (docs/LOG.md)


def in_query_blocks(t: int, s: int) -> bool:
    """Whether causal self-attention of t queries over s keys runs a block of queries at a
    time: no cache (t == s), and more positions than one block."""
    return t == s > QUERY_BLOCK


def blocked_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    block: int | None = None,
) -> torch.Tensor:
    """Causal self-attention skipping the hidden key blocks (BlockedCausalAttention):
    (B, H, T, D) x3 -> (B, H, T, D). `mask` (T, T) or (B, 1, T, T) must include causality;
    None: causality alone. `block` queries at a time, QUERY_BLOCK by default."""
    block = QUERY_BLOCK if block is None else block
    return BlockedCausalAttention.apply(q, k, v, mask, dropout_p, block)


class BlockedCausalAttention(torch.autograd.Function):
    """Causal self-attention a block of queries at a time: (B, H, T, D) x3 -> (B, H, T, D).

    Queries [a, b) may only see keys [0, b), so each block's scores are (b - a, b) rather
    than (b - a, T): with n blocks the scores cost (n + 1) / 2n of the full (T, T) matrix.
    Per block, with P = softmax(S) the weights (after dropout, P m s):

        S = Q_a K^T / sqrt(d),   O_a = P V
        dV += P^T dO_a,   dP = dO_a V^T,   dS = P * (dP - rowsum(dP * P))
        dQ_a = dS K / sqrt(d),   dK += dS^T Q_a / sqrt(d)

    The backward is written out because autograd through the slices would allocate and
    zero-fill a full-size gradient for every block's K and V slice. The softmax runs in the
    scores' dtype (in bf16 its sums are float32 inside the kernel); without a mask, in bf16
    on the CPU, each row's softmax and its gradient take one pass in place where that was
    timed faster (nn/causal_softmax.py).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, block):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        t, scale = q.shape[-2], 1.0 / math.sqrt(q.shape[-1])
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        # causality alone: each row's softmax in one pass where the kernel was timed faster
        library = softmax_kernels(q, block) if mask is None else None
        saved = []  # per block: the weights P, and the dropout mask if any
        for start in range(0, t, block):
            end = min(start + block, t)
            scores = (q[..., start:end, :] * scale) @ k[..., :end, :].transpose(-2, -1)
            if library is not None:  # (B, H, b - a, end) in place, as the masked softmax
                weights = library.causal_softmax(scores, start)
            elif mask is None:  # causality hides keys only above the block's diagonal
                weights = masked_softmax(scores, start)
            else:
                scores.masked_fill_(~mask[..., start:end, :end], float("-inf"))
                weights = torch.softmax(scores, dim=-1)
            weights = weights.to(v.dtype)  # CUDA autocast computes softmax in float32
            if mask is not None and mask.dim() > 2:  # padding: a query seeing no key
                visible = mask[..., start:end, :end]  # attends to nothing
                weights.masked_fill_(~visible.any(dim=-1, keepdim=True), 0.0)
            kept, keep = weights, None
            if dropout_p > 0.0:
                keep, ctx.keep_scale = dropout_mask(weights.shape, dropout_p, weights.device)
                kept = weights * keep * ctx.keep_scale
            out[..., start:end, :] = kept @ v[..., :end, :]  # (B, H, b - a, D)
            saved += [weights] if keep is None else [weights, keep]
        ctx.save_for_backward(q, k, v, *saved)
        ctx.block, ctx.dropout, ctx.library = block, dropout_p > 0.0, library
        return out

    @staticmethod
    @once_differentiable  # the softmax kernel's gradient is written in place, not recorded
    def backward(ctx, grad_out):
        q, k, v, *saved = ctx.saved_tensors
        t, scale = q.shape[-2], 1.0 / math.sqrt(q.shape[-1])
        grad_q = torch.empty_like(q)
        # dK and dV sum over the query blocks: each block's product comes in the inputs'
        # dtype, the sum over blocks is kept in float32.
        wide = torch.promote_types(k.dtype, torch.float32)
        grad_k, grad_v = torch.zeros_like(k, dtype=wide), torch.zeros_like(v, dtype=wide)
        per_block = 2 if ctx.dropout else 1
        for i, start in enumerate(range(0, t, ctx.block)):
            end = min(start + ctx.block, t)
            weights = saved[per_block * i]
            grad_o = grad_out[..., start:end, :]  # (B, H, b - a, D)
            kept = weights
            if ctx.dropout:
                keep = saved[per_block * i + 1]
                kept = weights * keep * ctx.keep_scale
            grad_v[..., :end, :] += kept.transpose(-2, -1) @ grad_o
            grad_weights = grad_o @ v[..., :end, :].transpose(-2, -1)  # (B, H, b - a, end)
            if ctx.dropout:
                grad_weights = grad_weights * keep * ctx.keep_scale
            # dS = P * (dP - rowsum(dP * P)), summed in float32: in place in the kernel, or
            # PyTorch's softmax backward kernel
            if ctx.library is not None:
                grad_scores = ctx.library.causal_softmax_backward(weights, grad_weights, start)
            else:
                grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
            grad_q[..., start:end, :] = (grad_scores @ k[..., :end, :]) * scale
            grad_k[..., :end, :] += grad_scores.transpose(-2, -1) @ (q[..., start:end, :] * scale)
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def kernel_may_take(t: int, dropout_p: float, pattern_hook: nn.Module) -> bool:
    """Whether causal self-attention of t positions, with no padding, cache or memory, may
    go to the compiled kernel (if its projection comes out in bf16 on the CPU, kernels_for):
    at most QUERY_BLOCK positions, no attention dropout, and nothing hooked on the weights,
    which the kernel never forms as a tensor."""
    if not (1 <= t <= QUERY_BLOCK and dropout_p == 0.0):
        return False
    return not hooked(pattern_hook)


def hooked(module: nn.Module) -> bool:
    """Whether a forward hook would see `module`'s output: its own hooks, or global ones
    (nn.modules.module.register_module_forward_hook). torch has no public way to ask, so
    this reads the dictionaries nn.Module keeps them in."""
    return any_hooked(hook_dicts((module,)))


def hook_dicts(modules: Iterable[nn.Module]) -> list[dict]:
    """The dictionaries in which the modules keep their forward hooks and pre-hooks (the
    same objects, which registering and removing a hook change), for any_hooked."""
    return [hooks for m in modules for hooks in (m._forward_hooks, m._forward_pre_hooks)]


def any_hooked(dicts: list[dict]) -> bool:
    """Whether a forward hook would see the output of any module whose hook_dicts these
    are (as `hooked`), or a global hook any module's. A decoding step checks a whole stack
    of layers at every token: `any` over the dictionaries runs in C, where a loop over the
    modules in Python took a quarter of a millisecond a token (docs/LOG.md)."""
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return True
    return any(dicts)


def kernels_for(qkv: torch.Tensor) -> kernels.Kernels | None:
    """The compiled kernels if they take this projection (bfloat16 on the CPU, outside
    torch.compile), else None."""
    return kernels.load_for(qkv, (torch.bfloat16,))


def compiled_causal_attention(
    qkv: torch.Tensor, n_heads: int, library: kernels.Kernels, pairs: bool = False
) -> torch.Tensor:
    """Causal self-attention of every head in the compiled kernel: the fused projection
    qkv (B, T, 3C) bfloat16 -> (B, T, C) bfloat16, the heads side by side; with `pairs`,
    the kernel of bf16 products (kernels/attention_pairs.c)."""
    return CompiledCausalAttention.apply(qkv.contiguous(), n_heads, library, pairs)


class CompiledCausalAttention(torch.autograd.Function):
    """Causal self-attention in the compiled CPU kernels: qkv (B, T, 3C) bfloat16, the fused
    projection -> (B, T, C) bfloat16, the heads side by side. The equations are the blocked
    path's (forward and backward), computed head by head with float32 products or, with
    `pairs`, bf16 ones."""

    @staticmethod
    def forward(ctx, qkv, n_heads, library, pairs):
        out, weights = library.causal_attention(qkv, n_heads, pairs)
        ctx.save_for_backward(qkv, weights)
        ctx.n_heads, ctx.library = n_heads, library
        return out

    @staticmethod
    @once_differentiable  # the kernel's gradient is not itself differentiable
    def backward(ctx, grad_out):
        qkv, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous().to(torch.bfloat16)
        grad_qkv = ctx.library.causal_attention_backward(qkv, weights, grad_out, ctx.n_heads)
        return grad_qkv, None, None, None
