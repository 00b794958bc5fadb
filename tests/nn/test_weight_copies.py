import gc

import pytest
import torch

from tformer import kernels
from tformer.nn import weight_copies
from tformer.nn.weight_copies import half_weight
from tformer.train.optim import AdamW


@pytest.fixture(autouse=True)
def keeping():
    with weight_copies.kept_between_steps():
        yield


def test_a_training_weight_keeps_its_bf16_cast_until_it_changes():
    w = torch.nn.Parameter(torch.randn(32, 16))
    weight_copies.register([w])  # as its optimizer does
    first = half_weight(w, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, w.detach().bfloat16())
    assert half_weight(w, torch.bfloat16) is first  # kept
    with torch.no_grad():
        w.mul_(3.0)  # an in-place change bumps the version: the copy is stale
    second = half_weight(w, torch.bfloat16)
    assert second is not first and torch.equal(second, w.detach().bfloat16())
    w.data = torch.randn(32, 16)  # new storage
    assert torch.equal(half_weight(w, torch.bfloat16), w.detach().bfloat16())


@pytest.mark.parametrize(
    "weight",
    [torch.randn(4, 4), torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)],
)
def test_only_trainable_parameters_keep_a_copy(weight):
    weight_copies.register([weight])
    assert half_weight(weight, torch.bfloat16) is not half_weight(weight, torch.bfloat16)
    assert torch.equal(half_weight(weight, torch.float16), weight.half())


def test_the_optimizer_writes_the_copy_the_next_forward_pass_reads():
    if kernels.load() is None:
        pytest.skip("the C kernels are not built here")
    w = torch.nn.Parameter(torch.randn(64, 32))
    optimizer = AdamW([{"params": [w]}], lr=1e-2, betas=(0.9, 0.95))
    copy = half_weight(w, torch.bfloat16)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        optimizer.step(max_grad_norm=1.0)
        assert torch.equal(copy, w.detach().bfloat16())  # written in the update's pass
        assert half_weight(w, torch.bfloat16) is copy  # and taken as it is, no new cast
    assert weight_copies.copy_to_write(w) is copy


def test_copies_are_kept_only_inside_the_block_and_dropped_on_leaving_it():
    w = torch.nn.Parameter(torch.randn(8, 8))
    weight_copies.register([w])
    with weight_copies.kept_between_steps():  # nested in the fixture's block
        kept = half_weight(w, torch.bfloat16)
    assert half_weight(w, torch.bfloat16) is kept  # the outer block is still open
    weight_copies._COPIES.clear()
    assert not weight_copies.any_kept()


def test_outside_the_block_nothing_is_kept():
    w = torch.nn.Parameter(torch.randn(8, 8))
    weight_copies.register([w])
    # the fixture's block is open: leave it for this check by hand
    weight_copies._KEEPING -= 1
    try:
        assert half_weight(w, torch.bfloat16) is not half_weight(w, torch.bfloat16)
        assert weight_copies.copy_to_write(w) is None
    finally:
        weight_copies._KEEPING += 1


def test_a_weight_no_optimizer_writes_the_copy_of_keeps_none():
    # a sharded model's gathered weights, say: written in place by a collective
    w = torch.nn.Parameter(torch.randn(8, 8))
    assert half_weight(w, torch.bfloat16) is not half_weight(w, torch.bfloat16)
    torch.optim.AdamW([w])  # torch's optimizer writes no copies either
    assert weight_copies.copy_to_write(w) is None and not weight_copies.keeps_copy(w)


def test_copies_are_filed_by_identity_and_go_with_their_weight():
    files = weight_copies.ByIdentity()
    a, b = torch.zeros(4), torch.zeros(4)  # equal, yet two weights
    files[a], files[b] = "a", "b"
    assert (files.get(a), files.get(b), len(files)) == ("a", "b", 2)
    files[a] = "a again"  # replaced, not added
    assert files.get(a) == "a again" and len(files) == 2 and a in files
    del a
    gc.collect()
    assert len(files) == 1 and files.get(b) == "b"
    assert files.get(torch.zeros(4)) is None and torch.zeros(4) not in files
