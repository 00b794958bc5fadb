"""kernels/products.c: bf16 products with float32 sums, each thread keeping to its rows."""

import pytest
import torch

# (M, K, N): odd K (the last pair alone), K = 1, a partial tile of rows and of panels,
# fewer rows than threads, N below one panel, and a layer of nanoGPT's CPU recipe
SHAPES = [(1, 1, 1), (7, 3, 5), (13, 17, 33), (50, 64, 192), (3, 1, 2), (100, 31, 70), (2, 130, 16)]
SHAPES += [(5, 2, 17), (768, 128, 384)]


@pytest.fixture
def built(compiled):
    if not compiled.products_available():
        pytest.skip("kernels/products.c needs a CPU with AVX-512 BF16")
    return compiled


def operands(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a, w, bias = (torch.randn(s, generator=g).bfloat16() for s in ((m, k), (n, k), (n,)))
    return a, w, bias


def sum_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The float32 sums' error bound for a b, elementwise: K 2^-24 sum_k |a_ik b_kj|."""
    return a.shape[1] * 2.0**-24 * (a.double().abs() @ b.double().abs())


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_the_product_is_the_float32_sum_rounded_once(built, m, k, n):
    """a w^T + bias and dy w within one bf16 rounding of the exact sum of the bf16 products
    (and the float32 sum's error), the bias added before the rounding."""
    a, w, bias = operands(m, k, n)
    exact = a.double() @ w.double().t() + bias.double()
    for c, expected in (
        (built.product_bf16(a, w, bias), exact),
        (built.product_bf16(a, w), exact - bias.double()),
    ):
        assert c.dtype == torch.bfloat16 and c.shape == (m, n)
        error = (c.double() - expected).abs()
        assert (error <= 2**-8 * expected.abs() + sum_bound(a, w.t()) + 1e-30).all()
    dy = operands(m, n, k, seed=1)[0]  # (M, N) times w (N, K)
    c = built.product_bf16(dy, w, transposed=False)
    expected = dy.double() @ w.double()
    assert c.shape == (m, k)
    assert ((c.double() - expected).abs() <= 2**-8 * expected.abs() + sum_bound(dy, w)).all()


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_the_weight_gradient_is_the_float32_sum_not_rounded(built, m, k, n):
    x, _, _ = operands(m, k, n)
    dy = operands(m, n, k, seed=1)[0]
    dw = built.weight_gradient_bf16(dy, x)
    assert dw.dtype == torch.float32 and dw.shape == (n, k)
    exact = dy.double().t() @ x.double()
    # a float32 sum of M products: far closer than bf16's 2^-8
    assert ((dw.double() - exact).abs() <= sum_bound(dy.t(), x) + 1e-30).all()


def test_the_products_are_torch_s_within_a_bf16_step(built):
    """On the shapes of a small model's step: products.c's results are torch's within one
    bf16 step (the same sums; torch's rounded once as well)."""
    a, w, bias = operands(768, 128, 512)
    torch.testing.assert_close(built.product_bf16(a, w, bias), torch.addmm(bias, a, w.t()))
    dy = operands(768, 512, 128, seed=1)[0]
    torch.testing.assert_close(built.product_bf16(dy, w, transposed=False), dy.mm(w))


@pytest.mark.parametrize("threads", [1, 3])
def test_rows_do_not_depend_on_the_threads_and_the_gradient_barely(built, threads):
    """Each row is one thread's sum, whatever the split: the same bits on any number of
    threads. The weight gradient adds the threads' sums: its last bits move."""
    a, w, bias = operands(97, 40, 50)
    dy = operands(97, 50, 40, seed=1)[0]
    two = built.product_bf16(a, w, bias), built.product_bf16(dy, w, transposed=False)
    gradient = built.weight_gradient_bf16(dy, a)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        now = built.product_bf16(a, w, bias), built.product_bf16(dy, w, transposed=False)
        moved = built.weight_gradient_bf16(dy, a)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(x, y) for x, y in zip(two, now, strict=True))
    torch.testing.assert_close(moved, gradient, rtol=1e-5, atol=1e-5)


def test_no_rows_or_no_sum(built):
    """M = 0: nothing to write; K = 0: the bias (or zeros), and a zero gradient of no rows."""
    a, w, bias = operands(0, 4, 6)
    assert built.product_bf16(a, w, bias).shape == (0, 6)
    assert torch.equal(
        built.weight_gradient_bf16(torch.empty(0, 6).bfloat16(), a), torch.zeros(6, 4)
    )
    a, w, bias = operands(3, 0, 6)
    assert torch.equal(built.product_bf16(a, w, bias), bias.expand(3, 6))
    assert torch.equal(built.product_bf16(a, w), torch.zeros(3, 6, dtype=torch.bfloat16))


def test_the_products_refuse_what_they_cannot_read(built):
    a, w, bias = operands(4, 6, 5)
    for bad in (
        lambda: built.product_bf16(a.float(), w),
        lambda: built.product_bf16(a, w[:, :5]),  # K apart
        lambda: built.product_bf16(a, w, bias[:4]),
        lambda: built.product_bf16(a.t().contiguous().t(), w),  # not row-major
        lambda: built.product_bf16(a, w, transposed=False),  # w (5, 6) is not (K, N)
        lambda: built.product_bf16(a[0], w),
    ):
        with pytest.raises(ValueError, match="product_bf16"):
            bad()
    for bad in (
        lambda: built.weight_gradient_bf16(a, a[:3]),
        lambda: built.weight_gradient_bf16(a.float(), a),
        lambda: built.weight_gradient_bf16(a.t(), a.t()),
    ):
        with pytest.raises(ValueError, match="weight_gradient_bf16"):
            bad()


def test_where_it_is_not_built_it_says_so(compiled):
    if compiled.products_available():
        pytest.skip("built here: the CPU has AVX-512 BF16")
    a, w, _ = operands(4, 6, 5)
    with pytest.raises(ValueError, match="AVX-512 BF16"):
        compiled.product_bf16(a, w)
