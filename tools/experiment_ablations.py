"""The ConvNeXt V2 paper's FCMAE ablations at small scale, with seeds and error bars, on Fashion-MNIST (real images,
Debian's dataset-fashion-mnist, served with one channel: --in-chans 1), on a 2-core CPU in about two hours; run by
`python -m tools.experiment_fashion_mnist` (`--study ablations`, the default). The stages, arms and evaluations
here also serve the evidence study (tools/experiment_evidence.py).

Arms (each runnable alone: `python -m tools.experiment_fashion_mnist --arm grn-off`; several or `all`, the
default, in one command). Every pretrained arm differs from V2-FCMAE in one thing only:

    v2-fcmae   ConvNeXt V2 (GRN) with FCMAE: sparse encoder, mask ratio 0.6 (the paper's method)   [alias mask-0.6]
    v1-fcmae   the encoder without GRN (--no-encoder-grn: GRN held at identity, ConvNeXt V1-style)  [alias grn-off]
    naive      naive masking (--backend naive): mask once after the stem, dense convs leak through masked sites
    mask-0.4   mask ratio 0.4                mask-0.75   mask ratio 0.75
    scratch    no pretraining: the random init for kNN and the probe, training from scratch for fine-tuning

Every arm gets the same budget and the same evaluation, all on the 10k test images at the pretraining size:
  - kNN top-1 (k=20, cosine, T=0.07) of the pooled final-stage features against a labelled bank of training images;
  - a linear probe (LayerNorm + Linear on the frozen pooled features, as timm's head) trained on the bank's
    features, one per probe seed (the seed draws the probe's labelled images from the bank and its init);
  - fine-tuning with 1% of the labels (600 images), one run per fine-tuning seed (the fine-tune CLI's --seed draws
    the label subset and the init); FCMAE and scratch runs with the same seed use the same labelled images, so the
    gain of FCMAE over scratch is taken per seed (paired) and reported as mean +- std and as mean - std;
  - the wall time of each stage.
Results: mean +- sample std (n) and every value, per arm, in WORK_DIR/results (or --out): results.md, results.json,
arms.png (every value per arm), curves.png (pretraining loss per arm) and feature_diversity.png (the paper's
feature cosine distance per layer of V1-FCMAE, V2-FCMAE and the random init; tools/feature_diversity.py). Arms run in
earlier invocations are in the table too (nothing is recomputed).

Planned default budget (scaled to 96 px from measurements at 128 px on this 2-core CPU: pretraining ~100 img/s,
fine-tuning ~37 img/s, kNN ~1.5 min a checkpoint for 10k images; the naive encoder runs dense on every cell: its
forward + backward took ~2.7x the sparse encoder's at 96 px, so ~2.2x for the whole step with data and decoder):
    pretraining, 1 epoch (937 steps of 64) at 96 px:  v2 ~6, v1 ~6, mask-0.75 ~5, mask-0.4 ~8, naive ~13  = 38 min
    evaluation, 6 models (5 arms + random init): features of 6000 bank + 10000 test images ~1.5 min each,
        kNN and 3 probe seeds (50 epochs on 5000 feature vectors) in seconds                               =  9 min
    fine-tuning, 1% labels (600 images), 15 epochs (150 steps) at 96 px + evaluation on the 10k test
        images: ~2.8 min a run, 3 seeds x 6 arms = 18 runs                                                 = 50 min
    feature diversity (64 images, 3 models)                                                                =  1 min
    total planned ~100 min, up to ~2 h if the scaling from 128 px is optimistic. One arm alone: its
    pretraining + ~10 min. Wall times as measured are in the results. `--budget long --arm v2-fcmae scratch`
    repeats V2-FCMAE with 4 pretraining epochs, same evaluation (~30 min). `--budget full` pretrains 5 epochs with 2
    pretraining seeds, fine-tunes 30 epochs (~10 h); `--budget smoke` runs every stage in seconds (tests).
    `--out docs/experiment/ablations` writes the results where docs/results.md links them.

96 px gives a 3x3 mask grid, on which the ratios differ: each image keeps int(9 x (1 - ratio)) cells, i.e.
0.4 -> 5 kept (44% masked), 0.6 -> 3 (67%), 0.75 -> 2 (78%); the table shows the effective fraction.
Stages are ordinary runs of the project's CLIs in --work-dir, reused across invocations only when finished: a run
counts as finished when its metrics.json says "complete": true (a missing key is not finished; a stopped run
resumes from its checkpoint when the stage runs again). Evaluations are cached in WORK_DIR/evaluations.json, each
stage's wall time in WORK_DIR/timings.json as measured when it ran.
"""
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fcmae.runtime.files import atomic_write

