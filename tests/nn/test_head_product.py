import pytest
import torch

from tformer import GPT2, GPT2Config
from tformer.models import gpt2 as gpt2_module
from tformer.nn import head_product as product
from tformer.nn import measured
from tformer.nn.head_product import forward_path, head_product, plain_head, takes_product
from tformer.nn.row_blocks import onednn_available


@pytest.fixture(params=["whole", "sliced"])
def path(request, monkeypatch):
    """The forward product whole or in slices of 16 words (its path)."""
    monkeypatch.setattr(product, "VOCAB_SLICE", 16)
    return request.param


def test_the_head_product_equals_the_whole_product_and_its_gradients(path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(53, 12, generator=g, dtype=torch.float64, requires_grad=True)  # 3 slices + 5
    grad = torch.randn(2, 5, 53, generator=g, dtype=torch.float64)
    out = head_product(x, w, path=path)
    out.backward(grad)
    assert "HeadProduct" in out.grad_fn.name()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x_ref, w_ref)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


def test_the_head_product_under_bf16_autocast_matches_linear(path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 24, generator=g, requires_grad=True)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    grad = torch.randn(7, 40, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head_product(x, w, path=path)
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


def test_oneDNN_s_float32_head_product_is_the_product_and_its_gradients():
    if not onednn_available(torch.float32):
        pytest.skip("this torch has no oneDNN linear")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 24, generator=g, requires_grad=True)
    w = torch.randn(53, 24, generator=g, requires_grad=True)
    grad = torch.randn(2, 5, 53, generator=g)
    out = head_product(x, w, path="onednn")
    out.backward(grad)
    assert "HeadProduct" in out.grad_fn.name() and out.shape == (2, 5, 53)
    assert out.dtype == torch.float32 and out.is_contiguous()
    # against float64: within float32's rounding of a 24-term sum
    x64, w64, grad64 = x.detach().double(), w.detach().double(), grad.double()
    torch.testing.assert_close(out.double(), x64 @ w64.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), grad64 @ w64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        w.grad.double(), grad64.reshape(10, 53).t() @ x64.reshape(10, 24), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="unknown path 'slices'"):
        head_product(x, w, path="slices")


