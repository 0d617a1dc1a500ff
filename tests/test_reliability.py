"""No lost work: SIGKILL at random steps and resume, SIGTERM/SIGINT, a corrupt newest checkpoint, a full disk,
non-finite losses. Both training CLIs, real child processes where a signal is involved."""
import errno
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from fcmae import checkpoint as ckpt
from fcmae.cli import run_cli
from fcmae.pretrain import main as pretrain_main
from finetune.__main__ import run as finetune_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
PRETRAIN = ["-m", "fcmae.pretrain", "--input-size", "64", "--batch-size", "4", "--epochs", "3",
            "--warmup-epochs", "0", "--num-workers", "0", "--blr", "1e-3", "--log-every", "1", "--device", "cpu",
            "--data-path", "{data}", "--max-steps", str(STEPS)]
# mixup, RandAugment, drop-path and EMA on: every source of randomness a resume must reproduce
FINETUNE = ["-m", "finetune", "--model", "convnextv2_atto", "--input-size", "32", "--batch-size", "8",
            "--train-subset", "24", "--val-subset", "16", "--epochs", "3", "--num-workers", "0", "--log-every", "1",
            "--mixup", "0.8", "--cutmix", "1.0", "--device", "cpu", "--max-steps", str(STEPS)]
COMMANDS = {"pretrain": PRETRAIN, "finetune": FINETUNE}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 real photos (scikit-image) as a flat folder: 3 epochs of 3 steps at batch 4, so runs cross epochs."""
    from PIL import Image
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("photos")
    names = ["astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
             "coins", "moon", "page", "horse", "text"]
    for name in names:
        img = getattr(skdata, name)()
        Image.fromarray(img if img.dtype.name == "uint8" else (img * 255).astype("uint8")).save(root / f"{name}.png")
    return str(root)


def command(kind, out, data, *extra):
    argv = [a.format(data=data) for a in COMMANDS[kind]]
    return [sys.executable] + argv + ["--output-dir", str(out)] + list(extra)


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def finish(cmd):
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res


def losses(kind, out):
    state = ckpt.latest_loadable(str(out))[1]
    assert state["step"] == STEPS
    return state["history"] if kind == "pretrain" else state["losses"]


def stop_at(cmd, step: int, sig) -> subprocess.CompletedProcess:
    """Start the run, send `sig` once its progress line for `step` appears, return the finished process."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if f" step {step}/{STEPS} " in line:
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=600)
    proc.output = "".join(seen) + (rest or "")
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    runs = {}
    for kind in COMMANDS:
        out = tmp_path_factory.mktemp(f"{kind}_full")
        finish(command(kind, out, data))
        runs[kind] = losses(kind, out)
    return runs


