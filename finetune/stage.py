"""The fine-tuning stage for the shared loop (fcmae/loop.py): mixup and drop-path seeded per step, the EMA,
evaluation every --eval-every-epochs epochs with summary.csv, TensorBoard and checkpoint-best.pth."""
import logging
import os
import random

import numpy as np
import torch

from fcmae import checkpoint as ckpt
from fcmae.images import BadImageMonitor
from fcmae.loop import Loop, Stage

from .engine import evaluate, mix
from .report import final_metrics, log_scalars, summary_csv, summary_row

log = logging.getLogger("fcmae")
FORMAT = "fcmae-finetune"


def seed_all(*key: int):
    """Seed torch (drop-path), numpy (mixup) and python from a tuple of ints such as (seed, rank, step)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class FinetuneStage(Stage):
    format = FORMAT

    def __init__(self, model, net, ema, mixup_fn, train_set, val_set, val_loader, device, amp: str, seed: int,
                 rank: int, eval_every_epochs: int, ema_eval: bool, classes, output_dir: str, is_main: bool,
                 description: str = ""):
        self.model, self.net, self.ema, self.mixup_fn = model, net, ema, mixup_fn
        self.val_loader, self.device, self.amp = val_loader, device, amp
        self.seed, self.rank, self.eval_every, self.ema_eval = seed, rank, eval_every_epochs, ema_eval
        self.classes, self.output_dir, self.is_main = list(classes), output_dir, is_main
        self.bad_images = BadImageMonitor(train_set, val_set)
        self.description = description
        self.rows, self.best = [], {"acc1": None, "source": None, "step": None}

    def describe(self) -> str:
        return self.description

    def poll_data(self):
        self.bad_images.poll()

    def mix(self, micro, step: int):
        # Each step's mixup and drop-path draws depend on (seed, rank, step) only, like the augmentation on (seed,
        # epoch, index): a resumed run repeats an uninterrupted one exactly, on any number of processes.
        seed_all(self.seed, self.rank, step)
        return mix(micro, self.mixup_fn)

    def after_step(self, step: int):
        if self.ema is not None:
            self.ema.update(self.model)

    def at_boundary(self, loop: Loop, epoch_end: bool, last: bool):
        epochs_done = loop.epoch_number()
        if not (last or (epoch_end and epochs_done % self.eval_every == 0)):
            return
        stats = evaluate(self.model, self.val_loader, self.device, self.amp)
        ema_stats = evaluate(self.ema.module, self.val_loader, self.device, self.amp) \
            if self.ema is not None and self.ema_eval else None
        self.bad_images.poll()  # too many unreadable val files: stop before the results are saved
        epoch = (loop.step - 1) // loop.cfg.steps_per_epoch
        log.info("epoch %d step %d: top-1 %.3f top-5 %.3f val loss %.4f%s", epoch, loop.step, stats["acc1"],
                 stats["acc5"], stats["loss"], f" EMA top-1 {ema_stats['acc1']:.3f}" if ema_stats else "")
        row = summary_row(epoch, loop.step, loop.history.take_window(), stats, ema_stats)
        self.rows.append(row)
        log_scalars(loop.writer, row)
        # the best checkpoint holds both weights, so it is chosen by whichever of the two scored higher
        ema_acc = row["ema_acc1"]
        acc, source = (ema_acc, "ema") if ema_acc is not None and ema_acc > row["acc1"] else (row["acc1"], "model")
        if self.best["acc1"] is None or acc > self.best["acc1"]:
            self.best = {"acc1": acc, "source": source, "step": loop.step}
            loop.save(os.path.join(self.output_dir, "checkpoint-best.pth"))
        if self.is_main:
            ckpt.write_text_or_stop(os.path.join(self.output_dir, "summary.csv"), summary_csv(self.rows))

    def state(self) -> dict:
        return {"model_ema": self.ema.module.state_dict() if self.ema is not None else None, "best": self.best,
                "best_acc1": self.best["acc1"], "rows": self.rows, "classes": self.classes}

    def load_state(self, state: dict):
        if self.ema is not None and state.get("model_ema") is not None:
            self.ema.module.load_state_dict(state["model_ema"])
        self.rows, self.best = list(state.get("rows", [])), dict(state.get("best", self.best))

    def metrics(self) -> dict:
        return final_metrics(self.rows, self.best)
