import copy
import math

import pytest
import torch

from tformer import GPT2, GPT2Config, kernels
from tformer.nn import weight_copies
from tformer.nn.weight_copies import half_weight
from tformer.train.optim import AdamW, build_optimizer, global_norm, learning_rate


def groups(model: torch.nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def tiny_pair() -> tuple[GPT2, GPT2]:
    config = GPT2Config(vocab_size=30, max_len=16, d_model=16, n_layers=2, n_heads=2, dropout=0.0)
    return GPT2(config, seed=0), GPT2(config, seed=0)


def train_steps(model, optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (step + 1) / steps  # a schedule, as the trainer sets it
        model(torch.randint(0, 30, (3, 16), generator=g)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_weight_decay_only_on_matrices():
    model = GPT2(GPT2Config(vocab_size=20, max_len=8, d_model=8, n_layers=2, n_heads=2))
    decay, no_decay = build_optimizer(model, 1e-3, 0.1, (0.9, 0.99)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    counted = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert counted == model.num_parameters()  # every parameter once, the tied one included


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    lr, low, warmup, decay = 1e-3, 1e-4, 100, 2000
    assert learning_rate(0, lr, low, warmup, decay) == pytest.approx(lr / 101)
    assert learning_rate(99, lr, low, warmup, decay) == pytest.approx(lr * 100 / 101)
    assert learning_rate(100, lr, low, warmup, decay) == pytest.approx(lr)
    middle = (100 + 2000) // 2
    assert learning_rate(middle, lr, low, warmup, decay) == pytest.approx((lr + low) / 2)
    assert learning_rate(2000, lr, low, warmup, decay) == pytest.approx(low)
    assert learning_rate(5000, lr, low, warmup, decay) == low
    r = (1500 - 100) / 1900
    expected = low + (lr - low) * 0.5 * (1 + math.cos(math.pi * r))
    assert learning_rate(1500, lr, low, warmup, decay) == pytest.approx(expected)


def test_adamw_decay_is_decoupled_from_the_gradient():
    w = torch.nn.Parameter(torch.ones(2, 2))
    model = torch.nn.Module()
    model.w = w
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5, betas=(0.9, 0.99))
    w.grad = torch.zeros(2, 2)  # no gradient: only the decay acts
    opt.step()
    torch.testing.assert_close(w.data, torch.full((2, 2), 1 - 0.1 * 0.5))


def test_adamw_is_torch_s_fused_adamw_to_the_last_bit():
    ours, theirs = tiny_pair()
    our_optimizer = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95))
    their_optimizer = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), fused=True)
    train_steps(ours, our_optimizer, 5)
    train_steps(theirs, their_optimizer, 5)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
    ours_saved, theirs_saved = our_optimizer.state_dict(), their_optimizer.state_dict()
    for our_group, their_group in zip(
        ours_saved["param_groups"], theirs_saved["param_groups"], strict=True
    ):  # torch's keys vary with its version: the ones it has must agree
        assert {key: our_group[key] for key in their_group} == their_group
    for key, state in theirs_saved["state"].items():
        for name, tensor in state.items():
            assert torch.equal(ours_saved["state"][key][name], tensor)


def test_adamw_state_moves_to_and_from_torch_s_and_training_goes_on_alike():
    ours, theirs = tiny_pair()
    our_optimizer = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95))
    train_steps(ours, our_optimizer, 3)
    theirs.load_state_dict(ours.state_dict())
    their_optimizer = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), fused=True)
    their_optimizer.load_state_dict(our_optimizer.state_dict())  # ours -> torch's
    back = AdamW(groups(ours), lr=1.0, betas=(0.5, 0.5))
    back.load_state_dict(their_optimizer.state_dict())  # torch's -> ours, settings included
    assert back.param_groups[0]["betas"] == (0.9, 0.95)
    train_steps(ours, back, 2, seed=1)
    train_steps(theirs, their_optimizer, 2, seed=1)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)


def test_adamw_state_by_name_refuses_another_model_s():
    ours, _ = tiny_pair()
    optimizer = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95))
    train_steps(ours, optimizer, 1)
    names = {p: name for name, p in ours.named_parameters()}
    saved = optimizer.state_dict(names=names)
    assert "blocks.0.attn.w_qkv.weight" in saved["state"]
    other = GPT2(GPT2Config(vocab_size=30, max_len=16, d_model=16, n_layers=3, n_heads=2))
    other_names = {p: name for name, p in other.named_parameters()}
    with pytest.raises(ValueError, match="other parameters"):
        AdamW(groups(other), lr=1e-2, betas=(0.9, 0.95)).load_state_dict(saved, other_names)


def test_adamw_updates_parameters_of_two_dtypes_in_one_group_as_torch_does():
    ours = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5).bfloat16())]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    our_optimizer = AdamW([{"params": ours, "weight_decay": 0.1}], lr=0.1, betas=(0.9, 0.99))
    their_optimizer = torch.optim.AdamW(
        [{"params": theirs, "weight_decay": 0.1}], lr=0.1, betas=(0.9, 0.99), fused=True
    )
    for step in range(3):
        for params, optimizer in ((ours, our_optimizer), (theirs, their_optimizer)):
            for p in params:
                p.grad = torch.full_like(p, 0.5 * (step + 1))
            optimizer.step()
    for p, q in zip(ours, theirs, strict=True):
        assert p.dtype == q.dtype and torch.equal(p, q)


