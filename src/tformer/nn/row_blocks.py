"""A training step's linear layers with each matrix product in blocks of rows where faster.

A linear layer is y = x W^T + b, and its backward pass two more products,

    dx = dy W,   dW = dy^T x,   db = sum over rows of dy.

The rows of a product are independent: A B = [A_1 B; A_2 B] for A's rows split in two, each
half written straight into its place in the one output, so the values are the product's
(every element sums over the same terms). Only the speed differs: on the Intel machine,
torch's bf16 matmul runs the products whose output is model-wide (N = 768 for GPT-2) but
whose sum is long (K = 2304, 3072) at half the speed of the same product as two calls of
half the rows (docs/LOG.md, session 22), while wide outputs lose by the split. In float32
torch multiplies in its BLAS (MKL), which on some CPUs runs at half the speed of oneDNN's
float32 product (AMD's Zen 5, where MKL takes its AVX2 code: docs/LOG.md, session 41); so a
float32 product may also run as oneDNN's linear ("onednn"), the same sums in another order.
Each product's shape, layout and dtype is timed once on the CPU in use, whole against
halves (and oneDNN's, in float32), and the fastest kept (nn/measured.py). The plain path is
nn.Linear; a test holds the two to each other.
"""

import functools

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as module_hooks

from tformer import kernels
from tformer.nn.blocked_attention import hooked
from tformer.nn.measured import dtype_name, fastest
from tformer.nn.weight_copies import half_weight

KIND = "matmul-v7"  # the measured choices' file and version (nn/measured.py)
# Smaller products than these run whole, through nn.Linear itself: a split would only add
# a call's cost, and this path's Python costs more than a small product gains.
MIN_ROWS = 256
MIN_WEIGHT = 1 << 18  # weight elements, K N (512 x 512)
# float32 layers from this size may take oneDNN's products, where timed faster: down to
# nanoGPT's smallest layers (128 x 128) they saved more than this path's calls cost
# (docs/LOG.md, session 41)
MIN_FLOAT32_WEIGHT = 1 << 14
HALF_DTYPES = (torch.bfloat16, torch.float16)  # the products this path takes
# M and K are rounded up in a choice's key, so that a new batch length is not timed anew:
# to a multiple of KEY_STEP (round_up), and the token count, above KEY_STEPS of them, to a
# step that doubles with each doubling of the count (round_tokens): two keys in each range
# (s, 2 s] from there. A model that trains on batches of many lengths (translation) then
# times a few dozen shapes, not hundreds: each timing costs a dozen or more products of
# its size (docs/LOG.md). The layers' widths keep their multiples of KEY_STEP.
KEY_STEP = 256
KEY_STEPS = 4


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """module(x), (..., K) -> (..., N), with its products in row blocks where faster: in a
    training step on the CPU, for a large_plain_linear; without gradients, for an
    onednn_layer, as oneDNN's product; otherwise the module itself."""
    if (
        not torch.compiler.is_compiling()
        and large_plain_linear(module, x)  # then: most small layers stop at its size test
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
    ):
        rows = x.reshape(-1, x.shape[-1])  # (M, K)
        # viewed back outside the Function, so that autograd knows the view for what it is
        return RowBlockLinear.apply(rows, module.weight, module.bias).view(*x.shape[:-1], -1)
    if not torch.is_grad_enabled() and onednn_layer(module, x):
        rows = x.reshape(-1, x.shape[-1])  # (M, K)
        out = onednn_product(rows, module.weight.t(), module.bias)  # (M, N)
        return out.view(*x.shape[:-1], -1)
    return module(x)


