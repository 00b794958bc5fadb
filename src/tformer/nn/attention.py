"""Scaled dot-product attention and multi-head attention (Vaswani et al., 2017, sec. 3.2).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V

M is 0 where a query may look at a key and -inf where it may not (a future token in causal
attention, a padding token). Dividing by sqrt(d_k) keeps the dot products of unit-variance
vectors at unit variance, so the softmax does not saturate as the head width grows.

    MultiHead(X, Y) = Concat(head_1, ..., head_h) W^O
    head_i          = Attention(X W_i^Q, Y W_i^K, Y W_i^V)

Self-attention has Y = X; causal self-attention also masks the future; cross-attention takes
Y from another sequence (the encoder's output, the "memory").

Masks here are boolean, True where attention is allowed, and broadcast to (B, H, T, S).
A query that may see no key at all (a padding position) gets zero output rather than NaN,
on every path.

Three paths compute the same thing: "explicit" writes the equation out and shows the
weights at a hook; "sdpa" is PyTorch's fused kernel; "blocked" is the path for bf16
training on a CPU. For long causal sequences it is the explicit path one block of queries
at a time, so that the key blocks above the diagonal (which the mask would zero) are never
computed: the fastest at GPT-2's context. For short ones (at most QUERY_BLOCK positions,
no padding) it is the compiled kernel tformer/kernels/attention.c, which runs each head in
float32 straight from the fused Q, K, V projection to the output projection's layout:
1.7x torch's operations for nanoGPT's Shakespeare model, and closer to the exact values
(docs/LOG.md).
"""

import math
from typing import Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as module_hooks

from tformer import kernels
from tformer.nn.dropout import dropout, dropout_mask
from tformer.nn.hooks import HookPoint
from tformer.nn.kv_cache import KVCache

Implementation = Literal["sdpa", "explicit", "blocked"]
IMPLEMENTATIONS = ("sdpa", "explicit", "blocked")
QUERY_BLOCK = 128  # queries per block on the blocked path (the fastest of 64-512, LOG)


def attention_weights(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k) + M): (B, H, T, D), (B, H, S, D) -> (B, H, T, S)."""
    # Scaling q rather than the scores touches T x D numbers instead of T x S.
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)  # (B, H, T, S)
    no_key = None
    if mask is not None:
        # A query that may see no key attends to nothing. Its row is left unmasked (an
        # all -inf row would give NaN in softmax, and NaN gradients through it) and its
        # weights are zeroed below. Checked on the small boolean mask, so a causal mask
        # costs no pass over the weights.
        empty = ~mask.any(dim=-1, keepdim=True)
        if empty.any():
            no_key, mask = empty, mask | empty
        # M as an additive bias: its gradient is the identity, so backward costs nothing.
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
        scores = scores + bias.masked_fill_(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)  # summed in float32
    if no_key is not None:
        weights = weights.masked_fill(no_key, 0.0)
    return weights.to(q.dtype)


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    pattern_hook: nn.Module | None = None,
) -> torch.Tensor:
    """The equation written out: (B, H, T, D) x3 -> (B, H, T, D).

    `pattern_hook` sees the attention weights (B, H, T, S), so they can be read or changed.
    """
    weights = attention_weights(q, k, mask)
    if pattern_hook is not None:
        weights = pattern_hook(weights)
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p)
    return weights @ v


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
    scores' dtype (in bf16 its sums are float32 inside the kernel).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, block):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        t, scale = q.shape[-2], 1.0 / math.sqrt(q.shape[-1])
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        saved = []  # per block: the weights P, and the dropout mask if any
        for start in range(0, t, block):
            end = min(start + block, t)
            visible = mask[..., start:end, :end]
            scores = (q[..., start:end, :] * scale) @ k[..., :end, :].transpose(-2, -1)
            weights = torch.softmax(scores.masked_fill_(~visible, float("-inf")), dim=-1)
            weights = weights.to(v.dtype)  # CUDA autocast computes softmax in float32
            if mask.dim() > 2:  # padding: a query that sees no key attends to nothing
                weights.masked_fill_(~visible.any(dim=-1, keepdim=True), 0.0)
            kept, keep = weights, None
            if dropout_p > 0.0:
                keep, ctx.keep_scale = dropout_mask(weights.shape, dropout_p, weights.device)
                kept = weights * keep * ctx.keep_scale
            out[..., start:end, :] = kept @ v[..., :end, :]  # (B, H, b - a, D)
            saved += [weights] if keep is None else [weights, keep]
        ctx.save_for_backward(q, k, v, *saved)
        ctx.block, ctx.dropout = block, dropout_p > 0.0
        return out

    @staticmethod
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
            # PyTorch's softmax backward kernel: P * (dP - rowsum(dP * P)), summed in float32
            grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
            grad_q[..., start:end, :] = (grad_scores @ k[..., :end, :]) * scale
            grad_k[..., :end, :] += grad_scores.transpose(-2, -1) @ (q[..., start:end, :] * scale)
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def blocked_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    dropout_p: float = 0.0,
    block: int = QUERY_BLOCK,
) -> torch.Tensor:
    """Causal self-attention skipping the hidden key blocks (BlockedCausalAttention):
    (B, H, T, D) x3 -> (B, H, T, D). `mask` (T, T) or (B, 1, T, T) must include causality."""
    return BlockedCausalAttention.apply(q, k, v, mask, dropout_p, block)


class CompiledCausalAttention(torch.autograd.Function):
    """Causal self-attention in the compiled CPU kernels: qkv (B, T, 3C) bfloat16, the fused
    projection -> (B, T, C) bfloat16, the heads side by side. The equations are the blocked
    path's (forward and backward), computed head by head in float32."""

    @staticmethod
    def forward(ctx, qkv, n_heads, library):
        out, weights = library.causal_attention(qkv, n_heads)
        ctx.save_for_backward(qkv, weights)
        ctx.n_heads, ctx.library = n_heads, library
        return out

    @staticmethod
    @once_differentiable  # the kernel's gradient is not itself differentiable
    def backward(ctx, grad_out):
        qkv, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous().to(torch.bfloat16)
        return (
            ctx.library.causal_attention_backward(qkv, weights, grad_out, ctx.n_heads),
            None,
            None,
        )


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The same through PyTorch's fused kernel; never materialises the (T, S) weights."""
    return nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
    )


