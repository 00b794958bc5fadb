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

import torch

from tformer import kernels
from tformer.nn.measured import fastest

KIND = "causal-softmax-v1"
TIMED_ROWS = 16  # at most this many (batch x head) rows of blocks in a timing


def masked_softmax(scores: torch.Tensor, first: int) -> torch.Tensor:
    """torch's path: scores (..., n, e) of queries first, ..., first + n - 1 -> P (..., n, e).
    Fills the hidden scores (of keys first, ..., e - 1) with -inf in place."""
    n = scores.shape[-2]
    above = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu_(1)
    scores[..., first : first + n].masked_fill_(above, float("-inf"))
    return torch.softmax(scores, dim=-1)


def softmax_kernels(q: torch.Tensor, block: int) -> kernels.Kernels | None:
    """The compiled kernels if the blocks of causal self-attention over q (B, H, T, D), with
    `block` queries each and no mask, take their softmax there: bf16 on the CPU, outside
    torch.compile, where the kernels were timed faster than torch's path for the call's
    blocks, at B H and T rounded down to powers of two (B H at most TIMED_ROWS: the time
    is per row). Else None."""
    library = kernels.load_for(q, (torch.bfloat16,))
    b, h, t, _ = q.shape
    if library is None or b * h * t == 0:
        return None
    rows, positions = (1 << (size.bit_length() - 1) for size in (b * h, t))
    rows = min(rows, TIMED_ROWS)
    key = f"{rows}x{positions} block {block}"

    def candidates():
        g = torch.Generator().manual_seed(0)
        blocks = []  # per block: its first query, scores and their gradient (rows, n, e)
        for start in range(0, positions, block):
            end = min(start + block, positions)
            pair = (torch.randn(rows, end - start, end, generator=g) for _ in range(2))
            blocks.append((start, *(t.to(torch.bfloat16) for t in pair)))
        work = [(start, s.clone(), d.clone()) for start, s, d in blocks]

        def compiled() -> None:
            for start, s, d in work:
                library.causal_softmax(s, start)
                library.causal_softmax_backward(s, d, start)

        def plain() -> None:
            for start, s, d in work:
                p = masked_softmax(s, start)
                torch._softmax_backward_data(d, p, -1, p.dtype)

        def fresh(run):  # each call from the same scores and gradients (both work in place)
            def call() -> None:
                for (_, s, d), (_, s0, d0) in zip(work, blocks, strict=True):
                    s.copy_(s0)
                    d.copy_(d0)
                run()

            return call

        return {"kernel": fresh(compiled), "torch": fresh(plain)}

    return library if fastest(KIND, key, ("kernel", "torch"), candidates) == "kernel" else None
