"""The fine-tuning stage for the shared loop (fcmae.runtime.loop): mixup and drop-path seeded per step, the EMA,
evaluation every --eval-every-epochs epochs with summary.csv, TensorBoard and checkpoint-best.pth."""
import logging
import os
import random

import numpy as np
import torch

from fcmae.data.bad_samples import BadImageMonitor
from fcmae.runtime import checkpoints as ckpt
from fcmae.runtime.loop import Loop, Stage

from .evaluation import evaluate
from .loss import mix
from .options import FORMAT
from .report import final_metrics, log_scalars, summary_csv, summary_row

log = logging.getLogger("fcmae")


def seed_all(*key: int):
    """Seed torch (drop-path), numpy (mixup) and python from a tuple of ints such as (seed, rank, step)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class FinetuneStage(Stage):
    format = FORMAT

    def __init__(self, *, model, net, ema, mixup_fn, data, val_loader, seed: int, rank: int,
                 eval_every_epochs: int, ema_eval: bool, description: str = ""):
        """`data`: the labelled sets (fcmae.data.labelled.Datasets); `val_loader` reads data.val."""
        self.model, self.net, self.ema, self.mixup_fn, self.val_loader = model, net, ema, mixup_fn, val_loader
        self.seed, self.rank, self.eval_every, self.ema_eval = seed, rank, eval_every_epochs, ema_eval
        self.classes = list(data.classes)
        self.bad_images = BadImageMonitor(data.train, data.val)
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
        device, amp, output_dir = loop.device, loop.settings.amp, loop.settings.output_dir
        stats = evaluate(self.model, self.val_loader, device, amp)
        ema_stats = evaluate(self.ema.module, self.val_loader, device, amp) \
            if self.ema is not None and self.ema_eval else None
        self.bad_images.poll()  # too many unreadable val files: stop before the results are saved
        epoch = (loop.step - 1) // loop.settings.steps_per_epoch
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
            loop.save(os.path.join(output_dir, "checkpoint-best.pth"))
        if loop.dist.is_main:
            ckpt.write_text_or_stop(os.path.join(output_dir, "summary.csv"), summary_csv(self.rows))

    def state(self) -> dict:
        return {"model_ema": self.ema.module.state_dict() if self.ema is not None else None, "best": self.best,
                "best_acc1": self.best["acc1"], "rows": self.rows, "classes": self.classes}

    def load_state(self, state: dict):
        if self.ema is not None and state.get("model_ema") is not None:
            self.ema.module.load_state_dict(state["model_ema"])
        self.rows, self.best = list(state.get("rows", [])), dict(state.get("best", self.best))

    def metrics(self) -> dict:
        return final_metrics(self.rows, self.best)
