"""The causal softmax kernel (kernels/softmax.c) against float64, torch's masked softmax and
its backward kernel, and blocked attention taking it (nn/causal_softmax.py)."""

import math

import pytest
import torch

from tformer.nn import blocked_attention, causal_softmax
from tformer.nn.blocked_attention import blocked_causal_attention
from tformer.nn.causal_softmax import masked_softmax, softmax_kernels

BLOCKS = [(1, 0), (5, 0), (7, 9), (16, 16), (33, 0), (128, 0), (37, 219), (128, 896)]


def block_scores(batch: int, n: int, first: int, seed: int = 0, scale: float = 3.0):
    """bf16 scores (batch, n, first + n) of queries first, ..., first + n - 1."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n, first + n, generator=g) * scale).to(torch.bfloat16)


def visible_keys(n: int, first: int) -> torch.Tensor:
    """(n, first + n): True where query first + r may see key j."""
    return torch.arange(first + n)[None, :] <= first + torch.arange(n)[:, None]


@pytest.mark.parametrize(("n", "first"), BLOCKS)
def test_the_softmax_is_float64_s_rounded_once(compiled, n, first):
    scores = block_scores(3, n, first)
    visible = visible_keys(n, first)
    expected = torch.softmax(scores.double().masked_fill(~visible, -math.inf), dim=-1)
    ours = compiled.causal_softmax(scores.clone(), first)
    assert ours.dtype == torch.bfloat16
    assert not ours.masked_select(~visible).any()  # the hidden keys' weights 0
    # rounded once to bf16 (8 significant bits): within half a unit of float64's, at most
    # 2^-8 of the value
    torch.testing.assert_close(ours.double(), expected, rtol=2**-8, atol=1e-7)
    theirs = masked_softmax(scores.clone(), first)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=2**-7, atol=1e-7)


@pytest.mark.parametrize(("n", "first"), BLOCKS)
def test_the_gradient_is_the_formula_s_in_float64(compiled, n, first):
    weights = compiled.causal_softmax(block_scores(2, n, first), first)
    grad = block_scores(2, n, first, seed=1, scale=1.0)
    ours = compiled.causal_softmax_backward(weights, grad.clone(), first)
    p, d = weights.double(), grad.double()
    expected = p * (d - (p * d).sum(dim=-1, keepdim=True))
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), expected, rtol=2**-8, atol=1e-6)
    theirs = torch._softmax_backward_data(grad, weights, -1, torch.bfloat16)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=2**-7, atol=1e-6)
    assert not ours.masked_select(~visible_keys(n, first)).any()


def test_a_nan_or_infinite_score_makes_its_row_nan_and_no_other(compiled):
    scores = block_scores(1, 4, 4)
    scores[0, 0, 1] = math.nan  # query 4 sees key 1
    scores[0, 1, 3] = math.inf  # query 5 sees key 3
    scores[0, 2, :7] = -math.inf  # query 6 sees no finite score
    ours = compiled.causal_softmax(scores.clone(), 4)
    theirs = masked_softmax(scores.clone(), 4)
    for row in range(3):  # NaN over what the query sees, as torch's
        assert ours[0, row, : 5 + row].isnan().all() and theirs[0, row].isnan().all()
        assert not ours[0, row, 5 + row :].any()
    torch.testing.assert_close(ours[0, 3].float(), theirs[0, 3].float(), rtol=2**-7, atol=0)


def test_the_kernels_refuse_what_they_cannot_take(compiled):
    weights = compiled.causal_softmax(block_scores(2, 4, 4), 4)
    with pytest.raises(ValueError, match="causal_softmax: scores must be contiguous bfloat16"):
        compiled.causal_softmax(torch.randn(2, 4, 8), 4)
    with pytest.raises(ValueError, match="contiguous"):
        compiled.causal_softmax(block_scores(2, 4, 12)[..., ::2], 4)
    with pytest.raises(ValueError, match="queries 5..8 need 9 keys, got 8"):
        compiled.causal_softmax(block_scores(2, 4, 4), 5)
    with pytest.raises(ValueError, match="queries 3..6 need 7 keys, got 8"):
        compiled.causal_softmax(block_scores(2, 4, 4), 3)
    with pytest.raises(ValueError, match="causal_softmax_backward: grad must be"):
        compiled.causal_softmax_backward(weights, torch.randn(2, 4, 8), 4)
    with pytest.raises(ValueError, match="causal_softmax_backward: grad must be"):
        compiled.causal_softmax_backward(weights, block_scores(2, 4, 5), 4)


class Counted:
    """The kernels, counting the calls of the two softmax functions."""

    def __init__(self, library):
        self.library, self.calls = library, {"forward": 0, "backward": 0}

    def causal_softmax(self, scores, first):
        self.calls["forward"] += 1
        return self.library.causal_softmax(scores, first)

    def causal_softmax_backward(self, weights, grad, first):
        self.calls["backward"] += 1
        return self.library.causal_softmax_backward(weights, grad, first)


def take_the_kernel(monkeypatch, library) -> None:
    """Blocked attention takes the softmax kernel (library, or None for torch's path)."""
    monkeypatch.setattr(blocked_attention, "softmax_kernels", lambda q, block: library)


@pytest.mark.parametrize("block", [1, 3, 4, 10])
def test_blocked_attention_taking_the_kernel_is_float64_s_to_bf16_rounding(
    compiled, monkeypatch, block
):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    grad = torch.randn(2, 3, 10, 8, generator=g)
    mask = visible_keys(10, 0)
    reference = [t.double().requires_grad_() for t in (q, k, v)]
    scores = reference[0] @ reference[1].transpose(-2, -1) / math.sqrt(8)
    expected = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1) @ reference[2]
    expected_grads = torch.autograd.grad(expected, reference, grad.double())
    results = {}
    for path in ("kernel", "torch"):
        counted = Counted(compiled)
        chosen = counted if path == "kernel" else None
        take_the_kernel(monkeypatch, chosen)
        inputs = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        out = blocked_causal_attention(*inputs, block=block)
        grads = torch.autograd.grad(out, inputs, grad.to(torch.bfloat16))
        blocks = -(-10 // block)
        expected_calls = blocks if path == "kernel" else 0
        assert counted.calls == {"forward": expected_calls, "backward": expected_calls}
        results[path] = [out, *grads]
    for ours, theirs, exact in zip(
        results["kernel"], results["torch"], [expected, *expected_grads], strict=True
    ):
        scale = exact.abs().max()
        error, torch_error = ((t.double() - exact).abs().max() / scale for t in (ours, theirs))
        assert error < 2e-2 and error < 2 * torch_error + 2e-3


def test_with_dropout_the_kernel_gives_torch_s_path(compiled, monkeypatch):
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in torch.randn(3, 2, 3, 10, 8))
    grad = torch.randn(2, 3, 10, 8).to(torch.bfloat16)
    results = []
    for library in (compiled, None):
        take_the_kernel(monkeypatch, library)
        torch.manual_seed(0)  # the same dropout masks
        out = blocked_causal_attention(q, k, v, None, 0.3, block=4)
        results.append([out, *torch.autograd.grad(out, (q, k, v), grad)])
    for ours, theirs in zip(*results, strict=True):
        scale = theirs.abs().max()
        torch.testing.assert_close(ours / scale, theirs / scale, rtol=0, atol=2e-2)