def large_plain_linear(module: nn.Module, x: torch.Tensor) -> bool:
    """A plain_linear module over at least MIN_ROWS rows of at least MIN_WEIGHT weights,
    multiplying in bf16 or float16 (its input's dtype, or autocast's); in float32, in a
    training step, an onednn_layer. Elsewhere float32 stays on nn.Linear: no split was
    faster there, and this path cost 2.7% of a GPT-2 step in float32 with every product
    whole (docs/LOG.md); float64 always."""
    if type(module) is not nn.Linear or x.numel() < MIN_ROWS * x.shape[-1]:
        return False  # the sizes first: the cheapest to ask, and most small layers stop here
    if (autocast_dtype(x) or x.dtype) in HALF_DTYPES:
        return module.weight.numel() >= MIN_WEIGHT and plain_linear(module)
    return torch.is_grad_enabled() and onednn_layer(module, x)


def onednn_layer(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether module(x) is a plain_linear float32 layer of at least MIN_FLOAT32_WEIGHT
    weights over at least MIN_ROWS rows on the CPU, outside autocast, torch.compile and
    torch.func's transforms (which oneDNN's op takes no part in: nn.Linear keeps them
    working), whose forward product was timed faster here as oneDNN's (fastest_path)."""
    if type(module) is not nn.Linear or x.numel() < MIN_ROWS * x.shape[-1]:
        return False  # the sizes first: decoding's one row a step stops here
    if module.weight.numel() < MIN_FLOAT32_WEIGHT or x.device.type != "cpu":
        return False
    if not (x.dtype == module.weight.dtype == torch.float32) or autocast_dtype(x) is not None:
        return False
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if not plain_linear(module):
        return False
    return fastest_path(x.reshape(-1, x.shape[-1]), module.weight.t()) == "onednn"


def plain_linear(module: nn.Module) -> bool:
    """Whether `module` is a plain nn.Linear (not an adapter wrapping one) that no hook
    would miss: a forward or backward hook, its own or global."""
    if type(module) is not nn.Linear or hooked(module):
        return False
    backward = module._backward_hooks or module._backward_pre_hooks
    return not (
        backward or module_hooks._global_backward_hooks or module_hooks._global_backward_pre_hooks
    )


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype CPU autocast would multiply x in, or None: its own for any floating x but
    float64 (which it leaves as it is), as it casts a product's inputs."""
    if torch.is_autocast_enabled("cpu") and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype("cpu")
    return None


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """a b (+ bias): (M, K) x (K, N) -> (M, N), into `out` if given, on the path this CPU
    runs fastest for the shape, the operands' layouts and the dtype (fastest_path); with a
    bias and no `out`, oneDNN's product with the bias added as it writes, where faster
    (bias_fused_faster); in float32 oneDNN's product, bias and all, where that is the
    fastest path."""
    path = fastest_path(a, b) if a.device.type == "cpu" and a.shape[0] >= MIN_ROWS else "whole"
    if path == "onednn":
        product = onednn_product(a, b, bias)  # (M, N)
        return product if out is None else out.copy_(product)
    if bias is not None and out is None and bias_fused_faster(a, b, bias, path):
        return onednn_product(a, b, bias)
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    if path == "halves":
        return in_halves(a, b, bias, out)
    if path == "copied":
        a = row_major(a)
    return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)


