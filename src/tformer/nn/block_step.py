"""A small model's pre-LN decoder block as one training step on the CPU.

With x the residual stream (float32) and LN, GELU the block's norms and activation,

    a = LN_1(x),   qkv = a W_qkv^T + b_qkv,   o = Attention(qkv),   r = x + o W_O^T + b_O
    n = LN_2(r),   z = n W_1^T + b_1,   g = GELU(z),   y = r + g W_2^T + b_2

and backwards, from dy (products in bf16, the stream's gradients in float32),

    dg = dy W_2,   dW_2 = dy^T g,   db_2 = sum over rows of dy,   dz = dg * GELU'(z),
    dn = dz W_1,   dW_1 = dz^T n,   db_1 = sum over rows of dz,
    dr = dy + LN_2's backward(dn),   do = dr W_O,   dW_O = dr^T o,   db_O = sum of dr,
    dqkv = Attention's backward(do),
    da = dqkv W_qkv,   dW_qkv = dqkv^T a,   db_qkv = sum of dqkv,
    dx = dr + LN_1's backward(da).

A small model's training step is mostly the fixed cost of its operations: the block's
modules, the checks of each fast path, autocast's casts of the projections' weights and
their gradients back, a dozen autograd nodes and their Python (docs/LOG.md, session 33).
Here the block is one autograd node that calls the same kernels the modules' path calls
(nn/norm.py's LayerNorm kernels, the attention kernel this CPU trains fastest,
nn/feedforward_step.py's network with the GELU's derivative), on the weights' kept bf16 copies
(nn/weight_copies.py), its products where they were timed fastest in the step
(nn/small_products.py). With torch's products the values are the modules' path's to the
bit, and a test holds the two to each other; with kernels/products.c's, the projections'
weight gradients are float32 sums where the modules' are rounded to bf16. The residual
adds and the casts between float32 and bf16 that the modules leave to torch take one pass
each here (kernels/casts.c, and LN_1's backward pass with dr added in, as LN_2's). Taken
in bf16 training steps on the CPU for blocks whose layers are below nn/row_blocks.py's
sizes, with nothing that the one node would hide: no dropout, hook, mask or cache, pre-LN
with both residual paths.
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as module_hooks

from tformer import kernels
from tformer.nn.attention_choice import short_attention_kernel
from tformer.nn.attention_step import flash_backward, flash_forward
from tformer.nn.blocked_attention import any_hooked, hook_dicts, kernel_may_take
from tformer.nn.feedforward_step import STEP_ACTIVATIONS, network_backward, network_forward
from tformer.nn.norm import bf16_output_kernels
from tformer.nn.row_blocks import MIN_WEIGHT
from tformer.nn.small_products import input_gradient, linear, weight_gradient
from tformer.nn.weight_copies import half_weight

BF16 = torch.bfloat16


def takes(block: nn.Module, x: torch.Tensor, attention_mask, cache) -> bool:
    """Whether run(block, x) computes block(x, attention_mask, cache) as one step here:
    block a pre-LN decoder block (attn_sublayer, attn, mlp_sublayer, mlp) over x (B, T, C)."""
    if attention_mask is not None or cache is not None or not torch.is_grad_enabled():
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 3:
        return False
    first, second, attention, ffn = block.attn_sublayer, block.mlp_sublayer, block.attn, block.mlp
    if not (first.joins(second) and first.norm_writes_bf16) or torch.compiler.is_compiling():
        return False  # both pre-LN with their residual paths, the norms writing bf16
    if active(first.dropout) or active(second.dropout) or not self_attention(attention):
        return False
    if ffn.activation not in STEP_ACTIVATIONS:
        return False
    layers = (attention.w_qkv, attention.w_o, ffn.w1, ffn.w2)
    if not all(small_linear(layer) for layer in layers):
        return False  # a larger layer's products take nn/row_blocks.py's paths
    dropout = attention.dropout if attention.training else 0.0
    if not kernel_may_take(x.shape[1], dropout, attention.hook_pattern):
        return False
    if bf16_output_kernels(x, first.norm.weight) is None:
        return False  # not under CPU bf16 autocast, or no compiled kernels
    if second.norm.weight.dtype != torch.float32:
        return False
    return not hidden_hooks(block)


def active(dropout: nn.Module) -> bool:
    return dropout.p > 0.0 and dropout.training


def self_attention(attention: nn.Module) -> bool:
    """Causal self-attention on the kernels' path (implementation "blocked")."""
    return attention.implementation == "blocked" and attention.causal and not attention.cross


