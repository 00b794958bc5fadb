import pytest
import torch
from torch.nn import functional as F

from tformer.train import losses
from tformer.train.losses import label_smoothed_cross_entropy
from tformer.train.optim import inverse_sqrt_learning_rate


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_torch_cross_entropy_and_ignores_padding(smoothing):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 3
    targets = torch.randint(0, 11, (3, 7), generator=g)
    targets[0, 5:] = -100  # padding
    targets[2, 2:] = -100
    ours = label_smoothed_cross_entropy(logits, targets, smoothing)
    reference = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=-100, label_smoothing=smoothing
    )
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    # The padded positions' logits do not matter.
    changed = logits.clone()
    changed[0, 5:] = 100.0
    torch.testing.assert_close(label_smoothed_cross_entropy(changed, targets, smoothing), ours)


def test_label_smoothing_is_the_cross_entropy_against_the_smoothed_distribution():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    target = torch.tensor([1])
    q = torch.full((4,), 0.1 / 4)
    q[1] += 0.9
    expected = -(q * torch.log_softmax(logits[0], -1)).sum()
    torch.testing.assert_close(label_smoothed_cross_entropy(logits, target, 0.1), expected)


def test_inverse_sqrt_schedule_is_the_papers_formula():
    d, warmup = 512, 4000
    paper = [d**-0.5 * min(n**-0.5, n * warmup**-1.5) for n in range(1, 4 * warmup + 1)]
    ours = [inverse_sqrt_learning_rate(s, (d * warmup) ** -0.5, warmup) for s in range(4 * warmup)]
    assert ours == pytest.approx(paper, rel=1e-9)
    peak = max(range(len(ours)), key=ours.__getitem__)
    assert peak == warmup - 1 and ours[peak] == pytest.approx((d * warmup) ** -0.5)
    assert ours[-1] == pytest.approx(ours[peak] / 2)  # 1 / sqrt(n): n = 4 warmup


