"""torchrun / DistributedDataParallel helpers (gloo on CPU, nccl on GPU). No launcher of our own:
start N processes with ``torchrun --nproc_per_node N -m ltm_convert.cli finetune ...``."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, ...)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    from ltm_convert.device import pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        started = True
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistInfo(rank=rank, world=world, local_rank=local, device=dev, started_here=started)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def any_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank passed True."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    """Leave the process group together: a rank that destroys its group while a peer still talks to
    it can abort the peer at exit ("terminate called without an active exception", SIGABRT, seen
    once in CI), which fails the user's torchrun job after the work is done."""
    if info.started_here and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
