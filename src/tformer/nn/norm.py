"""Layer normalisation (Ba, Kiros and Hinton, 2016).

For each vector x of width C, with its own mean and (biased) variance,

    mean = (1/C) sum_j x_j          var = (1/C) sum_j (x_j - mean)^2
    y    = (x - mean) / sqrt(var + eps) * gamma + beta

gamma (`weight`, initialised to 1) and beta (`bias`, initialised to 0) are learned per
channel. Without them a layer could not undo the normalisation where that helps.

Under bf16 autocast on the CPU, a norm whose output only feeds matrix products (a pre-LN
sublayer's: attention's projections, the feed-forward's first layer) would be written in
float32 and then cast to bf16 by the first product. There the compiled kernel
(kernels/layer_norm.c) writes bf16 straight away, and its backward pass reads the bf16
gradient: within one bf16 rounding step of the cast of torch's norm (float32 sums in
another order), without the float32 output and its casts each way (docs/LOG.md). Only
for a norm that one product reads (nn/sublayer.py): two readers' gradients would be added
in bf16.

Such a norm usually reads a residual stream just summed, h = x + y with y a sublayer's bf16
output. add_then_norm takes both in one pass (h and its norm written together), and its
backward pass writes h's gradient, the residual path's plus the norm's, in float32 for x and
in bf16 for y (kernels/layer_norm.c). Apart, torch's mixed add copies y to float32 first,
the norm reads h again, and backwards autograd adds the two gradients in a pass of its own
and casts y's in another (docs/LOG.md).
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from tformer import kernels


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last dimension."""

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))  # gamma
        self.bias = nn.Parameter(torch.zeros(d_model))  # beta

    def forward(self, x: torch.Tensor, feeds_matmul: bool = False) -> torch.Tensor:
        """(..., C) -> (..., C). feeds_matmul: the output goes only into matrix products,
        which under bf16 autocast on the CPU read it in bf16; then it comes out in bf16."""
        if feeds_matmul:
            library = bf16_output_kernels(x, self.weight)
            if library is not None:
                return LayerNormBf16Out.apply(x, self.weight, self.bias, self.eps, library)
        # The fused kernel computes exactly the equation above (the tests hold it to a
        # transcription of it); it is one pass over memory instead of five.
        return nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def bf16_output_kernels(x: torch.Tensor, weight: torch.Tensor) -> kernels.Kernels | None:
    """The compiled kernels if a norm of x that feeds matrix products may write bf16: x
    and the weight float32 on the CPU under bf16 autocast, the kernels built, not while
    torch.compile traces; else None."""
    if x.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return None
    return kernels.load_for(x, (torch.float32,))


class LayerNormBf16Out(torch.autograd.Function):
    """x (..., C) float32 -> y (..., C) bf16, with gamma and beta (C,) float32; backward from
    a bf16 gradient to float32 ones (kernels/layer_norm.c)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, library):
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # (..., C) -> (N, C)
        y = torch.empty(x.shape, dtype=torch.bfloat16)  # its own tensor, not a view
        _, mean, rstd = library.layer_norm_bf16_out(rows, weight, bias, eps, out=y.view(rows.shape))
        ctx.save_for_backward(rows, mean, rstd, weight)
        ctx.library, ctx.shape = library, x.shape
        return y

    @staticmethod
    @once_differentiable  # the kernel's gradient is not itself differentiable
    def backward(ctx, grad):
        rows, mean, rstd, weight = ctx.saved_tensors
        grad = grad.to(torch.bfloat16).reshape(rows.shape).contiguous()  # (N, C)
        dx, dgamma, dbeta = ctx.library.layer_norm_backward_bf16(grad, rows, mean, rstd, weight)
        needs = ctx.needs_input_grad
        return (
            dx.view(ctx.shape) if needs[0] else None,
            dgamma if needs[1] else None,
            dbeta if needs[2] else None,
            None,
            None,
        )


def add_then_norm(
    x: torch.Tensor, y: torch.Tensor, norm: LayerNorm
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(h, norm(h, feeds_matmul=True)) for h = x + y, in one pass where the compiled kernels
    take it: x float32 and y bf16 of one shape on the CPU, under bf16 autocast. None
    otherwise (the caller adds and normalises apart)."""
    library = bf16_output_kernels(x, norm.weight)
    if (
        library is None
        or y.dtype != torch.bfloat16
        or y.shape != x.shape
        or x.dtype != torch.float32
    ):
        return None
    return AddLayerNormBf16Out.apply(x, y, norm.weight, norm.bias, norm.eps, library)


class AddLayerNormBf16Out(torch.autograd.Function):
    """x (..., C) float32 and y (..., C) bf16 -> h = x + y (..., C) float32 and the norm of h
    (..., C) bf16, with gamma and beta (C,) float32 (kernels/layer_norm.c)."""

    @staticmethod
    def forward(ctx, x, y, weight, bias, eps, library):
        c = x.shape[-1]
        rows, adds = x.reshape(-1, c).contiguous(), y.reshape(-1, c).contiguous()  # (N, C)
        # tensors of their own, not views: in-place changes to them are allowed
        h = torch.empty(x.shape, dtype=torch.float32, device="cpu")
        normed = torch.empty(x.shape, dtype=torch.bfloat16, device="cpu")
        out = (h.view(rows.shape), normed.view(rows.shape))
        _, _, mean, rstd = library.add_layer_norm_bf16_out(rows, adds, weight, bias, eps, out)
        ctx.save_for_backward(h, mean, rstd, weight)
        ctx.library = library
        return h, normed

    @staticmethod
    @once_differentiable  # the kernel's gradient is not itself differentiable
    def backward(ctx, grad_h, grad_normed):
        h, mean, rstd, weight = ctx.saved_tensors
        shape, rows = h.shape, (-1, h.shape[-1])  # (..., C), (N, C)
        grad_h = grad_h.to(torch.float32).reshape(rows).contiguous()
        grad_normed = grad_normed.to(torch.bfloat16).reshape(rows).contiguous()
        dx, dy, dgamma, dbeta = ctx.library.add_layer_norm_backward_bf16(
            grad_normed, grad_h, h.view(rows), mean, rstd, weight
        )
        needs = ctx.needs_input_grad
        return (
            dx.view(shape) if needs[0] else None,
            dy.view(shape) if needs[1] else None,
            dgamma if needs[2] else None,
            dbeta if needs[3] else None,
            None,
            None,
        )
