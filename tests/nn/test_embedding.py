import math

import pytest
import torch

from tformer.nn import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    TokenEmbedding,
    embedding,
    sinusoidal_table,
)
from tformer.nn.embedding import TiedLookup, TiedTable
from tformer.nn.head_product import head_product


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
    "case", ["head product", "plain head", "penalty", "two passes", "two heads", "no logits"]
)
def test_a_tied_table_s_gradient_is_dense_and_the_sum_of_all_its_uses(case, tied_sums):
    # the lookup's rows added into the head's gradient where both take the pass's
    # TiedTable; with the head on the Parameter itself, a third use of the table (a
    # penalty), two forward passes in one backward, the head used twice, or the logits
    # unused: always the exact sum, dense, against the uses taken apart and summed
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 8, generator=g, dtype=torch.float64)
    ids = torch.tensor([[3, 7, 3], [0, 49, 3]])  # a row looked up three times
    mix = torch.randn(8, 8, generator=g, dtype=torch.float64)

    def loss(lookup, head, w):
        h = torch.tanh(lookup(ids) @ mix)
        total = h.sum() if case == "no logits" else (head(h) ** 2).sum()
        if case == "two passes":
            total = total + (head(torch.tanh(lookup(ids.flip(0)) @ mix)) ** 3).sum()
        if case == "two heads":
            total = total + head(h * 0.5).sum()
        return total + (w**2).sum() if case == "penalty" else total

    w = torch.nn.Parameter(table.clone())
    tables: list[TiedTable] = []

    def linked(ids_):
        tables.append(TiedTable(w))  # one per forward pass
        return TiedLookup.apply(ids_, tables[-1].lookup)

    def head(h):
        if case == "plain head":
            return h @ w.T
        return head_product(h, w, tables[-1])

    in_place = tied_sums  # whether each sum came back as the head's own gradient
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
    # in place where the head's own dW came (two heads' sum is autograd's tensor)
    summed = case in ("head product", "penalty", "two passes")
    assert in_place == [summed] * len(tables)


def test_a_gradient_the_head_product_did_not_make_is_not_written_in_place():
    # the head alias taken by an operation that hands its gradient on as it came: that
    # tensor is another's gradient too, and the sum goes into a new one
    w = torch.nn.Parameter(torch.zeros(5, 2))
    p = torch.nn.Parameter(torch.zeros(5, 2))
    other = p * 2  # made first: its backward runs after the table's, reading the gradient
    tied = TiedTable(w)
    ids = torch.tensor([1, 1, 3])
    head = (tied.head + other) * torch.ones(5, 2)
    (head.sum() + TiedLookup.apply(ids, tied.lookup).sum()).backward()
    torch.testing.assert_close(p.grad, torch.full((5, 2), 2.0))
    expected = torch.ones(5, 2)
    expected[1] += 2
    expected[3] += 1
    torch.testing.assert_close(w.grad, expected)


def test_a_tied_table_s_head_alone_gives_its_gradient_and_the_table_is_not_copied():
    w = torch.nn.Parameter(torch.randn(40, 4, dtype=torch.float64))
    tied = TiedTable(w)
    assert tied.head.data_ptr() == tied.lookup.data_ptr() == w.data_ptr()
    x = torch.randn(3, 4, dtype=torch.float64)
    head_product(x, w, tied).sum().backward()  # the lookup unused
    torch.testing.assert_close(w.grad, x.sum(0).expand(40, 4), rtol=1e-12, atol=1e-12)


def test_tied_tables_are_linked_only_in_training_under_half_precision_autocast_on_the_cpu():
    table = TokenEmbedding(50, 8)
    ids = torch.tensor([[1, 2]])
    assert not embedding.links_tied_gradients(table.weight)  # float32: twice differentiable
    assert table(ids).grad_fn.name() == "EmbeddingBackward0"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert embedding.links_tied_gradients(table.weight)
        assert "TiedLookup" in table(ids, tied=TiedTable(table.weight)).grad_fn.name()
        assert not embedding.links_tied_gradients(table.weight.to("meta"))  # off the CPU
        with torch.no_grad():
            assert not embedding.links_tied_gradients(table.weight)
