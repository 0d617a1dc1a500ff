"""Optimisation pieces both stages share, with explicit arguments: the lr rule, steps per epoch, the schedule,
and an optimiser step that a non-finite gradient skips on the device (no host read of the flag)."""
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from timm.scheduler import CosineLRScheduler

from .errors import UsageError

log = logging.getLogger("fcmae")


def effective_lr(batch_size: int, accum_iter: int, world_size: int, blr: float, lr: Optional[float]):
    """(effective batch, lr): the reference rule lr = blr x effective batch / 256 unless an absolute lr is given."""
    eff_batch = batch_size * accum_iter * world_size
    return eff_batch, (lr if lr is not None else blr * eff_batch / 256)


def lr_for_run(args, world_size: int) -> float:
    """The run's lr (`effective_lr` of its options), logged with the effective batch it comes from."""
    eff_batch, lr = effective_lr(args.batch_size, args.accum_iter, world_size, args.blr, args.lr)
    log.info("effective batch %d = %d x %d accumulation x %d processes; lr %.3e", eff_batch, args.batch_size,
             args.accum_iter, world_size, lr)
    return lr


def epoch_steps(num_images: int, batch_size: int, accum_iter: int, world_size: int) -> int:
    """Optimiser steps in one pass over the data: each process takes ceil(images / processes) of it
    (EpochSampler), in micro-batches of batch_size, accum_iter of them per step."""
    steps = -(-num_images // world_size) // batch_size // accum_iter
    if steps < 1:
        raise UsageError(f"{num_images} images give no full step of {batch_size} (batch) x {accum_iter} "
                         f"(accumulation) x {world_size} processes; lower --batch-size or --accum-iter, or add images")
    return steps


def cosine_schedule(optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float, min_lr: float):
    """Per-step linear warm-up from 0 over warmup_epochs, then cosine to min_lr (timm's scheduler; param groups'
    `lr_scale` applied, as layer decay needs)."""
    total = epochs * steps_per_epoch
    warmup = min(int(warmup_epochs * steps_per_epoch), total - 1)
    # at least 2 cosine steps: timm warns on every run whose cosine part is 1 step (e.g. --epochs 1 under a longer
    # warm-up), and the steps taken (before `total`) get the same lr from 2 as from 1
    return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 2), lr_min=min_lr, warmup_t=warmup,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def adamw(groups, lr: float, betas, device_type: str) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where PyTorch has it (CPU and CUDA): besides being faster, it takes a device-side
    'found_inf' flag, so a non-finite step is skipped without the host reading the flag."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cpu", "cuda"))


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor):
    """optimizer.step(), skipped where the 0-d bool tensor `skip` is true: inside a fused optimizer on the
    device (the mechanism GradScaler uses); otherwise by reading the flag (a host sync)."""
    if getattr(optimizer, "_step_supports_amp_scaling", False) and _is_fused(optimizer):
        optimizer.grad_scale, optimizer.found_inf = None, skip.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(skip):
        optimizer.step()


def _is_fused(optimizer) -> bool:
    return all(group.get("fused") for group in optimizer.param_groups)


def finite_weights(module: torch.nn.Module) -> bool:
    """Whether every parameter and buffer is finite (one host read)."""
    flags = [torch.isfinite(t).all() for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


@dataclass(frozen=True)
class Optimisation:
    """What the loop steps and checkpoints: the optimiser, its lr schedule and the gradient scaler (fp16 only)."""
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler


def optimisation(optimizer: torch.optim.Optimizer, args, steps_per_epoch: int, device_type: str) -> Optimisation:
    """The optimiser with the schedule of the options (warm-up, cosine to --min-lr) and a scaler for --amp fp16."""
    return Optimisation(optimizer, cosine_schedule(optimizer, args.epochs, steps_per_epoch, args.warmup_epochs,
                                                   args.min_lr),
                        torch.amp.GradScaler(device_type, enabled=args.amp == "fp16"))
