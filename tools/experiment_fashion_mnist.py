"""Does FCMAE pretraining help when labels are few? An end-to-end experiment on Fashion-MNIST (real images, Debian's
dataset-fashion-mnist) that fits a 2-core CPU in under an hour:

1. FCMAE-pretrain convnextv2_atto on the 60k training images without labels, at 128x128 (a 4x4 mask grid;
   the reference recipe otherwise: mask 0.6, 512-dim decoder, norm-pix loss), checkpointing every epoch;
2. kNN top-1 (cosine, k=20) of the encoder after each epoch, and of the random init;
3. a linear probe of the final encoder;
4. fine-tuning with 1% and 10% of the labels (100% with --budget full), and the same model trained from scratch
   with the same budget and recipe (no layer decay: it has no pretrained layers to protect);
5. results.md (table), results.json, curves.png (loss and kNN curves) and reconstructions.png in --out.

Evaluation runs at the pretraining resolution, 128x128, except the 10% fine-tuning runs, at 64x64 to fit the
hour (the network is fully convolutional). Every accuracy is top-1 on the 10k test images. Each stage is an
ordinary run of the project's CLIs in --work-dir and is reused when finished, so an interrupted experiment
continues where it stopped; each stage's wall time is kept in WORK_DIR/timings.json as measured when it ran.

    python -m tools.experiment_fashion_mnist                 # ~55 min on a 2-core CPU
    python -m tools.experiment_fashion_mnist --budget full   # longer pretraining, 100% labels too
"""
import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List

import torch

log = logging.getLogger("fcmae")
MODEL = "convnextv2_atto"
PRETRAIN_SIZE = 128


@dataclass
class Budget:
    pretrain_epochs: int
    pretrain_checkpoints: int  # evenly spaced, for the kNN curve
    knn_bank: int  # labelled training images the test images look up (stratified)
    knn_test: int  # test images for the kNN curve (0: all 10k)
    probe_epochs: int
    probe_fraction: float
    finetune: Dict[float, List[int]] = field(default_factory=dict)  # label fraction -> [epochs, input size]
    eval_size: int = PRETRAIN_SIZE  # kNN and the probe
    max_pretrain_steps: int = 0  # only for the smoke budget
    max_finetune_steps: int = 0
    test_subset: int = 0  # fine-tuning and probe evaluation (0: all 10k test images)


BUDGETS = {
    # measured on this 2-core CPU with data loading: pretraining ~100 img/s at 128 px (30 min), fine-tuning ~37
    # img/s at 128 px and ~130 at 64 px (6 and 3 min a run), kNN ~1.5 min a checkpoint at 128 px
    "default": Budget(pretrain_epochs=3, pretrain_checkpoints=3, knn_bank=5000, knn_test=5000, probe_epochs=3,
                      probe_fraction=0.1, finetune={0.01: [20, 128], 0.1: [3, 64]}),
    "full": Budget(pretrain_epochs=20, pretrain_checkpoints=10, knn_bank=60000, knn_test=0, probe_epochs=10,
                   probe_fraction=1.0, finetune={0.01: [100, 128], 0.1: [30, 128], 1.0: [10, 128]}),
    # the test's smoke run: every stage, a few steps each
    "smoke": Budget(pretrain_epochs=1, pretrain_checkpoints=2, knn_bank=200, knn_test=100, probe_epochs=1,
                    probe_fraction=0.01, finetune={0.01: [1, 64]}, eval_size=64, max_pretrain_steps=4,
                    max_finetune_steps=3, test_subset=100),
}


def finetune_recipe(budget: Budget, epochs: int, size: int) -> List[str]:
    """Our short-schedule version of the reference atto recipe, shared by FCMAE and scratch runs: batch 64,
    lr 1e-3 with a warm-up of a tenth of the run, no RandAugment/mixup (a few epochs of 28x28 grey images),
    label smoothing 0.1, drop-path 0.1, no EMA (0.9999 barely moves in so few steps); evaluated at the end."""
    argv = ["--model", MODEL, "--input-size", str(size), "--batch-size", "64", "--epochs", str(epochs),
            "--warmup-epochs", str(max(epochs / 10, 1)), "--lr", "1e-3", "--min-lr", "1e-6", "--weight-decay",
            "0.05", "--drop-path", "0.1", "--smoothing", "0.1", "--aa", "none", "--reprob", "0", "--no-model-ema",
            "--eval-every-epochs", str(epochs), "--log-every", "50"]
    return argv + test_and_steps(budget, budget.max_finetune_steps)