def in_halves(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """out = a b (+ bias), the first half of a's rows, then the second, each into its rows."""
    half = a.shape[0] // 2
    for rows in (slice(0, half), slice(half, None)):
        if bias is None:
            torch.mm(a[rows], b, out=out[rows])
        else:
            torch.addmm(bias, a[rows], b, out=out[rows])
    return out


def onednn_product(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """a b (+ bias) as oneDNN's linear layer computes it: (M, K) x (K, N) -> (M, N), each
    operand row-major or transposed, read where it lies (oneDNN takes the strides). Its
    output stage adds the bias as it writes, where torch's addmm first copies the bias into
    every output row and then has the product add onto them, a whole extra pass over the
    output (docs/LOG.md); with a row-major a and b the transposed view of a row-major
    weight, the values are addmm's. The op is the one torch.compile's CPU backend emits for
    a linear layer. In float32 it is oneDNN's own product, where torch's is MKL's."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")


@functools.cache
def onednn_available(dtype: torch.dtype) -> bool:
    """Whether this torch has oneDNN's linear (onednn_product) for `dtype`, bias and all,
    and it runs here."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        a, w, bias = (torch.ones(shape, dtype=dtype) for shape in ((2, 3), (4, 3), (4,)))
        return bool(
            torch.equal(onednn_product(a, w.t(), bias), torch.full((2, 4), 4.0, dtype=dtype))
        )
    except (AttributeError, RuntimeError):
        return False


def bias_fused_faster(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, path: str, exact_width: bool = False
) -> bool:
    """Whether a b + bias runs faster as onednn_product than on `path` with addmm, as timed
    once on this CPU for the shape (M, K rounded up as in fastest_path; K as it is where
    `exact_width`) and dtype. Only for a row-major a and a transposed weight b, on the CPU."""
    if a.device.type != "cpu" or layout(a) != "n" or layout(b) != "t" or bias.dim() != 1:
        return False
    if not (a.is_contiguous() and b.t().is_contiguous() and bias.is_contiguous()):
        return False
    if bias.dtype != a.dtype or not onednn_available(a.dtype):
        return False
    (m, k), n = key_sizes(a), b.shape[1]
    if exact_width:
        k = a.shape[1]
    key = f"{m}x{k}x{n} nt {dtype_name(a.dtype)} bias, else {path}"

    def candidates():
        g = torch.Generator().manual_seed(0)
        a_, b_ = like(a, (m, k), g), like(b, (k, n), g)
        bias_ = torch.randn(n, generator=g, dtype=a.dtype)
        out = torch.empty(m, n, dtype=a.dtype)
        addmm = {
            "whole": lambda: torch.addmm(bias_, a_, b_, out=out),
            "halves": lambda: in_halves(a_, b_, bias_, out),
            # a row-major a's copy is a itself: matmul's "copied" is addmm on it
            "copied": lambda: torch.addmm(bias_, a_, b_, out=out),
        }
        return {path: addmm[path], "fused": lambda: onednn_product(a_, b_, bias_)}

    return fastest(KIND, key, (path, "fused"), candidates) == "fused"


def bias_product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x w^T + b for a small layer's step, bf16 (M, K) x (N, K) + (N,) -> (M, N), row-major
    operands: onednn_product where that was timed faster for the shape here, else addmm (the
    same values). Without row blocks or the questions matmul asks at every call, which
    cost a small layer more than they save. Timed at the layer's own width (K): rounded up
    as a large layer's key is, a width of 128 was timed at 256, where the other path won
    (docs/LOG.md); the tokens (M) rounded as for any layer, so that a new batch length is
    not timed anew."""
    m, (n, k) = x.shape[0], w.shape
    key = (m, k, n, torch.get_num_threads())
    fused = _bias_fused.get(key)
    if fused is None:  # asked once per shape: the question itself costs more than a cast
        fused = _bias_fused[key] = bias_fused_faster(x, w.t(), b, "whole", exact_width=True)
    if fused:  # onednn_product's op, given the weight as it is stored
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return torch.addmm(b, x, w.t())


_bias_fused: dict[tuple[int, int, int, int], bool] = {}  # bias_product's: (M, K, N, threads)


def round_up(size: int) -> int:
    """size rounded up to a multiple of KEY_STEP."""
    return -(-size // KEY_STEP) * KEY_STEP


def round_tokens(size: int) -> int:
    """A token count rounded up to a multiple of KEY_STEP, or above KEY_STEPS of them to a
    multiple of step = KEY_STEP 2^i with size <= KEY_STEPS step: less than half again as
    large."""
    step = KEY_STEP
    while size > KEY_STEPS * step:
        step *= 2
    return -(-size // step) * step


def key_sizes(a: torch.Tensor) -> tuple[int, int]:
    """The (M, K) of a product's left operand a as a choice's key has them: a linear
    layer's tokens are the rows of a row-major a (the forward pass, the input's gradient)
    and the columns of a transposed one (dy^T or x^T in the weight's gradient), rounded by
    round_tokens; the other size, a layer's width, by round_up."""
    m, k = a.shape
    if layout(a) == "t":
        return round_up(m), round_tokens(k)
    return round_tokens(m), round_up(k)


def layout(x: torch.Tensor) -> str:
    """ "n" for a row-major matrix, "t" for a transposed one (column-major), "s" otherwise."""
    if x.stride(1) == 1:
        return "n"
    return "t" if x.stride(0) == 1 else "s"


def fastest_path(a: torch.Tensor, b: torch.Tensor) -> str:
    """How a b runs fastest on this CPU, as timed once for the shape M x K x N (M and K,
    rounded up as key_sizes does: a new batch length is not timed anew),
    the layouts and the dtype: "whole" (one call), "halves" (two calls of half the rows)
    or, where a is transposed, "copied" (a copied row-major first: torch's matmul reads a
    transposed left operand at half speed on some CPUs, docs/LOG.md); in float32, with
    both operands row-major or transposed, also "onednn" (onednn_product)."""
    (m, k), n = key_sizes(a), b.shape[1]
    names = ("whole", "halves") + (("copied",) if layout(a) == "t" else ())
    if a.dtype == torch.float32 and "s" not in (layout(a), layout(b)):
        names += ("onednn",) if onednn_available(torch.float32) else ()
    key = f"{m}x{k}x{n} {layout(a)}{layout(b)} {dtype_name(a.dtype)}"

    def candidates():
        g = torch.Generator().manual_seed(0)
        a_, b_ = like(a, (m, k), g), like(b, (k, n), g)
        out = torch.empty(m, n, dtype=a.dtype)
        paths = {
            "whole": lambda: torch.mm(a_, b_, out=out),
            "halves": lambda: in_halves(a_, b_, None, out),
            "copied": lambda: torch.mm(row_major(a_), b_, out=out),
            "onednn": lambda: onednn_product(a_, b_),
        }
        return {name: paths[name] for name in names}

    return fastest(KIND, key, names, candidates)


def row_major(a: torch.Tensor) -> torch.Tensor:
    """a's values, row-major: for a 16-bit transposed view on the CPU the compiled
    transpose (kernels/transpose.c; 2.5-4x torch's copy of an activation's gradient here,
    docs/LOG.md), else torch's own copy."""
    library = kernels.load_for(a, HALF_DTYPES)
    if library is not None and a.dim() == 2 and a.stride(0) == 1 and a.stride(1) >= a.shape[0]:
        return library.transpose16(a)
    return a.contiguous()


def like(x: torch.Tensor, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """A random matrix of `shape` in x's dtype and layout (row-major, or transposed)."""
    if layout(x) == "t":
        return torch.randn(shape[::-1], generator=g, dtype=x.dtype).t()
    return torch.randn(shape, generator=g, dtype=x.dtype)


class RowBlockLinear(torch.autograd.Function):
    """y = x W^T + b with each of its three products through `matmul`: x (M, K), weight
    (N, K), bias (N,) or None -> (M, N). Under autocast the inputs are cast to its dtype
    first (any floating dtype but float64), and the gradients cast back, as nn.Linear's are.
    First-order only in bf16 and float16; in float32 a backward pass that is itself to be
    differentiated (create_graph) takes torch's products, which autograd records."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = autocast_dtype(x) or x.dtype
        rows = x.to(dtype)  # (M, K)
        w = half_weight(weight, dtype)  # (N, K), kept from the last step where unchanged
        with torch.autocast("cpu", enabled=False):
            b = None if bias is None else bias.to(dtype)
            # a tensor of its own, not a view: in-place changes to it are allowed, as to
            # nn.Linear's
            out = matmul(rows, w.t(), b)  # (M, N)
        ctx.save_for_backward(rows, w)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.cast = dtype != x.dtype or dtype != weight.dtype  # then first-order only
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled() and ctx.dtypes[0] == torch.float32 and not ctx.cast:
            return differentiable_backward(ctx, grad_out)
        return first_order_backward(ctx, grad_out)


def differentiable_backward(ctx, grad_out):
    """RowBlockLinear's gradients in float32 as torch's own products, recorded by autograd:
    dx = dy W, dW = dy^T x, db = the column sums of dy."""
    rows, w = ctx.saved_tensors  # x and W themselves: float32 saves no cast of either
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_out @ w  # (M, K)
    if ctx.needs_input_grad[1]:
        grad_w = grad_out.t() @ rows  # (N, K)
    if ctx.dtypes[2] is not None and ctx.needs_input_grad[2]:
        grad_b = grad_out.sum(0)  # (N,)
    return grad_x, grad_w, grad_b


@once_differentiable  # the backward's products are not themselves differentiated
def first_order_backward(ctx, grad_out):
    """RowBlockLinear's gradients through `matmul`, in the forward pass's dtype, cast back
    to the inputs': dx = dy W, dW = dy^T x (weight_gradient), db = the column sums of dy."""
    rows, w = ctx.saved_tensors
    x_dtype, weight_dtype, bias_dtype = ctx.dtypes
    grad = grad_out.to(w.dtype)  # (M, N)
    grad_x = grad_w = grad_b = None
    with torch.autocast("cpu", enabled=False):
        if ctx.needs_input_grad[0]:
            grad_x = matmul(grad, w).to(x_dtype)  # (M, K)
        if ctx.needs_input_grad[1]:
            grad_w = weight_gradient(grad, rows, weight_dtype)  # (N, K)
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0).to(bias_dtype)  # (N,)
    return grad_x, grad_w, grad_b


def weight_gradient(grad: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's dW = dy^T x in `dtype`: grad dy (M, N), rows x (M, K) -> (N, K).
    Either as it reads (dy^T, a transposed view, through matmul), then cast; or transposed,
    dW^T = x^T dy (K, N), turned into (N, K): for a bf16 product by the cast to float32 it
    gets anyway (kernels/transpose.c), for a float32 one by a copy the size of the weight.
    Then x^T is the transposed operand, where dy^T was, the smaller one where K < N (oneDNN
    copies a transposed operand first). Each element sums the same M products either way;
    which runs faster is timed on the CPU in use once per shape (M rounded up as in
    fastest_path), for a float32 weight's gradient from a bf16 or float32 product over at
    least MIN_ROWS rows, both operands row-major (elsewhere as it reads)."""
    if not (dtype == torch.float32 and rows.dtype in (torch.bfloat16, torch.float32)):
        return matmul(grad.t(), rows).to(dtype)
    library = kernels.load_for(grad, (torch.bfloat16,))
    if rows.dtype == torch.bfloat16:
        if library is None:
            return matmul(grad.t(), rows).to(dtype)
        turn = library.transpose_to_f32  # (K, N) bf16 -> (N, K) float32
    else:
        turn = float32_transposed
    # as matmul: fewer than MIN_ROWS rows are not worth a timing
    takes = grad.shape[0] >= MIN_ROWS and grad.is_contiguous() and rows.is_contiguous()
    if not takes:
        return matmul(grad.t(), rows).to(dtype)
    m, n, k = round_tokens(grad.shape[0]), grad.shape[1], rows.shape[1]
    key = f"weight gradient {m}x{n}x{k} {dtype_name(rows.dtype)} to float32"

    def candidates():
        g = torch.Generator().manual_seed(0)
        grad_ = torch.randn(m, n, generator=g, dtype=rows.dtype)
        rows_ = torch.randn(m, k, generator=g, dtype=rows.dtype)
        return {
            "as it reads": lambda: matmul(grad_.t(), rows_).to(dtype),
            "transposed": lambda: turn(matmul(rows_.t(), grad_)),
        }

    if fastest(KIND, key, ("as it reads", "transposed"), candidates) == "transposed":
        return turn(matmul(rows.t(), grad))  # (K, N) -> (N, K)
    return matmul(grad.t(), rows).to(dtype)


def float32_transposed(a: torch.Tensor) -> torch.Tensor:
    """A float32 (K, N) matrix as its transpose (N, K), row-major: torch's copy."""
    return a.t().contiguous()