log = logging.getLogger("fcmae")
MODEL = "convnextv2_atto"
IN_CHANS = 1  # Fashion-MNIST is grey: no replication to RGB
NUM_CLASSES = 10
TRAIN_IMAGES = 60000


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    pretrained: bool = True
    backend: str = "sparse"
    encoder_grn: bool = True
    mask_ratio: float = 0.6

    def pretrain_flags(self) -> List[str]:
        flags = ["--backend", self.backend, "--mask-ratio", str(self.mask_ratio)]
        return flags + ([] if self.encoder_grn else ["--no-encoder-grn"])

    def describe(self) -> str:
        if not self.pretrained:
            return "no pretraining"
        return f"{'GRN' if self.encoder_grn else 'no GRN'}, {self.backend} encoder, mask {self.mask_ratio:g}"


ARMS = {a.name: a for a in [
    Arm("v2-fcmae", "V2-FCMAE"),
    Arm("v1-fcmae", "V1-FCMAE", encoder_grn=False),
    Arm("naive", "naive masking", backend="naive"),
    Arm("mask-0.4", "mask 0.4", mask_ratio=0.4),
    Arm("mask-0.75", "mask 0.75", mask_ratio=0.75),
    Arm("scratch", "scratch", pretrained=False),
]}
ALIASES = {"grn-off": "v1-fcmae", "mask-0.6": "v2-fcmae", "v2": "v2-fcmae", "v1": "v1-fcmae"}


@dataclass(frozen=True)
class Budget:
    size: int  # pretraining and every evaluation, square
    pretrain_epochs: int
    pretrain_seeds: Tuple[int, ...]
    finetune_seeds: Tuple[int, ...]
    finetune_epochs: int
    knn_bank: int  # labelled training images (stratified, seed 0) whose features make the kNN bank and probe pool
    probe_labels: int  # per probe seed, drawn from the bank
    probe_epochs: int
    test_images: int = 0  # kNN, probe and fine-tuning evaluation (0: all 10k test images)
    finetune_fraction: float = 0.01
    diversity_images: int = 64
    knn_every_epochs: int = 0  # the pretraining CLI's kNN monitor, for a kNN curve (0: off)
    batch_size: int = 64
    max_pretrain_steps: int = 0  # only for the smoke budget
    max_finetune_steps: int = 0

    @property
    def probe_seeds(self) -> Tuple[int, ...]:
        return self.finetune_seeds


BUDGETS = {
    "default": Budget(size=96, pretrain_epochs=1, pretrain_seeds=(0,), finetune_seeds=(0, 1, 2), finetune_epochs=15,
                      knn_bank=6000, probe_labels=5000, probe_epochs=50),
    # the default's evaluation after 4x the pretraining: does the 1%-label gain grow with pretraining? (v2 ~25 min)
    "long": Budget(size=96, pretrain_epochs=4, pretrain_seeds=(0,), finetune_seeds=(0, 1, 2), finetune_epochs=15,
                   knn_bank=6000, probe_labels=5000, probe_epochs=50),
    "full": Budget(size=96, pretrain_epochs=5, pretrain_seeds=(0, 1), finetune_seeds=(0, 1, 2), finetune_epochs=30,
                   knn_bank=10000, probe_labels=8000, probe_epochs=100, knn_every_epochs=1, diversity_images=256),
    # every stage, a few steps each (tests)
    "smoke": Budget(size=64, pretrain_epochs=1, pretrain_seeds=(0,), finetune_seeds=(0, 1), finetune_epochs=1,
                    knn_bank=100, probe_labels=60, probe_epochs=3, test_images=100, diversity_images=4,
                    knn_every_epochs=1, batch_size=8, max_pretrain_steps=2, max_finetune_steps=2),
}