def test_and_steps(budget: Budget, max_steps: int) -> List[str]:
    extra = ["--val-subset", str(budget.test_subset)] if budget.test_subset else []
    return extra + (["--max-steps", str(max_steps)] if max_steps else [])


def pretrain_steps(budget: Budget):
    """(total steps, checkpoint interval for the kNN curve)."""
    steps = budget.max_pretrain_steps or budget.pretrain_epochs * (60000 // 64)
    return steps, -(-steps // budget.pretrain_checkpoints)


def pretrain(budget: Budget, work: str, workers: int) -> str:
    from fcmae.pretrain import main as pretrain_main

    out = os.path.join(work, "pretrain")
    steps, every = pretrain_steps(budget)
    pretrain_main(["--model", MODEL, "--input-size", str(PRETRAIN_SIZE), "--batch-size", "64",
                   "--epochs", str(budget.pretrain_epochs), "--max-steps", str(steps),
                   # a 10x base lr and a short warm-up suit a run of a few epochs (the recipe's are for 800)
                   "--blr", "2e-3", "--warmup-epochs", str(min(0.2, budget.pretrain_epochs / 10)),
                   "--save-every-steps", str(every), "--keep-checkpoints", "1000", "--num-workers", str(workers),
                   "--log-every", "50", "--vis-every-epochs", "1", "--output-dir", out])
    return out


def random_init_encoder(work: str, seed: int) -> str:
    """The encoder fine-tuning from scratch starts from, as a timm file: the kNN curve's step 0."""
    import timm
    from safetensors.torch import save_file

    path = os.path.join(work, "random_init.safetensors")
    if not os.path.exists(path):
        torch.manual_seed(seed)
        save_file(timm.create_model(MODEL, num_classes=0).state_dict(), path)
    return path


def knn_curve(budget: Budget, work: str, pretrain_dir: str, workers: int) -> List[dict]:
    from fcmae import checkpoint as ckpt
    from tools.knn_eval import knn_eval

    cache_path = os.path.join(work, "knn.json")
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    # the random init, every checkpoint interval and the end (other checkpoints are left out: kNN costs)
    steps, every = pretrain_steps(budget)
    saved = {ckpt.checkpoint_step(p): p for p in ckpt.list_checkpoints(pretrain_dir)}
    points = [(0, random_init_encoder(work, seed=0))]
    points += [(s, saved[s]) for s in sorted(saved) if s % every == 0 or s == steps]
    curve = []
    for step, path in points:
        key = f"{step}:{budget.eval_size}px:{budget.knn_bank}:{budget.knn_test}"
        if key not in cache:
            t0 = time.time()
            res = knn_eval(path, input_size=(budget.eval_size, budget.eval_size), k=20, train_subset=budget.knn_bank,
                           val_subset=budget.knn_test or None, num_workers=workers)
            cache[key] = {"step": step, "acc1": res["acc1"], "acc5": res["acc5"], "seconds": time.time() - t0}
            log.info("kNN after %d pretraining steps: top-1 %.2f (%.0f s)", step, res["acc1"], cache[key]["seconds"])
            with open(cache_path, "w") as f:
                json.dump(cache, f, indent=1)
        curve.append(cache[key])
    return curve


def finetune_runs(budget: Budget, work: str, pretrained: str, workers: int, timings: "Timings") -> Dict[str, dict]:
    """The probe and the fine-tuning runs; a run dir's name holds its settings, so a changed budget starts anew."""
    from finetune.__main__ import run

    def stage(name: str, argv: List[str]) -> dict:
        out = os.path.join(work, name)
        result = timings.stage(name, lambda: finished(out) or run(argv + ["--output-dir", out]))
        return {**result, "dir": name}

    results = {}
    size = budget.eval_size
    results["probe"] = stage(f"probe_{budget.probe_fraction:g}_{size}px_{budget.probe_epochs}ep", [
        "--linear-probe", "--finetune", pretrained, "--model", MODEL, "--input-size", str(size),
        "--batch-size", "64", "--epochs", str(budget.probe_epochs), "--eval-every-epochs", str(budget.probe_epochs),
        "--label-fraction", str(budget.probe_fraction), "--num-workers", str(workers), "--log-every", "50",
        ] + test_and_steps(budget, budget.max_finetune_steps))
    for fraction, (epochs, size) in budget.finetune.items():
        for init in ("fcmae", "scratch"):
            start = ["--finetune", pretrained, "--layer-decay", "0.75"] if init == "fcmae" else ["--layer-decay", "1"]
            results[f"{init}_{fraction:g}"] = stage(
                f"finetune_{init}_{fraction:g}_{size}px_{epochs}ep",
                finetune_recipe(budget, epochs, size) + start
                + ["--label-fraction", str(fraction), "--num-workers", str(workers)])
    return results


def finished(out: str):
    """metrics.json of a run that completed earlier (an interrupted one resumes instead)."""
    path = os.path.join(out, "metrics.json")
    return json.load(open(path)) if os.path.exists(path) else None


class Timings:
    """Minutes each stage took when it ran, kept in WORK_DIR/timings.json: a stage reused from an earlier,
    interrupted invocation keeps the time it took then, so the total is the experiment's, not the last call's."""

    def __init__(self, work: str):
        self.path = os.path.join(work, "timings.json")
        self.minutes = json.load(open(self.path)) if os.path.exists(self.path) else {}

    def stage(self, name: str, fn):
        t0 = time.time()
        result = fn()
        if name not in self.minutes:
            self.minutes[name] = (time.time() - t0) / 60
            with open(self.path, "w") as f:
                json.dump(self.minutes, f, indent=1)
        return result


def losses_of(run_dir: str) -> List[float]:
    from fcmae import checkpoint as ckpt

    state = ckpt.latest_loadable(run_dir)[1]
    return state.get("history") if state.get("format") == "fcmae-pretrain" else state["losses"]


def write_results(out: str, budget_name: str, budget: Budget, work: str, knn: List[dict], runs: Dict[str, dict],
                  minutes: Dict[str, float]):
    os.makedirs(out, exist_ok=True)
    table = ["| labels | fine-tuning | from scratch | FCMAE + fine-tune | gain |", "|---|---|---|---|---|"]
    for fraction, (epochs, size) in budget.finetune.items():
        s, f = runs[f"scratch_{fraction:g}"]["acc1"], runs[f"fcmae_{fraction:g}"]["acc1"]
        table.append(f"| {fraction:.0%} ({round(fraction * 60000)} images) | {epochs} epochs at {size} px | {s:.2f} | "
                     f"{f:.2f} | {f - s:+.2f} |")
    test = f"a stratified {budget.test_subset} of the 10k test images" if budget.test_subset else "the 10k test images"
    knn_test = f"{budget.knn_test} test images" if budget.knn_test else "the 10k test images"
    lines = [f"# FCMAE on Fashion-MNIST ({budget_name} budget)", "",
             f"Top-1 (%) on {test}; {MODEL} pretrained for {budget.pretrain_epochs} epochs at {PRETRAIN_SIZE} px on the "
             "60k training images without labels.", "",
             *table, "",
             f"- linear probe ({budget.probe_fraction:.0%} of the labels, {budget.probe_epochs} epochs at "
             f"{budget.eval_size} px): {runs['probe']['acc1']:.2f}",
             f"- kNN (k=20, cosine, {budget.eval_size} px, {budget.knn_bank} labelled training images as the memory "
             f"bank, {knn_test}) after each number of pretraining steps:", "",
             "| pretraining steps | " + " | ".join(str(p["step"]) for p in knn) + " |",
             "|---|" + "---|" * len(knn),
             "| kNN top-1 | " + " | ".join(f"{p['acc1']:.2f}" for p in knn) + " |", "",
             f"- collapse monitor at the end of pretraining: {collapse_line(work)}", "",
             "Wall time (minutes): " + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items()), "",
             "![curves](curves.png)", "", "![reconstructions](reconstructions.png)", ""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"budget": budget_name, "settings": asdict(budget), "knn": knn, "runs": runs, "minutes": minutes},
                  f, indent=1)
    plot_curves(os.path.join(out, "curves.png"), work, knn, budget, runs)


