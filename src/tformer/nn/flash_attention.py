"""Causal self-attention that never forms its weights: bf16 on the CPU's matrix units (AMX),
float32 on its vector units.

FlashAttention (Dao et al., 2022) computes

    O = softmax(Q K^T / sqrt(d_k) + M) V

a block of queries at a time against chunks of keys, keeping each query's running maximum
and sum of exponentials (the online softmax), so the (T, T) weights exist only a block at a
time, in the core's cache; the backward pass (as in FlashAttention-2, Dao, 2023) recomputes
them from the log-sum-exp L of each query's scores:

    P = exp(S - L),   dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dO * O)),
    dQ = dS K / sqrt(d_k),   dK = dS^T Q / sqrt(d_k)

The kernels are tformer/kernels/flash_attention.c, bf16 products summed in float32 on AMX
tiles and the softmax in float32, and tformer/kernels/flash_attention_f32.c, the same blocks
in float32 throughout (fused multiply-adds on AVX-512 where the CPU has it). Each reads the
heads where the fused projection left them and
writes the output in the (B, T, C) layout the output projection reads, so the forward pass
copies no head into a layout of its own in torch (the backward pass's gradients come in the
projection's layout, and FlashCausalProjection returns them as they are). bf16 runs where
the CPU has AMX (Sapphire Rapids and later), float32 on any CPU the kernels build for, the
head width a multiple of 32; whether it beats the other paths of causal attention is
measured on the CPU in use (nn/attention_choice.py).
First-order gradients only: for second-order ones use the explicit path in float32.
"""

import torch
from torch.autograd.function import once_differentiable

from tformer import kernels
from tformer.kernels.bindings import FLASH_D

DTYPES = (torch.bfloat16, torch.float32)  # the kernels' dtypes: inputs, output, gradients


def flash_takes(q: torch.Tensor) -> bool:
    """Whether a kernel can run causal self-attention over q's heads (B, H, T, D): bf16 on
    a CPU with AMX or float32, D a multiple of FLASH_D, outside torch.compile."""
    if q.shape[-1] % FLASH_D:
        return False
    library = kernels.load_for(q, DTYPES)
    if library is None:
        return False
    return q.dtype == torch.float32 or library.flash_attention_available()


def flash_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention without padding in the kernel: (B, H, T, D) x3, bf16 or
    float32 -> same, any strides with D contiguous (the heads of a projection, as
    split_heads gives them). Only where flash_takes(q)."""
    library = kernels.load_for(q, DTYPES)
    assert library is not None  # flash_takes said so
    return FlashCausalAttention.apply(q, k, v, library)


def flash_causal_projection(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The same from the fused projection: qkv (B, T, 3C) -> (B, T, C) in its dtype, the
    heads side by side, as the output projection reads them; the gradient comes back in
    qkv's layout. Only where flash_takes(qkv's heads)."""
    library = kernels.load_for(qkv, DTYPES)
    assert library is not None  # flash_takes said so
    return FlashCausalProjection.apply(qkv, n_heads, library)


def projection_heads(qkv: torch.Tensor, n_heads: int) -> list[torch.Tensor]:
    """q, k and v of the fused projection (B, T, 3C), each (B, H, T, D): views, no copy."""
    b, t, _ = qkv.shape
    heads = qkv.view(b, t, 3, n_heads, -1)  # (B, T, 3C) -> (B, T, 3, H, D)
    return [heads[:, :, part].transpose(1, 2) for part in range(3)]  # (B, H, T, D)


class FlashCausalAttention(torch.autograd.Function):
    """(B, H, T, D) x3 -> (B, H, T, D), a view of the kernel's (B, T, H, D); bf16 or
    float32."""

    @staticmethod
    def forward(ctx, q, k, v, library):
        out, lse = library.flash_attention(q, k, v)  # (B, T, H, D), (B, H, T)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.library = library
        return out.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)

    @staticmethod
    @once_differentiable  # the kernel's gradient is not itself differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.to(q.dtype)
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        grad = ctx.library.flash_attention_backward(q, k, v, grad_out, out, lse)
        # (B, T, 3, H, D): the fused projection's layout, each part -> (B, H, T, D)
        return (*(grad[:, :, part].transpose(1, 2) for part in range(3)), None)


class FlashCausalProjection(torch.autograd.Function):
    """qkv (B, T, 3C) -> (B, T, C), bf16 or float32, a view of the kernel's (B, T, H, D). The
    kernel writes the gradient of q, k and v side by side, (B, T, 3, H, D), which is qkv's
    own layout: it is returned as it is, where the three gradients of q, k and v split from
    the projection would be concatenated again by autograd (3% of a character-model step,
    docs/LOG.md)."""

    @staticmethod
    def forward(ctx, qkv, n_heads, library):
        b, t, width = qkv.shape
        out = torch.empty(b, t, width // 3, dtype=qkv.dtype)  # (B, T, C), its own tensor
        heads = out.view(b, t, n_heads, -1)  # (B, T, H, D), where the kernel writes
        _, lse = library.flash_attention(*projection_heads(qkv, n_heads), out=heads)
        ctx.save_for_backward(qkv, out, lse)
        ctx.n_heads, ctx.library = n_heads, library
        return out

    @staticmethod
    @once_differentiable  # the kernel's gradient is not itself differentiable
    def backward(ctx, grad_out):
        qkv, out, lse = ctx.saved_tensors
        grad_out = grad_out.to(qkv.dtype)
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        heads = grad_out.unflatten(-1, (ctx.n_heads, -1)).transpose(1, 2)  # (B, H, T, D)
        q, k, v = projection_heads(qkv, ctx.n_heads)
        out = out.view(heads.shape[0], heads.shape[2], ctx.n_heads, -1)  # (B, T, H, D)
        grad = ctx.library.flash_attention_backward(q, k, v, heads, out, lse)
        return grad.view(qkv.shape), None, None  # (B, T, 3, H, D) -> (B, T, 3C)
