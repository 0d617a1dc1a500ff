"""The evidence study: FCMAE on Fashion-MNIST under the protocol of docs/experiment/protocol.md (written and
committed before the runs), run by `python -m tools.experiment_fashion_mnist --study evidence`.

Data: 6000 class-stratified training images are held out as the validation split (fcmae.data.labelled.split_validation,
fixed seed); every choice (scratch recipe, probe lr, pixel-baseline hyperparameters) is made on it. Labelled
images come from the other 54000: per fine-tuning seed 600 (1%, the fine-tune CLI's --val-split 6000
--label-fraction 0.01 --seed S; FCMAE, scratch and the pixel baselines with the same seed see the same 600), and a
6000-image bank (seed 0) for kNN and the linear probe. The 10k test images are read once per final configuration
(one --eval of each final fine-tune's checkpoint-best.pth, one kNN and probe read per checkpoint and probe seed,
one read per pixel baseline and label subset, 1000 of them for feature diversity). Pretraining sees the 60k
training images without labels; its kNN monitor is off (it would read test images).

Stages run in the order of STUDIES[...].plan, the claim first: raw-pixel baselines; V2-FCMAE 4 epochs x 3
pretraining seeds; the scratch grid on val, its chosen recipe on the 5 label subsets; V2-FCMAE's 15 fine-tunes;
kNN and probe; then V1-FCMAE; the dose-response (1 and 2 epochs); naive masking and mask ratios at 2 epochs;
feature diversity. A stage is cached in WORK_DIR (CLI runs finished when their metrics.json says complete,
evaluations in evaluations.json, per-image diversity arrays as .npy) and its wall time, CPU time and load average in
stages.json, so an interrupted study continues where it stopped; after every stage results.json (one row per
measured value) and results.md (tools/experiment_report.py) are rewritten in --out. A stage that fails is logged
and listed in results.json, and the study goes on with the next group; rerun to retry it.

Several processes may run the study in one WORK_DIR at once (one per spare core): each stage is claimed with a lock
file that dies with its process, a process skips a stage another holds and goes on with the next, and stages.json
and evaluations.json are merged under a lock. The last process to finish writes the complete results.
"""
import fcntl
import hashlib
import json
import logging
import os
import re
import resource
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from fcmae.runtime.files import write_text
from tools import experiment_ablations as E

log = logging.getLogger("fcmae")
TRAIN_IMAGES = 60000


@dataclass(frozen=True)
class Group:
    """One pretraining configuration: an arm of tools.experiment_ablations.ARMS, its epochs (its own
    schedule), pretraining seeds, and the fine-tuning seeds (label subsets) its checkpoints are fine-tuned with."""
    arm: str
    epochs: int
    seeds: Tuple[int, ...]
    finetune_seeds: Tuple[int, ...]
    question: str


@dataclass(frozen=True)
class Study:
    size: int = 96
    val_split: int = 6000
    finetune_fraction: float = 0.01
    finetune_seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)  # the label subsets of the claim and of tuned scratch
    finetune_epochs: int = 15  # the FCMAE recipe: fixed in advance (the previous rounds'), not tuned
    finetune_lr: float = 1e-3
    scratch_lrs: Tuple[float, ...] = (1e-3, 2e-3, 4e-3)
    scratch_epochs: Tuple[int, ...] = (15, 30)
    scratch_grid_seeds: Tuple[int, ...] = (0, 1)
    knn_bank: int = 6000
    knn_k: int = 20
    probe_labels: int = 5000
    probe_epochs: int = 50
    probe_lrs: Tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    probe_seeds: Tuple[int, ...] = (0, 1, 2)
    pixel_weight_decays: Tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    pixel_ks: Tuple[int, ...] = (1, 3, 5, 10, 20)
    diversity_images: int = 1000
    bootstrap: int = 1000
    batch_size: int = 64
    test_images: int = 0  # 0: all 10k (a stratified subset only in the smoke study)
    max_pretrain_steps: int = 0
    max_finetune_steps: int = 0
    plan: Tuple[Group, ...] = field(default_factory=tuple)

    @property
    def labelled(self) -> int:
        return max(1, round(self.finetune_fraction * TRAIN_IMAGES))

    def group(self, arm: str, epochs: int) -> Optional[Group]:
        return next((g for g in self.plan if g.arm == arm and g.epochs == epochs), None)