def small_linear(layer: nn.Module) -> bool:
    """A plain nn.Linear with a bias, below nn/row_blocks.py's sizes (hooks: hidden_hooks)."""
    return type(layer) is nn.Linear and layer.bias is not None and layer.weight.numel() < MIN_WEIGHT


def hidden_hooks(block: nn.Module) -> bool:
    """Whether a hook, forward or backward, its own or global, would miss one of the
    block's modules, which the one step does not call."""
    if module_hooks._global_backward_hooks or module_hooks._global_backward_pre_hooks:
        return True
    inside = submodules(block)  # the block's own hooks run around its forward
    if any_hooked(hook_dicts(inside)):
        return True
    return any(m._backward_hooks or m._backward_pre_hooks for m in inside)


def submodules(module: nn.Module) -> list[nn.Module]:
    """The modules below `module`, not itself (one held in two places comes twice). What
    module.modules() finds, without the names and the set of modules seen it builds on the
    way: asked of every block at every step, those took two thirds of the question's time."""
    found, unvisited = [], [module]
    while unvisited:
        for child in unvisited.pop()._modules.values():
            if child is not None:
                found.append(child)
                unvisited.append(child)
    return found


def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """block(x), (B, T, C) -> (B, T, C) float32, as one step where `takes` says so."""
    first, second, attention, ffn = block.attn_sublayer, block.mlp_sublayer, block.attn, block.mlp
    library = kernels.load()
    b, t, c = x.shape
    shaped = torch.empty((), dtype=BF16).expand(b, t, 3 * c)  # the projection's shape only
    kernel = short_attention_kernel(shaped, attention.n_heads, library)
    params = (
        first.norm.weight,
        first.norm.bias,
        attention.w_qkv.weight,
        attention.w_qkv.bias,
        attention.w_o.weight,
        attention.w_o.bias,
        second.norm.weight,
        second.norm.bias,
        ffn.w1.weight,
        ffn.w1.bias,
        ffn.w2.weight,
        ffn.w2.bias,
    )
    eps = (first.norm.eps, second.norm.eps)
    options = (attention.n_heads, ffn.activation, eps, kernel, library)
    # viewed outside the Function, as nn/row_blocks.py: a view made inside one could not be
    # changed in place (by a hook on the block, say), where the modules' output can
    return FusedBlock.apply(x, options, *params).view(b, t, c)