@pytest.mark.parametrize("kind", list(COMMANDS))
def test_sigkill_at_two_random_steps_then_resume_is_exact(tmp_path, data, uninterrupted, kind):
    rng = random.Random()
    kill_steps = rng.sample(range(2, STEPS - 1), 2)
    for k in kill_steps:
        out = tmp_path / f"killed_at_{k}"
        cmd = command(kind, out, data, "--save-every-steps", "1", "--keep-checkpoints", "2")
        proc = stop_at(cmd, k, signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL, proc.output[-2000:]
        saved = ckpt.latest_loadable(str(out))[1]["step"]
        assert 1 <= saved < STEPS, (k, saved)  # killed mid-run: only the steps up to the last checkpoint remain
        res = finish(cmd)  # the same command again: auto-resume
        assert f"at step {saved}" in res.stdout and "resumed from" in res.stdout  # not a fresh start
        assert losses(kind, out) == uninterrupted[kind], f"killed at step {k} (resumed from {saved})"
        assert not [f for f in os.listdir(out) if f.startswith(ckpt.TMP_PREFIX)]


@pytest.mark.parametrize("kind,sig", [("pretrain", signal.SIGTERM), ("finetune", signal.SIGINT)])
def test_sigterm_sigint_save_and_exit_cleanly(tmp_path, data, uninterrupted, kind, sig):
    cmd = command(kind, tmp_path, data)  # no periodic checkpoints: the signal handler writes the one we resume from
    proc = stop_at(cmd, 3, sig)
    assert proc.returncode == 0, proc.output[-2000:]
    assert f"received {sig.name}: checkpoint saved at step" in proc.output
    saved = ckpt.latest_loadable(str(tmp_path))[1]["step"]
    assert 3 <= saved < STEPS
    assert f"at step {saved}" in finish(cmd).stdout
    assert losses(kind, tmp_path) == uninterrupted[kind]


def test_corrupt_newest_checkpoint_is_skipped(tmp_path, data, uninterrupted):
    cmd = command("pretrain", tmp_path, data, "--save-every-steps", "1", "--keep-checkpoints", "3")
    finish(cmd[:cmd.index("--max-steps")] + ["--max-steps", "4"] + cmd[cmd.index("--max-steps") + 2:])
    newest = tmp_path / "checkpoint-00000004.pth"
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    res = finish(cmd)
    assert "skipping unreadable checkpoint" in res.stderr and "checkpoint-00000004.pth" in res.stderr
    assert "resumed from" in res.stdout and "checkpoint-00000003.pth at step 3" in res.stdout
    assert losses("pretrain", tmp_path) == uninterrupted["pretrain"]


def small_pretrain(out, data, *extra):
    return ["--input-size", "64", "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "0",
            "--data-path", data, "--output-dir", str(out), "--log-every", "1"] + list(extra)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, data, monkeypatch, capsys):
    """The second checkpoint write fails like a full disk after writing part of the file (ENOSPC)."""
    real_save, calls = torch.save, []

    def failing_save(obj, f):
        calls.append(f)
        if len(calls) == 2:
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    code = run_cli(pretrain_main, small_pretrain(tmp_path, data, "--max-steps", "3", "--save-every-steps", "1"))
    assert code == 4
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left on device" in err
    assert f"the previous checkpoint {tmp_path / 'checkpoint-00000001.pth'} is intact" in err
    assert "Traceback" not in err
    assert ckpt.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-00000001.pth")]
    assert ckpt.load(str(tmp_path / "checkpoint-00000001.pth"))["step"] == 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(ckpt.TMP_PREFIX)]  # the partial file is gone


def nan_at_steps(monkeypatch, target, bad_steps):
    """Make the loss of the given 1-based optimiser steps NaN (one micro-batch per step)."""
    real, count = target.forward, [0]

    def forward(self, *a, **k):
        loss, *rest = real(self, *a, **k)
        if self.training:
            count[0] += 1
            if count[0] in bad_steps:
                loss = loss * float("nan")
        return (loss, *rest)

    monkeypatch.setattr(target, "forward", forward)


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, data, monkeypatch, capsys):
    from models.fcmae import FCMAE

    nan_at_steps(monkeypatch, FCMAE, {3})
    code = run_cli(pretrain_main, small_pretrain(tmp_path, data, "--max-steps", "5", "--save-every-steps", "1"))
    assert code == 3
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at step 3; stopping (the last checkpoint is left untouched" in err
    assert ckpt.list_checkpoints(str(tmp_path)) == [str(tmp_path / f"checkpoint-0000000{i}.pth") for i in (2, 1)]


def test_skip_nonfinite_skips_the_update(tmp_path, data, monkeypatch, capsys):
    from finetune.engine import WithLoss

    nan_at_steps(monkeypatch, WithLoss, {2, 4})
    base = ["--model", "convnextv2_atto", "--input-size", "32", "--batch-size", "8", "--train-subset", "48",
            "--val-subset", "16", "--epochs", "1", "--num-workers", "0", "--no-model-ema", "--output-dir",
            str(tmp_path), "--skip-nonfinite", "2"]
    metrics = finetune_run(base)
    assert metrics["steps"] == 6
    err = capsys.readouterr().err
    for step, k in [(2, 1), (4, 2)]:
        assert f"step {step}: non-finite loss (nan), update skipped ({k} of 2 allowed by --skip-nonfinite)" in err
    state = ckpt.load(str(tmp_path / "checkpoint-00000006.pth"))
    assert [v != v for v in state["losses"]] == [False, True, False, True, False, False]
    assert all(s["step"] == 4 for s in state["optimizer"]["state"].values())  # 6 steps, 2 without an update