def resolve_arms(names: Sequence[str]) -> List[str]:
    """Arm names from the command line (aliases and `all` allowed), in ARMS order, each once."""
    wanted = set()
    for n in names:
        if n == "all":
            wanted |= set(ARMS)
        elif ALIASES.get(n, n) in ARMS:
            wanted.add(ALIASES.get(n, n))
        else:
            raise ValueError(f"unknown arm '{n}'; arms: {', '.join(ARMS)}, all (aliases: "
                             + ", ".join(f"{k}={v}" for k, v in ALIASES.items()) + ")")
    return [a for a in ARMS if a in wanted]


def masked_fraction(mask_ratio: float, size: int) -> float:
    """The fraction of cells each image actually has masked at this input size (reference rule)."""
    from models.masking import mask_grid, num_visible

    cells = mask_grid(size, size)[0] * mask_grid(size, size)[1]
    return 1 - num_visible(cells, mask_ratio) / cells


# --------------------------------------------------------------------------------------------------
# Statistics


def summarise(values: Sequence[float]) -> dict:
    """n, mean, sample std (n - 1; 0 for one value) and the values themselves."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"n": n, "mean": mean, "std": std, "values": values}


def fmt(s: Optional[dict], digits: int = 2) -> str:
    """'73.12 ± 0.85 (n=3)', or the single value, or '—'."""
    if not s or not s["n"]:
        return "—"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (n=1)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} (n={s['n']})"


def paired_gain(arm_runs: Dict[str, float], scratch_runs: Dict[str, float]) -> Optional[dict]:
    """Gain over scratch per fine-tuning seed (same labelled images, same seed): keys are 'p<pretrain seed>/s<seed>'
    for the arm and 's<seed>' for scratch. Adds 'mean_minus_std', the conservative figure."""
    gains = [acc - scratch_runs[key.split("/")[1]] for key, acc in sorted(arm_runs.items())
             if key.split("/")[1] in scratch_runs]
    if not gains:
        return None
    s = summarise(gains)
    return {**s, "mean_minus_std": s["mean"] - s["std"]}


# --------------------------------------------------------------------------------------------------
# Stages and their caching


def finished(out: str) -> Optional[dict]:
    """metrics.json of a run that completed; None for a missing, unreadable or incomplete one (a run stopped
    early writes "complete": false; one without the key is not counted as finished either)."""
    path = os.path.join(out, "metrics.json")
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("complete") is True else None


def write_json(path: str, obj):
    """Atomic (a unique temporary file, renamed): an interrupted write, or another process of a study writing the
    same file, leaves a whole file."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), binary=False)


class Timings:
    """Minutes each stage took when it ran to completion, kept in WORK_DIR/timings.json: a stage reused from an
    earlier invocation keeps the time it took then, so totals are the experiment's, not the last call's."""

    def __init__(self, work: str):
        self.path = os.path.join(work, "timings.json")
        self.minutes = json.load(open(self.path)) if os.path.exists(self.path) else {}

    def record(self, name: str, seconds: float):
        self.minutes[name] = seconds / 60
        write_json(self.path, self.minutes)


