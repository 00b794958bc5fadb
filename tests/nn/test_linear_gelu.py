import pytest
import torch
from torch import nn

from tformer.nn import linear_gelu, row_blocks
from tformer.nn.activations import gelu_tanh
from tformer.nn.feedforward import FeedForward


@pytest.mark.parametrize("shape", [(7, 40), (300, 200), (2048, 96)])  # one thread; the pool
def test_the_scaled_gradient_s_column_sums_are_its_rows_summed(compiled, shape):
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=g).bfloat16()
    d = torch.rand(shape, generator=g)
    out, sums = compiled.scale_bf16_column_sums(grad, d)
    assert torch.equal(out, compiled.scale_bf16(grad, d))  # the same values as apart
    assert sums.dtype == torch.float32 and sums.shape == (shape[1],)
    torch.testing.assert_close(sums.double(), out.double().sum(0), rtol=1e-5, atol=1e-5)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the sums are float32 whatever the default
    try:
        assert torch.equal(compiled.scale_bf16_column_sums(grad, d)[1], sums)
    finally:
        torch.set_default_dtype(default)
    with pytest.raises(ValueError, match="scale_bf16_column_sums"):
        compiled.scale_bf16_column_sums(grad.flatten(), d.flatten())
    with pytest.raises(ValueError, match="scale_bf16_column_sums"):
        compiled.scale_bf16_column_sums(grad.t(), d.t())


def test_the_first_layer_and_its_gelu_in_one_step_train_as_the_two_apart(compiled):
    """The same products and the same GELU kernel: output, dx and dW equal to the bit;
    db summed in float32 where the plain path rounds its sum to bf16 first."""
    torch.manual_seed(3)
    layer = nn.Linear(128, 2048)  # as large as nn/row_blocks.py takes: K N >= MIN_WEIGHT
    x = torch.randn(2, 150, 128)
    grad = torch.randn(2, 150, 2048)
    results = []
    for fused in (True, False):
        layer.zero_grad()
        x_ = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear_gelu.takes(layer, x_)
            if fused:
                h = linear_gelu.linear_gelu_tanh(layer, x_)
                assert h.grad_fn.next_functions[0][0].name().startswith("LinearGeluTanh")
            else:
                h = gelu_tanh(row_blocks.linear(layer, x_))
        h.float().backward(grad)
        results.append((h, x_.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    (h, dx, dw, db), (h0, dx0, dw0, db0) = results
    assert h.dtype == torch.bfloat16 and torch.equal(h, h0)
    assert torch.equal(dx, dx0) and torch.equal(dw, dw0)
    assert db.dtype == torch.float32
    torch.testing.assert_close(db, db0, rtol=2**-7, atol=1e-5)
    # against the float64 formula: the float32 sum is the closer of the two
    z = x.double().reshape(-1, 128) @ layer.weight.double().t() + layer.bias.double()
    s = torch.sigmoid(2 * (0.7978845608028654 * (z + 0.044715 * z**3)))
    slope = 0.7978845608028654 * (1 + 3 * 0.044715 * z**2)
    exact = (grad.double().reshape(-1, 2048) * (s + 2 * z * s * (1 - s) * slope)).sum(0)
    assert (db.double() - exact).abs().max() <= (db0.double() - exact).abs().max() * 1.5


def test_the_feed_forward_takes_it_only_where_it_applies(compiled):
    ffn = FeedForward(128, 2048)
    x = torch.randn(1, 300, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_gelu.takes(ffn.w1, x)
        assert not linear_gelu.takes(ffn.w1, x[:, :8])  # too few rows for the row blocks
        with torch.no_grad():
            assert not linear_gelu.takes(ffn.w1, x)
        handle = ffn.w1.register_forward_hook(lambda module, args, out: None)
        assert not linear_gelu.takes(ffn.w1, x)  # the hook must see the layer's output
        handle.remove()
    assert not linear_gelu.takes(ffn.w1, x)  # float32 products: nn.Linear's
    exact = FeedForward(128, 2048, activation="gelu")
    exact.load_state_dict(ffn.state_dict())

    def took_the_step(out):
        """Whether LinearGeluTanh is in out's graph (below fc2's products)."""
        seen, nodes = set(), [out.grad_fn]
        while nodes:
            node = nodes.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node.name().startswith("LinearGeluTanh"):
                return True
            nodes += [next_node for next_node, _ in node.next_functions]
        return False

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ffn(x.requires_grad_())
        other = exact(x)
    assert took_the_step(out) and not took_the_step(other)  # the exact GELU: the plain path
    out.float().sum().backward()  # the fused step inside the module trains
    assert x.grad is not None and ffn.w1.bias.grad is not None
