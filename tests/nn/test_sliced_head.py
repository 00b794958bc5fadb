import pytest
import torch

from tformer import GPT2, GPT2Config
from tformer.nn import measured
from tformer.nn import sliced_head as sliced
from tformer.nn.sliced_head import sliced_head, sliced_head_applies


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(sliced, "VOCAB_SLICE", 16)


def test_sliced_head_equals_the_whole_product_and_its_gradients(small_slices):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(53, 12, generator=g, dtype=torch.float64, requires_grad=True)  # 3 slices + 5
    grad = torch.randn(2, 5, 53, generator=g, dtype=torch.float64)
    out = sliced_head(x, w)
    out.backward(grad)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x_ref, w_ref)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


def test_sliced_head_under_bf16_autocast_matches_linear(small_slices):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 24, generator=g, requires_grad=True)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    grad = torch.randn(7, 40, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sliced_head(x, w)
    out.float().backward(grad)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(x_ref, w_ref)
    ref.float().backward(grad)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert x.grad.dtype == w.grad.dtype == torch.float32
    # the same bf16 products: any difference is the order of a sum, within bf16's rounding
    exact = x.detach().double() @ w.detach().double().t()
    bound = 2 * 2**-8 * (x.detach().abs().double() @ w.detach().abs().double().t()).max()
    assert (out.double() - exact).abs().max() <= bound
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=2**-7 * 8)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=2**-7, atol=0.05)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=2**-7, atol=0.05)


def test_gpt2_training_takes_the_sliced_head_with_the_plain_heads_numbers(monkeypatch):
    config = GPT2Config(vocab_size=50, max_len=16, d_model=16, n_layers=1, n_heads=2)
    model = GPT2(config, seed=0).eval()  # no dropout: both steps see the same function
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad()
        logits = model(ids)
        logits.logsumexp(-1).mean().backward()
        return logits, [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(sliced, "VOCAB_SLICE", 1000)  # too few words to slice
    plain_logits, plain_grads = step()
    assert "SlicedHead" not in plain_logits.grad_fn.name()
    monkeypatch.setattr(sliced, "VOCAB_SLICE", 16)
    asked = []  # where the slices are chosen (as if this CPU had timed them faster)
    monkeypatch.setattr(sliced, "fastest", lambda kind, key, runs: asked.append(key) or "sliced")
    logits, grads = step()
    assert asked == ["18x16x50 torch.float32 torch.float32 autocast None"]
    assert "SlicedHead" in logits.grad_fn.name()
    torch.testing.assert_close(logits, plain_logits, rtol=1e-6, atol=1e-6)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, rtol=1e-5, atol=1e-7)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda *args: seen.append(1))
    assert "SlicedHead" not in model(ids).grad_fn.name()  # a hook sees the module run
    hook.remove()
    assert seen == [1]


def test_slicing_is_timed_against_the_whole_product_once(tmp_path, monkeypatch, small_slices):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path))
    monkeypatch.setattr(measured, "_chosen", {})
    x, w = torch.randn(4, 6, 8), torch.randn(40, 8)
    timed = []
    original = measured._time
    monkeypatch.setattr(
        measured, "_time", lambda runs: timed.append(sorted(runs)) or original(runs)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        choice = sliced_head_applies(x, w)
        assert sliced_head_applies(x, w) == choice  # kept: not timed again
    assert timed == [["sliced", "whole"]]
    key = "24x8x40 torch.float32 torch.float32 autocast torch.bfloat16"
    assert measured._chosen == {("head", key): "sliced" if choice else "whole"}
    assert not sliced_head_applies(x, torch.randn(32, 8))  # two slices or fewer: never
    assert not sliced_head_applies(x.to("meta"), w.to("meta"))  # off the CPU: never
    assert len(timed) == 1
