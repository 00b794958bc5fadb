import os

import pytest
import torch

from tformer import kernels
from tformer.nn import Dropout, dropout
from tformer.nn.dropout import dropout_mask, keep_threshold, masked_scale

CPU = torch.device("cpu")


def built_kernels():
    """The compiled kernels; skipped only where TFORMER_KERNELS=0 turned them off."""
    library = kernels.load()
    if library is None:
        assert os.environ.get("TFORMER_KERNELS") == "0", kernels.unavailable_reason()
        pytest.skip("TFORMER_KERNELS=0: testing the torch path only")
    return library


@pytest.fixture(params=[True, False], ids=["compiled", "torch"])
def compiled(request):
    """Both ways of drawing the words: the C kernels' generator and torch's random_."""
    if request.param:
        built_kernels()
    return request.param


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_each_lane_keeps_with_probability_one_minus_p(p, compiled):
    n = 400_001  # not a whole number of words
    mask, scale = dropout_mask(torch.Size([n]), p, CPU, compiled=compiled)
    keep = keep_threshold(p) / 65536
    assert abs(keep - (1 - p)) <= 1 / 131072
    assert scale == pytest.approx(1 / keep, rel=1e-12)
    sigma = (keep * (1 - keep) / (n / 4)) ** 0.5
    for lane in range(4):  # the four 16-bit lanes of each random word, counted apart
        rate = mask[lane::4].double().mean().item()
        assert abs(rate - keep) < 5 * sigma, (lane, rate, keep)


def test_neighbouring_elements_are_independent(compiled):
    mask, _ = dropout_mask(torch.Size([400_000]), 0.5, CPU, compiled=compiled)
    m = mask.double() - 0.5
    for lag in (1, 2, 3, 4, 5):
        correlation = (m[:-lag] * m[lag:]).mean().item() / 0.25
        assert abs(correlation) < 5 / 400_000**0.5, lag


def test_dropout_keeps_the_expectation_and_its_gradient_is_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(300, 257, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.25)
    kept = y != 0
    scale = 65536 / keep_threshold(0.25)
    torch.testing.assert_close(y[kept], x[kept] * scale)
    w = torch.randn_like(x)
    (grad,) = torch.autograd.grad((y * w).sum(), x)
    torch.testing.assert_close(grad, w * kept * scale)
    ones = dropout(torch.ones(1_000_000), 0.25)
    assert ones.mean().item() == pytest.approx(1.0, abs=5 * (0.25 / 0.75 / 1e6) ** 0.5)


def test_dropout_keeps_the_dtype_and_shape():
    x = torch.randn(3, 5, 7).bfloat16()
    y = dropout(x, 0.1)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


def test_seeded_masks_repeat_and_fresh_ones_differ():
    x = torch.ones(10_000)
    torch.manual_seed(3)
    a, b = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.5), a)
    assert not torch.equal(a, b)


def test_evaluation_and_the_extremes():
    x = torch.randn(4, 6)
    module = Dropout(0.3).eval()
    assert module(x) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)


def test_compiled_masks_follow_torch_seed_and_not_the_thread_count(compiled):
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(5)
        a, _ = dropout_mask(torch.Size([100_003]), 0.3, CPU, compiled=compiled)
        torch.set_num_threads(1)
        torch.manual_seed(5)
        b, _ = dropout_mask(torch.Size([100_003]), 0.3, CPU, compiled=compiled)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 37, 40_000])  # one element, a partial vector, threaded
def test_the_mask_applied_in_one_pass_equals_torch_s_products(dtype, n):
    """kernels.masked_scale against x.mul(mask).mul_(scale), bit for bit: the product x m
    is exact (x, a signed zero, or NaN), the one with s rounded as torch rounds it; NaN
    where torch gives NaN (its bits are not compared), the infinities where it has them."""
    library = built_kernels()
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 1e3).to(dtype)
    x[::7] = -x[::7].abs()
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3e38])
    x[: min(n, 6)] = special[: min(n, 6)].to(dtype)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for p in (0.1, 0.5):
        mask, scale = dropout_mask(x.shape, p, CPU)
        mask[: min(n, 6)] = torch.tensor([True, False, True, False, True, True])[: min(n, 6)]
        got, want = library.masked_scale(x, mask, scale), x.mul(mask).mul_(scale)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got.isnan(), want.isnan())
        finite = ~want.isnan()
        assert torch.equal(got[finite].view(bits), want[finite].view(bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_through_the_kernel_equals_torch_s_products_forward_and_backward(
    dtype, monkeypatch
):
    """The forward pass and a contiguous gradient's backward pass run in the kernel (counted)
    and equal torch's products with the same mask; a transposed gradient takes torch's."""
    library = built_kernels()
    calls = []
    kernel = type(library).masked_scale
    monkeypatch.setattr(
        type(library), "masked_scale", lambda self, *a: calls.append(1) or kernel(self, *a)
    )
    x = torch.randn(6, 50, dtype=dtype, requires_grad=True)
    grad = torch.randn(6, 50, dtype=dtype)
    torch.manual_seed(3)
    y = dropout(x, 0.3)
    y.backward(grad)
    assert len(calls) == 2  # forward and backward
    torch.manual_seed(3)
    mask, scale = dropout_mask(x.shape, 0.3, CPU)
    assert torch.equal(y, x.detach().mul(mask).mul_(scale))
    assert torch.equal(x.grad, grad.mul(mask).mul_(scale))
    x.grad = None
    torch.manual_seed(3)
    dropout(x, 0.3).t().backward(grad.t().contiguous())  # its gradient is a transposed view
    assert len(calls) == 3  # the forward pass only
    assert torch.equal(x.grad, grad.mul(mask).mul_(scale))


def test_dropout_s_gradient_is_differentiable_again():
    """The backward pass is MaskedScale itself (its own adjoint), so the gradient is
    differentiable in the incoming gradient w (create_graph): d(sum of w m s)/dw = m s."""
    built_kernels()
    x = torch.randn(5, 40, requires_grad=True)
    w = torch.randn(5, 40, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.5)
    (g,) = torch.autograd.grad(y, x, w, create_graph=True)
    assert g.requires_grad
    (gw,) = torch.autograd.grad(g.sum(), w)
    torch.manual_seed(1)
    mask, scale = dropout_mask(x.shape, 0.5, CPU)
    assert torch.equal(gw, torch.ones_like(w).mul(mask).mul_(scale))


def test_the_kernel_refuses_what_it_cannot_take_and_dropout_leaves_it_to_torch():
    library = built_kernels()
    with pytest.raises(ValueError, match="masked_scale"):
        library.masked_scale(torch.ones(4), torch.ones(3, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="masked_scale"):
        library.masked_scale(torch.ones(4), torch.ones(4), 1.0)  # a float mask
    x = torch.randn(3, 4)
    broadcast = torch.tensor([True, False, True, True])  # (4,) over (3, 4): torch's path
    assert torch.equal(masked_scale(x, broadcast, 2.0), x.mul(broadcast).mul_(2.0))
