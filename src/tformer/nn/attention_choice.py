"""Which path runs a training step's long causal attention on this CPU, chosen by measurement.

Causal self-attention over more than QUERY_BLOCK positions, with no padding and no attention
dropout, has up to three paths that compute the same softmax(Q K^T / sqrt(d_k) + M) V with
its gradients: the blocked path (nn/blocked_attention.py, torch's matmuls a block of queries
at a time), torch's fused kernel (scaled_dot_product_attention, which never forms the
weights) and tformer's FlashAttention kernels (nn/flash_attention.py: bf16 where the CPU has
AMX, float32 everywhere). Which one is faster depends on the CPU: where bf16 matmuls run on
matrix units (AMX) the fewer passes over memory of the fused kernels win, where they do not
the blocked path's larger products win (docs/LOG.md, sessions 21 and 22). So each shape
(B, H, T, D) and dtype is timed once on the CPU in use, forward and backward of every path
taking turns, and the fastest is kept (nn/measured.py).

A prompt's causal self-attention in inference (a prefill: no gradient, no padding) is
chosen the same way between torch's fused kernel and the FlashAttention kernel, forward
only (prompt_flash_chosen).
"""

from collections.abc import Callable

import torch

from tformer import kernels
from tformer.nn.blocked_attention import compiled_causal_attention
from tformer.nn.flash_attention import (
    flash_causal,
    flash_causal_projection,
    flash_takes,
    projection_heads,
)
from tformer.nn.measured import dtype_name, fastest, training_runs

KIND = "attention-v8"  # the measured choices' file and version (nn/measured.py)
PROMPT_KIND = "prompt-attention-v3"  # the same for inference's prompts
PROMPT_FROM = 64  # positions: shorter prompts keep torch's fused kernel, unmeasured
# a path of causal self-attention: (q, k, v) -> out, each (B, H, T, D)
AttentionPath = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# a path of short causal self-attention: the fused projection (B, T, 3C) -> (B, T, C)
ProjectionPath = Callable[[torch.Tensor], torch.Tensor]


def choice_key(q: torch.Tensor) -> str:
    """The entry for a shape: "BxHxTxD dtype"."""
    return f"{'x'.join(map(str, q.shape))} {dtype_name(q.dtype)}"


def long_attention_path(q: torch.Tensor, paths: dict[str, AttentionPath]) -> str:
    """The name of the fastest of `paths` for q's shape and dtype on this CPU.

    `paths` are equivalent computations, each (q, k, v) -> out, by name; they are timed
    (forward and backward) the first time a shape is seen, unless the cache already holds
    the answer, as a model runs them: from a random fused projection to the output
    projection's input, "flash" taking the projection whole. Not on a CPU: "fused"."""
    if q.device.type != "cpu":
        return "fused"
    b, h, t, d = q.shape

    def make_inputs() -> list[torch.Tensor]:
        # the fused projection (B, T, 3C) and the output's gradient (B, T, C), as in a model
        g = torch.Generator().manual_seed(0)
        projection = torch.randn(b, t, 3 * h * d, generator=g).to(q.dtype)
        return [projection, torch.randn(b, t, h * d, generator=g).to(q.dtype)]

    def from_projection(name: str) -> ProjectionPath:
        # each path as the model runs it: from the projection to the output projection's
        # input; FlashAttention takes the projection whole (MultiHeadAttention.forward)
        if name == "flash":
            return lambda x: flash_causal_projection(x, h)
        return lambda x: paths[name](*projection_heads(x, h)).transpose(1, 2).reshape(b, t, -1)

    def candidates():
        return training_runs(make_inputs, {name: from_projection(name) for name in paths})

    return fastest(KIND, choice_key(q), tuple(paths), candidates)


def short_attention_path(qkv: torch.Tensor, n_heads: int, paths: dict[str, ProjectionPath]) -> str:
    """The name of the fastest of `paths` for short causal self-attention (no more than
    QUERY_BLOCK positions) over the fused projection qkv (B, T, 3C) of n_heads heads, timed
    as long_attention_path's are."""
    b, t, width = qkv.shape

    def make_inputs() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        projection = torch.randn(b, t, width, generator=g).to(qkv.dtype)
        return [projection, torch.randn(b, t, width // 3, generator=g).to(qkv.dtype)]

    def candidates():
        return training_runs(make_inputs, paths)

    key = f"{b}x{t}x{width} {n_heads} heads, short {dtype_name(qkv.dtype)}"
    return fastest(KIND, key, tuple(paths), candidates)


def short_attention_kernel(qkv: torch.Tensor, n_heads: int, library: kernels.Kernels) -> str:
    """Which kernel runs a training step's short causal self-attention over the fused
    projection qkv (B, T, 3C) bf16 on this CPU: "kernel" (kernels/attention.c, float32
    products), "pairs" (kernels/attention_pairs.c, bf16 products, where the CPU has AVX-512
    BF16) or "flash" (the FlashAttention kernel, where it takes the heads), whichever of
    those that run here was timed fastest (short_attention_path). Only qkv's shape and dtype
    are read."""
    paths = {"kernel": lambda x: compiled_causal_attention(x, n_heads, library)}
    if library.attention_pairs_available():
        paths["pairs"] = lambda x: compiled_causal_attention(x, n_heads, library, pairs=True)
    if flash_takes(qkv.unflatten(-1, (3 * n_heads, -1))):  # (B, T, 3H, D)
        paths["flash"] = lambda x: flash_causal_projection(x, n_heads)
    return short_attention_path(qkv, n_heads, paths)


def prompt_flash_chosen(q: torch.Tensor) -> bool:
    """Whether inference's causal self-attention without padding over q's heads (B, H, T,
    D), a prompt's prefill, runs in the FlashAttention kernel: where that kernel takes q
    and was timed faster than torch's fused kernel on this CPU, forward only, at B and T
    rounded down to powers of two (one measurement covers the batches and prompts of that
    range, and never takes more memory than the call). Only q's shape and dtype are
    read."""
    b, h, t, d = q.shape
    if t < PROMPT_FROM or q.device.type != "cpu" or not flash_takes(q):
        return False
    rows, positions = (1 << (size.bit_length() - 1) for size in (b, t))

    def candidates() -> dict[str, Callable[[], torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        qkv = torch.randn(rows, positions, 3, h, d, generator=g, dtype=q.dtype)
        heads = [qkv[:, :, i].transpose(1, 2) for i in range(3)]  # (B, H, T, D) views
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return {
            "fused": lambda: sdpa(*heads, is_causal=True),
            "flash": lambda: flash_causal(*heads),
        }

    key = f"{rows}x{h}x{positions}x{d} {dtype_name(q.dtype)}, inference"
    with torch.inference_mode():
        return fastest(PROMPT_KIND, key, ("fused", "flash"), candidates) == "flash"