def causal_mask(t: int, s: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) boolean mask for T new queries that follow S - T earlier (cached) positions."""
    offset = s - t
    rows = torch.arange(t, device=device).unsqueeze(1) + offset  # absolute query positions
    return torch.arange(s, device=device).unsqueeze(0) <= rows


class MultiHeadAttention(nn.Module):
    """Multi-head attention: self, causal self, or cross.

    Self-attention keeps W^Q, W^K, W^V stacked in one (C, 3C) projection `w_qkv` (GPT-2's
    layout), so one matmul over the input gives all three. Cross-attention (`cross=True`)
    reads K and V from another sequence, the memory: it has W^Q alone (`w_q`) and W^K, W^V
    stacked (`w_kv`). `weight_blocks` gives the four C x C matrices of the paper however
    they are stored. `implementation` picks the explicit path (which exposes the weights at
    `hook_pattern`), PyTorch's fused kernel, or the blocked causal path; they agree to float
    rounding.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        causal: bool = False,
        cross: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
        implementation: Implementation = "sdpa",
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {implementation!r}")
        if causal and cross:
            raise ValueError("cross-attention sees the whole memory: it cannot be causal")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.causal = causal
        self.cross = cross
        self.dropout = dropout
        self.implementation: Implementation = implementation
        if cross:
            self.w_q = nn.Linear(d_model, d_model, bias=bias)
            self.w_kv = nn.Linear(d_model, 2 * d_model, bias=bias)
        else:
            self.w_qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.w_o = nn.Linear(d_model, d_model, bias=bias)
        self.hook_pattern = HookPoint()

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, d_head={self.d_head}, causal={self.causal}, "
            f"cross={self.cross}, implementation={self.implementation!r}"
        )

    def weight_blocks(self) -> list[torch.Tensor]:
        """W^Q, W^K, W^V, W^O: four (C, C) views of the stored weights, in that order."""
        if self.cross:
            qkv = [self.w_q.weight, *self.w_kv.weight.split(self.d_model)]
        else:
            qkv = list(self.w_qkv.weight.split(self.d_model))
        return [*qkv, self.w_o.weight]

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_head).transpose(1, 2)  # (B, T, C) -> (B, H, T, D)

    def project(
        self, x: torch.Tensor, memory: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q from x; K and V from the memory in cross-attention, else from x. Each (B, *, C)."""
        if not self.cross:
            if memory is not None:
                raise ValueError(
                    "self-attention takes no memory; use MultiHeadAttention(cross=True)"
                )
            return self.w_qkv(x).split(self.d_model, dim=-1)
        if memory is None:
            raise ValueError("cross-attention needs the memory (or its keys and values)")
        k, v = self.w_kv(memory).split(self.d_model, dim=-1)
        return self.w_q(x), k, v

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention's keys and values (B, H, S, D) from the memory (B, S, C).

        They depend only on the source, so a decoder computes them once per sentence and
        passes them as `memory_kv` at every step.
        """
        if not self.cross:
            raise ValueError(
                "only cross-attention reads a memory; use MultiHeadAttention(cross=True)"
            )
        k, v = self.w_kv(memory).split(self.d_model, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def may_use_kernel(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None,
        dropout_p: float,
    ) -> bool:
        """Whether the blocked path may hand this call to the compiled kernel (if the
        projection comes out in bf16): causal self-attention of at most QUERY_BLOCK
        positions on the CPU with no padding mask, cache or attention dropout, and nothing
        hooked on hook_pattern (the kernel never forms the weights as a tensor)."""
        if self.implementation != "blocked" or not self.causal:
            return False  # the common case elsewhere (decoding, sdpa), answered first
        short = 1 <= x.shape[1] <= QUERY_BLOCK
        plain = memory is None and memory_kv is None and cache is None and attention_mask is None
        if not (short and plain and dropout_p == 0.0):
            return False
        hooked = self.hook_pattern._forward_hooks or self.hook_pattern._forward_pre_hooks
        return not (
            hooked or module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
        )

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, T, C); memory (B, S, C) for cross-attention, or its projected keys and
        values memory_kv (from project_memory); -> (B, T, C).

        attention_mask (B, S) marks the keys that are real tokens (1/True) rather than
        padding; with a cache it covers every position in the cache, old and new.
        """
        b, t, _ = x.shape
        dropout_p = self.dropout if self.training else 0.0
        projected = None
        if self.may_use_kernel(x, memory, attention_mask, cache, memory_kv, dropout_p):
            qkv = self.w_qkv(x)  # (B, T, 3C)
            library = kernels_for(qkv)
            if library is not None:
                out = CompiledCausalAttention.apply(qkv.contiguous(), self.n_heads, library)
                return self.w_o(out)  # (B, T, C)
            projected = qkv.split(self.d_model, dim=-1)
        if memory_kv is not None:
            if not self.cross:
                raise ValueError("only cross-attention takes memory_kv")
            q, (k, v) = self.split_heads(self.w_q(x)), memory_kv  # (B, H, *, D)
        else:
            if projected is None:
                projected = self.project(x, memory)
            q, k, v = (self.split_heads(p) for p in projected)  # (B, H, *, D)
        if cache is not None:
            if memory is not None or memory_kv is not None:
                raise ValueError("a KV cache is for self-attention; cross-attention keys are fixed")
            k, v = cache.update(k, v)  # (B, H, S, D): every position so far
        s = k.shape[2]

        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (b, s):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, s)}"
                )
            mask = attention_mask.bool()[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
        # Without padding, a causal block with no cache (T = S) takes the kernel's own causal
        # path, and one new token (T = 1) may see every key: neither needs a mask tensor.
        needs_causal_mask = self.causal and t > 1 and (mask is not None or t != s)
        if needs_causal_mask:
            causal = causal_mask(t, s, x.device)  # (T, S)
            mask = causal if mask is None else mask & causal  # -> (B, 1, T, S)

        blocked = self.implementation == "blocked" and self.causal and t == s > QUERY_BLOCK
        if blocked:
            if mask is None:
                mask = causal_mask(t, s, x.device)
            out = blocked_causal_attention(q, k, v, mask, dropout_p, block=QUERY_BLOCK)
        elif self.implementation in ("explicit", "blocked"):
            if self.causal and mask is None and t > 1:
                mask = causal_mask(t, s, x.device)
            out = explicit_attention(q, k, v, mask, dropout_p, self.hook_pattern)
        else:
            is_causal = self.causal and t > 1 and mask is None
            out = fused_attention(q, k, v, mask, is_causal, dropout_p)
        out = out.transpose(1, 2).reshape(b, t, self.d_model)  # (B, H, T, D) -> (B, T, C)
        return self.w_o(out)


def kernels_for(qkv: torch.Tensor) -> "kernels.Kernels | None":
    """The compiled kernels if they take this projection (bfloat16 on the CPU, outside
    torch.compile), else None."""
    if qkv.dtype != torch.bfloat16 or qkv.device.type != "cpu":
        return None
    return None if torch.compiler.is_compiling() else kernels.load()


def set_implementation(model: nn.Module, implementation: Implementation) -> None:
    """Switch every MultiHeadAttention inside `model` to the explicit, fused or blocked path.

    They agree to float rounding, but not in speed: bf16 training on a CPU is fastest on
    the blocked one (the compiled kernel for short contexts, query blocks for long ones),
    inference on the fused one (docs/LOG.md). The blocked path's kernel gives first-order
    gradients only: for second-order ones (or torch.func) use the explicit path.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}")
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.implementation = implementation
