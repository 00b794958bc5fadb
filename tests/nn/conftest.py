"""Fixtures of the layer tests."""

import pytest
import torch

from tformer.nn.flash_attention import flash_takes


@pytest.fixture
def bf16_flash(compiled, monkeypatch):
    """The bf16 FlashAttention kernel, or where the CPU has no AMX for it, the float32
    kernel in its place: its calls answered with the inputs widened and the outputs rounded
    to bf16 (into the given `out`, as the kernel writes it), the log-sum-exp as it is. The
    paths that call the kernel (its layouts, the log-sum-exp they keep, their gradients)
    are then tested on every CPU; the bf16 kernel's own numerics only on AMX
    (test_flash_attention.py)."""
    if flash_takes(torch.zeros(1, 1, 1, 32, dtype=torch.bfloat16)):
        return
    kernels_type = type(compiled)
    forward, backward = kernels_type.flash_attention, kernels_type.flash_attention_backward

    def flash_attention(self, q, k, v, out=None):
        if q.dtype != torch.bfloat16:
            return forward(self, q, k, v, out)
        wide, lse = forward(self, q.float(), k.float(), v.float())
        if out is None:
            out = torch.empty(wide.shape, dtype=torch.bfloat16)
        assert out.shape == wide.shape and out.dtype == torch.bfloat16 and out.is_contiguous()
        return out.copy_(wide), lse

    def flash_attention_backward(self, q, k, v, grad_out, out, lse):
        if q.dtype != torch.bfloat16:
            return backward(self, q, k, v, grad_out, out, lse)
        wide = (t.float() for t in (q, k, v, grad_out, out))
        return backward(self, *wide, lse).bfloat16()

    monkeypatch.setattr(kernels_type, "flash_attention_available", lambda self: True)
    monkeypatch.setattr(kernels_type, "flash_attention", flash_attention)
    monkeypatch.setattr(kernels_type, "flash_attention_backward", flash_attention_backward)
