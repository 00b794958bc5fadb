import torch

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
