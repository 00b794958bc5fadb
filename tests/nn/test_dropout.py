import pytest
import torch

from tformer.nn import Dropout, dropout
from tformer.nn.dropout import dropout_mask, keep_threshold


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_each_lane_keeps_with_probability_one_minus_p(p):
    n = 400_000
    mask, scale = dropout_mask(torch.Size([n]), p, torch.device("cpu"))
    keep = keep_threshold(p) / 65536
    assert abs(keep - (1 - p)) <= 1 / 131072
    assert scale == pytest.approx(1 / keep, rel=1e-12)
    sigma = (keep * (1 - keep) / (n / 4)) ** 0.5
    for lane in range(4):  # the four 16-bit lanes of each random word, counted apart
        rate = mask[lane::4].double().mean().item()
        assert abs(rate - keep) < 5 * sigma, (lane, rate, keep)


def test_neighbouring_elements_are_independent():
    mask, _ = dropout_mask(torch.Size([400_000]), 0.5, torch.device("cpu"))
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