def grads_of_scale(model: torch.nn.Module, scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * scale


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # a norm above max_grad_norm, one below
def test_clipping_inside_the_step_is_clip_grad_norm_then_the_step(scale):
    ours, theirs = tiny_pair()
    our_optimizer = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95))
    their_optimizer = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), fused=True)
    for step in range(3):
        grads_of_scale(ours, scale * (step + 1))
        grads_of_scale(theirs, scale * (step + 1))
        exact = math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in ours.parameters()))
        norm = our_optimizer.step(max_grad_norm=0.5)
        their_norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5, foreach=True)
        their_optimizer.step()
        # the norm before clipping: with the C kernels the exact one rounded to float32
        # (summed in double), where torch's float32 norm may differ in the last bits;
        # without them torch's own
        if kernels.load() is not None:
            assert norm.item() == pytest.approx(exact, rel=2**-24)
            torch.testing.assert_close(norm, their_norm, rtol=1e-6, atol=0)
        else:
            assert torch.equal(norm, their_norm)
        assert (norm > 0.5) == (scale == 1.0)
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            if scale == 1.0:  # g / (norm / c) against g * (c / norm): the last bit may differ
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            else:  # nothing to clip: exactly torch's
                assert torch.equal(p.grad, q.grad) and torch.equal(p, q)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours.parameters()]))
    if scale == 1.0:
        assert clipped.item() == pytest.approx(0.5, rel=1e-5)  # left clipped, as torch does


def test_clipping_without_gradients_is_no_update():
    model, _ = tiny_pair()
    before = [p.detach().clone() for p in model.parameters()]
    norm = AdamW(groups(model), lr=1e-2, betas=(0.9, 0.95)).step(max_grad_norm=1.0)
    assert norm.item() == 0.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_clipping_to_a_norm_that_is_not_positive_is_refused(bad):
    model, _ = tiny_pair()
    grads_of_scale(model, 1.0)
    with pytest.raises(ValueError, match="max_grad_norm must be positive"):
        AdamW(groups(model), lr=1e-2, betas=(0.9, 0.95)).step(max_grad_norm=bad)


def test_the_global_norm_of_many_gradients_is_the_exact_one():
    # one 20M-element gradient: torch's float32 norm of it is off in the third or fourth digit
    params = [torch.nn.Parameter(torch.empty(n)) for n in (20_000_000, 1, 3_000)]
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).mul_(3)
    exact = math.sqrt(sum(torch.dot(p.grad.double(), p.grad.double()).item() for p in params))
    rel = 2**-24 if kernels.load() is not None else 1e-2  # the kernel's; torch's, as measured
    assert global_norm(params).item() == pytest.approx(exact, rel=rel)
    assert global_norm(params).dtype == torch.float32


def test_the_global_norm_of_gradients_the_kernel_cannot_read_is_torch_s():
    # a bfloat16 gradient and a transposed one: the C kernel refuses them, torch's norm takes all
    params = [torch.nn.Parameter(torch.empty(n, 3)) for n in (4, 5)]
    params[0].grad = torch.randn(4, 3)
    params[1].grad = torch.randn(3, 5).t()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    torch.testing.assert_close(global_norm(params), expected, rtol=1e-6, atol=0)
    bf16 = torch.nn.Parameter(torch.empty(6, dtype=torch.bfloat16))
    bf16.grad = torch.randn(6).bfloat16()
    exact = math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in [*params, bf16]))
    assert global_norm([*params, bf16]).item() == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 1e9, None])
def test_the_compiled_step_is_torch_s_fused_adamw_to_the_last_bit(max_norm):
    # two groups; sizes that are multiples of 16 go to the C kernel, the others to torch's,
    # in the same step with the same scale: both exact; clipping (0.5), a bound no norm
    # reaches (a scale of 1) and none
    g = torch.Generator().manual_seed(3)
    shapes = [(32, 48), (16,), (5, 3), (7,), (64, 64), (32,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    settings = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)

    def split(params):
        return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:]}]

    # as the trainer's loop: a forward pass keeps copies of the first five
    with weight_copies.kept_between_steps():
        our_optimizer = AdamW(split(ours), weight_decay=0.0, **settings)
        their_optimizer = torch.optim.AdamW(split(theirs), weight_decay=0.0, **settings, fused=True)
        copies = [half_weight(p, torch.bfloat16) for p in ours[:5]]
        for step in range(4):
            for group in (*our_optimizer.param_groups, *their_optimizer.param_groups):
                group["lr"] = 3e-2 / (step + 1)  # a schedule
            for p, q in zip(ours, theirs, strict=True):
                p.grad = torch.randn(p.shape, generator=g) * (step + 1)
                q.grad = p.grad.clone()
            expected_norm = global_norm(theirs)
            norm = our_optimizer.step(max_grad_norm=max_norm)
            if max_norm is None:
                assert norm is None
            else:  # the same scale for torch: s = max(1, ||g|| / c) as a float32 tensor
                assert torch.equal(norm, expected_norm)
                torch._foreach_div_(
                    [q.grad for q in theirs], ((norm + 1e-6) / max_norm).clamp(min=1.0)
                )
            their_optimizer.step()
            for p, q in zip(ours, theirs, strict=True):
                assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
            if kernels.load() is not None:  # the kernel wrote the copies of what it took
                for i in (0, 1, 4):
                    assert torch.equal(copies[i], ours[i].detach().bfloat16())
                    assert weight_copies.copy_to_write(ours[i]) is copies[i]  # still current
        for p, q in zip(ours, theirs, strict=True):
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(our_optimizer.state[p][name], their_optimizer.state[q][name])
        assert (our_optimizer.layout is not None) == (kernels.load() is not None)
    assert not weight_copies.any_kept()  # dropped with the block


