"""Pretraining CLI end to end on real data (Fashion-MNIST, a folder of photos), resume and accumulation."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.pretrain.cli import main
from fcmae.runtime import checkpoints as ckpt
from fcmae.runtime.step import train_step
from models import create_fcmae
from models.masking import random_mask
from tests.conftest import TINY, TINY_PRETRAIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the kNN monitor off (it reads 3000 Fashion-MNIST images): test_knn_monitor turns it on at a small size
SMALL = TINY_PRETRAIN + ["--input-size", "64", "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0",
                         "--num-workers", "0", "--log-every", "1", "--blr", "1e-3", "--knn-every-epochs", "0"]
pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, *extra):
    main(SMALL + ["--output-dir", str(tmp_path)] + list(extra))
    return ckpt.latest_loadable(str(tmp_path))[1]


def test_fashion_mnist_smoke_writes_everything(tmp_path):
    state = run(tmp_path, "--max-steps", "3")
    assert state["format"] == "fcmae-pretrain" and state["step"] == 3
    assert [p[0] for p in state["history"]["curve"]] == [1, 2, 3]
    assert set(state) >= {"model", "optimizer", "scaler", "epoch", "args", "rng", "model_name"}
    files = os.listdir(tmp_path)
    assert {"config.yaml", "metrics.json", "log.txt", "tensorboard"} <= set(files)
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["complete"] and metrics["steps"] == metrics["total_steps"] == 3 and np.isfinite(metrics["last_loss"])
    assert metrics["last_loss"] == state["history"]["curve"][-1][1]
    events = os.listdir(tmp_path / "tensorboard")
    assert events and os.path.getsize(tmp_path / "tensorboard" / events[0]) > 1000  # scalars + image


def test_resume_is_exact(tmp_path):
    full = run(tmp_path / "full", "--max-steps", "4")
    run(tmp_path / "cut", "--max-steps", "2")
    resumed = run(tmp_path / "cut", "--max-steps", "4")
    assert resumed["history"] == full["history"]  # bit for bit
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_knn_monitor(tmp_path):
    """A small labelled bank and query set: kNN top-1/top-5 in metrics.json, the checkpoint and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    state = run(tmp_path, "--max-steps", "2", "--knn-every-epochs", "1", "--knn-bank", "60", "--knn-queries", "30",
                "--knn-k", "5")
    (result,) = state["knn"]
    assert result["step"] == 2 and result["bank_images"] == 60 and result["query_images"] == 30
    assert 0 <= result["acc1"] <= result["acc5"] <= 100
    assert json.load(open(tmp_path / "metrics.json"))["knn"] == state["knn"]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("knn/top1")] == [2]


def test_image_folder_without_classes(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (50 + i, 70, 3), dtype=np.uint8)).save(data / f"{i}.png")
    state = run(tmp_path / "out", "--data-path", str(data), "--max-steps", "1", "--batch-size", "2")
    assert state["step"] == 1


def test_accumulation_equals_one_big_batch():
    """2 micro-batches of 4 give the same update as one batch of 8 (per-sample GRN statistics)."""
    torch.manual_seed(0)
    imgs, mask = torch.randn(8, 3, 64, 64, dtype=torch.float64), random_mask(8, 4, 0.6)
    params = []
    for micro in ([(imgs, mask)], [(imgs[:4], mask[:4]), (imgs[4:], mask[4:])]):
        torch.manual_seed(1)
        model = create_fcmae(TINY).double()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss, grad_norm, finite = train_step(model, micro, opt, torch.amp.GradScaler("cpu", enabled=False),
                                             torch.device("cpu"), "none")
        assert loss.dim() == grad_norm.dim() == finite.dim() == 0 and bool(finite) and float(grad_norm) > 0
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(params[0], params[1], rtol=1e-5, atol=1e-10)


def test_help_for_huge_and_console_script():
    out = subprocess.run([sys.executable, "-m", "fcmae.pretrain", "--model", "convnextv2_huge", "--help"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--mask-ratio" in out.stdout and "--grn-stats" in out.stdout
