import pytest
import torch
from torch import nn

from tformer.nn import feedforward_step
from tformer.nn.activations import activation_fn
from tformer.nn.feedforward import FeedForward
from tformer.nn.row_blocks import MIN_WEIGHT


def run(ffn: FeedForward, x: torch.Tensor, grad: torch.Tensor, fused: bool):
    """ffn's output and every gradient, on the one step or the plain path."""
    ffn.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x.bfloat16()  # as the bf16 LayerNorm hands it on
        assert feedforward_step.takes(ffn, h)
        if fused:
            y = ffn(h)
            assert y.grad_fn.next_functions[0][0].name().startswith("FusedFeedForward")
        else:
            y = ffn.w2(activation_fn(ffn.activation, ffn.w1(h)))
    y.float().backward(grad)
    params = [ffn.w1.weight, ffn.w1.bias, ffn.w2.weight, ffn.w2.bias]
    return y, [x.grad, *(p.grad.clone() for p in params)]


def exact(ffn: FeedForward, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """The gradients in float64, from the bf16 input the layers see."""
    x = x.bfloat16().double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in ffn.parameters()]
    w1, b1, w2, b2 = params
    z = x @ w1.t() + b1
    h = nn.functional.gelu(z, approximate="tanh" if ffn.activation == "gelu_tanh" else "none")
    (h @ w2.t() + b2).backward(grad.double())
    return [x.grad, *(p.grad for p in params)]


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_the_feed_forward_in_one_step_trains_as_its_layers_apart(activation, products, agree):
    """The same GELU kernel and casts: with torch's products the output equal to the bit
    (with kernels/products.c's, within a rounding), each gradient as close to float64's as
    the plain path's."""
    torch.manual_seed(0)
    ffn = FeedForward(64, 256, activation=activation)
    x = torch.randn(3, 50, 64)
    grad = torch.randn(3, 50, 64)
    y, fused = run(ffn, x, grad, fused=True)
    y0, plain = run(ffn, x, grad, fused=False)
    assert y.dtype == torch.bfloat16
    agree(y, y0)
    for ours, theirs, best in zip(fused, plain, exact(ffn, x, grad), strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=2**-6, atol=1e-3)
        error, plain_error = ((g.double() - best).abs().max() for g in (ours, theirs))
        assert error <= plain_error * 1.5 + 1e-6


def test_a_frozen_layer_gets_no_gradient(compiled):
    ffn = FeedForward(32, 128, activation="gelu")
    ffn.w1.requires_grad_(False)
    x = torch.randn(2, 8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert feedforward_step.takes(ffn, x.bfloat16())
        y = ffn(x.bfloat16())
    assert y.grad_fn.next_functions[0][0].name().startswith("FusedFeedForward")
    y.float().sum().backward()
    assert ffn.w1.weight.grad is None and ffn.w1.bias.grad is None
    assert ffn.w2.weight.grad is not None and x.grad is not None


def test_it_is_taken_only_where_it_applies(compiled):
    ffn = FeedForward(32, 128, activation="gelu")
    x = torch.randn(2, 8, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert feedforward_step.takes(ffn, x)
        assert feedforward_step.takes(ffn, x.float())  # autocast multiplies it in bf16
        with torch.no_grad():  # nothing to train: the plain path
            assert not feedforward_step.takes(ffn, x)
        handle = ffn.w1.register_forward_hook(lambda *args: None)
        assert not feedforward_step.takes(ffn, x)  # the hook would not see w1
        handle.remove()
        assert not feedforward_step.takes(FeedForward(32, 128, activation="relu"), x)
        large = FeedForward(128, MIN_WEIGHT // 128)  # nn/row_blocks.py's sizes: its paths
        assert not feedforward_step.takes(large, torch.randn(2, 8, 128))
    assert not feedforward_step.takes(ffn, x.float())  # float32 products: nn.Linear's


@pytest.mark.parametrize("shape", [(7, 40), (300, 200)])  # one thread; the pool
def test_the_gradient_through_a_bf16_derivative_is_torch_s_product_and_its_sums(compiled, shape):
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=g).bfloat16()
    d = torch.rand(shape, generator=g).bfloat16()
    out, sums = compiled.scale_bf16_column_sums(grad, d)
    assert torch.equal(out, grad * d)  # rounded once, as torch's bf16 multiply
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums.double(), out.double().sum(0), rtol=1e-5, atol=1e-5)
