"""A block of queries' causal softmax, and its gradient, in one pass over each row.

For the block of queries a, ..., a + n - 1 over keys 0, ..., e - 1 (nn/blocked_attention.py),
row r of the scores S sees the keys j <= a + r:

    P_rj = exp(S_rj - m_r) / sum_{j' <= a + r} exp(S_rj' - m_r),   0 for j > a + r,
    dS_rj = P_rj (dP_rj - sum_j' P_rj' dP_rj'),

with m_r the row's largest visible score. torch's path fills the hidden scores with -inf,
then runs its softmax into a new tensor, and its backward kernel reads every column. The
C kernels (kernels/softmax.c) read each row's visible part once, in place, with the same
float32 sums and one rounding to bf16. They are taken for bf16 scores on the CPU where
they were timed faster, forward and backward, than torch's path (once per CPU and size
class, nn/measured.py).
"""

import math

import torch

from tformer import kernels
from tformer.nn.measured import fastest

KIND = "causal-softmax-v1"
# a timing's size at most: the time is per row and grows with its length, and both ways
# read the same rows
TIMED_ROWS, TIMED_POSITIONS = 16, 2048  # (batch x heads) rows of blocks; positions


def masked_softmax(scores: torch.Tensor, first: int) -> torch.Tensor:
    """torch's path: scores (..., n, e) of queries first, ..., first + n - 1 over keys 0,
    ..., e - 1 = first + n - 1 -> P (..., n, e). Fills the hidden scores (each query's
    keys after its own) with -inf in place."""
    n = scores.shape[-2]
    above = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu_(1)
    scores[..., first : first + n].masked_fill_(above, float("-inf"))
    return torch.softmax(scores, dim=-1)


def softmax_kernels(q: torch.Tensor, block: int) -> kernels.Kernels | None:
    """The compiled kernels if the blocks of causal self-attention over q (..., T, D), with
    `block` queries each and no mask, take their softmax there: bf16 on the CPU, outside
    torch.compile, where the kernels were timed faster than torch's path for the call's
    blocks, at the rows (the product of q's leading sizes) and T rounded down to powers of
    two, and at most TIMED_ROWS and TIMED_POSITIONS. Else None."""
    library = kernels.load_for(q, (torch.bfloat16,))
    t, heads = q.shape[-2], math.prod(q.shape[:-2])
    if library is None or heads * t == 0:
        return None
    rows, positions = (1 << (size.bit_length() - 1) for size in (heads, t))
    rows, positions = min(rows, TIMED_ROWS), min(positions, TIMED_POSITIONS)
    key = f"{rows}x{positions} block {block}"

    def candidates():
        g = torch.Generator().manual_seed(0)
        size = rows * min(block, positions) * positions  # the largest block's elements
        # the scores and their gradient, and the two each way works in, block by block
        source = [torch.randn(size, generator=g).to(torch.bfloat16) for _ in range(2)]
        work = [t.clone() for t in source]
        blocks = []  # (first query, (rows, n, e))
        for start in range(0, positions, block):
            end = min(start + block, positions)
            blocks.append((start, (rows, end - start, end)))

        def fresh(shape: tuple[int, int, int]) -> list[torch.Tensor]:
            """A block's scores and gradient in the work buffers, copied from the source
            (both ways work in place)."""
            views = [t[: math.prod(shape)].view(shape) for t in work]
            for view, t in zip(views, source, strict=True):
                view.copy_(t[: math.prod(shape)].view(shape))
            return views

        def compiled() -> None:
            for start, shape in blocks:
                s, d = fresh(shape)
                library.causal_softmax(s, start)
                library.causal_softmax_backward(s, d, start)

        def plain() -> None:
            for start, shape in blocks:
                s, d = fresh(shape)
                p = masked_softmax(s, start)
                torch._softmax_backward_data(d, p, -1, p.dtype)

        return {"kernel": compiled, "torch": plain}

    return library if fastest(KIND, key, ("kernel", "torch"), candidates) == "kernel" else None
