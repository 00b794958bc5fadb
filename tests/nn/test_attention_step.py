import math

import pytest
import torch

from tformer.nn import attention_choice as choice
from tformer.nn import attention_step, measured
from tformer.nn.attention import MultiHeadAttention
from tformer.nn.row_blocks import MIN_WEIGHT


@pytest.fixture
def flash_chosen(bf16_flash, monkeypatch):
    """The FlashAttention kernel chosen for every shape these tests use (on a CPU without
    AMX, its float32 kernel in the bf16 one's place: conftest.py's bf16_flash)."""

    def choose(b: int, t: int, width: int, heads: int, path: str = "flash") -> None:
        key = f"{b}x{t}x{width} {heads} heads, short bfloat16"
        monkeypatch.setitem(measured._chosen, (choice.KIND, key, torch.get_num_threads()), path)

    choose.calls = bf16_flash  # the FlashAttention kernel's calls, as they happen
    return choose


def run(attention: MultiHeadAttention, x: torch.Tensor, grad: torch.Tensor, step: bool):
    """The sublayer's output and every gradient, as one step or through its modules (a
    hook on the output projection keeps the modules' path, the same kernel)."""
    attention.zero_grad()
    handle = None if step else attention.w_o.register_forward_hook(lambda *args: None)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_step.takes(attention, x) == step
        y = attention(x)
    if step:
        assert y.grad_fn.next_functions[0][0].name().startswith("FusedSelfAttention")
    y.float().backward(grad)
    if handle is not None:
        handle.remove()
    return y, [x.grad, *(p.grad.clone() for p in attention.parameters())]


def exact(attention: MultiHeadAttention, x: torch.Tensor, grad: torch.Tensor):
    """The gradients in float64, from the bf16 values the products read."""
    x = x.bfloat16().double().requires_grad_()
    params = [p.detach().bfloat16().double().requires_grad_() for p in attention.parameters()]
    w_qkv, b_qkv, w_o, b_o = params
    b, t, c = x.shape
    h = attention.n_heads
    q, k, v = (x @ w_qkv.t() + b_qkv).view(b, t, 3, h, -1).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(c // h)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
    (o @ w_o.t() + b_o).backward(grad.double())
    return [x.grad, *(p.grad for p in params)]


def test_the_sublayer_in_one_step_trains_as_its_modules(flash_chosen, products, agree):
    """The same kernel and casts: with torch's products the output equal to the bit (with
    kernels/products.c's, within a rounding), each gradient as close to float64's as the
    modules' path's."""
    torch.manual_seed(0)
    attention = MultiHeadAttention(128, 4, causal=True, implementation="blocked")
    x = torch.randn(3, 40, 128)
    grad = torch.randn(3, 40, 128)
    flash_chosen(3, 40, 384, 4)
    y, ours = run(attention, x, grad, step=True)
    assert flash_chosen.calls == ["forward", "backward"]  # the kernel chosen, on both paths
    y0, plain = run(attention, x, grad, step=False)
    assert flash_chosen.calls == ["forward", "backward"] * 2
    assert y.dtype == torch.bfloat16
    agree(y, y0)
    for g, g0, best in zip(ours, plain, exact(attention, x, grad), strict=True):
        assert g.dtype == g0.dtype and g.shape == g0.shape
        scale = g0.abs().max()
        torch.testing.assert_close(g / scale, g0 / scale, rtol=0, atol=2**-7)
        error, plain_error = ((a.double() - best).abs().max() for a in (g, g0))
        assert error <= plain_error * 1.5 + 1e-6


def test_frozen_projections_get_no_gradient(flash_chosen):
    attention = MultiHeadAttention(64, 2, causal=True, implementation="blocked")
    attention.w_qkv.requires_grad_(False)
    flash_chosen(2, 8, 192, 2)
    x = torch.randn(2, 8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_step.takes(attention, x)
        y = attention(x)
    y.float().sum().backward()
    assert attention.w_qkv.weight.grad is None and attention.w_qkv.bias.grad is None
    assert attention.w_o.weight.grad is not None and x.grad is not None


def test_it_is_taken_only_where_it_applies(flash_chosen):
    attention = MultiHeadAttention(64, 2, causal=True, implementation="blocked")
    x = torch.randn(2, 8, 64)
    flash_chosen(2, 8, 192, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_step.takes(attention, x)
        with torch.no_grad():  # nothing to train
            assert not attention_step.takes(attention, x)
        handle = attention.w_qkv.register_forward_hook(lambda *args: None)
        assert not attention_step.takes(attention, x)  # the hook would not see w_qkv
        handle.remove()
        flash_chosen(2, 8, 192, 2, path="kernel")  # the compiled kernel chosen here
        assert not attention_step.takes(attention, x)
        width = 320  # 3 x 320 x 320 weights: nn/row_blocks.py's sizes, its paths
        assert 3 * width * width >= MIN_WEIGHT
        large = MultiHeadAttention(width, 2, causal=True, implementation="blocked")
        assert not attention_step.takes(large, torch.randn(2, 8, width))
    assert not attention_step.takes(attention, x)  # float32 products: nn.Linear's