ALL_FT, FIRST_FT = (0, 1, 2, 3, 4), (0, 1, 2)
STUDIES = {
    "full": Study(plan=(
        Group("v2-fcmae", 4, (0, 1, 2), ALL_FT, "claim"),
        Group("v1-fcmae", 4, (0, 1, 2), FIRST_FT, "grn"),
        Group("v2-fcmae", 1, (0,), FIRST_FT, "dose"),
        Group("v2-fcmae", 2, (0,), FIRST_FT, "dose"),
        Group("naive", 2, (0,), FIRST_FT, "masking"),
        Group("mask-0.4", 2, (0,), FIRST_FT, "masking"),
        Group("mask-0.75", 2, (0,), FIRST_FT, "masking"),
    )),
    # every stage in seconds (tests): tiny sizes, 2 steps per run
    "smoke": Study(size=64, val_split=200, finetune_seeds=(0, 1), scratch_lrs=(1e-3, 2e-3), scratch_epochs=(1, 2),
                   scratch_grid_seeds=(0,), finetune_epochs=1, knn_bank=100, probe_labels=60, probe_epochs=3,
                   probe_lrs=(1e-3, 1e-2), probe_seeds=(0, 1), pixel_weight_decays=(1e-3, 1e-1), pixel_ks=(1, 5),
                   diversity_images=8, bootstrap=50, batch_size=8, test_images=100, max_pretrain_steps=2,
                   max_finetune_steps=2, plan=(
                       Group("v2-fcmae", 2, (0, 1), (0, 1), "claim"),
                       Group("v1-fcmae", 2, (0, 1), (0,), "grn"),
                       Group("v2-fcmae", 1, (0,), (0,), "dose"),
                       Group("naive", 1, (0,), (0,), "masking"),
                   )),
}
CLAIM_ARM, DIVERSITY_ARMS = "v2-fcmae", ("v2-fcmae", "v1-fcmae")


# --------------------------------------------------------------------------------------------------
# Data: the split, the label subsets, the bank (the same functions the fine-tune CLI uses)


class Data:
    """Fashion-MNIST's arrays and the study's index sets."""

    def __init__(self, study: Study):
        from fcmae.data.fashion_mnist import FashionMNIST
        from fcmae.data.labelled import split_validation, stratified_subset

        self.study = study
        self.train, self.test = FashionMNIST("train", in_chans=1), FashionMNIST("val", in_chans=1)
        self.val_idx, self.pool = split_validation(self.train.targets, study.val_split)
        self.test_idx = np.arange(len(self.test.targets)) if not study.test_images else \
            stratified_subset(self.test.targets, study.test_images, 0)

    def labels(self, seed: int) -> np.ndarray:
        """The 600 labelled training images of fine-tuning seed `seed` (as `python -m finetune --val-split
        --label-fraction --seed` draws them)."""
        from fcmae.data.labelled import labelled_subset

        return labelled_subset(self.train.targets, self.study.labelled, seed, self.pool)

    def bank(self) -> np.ndarray:
        from fcmae.data.labelled import labelled_subset

        return labelled_subset(self.train.targets, self.study.knn_bank, 0, self.pool)


# --------------------------------------------------------------------------------------------------
# Stages: cached, timed


def restore_logging():
    """The CLIs point logging at their run dirs; the study logs to the console again."""
    from fcmae.runtime.logs import setup_logging

    setup_logging(None)


def read_json(path: str) -> dict:
    return json.load(open(path)) if os.path.exists(path) else {}


