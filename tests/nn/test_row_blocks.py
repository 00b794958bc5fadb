import pytest
import torch
from torch import nn

from tformer import kernels
from tformer.nn import measured
from tformer.nn import row_blocks as rb
from tformer.nn.row_blocks import RowBlockLinear, fastest_path, linear, matmul


def operands(m, k, n, dtype, a_layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g)
    a = (a.t().contiguous().t() if a_layout == "t" else a).to(dtype)  # same values, transposed
    return a, torch.randn(k, n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)


def force(monkeypatch, path):
    monkeypatch.setattr(rb, "fastest_path", lambda a, b: path)


@pytest.mark.parametrize("path", ["whole", "halves", "copied"])
@pytest.mark.parametrize("a_layout", ["n", "t"])
def test_every_path_is_the_product_to_its_summing_order(monkeypatch, path, a_layout):
    """Each element sums the same k products on every path: float64 agrees to rounding, and
    bf16 to the order of the float32 sum (far inside one bf16 step)."""
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.bfloat16, 2**-8)):
        a, b, bias = operands(512, 48, 40, dtype, a_layout)
        force(monkeypatch, path)
        expected = (a.double() @ b.double() + bias.double()).to(dtype)
        for with_bias in (False, True):
            out = matmul(a, b, bias if with_bias else None)
            reference = expected if with_bias else (a.double() @ b.double()).to(dtype)
            assert out.shape == (512, 40) and out.dtype == dtype and out.is_contiguous()
            torch.testing.assert_close(
                out.double(), reference.double(), rtol=tolerance, atol=tolerance
            )


def onednn_or_skip():
    if not rb.onednn_available(torch.float32):
        pytest.skip("this torch has no oneDNN linear for float32")


@pytest.mark.parametrize("b_layout", ["n", "t"])
@pytest.mark.parametrize("a_layout", ["n", "t"])
def test_onednn_s_path_is_the_float32_product_to_its_rounding(monkeypatch, a_layout, b_layout):
    """oneDNN's float32 product, each operand read where it lies: within the float32 bound
    of a k-term sum of float64's, with and without a bias, and into `out` when given."""
    onednn_or_skip()
    a, b, bias = operands(300, 96, 40, torch.float32, a_layout)
    b = b.t().contiguous().t() if b_layout == "t" else b
    force(monkeypatch, "onednn")
    magnitude = a.double().abs() @ b.double().abs() + bias.double().abs()
    bound = 96 * 2**-24 * magnitude  # the float32 sums' worst case, elementwise
    for with_bias in (False, True):
        exact = a.double() @ b.double() + (bias.double() if with_bias else 0)
        out = matmul(a, b, bias if with_bias else None)
        assert out.shape == (300, 40) and out.dtype == torch.float32 and out.is_contiguous()
        assert ((out.double() - exact).abs() <= bound).all()
        into = torch.empty(300, 40)
        assert matmul(a, b, bias if with_bias else None, out=into) is into
        assert torch.equal(into, out)


def test_onednn_s_path_is_offered_for_float32_products_only(monkeypatch):
    onednn_or_skip()
    offered = []

    def timing(candidates, turns):
        offered.append(sorted(candidates))
        return "whole"

    monkeypatch.setattr(measured, "_time", timing)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        a, b, _ = operands(512, 32, 16, dtype, "t")
        assert fastest_path(a, b) == "whole"
    assert offered == [
        ["copied", "halves", "onednn", "whole"],
        ["copied", "halves", "whole"],
        ["copied", "halves", "whole"],
    ]


def test_too_few_rows_never_time_a_split(monkeypatch):
    monkeypatch.setattr(rb, "fastest_path", lambda a, b: pytest.fail("timed"))
    a, b, _ = operands(rb.MIN_ROWS - 2, 8, 8, torch.bfloat16, "n")
    torch.testing.assert_close(matmul(a, b), a @ b)


def test_the_path_is_timed_once_per_shape_layout_and_dtype(monkeypatch):
    a, b, _ = operands(512, 32, 16, torch.bfloat16, "t")
    chosen = fastest_path(a, b)
    assert chosen in ("whole", "halves", "copied")
    names = ("whole", "halves", "copied")
    known = measured.read_choices(measured.choices_file(rb.KIND), names)
    assert known == {"512x256x16 tn bfloat16": chosen}  # M and K rounded up to KEY_STEP
    # another batch length in the same step of KEY_STEP: the same choice, not timed again
    monkeypatch.setattr(measured, "_time", lambda candidates, turns: pytest.fail("timed again"))
    assert fastest_path(*operands(500, 40, 16, torch.bfloat16, "t")[:2]) == chosen


