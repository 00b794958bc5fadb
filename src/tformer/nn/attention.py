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

Three paths compute the same thing, chosen by `implementation`: "explicit" writes the
equation out and shows the weights at a hook, the reference for the others; "sdpa" is
PyTorch's fused kernel, which never forms the weights; "blocked" (nn/blocked_attention.py)
is the path for training on a CPU, causal self-attention that skips the work the mask
would throw away: query blocks for long sequences, in bf16 a compiled kernel for short
ones. A long sequence without padding goes to torch's fused kernel or to a FlashAttention
kernel (nn/flash_attention.py: bf16 on AMX, float32) instead where that trains faster on
the CPU in use, as measured there once (nn/attention_choice.py); anything else in float32
to torch's fused kernel, as "sdpa" (unless a hook wants the weights), and so does every
dtype off the CPU: a model trained with "blocked" runs on a GPU as one made there.
Beside them, in inference on the CPU (no gradients, no dropout, no hook), the compiled
kernels take an encoder's self-attention over whole padded sequences (padded_attention)
and a server's decoding step (nn/slot_cache.py), and a prompt's causal self-attention
(nothing cached before it, no padding) goes to the FlashAttention kernel in place of
torch's fused kernel where that runs faster on the CPU in use (fused_or_flash).
"""

import math
from typing import Literal

import torch
from torch import nn

from tformer import kernels
from tformer.nn import attention_step
from tformer.nn.attention_choice import (
    AttentionPath,
    long_attention_path,
    prompt_flash_chosen,
    short_attention_kernel,
)
from tformer.nn.blocked_attention import (
    QUERY_BLOCK,
    blocked_causal_attention,
    compiled_causal_attention,
    hooked,
    in_query_blocks,
    kernel_may_take,
    kernels_for,
)
from tformer.nn.dropout import dropout
from tformer.nn.flash_attention import flash_causal, flash_causal_projection, flash_takes
from tformer.nn.hooks import HookPoint
from tformer.nn.kv_cache import KVCache
from tformer.nn.row_blocks import linear
from tformer.nn.slot_cache import SlotCache

__all__ = [
    "IMPLEMENTATIONS",
    "QUERY_BLOCK",
    "Implementation",
    "MultiHeadAttention",
    "attention_weights",
    "causal_mask",
    "explicit_attention",
    "fused_attention",
    "set_implementation",
]

Implementation = Literal["sdpa", "explicit", "blocked"]
IMPLEMENTATIONS = ("sdpa", "explicit", "blocked")


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


def fused_or_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout_p: float,
) -> torch.Tensor:
    """fused_attention, except for a prompt in inference (causal, no mask, T = S: nothing
    cached before it, no gradient), which runs in torch's fused kernel or the FlashAttention
    kernel, whichever was timed faster on this CPU (nn/attention_choice.py). (Under
    autocast a float32 cache may hand bf16 queries float32 keys: torch's kernel then.)"""
    t, s = q.shape[2], k.shape[2]
    prompt = is_causal and t == s and dropout_p == 0.0 and not torch.is_grad_enabled()
    prompt = prompt and k.dtype == v.dtype == q.dtype
    if prompt and prompt_flash_chosen(q):
        return flash_causal(q, k, v)
    return fused_attention(q, k, v, mask, is_causal, dropout_p)


# Up to this many positions the compiled kernel runs an encoder's attention: torch's fused
# kernel spends 0.45-0.68 ms a call on (32, 4, 9, 64) where the kernel takes 0.09-0.15,
# they tie at 32 positions, and torch's blocked products win on long ones (3.1 against 4.5
# ms at 80; docs/LOG.md). Measured on the AMD machine only.
PADDED_KERNEL_MAX_LEN = 32


def padded_attention(
    qkv: torch.Tensor, attention_mask: torch.Tensor | None, n_heads: int
) -> torch.Tensor | None:
    """Non-causal self-attention over whole padded sequences in one compiled kernel, every
    head at once (kernels/decode_block.c): the fused projection qkv (B, T, 3C) float32 and
    attention_mask (B, T) (None: no padding) -> (B, T, C); None where the kernels do not
    take it (not float32 on the CPU, no kernels, more than PADDED_KERNEL_MAX_LEN positions,
    a mask of another shape: the modules' path then runs, and says what is wrong).
    Inference only: no backward."""
    library = kernels.load_for(qkv, (torch.float32,))
    b, t, _ = qkv.shape
    if library is None or not 0 < t <= PADDED_KERNEL_MAX_LEN:
        return None
    if attention_mask is None:
        mask = torch.ones(b, t, dtype=torch.bool)
    elif attention_mask.shape == (b, t):
        mask = attention_mask.bool()
    else:
        return None
    return library.padded_attention(qkv, mask, n_heads)


def blocked_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention without padding on the blocked path: (B, H, T, D) x3 -> same."""
    return blocked_causal_attention(q, k, v)


def fused_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same through torch's fused kernel: (B, H, T, D) x3 -> (B, H, T, D)."""
    return fused_attention(q, k, v, is_causal=True)


def short_causal_attention(
    qkv: torch.Tensor, n_heads: int, library: kernels.Kernels
) -> torch.Tensor:
    """Short causal self-attention of the fused projection qkv (B, T, 3C) bf16 -> (B, T, C):
    the compiled kernel, or in training the one of the compiled kernels and FlashAttention
    that trains fastest here (nn/attention_choice.py)."""
    kernel = short_attention_kernel(qkv, n_heads, library) if torch.is_grad_enabled() else None
    if kernel == "flash":
        return flash_causal_projection(qkv, n_heads)
    return compiled_causal_attention(qkv, n_heads, library, pairs=kernel == "pairs")


def long_attention_paths(q: torch.Tensor) -> dict[str, AttentionPath]:
    """The paths that can train causal self-attention without padding over q's heads (B,
    H, T, D), by name, the plain one first: each (q, k, v) -> out."""
    paths = {"blocked": blocked_causal, "fused": fused_causal}
    if flash_takes(q):
        paths["flash"] = flash_causal
    return paths


def causal_mask(t: int, s: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) boolean mask for T new queries that follow S - T earlier (cached) positions."""
    offset = s - t
    rows = torch.arange(t, device=device).unsqueeze(1) + offset  # absolute query positions
    return torch.arange(s, device=device).unsqueeze(0) <= rows


def rows_per_memory_row(rows: int, memory_rows: int) -> int:
    """How many consecutive query rows read each row of the memory's keys and values:
    1, or G where the memory holds one row per G query rows."""
    if rows == memory_rows:
        return 1
    if memory_rows < 1 or rows % memory_rows != 0:
        raise ValueError(
            f"memory_kv has {memory_rows} rows for {rows} query rows: it needs one row per "
            "query row or per group of as many consecutive query rows"
        )
    return rows // memory_rows


class MultiHeadAttention(nn.Module):
    """Multi-head attention: self, causal self, or cross.

    Self-attention keeps W^Q, W^K, W^V stacked in one (C, 3C) projection `w_qkv` (GPT-2's
    layout), so one matmul over the input gives all three. Cross-attention (`cross=True`)
    reads K and V from another sequence, the memory: it has W^Q alone (`w_q`) and W^K, W^V
    stacked (`w_kv`). `weight_blocks` gives the four C x C matrices of the paper however
    they are stored. `implementation` picks the explicit path (which exposes the weights at
    `hook_pattern`), PyTorch's fused kernel, or the blocked causal path
    (nn/blocked_attention.py); they agree to float rounding.
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
        check_implementation(implementation)
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
            return linear(self.w_qkv, x).split(self.d_model, dim=-1)
        if memory is None:
            raise ValueError("cross-attention needs the memory (or its keys and values)")
        k, v = linear(self.w_kv, memory).split(self.d_model, dim=-1)
        return linear(self.w_q, x), k, v

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention's keys and values (B, H, S, D) from the memory (B, S, C).

        They depend only on the source, so a decoder computes them once per sentence and
        passes them as `memory_kv` at every step; each is contiguous, one head's positions
        after another's, as every step reads them.
        """
        if not self.cross:
            raise ValueError(
                "only cross-attention reads a memory; use MultiHeadAttention(cross=True)"
            )
        k, v = linear(self.w_kv, memory).split(self.d_model, dim=-1)
        return self.split_heads(k).contiguous(), self.split_heads(v).contiguous()

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
        memory_kv (and then attention_mask) may hold one row for each G consecutive rows of
        x, N = B / G rows: beam search's G beams of a sentence read its keys once.
        """
        b, t, _ = x.shape
        dropout_p = self.dropout if self.training else 0.0
        projected = None
        # The fast path (nn/blocked_attention.py): short causal self-attention, every head in
        # one compiled kernel, from the fused projection straight to the output projection.
        if self.implementation == "blocked" and self.causal:
            plain = (
                memory is None and memory_kv is None and cache is None and attention_mask is None
            )
            if plain and kernel_may_take(t, dropout_p, self.hook_pattern):
                if attention_step.takes(self, x):  # a small model's step: one autograd node
                    return attention_step.attend(self, x)
                qkv = linear(self.w_qkv, x)  # (B, T, 3C)
                library = kernels_for(qkv)
                if library is not None:
                    out = short_causal_attention(qkv, self.n_heads, library)  # (B, T, C)
                    return linear(self.w_o, out)
                projected = qkv.split(self.d_model, dim=-1)  # not bf16 on the CPU: as below
            elif (
                plain
                and dropout_p == 0.0
                and torch.is_grad_enabled()
                and in_query_blocks(t, t)
                and not hooked(self.hook_pattern)
            ):
                # Long, in training: where FlashAttention is this CPU's fastest path, it takes
                # the fused projection whole and gives its gradient back in that layout.
                qkv = linear(self.w_qkv, x)  # (B, T, 3C)
                q = self.split_heads(qkv[..., : self.d_model])  # (B, H, T, D), a view
                if long_attention_path(q, long_attention_paths(q)) == "flash":
                    return linear(self.w_o, flash_causal_projection(qkv, self.n_heads))
                projected = qkv.split(self.d_model, dim=-1)
        inference = dropout_p == 0.0 and not torch.is_grad_enabled()  # the kernels: no backward
        self_only = memory is None and memory_kv is None
        # An encoder's layer: whole padded sequences, every head in one compiled kernel, from
        # the fused projection straight to the output projection (explicit: the reference).
        whole = not self.causal and not self.cross and cache is None and self_only
        fast = inference and self.implementation != "explicit"
        if whole and fast and not hooked(self.hook_pattern):
            qkv = self.w_qkv(x)  # (B, T, 3C)
            out = padded_attention(qkv, attention_mask, self.n_heads)  # (B, T, C)
            if out is not None:
                return self.w_o(out)
            projected = qkv.split(self.d_model, dim=-1)
        # A server's decoding step (nn/slot_cache.py): each row's key and value stored and
        # its attention over its own positions, in one kernel, when the cache can take it.
        decoding = isinstance(cache, SlotCache) and t == 1 and self.causal and not self.cross
        if decoding and inference and self_only and not hooked(self.hook_pattern):
            qkv = self.w_qkv(x)  # (B, 1, 3C)
            out = cache.attend(qkv, attention_mask)
            if out is not None:
                return self.w_o(out)
            projected = qkv.split(self.d_model, dim=-1)
        group = 1  # consecutive query rows that read one row of memory_kv
        if memory_kv is not None:
            if not self.cross:
                raise ValueError("only cross-attention takes memory_kv")
            q, (k, v) = self.split_heads(self.w_q(x)), memory_kv  # (B, H, *, D)
            group = rows_per_memory_row(b, k.shape[0])
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
            if attention_mask.shape != (b // group, s):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, "
                    f"expected {(b // group, s)}"
                )
            mask = attention_mask.bool()[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
        # Without padding, a causal block with no cache (T = S) takes the kernel's own causal
        # path, and one new token (T = 1) may see every key: neither needs a mask tensor.
        if self.causal and t > 1 and (mask is not None or t != s):
            causal = causal_mask(t, s, x.device)  # (T, S)
            mask = causal if mask is None else mask & causal  # -> (B, 1, T, S)

        if group == 1:
            out = self.attend(q, k, v, mask, dropout_p)  # (B, H, T, D)
        elif self.implementation == "sdpa":
            # A sentence's G query rows attend to its keys as G * T queries of one row:
            # (N G, H, T, D) -> (N, H, G T, D) and back.
            folded = q.unflatten(0, (-1, group)).transpose(1, 2).flatten(2, 3)
            out = self.attend(folded, k, v, mask, dropout_p)  # (N, H, G T, D)
            out = out.unflatten(2, (group, t)).transpose(1, 2).flatten(0, 1)  # (B, H, T, D)
        else:  # each row its own copy: the explicit path's hook shows patterns per row
            k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
            mask = mask.repeat_interleave(group, 0) if mask is not None else None
            out = self.attend(q, k, v, mask, dropout_p)
        out = out.transpose(1, 2).reshape(b, t, self.d_model)  # (B, H, T, D) -> (B, T, C)
        return linear(self.w_o, out)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        dropout_p: float,
    ) -> torch.Tensor:
        """Attention(Q, K, V) on the chosen path: (B, H, T, D), (B, H, S, D) x2 -> (B, H, T, D).

        `mask` holds the padding and, where forward needed one, the causal mask; otherwise
        each path applies causality its own way.
        """
        t, s = q.shape[2], k.shape[2]
        if self.implementation == "sdpa":
            is_causal = self.causal and t > 1 and mask is None
            return fused_or_flash(q, k, v, mask, is_causal, dropout_p)
        long_causal = self.implementation == "blocked" and self.causal and in_query_blocks(t, s)
        # Training without padding: the blocked path, torch's fused kernel or a FlashAttention
        # kernel (bf16 with AMX, float32), the fastest here
        hooked_pattern = hooked(self.hook_pattern)  # a hook wants the weights: formed whole
        plain = long_causal and mask is None and dropout_p == 0.0 and torch.is_grad_enabled()
        if plain and not hooked_pattern:
            paths = long_attention_paths(q)
            chosen = long_attention_path(q, paths)
            if chosen != "blocked":
                return paths[chosen](q, k, v)
        elif (
            self.implementation == "blocked"
            and (q.dtype == torch.float32 or q.device.type != "cpu")
            and not hooked_pattern
        ):
            # float32 has no compiled path of its own outside the measured one, nor has any
            # dtype off the CPU (a CPU-trained model on a GPU): torch's fused kernel, as
            # "sdpa", unless a hook wants the weights
            is_causal = self.causal and t > 1 and mask is None
            return fused_or_flash(q, k, v, mask, is_causal, dropout_p)
        if long_causal and not hooked_pattern:  # (the blocks never form the whole weights)
            return blocked_causal_attention(q, k, v, mask, dropout_p)  # None: causal alone
        if self.causal and mask is None and t > 1:
            mask = causal_mask(t, s, q.device)
        return explicit_attention(q, k, v, mask, dropout_p, self.hook_pattern)


def set_implementation(model: nn.Module, implementation: Implementation) -> None:
    """Switch every MultiHeadAttention inside `model` to the explicit, fused or blocked path.

    They agree to float rounding and differ in speed: the blocked one is meant for training
    on a CPU (in bf16 the compiled kernel for short contexts; query blocks for long ones, or
    for long ones without padding torch's fused kernel or a FlashAttention kernel, bf16 on
    AMX or float32, where this CPU trains faster on them: nn/attention_choice.py; else, in
    float32, torch's fused kernel), the fused one for inference; the measurements are in
    docs/LOG.md. The blocked path's kernels, and in bf16 on a CPU the linear layers' row
    blocks (nn/row_blocks.py), give first-order gradients only: for second-order ones (or
    torch.func) use the explicit path in float32 or float64.
    """
    check_implementation(implementation)
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.implementation = implementation


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}")
