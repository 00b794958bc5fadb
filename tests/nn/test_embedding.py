import math

import pytest
import torch

from tformer.nn import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    TokenEmbedding,
    sinusoidal_table,
)
from tformer.nn.embedding import TiedGradient, TiedLookup
from tformer.nn.sliced_head import sliced_head


@pytest.mark.parametrize("d_model", [8, 7, 64])
def test_sinusoidal_matches_paper_formula_elementwise(d_model):
    max_len = 50
    table = sinusoidal_table(max_len, d_model)
    assert table.shape == (max_len, d_model)
    for pos in (0, 1, 7, 49):
        for j in range(d_model):
            i = j // 2  # dimension j = 2i (sine) or 2i + 1 (cosine)
            angle = pos / 10000 ** (2 * i / d_model)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert table[pos, j].item() == pytest.approx(expected, abs=1e-6)


def test_sinusoidal_position_zero_is_alternating_zero_one():
    assert torch.equal(sinusoidal_table(1, 6)[0], torch.tensor([0.0, 1, 0, 1, 0, 1]))


def test_sinusoidal_encoding_has_no_parameters_and_indexes_positions():
    pe = SinusoidalPositionalEncoding(max_len=20, d_model=6)
    assert list(pe.parameters()) == [] and "table" not in pe.state_dict()
    positions = torch.tensor([[3, 4], [0, 19]])
    out = pe(positions)
    assert out.shape == (2, 2, 6)
    assert torch.equal(out[1, 1], sinusoidal_table(20, 6)[19])


def test_token_embedding_is_a_row_lookup_with_optional_sqrt_d_scale():
    emb = TokenEmbedding(vocab_size=10, d_model=4)
    torch.nn.init.normal_(emb.weight)
    ids = torch.tensor([[1, 9, 1]])
    assert torch.equal(emb(ids)[0, 1], emb.weight[9])
    reference = torch.nn.Embedding(10, 4)
    reference.weight.data.copy_(emb.weight.data)
    assert torch.equal(emb(ids), reference(ids))
    scaled = TokenEmbedding(vocab_size=10, d_model=4, scale=True)
    scaled.weight.data.copy_(emb.weight.data)
    torch.testing.assert_close(scaled(ids), emb(ids) * 2.0, rtol=0, atol=0)


def test_learned_positional_embedding_is_trainable_lookup():
    pe = LearnedPositionalEmbedding(max_len=5, d_model=3)
    torch.nn.init.normal_(pe.weight)
    out = pe(torch.arange(5))
    assert torch.equal(out, pe.weight)
    out.sum().backward()
    assert pe.weight.grad is not None


@pytest.mark.parametrize(
    "case", ["sliced head", "plain head", "penalty", "two passes", "no logits"]
)
def test_a_tied_table_s_gradient_is_dense_and_the_sum_of_all_its_uses(case):
    # the lookup's part sparse where its pass's head gave a dense one, else dense; with a
    # third use of the table (a penalty), two forward passes in one backward, or the logits
    # unused: always the exact sum, dense, against the uses taken apart and summed
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 8, generator=g, dtype=torch.float64)
    ids = torch.tensor([[3, 7, 3], [0, 49, 3]])
    mix = torch.randn(8, 8, generator=g, dtype=torch.float64)

    def loss(lookup, head, w):
        h = torch.tanh(lookup(ids) @ mix)
        total = h.sum() if case == "no logits" else (head(h) ** 2).sum()
        if case == "two passes":
            total = total + (head(torch.tanh(lookup(ids.flip(0)) @ mix)) ** 3).sum()
        return total + (w**2).sum() if case == "penalty" else total

    w = torch.nn.Parameter(table.clone())

    def linked(ids_):
        tied = links.setdefault(ids_.data_ptr(), TiedGradient())
        return TiedLookup.apply(ids_, w, tied)

    def head(h):
        if case == "plain head":
            return h @ w.T
        return sliced_head(h, w, list(links.values())[-1])

    links: dict = {}
    loss(linked, head, w).backward()
    assert w.grad.layout == torch.strided
    apart = [table.clone().requires_grad_() for _ in range(3)]
    loss(
        lambda i: torch.nn.functional.embedding(i, apart[0]),
        lambda h: h @ apart[1].T,
        apart[2],
    ).backward()
    expected = sum(a.grad for a in apart if a.grad is not None)
    torch.testing.assert_close(w.grad, expected, rtol=1e-12, atol=1e-14)
    gave = [tied.head_gave for tied in links.values()]
    assert gave == ([False] if case in ("plain head", "no logits") else [True] * len(links))


def test_the_tied_lookup_runs_only_in_training_under_half_precision_autocast_on_the_cpu():
    embedding = TokenEmbedding(50, 8)
    ids = torch.tensor([[1, 2]])
    tied = TiedGradient()
    out = embedding(ids, tied=tied)  # float32: the plain lookup, twice differentiable
    assert out.grad_fn.name() == "EmbeddingBackward0"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "TiedLookup" in embedding(ids, tied=tied).grad_fn.name()
        with torch.no_grad():
            assert embedding(ids, tied=tied).grad_fn is None
