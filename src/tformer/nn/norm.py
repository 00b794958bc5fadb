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
