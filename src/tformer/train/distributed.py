"""Data-parallel training across processes with torch.distributed (DDP).

`torchrun --nproc_per_node=N -m tformer train ...` starts N processes with RANK, WORLD_SIZE
and LOCAL_RANK set; each joins one process group (gloo on CPU, NCCL on GPUs), holds a full
copy of the model, computes gradients on its own slice of every batch, and DDP averages the
gradients across processes before each optimizer step, so all copies stay identical.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> Distributed:
    """Join the process group torchrun describes; a plain process is rank 0 of 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
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