def collapse_line(work: str) -> str:
    """What the collapse monitor saw last in pretraining (metrics.json)."""
    stats = json.load(open(os.path.join(work, "pretrain", "metrics.json")))["collapse"]

    def per_stage(group: str, name: str) -> str:
        return " / ".join(f"{stats[f'{group}/stage{i}_{name}']:.3g}" for i in range(4))

    return (f"dead MLP channels per stage {per_stage('collapse', 'dead_fraction')}; GRN |gamma| "
            f"{per_stage('grn', 'gamma_norm')}; |beta| {per_stage('grn', 'beta_norm')}")


def smooth(values: List[float], width: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - width] if i >= width else 0.0)
        out.append(acc / min(i + 1, width))
    return out


def plot_curves(path: str, work: str, knn: List[dict], budget: Budget, runs: Dict[str, dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    pre = losses_of(os.path.join(work, "pretrain"))
    axes[0].plot(range(1, len(pre) + 1), smooth(pre, 20))
    axes[0].set(title="FCMAE pretraining loss (masked patches)", xlabel="step", ylabel="loss (moving mean of 20)")
    axes[1].plot([p["step"] for p in knn], [p["acc1"] for p in knn], marker="o")
    axes[1].set(title="kNN top-1 vs pretraining", xlabel="pretraining step", ylabel="test top-1 (%)")
    for fraction in budget.finetune:
        for init, style in (("fcmae", "-"), ("scratch", "--")):
            curve = losses_of(os.path.join(work, runs[f"{init}_{fraction:g}"]["dir"]))
            axes[2].plot(range(1, len(curve) + 1), smooth(curve, 10), style, label=f"{init}, {fraction:.0%} labels")
    axes[2].set(title="fine-tuning loss", xlabel="step", ylabel="loss (moving mean of 10)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m tools.experiment_fashion_mnist", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=list(BUDGETS), default="default",
                   help="default: under an hour on a 2-core CPU; full: longer pretraining and 100%% labels too; "
                        "smoke: seconds, for the tests")
    p.add_argument("--work-dir", default="output/experiment_fashion_mnist", help="runs and checkpoints")
    p.add_argument("--out", default=None, help="results (default: WORK_DIR/results)")
    p.add_argument("--num-workers", type=int, default=2)
    return p


def main(argv=None) -> dict:
    from fcmae.checkpoint import list_checkpoints
    from fcmae.cli import setup_logging
    from tools.visualize import render

    args = build_parser().parse_args(argv)
    budget = BUDGETS[args.budget]
    out = args.out or os.path.join(args.work_dir, "results")
    os.makedirs(args.work_dir, exist_ok=True)
    timings = Timings(args.work_dir)
    pretrain_dir = timings.stage("pretraining", lambda: pretrain(budget, args.work_dir, args.num_workers))
    setup_logging(None)  # the CLIs point logging at their own dirs
    final = list_checkpoints(pretrain_dir)[0]
    knn = knn_curve(budget, args.work_dir, pretrain_dir, args.num_workers)
    runs = finetune_runs(budget, args.work_dir, final, args.num_workers, timings)
    os.makedirs(out, exist_ok=True)
    render(final, os.path.join(out, "reconstructions.png"), num=6, seed=0)
    minutes = {"pretraining": timings.minutes["pretraining"], "kNN": sum(p["seconds"] for p in knn) / 60,
               "probe": timings.minutes[runs["probe"]["dir"]],
               "fine-tuning": sum(timings.minutes[r["dir"]] for k, r in runs.items() if k != "probe")}
    minutes["total"] = sum(minutes.values())
    write_results(out, args.budget, budget, args.work_dir, knn, runs, minutes)
    setup_logging(None)
    log.info("results in %s:\n%s", out, open(os.path.join(out, "results.md")).read())
    return json.load(open(os.path.join(out, "results.json")))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
