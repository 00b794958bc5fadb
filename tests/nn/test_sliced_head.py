import pytest
import torch

from tformer import GPT2, GPT2Config
from tformer.nn import measured
from tformer.nn import sliced_head as sliced
from tformer.nn.sliced_head import sliced_head, sliced_head_is_faster, takes_slices


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


def test_the_logits_are_a_tensor_of_their_own_and_second_order_gradients_refused(small_slices):
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    logits = sliced_head(x, w)
    logits[..., 0] = 0.0  # in place, as nn.Linear's output allows
    logits.div_(2.0)
    (grad_x,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad_x.sum().backward()


def test_autocast_casts_float32_only(small_slices):
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(40, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sliced_head(x, w)
        reference = torch.nn.functional.linear(x, w)
    assert out.dtype == reference.dtype == torch.float64
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    assert not sliced_head_is_faster(x.float(), w)  # two dtypes: nn.Linear's path says why


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

    def chosen(kind, key, names, runs):
        asked.append(key)
        return "sliced"

    monkeypatch.setattr(sliced, "fastest", chosen)
    logits, grads = step()
    assert asked == ["32x16x50 float32 autocast None"]  # 18 rows, timed as 32
    assert "SlicedHead" in logits.grad_fn.name()
    torch.testing.assert_close(logits, plain_logits, rtol=1e-6, atol=1e-6)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, rtol=1e-5, atol=1e-7)
    # a hook on the head, forward or backward, sees the module run (and nothing is timed)
    for register in (
        model.lm_head.register_forward_hook,
        model.lm_head.register_full_backward_hook,
    ):
        seen = []
        hook = register(lambda *args, seen=seen: seen.append(1))
        model(ids).sum().backward()
        hook.remove()
        assert seen == [1]
    assert len(asked) == 1
    assert takes_slices(model.lm_head)


def test_slicing_is_timed_against_the_whole_product_once(tmp_path, monkeypatch, small_slices):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path))
    monkeypatch.setattr(measured, "_chosen", {})
    x, w = torch.randn(4, 6, 8), torch.randn(40, 8)
    timed, original = [], measured._time

    def timing(runs):
        timed.append(sorted(runs))
        return original(runs)

    monkeypatch.setattr(measured, "_time", timing)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        choice = sliced_head_is_faster(x, w)
        assert sliced_head_is_faster(x, w) == choice  # kept: not timed again
        assert sliced_head_is_faster(x[:, :5], w) == choice  # 20 rows: timed as 32 too
    assert timed == [["sliced", "whole"]]
    key = "32x8x40 float32 autocast bfloat16"
    stored = measured.read_choices(measured.choices_file(sliced.KIND), ("sliced", "whole"))
    assert stored == {key: "sliced" if choice else "whole"}
    assert not sliced_head_is_faster(x, torch.randn(32, 8))  # two slices or fewer: never
    assert not sliced_head_is_faster(x.to("meta"), w.to("meta"))  # off the CPU: never
    assert len(timed) == 1
