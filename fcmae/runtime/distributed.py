"""torch.distributed set-up from torchrun's or SLURM's environment; a no-op in a single process.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under `srun` (no torchrun) the same
come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, and the rendezvous host is the first node of
SLURM_JOB_NODELIST (MASTER_PORT defaults to 29500; set it when several jobs share a node).
"""
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(*names):
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    return None


def world_size_from_env() -> int:
    """The number of processes this run will have, read before joining the group (for checks on user input)."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07', 'node1,node2' -> 'node1'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def init_distributed(device: str) -> DistInfo:
    """Join the process group described by torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or srun (SLURM_PROCID/...)."""
    world = world_size_from_env()
    if world == 1:
        return DistInfo()
    rank = _env_int("RANK", "SLURM_PROCID")
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    os.environ.setdefault("MASTER_ADDR", first_slurm_host(nodelist) if nodelist else "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank-0-only progress logging
    return DistInfo(rank, world, local_rank)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: str, dist_info: DistInfo) -> torch.device:
    """The process's device: under DDP on GPUs, its local rank's GPU."""
    if device.startswith("cuda") and dist_info.enabled:
        return torch.device(f"cuda:{dist_info.local_rank}")
    return torch.device(device)


def in_process_group(device: str, run: Callable[[DistInfo], T]) -> T:
    """`run(dist_info)` inside the process group of torchrun or srun (none in a single process), left at the end."""
    dist_info = init_distributed(device)
    try:
        return run(dist_info)
    finally:
        cleanup()


def wrap_ddp(module: torch.nn.Module, dist_info: DistInfo, device: torch.device) -> torch.nn.Module:
    """The module as the step runs it: DistributedDataParallel under DDP, else itself."""
    if not dist_info.enabled:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[dist_info.local_rank]
                                                     if device.type == "cuda" else None)