def test_the_compiled_step_follows_state_that_moved():
    # a state loaded into the same optimizer mid-run: the next step updates the new tensors
    # (the loaded moments differ from the ones in place, so the old tensors would not do)
    ours, theirs = tiny_pair()
    our_optimizer = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95))
    train_steps(ours, our_optimizer, 2)
    saved = copy.deepcopy(our_optimizer.state_dict())
    for state in saved["state"].values():
        state["exp_avg"].mul_(0.5)
    their_optimizer = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), fused=True)
    theirs.load_state_dict(ours.state_dict())
    their_optimizer.load_state_dict(copy.deepcopy(saved))
    our_optimizer.load_state_dict(saved)  # new tensors for every moment and step
    train_steps(ours, our_optimizer, 2, seed=1)
    train_steps(theirs, their_optimizer, 2, seed=1)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
    # one parameter's state replaced by hand: its moments start again, in both
    p, q = next(ours.parameters()), next(theirs.parameters())
    for optimizer, param in ((our_optimizer, p), (their_optimizer, q)):
        optimizer.state[param] = {
            "step": torch.zeros(()),
            "exp_avg": torch.zeros_like(param),
            "exp_avg_sq": torch.zeros_like(param),
        }
    train_steps(ours, our_optimizer, 2, seed=2)
    train_steps(theirs, their_optimizer, 2, seed=2)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)


def compiled_kernels():
    library = kernels.load()
    if library is None:
        pytest.skip("the C kernels are not built here")
    return library


GROUP = {"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}


def test_the_kernel_refuses_states_it_cannot_update():
    library = compiled_kernels()
    p, step = torch.zeros(16), torch.zeros(())
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.AdamWPlan([(p, p.clone().bfloat16(), p.clone(), step, 0, True)])
    with pytest.raises(ValueError, match="another size"):
        kernels.AdamWPlan([(p, torch.zeros(32), p.clone(), step, 0, True)])
    with pytest.raises(ValueError, match="float32 CPU scalar"):
        kernels.AdamWPlan([(p, p.clone(), p.clone(), torch.zeros(2), 0, True)])
    plan = kernels.AdamWPlan([(p, p.clone(), p.clone(), step, 0, True)])
    for grad, half, message in [
        (torch.ones(16).bfloat16(), None, "contiguous float32"),
        (torch.ones(32, 2)[:, 0], None, "contiguous float32"),
        (torch.ones(32), None, "another size"),
        (torch.ones(16), torch.zeros(16), "bf16 tensor"),
    ]:
        with pytest.raises(ValueError, match=message):
            library.adamw_step(plan, [grad], [half], [GROUP], 1.0)
    assert torch.equal(p, torch.zeros(16)) and step.item() == 0  # nothing changed


def test_the_kernel_s_copy_is_torch_s_cast_to_the_bit_nan_and_infinities_included():
    library = compiled_kernels()
    p = torch.randn(48, generator=torch.Generator().manual_seed(0)) * 1e3
    p[[3, 20]] = float("nan")
    p[[4, 21]] = -float("nan")
    p[[5, 22]] = float("inf")
    p[[6, 40]] = -float("inf")
    p[7] = 1.0 + 2**-8  # halfway between two bf16 values: rounds to the even one
    g, m, v = torch.zeros(48), torch.zeros(48), torch.zeros(48)
    half = torch.empty(48, dtype=torch.bfloat16)
    step = torch.zeros(())
    plan = kernels.AdamWPlan([(p, m, v, step, 0, True)])
    library.adamw_step(plan, [g], [half], [GROUP], None)
    assert step.item() == 1
    assert torch.equal(half.view(torch.int16), p.bfloat16().view(torch.int16))


def test_a_parameter_given_twice_is_refused():
    p = torch.nn.Parameter(torch.zeros(16))
    with pytest.raises(ValueError, match="appears twice"):
        AdamW([{"params": [p]}, {"params": [p]}], lr=0.1, betas=(0.9, 0.99))
