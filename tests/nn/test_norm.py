import pytest
import torch

from tformer import kernels
from tformer.nn import LayerNorm


def layer_norm_formula(x, gamma, beta, eps):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance, as in the paper
    return (x - mean) / torch.sqrt(var + eps) * gamma + beta


def test_layer_norm_matches_formula_and_torch_module():
    ln = LayerNorm(16, eps=1e-5)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 4 + 2
    ln = ln.double()
    torch.testing.assert_close(
        ln(x), layer_norm_formula(x, ln.weight, ln.bias, 1e-5), rtol=0, atol=1e-12
    )
    ref = torch.nn.LayerNorm(16, eps=1e-5).double()
    ref.load_state_dict(ln.state_dict())
    torch.testing.assert_close(ln(x), ref(x), rtol=0, atol=1e-12)


def test_layer_norm_starts_as_pure_normalisation():
    ln = LayerNorm(8)
    y = ln(torch.randn(100, 8) * 3 + 1)
    torch.testing.assert_close(y.mean(-1), torch.zeros(100), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(100), rtol=0, atol=1e-3)


def test_layer_norm_gamma_beta_are_applied_per_channel():
    ln = LayerNorm(4)
    ln.weight.data = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ln.bias.data = torch.tensor([0.0, 1.0, 0.0, -1.0])
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    normalised = layer_norm_formula(x, torch.ones(4), torch.zeros(4), 1e-5)
    torch.testing.assert_close(ln(x), normalised * ln.weight + ln.bias)


def bf16_out_case(shape, seed=0):
    """A LayerNorm with random gamma and beta, its input (a leaf) and a bf16 gradient."""
    g = torch.Generator().manual_seed(seed)
    ln = LayerNorm(shape[-1])
    with torch.no_grad():
        ln.weight.copy_(torch.randn(shape[-1], generator=g))
        ln.bias.copy_(torch.randn(shape[-1], generator=g))
    x = (torch.randn(shape, generator=g) * 3 + 1).requires_grad_()
    grad = torch.randn(shape, generator=g).bfloat16()
    return ln, x, grad


@pytest.mark.skipif(kernels.load() is None, reason="the compiled kernels are not built here")
@pytest.mark.parametrize("shape", [(12, 64, 128), (3, 5, 384), (1, 1, 768), (2, 7, 100)])
def test_a_norm_that_feeds_matmuls_writes_bf16_under_autocast_as_torch_would_cast_it(shape):
    """Under CPU bf16 autocast the kernel writes what autocast's cast of torch's float32
    norm gives, to one bf16 rounding step; its gradients are float32 and equal the float64
    formula's to float32 rounding (the gradient itself comes in bf16, as the product's)."""
    ln, x, grad = bf16_out_case(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x, feeds_matmul=True)
        expected = ln(x.detach()).bfloat16()  # torch's norm, then the cast a product makes
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    # one bf16 step (8 significant bits), and where y cancels (xhat gamma against beta) what
    # float32 sums in another order may move: a little above float32's 2^-24 of the terms
    terms = (ln.weight * (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)).abs()
    terms = (terms + ln.bias.abs()).detach()
    allowed = expected.float().abs() * 2.0**-7 + terms * 2.0**-20
    assert ((y.float() - expected.float()).abs() <= allowed).all()
    y.backward(grad)
    exact = x.detach().double().requires_grad_()
    weight, bias = (p.detach().double().requires_grad_() for p in (ln.weight, ln.bias))
    formula = layer_norm_formula(exact, weight, bias, ln.eps)
    formula.backward(grad.double())
    for ours, truth in (
        (x.grad, exact.grad),
        (ln.weight.grad, weight.grad),
        (ln.bias.grad, bias.grad),
    ):
        assert ours.dtype == torch.float32
        scale = truth.abs().max()
        torch.testing.assert_close(ours.double() / scale, truth / scale, rtol=0, atol=1e-5)