def test_the_logits_are_a_tensor_of_their_own_and_second_order_gradients_refused(path):
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    logits = head_product(x, w, path=path)
    logits[..., 0] = 0.0  # in place, as nn.Linear's output allows
    logits.div_(2.0)
    (grad_x,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad_x.sum().backward()


def test_autocast_casts_as_for_nn_linear_and_two_dtypes_take_nn_linear(path):
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(40, 8, dtype=torch.float64)
    head = torch.nn.Linear(8, 40, bias=False, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head_product(x, w, path=path)
        reference = torch.nn.functional.linear(x, w)
        assert takes_product(head, x)
        assert not takes_product(head, x.float())  # bf16 against float64: nn.Linear says why
    assert out.dtype == reference.dtype == torch.float64
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert not takes_product(head, x)
    x, w = x.bfloat16(), w.bfloat16()  # any other floating dtype is cast, as nn.Linear's is
    with torch.autocast("cpu", dtype=torch.float16):
        out = head_product(x, w, path=path)
        reference = torch.nn.functional.linear(x, w)
    assert out.dtype == reference.dtype == torch.float16
    torch.testing.assert_close(out, reference, rtol=2**-10, atol=2**-10)


def gpt2_grads(model, ids, dtype):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        logits = model(ids)
    logits.float().logsumexp(-1).mean().backward()
    return logits, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("choice", ["whole", "sliced", "onednn"])
def test_gpt2_training_takes_the_head_product_with_the_plain_heads_numbers(
    dtype, choice, monkeypatch
):
    # float32: where slices or oneDNN's product are faster; bf16: always, the head tied to
    # the embedding by the forward pass's TiedTable (50 words are more than two slices of 16
    # here); oneDNN's is a float32 choice
    if choice == "onednn" and (dtype == "bfloat16" or not onednn_available(torch.float32)):
        pytest.skip("oneDNN's product is a choice for float32 heads, where torch has it")
    config = GPT2Config(vocab_size=50, max_len=16, d_model=16, n_layers=1, n_heads=2)
    model = GPT2(config, seed=0).eval()  # no dropout: every pass sees the same function
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(product, "VOCAB_SLICE", 1000)  # too few words to slice or tie
    plain_logits, plain_grads = gpt2_grads(model, ids, dtype)
    assert "HeadProduct" not in plain_logits.grad_fn.name()
    monkeypatch.setattr(product, "VOCAB_SLICE", 16)
    asked = []  # where the slices are chosen (as if this CPU had timed `choice` faster)

    def chosen(kind, key, names, runs):
        asked.append(key)
        return choice

    monkeypatch.setattr(product, "fastest", chosen)
    tables = []
    make_table = gpt2_module.TiedTable
    monkeypatch.setattr(
        gpt2_module, "TiedTable", lambda w: tables.append(make_table(w)) or tables[-1]
    )
    logits, grads = gpt2_grads(model, ids, dtype)
    assert asked == [f"32x16x50 {dtype}"]  # 18 rows, timed as 32
    taken = dtype == "bfloat16" or choice != "whole"
    assert ("HeadProduct" in logits.grad_fn.name()) == taken
    assert len(tables) == (dtype == "bfloat16")
    if dtype == "bfloat16":
        # against the same products without the table (autograd's dense sum of the head's
        # and the lookup's gradients): only the order of the table's sums differs
        with monkeypatch.context() as m:
            m.setattr(gpt2_module.GPT2, "tied_table", lambda self: None)
            m.setattr(gpt2_module, "forward_path", lambda x, w: "sliced")
            m.setattr(product, "VOCAB_SLICE", 16 if choice == "sliced" else 1000)
            untied_logits, untied_grads = gpt2_grads(model, ids, dtype)
        assert "HeadProduct" in untied_logits.grad_fn.name() and len(tables) == 1
        torch.testing.assert_close(logits, untied_logits, rtol=0, atol=0)
        for grad, untied in zip(grads, untied_grads, strict=True):
            torch.testing.assert_close(grad, untied, rtol=1e-6, atol=1e-8)
    # against nn.Linear's: float32's to its rounding, bf16's within bf16's (the products'
    # order of summing may differ on another CPU)
    rtol, atol = (1e-5, 1e-7) if dtype == "float32" else (2**-7, 1e-4)
    torch.testing.assert_close(logits, plain_logits, rtol=rtol, atol=atol)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, rtol=rtol, atol=atol)
    # a hook on the head, forward or backward, sees the module run (and nothing is timed)
    for register in (
        model.lm_head.register_forward_hook,
        model.lm_head.register_full_backward_hook,
    ):
        seen = []
        hook = register(lambda *args, seen=seen: seen.append(1))
        logits, _ = gpt2_grads(model, ids, dtype)
        hook.remove()
        assert seen == [1]
        assert "HeadProduct" not in logits.grad_fn.name()
    assert len(asked) == 1 and len(tables) == (dtype == "bfloat16")
    assert plain_head(model.lm_head)


def test_slicing_is_timed_against_the_whole_product_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path))
    monkeypatch.setattr(measured, "_chosen", {})
    monkeypatch.setattr(product, "VOCAB_SLICE", 16)
    x, w = torch.randn(4, 6, 8), torch.randn(40, 8)
    timed, original = [], measured._time

    def timing(runs, turns):
        timed.append(sorted(runs))
        return original(runs, turns)

    monkeypatch.setattr(measured, "_time", timing)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        choice = forward_path(x, w)
        assert forward_path(x, w) == choice  # kept: not timed again
        assert forward_path(x[:, :5], w) == choice  # 20 rows: timed as 32 too
    assert timed == [["sliced", "whole"]]  # oneDNN's product is timed for float32 only
    names = ("whole", "sliced", "onednn")
    stored = measured.read_choices(measured.choices_file(product.KIND), names)
    assert stored == {"32x8x40 bfloat16": choice}
    float32 = forward_path(x, w)
    onednn = ["onednn"] if onednn_available(torch.float32) else []
    assert timed[1] == sorted(["sliced", "whole", *onednn])
    stored = measured.read_choices(measured.choices_file(product.KIND), names)
    assert stored == {"32x8x40 bfloat16": choice, "32x8x40 float32": float32}
    assert forward_path(x, torch.randn(32, 8)) == "whole"  # two slices or fewer: never timed
    assert forward_path(x.to("meta"), w.to("meta")) == "whole"  # off the CPU: never timed
    assert len(timed) == 2
