"""The matrix products of a small model's one-step paths on the CPU (nn/block_step.py,
nn/feedforward_step.py, nn/attention_step.py), each on the kernel that runs it fastest here
among the step's other kernels.

For a linear layer y = x W^T + b the step computes, from bf16 values with float32 sums,

    y = x W^T + b      linear
    dx = dy W          input_gradient
    dW = dy^T x        weight_gradient

with torch's products ("torch": oneDNN's, the bias as nn/row_blocks.py's bias_product adds
it) or kernels/products.c ("rows"), whose threads each take the contiguous share of the
rows that the step's other kernels (the norms, the GELU, attention, the casts) give them: a
product reads its rows where the kernel before it wrote them and leaves them where the next
one reads them. oneDNN splits its work otherwise; alone it is as fast (and on a CPU with AMX
it runs on the matrix units), in the step the rows' trips between the cores decide
(docs/LOG.md, session 40). So the path of a layer's three products is timed once per shape
on this CPU as they run in the step: a row-split pass writes each left operand first and,
for y and dx, another reads the result after (nn/measured.py keeps the choice).

The values: y and dx are float32 sums rounded to bf16 once on either path (the bias added
before the rounding). dW from products.c is the float32 sum itself, not rounded, where
torch's is rounded to bf16 and widened again for the float32 parameter; products.c sums
each thread's rows apart and adds the threads' sums in thread order, so its last bits
depend on the thread count (as the norms' gain gradients do).
"""

import torch

from tformer import kernels
from tformer.nn.measured import fastest
from tformer.nn.row_blocks import bias_product, round_tokens

KIND = "small-products-v1"
PATHS = ("torch", "rows")  # the first: the plain path, taken untimed where it is the only one
TURNS = 15  # timed turns of each path: alone the two are close, and a layer is timed once

_chosen: dict[tuple[int, int, int, int], str] = {}  # (M, K, N, threads) -> path


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x w^T + b: x (M, K), w (N, K), b (N,), bf16 -> (M, N) bf16."""
    if chosen(x.shape[0], x.shape[1], w.shape[0]) == "rows":
        return kernels.load().product_bf16(x, w, b)
    return bias_product(x, w, b)


def input_gradient(dy: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dy w: dy (M, N), w (N, K), bf16 -> (M, K) bf16."""
    if chosen(dy.shape[0], w.shape[1], w.shape[0]) == "rows":
        return kernels.load().product_bf16(dy, w, transposed=False)
    return dy.mm(w)


def weight_gradient(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy^T x: dy (M, N), x (M, K), bf16 -> (N, K), float32 from products.c and bf16 from
    torch's product (autograd widens it for a float32 parameter)."""
    if chosen(x.shape[0], x.shape[1], dy.shape[1]) == "rows":
        return kernels.load().weight_gradient_bf16(dy, x)
    return dy.t().mm(x)


def chosen(m: int, k: int, n: int) -> str:
    """The path of a layer's three products, for M tokens of a layer from K to N features:
    timed once per shape (M rounded up as nn/row_blocks.py rounds a layer's tokens) and
    remembered."""
    memo = (m, k, n, torch.get_num_threads())
    path = _chosen.get(memo)
    if path is None:  # asked once per shape: the question itself costs a few microseconds
        path = _chosen[memo] = timed_path(round_tokens(m), k, n)
    return path


def timed_path(m: int, k: int, n: int) -> str:
    """The faster path of a layer's three products at M tokens, K to N features, here, each
    in its place in the step; "torch" without the compiled kernels or where products.c is
    not built."""
    library = kernels.load()
    if library is None or not library.products_available():
        return PATHS[0]

    def candidates() -> dict:
        g = torch.Generator().manual_seed(0)
        x_rows, dy_rows, y_rows, dx_rows = (
            torch.randn(shape, generator=g) for shape in ((m, k), (m, n), (m, n), (m, k))
        )  # float32, as the kernels before and after a product hold them
        w, b = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
        x = x_rows.bfloat16()  # the layer's input, kept from the forward pass
        products = {
            "torch": (
                lambda a: bias_product(a, w, b),
                lambda dy: dy.mm(w),
                lambda dy: dy.t().mm(x).float(),  # widened as autograd widens it
            ),
            "rows": (
                lambda a: library.product_bf16(a, w, b),
                lambda dy: library.product_bf16(dy, w, transposed=False),
                lambda dy: library.weight_gradient_bf16(dy, x),
            ),
        }

        def in_the_step(forward, backward, gradient) -> None:
            # each operand as a row-split kernel writes it, each result as the next reads it
            library.add_bf16(y_rows, forward(library.round_bf16(x_rows)))
            dy = library.round_bf16(dy_rows)
            library.add_bf16(dx_rows, backward(dy))
            gradient(dy)

        return {name: (lambda p=products[name]: in_the_step(*p)) for name in PATHS}

    return fastest(KIND, f"{m}x{k}x{n} bfloat16", PATHS, candidates, TURNS)
