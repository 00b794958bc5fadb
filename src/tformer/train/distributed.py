"""Data-parallel training across processes with torch.distributed: DDP and FSDP.

`torchrun --nproc_per_node=N -m tformer train ...` starts N processes with RANK, WORLD_SIZE
and LOCAL_RANK set; each joins one process group (gloo on CPU, NCCL on GPUs) and computes
gradients on its own slice of every batch.

DDP (`--parallel ddp`): every process holds the whole model and optimizer state; the
gradients are averaged (all-reduce) before each optimizer step, so all copies stay equal.
Per step each process sends and receives about 2 (N - 1) / N x the gradients' bytes.

FSDP (`--parallel fsdp`, Zhao et al., 2023, via `fully_shard`): each process keeps 1 / N of
every parameter, gradient and optimizer state. A layer's parameters are gathered
(all-gather) just before its forward pass and freed after it, gathered again for its
backward pass, and the gradients are summed and scattered (reduce-scatter) so that each
process updates its own shard: (N - 1) / N x the parameters' bytes twice and the gradients'
once per step, 1.5x DDP's traffic, for a model N times larger than one device holds.

Checkpoints are always whole (gathered on rank 0), so a run saved under FSDP resumes under
DDP or in one process, and the other way round.
"""

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tformer.train.optim import AdamW

# torch.distributed.fsdp and .checkpoint are slow to import (docs/LOG.md): they are
# imported where they are used, so that commands that do not train (answer, generate,
# eval) start that much sooner.

FORWARD_METHODS = ("features", "unembed")  # the trainer may call these instead of forward


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> Distributed:
    """Join the process group torchrun describes; a plain process is rank 0 of 1. On GPUs
    each process takes the one its LOCAL_RANK names (cuda:LOCAL_RANK) before joining, as
    NCCL expects."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
    if device.type == "cuda":
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:
            raise ValueError(
                f"this process is local rank {local_rank} of torchrun's, but PyTorch sees "
                f"{gpus} GPU(s) here: start at most {gpus} per machine (--nproc_per_node), "
                "or train on the CPU with --device cpu"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return current()


def current() -> Distributed:
    if not dist.is_available() or not dist.is_initialized():
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard(model: nn.Module) -> nn.Module:
    """Shard `model` in place across the process group (FSDP): each of `model.layers()` is
    one unit, gathered for its own forward and backward pass; the rest (embeddings, final
    norm, the tied head) is the root unit."""
    if not hasattr(model, "layers"):
        raise ValueError(
            f"{type(model).__name__} does not list its layers (a `layers()` method), so FSDP "
            "could only shard it as one unit; use --parallel ddp"
        )
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in model.layers():
        fully_shard(layer)
    fully_shard(model)
    for method in FORWARD_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def is_sharded(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def whole_tensors(on_rank_0: bool):
    """Options for reading whole tensors from (possibly sharded) state: gathered to rank 0's
    CPU when `on_rank_0`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=on_rank_0)


def whole_model(model: nn.Module) -> nn.Module | None:
    """The model with whole parameters, for saving: `model` itself unless it is sharded; then
    (a collective: every rank calls it) an unsharded copy on the CPU of rank 0, None
    elsewhere."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=whole_tensors(on_rank_0=True))
    if not current().is_main:
        return None
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(state, assign=True)
    return copy


def parameter_names(model: nn.Module) -> dict[torch.Tensor, str]:
    """Each parameter's name in `model` (a tied weight under its first name)."""
    return {p: name for name, p in model.named_parameters()}


def numbers_its_parameters(state: dict) -> bool:
    """Whether an optimizer state numbers its parameters (torch.optim's own format, written
    before checkpoints named them) rather than naming them."""
    return any(isinstance(key, int) for group in state["param_groups"] for key in group["params"])


def optimizer_state(model: nn.Module, optimizer: AdamW | torch.optim.Optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name (a collective under FSDP; whole
    on rank 0): the same file whether the run was sharded or not."""
    if isinstance(optimizer, AdamW):
        return optimizer.state_dict(names=parameter_names(model))
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    options = whole_tensors(on_rank_0=is_sharded(model))
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(
    model: nn.Module, optimizer: AdamW | torch.optim.Optimizer, state: dict
) -> None:
    numbered = numbers_its_parameters(state)
    if isinstance(optimizer, AdamW):
        optimizer.load_state_dict(state, names=None if numbered else parameter_names(model))
        return
    if numbered:
        if is_sharded(model):
            raise ValueError(
                "this checkpoint numbers its optimizer state (it predates sharded training): "
                "resume it with --parallel ddp or in one process"
            )
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    options = whole_tensors(on_rank_0=False)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)
