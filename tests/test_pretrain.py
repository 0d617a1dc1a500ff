"""Pretraining CLI end to end on real data (Fashion-MNIST, a folder of photos), resume and accumulation."""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from fcmae import checkpoint as ckpt
from fcmae.engine import train_step
from fcmae.pretrain import main
from models import create_fcmae
from models.masking import random_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--input-size", "64", "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "0",
         "--log-every", "1", "--blr", "1e-3"]


def run(tmp_path, *extra):
    main(SMALL + ["--output-dir", str(tmp_path)] + list(extra))
    return ckpt.latest_loadable(str(tmp_path))[1]


def test_fashion_mnist_smoke_writes_everything(tmp_path):
    state = run(tmp_path, "--max-steps", "3")
    assert state["format"] == "fcmae-pretrain" and state["step"] == 3 and len(state["history"]) == 3
    assert set(state) >= {"model", "optimizer", "scaler", "epoch", "args", "rng", "model_name"}
    files = os.listdir(tmp_path)
    assert {"config.yaml", "metrics.json", "log.txt", "tensorboard"} <= set(files)
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["steps"] == 3 and np.isfinite(metrics["last_loss"])
    events = os.listdir(tmp_path / "tensorboard")
    assert events and os.path.getsize(tmp_path / "tensorboard" / events[0]) > 1000  # scalars + image


def test_resume_is_exact(tmp_path):
    full = run(tmp_path / "full", "--max-steps", "4")["history"]
    run(tmp_path / "cut", "--max-steps", "2")
    resumed = run(tmp_path / "cut", "--max-steps", "4")["history"]
    assert resumed == full  # bit for bit


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
        model = create_fcmae("convnextv2_atto").double()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss, _ = train_step(model, micro, opt, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"),
                             "none")
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(params[0], params[1], rtol=1e-5, atol=1e-10)


def test_help_for_huge_and_console_script():
    out = subprocess.run([sys.executable, "-m", "fcmae.pretrain", "--model", "convnextv2_huge", "--help"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--mask-ratio" in out.stdout and "--grn-stats" in out.stdout