@pytest.mark.skipif(kernels.load() is None, reason="the compiled kernels are not built here")
def test_a_norm_writes_bf16_only_under_bf16_autocast_and_for_matmuls():
    ln, x, _ = bf16_out_case((2, 3, 16))
    assert ln(x, feeds_matmul=True).dtype == torch.float32  # no autocast: the plain norm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ln(x).dtype == torch.float32  # it may feed anything


@pytest.mark.skipif(kernels.load() is None, reason="the compiled kernels are not built here")
def test_a_frozen_norm_that_feeds_matmuls_gives_its_input_a_gradient_only():
    ln, x, grad = bf16_out_case((4, 32))
    ln.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x, feeds_matmul=True)
    y.backward(grad)
    assert x.grad is not None and ln.weight.grad is None and ln.bias.grad is None


@pytest.mark.skipif(kernels.load() is None, reason="the compiled kernels are not built here")
def test_the_bf16_norm_kernel_checks_what_it_is_given():
    library = kernels.load()
    x, gamma = torch.randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match="gamma must be float32"):
        library.layer_norm_bf16_out(x, gamma[:4], gamma, 1e-5)
    with pytest.raises(ValueError, match="x must be float32"):
        library.layer_norm_bf16_out(x.bfloat16(), gamma, gamma, 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        library.layer_norm_bf16_out(torch.randn(8, 4).t(), gamma, gamma, 1e-5)
    y, mean, rstd = library.layer_norm_bf16_out(x, gamma, gamma, 1e-5)
    with pytest.raises(ValueError, match="dy must be contiguous bfloat16"):
        library.layer_norm_backward_bf16(y.float(), x, mean, rstd, gamma)
    with pytest.raises(ValueError, match="rstd must be contiguous float32"):
        library.layer_norm_backward_bf16(y, x, mean, rstd[:2], gamma)
    with pytest.raises(ValueError, match="mean must be contiguous float32"):
        library.layer_norm_backward_bf16(y, x, torch.randn(8)[::2], rstd, gamma)


@pytest.mark.skipif(kernels.load() is None, reason="the compiled kernels are not built here")
def test_the_bf16_norm_backward_of_a_large_constant_row_is_finite():
    """A row of 20 equal values near float32's range (mean x r beyond it): xhat is 0, so dx
    is r (g - mean(g)); the lanes past the row's end take no part in its sums."""
    library = kernels.load()
    x = torch.full((2, 20), 2.0**120)  # exact sums; mean x r = 4.2e38
    gamma, beta = torch.ones(20), torch.zeros(20)
    _, mean, rstd = library.layer_norm_bf16_out(x, gamma, beta, 1e-5)
    dy = torch.randn(2, 20, generator=torch.Generator().manual_seed(0)).bfloat16()
    dx, dgamma, dbeta = library.layer_norm_backward_bf16(dy, x, mean, rstd, gamma)
    g = dy.double()
    expected = rstd.double()[:, None] * (g - g.mean(-1, keepdim=True))
    torch.testing.assert_close(dx.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(dgamma, torch.zeros(20)) and torch.isfinite(dbeta).all()


@pytest.mark.skipif(kernels.load() is None, reason="the compiled kernels are not built here")
def test_the_bf16_norm_keeps_a_nan_a_nan_and_takes_empty_rows():
    """A diverging run's NaN stays NaN (the trainer stops on it), not an infinity or -0."""
    library = kernels.load()
    x = torch.randn(3, 16)
    x[1, 4] = float("nan")
    y, _, _ = library.layer_norm_bf16_out(x, torch.ones(16), torch.zeros(16), 1e-5)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()
    empty = torch.zeros(0, 16)
    y, mean, rstd = library.layer_norm_bf16_out(empty, torch.ones(16), torch.zeros(16), 1e-5)
    dx, dgamma, dbeta = library.layer_norm_backward_bf16(y, empty, mean, rstd, torch.ones(16))
    assert dx.shape == (0, 16) and torch.equal(dgamma, torch.zeros(16))


@pytest.mark.skipif(kernels.load() is None, reason="the compiled kernels are not built here")
@pytest.mark.parametrize("shape", [(3, 5, 40), (12, 64, 128), (4, 256, 384)])  # 1 thread; pool
def test_the_residual_add_and_the_next_norm_in_one_step_are_the_two_apart(shape):
    """h = x + y and its bf16 norm, forward and backward, to the bit what the add and the
    norm give apart: the same float32 sum, the same kernel on it; backwards the norm's
    gradient and the residual path's added in float32 and cast to y's bf16 once."""
    from tformer.nn.norm import add_then_norm

    ln, x, grad = bf16_out_case(shape)
    y = torch.randn(shape, generator=torch.Generator().manual_seed(9)).bfloat16()
    grad_h = torch.randn(shape, generator=torch.Generator().manual_seed(10))
    results = []
    for joined in (True, False):
        ln.zero_grad()
        x_, y_ = x.detach().clone().requires_grad_(), y.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if joined:
                h, normed = add_then_norm(x_, y_, ln)
            else:
                h = x_ + y_
                normed = ln(h, feeds_matmul=True)
        torch.autograd.backward([h, normed], [grad_h, grad.bfloat16()])
        results.append((h, normed, x_.grad, y_.grad, ln.weight.grad.clone(), ln.bias.grad.clone()))
    for ours, theirs in zip(*results, strict=True):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    h, normed = results[0][:2]
    assert h.dtype == torch.float32 and normed.dtype == torch.bfloat16 and h._base is None


@pytest.mark.skipif(kernels.load() is None, reason="the compiled kernels are not built here")
@pytest.mark.parametrize("n", [7, 768])  # 1 thread; pool
def test_the_joined_backward_writes_its_bf16_gradient_only_where_asked(n):
    library = kernels.load()
    g = torch.Generator().manual_seed(n)
    x, gamma = torch.randn(n, 128, generator=g), torch.randn(128, generator=g)
    _, _, mean, rstd = library.add_layer_norm_bf16_out(
        x, torch.zeros(n, 128, dtype=torch.bfloat16), gamma, torch.zeros(128), 1e-5
    )
    dy, dh = torch.randn(n, 128, generator=g).bfloat16(), torch.randn(n, 128, generator=g)
    both = library.add_layer_norm_backward_bf16(dy, dh, x, mean, rstd, gamma)
    alone = library.add_layer_norm_backward_bf16(dy, dh, x, mean, rstd, gamma, bf16_too=False)
    assert alone[1] is None and torch.equal(both[1], both[0].bfloat16())
    for i in (0, 2, 3):  # dx, dgamma, dbeta
        assert torch.equal(both[i], alone[i])
    # dx is the norm's gradient plus dh's, as the plain kernel's plus dh
    dx, dgamma, dbeta = library.layer_norm_backward_bf16(dy, x, mean, rstd, gamma)
    assert torch.equal(alone[0], dx + dh) and torch.equal(alone[2], dgamma)


@pytest.mark.skipif(kernels.load() is None, reason="the compiled kernels are not built here")
def test_the_joined_step_is_taken_only_where_it_applies():
    from tformer.nn.norm import add_then_norm

    ln, x, _ = bf16_out_case((2, 3, 16))
    y = torch.randn(2, 3, 16).bfloat16()
    assert add_then_norm(x, y, ln) is None  # not under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert add_then_norm(x, y.float(), ln) is None  # a float32 sublayer output
        assert add_then_norm(x, y[:, :1], ln) is None  # a broadcast
        assert add_then_norm(x, y, ln) is not None
    library = kernels.load()
    with pytest.raises(ValueError, match="add must be contiguous bfloat16"):
        library.add_layer_norm_bf16_out(
            x.reshape(6, 16), y.reshape(6, 16).float(), ln.weight, ln.bias, 1e-5
        )
