"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule.

AdamW (Loshchilov and Hutter, 2019) shrinks weights by lr * wd each step, separately from
the gradient step. For a parameter p with gradient g at step t = 1, 2, ...:

    m = b1 m + (1 - b1) g                                   first moment (exp_avg)
    v = b2 v + (1 - b2) g^2                                 second moment (exp_avg_sq)
    p = p - lr wd p                                         decoupled weight decay
    p = p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Only matrices (weights of linear layers and embeddings) decay; biases and LayerNorm gains
stay free, as decaying them only hurts.

Gradient clipping by global norm, with max_norm c: all gradients, taken as one vector g,

    g = g / max(1, (||g|| + 1e-6) / c)

which is torch.nn.utils.clip_grad_norm_'s rule. AdamW.step(max_grad_norm=c) applies it in
the same fused pass as the update (the kernel's grad_scale), not as a pass of its own.

Schedule (as in GPT-2/3 training and nanoGPT), for step s = 0, 1, ...:

    s < warmup:             lr * (s + 1) / (warmup + 1)                  linear warm-up
    warmup <= s <= decay:   min_lr + (lr - min_lr) * (1 + cos(pi r)) / 2  cosine decay,
                            r = (s - warmup) / (decay - warmup)
    s > decay:              min_lr

The original Transformer's schedule (Vaswani et al., 2017, sec. 5.3), for step n = s + 1:

    lr = d_model^-0.5 * min(n^-0.5, n * warmup^-1.5)  =  peak * min(n / warmup, sqrt(warmup / n))

rises linearly for `warmup` steps to its peak (d_model * warmup)^-0.5, then decays as
1 / sqrt(n) (the paper: warmup 4000). Here the peak is a setting like any learning rate.
"""

import math

import torch
from torch import nn

from tformer import kernels
from tformer.nn import weight_copies


class StepLayout:
    """The tensors of a compiled AdamW step, laid out for the C kernel once and reused while
    it fits them: entries per parameter (param, exp_avg, exp_avg_sq, step, group index,
    compiled), each parameter's state dict, the kernel's plan of them, and what follows
    from them."""

    def __init__(
        self,
        kinds: list[tuple[list[torch.Tensor], dict]],
        entries: list[tuple],
        states: list[dict],
        plan: "kernels.AdamWPlan",
    ) -> None:
        self.entries, self.states, self.plan = entries, states, plan
        self.groups = [(len(ps), id(group)) for ps, group in kinds]  # how they split
        # where each tensor the kernel reads and writes is: moved storage is a new layout
        self.addresses = [tuple(x.data_ptr() for x in entry[:4]) for entry in entries]
        self.compiled = [entry[-1] for entry in entries]
        # what the kernel writes in place each step, for the version counters
        self.written = [x for *tensors, _, compiled in entries if compiled for x in tensors]
        # per group, the parameters left to torch's kernel
        self.rest = [[e[0] for e in entries if e[4] == g and not e[-1]] for g in range(len(kinds))]

    def fits(self, kinds: list[tuple[list[torch.Tensor], dict]], state: dict) -> bool:
        """Whether the parameters of `kinds` are this layout's, split into the same groups
        in its order, each tensor where it was, with the same state dict in `state` (the
        optimizer's) holding the same moments and step."""
        if [(len(ps), id(group)) for ps, group in kinds] != self.groups:
            return False
        params = (p for ps, _ in kinds for p in ps)
        for p, entry, kept, address in zip(
            params, self.entries, self.states, self.addresses, strict=True
        ):
            q, m, v, t = entry[:4]
            if p is not q or state.get(p) is not kept:
                return False
            if kept["step"] is not t or kept["exp_avg"] is not m or kept["exp_avg_sq"] is not v:
                return False
            if (p.data_ptr(), m.data_ptr(), v.data_ptr(), t.data_ptr()) != address:
                return False
        return True


class AdamW:
    """AdamW over parameter groups (the equations above), each group with its own lr, betas,
    eps and weight_decay (the constructor's by default, as in torch.optim).

    For float32 on the CPU the whole step is one C call (kernels/adamw.c): the gradients'
    norm, then one pass over every tensor that also counts its step and writes each
    weight's bf16 copy for the next forward pass (nn/weight_copies.py); elsewhere PyTorch's
    fused AdamW kernel runs, a call per group. The numbers are
    torch.optim.AdamW(fused=True)'s to the last bit either way (tests hold them to each
    other; with clipping, see step). What this class leaves out is torch.optim's machinery:
    its bookkeeping on every step, and the compiler stack (torch._dynamo) that creating any
    torch.optim optimizer imports, both of which a small model's run notices (docs/LOG.md).

    The state is kept in torch.optim.AdamW's layout (per parameter: "step" as a float32
    scalar tensor, "exp_avg" m, "exp_avg_sq" v), and state_dict / load_state_dict use its
    numbered format, so checkpoints move between the two.
    """

    def __init__(
        self,
        param_groups: list[dict],
        lr: float,
        betas: tuple[float, float],
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.param_groups = [{**defaults, **group} for group in param_groups]
        for group in self.param_groups:
            group["params"] = list(group["params"])
        params = self.parameters()
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears twice in AdamW's groups: give each one once")
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self.layout: StepLayout | None = None  # compiled_layout's, kept while current
        weight_copies.register(self.parameters())  # compiled_step writes their bf16 copies

    def parameters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_of(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """p's state, created (step 0, zero moments) on its first update."""
        if p not in self.state:
            self.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        return self.state[p]

    @torch.no_grad()
    def step(self, max_grad_norm: float | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient. With max_grad_norm, the
        gradients are first clipped to that global norm (the rule above; they are left
        clipped, as clip_grad_norm_ leaves them), and the norm before clipping is returned.

        Clipping here costs one norm of each gradient: the division happens inside the
        update's own pass, where clip_grad_norm_ would spend a second pass (and, on the CPU,
        an op per tensor) multiplying them (docs/LOG.md). Dividing by ||g|| / c rather than
        multiplying by c / ||g|| can differ from clip_grad_norm_ in the last bit (and the
        norm too when the parameters are summed in another order).
        """
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive (or None), got {max_grad_norm}")
        kinds: list[tuple[list[torch.Tensor], dict]] = []
        for group in self.param_groups:
            by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
            kinds += [(params, group) for params in by_kind.values()]
        taken, norm = self.compiled_step(kinds, max_grad_norm)
        if taken:
            return norm
        norm = scale = None
        if max_grad_norm is not None:  # grad / scale, scale = max(1, (||g|| + 1e-6) / c)
            norm = global_norm([p for ps, _ in kinds for p in ps])
            scale = ((norm + 1e-6) / max_grad_norm).clamp(min=1.0)  # float32, as the norm
        for params, group in kinds:  # the fused kernel takes one device and dtype
            device = params[0].device
            self.update(params, group, None if scale is None else scale.to(device))
        return norm

    def update(
        self, params: list[torch.Tensor], group: dict, grad_scale: torch.Tensor | None = None
    ) -> None:
        """The equations above for `params` (one device, one dtype) in torch's fused kernel,
        with the group's lr, betas, eps and weight decay: t += 1, then one fused pass over
        each tensor, which first divides each gradient by grad_scale (a scalar tensor) if
        given."""
        states = [self.state_of(p) for p in params]
        torch._foreach_add_([state["step"] for state in states], 1)  # t
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(
            params,
            [p.grad for p in params],
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [],  # max_exp_avg_sqs: no amsgrad
            [state["step"] for state in states],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            amsgrad=False,
            maximize=False,
            grad_scale=grad_scale,
        )

    def compiled_step(
        self, kinds: list[tuple[list[torch.Tensor], dict]], max_grad_norm: float | None
    ) -> tuple[bool, torch.Tensor | None]:
        """step's work in one C call (kernels/adamw.c) where every parameter with a gradient
        is a contiguous float32 CPU tensor: the norm of all the gradients (global_norm's
        value), then the update of each tensor whose size is a multiple of 16, which also
        writes its bf16 copy where it keeps one (nn/weight_copies.py), so that the next
        forward pass casts none. torch updates the elements past its vector loop's last
        whole vector in a scalar loop whose rounding the kernel does not reproduce, so the
        other tensors go to torch's kernel, with the same scale. Returns (True, step's
        value); (False, None), having changed nothing, where the kernel cannot take them.

        The tensors' addresses are laid out once (kernels.AdamWPlan) and reused while none
        has moved: a small model's step spent more in Python calling the kernel than in it.
        """
        params = [p for ps, _ in kinds for p in ps]  # global_norm's order
        library = kernels.load_for(params[0], (torch.float32,)) if params else None
        if library is None:
            return False, None
        groups = [group for _, group in kinds]  # one kind per group here
        try:  # the plan checks every parameter and state, the kernel every gradient, first
            layout = self.compiled_layout(kinds)
            keeping = weight_copies.any_kept()
            copies = [
                weight_copies.copy_to_write(p) if keeping and compiled else None
                for p, compiled in zip(params, layout.compiled, strict=True)
            ]
            grads = [p.grad for p in params]
            clipped = library.adamw_step(layout.plan, grads, copies, groups, max_grad_norm)
        except ValueError:  # one tensor it cannot take: torch's path for all
            return False, None
        written = layout.written + [c for c in copies if c is not None]
        if clipped is not None:
            written += grads
        torch.autograd.graph.increment_version(written)  # in place, as torch's kernel
        for p, copy in zip(params, copies, strict=True):
            if copy is not None:
                weight_copies.written(p, copy)
        norm = scale = None
        if clipped is not None:
            norm, scale = (torch.tensor(x, dtype=torch.float32) for x in clipped)
        for rest, group in zip(layout.rest, groups, strict=True):  # torch's kernel, same scale
            if rest:
                self.update(rest, group, scale)
        return True, norm

    def compiled_layout(self, kinds: list[tuple[list[torch.Tensor], dict]]) -> StepLayout:
        """compiled_step's layout of these parameters' tensors: the last one while it fits
        them (StepLayout.fits), else a new one. ValueError for a parameter given twice:
        the kernel would update it twice at once."""
        if self.layout is not None and self.layout.fits(kinds, self.state):
            return self.layout
        params = [p for ps, _ in kinds for p in ps]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter in two places: torch's kernel, a tensor at a time")
        entries = []  # (param, exp_avg, exp_avg_sq, step, group index, compiled)
        for i, (ps, _) in enumerate(kinds):
            for p in ps:
                state = self.state_of(p)
                moments = state["exp_avg"], state["exp_avg_sq"]
                entries.append((p, *moments, state["step"], i, p.numel() % 16 == 0))
        states = [self.state[p] for p in params]
        self.layout = StepLayout(kinds, entries, states, kernels.AdamWPlan(entries))
        return self.layout

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def hyperparameters(self, group: dict) -> dict:
        """A group's settings, under torch.optim.AdamW(fused=True)'s keys."""
        settings = {key: group[key] for key in ("weight_decay", "lr", "betas", "eps")}
        flags = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False}
        flags |= {"differentiable": False, "fused": True, "decoupled_weight_decay": True}
        return settings | flags

    def state_dict(self, names: dict[torch.Tensor, str] | None = None) -> dict:
        """torch.optim's format: parameters numbered in group order; or, given each
        parameter's name, keyed by name (torch.distributed.checkpoint's format)."""
        key = {p: i for i, p in enumerate(self.parameters())} if names is None else names
        groups = [
            self.hyperparameters(group) | {"params": [key[p] for p in group["params"]]}
            for group in self.param_groups
        ]
        state = {key[p]: dict(self.state[p]) for p in self.parameters() if p in self.state}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict, names: dict[torch.Tensor, str] | None = None) -> None:
        """Inverse of state_dict (numbered, or keyed by the names given); the groups must
        hold the same parameters in the same order. Tensors are copied to each parameter's
        device."""
        groups = saved["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the saved optimizer state has {len(groups)} parameter groups, this "
                f"optimizer {len(self.param_groups)}: was it saved for another model?"
            )
        key = {p: i for i, p in enumerate(self.parameters())} if names is None else names
        state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for group, saved_group in zip(self.param_groups, groups, strict=True):
            if [key[p] for p in group["params"]] != list(saved_group["params"]):
                raise ValueError(
                    "the saved optimizer state holds other parameters than this model's "
                    "trainable ones: was it saved for another model or another fine-tuning?"
                )
            for p in group["params"]:
                if key[p] in saved["state"]:
                    saved_state = saved["state"][key[p]]
                    state[p] = {
                        "step": saved_state["step"].to(torch.float32).to(p.device).clone(),
                        "exp_avg": saved_state["exp_avg"].to(p).clone(),
                        "exp_avg_sq": saved_state["exp_avg_sq"].to(p).clone(),
                    }
            for setting in ("lr", "betas", "eps", "weight_decay"):
                value = saved_group[setting]
                group[setting] = tuple(value) if setting == "betas" else value
        self.state = state
        self.layout = None  # new moments and steps: the old ones are freed now


def global_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """||g||: the L2 norm of all the parameters' gradients as one vector (float32, on the
    first parameter's device).

    Float32 gradients on the CPU go to one C call that reads each once, summing the squares
    in double (kernels/global_norm.c): within a step 1.6-2.5x faster than torch's norm
    per tensor, and closer to the exact norm (docs/LOG.md). Other dtypes and devices take
    torch's foreach norm, a device and dtype at a time."""
    if not params:
        return torch.zeros(())
    device = params[0].device
    grads = [p.grad for p in params]
    library = kernels.load_for(grads[0], (torch.float32,))  # None under torch.compile too
    if library is not None:
        try:  # it checks every gradient once; one it cannot read sends all to torch's norm
            return torch.tensor(math.sqrt(library.sum_squares(grads)), dtype=torch.float32)
        except ValueError:
            pass
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    norms = []
    for kind in by_kind.values():  # torch's foreach norm takes one device and dtype at a time
        each = torch._foreach_norm(kind, dtype=torch.float32)
        norms.append(torch.linalg.vector_norm(torch.stack(each)).to(device))
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.stack(norms))


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    sharded: bool = False,
) -> "AdamW | torch.optim.AdamW":
    """AdamW with weight decay on the matrices only. A sharded (FSDP) model gets
    torch.optim.AdamW, whose state torch.distributed.checkpoint knows how to gather."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if sharded:
        # The fused kernel does the whole update in one pass per tensor (same arithmetic).
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    return AdamW(groups, lr=lr, betas=betas)


def learning_rate(step: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup) / max(1, decay_steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


def inverse_sqrt_learning_rate(step: int, peak_lr: float, warmup: int) -> float:
    """The paper's schedule at step s = 0, 1, ... (n = s + 1): peak_lr * min(n / warmup,
    sqrt(warmup / n)); the paper's own numbers are peak_lr = (d_model * warmup)^-0.5."""
    if warmup <= 0:
        raise ValueError(f"the warm-up must be at least one step, got {warmup}")
    n = step + 1
    return peak_lr * min(n / warmup, math.sqrt(warmup / n))