def test_label_smoothing_gradient_equals_torch_over_several_blocks():
    """More rows than one block, with padding: loss and gradient against torch's own."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(5, 40, 37, generator=g, dtype=torch.float64) * 4).requires_grad_()
    targets = torch.randint(0, 37, (5, 40), generator=g)
    targets[1, 30:] = -100
    targets[4, 3:] = -100
    ours = label_smoothed_cross_entropy(logits, targets, 0.1)
    (grad,) = torch.autograd.grad(ours * 3.0, logits)
    reference = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=-100, label_smoothing=0.1
    )
    (expected,) = torch.autograd.grad(reference * 3.0, logits)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert grad[4, 3:].abs().max() == 0  # padding gets no gradient


def test_a_gpu_s_blocks_are_larger_and_give_the_same_loss(monkeypatch):
    assert losses.block_rows(torch.empty(10, 50257)) == losses.ROWS_PER_BLOCK  # the CPU's
    # off the CPU: as many rows as fit 2^26 values, for few kernel launches
    assert losses.block_rows(torch.empty(10, 50257, device="meta")) == (1 << 26) // 50257
    assert losses.block_rows(torch.empty(10, 1 << 27, device="meta")) == losses.ROWS_PER_BLOCK
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(200, 37, generator=g, dtype=torch.float64) * 4).requires_grad_()
    targets = torch.randint(0, 37, (200,), generator=g)
    results, asked = [], []
    for rows in (7, 1000):  # float64: torch's path, a block at a time
        monkeypatch.setattr(
            losses, "block_rows", lambda logits, rows=rows: asked.append(rows) or rows
        )
        loss = label_smoothed_cross_entropy(logits, targets, 0.1)
        results.append((loss, *torch.autograd.grad(loss, logits)))
    assert asked == [7, 7, 1000, 1000]  # forward and backward each ask
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_label_smoothing_passes_gradcheck():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(70, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (70,), generator=g)
    targets[::7] = -100
    assert torch.autograd.gradcheck(
        lambda x: label_smoothed_cross_entropy(x, targets, 0.2), (logits,)
    )


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_label_smoothing_on_bfloat16_logits_is_computed_in_float32(compiled, monkeypatch):
    """bf16 logits (as autocast gives them): the loss is the float32 loss of the same
    numbers, and the gradient comes back in bf16, rounded from the float32 one; on the
    compiled C path and on torch's."""
    if not compiled:
        monkeypatch.setattr(losses, "cpu_kernels", lambda logits: None)
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(130, 8000, generator=g) * 3).bfloat16().requires_grad_()
    targets = torch.randint(0, 8000, (130,), generator=g)
    ours = label_smoothed_cross_entropy(logits, targets, 0.1)
    (grad,) = torch.autograd.grad(ours, logits)
    exact = logits.detach().float().requires_grad_()
    reference = F.cross_entropy(exact, targets, label_smoothing=0.1)
    (expected,) = torch.autograd.grad(reference, exact)
    assert ours.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.float(), expected, rtol=1e-2, atol=1e-9)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_label_smoothing_on_float32_logits_equals_torch(compiled, monkeypatch):
    """float32 logits (a float32 model): loss and gradient equal torch's cross_entropy, on
    the compiled C path and on torch's."""
    if not compiled:
        monkeypatch.setattr(losses, "cpu_kernels", lambda logits: None)
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(130, 8000, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, 8000, (130,), generator=g)
    ours = label_smoothed_cross_entropy(logits, targets, 0.1)
    (grad,) = torch.autograd.grad(ours * 2.0, logits)
    exact = logits.detach().double().requires_grad_()
    reference = F.cross_entropy(exact, targets, label_smoothing=0.1)
    (expected,) = torch.autograd.grad(reference * 2.0, exact)
    assert ours.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_impossible_classes_at_minus_infinity_give_a_finite_loss(compiled, dtype, monkeypatch):
    """Logits of -inf (the padded positions of a QA window) are legal without smoothing:
    the loss and its gradient equal torch's, with zero gradient there."""
    if not compiled:
        monkeypatch.setattr(losses, "cpu_kernels", lambda logits: None)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 40, generator=g)
    logits[:, 30:] = float("-inf")
    logits = logits.to(dtype).requires_grad_()
    targets = torch.randint(0, 30, (6,), generator=g)
    ours = label_smoothed_cross_entropy(logits, targets, 0.0)
    (grad,) = torch.autograd.grad(ours, logits)
    exact = logits.detach().float().requires_grad_()
    reference = F.cross_entropy(exact, targets)
    (expected,) = torch.autograd.grad(reference, exact)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.float(), expected, rtol=1e-2, atol=1e-6)
    assert torch.equal(grad[:, 30:].float(), torch.zeros(6, 10))


@pytest.mark.parametrize("bad", [-5, 11])
def test_targets_outside_the_vocabulary_are_refused(bad):
    logits = torch.randn(4, 11).bfloat16()
    targets = torch.tensor([1, -100, bad, 3])
    with pytest.raises(ValueError, match=r"targets must be in \[0, 11\)"):
        label_smoothed_cross_entropy(logits, targets, 0.1)


