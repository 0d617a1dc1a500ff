"""One optimiser step (forward under autocast, backward with accumulation, clip, step) and the guard that
stops a run on non-finite numbers. Shared by pretraining and fine-tuning."""
import contextlib
import logging
import math

import torch

from .errors import EXIT_NONFINITE, RunStopped

log = logging.getLogger("fcmae")


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def channels_last(micro_batches):
    return [(imgs.contiguous(memory_format=torch.channels_last), other) for imgs, other in micro_batches]


def train_step(model, micro_batches, optimizer, scaler, device, amp: str, clip_grad=None):
    """Accumulate gradients over `micro_batches` (a list of (images, masks or labels)), then take one optimiser
    step. Returns (mean loss of this process, grad norm). The loss of each micro-batch is divided by their number,
    so k micro-batches of b images give the gradient of one batch of k*b (with per-sample GRN statistics).

    A non-finite gradient norm skips the update (fp16: the scaler skips it and lowers its scale). Under DDP the
    norm is taken after the all-reduce, so every process makes the same decision; `NonFiniteGuard` decides
    whether the run goes on."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, (imgs, target) in enumerate(micro_batches):
        imgs, target = imgs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        sync = contextlib.nullcontext()
        if hasattr(model, "no_sync") and i < len(micro_batches) - 1:
            sync = model.no_sync()  # DDP: all-reduce once, on the last micro-batch
        with sync:
            with autocast(device, amp):
                loss, _, _ = model(imgs, target)
            scaler.scale(loss / len(micro_batches)).backward()
        total += loss.item()
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else float("inf"))
    if amp == "fp16" or torch.isfinite(grad_norm):
        scaler.step(optimizer)
    scaler.update()
    return total / len(micro_batches), grad_norm.item()


class NonFiniteGuard:
    """Counts steps whose loss (averaged over processes) or gradient is not finite. Up to `allowed` of them are
    skipped with a warning (`--skip-nonfinite K`); the next one stops the run before anything is saved, so the
    last checkpoint stays the last good state. With fp16 an infinite gradient alone is the scaler's business
    (it skips the step and lowers its scale), not a failure."""

    def __init__(self, allowed: int = 0):
        self.allowed, self.skipped = allowed, 0

    def check(self, step: int, loss: float, grad_norm: float, amp: str):
        if math.isfinite(loss) and (amp == "fp16" or math.isfinite(grad_norm)):
            return
        what = f"non-finite loss ({loss})" if not math.isfinite(loss) else f"non-finite gradient norm ({grad_norm})"
        if self.skipped < self.allowed:
            self.skipped += 1
            log.warning("step %d: %s, update skipped (%d of %d allowed by --skip-nonfinite)", step, what,
                        self.skipped, self.allowed)
            return
        raise RunStopped(f"{what} at step {step}; stopping (the last checkpoint is left untouched; lower the lr, "
                         f"use --clip-grad, or allow a few with --skip-nonfinite K)", EXIT_NONFINITE)
