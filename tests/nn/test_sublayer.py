import pytest
import torch

from tformer.nn import SublayerConnection


def layer_norm(x, ln):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


@pytest.fixture
def x():
    return torch.randn(2, 5, 8) * 3 + 1


def sublayer(h):
    return torch.tanh(h) * 2 + 0.5  # any F


def connection(norm_position, residual=True):
    c = SublayerConnection(8, norm_position, residual, dropout=0.0)
    if c.norm is not None:
        torch.nn.init.normal_(c.norm.weight)
        torch.nn.init.normal_(c.norm.bias)
    return c


def test_pre_ln_normalises_the_sublayer_input_only(x):
    c = connection("pre")
    torch.testing.assert_close(c(x, sublayer), x + sublayer(layer_norm(x, c.norm)))


def test_post_ln_normalises_after_residual(x):
    c = connection("post")
    out = c(x, sublayer)
    torch.testing.assert_close(out, layer_norm(x + sublayer(x), c.norm))
    # and it is not the pre-LN form that some write-ups call post-LN
    assert not torch.allclose(out, x + sublayer(layer_norm(x, c.norm)))


def test_post_ln_output_is_normalised():
    c = SublayerConnection(8, "post")  # gamma = 1, beta = 0
    out = c(torch.randn(4, 8) * 10, sublayer)
    torch.testing.assert_close(out.mean(-1), torch.zeros(4), rtol=0, atol=1e-5)


def test_no_norm_is_plain_residual(x):
    c = connection("none")
    assert c.norm is None
    torch.testing.assert_close(c(x, sublayer), x + sublayer(x))


@pytest.mark.parametrize(
    "norm_position, expected",
    [
        ("pre", lambda x, c: sublayer(layer_norm(x, c.norm))),
        ("post", lambda x, c: layer_norm(sublayer(x), c.norm)),
        ("none", lambda x, c: sublayer(x)),
    ],
)
def test_residual_off_drops_the_skip_path(x, norm_position, expected):
    c = connection(norm_position, residual=False)
    torch.testing.assert_close(c(x, sublayer), expected(x, c))


def test_dropout_applies_to_sublayer_output_in_training_only(x):
    c = SublayerConnection(8, "none", dropout=0.5)
    c.train()
    out = c(x, sublayer)
    dropped = (out == x).float().mean()  # positions where F's output was zeroed
    assert 0.3 < dropped < 0.7
    c.eval()
    torch.testing.assert_close(c(x, sublayer), x + sublayer(x))


def test_unknown_norm_position_is_rejected():
    with pytest.raises(ValueError, match="unknown norm position"):
        SublayerConnection(8, "middle")


def test_a_final_norm_closes_only_a_pre_ln_stack():
    from tformer.nn import LayerNorm
    from tformer.nn.sublayer import NORM_POSITIONS, final_norm

    assert NORM_POSITIONS == ("pre", "post", "none")
    assert isinstance(final_norm(8, "pre", 1e-3), LayerNorm)
    assert final_norm(8, "pre", 1e-3).eps == 1e-3
    for position in ("post", "none"):
        assert isinstance(final_norm(8, position), torch.nn.Identity)
    with pytest.raises(ValueError, match="unknown norm position 'sandwich'"):
        final_norm(8, "sandwich")
    with pytest.raises(ValueError, match="unknown norm position"):
        SublayerConnection(8, "sandwich")