@pytest.mark.parametrize("bad", [-5, 11])
def test_targets_outside_the_vocabulary_are_refused_without_padding_too(bad):
    with pytest.raises(ValueError, match=r"targets must be in \[0, 11\)"):
        label_smoothed_cross_entropy(torch.randn(3, 11), torch.tensor([1, bad, 3]), 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_without_padding_the_loss_and_its_gradient_are_the_padded_path_s(dtype):
    """Every target scored takes a shorter path (no mask): the same numbers as with one."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 9, 13, generator=g) * 2).to(dtype).requires_grad_()
    targets = torch.randint(0, 13, (2, 9), generator=g)
    ours = label_smoothed_cross_entropy(logits, targets, 0.1)
    (grad,) = torch.autograd.grad(ours, logits)
    # the same rows once more, with a padded row after them that the mean leaves out
    padded_logits = torch.cat([logits.detach(), torch.randn(1, 9, 13).to(dtype)]).requires_grad_()
    padded_targets = torch.cat([targets, torch.full((1, 9), -100)])
    reference = label_smoothed_cross_entropy(padded_logits, padded_targets, 0.1)
    (reference_grad,) = torch.autograd.grad(reference, padded_logits)
    assert torch.equal(ours, reference)
    assert torch.equal(grad, reference_grad[:2])
    # targets read through a stride (every other one) are the targets, not their neighbours
    every_other = torch.stack([targets.flatten(), torch.full((18,), 99)], 1).flatten()[::2]
    assert torch.equal(label_smoothed_cross_entropy(logits, every_other, 0.1), ours)


def test_a_non_negative_ignore_index_is_still_ignored():
    """A pad id inside the vocabulary (0 here) is left out, as torch's ignore_index does."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 5, generator=g)
    targets = torch.tensor([0, 3, 1, 0, 4, 2])
    ours = label_smoothed_cross_entropy(logits, targets, 0.0, ignore_index=0)
    torch.testing.assert_close(ours, F.cross_entropy(logits, targets, ignore_index=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_targets_of_any_integer_dtype_give_the_int64_loss(dtype):
    """int32 targets (as a user's own data may hold them) on the compiled path too, which
    reads int64; and the kernel's binding refuses what it cannot read."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(40, 300, generator=g).to(dtype)
    targets = torch.randint(0, 300, (40,), generator=g)
    expected = label_smoothed_cross_entropy(logits, targets, 0.1)
    torch.testing.assert_close(label_smoothed_cross_entropy(logits, targets.int(), 0.1), expected)
    padded = targets.clone()
    padded[::3] = -100  # with ignored positions, which take the masked path
    expected = label_smoothed_cross_entropy(logits, padded, 0.1)
    torch.testing.assert_close(label_smoothed_cross_entropy(logits, padded.int(), 0.1), expected)
    compiled = losses.cpu_kernels(logits)
    if compiled is not None:
        with pytest.raises(ValueError, match="targets must be int64"):
            compiled.smoothed_ce_forward(logits, targets.int(), 0.1)
        with pytest.raises(ValueError, match="logits must be"):
            compiled.smoothed_ce_forward(logits.half(), targets, 0.1)


def test_the_loss_has_no_second_derivative_to_give_wrongly():
    """The gradient is computed, not traced: differentiating it again is refused."""
    logits = torch.randn(8, 50, requires_grad=True)
    loss = label_smoothed_cross_entropy(logits, torch.randint(0, 50, (8,)), 0.1)
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.square().sum(), logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("upstream", [1.0, 0.3, 0.25])  # the loss as it is, scaled, halved
def test_the_gradient_written_by_the_forward_pass_is_the_loss_s_gradient(dtype, upstream):
    """The compiled path writes the gradient for d(total)/d(loss) = 1 in the forward pass
    and scales it in the backward pass: against float64 torch, for the loss as it is and
    scaled (as gradient accumulation divides it); a second backward pass over the same
    graph gives the same gradient, computed afresh."""
    if losses.cpu_kernels(torch.empty(0)) is None:
        pytest.skip("the compiled kernels are not available here")
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(70, 3000, generator=g) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 3000, (70,), generator=g)
    loss = label_smoothed_cross_entropy(logits, targets, 0.1) * upstream
    (first,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (second,) = torch.autograd.grad(loss, logits)
    exact = logits.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(
        F.cross_entropy(exact, targets, label_smoothing=0.1) * upstream, exact
    )
    # bf16: the gradient rounded to 8 bits, and once more where scaled by 0.3
    rtol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    for grad in (first, second):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=1e-11)


def test_no_gradient_is_written_where_none_is_wanted(monkeypatch):
    """Scoring without autograd (evaluation) or logits that need no gradient take the
    forward kernel alone."""
    if losses.cpu_kernels(torch.empty(0)) is None:
        pytest.skip("the compiled kernels are not available here")
    kernels = type(losses.cpu_kernels(torch.empty(0)))

    def refuse(*args, **kwargs):
        raise AssertionError("the gradient was computed")

    monkeypatch.setattr(kernels, "smoothed_ce_forward_backward", refuse)
    logits = torch.randn(5, 40).bfloat16()
    targets = torch.randint(0, 40, (5,))
    expected = F.cross_entropy(logits.float(), targets)
    torch.testing.assert_close(label_smoothed_cross_entropy(logits, targets, 0.0), expected)
    with torch.no_grad():
        scored = label_smoothed_cross_entropy(logits.requires_grad_(), targets, 0.0)
    torch.testing.assert_close(scored, expected)
