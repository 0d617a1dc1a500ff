"""torch.distributed set-up from torchrun's or SLURM's environment; a no-op in a single process."""
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def init_distributed(device: str) -> DistInfo:
    """Join the process group described by torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or srun (SLURM_PROCID/...)."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    if world == 1:
        return DistInfo()
    rank = _env_int("RANK", "SLURM_PROCID")
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
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


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