def test_its_gradient_is_first_order_only(compiled, monkeypatch):
    take_the_kernel(monkeypatch, compiled)
    q, k, v, grad = (t.to(torch.bfloat16).requires_grad_() for t in torch.randn(4, 1, 1, 6, 4))
    out = blocked_causal_attention(q, k, v, block=3)
    (grad_q,) = torch.autograd.grad(out, q, grad, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad_q.sum().backward()  # its gradient with respect to grad: refused, not wrong


def test_the_kernel_is_timed_only_for_bf16_on_the_cpu(compiled, monkeypatch):
    from tformer.nn import measured

    store = measured.choices_file(causal_softmax.KIND)
    q = torch.randn(1, 2, 300, 8)
    assert softmax_kernels(q, 128) is None  # float32: torch's path, not timed
    assert softmax_kernels(q.to("meta", torch.bfloat16), 128) is None  # not on the CPU
    assert not store.exists()
    chosen = softmax_kernels(q.bfloat16(), 128)  # timed here: both ways run
    assert store.exists() and chosen in (compiled, None)
    assert softmax_kernels(q[0].bfloat16(), 128) is chosen  # (H, T, D): the same rows
    for name, library in (("kernel", compiled), ("torch", None)):
        monkeypatch.setattr(causal_softmax, "fastest", lambda *args, name=name: name)
        assert softmax_kernels(q.bfloat16(), 128) is library