def test_keys_round_token_counts_up_to_few_sizes():
    """Up to KEY_STEPS steps a multiple of KEY_STEP; above, less than half again the size,
    two keys in each doubling: a model trained on many batch lengths times few shapes. A
    layer's width keeps its multiple of KEY_STEP, on whichever side of the product."""
    small = rb.KEY_STEP * rb.KEY_STEPS
    for size in range(1, 40_000):
        key = rb.round_tokens(size)
        assert key >= size and key % rb.KEY_STEP == 0
        assert key - size < rb.KEY_STEP if size <= small else key < 1.5 * size
    rounded = {rb.round_tokens(size) for size in range(small + 1, 2 * small + 1)}
    assert rounded == {1.5 * small, 2 * small}
    # batches of 600 to 6,400 tokens: 8 keys (23 at one step of 256)
    assert len({rb.round_tokens(size) for size in range(600, 6401)}) == 8
    tokens = torch.zeros(2049, 1280)  # x (M, K) or dy (M, N): the rows are tokens
    assert rb.key_sizes(tokens) == (3072, 1280)
    assert rb.key_sizes(tokens.t()) == (1280, 3072)  # x^T or dy^T: the columns are


@pytest.mark.parametrize("path", ["whole", "halves", "copied"])
def test_row_block_linear_trains_as_nn_linear_under_bf16_autocast(monkeypatch, path):
    """Output and the gradients of x, W and b, against nn.Linear's own bf16 autocast path:
    the same bf16 products, in the same dtypes (the gradients cast back to float32)."""
    force(monkeypatch, path)
    g = torch.Generator().manual_seed(1)
    layer = nn.Linear(96, 272)  # N >= MIN_ROWS: dW's product may take a path of its own
    x = torch.randn(2, 300, 96, generator=g)
    grad = torch.randn(2, 300, 272, generator=g)
    results = []

    def ours(x_):
        return RowBlockLinear.apply(x_.view(-1, 96), layer.weight, layer.bias).view(2, 300, 272)

    for run in (ours, layer):
        layer.zero_grad()
        x_ = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(x_)
        out.float().backward(grad)
        results.append((out, x_.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    for ours, theirs in zip(*results, strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        scale = theirs.abs().max()
        torch.testing.assert_close(ours / scale, theirs / scale, rtol=0, atol=2**-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_bias_added_by_onednn_s_product_is_addmm_s_result(monkeypatch, dtype):
    if not rb.onednn_available(dtype):
        pytest.skip("this torch has no oneDNN linear with a fused bias")
    g = torch.Generator().manual_seed(2)
    a = torch.randn(300, 96, generator=g).to(dtype)
    weight = torch.randn(72, 96, generator=g).to(dtype)
    bias = torch.randn(72, generator=g).to(dtype)
    fused = rb.onednn_product(a, weight.t(), bias)
    assert fused.shape == (300, 72) and fused.is_contiguous() and fused._base is None
    assert torch.equal(fused, torch.addmm(bias, a, weight.t()))
    # matmul takes it where it was timed faster, once per shape
    monkeypatch.setattr(rb, "bias_fused_faster", lambda a, b, bias, path: True)
    assert torch.equal(matmul(a, weight.t(), bias), fused)


def test_the_fused_bias_is_timed_once_and_only_for_the_operands_it_takes(monkeypatch):
    if not rb.onednn_available(torch.bfloat16):
        pytest.skip("this torch has no oneDNN linear with a fused bias")
    a, b, bias = operands(512, 32, 16, torch.bfloat16, "n")
    weight = b.t().contiguous()
    chosen = rb.bias_fused_faster(a, weight.t(), bias, "whole")
    known = measured.read_choices(measured.choices_file(rb.KIND), ("whole", "fused"))
    assert known == {"512x256x16 nt bfloat16 bias, else whole": "fused" if chosen else "whole"}
    monkeypatch.setattr(measured, "_time", lambda candidates, turns: pytest.fail("timed again"))
    assert rb.bias_fused_faster(a[:500], weight.t(), bias, "whole") == chosen
    # a b that is not a transposed weight, a strided a, a bias of another dtype: addmm's
    assert not rb.bias_fused_faster(a, b, bias, "whole")
    assert not rb.bias_fused_faster(a[:, ::2], weight[:, ::2].t(), bias, "whole")
    assert not rb.bias_fused_faster(a, weight.t(), bias.float(), "whole")


def test_a_small_layer_s_fused_bias_is_timed_at_its_own_width(monkeypatch):
    if not rb.onednn_available(torch.bfloat16):
        pytest.skip("this torch has no oneDNN linear with a fused bias")
    a, b, bias = operands(512, 32, 16, torch.bfloat16, "n")
    weight = b.t().contiguous()
    chosen = rb.bias_fused_faster(a, weight.t(), bias, "whole", exact_width=True)
    known = measured.read_choices(measured.choices_file(rb.KIND), ("whole", "fused"))
    assert set(known) == {"512x32x16 nt bfloat16 bias, else whole"}  # not K rounded to 256
    # the tokens are rounded as for any layer: another batch length is not timed again
    monkeypatch.setattr(measured, "_time", lambda candidates, turns: pytest.fail("timed again"))
    assert rb.bias_fused_faster(a[:500], weight.t(), bias, "whole", exact_width=True) == chosen
    asked = []
    monkeypatch.setattr(rb, "_bias_fused", {})
    monkeypatch.setattr(
        rb, "bias_fused_faster", lambda *args, **kwargs: asked.append(kwargs) or False
    )
    assert torch.equal(rb.bias_product(a, weight, bias), torch.addmm(bias, a, weight.t()))
    assert asked == [{"exact_width": True}]


def grad_nodes(out):
    """The node that made `out`, under the view that gives it the input's leading dims."""
    node = out.grad_fn
    if type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return {type(node).__name__}


def test_linear_takes_the_row_blocks_only_for_large_plain_bf16_layers_in_training(monkeypatch):
    large, small = nn.Linear(512, 512), nn.Linear(64, 64)
    x = torch.randn(1, rb.MIN_ROWS, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grad_nodes(linear(large, x)) == {"RowBlockLinearBackward"}
        assert grad_nodes(linear(large, x.bfloat16())) == {"RowBlockLinearBackward"}
        assert grad_nodes(linear(small, x[..., :64])) != {"RowBlockLinearBackward"}
        assert grad_nodes(linear(large, x[:, :8])) != {"RowBlockLinearBackward"}  # few rows
        with torch.no_grad():
            assert linear(large, x).grad_fn is None
        handle = large.register_forward_hook(lambda module, args, out: None)
        assert grad_nodes(linear(large, x)) != {"RowBlockLinearBackward"}  # the hook sees it
        handle.remove()
    # float32 products stay nn.Linear's where oneDNN's product is not the faster, float64's
    # always (second-order gradients work on either path: below)
    monkeypatch.setattr(rb, "fastest_path", lambda a, b: "whole")
    assert grad_nodes(linear(large, x)) != {"RowBlockLinearBackward"}
    wide = nn.Linear(512, 512).double()
    x64 = x.double().requires_grad_()
    (grad,) = torch.autograd.grad(linear(wide, x64).square().sum(), x64, create_graph=True)
    assert grad.grad_fn is not None


def test_a_float32_layer_takes_the_row_blocks_where_onednn_s_product_was_faster(monkeypatch):
    onednn_or_skip()
    force(monkeypatch, "onednn")
    layer = nn.Linear(512, 512)
    x = torch.randn(2, rb.MIN_ROWS, 512, requires_grad=True)
    assert grad_nodes(linear(layer, x)) == {"RowBlockLinearBackward"}
    with torch.no_grad():  # inference: nn.Linear (and nothing timed)
        assert linear(layer, x).grad_fn is None
    monkeypatch.setattr(rb, "fastest_path", lambda a, b: pytest.fail("timed"))
    assert grad_nodes(linear(layer, x[:, :8])) != {"RowBlockLinearBackward"}  # few rows
    assert grad_nodes(linear(layer.double(), x.double())) != {"RowBlockLinearBackward"}

    # torch.func's transforms see nn.Linear, whose products they can follow
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(512, 512)

        def forward(self, inputs):
            return linear(self.inner, inputs)

    module = Layer()

    def loss(weight, inputs):
        return torch.func.functional_call(module, {"inner.weight": weight}, (inputs,)).sum()

    grads = torch.func.grad(loss)(module.inner.weight.detach(), x.detach())
    expected = x.detach().sum((0, 1)).expand(512, 512)
    torch.testing.assert_close(grads, expected, rtol=1e-5, atol=1e-3)


def test_float32_inference_takes_onednn_s_product_where_it_was_faster(monkeypatch):
    """Without gradients a float32 layer is oneDNN's product where that was timed faster:
    within float32's rounding of float64's; nn.Linear for few rows, float64, autocast, a
    hooked layer, or where torch's product was the faster."""
    onednn_or_skip()
    g = torch.Generator().manual_seed(4)
    layer = nn.Linear(512, 300)
    x = torch.randn(2, 150, 512, generator=g)
    called = []
    product = rb.onednn_product
    monkeypatch.setattr(rb, "onednn_product", lambda *args: called.append(1) or product(*args))
    force(monkeypatch, "onednn")
    with torch.no_grad():
        out = linear(layer, x)
    assert called == [1] and out.shape == (2, 150, 300) and out.grad_fn is None
    exact = x.double() @ layer.weight.double().t() + layer.bias.double()
    bound = 512 * 2**-24 * (x.double().abs() @ layer.weight.double().abs().t() + 1)
    assert ((out.double() - exact).abs() <= bound).all()
    with torch.inference_mode():
        assert torch.equal(linear(layer, x), out) and len(called) == 2
    with torch.no_grad():
        linear(layer, x[:, :8])  # 16 rows
        linear(layer.double(), x.double())
        layer.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(layer, x).dtype == torch.bfloat16
        handle = layer.register_forward_hook(lambda module, args, output: None)
        linear(layer, x)
        handle.remove()
        force(monkeypatch, "whole")
        assert torch.equal(linear(layer, x), layer(x))
    assert len(called) == 2


def test_gpt2_s_float32_inference_takes_onednn_s_products_with_the_plain_numbers(monkeypatch):
    onednn_or_skip()
    from tformer import GPT2, GPT2Config

    config = GPT2Config(vocab_size=300, max_len=300, d_model=128, n_layers=1, n_heads=4)
    model = GPT2(config, seed=0).eval()
    ids = torch.randint(0, 300, (1, 260), generator=torch.Generator().manual_seed(0))
    called = []
    product = rb.onednn_product
    monkeypatch.setattr(rb, "onednn_product", lambda *args: called.append(1) or product(*args))
    with torch.no_grad():
        force(monkeypatch, "whole")
        plain = model(ids)
        force(monkeypatch, "onednn")
        ours = model(ids)
    assert len(called) == 5  # the fused Q, K, V, the output projection, the FFN's two, the head
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


def test_a_float32_row_block_linear_trains_as_nn_linear_second_order_too(monkeypatch):
    """oneDNN's products against nn.Linear's, to float32's rounding: the output and the three
    gradients (oneDNN's products) and, with create_graph, a gradient of a gradient (torch's
    products then, which autograd records)."""
    onednn_or_skip()
    force(monkeypatch, "onednn")
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(512, 520)
    x = torch.randn(2, 150, 512, generator=g, requires_grad=True)
    inputs = (x, layer.weight, layer.bias)
    results = []
    paths = ((lambda x_: linear(layer, x_), "RowBlockLinearBackward"), (layer, "AddmmBackward0"))
    for run, node in paths:
        out = run(x)
        assert grad_nodes(out) == {node}
        first = torch.autograd.grad(out.square().sum(), inputs)
        again = torch.autograd.grad(run(x).square().sum(), inputs, create_graph=True)
        second = torch.autograd.grad(again[0].square().sum(), (x, layer.weight))
        results.append((out, *first, *again, *second))
    for ours, theirs in zip(*results, strict=True):
        scale = theirs.abs().max()
        torch.testing.assert_close(ours / scale, theirs / scale, rtol=0, atol=1e-5)


def test_the_output_is_a_tensor_of_its_own_as_nn_linears():
    layer = nn.Linear(512, 512)
    x = torch.randn(1, rb.MIN_ROWS, 512, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(layer, x)
    assert grad_nodes(out) == {"RowBlockLinearBackward"}
    out.add_(1.0)  # in place, as a residual or a hook may do
    out.float().sum().backward()
    assert x.grad is not None and layer.weight.grad.shape == (512, 512)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 5), (70, 130), (130, 70), (300, 64), (64, 1), (300, 260)])
def test_a_transposed_view_is_copied_row_major_value_for_value(dtype, shape):
    """The compiled transpose (where built) or torch's copy: the same values, row-major, in
    whole tiles and not, on one thread and (300 x 260) on the pool."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=g).to(dtype).t()  # (C, R), strides (1, C)
    copied = rb.row_major(a)
    assert copied.is_contiguous() and torch.equal(copied, a)
    wider = torch.randn(shape[0], shape[1] + 3, generator=g).to(dtype)[:, : shape[1]].t()
    assert torch.equal(rb.row_major(wider), wider)  # rows ld > C apart
    other = torch.randn(6, 4, 2, generator=g).to(dtype)[:, :, 0]  # neither layout
    assert torch.equal(rb.row_major(other), other)


def test_the_compiled_transpose_checks_its_layout():
    library = kernels.load()
    if library is None:
        pytest.skip("the compiled kernels are not built here")
    with pytest.raises(ValueError, match="transposed view"):
        library.transpose16(torch.zeros(4, 6, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        library.transpose16(torch.zeros(6, 4).t())


@pytest.mark.parametrize("shape", [(3, 5), (16, 16), (64, 48), (70, 130), (300, 260)])
def test_the_compiled_transpose_into_float32_widens_each_value_exactly(shape):
    library = kernels.load()
    if library is None:
        pytest.skip("the compiled kernels are not built here")
    g = torch.Generator().manual_seed(1)
    a = torch.randn(shape, generator=g).to(torch.bfloat16)
    turned = library.transpose_to_f32(a)
    assert turned.is_contiguous() and turned.dtype == torch.float32
    assert torch.equal(turned, a.t().float())
    wider = torch.randn(shape[0], shape[1] + 5, generator=g).to(torch.bfloat16)[:, : shape[1]]
    assert torch.equal(library.transpose_to_f32(wider), wider.t().float())  # rows ld apart
    with pytest.raises(ValueError, match="rows must be contiguous"):
        library.transpose_to_f32(a.t())
    with pytest.raises(ValueError, match="bfloat16"):
        library.transpose_to_f32(a.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["as it reads", "transposed"])
def test_a_weight_gradient_either_way_is_dy_t_x_in_float32(path, dtype, monkeypatch):
    # both ways sum the same products in float32 (and for bf16 round once); against float64
    if kernels.load() is None and dtype == torch.bfloat16:
        pytest.skip("the C kernels are not built here")
    real = rb.fastest

    asked = []

    def chosen(kind, key, names, candidates):  # this path for the weight gradient only
        if key.startswith("weight gradient"):
            asked.append(key)
            return path
        return real(kind, key, names, candidates)

    monkeypatch.setattr(rb, "fastest", chosen)
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(300, 520, generator=g).to(dtype)  # (M, N), K < N
    rows = torch.randn(300, 96, generator=g).to(dtype)  # (M, K)
    dw = rb.weight_gradient(grad, rows, torch.float32)
    assert dw.shape == (520, 96) and dw.dtype == torch.float32 and dw.is_contiguous()
    exact = grad.double().t() @ rows.double()
    if dtype == torch.bfloat16:
        torch.testing.assert_close(dw.double(), exact, rtol=2**-8, atol=1e-3)
        assert torch.equal(dw, dw.bfloat16().float())  # a bf16 product's values, widened
    else:  # within the float32 bound of a 300-term sum
        bound = 300 * 2**-24 * (grad.double().abs().t() @ rows.double().abs())
        assert ((dw.double() - exact).abs() <= bound).all()
    assert asked == [f"weight gradient 512x520x96 {rb.dtype_name(dtype)} to float32"]


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_autocast_dtype_is_the_dtype_autocast_multiplies_in(dtype, autocast):
    # the reference: the dtype of nn.functional.linear's output under CPU autocast
    x, w = torch.randn(2, 4, dtype=dtype), torch.randn(3, 4, dtype=dtype)
    assert rb.autocast_dtype(x) is None
    with torch.autocast("cpu", dtype=autocast):
        expected = torch.nn.functional.linear(x, w).dtype
        assert (rb.autocast_dtype(x) or x.dtype) == expected
        assert rb.autocast_dtype(torch.ones(2, dtype=torch.int64)) is None
