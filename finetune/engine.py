"""Fine-tuning step and evaluation.

The optimiser step itself is fcmae.engine.train_step (accumulation, DDP no_sync, fp16 scaler, clipping,
non-finite checks), shared with pretraining: `WithLoss` gives the classifier the `(loss, output, extra)`
interface that step expects.
"""
import torch
import torch.distributed as dist
from timm.utils import accuracy
from torch import nn

from fcmae.distributed import all_reduce_mean
from fcmae.engine import autocast


class WithLoss(nn.Module):
    """forward(images (N,3,H,W), targets (N,) or soft (N,K)) -> (loss, logits (N,K), targets)."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, images, targets):
        logits = self.model(images)
        # the loss in float32 whatever the autocast precision, as the pretraining loss: fp16 logits can overflow
        return self.criterion(logits.float(), targets), logits, targets


def mix(micro_batches, mixup_fn):
    """Mixup/CutMix each (images, labels) micro-batch; labels become soft targets."""
    if mixup_fn is None:
        return micro_batches
    return [mixup_fn(images, labels) for images, labels in micro_batches]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none") -> dict:
    """Top-1/top-5 (%) and cross-entropy over every image of the loader's shards, summed across processes
    (each process sees a disjoint shard, so the result is exact, with no padded duplicates)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, images
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        acc1, acc5 = accuracy(logits, labels, topk=(1, min(5, logits.shape[1])))
        n = labels.shape[0]
        totals += torch.tensor([round(acc1.item() * n / 100), round(acc5.item() * n / 100),
                                nn.functional.cross_entropy(logits, labels, reduction="sum").item(), n],
                               dtype=torch.float64, device=device)
    model.train(was_training)
    # the mean over processes of each sum is the total / world size; the ratios below are unaffected
    correct1, correct5, loss, count = all_reduce_mean(totals).tolist()
    count = max(count, 1e-12)
    return {"acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count, "loss": loss / count,
            "images": round(count * (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1))}
