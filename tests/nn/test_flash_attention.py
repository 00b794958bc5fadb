"""The FlashAttention kernels, bf16 on AMX and float32, against float64 attention and
torch's own fused kernel in the same dtype."""

import math

import pytest
import torch

from tformer import kernels
from tformer.nn.flash_attention import flash_causal, flash_causal_projection, flash_takes

AMX = flash_takes(torch.zeros(1, 1, 1, 32, dtype=torch.bfloat16))
needs_amx = pytest.mark.skipif(not AMX, reason="the FlashAttention kernel needs a CPU with AMX")


def projection(b, h, t, d, seed=0, dtype=torch.bfloat16):
    """A fused projection's output (B, T, 3, H, D), a leaf for gradients."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 3, h, d, generator=g).to(dtype).requires_grad_()


def heads(qkv):
    """q, k, v (B, H, T, D) as split_heads leaves them: views of the projection."""
    return [qkv[:, :, part].transpose(1, 2) for part in range(3)]


def heads_of_a_projection(b, h, t, d, seed=0, dtype=torch.bfloat16):
    return heads(projection(b, h, t, d, seed, dtype).detach())


def reference(q, k, v):
    """softmax(Q K^T / sqrt(d) + M) V, and its log-sum-exp per query."""
    t = q.shape[2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


@needs_amx
@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 1, 32),  # one position; a single head, fewer tasks than threads
        (1, 1, 5, 64),
        (2, 1, 31, 32),
        (1, 2, 64, 32),
        (2, 3, 100, 64),
        (1, 2, 129, 64),
        (1, 1, 300, 128),
        (2, 2, 1000, 64),
    ],
)
def test_flash_attention_is_as_close_to_float64_as_torchs_bf16_kernel(shape):
    """Output and gradient of the projection, for sequences in whole blocks and not: the
    kernel's error against float64 is at most a little over torch's fused bf16 kernel's
    (bf16 inputs and products, float32 sums, both)."""
    ours = projection(*shape)
    torchs = ours.detach().clone().requires_grad_()
    exact = ours.detach().double().requires_grad_()
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    out = flash_causal(*heads(ours))
    theirs = torch.nn.functional.scaled_dot_product_attention(*heads(torchs), is_causal=True)
    expected, _ = reference(*heads(exact))
    for y, grad in ((out, grad_out), (theirs, grad_out), (expected, grad_out.double())):
        y.backward(grad)
    for mine, torch_bf16, truth in [(out, theirs, expected), (ours.grad, torchs.grad, exact.grad)]:
        scale = truth.abs().max().item()
        error = (mine.double() - truth).abs().max().item()
        torch_error = (torch_bf16.double() - truth).abs().max().item()
        assert error <= 1.25 * torch_error + 2e-3 * scale, (error, torch_error, scale)
        assert error <= 1e-2 * scale


@needs_amx
def test_flash_attention_keeps_each_querys_log_sum_exp_and_writes_the_projections_layout():
    q, k, v = heads_of_a_projection(2, 3, 200, 64)
    library = kernels.load()
    out, lse = library.flash_attention(q, k, v)
    expected, expected_lse = reference(q.double(), k.double(), v.double())
    assert out.shape == (2, 200, 3, 64) and lse.shape == (2, 3, 200)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.transpose(1, 2).double(), expected, rtol=0, atol=2e-2)


@needs_amx
def test_flash_attention_reads_any_strides_and_needs_whole_tile_heads():
    q, k, v = heads_of_a_projection(1, 2, 70, 32)
    library = kernels.load()
    strided, _ = library.flash_attention(q, k, v)
    contiguous, _ = library.flash_attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(strided, contiguous)
    with pytest.raises(ValueError, match="multiple of 32"):
        library.flash_attention(*(x[..., :16] for x in (q, k, v)))
    with pytest.raises(ValueError, match="k must be torch.float32"):
        library.flash_attention(q.float(), k, v)
    with pytest.raises(ValueError, match="as q"):
        library.flash_attention(q, k[:, :1], v)


def test_flash_attention_is_offered_for_bf16_with_amx_and_float32_heads_of_whole_blocks():
    assert not flash_takes(torch.zeros(1, 2, 8, 48, dtype=torch.bfloat16))
    assert not flash_takes(torch.zeros(1, 2, 8, 48, dtype=torch.float32))
    assert flash_takes(torch.zeros(1, 2, 8, 64, dtype=torch.float32)) == (
        kernels.load() is not None
    )
    assert not flash_takes(torch.zeros(1, 2, 8, 64, dtype=torch.float64))
    assert not flash_takes(torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16, device="meta"))


FLOAT32_SHAPES = [
    (1, 1, 1, 32),  # one position; a single head, fewer tasks than threads
    (1, 1, 5, 64),
    (2, 1, 31, 32),
    (1, 2, 64, 32),
    (2, 3, 100, 64),
    (1, 2, 257, 64),  # one past the kernel's padding block
    (1, 1, 300, 128),
    (1, 2, 600, 96),
]


@pytest.mark.parametrize("shape", FLOAT32_SHAPES)
def test_float32_flash_attention_is_as_close_to_float64_as_torchs_float32_kernel(shape):
    """float32 output and gradient of the projection, for sequences in whole blocks and not:
    the kernel's error against float64 is at most a little over torch's fused float32
    kernel's, and within float32's reach of the truth."""
    ours = projection(*shape, dtype=torch.float32)
    torchs = ours.detach().clone().requires_grad_()
    exact = ours.detach().double().requires_grad_()
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = flash_causal(*heads(ours))
    theirs = torch.nn.functional.scaled_dot_product_attention(*heads(torchs), is_causal=True)
    expected, _ = reference(*heads(exact))
    for y, grad in ((out, grad_out), (theirs, grad_out), (expected, grad_out.double())):
        y.backward(grad)
    assert out.dtype == ours.grad.dtype == torch.float32
    for mine, torch_f32, truth in [(out, theirs, expected), (ours.grad, torchs.grad, exact.grad)]:
        scale = truth.abs().max().item()
        error = (mine.double() - truth).abs().max().item()
        torch_error = (torch_f32.double() - truth).abs().max().item()
        assert error <= 2 * torch_error + 1e-6 * scale, (error, torch_error, scale)
        assert error <= 1e-5 * scale


def test_float32_flash_attention_keeps_each_querys_log_sum_exp_and_reads_any_strides():
    q, k, v = heads_of_a_projection(2, 3, 200, 64, dtype=torch.float32)
    library = kernels.load()
    out, lse = library.flash_attention(q, k, v)
    expected, expected_lse = reference(q.double(), k.double(), v.double())
    assert out.shape == (2, 200, 3, 64) and out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), expected_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.transpose(1, 2).double(), expected, rtol=0, atol=1e-5)
    contiguous, _ = library.flash_attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(out, contiguous)
    with pytest.raises(ValueError, match="k must be torch.float32"):
        library.flash_attention(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        library.flash_attention(q.double(), k.double(), v.double())


@needs_amx
def test_flash_attention_takes_a_gradient_of_any_strides():
    """The output's gradient as autograd may hand it over: broadcast (stride 0) here."""
    qkv = projection(2, 2, 40, 32)
    out = flash_causal(*heads(qkv))
    grad_out = torch.randn(1, 1, 1, 32).bfloat16().expand(out.shape)  # strides (0, 0, 0, 1)
    out.backward(grad_out)
    exact = qkv.detach().double().requires_grad_()
    expected, _ = reference(*heads(exact))
    expected.backward(grad_out.double())
    scale = exact.grad.abs().max()
    torch.testing.assert_close(qkv.grad.double() / scale, exact.grad / scale, rtol=0, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(12, 4, 64, 32), (2, 3, 100, 64)])
def test_flash_attention_of_a_projection_gives_the_heads_paths_numbers_in_its_layout(shape, dtype):
    """From the fused projection (B, T, 3C): the same output and gradient as the kernel on
    its heads' views, bit for bit, the gradient in the projection's own layout."""
    if dtype == torch.bfloat16 and not AMX:
        pytest.skip("the bf16 FlashAttention kernel needs a CPU with AMX")
    b, h, t, d = shape
    fused = projection(b, h, t, d, dtype=dtype).detach().flatten(2).requires_grad_()  # (B, T, 3C)
    split = fused.detach().clone().requires_grad_()
    grad_out = torch.randn(b, t, h * d, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = flash_causal_projection(fused, h)
    expected = flash_causal(*heads(split.view(b, t, 3, h, d))).transpose(1, 2).flatten(2)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert out.shape == (b, t, h * d) and fused.grad.shape == fused.shape
    assert out.dtype == fused.grad.dtype == dtype
    assert torch.equal(out, expected)
    assert torch.equal(fused.grad, split.grad)