class FusedBlock(torch.autograd.Function):
    """y = Block(x): x (B, T, C) float32, options (heads, activation, the norms' eps, the
    attention kernel chosen: "kernel", "pairs" or "flash", the kernels), then the block's
    twelve parameters in `run`'s order -> y (B T, C) float32. Saves what the backward pass
    reads, in bf16 where the products read it."""

    @staticmethod
    def forward(ctx, x, options, *params):
        n_heads, activation, (eps_1, eps_2), kernel, library = options
        g_1, beta_1, w_qkv, b_qkv, w_o, b_o, g_2, beta_2, w_1, b_1, w_2, b_2 = params
        w_qkv, b_qkv, w_o, b_o, w_1, b_1, w_2, b_2 = (
            half_weight(p, BF16) for p in (w_qkv, b_qkv, w_o, b_o, w_1, b_1, w_2, b_2)
        )
        b, t, c = x.shape
        rows = x.reshape(b * t, c).contiguous()  # (M, C)
        a = torch.empty(b * t, c, dtype=BF16)
        _, mean_1, rstd_1 = library.layer_norm_bf16_out(rows, g_1, beta_1, eps_1, out=a)
        qkv = linear(a, w_qkv, b_qkv).view(b, t, 3 * c)
        flash = kernel == "flash"
        if flash:
            o, kept = flash_forward(qkv, n_heads, library)  # kept: the log-sum-exp
        else:  # kept: the weights P (bf16 from the pairs' kernel: its backward reads them)
            o, kept = library.causal_attention(qkv, n_heads, pairs=kernel == "pairs")
        o = o.view(b * t, c)  # the heads side by side
        r = torch.empty(b * t, c)
        n = torch.empty(b * t, c, dtype=BF16)
        attended = linear(o, w_o, b_o)
        _, _, mean_2, rstd_2 = library.add_layer_norm_bf16_out(
            rows, attended, g_2, beta_2, eps_2, (r, n)
        )
        ffn_out, g, derivative = network_forward(n, w_1, b_1, w_2, b_2, activation, library)
        y = library.add_bf16(r, ffn_out)  # (M, C) float32
        ctx.save_for_backward(
            rows, mean_1, rstd_1, a, qkv, o, kept, r, mean_2, rstd_2, n, g, derivative,
            g_1, w_qkv, w_o, g_2, w_1, w_2,
        )  # fmt: skip
        ctx.n_heads, ctx.flash, ctx.library = n_heads, flash, library
        return y  # (M, C)

    @staticmethod
    @once_differentiable  # the products and the kernels' gradients are not differentiated
    def backward(ctx, grad_y):
        rows, mean_1, rstd_1, a, qkv, o, kept, r, mean_2, rstd_2, n, g, derivative, *weights = (
            ctx.saved_tensors
        )
        g_1, w_qkv, w_o, g_2, w_1, w_2 = weights
        library, wanted = ctx.library, ctx.needs_input_grad[2:]
        b, t, _ = qkv.shape
        grad_y = grad_y.reshape(rows.shape).to(torch.float32).contiguous()  # (M, C)
        dy = library.round_bf16(grad_y)
        grad_n, grad_w_1, grad_b_1, grad_w_2, grad_b_2 = network_backward(
            dy, n, g, derivative, w_1, w_2, library, (True, *wanted[8:])
        )
        # the residual path and LN_2: dr in float32, and in bf16 for the product
        grad_r, dr, grad_g_2, grad_beta_2 = library.add_layer_norm_backward_bf16(
            grad_n, grad_y, r, mean_2, rstd_2, g_2
        )
        grad_o = input_gradient(dr, w_o)  # (M, C), the heads side by side
        grad_w_o = weight_gradient(dr, o) if wanted[4] else None
        grad_b_o = dr.sum(0) if wanted[5] else None
        if ctx.flash:
            grad_qkv = flash_backward(qkv, o.view(b, t, -1), kept, grad_o, ctx.n_heads, library)
        else:
            grad_o = grad_o.view(b, t, -1)
            grad_qkv = library.causal_attention_backward(qkv, kept, grad_o, ctx.n_heads)
        grad_qkv = grad_qkv.view(rows.shape[0], -1)  # (M, 3C)
        grad_a = input_gradient(grad_qkv, w_qkv)
        grad_w_qkv = weight_gradient(grad_qkv, a) if wanted[2] else None
        grad_b_qkv = grad_qkv.sum(0) if wanted[3] else None
        # the residual path and LN_1: dx = dr + LN_1's backward(da), in one pass
        grad_x, _, grad_g_1, grad_beta_1 = library.add_layer_norm_backward_bf16(
            grad_a, grad_r, rows, mean_1, rstd_1, g_1, bf16_too=False
        )
        grad_x = grad_x.view(b, t, -1) if ctx.needs_input_grad[0] else None
        grads = [
            grad_g_1,
            grad_beta_1,
            grad_w_qkv,
            grad_b_qkv,
            grad_w_o,
            grad_b_o,
            grad_g_2,
            grad_beta_2,
            grad_w_1,
            grad_b_1,
            grad_w_2,
            grad_b_2,
        ]
        # in bf16 where torch's product made them: autograd casts each to its parameter's dtype
        grads = [grad if want else None for grad, want in zip(grads, wanted, strict=True)]
        return grad_x, None, *grads
