"""One optimiser step of FCMAE pretraining: forward under autocast, backward (with accumulation), clip, step."""
import contextlib
import math

import torch


class NonFiniteLoss(RuntimeError):
    pass


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def channels_last(micro_batches):
    return [(imgs.contiguous(memory_format=torch.channels_last), other) for imgs, other in micro_batches]


def train_step(model, micro_batches, optimizer, scaler, device, amp: str, clip_grad=None, step: int = 0):
    """Accumulate gradients over `micro_batches` (a list of (images, masks)), then take one optimiser step.
    Returns (mean loss, grad norm). The loss of each micro-batch is divided by their number, so k micro-batches
    of b images give the gradient of one batch of k*b (with per-sample GRN statistics)."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, (imgs, mask) in enumerate(micro_batches):
        imgs, mask = imgs.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        sync = contextlib.nullcontext()
        if hasattr(model, "no_sync") and i < len(micro_batches) - 1:
            sync = model.no_sync()  # DDP: all-reduce once, on the last micro-batch
        with sync:
            with autocast(device, amp):
                loss, _, _ = model(imgs, mask)
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(f"non-finite loss {value} at step {step}")
            scaler.scale(loss / len(micro_batches)).backward()
        total += value
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else float("inf"))
    if not torch.isfinite(grad_norm) and amp != "fp16":  # fp16: the scaler skips the step and lowers its scale
        raise NonFiniteLoss(f"non-finite gradient norm at step {step}")
    scaler.step(optimizer)
    scaler.update()
    return total / len(micro_batches), grad_norm.item()
