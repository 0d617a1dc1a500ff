"""The training loop both stages share: epochs and steps, micro-batches and accumulation, the lr schedule, the
non-finite guard, progress, TensorBoard scalars, periodic and final checkpoints, stop signals and the resume
position. What differs between pretraining and fine-tuning comes from a `Stage` (below).

Exact resume: data order, augmentation and masks are functions of (seed, epoch, sample index), the stage's own
per-step randomness of (seed, rank, step); a checkpoint holds the model, the optimiser, the scaler, the stage's
state and the step, so a run killed at any point and started again repeats the uninterrupted one.

The step's numbers stay on the device: losses and finite flags are collected and read every --log-every steps,
before every checkpoint and at the end (`_flush`). Nothing non-finite is ever saved: the weights are checked
before each save.
"""
import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from . import checkpoint as ckpt
from .distributed import DistInfo, all_reduce_mean
from .engine import train_step
from .errors import EXIT_NONFINITE, EXIT_STOPPED, EXIT_WRITE_FAILED, RunStopped, UsageError
from .logs import log_write_failure, setup_logging
from .optim import finite_weights
from .progress import Progress
from .sampling import make_loader

log = logging.getLogger("fcmae")
HISTORY_POINTS = 2048  # bound on the loss curve kept in checkpoints (TensorBoard has every step)


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


@dataclass
class LoopConfig:
    output_dir: str
    model_name: str
    epochs: int
    steps_per_epoch: int
    batch_size: int
    accum_iter: int
    max_steps: Optional[int] = None
    amp: str = "none"
    clip_grad: Optional[float] = None
    channels_last: bool = False
    num_workers: int = 2
    save_every_steps: Optional[int] = None
    keep_checkpoints: int = 2
    log_every: int = 20
    skip_nonfinite: int = 0
    args: Dict = field(default_factory=dict)  # the resolved options: config.yaml and every checkpoint

    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total


class LossHistory:
    """Bounded loss record: the first loss, the last 10, and a curve of at most HISTORY_POINTS (step, mean loss)
    points whose span doubles (neighbours merged) whenever it fills up."""

    def __init__(self, state: Optional[dict] = None):
        state = state or {}
        self.first = state.get("first")
        self.recent: List[float] = list(state.get("recent", []))
        self.curve: List[List[float]] = [list(p) for p in state.get("curve", [])]  # [last step, mean, count]
        self.span = state.get("span", 1)
        self.window = list(state.get("window", [0.0, 0]))  # loss sum and count since take_window()

    def take_window(self) -> float:
        """Mean loss since the previous call (e.g. over an epoch); NaN when no step was recorded."""
        total, count = self.window
        self.window = [0.0, 0]
        return total / count if count else float("nan")

    def add(self, step: int, loss: float):
        self.first = loss if self.first is None else self.first
        self.window = [self.window[0] + loss, self.window[1] + 1]
        self.recent = (self.recent + [loss])[-10:]
        if self.curve and self.curve[-1][2] < self.span:
            last = self.curve[-1]
            last[1] = (last[1] * last[2] + loss) / (last[2] + 1)
            last[0], last[2] = step, last[2] + 1
        else:
            self.curve.append([step, loss, 1])
        if len(self.curve) > HISTORY_POINTS:
            self.span *= 2
            merged = []
            for a, b in zip(self.curve[::2], self.curve[1::2] + [None]):
                merged.append(a if b is None else [b[0], (a[1] * a[2] + b[1] * b[2]) / (a[2] + b[2]), a[2] + b[2]])
            self.curve = merged

    def state(self) -> dict:
        return {"first": self.first, "recent": self.recent, "curve": self.curve, "span": self.span,
                "window": self.window}

    def summary(self) -> dict:
        if self.first is None:
            return {}
        return {"first_loss": self.first, "last_loss": self.recent[-1],
                "mean_last_10": sum(self.recent) / len(self.recent)}


class StopRequest:
    """SIGTERM, SIGINT and SIGUSR1 (SLURM's --signal=USR1@120) during a run: finish the current step, save,
    exit with EXIT_STOPPED. The previous handlers come back when the run ends."""

    SIGNALS = [s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None]

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