@contextmanager
def file_lock(path: str):
    """One writer at a time across the study's processes."""
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def merge_json(path: str, key: str, value) -> dict:
    """path's dict as it is on disk now (other processes' entries kept) with key set; written atomically."""
    with file_lock(path):
        got = read_json(path)
        got[key] = value
        E.write_json(path, got)
    return got


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Runner:
    """Runs (run=True) or only looks up the study's stages in the work dir; stages.json keeps each stage's wall
    seconds, CPU seconds (this process and its finished workers) and the 1-minute load average when it ended."""

    def __init__(self, work: str, study: Study, workers: int, on_stage_done: Optional[Callable[[], None]] = None):
        self.work, self.study, self.workers = work, study, workers
        self.on_stage_done = on_stage_done or (lambda: None)
        self.stats_path, self.eval_path = os.path.join(work, "stages.json"), os.path.join(work, "evaluations.json")
        self.stats, self.evals = read_json(self.stats_path), read_json(self.eval_path)
        self.planned, self.done, self.failures = set(), set(), []
        self.skipped = 0  # stages another process held in this pass
        self._data = None

    @property
    def data(self) -> Data:
        if self._data is None:
            self._data = Data(self.study)
        return self._data

    def _timed(self, name: str, kind: str, fn: Callable):
        t0, c0 = time.time(), cpu_seconds()
        log.info("stage %s: starting", name)
        result = fn()
        self.stats = merge_json(self.stats_path, name, {
            "kind": kind, "wall_seconds": time.time() - t0, "cpu_seconds": cpu_seconds() - c0,
            "load_avg_1m": os.getloadavg()[0], "threads": torch.get_num_threads(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        return result

    def claim(self, name: str):
        """An open file holding this stage's lock, or None when another process of the study is running it."""
        folder = os.path.join(self.work, ".locks")
        os.makedirs(folder, exist_ok=True)
        f = open(os.path.join(folder, hashlib.sha1(name.encode()).hexdigest()[:16]), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            log.info("stage %s: running in another process; skipped here", name)
            self.skipped += 1
            return None
        return f

    def cli_stage(self, name: str, kind: str, main: Callable, argv: List[str], run: bool) -> Optional[dict]:
        self.planned.add(name)
        out = os.path.join(self.work, name)
        done = E.finished(out)
        if done is None and run:
            lock = self.claim(name)
            if lock is None:
                return None
            with lock:
                done = E.finished(out)  # finished by another process since the first look
                if done is None:
                    self._timed(name, kind, lambda: main(argv + ["--output-dir", out]))
                    restore_logging()
                    done = E.finished(out)
                    if done is None:
                        raise RuntimeError(f"stage {name} returned without a complete metrics.json in {out}")
                    self.on_stage_done()
            self.done.add(name)
        elif done is not None:
            self.done.add(name)
        return done

    def cached(self, key: str, kind: str, fn: Callable[[], dict], run: bool) -> Optional[dict]:
        self.planned.add(key)
        if key not in self.evals and run:
            lock = self.claim(key)
            if lock is None:
                return None
            with lock:
                self.evals = read_json(self.eval_path)  # another process may have added it since
                if key not in self.evals:
                    self.evals = merge_json(self.eval_path, key, self._timed(key, kind, fn))
                    restore_logging()
                    self.on_stage_done()
            self.done.add(key)
        elif key in self.evals:
            self.done.add(key)
        return self.evals.get(key)

    def stage_row(self, name: str, **fields) -> List[dict]:
        s = self.stats.get(name)
        if s is None:  # finished in a work dir from before stages.json: no timing to report
            return []
        return [row(metric="stage_wall_seconds", value=s["wall_seconds"], kind=s["kind"], stage_name=name,
                    cpu_seconds=s["cpu_seconds"], load_avg_1m=s["load_avg_1m"], threads=s.get("threads"), **fields)]

    def guarded(self, what: str, fn: Callable[[], List[dict]], run: bool) -> List[dict]:
        """A group's stages; with run, a failure is logged and recorded and the study goes on."""
        if not run:
            return fn()
        from fcmae.runtime.errors import EXIT_STOPPED, RunStopped

        try:
            return fn()
        except RunStopped as e:
            if e.exit_code == EXIT_STOPPED:  # asked to stop (SIGTERM/SIGINT): the study stops too
                raise
            return self._failed(what, e)
        except Exception as e:  # noqa: BLE001 - the next group should still run; the error is in results.json
            return self._failed(what, e)

    def _failed(self, what: str, e: Exception) -> List[dict]:
        log.error("stage group %s failed: %s\n%s", what, e, traceback.format_exc())
        self.failures.append({"stage": what, "error": f"{type(e).__name__}: {e}"})
        restore_logging()
        return []


def row(arm: str = "", pretrain_epochs: int = 0, pretrain_seed: Optional[int] = None,
        finetune_seed: Optional[int] = None, split: str = "test", metric: str = "", value: float = float("nan"),
        **fields) -> dict:
    return {"arm": arm, "pretrain_epochs": pretrain_epochs, "pretrain_seed": pretrain_seed,
            "finetune_seed": finetune_seed, "split": split, "metric": metric, "value": float(value), **fields}


# --------------------------------------------------------------------------------------------------
# Raw-pixel baselines on the same 600 labels


def pixel_features(images: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(images.reshape(len(images), -1), dtype=torch.float32) / 255.0


def logistic_regression(x: torch.Tensor, y: torch.Tensor, weight_decay: float, classes: int = 10,
                        iterations: int = 300) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression on pixels centred by the training mean, L2 penalty weight_decay * |W|^2,
    fitted by L-BFGS from zero (a convex problem: no seed). Returns x -> logits."""
    mean = x.mean(dim=0)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)
    xc = x - mean

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xc @ w + b, y) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda q: (q - mean) @ w + b


def pixel_knn(bank: torch.Tensor, bank_y: torch.Tensor, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """kNN on unit-length pixel vectors (cosine), the same temperature-weighted vote as the feature kNN."""
    from fcmae.pretrain.knn import knn_scores

    unit = torch.nn.functional.normalize
    return lambda q: knn_scores(unit(bank, dim=1), bank_y, unit(q, dim=1), 10, k=k, temperature=0.07)


def top1(scores: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (scores.argmax(dim=1) == y).float().mean().item()


def pixel_baselines(r: Runner, run: bool) -> List[dict]:
    s = r.study
    key = (f"pixels|val{s.val_split}|labels{s.labelled}|seeds{','.join(map(str, s.finetune_seeds))}|"
           f"wd{','.join(map(str, s.pixel_weight_decays))}|k{','.join(map(str, s.pixel_ks))}|test{s.test_images}")

    def compute():
        d = r.data
        val_x, val_y = pixel_features(d.train.images[d.val_idx]), torch.as_tensor(d.train.targets[d.val_idx])
        test_x, test_y = pixel_features(d.test.images[d.test_idx]), torch.as_tensor(d.test.targets[d.test_idx])
        out = {}
        for seed in s.finetune_seeds:
            idx = d.labels(seed)
            x, y = pixel_features(d.train.images[idx]), torch.as_tensor(d.train.targets[idx])
            out[str(seed)] = {}
            for name, options, fit in (("logreg", s.pixel_weight_decays, lambda o: logistic_regression(x, y, o)),
                                       ("knn", s.pixel_ks, lambda o: pixel_knn(x, y, o))):
                models = {o: fit(o) for o in options}
                grid = {str(o): top1(m(val_x), val_y) for o, m in models.items()}
                chosen = max(options, key=lambda o: (grid[str(o)], -options.index(o)))  # ties: the earlier option
                out[str(seed)][name] = {"grid": grid, "chosen": chosen, "val": grid[str(chosen)],
                                        "test": top1(models[chosen](test_x), test_y)}
        return out

    result = r.cached(key, "pixels", compute, run)
    if result is None:
        return []
    rows = r.stage_row(key, arm="pixels", split="test")
    for seed, methods in result.items():
        for name, hyper in (("logreg", "weight_decay"), ("knn", "k")):
            m, arm = methods[name], f"pixels-{name}"
            for option, acc in m["grid"].items():
                rows.append(row(arm, finetune_seed=int(seed), split="val", metric="grid_top1", value=acc,
                                selected=float(option) == float(m["chosen"]), **{hyper: float(option)}))
            for split in ("val", "test"):
                rows.append(row(arm, finetune_seed=int(seed), split=split, metric="top1", value=m[split],
                                **{hyper: float(m["chosen"])}))
    return rows


# --------------------------------------------------------------------------------------------------
# Pretraining


def pretrain_budget(study: Study, epochs: int) -> "E.Budget":
    """The ablation driver's budget with these epochs: pretraining flags identical to its runs'; kNN monitor off."""
    return E.Budget(size=study.size, pretrain_epochs=epochs, pretrain_seeds=(0,), finetune_seeds=study.finetune_seeds,
                    finetune_epochs=study.finetune_epochs, knn_bank=study.knn_bank, probe_labels=study.probe_labels,
                    probe_epochs=study.probe_epochs, test_images=study.test_images,
                    finetune_fraction=study.finetune_fraction, knn_every_epochs=0, batch_size=study.batch_size,
                    max_pretrain_steps=study.max_pretrain_steps, max_finetune_steps=study.max_finetune_steps)


def logged_rate(run_dir: str) -> Optional[float]:
    """Median of the img/s the run's progress lines logged (training throughput, start-up excluded)."""
    try:
        rates = [float(m) for m in re.findall(r" ([\d.]+) img/s", open(os.path.join(run_dir, "log.txt")).read())]
    except OSError:
        return None
    return float(np.median(rates)) if rates else None


def pretrain(r: Runner, g: Group, seed: int, run: bool) -> Tuple[Optional[str], List[dict]]:
    from fcmae.pretrain.cli import main as pretrain_main
    from fcmae.runtime.checkpoints import list_checkpoints

    stages = E.Stages(r.work, pretrain_budget(r.study, g.epochs), r.workers)
    arm = E.ARMS[g.arm]
    name = stages.pretrain_name(arm, seed)
    metrics = r.cli_stage(name, "pretrain", pretrain_main, stages.pretrain_argv(arm, seed), run)
    if metrics is None:
        return None, []
    out = os.path.join(r.work, name)
    common = dict(arm=g.arm, pretrain_epochs=g.epochs, pretrain_seed=seed, split="train")
    rows = r.stage_row(name, **common)
    rows.append(row(metric="pretrain_loss", value=metrics["mean_last_10"], steps=metrics["steps"], **common))
    rows.append(row(metric="masked_fraction", value=E.masked_fraction(arm.mask_ratio, r.study.size), **common))
    rate = logged_rate(out)
    if rate is not None:
        rows.append(row(metric="pretrain_img_per_s", value=rate, **common))
    if name in r.stats:
        rows.append(row(metric="pretrain_wall_seconds", value=r.stats[name]["wall_seconds"], **common))
    return list_checkpoints(out)[0], rows


# --------------------------------------------------------------------------------------------------
# Fine-tuning: a run evaluated on the validation split, then one read of the test set


def finetune_name(study: Study, init: str, seed: int, lr: float, epochs: int) -> str:
    steps = f"_{study.max_finetune_steps}steps" if study.max_finetune_steps else ""
    return (f"finetune_{init}_s{seed}_lr{lr:g}_{epochs}ep_{study.finetune_fraction:g}_{study.size}px_"
            f"val{study.val_split}{steps}")


def finetune_argv(r: Runner, seed: int, checkpoint: Optional[str], lr: float, epochs: int,
                  encoder_grn: bool = True) -> List[str]:
    """The ablation driver's fine-tuning recipe (FCMAE: layer decay 0.75; scratch: none) with these lr and epochs,
    evaluated once at the end on the held-out validation split (--val-split)."""
    budget = replace(pretrain_budget(r.study, 1), finetune_epochs=epochs, test_images=0)
    argv = E.Stages(r.work, budget, r.workers).finetune_argv(seed, checkpoint, encoder_grn)
    if float(argv[argv.index("--lr") + 1]) != lr:
        argv[argv.index("--lr") + 1] = f"{lr:g}"
    return argv + ["--val-split", str(r.study.val_split), "--keep-checkpoints", "1"]


def finetune(r: Runner, arm: str, pretrain_epochs: int, pretrain_seed: Optional[int], seed: int,
             checkpoint: Optional[str], lr: float, epochs: int, run: bool, read_test: bool,
             metric: str = "finetune_top1") -> List[dict]:
    """One fine-tuning run's val row (and, when read_test, its one test read) as rows."""
    from finetune.cli import run as finetune_main

    init = f"{arm}_p{pretrain_seed}x{pretrain_epochs}ep" if checkpoint else arm
    name = finetune_name(r.study, init, seed, lr, epochs)
    encoder_grn = E.ARMS[arm].encoder_grn if arm in E.ARMS else True
    metrics = r.cli_stage(name, "finetune", finetune_main,
                          finetune_argv(r, seed, checkpoint, lr, epochs, encoder_grn), run)
    if metrics is None:
        return []
    out = os.path.join(r.work, name)
    common = dict(arm=arm, pretrain_epochs=pretrain_epochs, pretrain_seed=pretrain_seed, finetune_seed=seed, lr=lr,
                  finetune_epochs=epochs)
    rate = logged_rate(out)
    rows = r.stage_row(name, split="val", **common)
    rows.append(row(split="val", metric=metric, value=metrics["best_acc1"],
                    wall_seconds=r.stats.get(name, {}).get("wall_seconds"), img_per_s=rate, **common))
    if not read_test:
        return rows
    key = f"test|{name}"
    argv = ["--eval", "-c", os.path.join(out, "config.yaml"), "--resume", os.path.join(out, "checkpoint-best.pth"),
            "--num-workers", str(r.workers)]
    if r.study.test_images:
        argv += ["--val-subset", str(r.study.test_images)]
    test = r.cached(key, "test", lambda: finetune_main(argv), run)
    if test is not None:
        rows += r.stage_row(key, split="test", **common)
        rows.append(row(split="test", metric=metric, value=test["acc1"], images=test["images"],
                        wall_seconds=r.stats.get(key, {}).get("wall_seconds"), **common))
    return rows


def scratch(r: Runner, run: bool) -> List[dict]:
    """The grid on val, the chosen cell (highest mean val top-1; ties: the earlier cell, lr then epochs ascending),
    then the chosen recipe on every label subset, each read on test once."""
    s, rows = r.study, []
    cells = {}
    for lr in s.scratch_lrs:
        for epochs in s.scratch_epochs:
            accs = []
            for seed in s.scratch_grid_seeds:
                got = finetune(r, "scratch", 0, None, seed, None, lr, epochs, run, read_test=False,
                               metric="grid_finetune_top1")
                rows += got
                accs += [x["value"] for x in got if x["metric"] == "grid_finetune_top1"]
            if len(accs) == len(s.scratch_grid_seeds):
                cells[(lr, epochs)] = sum(accs) / len(accs)
    order = [(lr, ep) for lr in s.scratch_lrs for ep in s.scratch_epochs]
    for lr, epochs in set(order) - set(cells):  # cells other processes finished while this one ran the rest
        got = [finetune(r, "scratch", 0, None, seed, None, lr, epochs, False, read_test=False,
                        metric="grid_finetune_top1") for seed in s.scratch_grid_seeds]
        if all(got):
            rows += [x for g in got for x in g]
            accs = [x["value"] for g in got for x in g if x["metric"] == "grid_finetune_top1"]
            cells[(lr, epochs)] = sum(accs) / len(accs)
    if len(cells) < len(order):
        return rows
    lr, epochs = max(order, key=lambda c: (cells[c], -order.index(c)))
    for x in rows:
        if x["metric"] == "grid_finetune_top1":
            x["selected"] = (x["lr"], x["finetune_epochs"]) == (lr, epochs)
    for seed in s.finetune_seeds:
        rows += finetune(r, "scratch", 0, None, seed, None, lr, epochs, run, read_test=True)
    return rows


# --------------------------------------------------------------------------------------------------
# Frozen features: kNN and linear probe (lr chosen on val)


@torch.no_grad()
def features(model, dataset, indices, size: int, workers: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pooled final-stage features (N, C4) and labels of dataset[indices] through fine-tuning's eval transform."""
    from torch.utils.data import DataLoader, Subset

    from fcmae.data.transforms import eval_transform

    dataset.transform = eval_transform((size, size), 1)
    feats, labels = [], []
    for images, targets in DataLoader(Subset(dataset, [int(i) for i in indices]), batch_size=256,
                                      num_workers=workers):
        feats.append(model.forward_features(images).float().mean(dim=(2, 3)))
        labels.append(torch.as_tensor(targets))
    dataset.transform = None
    return torch.cat(feats), torch.cat(labels)


def frozen_evaluation(r: Runner, checkpoint: str) -> dict:
    from fcmae.data.labelled import stratified_subset
    from fcmae.pretrain.knn import knn_scores
    from fcmae.runtime.weights import timm_encoder

    s, d = r.study, r.data
    _, model = timm_encoder(checkpoint)
    bank, bank_y = features(model, d.train, d.bank(), s.size, r.workers)
    val, val_y = features(model, d.train, d.val_idx, s.size, r.workers)
    test, test_y = features(model, d.test, d.test_idx, s.size, r.workers)
    unit = torch.nn.functional.normalize

    def knn(q):
        return knn_scores(unit(bank, dim=1), bank_y, unit(q, dim=1), 10, k=s.knn_k, temperature=0.07)

    out = {"knn": {"val": top1(knn(val), val_y), "test": top1(knn(test), test_y)}}

    def probe_data(seed):
        idx = torch.as_tensor(stratified_subset(bank_y.numpy(), s.probe_labels, seed))
        return bank[idx], bank_y[idx]

    x0, y0 = probe_data(s.probe_seeds[0])
    grid = {str(lr): E.linear_probe(x0, y0, val, val_y, s.probe_seeds[0], s.probe_epochs, lr=lr) for lr in s.probe_lrs}
    lr = max(s.probe_lrs, key=lambda v: (grid[str(v)], -s.probe_lrs.index(v)))
    probes = {}
    for seed in s.probe_seeds:
        x, y = probe_data(seed)
        # the same probe (same seed, same lr) scored on val and on test
        probes[str(seed)] = {split: E.linear_probe(x, y, q, qy, seed, s.probe_epochs, lr=lr)
                             for split, q, qy in (("val", val, val_y), ("test", test, test_y))}
    out["probe"] = {"grid": grid, "lr": lr, "seeds": probes}
    return out


def frozen(r: Runner, arm: str, epochs: int, seed: Optional[int], checkpoint: str, run: bool) -> List[dict]:
    s = r.study
    key = (f"frozen|{arm}|{os.path.relpath(checkpoint, r.work)}|{s.size}px|val{s.val_split}|bank{s.knn_bank}|"
           f"k{s.knn_k}|test{s.test_images}|probe{s.probe_labels}x{s.probe_epochs}ep|"
           f"lr{','.join(map(str, s.probe_lrs))}|seeds{','.join(map(str, s.probe_seeds))}")
    result = r.cached(key, "frozen", lambda: frozen_evaluation(r, checkpoint), run)
    if result is None:
        return []
    common = dict(arm=arm, pretrain_epochs=epochs, pretrain_seed=seed)
    wall = r.stats.get(key, {}).get("wall_seconds")
    rows = r.stage_row(key, split="test", **common)
    rows += [row(split=split, metric="knn_top1", value=result["knn"][split], k=s.knn_k, wall_seconds=wall, **common)
             for split in ("val", "test")]
    p = result["probe"]
    rows += [row(split="val", metric="grid_probe_top1", value=acc, lr=float(lr), probe_seed=s.probe_seeds[0],
                 selected=float(lr) == p["lr"], **common) for lr, acc in p["grid"].items()]
    rows += [row(split=split, metric="probe_top1", value=acc, lr=p["lr"], probe_seed=int(ps), **common)
             for ps, accs in p["seeds"].items() for split, acc in accs.items()]
    return rows


# --------------------------------------------------------------------------------------------------
# Feature diversity: per image, both measurement points, bootstrap over images


@torch.no_grad()
def per_image_distances(model, images: torch.Tensor, activation: str, batch_size: int = 50) -> np.ndarray:
    """(N images, blocks) the paper's feature cosine distance of each image at each block (stage order), measured
    as tools/feature_diversity.feature_distances measures it (whose per-block value is this array's column mean)."""
    from fcmae.pretrain.monitor import hooked_dense_pass
    from tools.feature_diversity import _channel_dim, _hook_point, channel_cosine_distance

    per_block: Dict[int, List[torch.Tensor]] = {}
    hooks, b = [], 0
    for stage in model.stages:
        for block in stage.blocks:
            def record(module, args, out, key=b, dim=_channel_dim(block, activation)):
                per_block.setdefault(key, []).append(channel_cosine_distance(out, dim))
            hooks.append((_hook_point(block, activation), record))
            b += 1
    hooked_dense_pass(model, images, hooks, batch_size)
    return torch.stack([torch.cat(per_block[k]) for k in range(b)], dim=1).double().numpy()


def stage_columns(model) -> List[List[int]]:
    cols, b = [], 0
    for stage in model.stages:
        cols.append(list(range(b, b + len(stage.blocks))))
        b += len(stage.blocks)
    return cols


def bootstrap(per_image: np.ndarray, resamples: int, seed: int = 0) -> Tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the mean over images resampled with replacement)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_image), size=(resamples, len(per_image)))
    means = per_image[idx].mean(axis=1)
    return float(per_image.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def diversity(r: Runner, checkpoints: Dict[Tuple[str, int, Optional[int]], str], run: bool) -> List[dict]:
    """Every model (arm, epochs, seed) -> checkpoint ('random-init' with the study's seed-0 random init) at both
    measurement points on the study's diversity images; per stage (mean over its blocks) and all blocks, with
    bootstrap intervals over images; and V2 - V1 (means over their seeds), paired by image."""
    from fcmae.runtime.weights import timm_encoder
    from tools.feature_diversity import load_images

    s = r.study
    rows, arrays = [], {}
    for activation in ("mlp", "block"):
        for (arm, epochs, seed), ckpt in checkpoints.items():
            path = os.path.join(r.work, f"diversity_{arm}_{epochs}ep_p{seed}_{activation}_{s.diversity_images}img.npy")
            key = f"diversity|{os.path.relpath(ckpt, r.work)}|{activation}|{s.size}px|{s.diversity_images}img"

            def compute(ckpt=ckpt, activation=activation, path=path):
                _, model = timm_encoder(ckpt)
                images = load_images(s.diversity_images, s.size, in_chans=1, seed=0)
                np.save(path, per_image_distances(model, images, activation))
                return {"path": os.path.basename(path), "stages": stage_columns(model)}

            got = r.cached(key, "diversity", compute, run)
            if got is None:
                continue
            per_image = np.load(os.path.join(r.work, got["path"]))
            arrays[(arm, epochs, seed, activation)] = (per_image, got["stages"])
            common = dict(arm=arm, pretrain_epochs=epochs, pretrain_seed=seed, split="test", activation=activation,
                          images=len(per_image))
            rows += r.stage_row(key, **{k: v for k, v in common.items() if k not in ("activation", "images")})
            for stage, cols in [*((i + 1, c) for i, c in enumerate(got["stages"])), ("all", None)]:
                v = per_image if cols is None else per_image[:, cols]
                mean, lo, hi = bootstrap(v.mean(axis=1), s.bootstrap)
                rows.append(row(metric="feature_distance", value=mean, stage=stage, ci_low=lo, ci_high=hi, **common))
        v2 = [a for (arm, _, _, act), a in arrays.items() if arm == "v2-fcmae" and act == activation]
        v1 = [a for (arm, _, _, act), a in arrays.items() if arm == "v1-fcmae" and act == activation]
        if v2 and v1:
            stages = v2[0][1]
            diff = np.mean([a for a, _ in v2], axis=0) - np.mean([a for a, _ in v1], axis=0)
            epochs = max(e for (arm, e, _, _) in arrays if arm == "v2-fcmae")
            for stage, cols in [*((i + 1, c) for i, c in enumerate(stages)), ("all", None)]:
                v = diff if cols is None else diff[:, cols]
                mean, lo, hi = bootstrap(v.mean(axis=1), s.bootstrap)
                rows.append(row(arm="v2-fcmae", minus="v1-fcmae", pretrain_epochs=epochs, split="test",
                                metric="feature_distance_difference", value=mean, stage=stage, ci_low=lo, ci_high=hi,
                                activation=activation, images=len(diff), seeds=f"{len(v2)} vs {len(v1)}"))
    return rows


# --------------------------------------------------------------------------------------------------
# The study


def group_stages(r: Runner, g: Group, run: bool, after_pretraining: Callable[[], List[dict]] = lambda: []):
    """A group's pretraining runs, (then after_pretraining: the scratch stages for the claim group), its
    fine-tunes (each read on test once) and the kNN/probe evaluation of each checkpoint."""
    rows, checkpoints = [], {}
    for seed in g.seeds:
        ckpt, got = pretrain(r, g, seed, run)
        rows += got
        if ckpt:
            checkpoints[seed] = ckpt
    rows += after_pretraining()
    for seed, ckpt in checkpoints.items():
        for ft_seed in g.finetune_seeds:
            rows += finetune(r, g.arm, g.epochs, seed, ft_seed, ckpt, r.study.finetune_lr, r.study.finetune_epochs,
                             run, read_test=True)
    for seed, ckpt in checkpoints.items():
        rows += frozen(r, g.arm, g.epochs, seed, ckpt, run)
    return rows, checkpoints


def study_rows(r: Runner, run: bool) -> List[dict]:
    """Every stage in priority order (run when `run`, else only looked up); the rows of those finished."""
    s = r.study
    rows = r.guarded("pixel baselines", lambda: pixel_baselines(r, run), run)
    checkpoints = {}
    for i, g in enumerate(s.plan):
        extra = (lambda: r.guarded("scratch", lambda: scratch(r, run), run) +
                 r.guarded("random init", lambda: frozen(r, "random-init", 0, None, E.Stages(
                     r.work, pretrain_budget(s, 1), r.workers).random_init(), run), run)) if i == 0 else (lambda: [])
        got = r.guarded(f"{g.arm} {g.epochs} epochs", lambda g=g, extra=extra: _group(r, g, run, extra, checkpoints),
                        run)
        rows += got
    if any(k[0] in DIVERSITY_ARMS for k in checkpoints):
        models = {k: v for k, v in checkpoints.items() if k[0] in DIVERSITY_ARMS and k[1] == s.plan[0].epochs}
        models[("random-init", 0, None)] = E.Stages(r.work, pretrain_budget(s, 1), r.workers).random_init() \
            if run or os.path.exists(os.path.join(r.work, f"random_init_{E.IN_CHANS}ch.safetensors")) else None
        models = {k: v for k, v in models.items() if v}
        rows += r.guarded("feature diversity", lambda: diversity(r, models, run), run)
    return rows


def _group(r: Runner, g: Group, run: bool, extra, checkpoints: dict) -> List[dict]:
    rows, ckpts = group_stages(r, g, run, extra)
    checkpoints.update({(g.arm, g.epochs, seed): c for seed, c in ckpts.items()})
    return rows


def planned_stages(s: Study) -> int:
    """How many stages the whole study has (each CLI run, test read, evaluation and diversity measurement)."""
    groups = sum(len(g.seeds) * (2 + 2 * len(g.finetune_seeds)) for g in s.plan)  # pretrain, frozen, fine-tune+test
    grid = len(s.scratch_lrs) * len(s.scratch_epochs) * len(s.scratch_grid_seeds)
    finals = len(set(s.finetune_seeds) - set(s.scratch_grid_seeds)) + len(s.finetune_seeds)
    diverse = sum(len(g.seeds) for g in s.plan if g.arm in DIVERSITY_ARMS and g.epochs == s.plan[0].epochs) + 1
    return 1 + groups + grid + finals + 1 + 2 * diverse  # pixels, ..., random init's kNN/probe, diversity


def results(r: Runner, name: str, rows: List[dict]) -> dict:
    s = r.study
    seen, unique = set(), []
    for x in rows:  # a scratch grid run that is also a final run has one stage row
        if x["metric"] == "stage_wall_seconds":
            if x["stage_name"] in seen:
                continue
            seen.add(x["stage_name"])
        unique.append(x)
    rows = unique
    return {"study": "evidence", "budget": name, "protocol": "docs/experiment/protocol.md", "settings": asdict(s),
            "progress": {"done": len(r.done), "total": planned_stages(s)}, "failures": r.failures,
            "rows": rows}


def write(out: str, res: dict):
    from tools.experiment_report import render

    os.makedirs(out, exist_ok=True)
    E.write_json(os.path.join(out, "results.json"), res)
    write_text(os.path.join(out, "results.md"), render(res))


def main(budget: str, work: str, out: str, workers: int, run: bool = True) -> dict:
    """Run the study (or with run=False only report what the work dir holds); results in `out`."""
    study = STUDIES[budget]
    os.makedirs(work, exist_ok=True)

    def report():  # after every stage: the results so far, from the caches (nothing runs)
        looker = Runner(work, study, workers)
        looker._data = runner._data
        rows = study_rows(looker, run=False)
        looker.failures = runner.failures
        write(out, results(looker, budget, rows))

    runner = Runner(work, study, workers, on_stage_done=report)
    while True:  # again while other processes held stages: what they finish may open stages that depend on it
        runner.skipped, runner.failures = 0, []
        study_rows(runner, run)
        if not run or not runner.skipped:
            break
        log.info("%d stages were running in other processes; looking again in 2 minutes", runner.skipped)
        time.sleep(120)
    final = Runner(work, study, workers)  # the complete picture: planned stages, cached values
    final._data = runner._data
    rows = study_rows(final, run=False)
    final.failures = runner.failures
    res = results(final, budget, rows)
    write(out, res)
    log.info("evidence study: %d of %d stages done; results in %s", res["progress"]["done"],
             res["progress"]["total"], out)
    return res
