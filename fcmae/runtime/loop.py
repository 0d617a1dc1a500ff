"""The training loop both stages share: epochs of optimiser steps over a loader, each step (fcmae.runtime.step)
followed by the stage's hooks, with checkpoints at epoch ends, every --save-every-steps steps, on a stop signal and
at the end. What differs between pretraining and fine-tuning comes from a `Stage` (below); reading the step's
numbers on the host lives in fcmae.runtime.readout, stop signals in fcmae.runtime.signals.

Exact resume: data order, augmentation and masks are functions of (seed, epoch, sample index), the stage's own
per-step randomness of (seed, rank, step); a checkpoint holds the model, the optimiser, the scaler, the stage's
state and the step, so a run killed at any point and started again repeats the uninterrupted one. Nothing
non-finite is ever saved: the weights are checked before each save.
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from . import checkpoints as ckpt
from .distributed import DistInfo, all_reduce_mean
from .errors import EXIT_NONFINITE, EXIT_STOPPED, RunStopped
from .files import remove_temporaries
from .history import LossHistory
from .optim import Optimisation, finite_weights
from .options import plain
from .progress import Progress
from .readout import Readout, StepNumbers
from .run_start import Start
from .signals import StopRequest, stop_agreed
from .step import train_step

log = logging.getLogger("fcmae")


class Stage:
    """What a training stage supplies to the loop. `net(images, targets)[0]` is the loss (DDP-wrapped or
    compiled as needed); `model` is what checkpoints hold; the hooks default to doing nothing."""

    format = "stage"
    net: torch.nn.Module
    model: torch.nn.Module

    def describe(self) -> str:
        return ""

    def poll_data(self):
        """Once per step, before it: report newly skipped bad samples; raise DataError past the limit."""

    def mix(self, micro: list, step: int) -> list:
        """Per-step changes to the micro-batches on the host (e.g. mixup); seeded by the step."""
        return micro

    def after_step(self, step: int):
        """After each optimiser step (e.g. the EMA update)."""

    def at_boundary(self, loop: "Loop", epoch_end: bool, last: bool):
        """Before the checkpoint at the end of each epoch (`epoch_end`), at mid-epoch saves and at the end of
        the run (`last`): evaluation, pictures, kNN. May save extra checkpoints with loop.save(path)."""

    def state(self) -> dict:
        """Extra checkpoint entries (top-level keys besides the loop's own)."""
        return {}

    def load_state(self, state: dict):
        """Restore from a whole checkpoint (the stage reads its own keys)."""

    def metrics(self) -> dict:
        return {}


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """How the loop runs a stage; `run_settings` builds it from the parsed options of either CLI."""
    output_dir: str
    model_name: str
    epochs: int
    steps_per_epoch: int
    batch_size: int
    accum_iter: int
    max_steps: Optional[int]
    amp: str
    clip_grad: Optional[float]
    save_every_steps: Optional[int]
    keep_checkpoints: int
    log_every: int
    skip_nonfinite: int
    args: dict  # the resolved options: config.yaml and every checkpoint

    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total


def run_settings(args, steps_per_epoch: int) -> RunSettings:
    return RunSettings(output_dir=args.output_dir, model_name=args.model, epochs=args.epochs,
                       steps_per_epoch=steps_per_epoch, batch_size=args.batch_size, accum_iter=args.accum_iter,
                       max_steps=args.max_steps, amp=args.amp, clip_grad=args.clip_grad,
                       save_every_steps=args.save_every_steps, keep_checkpoints=args.keep_checkpoints,
                       log_every=args.log_every, skip_nonfinite=args.skip_nonfinite, args=plain(args))


class Loop:
    """`loader.epoch(epoch, start)` yields the micro-batches of an epoch from sample `start` of this process's
    share (fcmae.data.sampling.EpochLoader); `prepare(images, targets)` runs on the device before the forward."""

    def __init__(self, settings: RunSettings, *, stage: Stage, loader, optimisation: Optimisation,
                 dist_info: DistInfo, device: torch.device, prepare=None):
        self.settings, self.stage, self.loader, self.opt = settings, stage, loader, optimisation
        self.dist, self.device, self.prepare = dist_info, device, prepare
        self.step, self.history, self.writer = 0, LossHistory(), None

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def save(self, path: Optional[str] = None):
        """A checkpoint of the current step (rank 0), after checking that every weight is finite."""
        self.readout.flush()
        self.check_weights()
        if not self.dist.is_main:
            return
        s = self.settings
        state = {"format": self.stage.format, "model_name": s.model_name, "model": self.stage.model.state_dict(),
                 "optimizer": self.opt.optimizer.state_dict(), "scaler": self.opt.scaler.state_dict(),
                 "step": self.step, "epoch": self.step // s.steps_per_epoch, "args": s.args, "rng": ckpt.rng_state(),
                 "history": self.history.state(), **self.stage.state()}
        if path:
            ckpt.save_or_stop(state, path)
        else:
            path = ckpt.save_training_state(s.output_dir, self.step, state, s.keep_checkpoints)
        log.info("saved %s", path)

    def check_weights(self):
        if not finite_weights(self.stage.model):
            raise RunStopped(f"the weights became non-finite by step {self.step} although the loss and gradients "
                             f"were finite (an lr too high?); nothing was saved, "
                             f"{ckpt.intact_message(self.settings.output_dir)}; lower --lr or --blr", EXIT_NONFINITE)

    def resume(self, start: Start):
        """Continue from `start`'s checkpoint (nothing to do for a fresh start)."""
        if not start.resuming:
            return
        state = start.state
        self.stage.model.load_state_dict(state["model"])  # strict: every tensor must match
        # the moments and step counts come from the checkpoint, the hyperparameters (weight decay, betas, ...) are
        # this run's: a changed setting is announced, so it must also be applied
        optimizer = self.opt.optimizer
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(optimizer.param_groups, fresh):
            group.update(settings)
        self.opt.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.history = state["step"], LossHistory(state.get("history"))
        self.stage.load_state(state)
        log.info("resumed from %s at step %d", start.path, self.step)

    # ------------------------------------------------------------------------------------------
    # the run

    def run(self) -> dict:
        s, total = self.settings, self.settings.total_steps
        if self.step >= total:  # a finished run started again: its outputs stay as they are
            log.info("nothing to do: the run in %s is complete at step %d of %d", s.output_dir, self.step, total)
            path = os.path.join(s.output_dir, "metrics.json")
            return json.load(open(path)) if os.path.exists(path) else {"complete": True, "steps": self.step}
        if self.dist.is_main:
            remove_temporaries(s.output_dir)
            ckpt.write_text_or_stop(os.path.join(s.output_dir, "config.yaml"), yaml.safe_dump(s.args, sort_keys=True))
            # purge_step: events a killed run logged after its last checkpoint are dropped, not shown twice; the
            # checkpoint's own step was logged before it was saved, so purging starts after it
            self.writer = SummaryWriter(os.path.join(s.output_dir, "tensorboard"),
                                        purge_step=self.step + 1 if self.step else None)
        self.readout = Readout(history=self.history, progress=Progress(total, self.step, s.log_every),
                               images_per_step=s.batch_size * s.accum_iter * self.dist.world_size,
                               skip_nonfinite=s.skip_nonfinite, output_dir=s.output_dir, writer=self.writer)
        log.info(self.stage.describe())
        try:
            with StopRequest() as stop:
                self._epochs(total, stop)
        finally:
            if self.writer is not None:
                self.writer.close()
        complete = self.step >= total
        metrics = {"complete": complete, "model": s.model_name, "steps": self.step, "total_steps": total,
                   **self.history.summary(), **self.stage.metrics()}
        if self.dist.is_main:
            ckpt.write_text_or_stop(os.path.join(s.output_dir, "metrics.json"), json.dumps(metrics, indent=1))
        if not complete:
            raise RunStopped(f"received {stop.signal or 'a stop signal (on another rank)'}: checkpoint saved at step "
                             f"{self.step} of {total}; run the same command again to resume", EXIT_STOPPED)
        if stop.signal:  # came during the last step or the final save: the run is done, and the caller asked to stop
            raise RunStopped(f"received {stop.signal} after the last step: the run is complete ({total} steps, "
                             "metrics.json written); stopping as asked", EXIT_STOPPED)
        log.info("done: %s", json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}))
        return metrics

    def _epochs(self, total: int, stop: StopRequest):
        s, stopping = self.settings, False
        while self.step < total:
            epoch, done_in_epoch = divmod(self.step, s.steps_per_epoch)
            batches = self.loader.epoch(epoch, start=done_in_epoch * s.accum_iter * s.batch_size)
            for _ in range(done_in_epoch, s.steps_per_epoch):
                micro = [next(batches) for _ in range(s.accum_iter)]
                self.stage.poll_data()  # logs newly skipped files; too many stop the run before this step
                micro = self.stage.mix(micro, self.step)
                self.opt.scheduler.step_update(self.step)
                loss, grad_norm, finite = train_step(self.stage.net, micro, self.opt.optimizer, self.opt.scaler,
                                                     self.device, s.amp, s.clip_grad, self.prepare)
                self.step += 1
                self.stage.after_step(self.step)
                lr = max(g["lr"] for g in self.opt.optimizer.param_groups)  # the head's (scale 1) under layer decay
                self.readout.add(StepNumbers(self.step, epoch, all_reduce_mean(loss), finite, grad_norm, lr))
                at_log = self.step % s.log_every == 0
                if at_log:
                    self.readout.flush()
                stopping = stop_agreed(stop, self.dist, self.device, at_log, stopping)
                if stopping or self.step == total or (s.save_every_steps and self.step % s.save_every_steps == 0):
                    break
            self.readout.flush()
            self.check_weights()  # before pictures, kNN and evaluation of NaN weights
            self.stage.at_boundary(self, epoch_end=self.step % s.steps_per_epoch == 0, last=self.step == total)
            self.save()
            if stopping:
                log.info("received %s: checkpoint saved at step %d", stop.signal or "a stop signal on another rank",
                         self.step)
                break

    def epoch_number(self) -> int:
        """Completed epochs."""
        return self.step // self.settings.steps_per_epoch
