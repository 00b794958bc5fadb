import math

import pytest
import torch

from tformer.nn import FeedForward


def gelu_tanh_formula(z):
    return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "gelu"])
def test_ffn_matches_formula(activation):
    ffn = FeedForward(d_model=6, d_ff=24, activation=activation).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    w1, b1 = ffn.w1.weight.T, ffn.w1.bias  # (C, d_ff): x W1 + b1
    w2, b2 = ffn.w2.weight.T, ffn.w2.bias
    hidden = x @ w1 + b1
    act = {
        "relu": torch.clamp(hidden, min=0),
        "gelu_tanh": gelu_tanh_formula(hidden),
        "gelu": 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))),
    }[activation]
    expected = act @ w2 + b2
    torch.testing.assert_close(ffn(x), expected, rtol=0, atol=1e-12)


def test_ffn_output_is_not_passed_through_an_activation():
    # FFN(x) = act(x W1 + b1) W2 + b2 can be negative; a stray ReLU around it could not.
    ffn = FeedForward(d_model=8, d_ff=32, activation="relu")
    assert (ffn(torch.randn(64, 8)) < 0).any()


def test_ffn_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        FeedForward(4, 8, activation="swish")
