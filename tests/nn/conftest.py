"""Fixtures of the layer tests."""

from collections.abc import Callable

import pytest
import torch

from tformer.nn import small_products
from tformer.nn.flash_attention import flash_takes


@pytest.fixture
def bf16_flash(compiled, monkeypatch) -> list[str]:
    """The bf16 FlashAttention kernel's calls, recorded ("forward", "backward") in the
    list returned; where the CPU has no AMX for that kernel, answered by the float32 kernel
    in its place: the inputs widened with their strides, the outputs rounded to bf16 (into
    the given `out`, as the kernel writes it), the log-sum-exp as it is. The paths that
    call the kernel (its layouts, the log-sum-exp they keep, their gradients) are then
    tested on every CPU; the bf16 kernel's own numerics only on AMX
    (test_flash_attention.py). Calls the bf16 kernel would refuse (mixed dtypes, say) go
    to the kernels' own checks."""
    kernels_type = type(compiled)
    forward, backward = kernels_type.flash_attention, kernels_type.flash_attention_backward
    emulated = not flash_takes(torch.zeros(1, 1, 1, 32, dtype=torch.bfloat16))
    calls = []

    def widened(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(t.shape, t.stride(), dtype=torch.float32).copy_(t)

    def all_bf16(*tensors: torch.Tensor) -> bool:
        return all(t.dtype == torch.bfloat16 for t in tensors)

    def flash_attention(self, q, k, v, out=None):
        if all_bf16(q, k, v):
            calls.append("forward")
        if not (emulated and all_bf16(q, k, v)):
            return forward(self, q, k, v, out)
        wide, lse = forward(self, widened(q), widened(k), widened(v))
        if out is None:
            out = torch.empty(wide.shape, dtype=torch.bfloat16)
        if out.shape != wide.shape or out.dtype != torch.bfloat16 or not out.is_contiguous():
            raise ValueError(f"flash_attention: out must be contiguous bf16 {tuple(wide.shape)}")
        return out.copy_(wide), lse

    def flash_attention_backward(self, q, k, v, grad_out, out, lse):
        if all_bf16(q, k, v, grad_out, out):
            calls.append("backward")
        if not (emulated and all_bf16(q, k, v, grad_out, out)):
            return backward(self, q, k, v, grad_out, out, lse)
        wide = (widened(t) for t in (q, k, v, grad_out, out))
        return backward(self, *wide, lse).bfloat16()

    if emulated:
        monkeypatch.setattr(kernels_type, "flash_attention_available", lambda self: True)
    monkeypatch.setattr(kernels_type, "flash_attention", flash_attention)
    monkeypatch.setattr(kernels_type, "flash_attention_backward", flash_attention_backward)
    return calls


@pytest.fixture(params=["torch", "rows"])
def products(request, compiled, monkeypatch) -> str:
    """The path every product of the small models' one-step paths takes, pinned
    (nn/small_products.py): torch's products, or kernels/products.c's rows (skipped on a CPU
    without AVX-512 BF16, where that kernel is not built)."""
    if request.param == "rows" and not compiled.products_available():
        pytest.skip("kernels/products.c needs a CPU with AVX-512 BF16")
    monkeypatch.setattr(small_products, "chosen", lambda *shape: request.param)
    return request.param


@pytest.fixture
def agree(products) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """agree(ours, plain): equal to the bit where every product on both paths is torch's;
    with kernels/products.c's on one path, as close as one bf16 rounding carried through a
    layer or two (its sums are torch's own on some CPUs, not on all)."""

    def check(ours: torch.Tensor, plain: torch.Tensor) -> None:
        assert ours.dtype == plain.dtype and ours.shape == plain.shape
        if products == "torch":
            assert torch.equal(ours, plain)
        else:
            scale = plain.abs().max().item()
            torch.testing.assert_close(ours, plain, rtol=2**-6, atol=2**-6 * scale)

    return check