class Stages:
    """Runs (or, with run=False, only looks up) the experiment's stages in the work dir."""

    def __init__(self, work: str, budget: Budget, workers: int):
        self.work, self.budget, self.workers = work, budget, workers
        self.timings = Timings(work)
        self.eval_path = os.path.join(work, "evaluations.json")
        self.evals = json.load(open(self.eval_path)) if os.path.exists(self.eval_path) else {}

    def cli_stage(self, name: str, main: Callable, argv: List[str], run: bool) -> Optional[dict]:
        """A CLI run in WORK/name: its metrics when complete (run now if needed and allowed), else None."""
        out = os.path.join(self.work, name)
        done = finished(out)
        if done is not None or not run:
            return done
        t0 = time.time()
        main(argv + ["--output-dir", out])
        done = finished(out)
        if done is None:
            raise RuntimeError(f"stage {name} returned without a complete metrics.json in {out}")
        self.timings.record(name, time.time() - t0)
        return done

    def cached(self, key: str, fn: Callable[[], dict], run: bool) -> Optional[dict]:
        """An in-process evaluation cached in evaluations.json under `key` (written only once complete)."""
        if key in self.evals or not run:
            return self.evals.get(key)
        t0 = time.time()
        result = fn()
        self.evals[key] = {**result, "seconds": time.time() - t0}
        write_json(self.eval_path, self.evals)
        self.timings.record(key, time.time() - t0)
        return self.evals[key]

    # ---- pretraining

    def pretrain_name(self, arm: Arm, seed: int) -> str:
        b = self.budget
        steps = f"_{b.max_pretrain_steps}steps" if b.max_pretrain_steps else ""
        return f"pretrain_{arm.name}_s{seed}_{b.size}px_{b.pretrain_epochs}ep{steps}"

    def pretrain_argv(self, arm: Arm, seed: int) -> List[str]:
        b = self.budget
        argv = ["--model", MODEL, "--in-chans", str(IN_CHANS), "--input-size", str(b.size),
                "--batch-size", str(b.batch_size), "--epochs", str(b.pretrain_epochs),
                # a 10x base lr and a short warm-up suit a run of a few epochs (the recipe's are for 800)
                "--blr", "2e-3", "--warmup-epochs", str(min(0.2, b.pretrain_epochs / 10)), "--seed", str(seed),
                *arm.pretrain_flags(), "--knn-every-epochs", str(b.knn_every_epochs),
                "--keep-checkpoints", "1", "--num-workers", str(self.workers), "--log-every", "50",
                "--vis-every-epochs", str(b.pretrain_epochs)]
        if b.knn_every_epochs:  # the monitor's sets: the same sizes as the final evaluation's
            argv += ["--knn-bank", str(b.knn_bank), "--knn-queries", str(b.test_images or 10000)]
        return argv + (["--max-steps", str(b.max_pretrain_steps)] if b.max_pretrain_steps else [])

    def pretrain(self, arm: Arm, seed: int, run: bool) -> Optional[Tuple[str, dict]]:
        """(final checkpoint, metrics) of the arm's pretraining with this seed."""
        from fcmae.pretrain.cli import main as pretrain_main
        from fcmae.runtime.checkpoints import list_checkpoints

        name = self.pretrain_name(arm, seed)
        metrics = self.cli_stage(name, pretrain_main, self.pretrain_argv(arm, seed), run)
        if metrics is None:
            return None
        return list_checkpoints(os.path.join(self.work, name))[0], metrics

    def random_init(self) -> str:
        """The random init (seed 0) as a timm file: the scratch arm's model for kNN, probe and feature diversity."""
        import timm
        from safetensors.torch import save_file

        path = os.path.join(self.work, f"random_init_{IN_CHANS}ch.safetensors")
        if not os.path.exists(path):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                save_file(timm.create_model(MODEL, num_classes=0, in_chans=IN_CHANS).state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
        return path

    # ---- evaluation: kNN and linear probe on frozen features

    def evaluate(self, label: str, checkpoint: str, run: bool) -> Optional[dict]:
        b = self.budget
        key = (f"{label}|{os.path.relpath(checkpoint, self.work)}|{b.size}px|bank{b.knn_bank}|test{b.test_images}|"
               f"probe{b.probe_labels}x{b.probe_epochs}ep|seeds{','.join(map(str, b.probe_seeds))}")
        return self.cached(key, lambda: evaluate_frozen(checkpoint, b, self.workers), run)

    # ---- fine-tuning

    def finetune_name(self, arm: Arm, pretrain_seed: Optional[int], seed: int) -> str:
        b = self.budget
        # a pretrained init names its pretraining seed, and its epochs where not 1 (the default budget's runs keep
        # their names); scratch runs are shared by budgets with the same fine-tuning
        epochs = f"x{b.pretrain_epochs}ep" if b.pretrain_epochs != 1 else ""
        init = f"{arm.name}_p{pretrain_seed}{epochs}" if arm.pretrained else arm.name
        init += "" if arm.encoder_grn else "_nogrn"  # V1-FCMAE fine-tunes V1 blocks too (--no-encoder-grn)
        steps = f"_{b.max_finetune_steps}steps" if b.max_finetune_steps else ""
        return f"finetune_{init}_s{seed}_{b.finetune_fraction:g}_{b.size}px_{b.finetune_epochs}ep{steps}"

    def finetune_argv(self, seed: int, checkpoint: Optional[str], encoder_grn: bool = True) -> List[str]:
        """Our short-schedule version of the reference atto recipe, shared by FCMAE and scratch runs: batch 64,
        lr 1e-3 with a warm-up of a tenth of the run, no RandAugment/mixup (a few epochs of 28x28 grey images),
        label smoothing 0.1, drop-path 0.1, no EMA (0.9999 barely moves in so few steps); layer decay 0.75 for
        pretrained weights, none from scratch (no pretrained layers to protect); evaluated at the end."""
        b = self.budget
        epochs = b.finetune_epochs
        argv = ["--model", MODEL, "--in-chans", str(IN_CHANS), "--input-size", str(b.size), "--batch-size", "64",
                "--epochs", str(epochs), "--warmup-epochs", str(max(epochs / 10, 1)), "--lr", "1e-3",
                "--min-lr", "1e-6", "--weight-decay", "0.05", "--drop-path", "0.1", "--smoothing", "0.1",
                "--aa", "none", "--reprob", "0", "--no-model-ema", "--eval-every-epochs", str(epochs),
                "--log-every", "50", "--label-fraction", str(b.finetune_fraction), "--seed", str(seed),
                "--num-workers", str(self.workers)]
        argv += ["--finetune", checkpoint, "--layer-decay", "0.75"] if checkpoint else ["--layer-decay", "1"]
        argv += [] if encoder_grn else ["--no-encoder-grn"]  # the ablation's model is V1 throughout
        if b.test_images:
            argv += ["--val-subset", str(b.test_images)]
        return argv + (["--max-steps", str(b.max_finetune_steps)] if b.max_finetune_steps else [])

    def finetune(self, arm: Arm, pretrain_seed: Optional[int], seed: int, checkpoint: Optional[str],
                 run: bool) -> Optional[dict]:
        from finetune.cli import run as finetune_main

        return self.cli_stage(self.finetune_name(arm, pretrain_seed, seed), finetune_main,
                              self.finetune_argv(seed, checkpoint, arm.encoder_grn), run)


def evaluate_frozen(checkpoint: str, budget: Budget, workers: int) -> dict:
    """kNN top-1 and linear-probe top-1 (one per probe seed) of a checkpoint's frozen encoder."""
    from fcmae.data.labelled import stratified_subset
    from fcmae.pretrain.knn import knn_scores, topk_accuracy
    from fcmae.runtime.weights import timm_encoder

    _, model = timm_encoder(checkpoint)
    (bank, bank_y), (test, test_y) = pooled_features(model, budget, workers)
    unit = torch.nn.functional.normalize
    knn = topk_accuracy(knn_scores(unit(bank, dim=1), bank_y, unit(test, dim=1), NUM_CLASSES, k=20,
                                   temperature=0.07), test_y)
    probe = {}
    for seed in budget.probe_seeds:
        idx = torch.as_tensor(stratified_subset(bank_y.numpy(), budget.probe_labels, seed))
        probe[str(seed)] = linear_probe(bank[idx], bank_y[idx], test, test_y, seed, budget.probe_epochs)
    return {"knn_acc1": knn["acc1"], "probe": probe, "bank_images": len(bank), "test_images": len(test)}


@torch.no_grad()
def pooled_features(model, budget: Budget, workers: int):
    """((bank features, labels), (test features, labels)): global-average-pooled final-stage maps (N, C4) of a
    stratified bank of training images (seed 0) and of the test images, through fine-tuning's eval transform."""
    from torch.utils.data import DataLoader

    from fcmae.data.labelled import build_datasets

    data = build_datasets(data_path=None, input_size=(budget.size, budget.size), in_chans=model.stem[0].in_channels,
                          train_subset=budget.knn_bank, val_subset=budget.test_images or None, seed=0, augment=False)
    out = []
    for dataset in (data.train, data.val):
        feats, labels = [], []
        for images, targets in DataLoader(dataset, batch_size=256, num_workers=workers):
            feats.append(model.forward_features(images).float().mean(dim=(2, 3)))
            labels.append(torch.as_tensor(targets))
        out.append((torch.cat(feats), torch.cat(labels)))
    return out


def linear_probe(train_x, train_y, test_x, test_y, seed: int, epochs: int, batch_size: int = 256,
                 lr: float = 1e-2) -> float:
    """Top-1 (%) of LayerNorm + Linear (timm's head after pooling) trained on frozen features with AdamW and a
    cosine schedule; the seed sets the init and the batch order. lr 1e-2 (the fine-tune CLI's probe lr): on the
    random init's features at 64 px, 30 epochs reached 73.4% where lr 1e-3 needed 100 epochs for 73.3%."""
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(nn.LayerNorm(train_x.shape[1], eps=1e-6), nn.Linear(train_x.shape[1], NUM_CLASSES))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(train_x), generator=g)
            for start in range(0, len(order), batch_size):
                i = order[start:start + batch_size]
                loss = nn.functional.cross_entropy(head(train_x[i]), train_y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        return 100.0 * (head(test_x).argmax(dim=1) == test_y).float().mean().item()


# --------------------------------------------------------------------------------------------------
# One arm, end to end


def run_arm(stages: Stages, arm: Arm, run: bool) -> Optional[dict]:
    """Every stage of one arm (run when `run`, else only what earlier invocations finished); None if incomplete."""
    b, minutes = stages.budget, {}
    pretrained = {}  # pretraining seed -> (checkpoint, metrics)
    if arm.pretrained:
        for seed in b.pretrain_seeds:
            got = stages.pretrain(arm, seed, run)
            if got is None:
                return None
            pretrained[seed] = got
        minutes["pretraining"] = sum(stages.timings.minutes.get(stages.pretrain_name(arm, s), 0.0)
                                     for s in b.pretrain_seeds)
        checkpoints = {s: c for s, (c, _) in pretrained.items()}
    else:
        checkpoints = {None: stages.random_init()}
    evals = {}
    for seed, ckpt in checkpoints.items():
        evals[seed] = stages.evaluate(arm.name if seed is None else f"{arm.name}/p{seed}", ckpt, run)
        if evals[seed] is None:
            return None
    minutes["evaluation"] = sum(e["seconds"] for e in evals.values()) / 60
    finetunes = {}
    for pseed, ckpt in checkpoints.items():
        for seed in b.finetune_seeds:
            metrics = stages.finetune(arm, pseed, seed, ckpt if arm.pretrained else None, run)
            if metrics is None:
                return None
            finetunes[f"p{pseed}/s{seed}" if arm.pretrained else f"s{seed}"] = metrics["acc1"]
    minutes["fine-tuning"] = sum(stages.timings.minutes.get(stages.finetune_name(arm, p, s), 0.0)
                                 for p in checkpoints for s in b.finetune_seeds)
    minutes["total"] = sum(minutes.values())
    result = {
        "arm": arm.name, "label": arm.label, "settings": asdict(arm), "describe": arm.describe(),
        "masked_fraction": masked_fraction(arm.mask_ratio, b.size) if arm.pretrained else None,
        "knn": summarise([e["knn_acc1"] for e in evals.values()]),
        "probe": summarise([v for e in evals.values() for v in e["probe"].values()]),
        "finetune": summarise(list(finetunes.values())), "finetune_runs": finetunes,
        "minutes": minutes, "checkpoints": {str(s): os.path.relpath(c, stages.work) for s, c in checkpoints.items()},
    }
    if arm.pretrained:
        result["pretrain_loss"] = {str(s): m.get("last_loss") for s, (_, m) in pretrained.items()}
        result["knn_curve"] = {str(s): [{"step": p.get("step"), "acc1": p.get("acc1")} for p in m.get("knn", [])]
                               for s, (_, m) in pretrained.items()}
    return result


def feature_diversity(stages: Stages, arms: Dict[str, dict], run: bool) -> Optional[dict]:
    """The paper's feature cosine distance per layer for V1-FCMAE, V2-FCMAE (first pretraining seed) and the
    random init; needs both pretrained arms."""
    from fcmae.runtime.weights import timm_encoder
    from tools.feature_diversity import analyse, image_source, random_model

    if "v1-fcmae" not in arms or "v2-fcmae" not in arms:
        return None
    b = stages.budget
    models = {"V1-FCMAE": arms["v1-fcmae"]["checkpoints"][str(b.pretrain_seeds[0])],
              "V2-FCMAE": arms["v2-fcmae"]["checkpoints"][str(b.pretrain_seeds[0])]}
    key = f"feature_diversity|{b.size}px|{b.diversity_images}img|" + "|".join(models.values())

    def compute():
        loaded = {label: timm_encoder(os.path.join(stages.work, path))[1] for label, path in models.items()}
        loaded["random init"] = random_model(MODEL, IN_CHANS, seed=0)
        images = image_source(b.diversity_images, b.size)
        return {"activation": "mlp", "distances": analyse(loaded, images, "mlp")}

    return stages.cached(key, compute, run)


# --------------------------------------------------------------------------------------------------
# Results


def results_table(arms: Dict[str, dict]) -> List[str]:
    scratch = arms.get("scratch")
    lines = ["| arm | pretraining | masked | kNN top-1 | linear probe | 1% fine-tune | gain over scratch "
             "(paired) | gain − 1 std | minutes |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in arms.items():
        gain = paired_gain(r["finetune_runs"], scratch["finetune_runs"]) if scratch and name != "scratch" else None
        masked = f"{r['masked_fraction']:.0%}" if r["masked_fraction"] is not None else "—"
        gain_cells = f"{fmt(gain)} | {gain['mean_minus_std']:+.2f}" if gain else "— | —"
        lines.append(f"| {r['label']} | {r['describe']} | {masked} | {fmt(r['knn'])} | {fmt(r['probe'])} | "
                     f"{fmt(r['finetune'])} | {gain_cells} | {r['minutes']['total']:.1f} |")
    return lines


def every_value(arms: Dict[str, dict]) -> List[str]:
    lines = []
    for r in arms.values():
        runs = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["finetune_runs"].items()))
        lines.append(f"- {r['label']}: kNN {', '.join(f'{v:.2f}' for v in r['knn']['values'])}; probe "
                     f"{', '.join(f'{v:.2f}' for v in r['probe']['values'])}; fine-tune {runs}")
    return lines


