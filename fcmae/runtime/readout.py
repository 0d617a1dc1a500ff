"""Reading the step's numbers on the host, in batches: the step leaves its loss, gradient norm and finite flag on
the device (a GPU never waits on Python); they are collected here and read every --log-every steps, before every
checkpoint and at the end (`flush`), then recorded (loss history, TensorBoard), shown (progress line) and checked
(a non-finite step stops the run unless --skip-nonfinite allows it; a log.txt that could not be written stops it)."""
import logging
from dataclasses import dataclass
from typing import List

import torch

from .checkpoints import intact_message
from .errors import EXIT_NONFINITE, EXIT_WRITE_FAILED, RunStopped
from .history import LossHistory
from .logs import log_write_failure
from .progress import Progress

log = logging.getLogger("fcmae")


@dataclass
class StepNumbers:
    step: int
    epoch: int
    loss: torch.Tensor  # 0-d device tensors
    finite: torch.Tensor
    grad_norm: torch.Tensor
    lr: float


class Readout:
    def __init__(self, *, history: LossHistory, progress: Progress, images_per_step: int, skip_nonfinite: int,
                 output_dir: str, writer=None):
        self.history, self.progress, self.writer = history, progress, writer
        self.images_per_step, self.skip_nonfinite, self.output_dir = images_per_step, skip_nonfinite, output_dir
        self.nonfinite_skipped = 0
        self.pending: List[StepNumbers] = []

    def add(self, numbers: StepNumbers):
        self.pending.append(numbers)

    def flush(self):
        """Read the pending steps on the host: record, log, stop on non-finite numbers or a failed log write."""
        if not self.pending:
            return
        losses = torch.stack([p.loss for p in self.pending]).cpu().tolist()
        finite = torch.stack([p.finite for p in self.pending]).cpu().tolist()
        grads = torch.stack([p.grad_norm for p in self.pending]).float().cpu().tolist()
        pending, self.pending = self.pending, []
        for p, loss, ok, grad in zip(pending, losses, finite, grads):
            if not ok:
                self._nonfinite(p.step, loss, grad)
                continue
            self.history.add(p.step, loss)
            if self.writer is not None:
                self.writer.add_scalar("train/loss", loss, p.step)
                self.writer.add_scalar("train/lr", p.lr, p.step)
                self.writer.add_scalar("train/grad_norm", grad, p.step)
        last = pending[-1]
        rate = self.progress.update(last.step, last.epoch, losses[-1], last.lr, grads[-1],
                                    len(pending) * self.images_per_step)
        if self.writer is not None and rate is not None:
            self.writer.add_scalar("train/images_per_second", rate, last.step)
        failure = log_write_failure()
        if failure is not None:
            reason = getattr(failure, "strerror", None) or failure
            raise RunStopped(f"could not write log.txt in {self.output_dir}: {reason}; {intact_message(self.output_dir)}. "
                             "Free space and rerun the same command to resume", EXIT_WRITE_FAILED)

    def _nonfinite(self, step: int, loss: float, grad: float):
        what = f"non-finite loss ({loss})" if not torch.isfinite(torch.tensor(loss)) else \
            f"non-finite gradient norm ({grad})"
        if self.nonfinite_skipped < self.skip_nonfinite:
            self.nonfinite_skipped += 1
            log.warning("step %d: %s, update skipped (%d of %d allowed by --skip-nonfinite)", step, what,
                        self.nonfinite_skipped, self.skip_nonfinite)
            return
        raise RunStopped(f"{what} at step {step}; stopping (the update was skipped, the last checkpoint is left "
                         f"untouched; lower the lr, use --clip-grad, or allow a few with --skip-nonfinite K)",
                         EXIT_NONFINITE)
