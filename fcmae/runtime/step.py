"""One optimiser step, shared by pretraining and fine-tuning: forward under autocast, backward with gradient
accumulation, clipping, and the update, which a non-finite loss or gradient skips on the device.

Nothing here reads a device value on the host: the step returns the loss, the gradient norm and a finite flag as
device tensors, and the training loop reads them at its logging interval (a GPU never waits on Python).
"""
import contextlib
from typing import Callable, Optional

import torch

from .optim import step_unless


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(net, micro_batches, optimizer, scaler, device, amp: str, clip_grad: Optional[float] = None,
               prepare: Optional[Callable] = None):
    """Accumulate gradients over `micro_batches` (a list of (images, masks or labels)), then take one optimiser
    step. `net(images, target)[0]` is the loss; `prepare(images, target)` (e.g. normalisation, channels-last)
    runs on the device first. Returns (loss, grad_norm, finite), 0-d device tensors: the mean loss of this
    process's micro-batches (each divided by their number, so k micro-batches of b images give the gradient of
    one batch of k*b with per-sample GRN statistics), the gradient norm before clipping, and whether the step
    was taken.

    A non-finite loss or gradient norm skips the update on the device (fp16: the scaler skips non-finite
    gradients and lowers its scale; that alone is not a failure). Under DDP the norm is taken after the
    all-reduce, so every process makes the same decision."""
    optimizer.zero_grad(set_to_none=True)
    total = None
    for i, (imgs, target) in enumerate(micro_batches):
        imgs, target = imgs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if prepare is not None:
            imgs, target = prepare(imgs, target)
        sync = contextlib.nullcontext()
        if hasattr(net, "no_sync") and i < len(micro_batches) - 1:
            sync = net.no_sync()  # DDP: all-reduce once, on the last micro-batch
        with sync:
            with autocast(device, amp):
                loss = net(imgs, target)[0]
            scaler.scale(loss / len(micro_batches)).backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
    loss = total / len(micro_batches)
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else float("inf"))
    if amp == "fp16":
        finite = torch.isfinite(loss)
        scaler.step(optimizer)  # skips non-finite gradients itself (on the device with a fused optimizer)
    else:
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        step_unless(optimizer, ~finite)
    scaler.update()
    return loss, grad_norm.detach(), finite