class Loop:
    def __init__(self, cfg: LoopConfig, dist_info: DistInfo, device: torch.device, dataset, sampler, stage: Stage,
                 optimizer, scheduler, scaler, prepare=None):
        self.cfg, self.dist, self.device = cfg, dist_info, device
        self.dataset, self.sampler, self.stage = dataset, sampler, stage
        self.optimizer, self.scheduler, self.scaler, self.prepare = optimizer, scheduler, scaler, prepare
        self.step, self.history = 0, LossHistory()
        self.writer = None
        self.nonfinite_skipped = 0
        self._pending = []  # (step, epoch, loss, finite, grad_norm, lr) of steps not yet read on the host
        self.stopping = False

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def checkpoint_state(self) -> dict:
        return {"format": self.stage.format, "model_name": self.cfg.model_name, "model": self.stage.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "epoch": self.step // self.cfg.steps_per_epoch, "args": self.cfg.args, "rng": ckpt.rng_state(),
                "history": self.history.state(), **self.stage.state()}

    def save(self, path: Optional[str] = None):
        """A checkpoint of the current step (rank 0), after checking that every weight is finite."""
        self._flush()
        self.check_weights()
        if not self.dist.is_main:
            return
        state = self.checkpoint_state()
        if path:
            ckpt.save_or_stop(state, path)
        else:
            path = ckpt.save_training_state(self.cfg.output_dir, self.step, state, self.cfg.keep_checkpoints)
        log.info("saved %s", path)

    def check_weights(self):
        if not finite_weights(self.stage.model):
            raise RunStopped(f"the weights became non-finite by step {self.step} although the loss and gradients "
                             f"were finite (an lr too high?); nothing was saved, "
                             f"{ckpt.intact_message(self.cfg.output_dir)}; lower --lr or --blr", EXIT_NONFINITE)

    def resume(self, state: dict, path: str):
        self.stage.model.load_state_dict(state["model"])  # strict: every tensor must match
        # the moments and step counts come from the checkpoint, the hyperparameters (weight decay, betas, ...) are
        # this run's: a changed setting is announced, so it must also be applied
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(settings)
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.history = state["step"], LossHistory(state.get("history"))
        self.stage.load_state(state)
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------------
    # reading the device's numbers

    def _flush(self):
        """Read the pending steps' losses on the host: log, record, stop on non-finite numbers."""
        if not self._pending:
            return
        losses = torch.stack([p[2] for p in self._pending]).cpu().tolist()
        finite = torch.stack([p[3] for p in self._pending]).cpu().tolist()
        grads = torch.stack([p[4] for p in self._pending]).float().cpu().tolist()
        pending, self._pending = self._pending, []
        for (step, epoch, _, _, _, lr), loss, ok, grad in zip(pending, losses, finite, grads):
            if not ok:
                self._nonfinite(step, loss, grad)
                continue
            self.history.add(step, loss)
            if self.writer is not None:
                self.writer.add_scalar("train/loss", loss, step)
                self.writer.add_scalar("train/lr", lr, step)
                self.writer.add_scalar("train/grad_norm", grad, step)
        step, epoch, *_ , lr = pending[-1]
        rate = self.progress.update(step, epoch, losses[-1], lr, grads[-1],
                                    len(pending) * self.cfg.batch_size * self.cfg.accum_iter * self.dist.world_size)
        if self.writer is not None and rate is not None:
            self.writer.add_scalar("train/images_per_second", rate, step)
        failure = log_write_failure()
        if failure is not None:
            reason = getattr(failure, "strerror", None) or failure
            raise RunStopped(f"could not write log.txt in {self.cfg.output_dir}: {reason}; "
                             f"{ckpt.intact_message(self.cfg.output_dir)}. Free space and rerun the same command to "
                             "resume", EXIT_WRITE_FAILED)

    def _nonfinite(self, step: int, loss: float, grad: float):
        what = f"non-finite loss ({loss})" if not torch.isfinite(torch.tensor(loss)) else \
            f"non-finite gradient norm ({grad})"
        if self.nonfinite_skipped < self.cfg.skip_nonfinite:
            self.nonfinite_skipped += 1
            log.warning("step %d: %s, update skipped (%d of %d allowed by --skip-nonfinite)", step, what,
                        self.nonfinite_skipped, self.cfg.skip_nonfinite)
            return
        raise RunStopped(f"{what} at step {step}; stopping (the update was skipped, the last checkpoint is left "
                         f"untouched; lower the lr, use --clip-grad, or allow a few with --skip-nonfinite K)",
                         EXIT_NONFINITE)

    # ------------------------------------------------------------------------------------------
    # the run

    def _start_outputs(self):
        out = self.cfg.output_dir
        if not self.dist.is_main:
            return
        ckpt.remove_stale_temporaries(out)
        ckpt.write_text_or_stop(os.path.join(out, "config.yaml"), yaml.safe_dump(self.cfg.args, sort_keys=True))
        # purge_step: events a killed run logged after its last checkpoint are dropped, not shown twice; the
        # checkpoint's own step was logged before it was saved, so purging starts after it
        self.writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=self.step + 1 if self.step else None)

    def run(self) -> dict:
        cfg, total = self.cfg, self.cfg.total_steps
        if self.step >= total:  # a finished run started again: its outputs stay as they are
            log.info("nothing to do: the run in %s is complete at step %d of %d", cfg.output_dir, self.step, total)
            return self._read_metrics()
        self._start_outputs()
        self.progress = Progress(total, self.step, cfg.log_every)
        log.info(self.stage.describe())
        # one loader for the run: its workers persist across epochs (the epoch travels with each index)
        loader = make_loader(self.dataset, self.sampler, cfg.batch_size, cfg.num_workers,
                             pin_memory=self.device.type == "cuda")
        try:
            with StopRequest() as stop:
                self._epochs(total, stop, loader)
        finally:
            if self.writer is not None:
                self.writer.close()
        complete = self.step >= total
        metrics = {"complete": complete, "model": cfg.model_name, "steps": self.step, "total_steps": total,
                   **self.history.summary(), **self.stage.metrics()}
        if self.dist.is_main:
            ckpt.write_text_or_stop(os.path.join(cfg.output_dir, "metrics.json"), json.dumps(metrics, indent=1))
        if not complete:
            raise RunStopped(f"received {stop.signal or 'a stop signal (on another rank)'}: checkpoint saved at step {self.step} of {total}; run the same "
                             "command again to resume", EXIT_STOPPED)
        log.info("done: %s", json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}))
        return metrics

    def _epochs(self, total: int, stop: StopRequest, loader):
        cfg = self.cfg
        while self.step < total:
            epoch, done_in_epoch = divmod(self.step, cfg.steps_per_epoch)
            self.sampler.set_epoch(epoch, start=done_in_epoch * cfg.accum_iter * cfg.batch_size)
            batches = iter(loader)
            for _ in range(done_in_epoch, cfg.steps_per_epoch):
                micro = [next(batches) for _ in range(cfg.accum_iter)]
                self.stage.poll_data()  # logs newly skipped files; too many stop the run before this step
                micro = self.stage.mix(micro, self.step)
                self.scheduler.step_update(self.step)
                loss, grad_norm, finite = train_step(self.stage.net, micro, self.optimizer, self.scaler, self.device,
                                                     cfg.amp, cfg.clip_grad, self.prepare)
                self.step += 1
                self.stage.after_step(self.step)
                lr = max(g["lr"] for g in self.optimizer.param_groups)  # the head's (scale 1) lr when layer-decayed
                self._pending.append((self.step, epoch, all_reduce_mean(loss), finite, grad_norm, lr))
                if self.step % cfg.log_every == 0:
                    self._flush()
                if self._stop_agreed(stop) or self.step == total or \
                        (cfg.save_every_steps and self.step % cfg.save_every_steps == 0):
                    break
            self._flush()
            self.check_weights()  # before pictures, kNN and evaluation of NaN weights
            self.stage.at_boundary(self, epoch_end=self.step % cfg.steps_per_epoch == 0, last=self.step == total)
            self.save()
            if self.stopping:
                log.info("received %s: checkpoint saved at step %d", stop.signal or "a stop signal on another rank",
                         self.step)
                break

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether to stop after this step. Under DDP every rank must stop at the same step (a rank that leaves
        while the others enter the next all-reduce would hang them), so the ranks agree at each log interval."""
        if not self.dist.enabled:
            self.stopping = stop.signal is not None
        elif self.step % self.cfg.log_every == 0:
            flag = torch.tensor([1.0 if stop.signal else 0.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.stopping = bool(flag.item())
        return self.stopping

    def epoch_number(self) -> int:
        """Completed epochs."""
        return self.step // self.cfg.steps_per_epoch

    def _read_metrics(self) -> dict:
        path = os.path.join(self.cfg.output_dir, "metrics.json")
        return json.load(open(path)) if os.path.exists(path) else {"complete": True, "steps": self.step}


# --------------------------------------------------------------------------------------------------
# Where a run starts: checks done before anything is written


def find_start(output_dir: str, resume: str, overwrite: bool, format_tag: str, what: str):
    """(path, state) of the checkpoint to resume, or (None, None) for a fresh start, by the --resume rules:
    'auto' takes the newest loadable checkpoint in output_dir; a path that one; 'none' starts anew. A fresh start
    (or an explicit path from elsewhere) never shares a folder with another run's checkpoints: that is an error
    unless --overwrite, which deletes them when the run starts (`clear_for_fresh_start`)."""
    existing = ckpt.list_checkpoints(output_dir) if os.path.isdir(output_dir) else []
    if resume == "auto":
        path, state = ckpt.latest_loadable(output_dir) if existing else (None, None)
        existing = ckpt.list_checkpoints(output_dir) if existing else []  # unreadable ones were set aside
        if state is not None and overwrite:
            return None, None
    elif resume == "none":
        path, state = None, None
    else:
        path, state = resume, ckpt.load(resume)
    if state is not None:
        check_format(state, path, format_tag, what)
        ckpt.check_finite_or_refuse(state, path, output_dir)
    same_dir = path is not None and os.path.dirname(os.path.abspath(path)) == os.path.abspath(output_dir)
    if existing and not same_dir and not overwrite:
        how = "resume it with --resume auto, " if resume == "none" else ""
        raise UsageError(f"{output_dir} holds checkpoints of another run (newest: {os.path.basename(existing[0])}); "
                         f"{how}choose a new --output-dir, or pass --overwrite to delete them and start anew")
    return path, state


def check_format(state, path: str, format_tag: str, what: str):
    if not isinstance(state, dict) or state.get("format") != format_tag:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UsageError(f"{path} is not {what} (format {found!r})")
    for key in ("model", "optimizer", "scaler", "step", "args", "rng"):
        if key not in state:
            raise UsageError(f"{path} says format {format_tag!r} but has no {key!r}: a broken or foreign checkpoint")


def check_same_settings(saved: dict, now: dict, path: str, fixed, run_only):
    """A resumed run must share the `fixed` settings (they shape the model); others that differ are named in the
    warning returned (logged once the run's log is open; the run will not match an uninterrupted one); `run_only`
    settings may change freely."""
    wrong = [k for k in fixed if saved.get(k, now.get(k)) != now.get(k)]
    if wrong:
        raise UsageError(f"{path} was trained with " + ", ".join(f"--{k.replace('_', '-')} {_show(saved.get(k))}"
                         for k in wrong) + " but this run has " + ", ".join(f"{_show(now.get(k))}" for k in wrong)
                         + "; pass the same values to resume it (or a new --output-dir)")
    changed = sorted(k for k in (set(saved) | set(now)) - set(run_only) - set(fixed) if saved.get(k) != now.get(k))
    if changed:
        return ("resuming with changed settings (the run will not match an uninterrupted one): "
                + ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed))
    return None


def _show(v):
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def clear_for_fresh_start(output_dir: str):
    """--overwrite: remove another run's checkpoints and outputs before a fresh start."""
    for path in ckpt.list_checkpoints(output_dir) + [os.path.join(output_dir, n) for n in
                                                     ("checkpoint-best.pth", "metrics.json", "summary.csv")]:
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(os.path.join(output_dir, "tensorboard"), ignore_errors=True)


def prepare_output(output_dir: str, dist_info: DistInfo, overwrite_fresh: bool, warning: Optional[str] = None):
    os.makedirs(output_dir, exist_ok=True)
    setup_logging(output_dir, dist_info.is_main)
    if warning:
        log.warning(warning)
    if overwrite_fresh and dist_info.is_main:
        clear_for_fresh_start(output_dir)
