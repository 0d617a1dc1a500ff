"""The fine-tuning loss: mixup/CutMix with soft-target cross-entropy, or label smoothing.

The optimiser step itself is fcmae.runtime.step.train_step (accumulation, DDP no_sync, fp16 scaler, clipping,
non-finite checks), shared with pretraining: `WithLoss` gives the classifier the `(loss, output, extra)`
interface that step expects.
"""
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn


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


def build_criterion(args):
    """(mixup or None, criterion): Mixup/CutMix (which also smooths the labels) with soft-target CE, else
    label-smoothing CE, else plain CE."""
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                      label_smoothing=args.smoothing, num_classes=args.nb_classes)
        return mixup, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, torch.nn.CrossEntropyLoss()
