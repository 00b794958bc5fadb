import pytest
import torch

from tformer.nn import measured, small_products
from tformer.nn.row_blocks import bias_product


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Choices timed afresh, kept in a cache of the test's own."""
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path))
    monkeypatch.setattr(measured, "_chosen", {})
    monkeypatch.setattr(small_products, "_chosen", {})
    return tmp_path


def record_calls(compiled, monkeypatch) -> list[str]:
    """The names of kernels/products.c's functions, as they are called."""
    calls = []
    for name in ("product_bf16", "weight_gradient_bf16"):
        original = getattr(type(compiled), name)

        def counted(self, *args, name=name, original=original, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(type(compiled), name, counted)
    return calls


def test_a_layer_s_products_are_timed_here_once_then_read_from_the_cache(
    private_cache, compiled, monkeypatch
):
    """A layer's three products are timed together on both paths for its shape (M rounded
    up as a layer's tokens are), kept, and not timed again; products.c runs only where
    chosen."""
    if not compiled.products_available():
        pytest.skip("kernels/products.c needs a CPU with AVX-512 BF16")
    calls = record_calls(compiled, monkeypatch)
    path = small_products.chosen(100, 32, 48)
    assert path in small_products.PATHS
    assert calls.count("product_bf16") > 0 and calls.count("weight_gradient_bf16") > 0
    stored = measured.read_cached_json(measured.choices_file(small_products.KIND))
    assert stored == {"256x32x48 bfloat16": path}
    calls.clear()
    monkeypatch.setattr(small_products, "_chosen", {})
    monkeypatch.setattr(measured, "_chosen", {})  # a new process: read from the file
    assert small_products.chosen(120, 32, 48) == path and calls == []
    g = torch.Generator().manual_seed(0)
    x, w, b, dy = (
        torch.randn(s, generator=g).bfloat16() for s in ((120, 32), (48, 32), (48,), (120, 48))
    )
    small_products.linear(x, w, b), small_products.input_gradient(dy, w)
    small_products.weight_gradient(dy, x)
    rows = ["product_bf16", "product_bf16", "weight_gradient_bf16"]
    assert calls == (rows if path == "rows" else [])


def test_without_the_kernel_torch_s_products_untimed(private_cache, compiled, monkeypatch):
    monkeypatch.setattr(type(compiled), "products_available", lambda self: False)
    calls = record_calls(compiled, monkeypatch)
    assert small_products.chosen(64, 16, 16) == "torch"
    assert calls == [] and not (private_cache / "kernels").exists()


@pytest.mark.parametrize("path", ["torch", "rows"])
def test_the_three_products_on_either_path(compiled, monkeypatch, path):
    """linear, input_gradient and weight_gradient compute x w^T + b, dy w and dy^T x: the
    first two torch's own bf16 values within a rounding, the third float32 on products.c's
    path (bf16 on torch's), each within its rounding of float64."""
    if path == "rows" and not compiled.products_available():
        pytest.skip("kernels/products.c needs a CPU with AVX-512 BF16")
    monkeypatch.setattr(small_products, "chosen", lambda *shape: path)
    g = torch.Generator().manual_seed(0)
    x, w, b, dy = (
        torch.randn(s, generator=g).bfloat16() for s in ((60, 24), (40, 24), (40,), (60, 40))
    )
    torch.testing.assert_close(small_products.linear(x, w, b), bias_product(x, w, b))
    torch.testing.assert_close(small_products.input_gradient(dy, w), dy.mm(w))
    dw = small_products.weight_gradient(dy, x)
    assert dw.dtype == (torch.float32 if path == "rows" else torch.bfloat16)
    exact = dy.double().t() @ x.double()
    rounding = 2**-8 if path == "torch" else 1e-6
    torch.testing.assert_close(dw.double(), exact, rtol=rounding, atol=1e-5)