def write_results(out: str, budget_name: str, budget: Budget, arms: Dict[str, dict], diversity: Optional[dict],
                  work: str):
    os.makedirs(out, exist_ok=True)
    test = f"a stratified {budget.test_images} of the 10k test images" if budget.test_images else "the 10k test images"
    lines = [f"# FCMAE ablations on Fashion-MNIST ({budget_name} budget)", "",
             f"Top-1 (%) on {test}, {MODEL} with {IN_CHANS}-channel input at {budget.size} px; pretraining: "
             f"{budget.pretrain_epochs} epoch(s) of the 60k training images without labels, pretraining seeds "
             f"{list(budget.pretrain_seeds)}. kNN: k=20 on a bank of {budget.knn_bank} labelled training images. "
             f"Linear probe: {budget.probe_labels} of them per probe seed, {budget.probe_epochs} epochs on frozen "
             f"features. Fine-tuning: {budget.finetune_fraction:.0%} of the labels, {budget.finetune_epochs} epochs, "
             f"seeds {list(budget.finetune_seeds)} (the seed draws the labelled images and the init). mean ± sample "
             "std (n); the gain over scratch is per fine-tuning seed (same labelled images) and 'gain − 1 std' is "
             "its conservative figure.", "",
             *results_table(arms), "", "Every value:", "", *every_value(arms), ""]
    if "v1-fcmae" in arms:
        lines += ["V1-FCMAE: the encoder is pretrained and fine-tuned without GRN (held at identity: "
                  "--no-encoder-grn in both CLIs); kNN, probe and feature diversity measure that encoder.", ""]
    if diversity:
        lines += ["Feature cosine distance (the paper's feature-collapse analysis; MLP activation after GELU, mean "
                  "over each stage's blocks):", "", *diversity_table(diversity), "",
                  "![feature diversity](feature_diversity.png)", ""]
    lines += ["![every value per arm](arms.png)", "", "![pretraining loss](curves.png)", ""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    write_json(os.path.join(out, "results.json"),
               {"budget": budget_name, "settings": asdict(budget), "arms": arms, "feature_diversity": diversity,
                "gains": {n: paired_gain(r["finetune_runs"], arms["scratch"]["finetune_runs"])
                          for n, r in arms.items() if n != "scratch" and "scratch" in arms}})
    plot_arms(os.path.join(out, "arms.png"), arms)
    plot_losses(os.path.join(out, "curves.png"), arms, work)
    if diversity:
        from tools.feature_diversity import plot

        plot(diversity["distances"], os.path.join(out, "feature_diversity.png"), "feature cosine distance (MLP)")


def diversity_table(diversity: dict) -> List[str]:
    from tools.feature_diversity import table

    return table(diversity["distances"]).splitlines()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_arms(path: str, arms: Dict[str, dict]):
    """One panel per metric: every value per arm (dots) with mean ± std (bar)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, title in zip(axes, ("knn", "probe", "finetune"), ("kNN top-1", "linear probe", "1% fine-tune")):
        for i, r in enumerate(arms.values()):
            s = r[metric]
            ax.errorbar([i], [s["mean"]], yerr=[s["std"]], fmt="o", capsize=6, color="k")
            ax.scatter([i + 0.12] * s["n"], s["values"], s=14, alpha=0.6)
        ax.set_xticks(range(len(arms)), [r["label"] for r in arms.values()], rotation=30, ha="right")
        ax.set(title=title, ylabel="test top-1 (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def loss_curve(run_dir: str) -> List[Tuple[int, float]]:
    """(step, mean loss) points of a pretraining run, from its newest checkpoint's loss history."""
    from fcmae.runtime.checkpoint_file import read_checkpoint
    from fcmae.runtime.checkpoints import list_checkpoints

    history = read_checkpoint(list_checkpoints(run_dir)[0]).get("history") or {}
    if isinstance(history, list):  # older checkpoints kept every loss
        return list(enumerate(history, 1))
    return [(int(p[0]), float(p[1])) for p in history.get("curve", [])]


def plot_losses(path: str, arms: Dict[str, dict], work: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in arms.values():
        for seed, ckpt_path in r["checkpoints"].items():
            if r["settings"]["pretrained"]:
                points = loss_curve(os.path.dirname(os.path.join(work, ckpt_path)))
                ax.plot([p[0] for p in points], [p[1] for p in points], label=f"{r['label']} (seed {seed})")
    ax.set(title="FCMAE pretraining loss (masked patches)", xlabel="step", ylabel="loss")
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no pretrained arm finished yet", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Command line


def run_ablations(budget_name: str, arms_selected: Sequence[str], work_dir: str, out: str, workers: int) -> dict:
    """The ablation study (module docstring): every arm's stages (run for the selected arms, looked up for the
    others), feature diversity, and the results in `out`."""
    from fcmae.runtime.logs import setup_logging

    budget = BUDGETS[budget_name]
    os.makedirs(work_dir, exist_ok=True)
    stages = Stages(work_dir, budget, workers)
    arms = {}
    for name in ARMS:
        result = run_arm(stages, ARMS[name], run=name in arms_selected)
        setup_logging(None)  # the CLIs point logging at their own dirs
        if result is not None:
            arms[name] = result
            log.info("arm %s: kNN %s, probe %s, 1%% fine-tune %s", name, fmt(result["knn"]), fmt(result["probe"]),
                     fmt(result["finetune"]))
    diversity = feature_diversity(stages, arms, run=bool({"v1-fcmae", "v2-fcmae"} & set(arms_selected)))
    write_results(out, budget_name, budget, arms, diversity, work_dir)
    log.info("results in %s:\n%s", out, open(os.path.join(out, "results.md")).read())
    return json.load(open(os.path.join(out, "results.json")))
