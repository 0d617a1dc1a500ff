"""No lost work: SIGKILL at random (seeded) steps and resume; SIGTERM/SIGINT/SIGUSR1 save and exit 75; a corrupt
or garbage newest checkpoint; a real full disk (tmpfs) and a monkeypatched one; non-finite losses and weights;
another run's checkpoints in the output dir; TensorBoard after a resume; undecodable file names; changed settings
on resume. Both training CLIs; real child processes where a signal or a disk is involved.

The kill points are drawn from a seed printed with every failure; rerun with RELIABILITY_SEED=<seed> to replay.
"""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from fcmae.pretrain.cli import main as pretrain_main
from fcmae.runtime import checkpoints as ckpt
from fcmae.runtime.checkpoint_file import read_checkpoint
from fcmae.runtime.files import TMP_PREFIX
from fcmae.runtime.cli import run_cli
from fcmae.runtime.errors import EXIT_NONFINITE, EXIT_STOPPED, EXIT_USAGE, EXIT_WRITE_FAILED
from finetune.cli import run as finetune_run
from tests.conftest import TINY, TINY_PRETRAIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 2 ** 31))
STEPS = 8
PRETRAIN = ["-m", "fcmae.pretrain", *TINY_PRETRAIN, "--input-size", "64", "--batch-size", "4", "--epochs", "3",
            "--warmup-epochs", "0", "--num-workers", "0", "--blr", "1e-3", "--log-every", "1", "--device", "cpu",
            "--data-path", "{data}", "--max-steps", str(STEPS)]
# mixup, RandAugment, drop-path and EMA on: every source of randomness a resume must reproduce
FINETUNE = ["-m", "finetune", "--model", TINY, "--input-size", "32", "--batch-size", "8",
            "--train-subset", "24", "--val-subset", "16", "--epochs", "3", "--num-workers", "0", "--log-every", "1",
            "--mixup", "0.8", "--cutmix", "1.0", "--device", "cpu", "--max-steps", str(STEPS)]
# the same pretraining run reading the photos packed as tar shards (several, small): same samples, same order
PRETRAIN_SHARDS = [a if a != "{data}" else "{data}_shards" for a in PRETRAIN]
COMMANDS = {"pretrain": PRETRAIN, "finetune": FINETUNE, "pretrain_shards": PRETRAIN_SHARDS}
pytestmark = pytest.mark.usefixtures("one_thread")


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
    from fcmae.tools.make_shards import make_shards

    result = make_shards(str(root), f"{root}_shards", shard_size=400_000, progress=lambda line: None)
    assert len(result["shards"]) > 1
    return str(root)


def command(kind, out, data, *extra):
    argv = [a.format(data=data) for a in COMMANDS[kind]]
    return [sys.executable] + argv + ["--output-dir", str(out)] + list(extra)


def with_steps(cmd, steps):
    i = cmd.index("--max-steps")
    return cmd[:i + 1] + [str(steps)] + cmd[i + 2:]


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", LC_ALL="C.UTF-8")


def launch(cmd, expect=0):
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == expect, f"exit {res.returncode} (seed {SEED}):\n" + res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr
    return res


def here(cmd, capsys=None, expect=0):
    """The command run in this process: a reference run or a resume needs no process of its own (a child costs
    seconds of imports), only the run stopped by a signal or a full disk does. Returns its stdout and stderr
    (what capsys captured since it was last read; empty without capsys), as `launch` does."""
    main = {"fcmae.pretrain": pretrain_main, "finetune": finetune_run}[cmd[2]]  # [python, -m, module, *argv]
    # TensorBoard reads a folder's event files in name order (creation second, host, pid): a run started in the
    # same second as the one before it, by this process with its lower pid, would sort first. A new process
    # spends seconds on imports; here the next second is waited for.
    time.sleep(1 - time.time() % 1)
    code = run_cli(main, cmd[3:])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    assert code == expect, f"exit {code} (seed {SEED}):\n" + out[-2000:] + err[-3000:]
    assert "Traceback" not in err, err
    return SimpleNamespace(stdout=out, stderr=err)


def error_lines(text):
    return [line for line in text.splitlines() if "error:" in line]


def record(out):
    """(per-step losses, final weights) of the newest checkpoint of a finished run."""
    state = ckpt.latest_loadable(str(out))[1]
    assert state["step"] == STEPS
    curve = state["history"]["curve"]
    assert [p[0] for p in curve] == list(range(1, STEPS + 1)) and all(p[2] == 1 for p in curve)
    return [p[1] for p in curve], state["model"]


def assert_same_run(kind, out, reference, what):
    losses, model = record(out)
    assert losses == reference[kind][0], f"{what} (seed {SEED}): losses differ"
    for key, value in reference[kind][1].items():
        assert torch.equal(model[key], value), f"{what} (seed {SEED}): {key} differs"


def stop_at(cmd, step: int, sig) -> subprocess.Popen:
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


def no_temporaries(out):
    return not [f for f in os.listdir(out) if f.startswith(TMP_PREFIX)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    runs = {}
    for kind in COMMANDS:
        out = tmp_path_factory.mktemp(f"{kind}_full")
        here(command(kind, out, data))
        runs[kind] = record(out)
        runs[kind + "_dir"] = out
    return runs


def tensorboard_scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# --------------------------------------------------------------------------------------------------
# Kills and signals


@pytest.mark.parametrize("kind", list(COMMANDS))
def test_sigkill_at_two_random_steps_then_resume_is_exact(tmp_path, data, uninterrupted, kind, capsys):
    rng = random.Random(f"{SEED}-{kind}")
    kill_steps = sorted(rng.sample(range(2, STEPS), 2))
    print(f"RELIABILITY_SEED={SEED}: {kind} killed at steps {kill_steps}")
    for k in kill_steps:
        out = tmp_path / f"killed_at_{k}"
        what = f"{kind} killed at step {k} (seed {SEED})"
        cmd = command(kind, out, data, "--save-every-steps", "1", "--keep-checkpoints", "2")
        proc = stop_at(cmd, k, signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL, proc.output[-2000:]
        saved = ckpt.latest_loadable(str(out))[1]["step"]
        assert 1 <= saved <= k, (what, saved)  # only the steps up to the last checkpoint remain
        res = here(cmd, capsys)  # the same command again: auto-resume
        assert "resumed from" in res.stdout and f"at step {saved}" in res.stdout, what  # not a fresh start
        assert "changed settings" not in res.stderr, res.stderr  # the same command changes nothing
        assert_same_run(kind, out, uninterrupted, what)
        assert no_temporaries(out)
        # TensorBoard: every step exactly once, the resumed run's values where the killed run's were dropped
        points = tensorboard_scalars(out, "train/loss")
        assert [s for s, _ in points] == list(range(1, STEPS + 1)), (what, saved, [s for s, _ in points])
        assert [v for _, v in points] == pytest.approx(uninterrupted[kind][0], rel=1e-6), what


SIGNAL_CASES = [("pretrain", signal.SIGTERM), ("finetune", signal.SIGINT), ("pretrain", signal.SIGUSR1)]


@pytest.mark.parametrize("kind,sig", SIGNAL_CASES, ids=[f"{k}-{s.name}" for k, s in SIGNAL_CASES])
def test_stop_signals_save_and_exit_75(tmp_path, data, uninterrupted, kind, sig, capsys):
    cmd = command(kind, tmp_path, data)  # no periodic checkpoints: the signal's checkpoint is the one we resume from
    proc = stop_at(cmd, 3, sig)
    assert proc.returncode == EXIT_STOPPED, proc.output[-3000:]
    assert f"received {sig.name}: checkpoint saved at step" in proc.output
    assert "Traceback" not in proc.output
    (line,) = error_lines(proc.output)  # one line, naming what to do
    assert "run the same command again to resume" in line
    saved = ckpt.latest_loadable(str(tmp_path))[1]["step"]
    assert 3 <= saved < STEPS
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["complete"] is False and metrics["steps"] == saved
    res = here(cmd, capsys)
    assert f"at step {saved}" in res.stdout
    assert "changed settings" not in res.stderr, res.stderr  # the same command changes nothing
    assert_same_run(kind, tmp_path, uninterrupted, f"{kind} stopped by {sig.name}")
    assert json.loads((tmp_path / "metrics.json").read_text())["complete"] is True
    if sig == signal.SIGTERM:  # a finished run started again: exit 0, nothing changes
        before = sorted(os.listdir(tmp_path))
        again = here(cmd, capsys)
        assert "nothing to do" in again.stdout and sorted(os.listdir(tmp_path)) == before


def test_a_signal_during_the_final_save_is_not_swallowed(tmp_path, data, monkeypatch, capsys):
    """A stop signal that arrives after the last step (here: during the final save) finds the run complete; the run
    keeps its outputs and still stops with 75, so a caller running stages in one process (the evidence study) or a
    chained `pretrain && finetune` stops as asked. Found when the study went on after a SIGTERM between stages."""
    from fcmae.runtime.loop import Loop

    real_save = Loop.save

    def save_and_signal(self, path=None):
        if self.step == STEPS:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the run's StopRequest at the next bytecode
        return real_save(self, path)

    monkeypatch.setattr(Loop, "save", save_and_signal)
    out = here(command("pretrain", tmp_path, data), capsys, expect=EXIT_STOPPED)
    assert "received SIGTERM after the last step: the run is complete" in out.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["complete"] is True
    assert ckpt.latest_loadable(str(tmp_path))[1]["step"] == STEPS
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the process's again


def test_shards_give_the_folder_run(uninterrupted):
    """Tar shards of the same photos: the same samples in the same seeded order, so the same losses and weights."""
    assert uninterrupted["pretrain_shards"][0] == uninterrupted["pretrain"][0]
    for key, value in uninterrupted["pretrain"][1].items():
        assert torch.equal(uninterrupted["pretrain_shards"][1][key], value), key


def test_finished_run_metrics_say_complete(uninterrupted):
    for kind in COMMANDS:
        metrics = json.loads((uninterrupted[kind + "_dir"] / "metrics.json").read_text())
        assert metrics["complete"] is True and metrics["steps"] == STEPS, kind


def test_garbage_newest_checkpoints_are_set_aside(tmp_path, data, uninterrupted, capsys):
    """A truncated newest checkpoint and a garbage 'newer' one: both renamed *.unreadable, the run resumes from
    the newest good one, and neither takes a keep-k slot (keep 2 ends with the run's last two)."""
    cmd = command("pretrain", tmp_path, data, "--save-every-steps", "1", "--keep-checkpoints", "2")
    here(with_steps(cmd, 4))
    newest = tmp_path / "checkpoint-00000004.pth"
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    (tmp_path / "checkpoint-00000099.pth").write_bytes(b"\x00garbage" * 100)
    res = here(cmd, capsys)
    assert res.stderr.count("skipping unreadable checkpoint") == 2, res.stderr
    assert "checkpoint-00000004.pth" in res.stderr and "checkpoint-00000099.pth" in res.stderr
    assert "resumed from" in res.stdout and "checkpoint-00000003.pth at step 3" in res.stdout
    assert_same_run("pretrain", tmp_path, uninterrupted, "resumed past garbage")
    assert ckpt.list_checkpoints(str(tmp_path)) == [str(tmp_path / f"checkpoint-0000000{s}.pth") for s in (8, 7)]
    assert (tmp_path / "checkpoint-00000004.pth.unreadable").exists()
    assert (tmp_path / "checkpoint-00000099.pth.unreadable").exists()


# --------------------------------------------------------------------------------------------------
# Full disks


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that many bytes under tmp_path; skipped unless root and mount works."""
    mounted = []

    def mount(size: int):
        if os.geteuid() != 0:
            pytest.skip("a real full disk needs root (mount -t tmpfs)")
        if shutil.which("mount") is None:
            pytest.skip("no mount command")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            pytest.skip(f"mount -t tmpfs refused: {res.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder):
    """Write until the file system is full."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_real_full_disk_keeps_the_previous_checkpoint(tmpfs, data, uninterrupted):
    """A tmpfs with room for one checkpoint (and a half): the second cannot be written."""
    size = os.path.getsize(ckpt.list_checkpoints(str(uninterrupted["pretrain_dir"]))[0])
    disk = tmpfs(int(size * 1.6))
    out = disk / "run"
    res = launch(command("pretrain", out, data, "--save-every-steps", "1"), expect=EXIT_WRITE_FAILED)
    (line,) = error_lines(res.stderr)
    first = out / "checkpoint-00000001.pth"
    assert "could not write checkpoint" in line and "checkpoint-00000002.pth" in line, line
    assert f"the previous checkpoint {first} is intact" in line, line
    assert "rerun the same command to resume" in line
    assert ckpt.list_checkpoints(str(out)) == [str(first)]
    assert read_checkpoint(str(first))["step"] == 1
    assert no_temporaries(out)
    assert "error: could not write checkpoint" in (out / "log.txt").read_text()  # the log says why it stopped


def test_disk_full_at_start(tmpfs, data):
    disk = tmpfs(1 << 20)
    fill(disk)
    out = disk / "run"
    res = subprocess.run(command("pretrain", out, data), cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode in (EXIT_WRITE_FAILED, EXIT_USAGE), res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr
    (line,) = error_lines(res.stderr)
    assert "No space left on device" in line or "full disk" in line, line
    for name in ("config.yaml", "log.txt", "metrics.json"):
        assert not (out / name).exists() or (out / name).stat().st_size > 0, f"a 0-byte {name} was left"
    assert not os.path.exists(out) or no_temporaries(out)


def small_pretrain(out, data, *extra):
    return TINY_PRETRAIN + ["--input-size", "64", "--batch-size", "4", "--epochs", "3", "--warmup-epochs", "0",
                            "--num-workers", "0", "--data-path", data, "--output-dir", str(out), "--log-every",
                            "1"] + list(extra)


def test_full_disk_monkeypatched_keeps_the_previous_checkpoint(tmp_path, data, monkeypatch, capsys):
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
    assert code == EXIT_WRITE_FAILED
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert "could not write checkpoint" in line and "No space left on device" in line
    assert f"the previous checkpoint {tmp_path / 'checkpoint-00000001.pth'} is intact" in line
    assert "Traceback" not in err
    assert ckpt.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-00000001.pth")]
    assert read_checkpoint(str(tmp_path / "checkpoint-00000001.pth"))["step"] == 1
    assert no_temporaries(tmp_path)  # the partial file is gone


# --------------------------------------------------------------------------------------------------
# Non-finite numbers


def all_finite(path):
    return all(bool(torch.isfinite(v).all()) for v in read_checkpoint(path)["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("extra", [["--lr", "1e6"], ["--lr", "1e30"], ["--lr", "1e38"],
                                   ["--lr", "1e30", "--weight-decay", "1e10"]], ids=" ".join)
def test_huge_lr_stops_with_exit_3_and_never_saves_non_finite_weights(tmp_path, data, capsys, extra):
    code = run_cli(pretrain_main, small_pretrain(tmp_path, data, "--max-steps", "6", "--save-every-steps", "1", *extra))
    err = capsys.readouterr().err
    assert code == EXIT_NONFINITE, err
    (line,) = error_lines(err)
    assert "non-finite" in line and "Traceback" not in err
    for path in ckpt.list_checkpoints(str(tmp_path)):
        assert all_finite(path), path
    assert not (tmp_path / "metrics.json").exists() or not json.loads((tmp_path / "metrics.json").read_text())["complete"]


def test_weights_turning_non_finite_after_a_resume_keep_the_last_checkpoint(tmp_path, data, capsys):
    """A finite loss whose update makes the weights non-finite (lr 3e38: Adam's bias-corrected step overflows
    float32): nothing is saved, and the message names the checkpoint that is still good."""
    assert run_cli(pretrain_main, small_pretrain(tmp_path, data, "--max-steps", "2", "--save-every-steps", "1")) == 0
    capsys.readouterr()
    code = run_cli(pretrain_main, small_pretrain(tmp_path, data, "--max-steps", "4", "--save-every-steps", "1",
                                                 "--lr", "3e38"))
    err = capsys.readouterr().err
    assert code == EXIT_NONFINITE, err
    (line,) = error_lines(err)
    last = tmp_path / "checkpoint-00000002.pth"
    assert "weights became non-finite by step 3" in line and str(last) in line, line
    assert ckpt.list_checkpoints(str(tmp_path)) == [str(last), str(tmp_path / "checkpoint-00000001.pth")]
    assert all_finite(str(last))


def test_nan_weights_in_the_newest_checkpoint_are_refused(tmp_path, data, capsys):
    assert run_cli(pretrain_main, small_pretrain(tmp_path, data, "--max-steps", "2", "--save-every-steps", "1")) == 0
    newest = str(tmp_path / "checkpoint-00000002.pth")
    state = read_checkpoint(newest)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key][0] = float("nan")
    torch.save(state, newest)
    capsys.readouterr()
    code = run_cli(pretrain_main, small_pretrain(tmp_path, data, "--max-steps", "3", "--save-every-steps", "1"))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    (line,) = error_lines(err)
    good = str(tmp_path / "checkpoint-00000001.pth")
    assert f"{newest} holds non-finite weights" in line and f"--resume {good}" in line, line
    assert ckpt.list_checkpoints(str(tmp_path)) == [newest, good]  # nothing written, nothing removed


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
    assert code == EXIT_NONFINITE
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert "non-finite loss (nan) at step 3; stopping" in line and "the last checkpoint is left untouched" in line
    assert ckpt.list_checkpoints(str(tmp_path)) == [str(tmp_path / f"checkpoint-0000000{i}.pth") for i in (2, 1)]


def test_skip_nonfinite_skips_exactly_k_updates(tmp_path, data, monkeypatch, capsys):
    from models.fcmae import FCMAE

    nan_at_steps(monkeypatch, FCMAE, {2, 4})
    out = tmp_path / "two"
    code = run_cli(pretrain_main, small_pretrain(out, data, "--max-steps", "6", "--save-every-steps", "1",
                                                 "--keep-checkpoints", "6", "--skip-nonfinite", "2"))
    err = capsys.readouterr().err
    assert code == 0, err
    for step, k in [(2, 1), (4, 2)]:
        assert f"step {step}: non-finite loss (nan), update skipped ({k} of 2 allowed by --skip-nonfinite)" in err
    states = {s: read_checkpoint(str(out / f"checkpoint-0000000{s}.pth")) for s in range(1, 7)}
    for before, after, skipped in [(1, 2, True), (2, 3, False), (3, 4, True), (4, 5, False)]:
        same = all(torch.equal(states[before]["model"][k], v) for k, v in states[after]["model"].items())
        assert same == skipped, (before, after)
    assert [p[0] for p in states[6]["history"]["curve"]] == [1, 3, 5, 6]  # the skipped steps' NaN is not recorded
    assert all(s["step"] == 4 for s in states[6]["optimizer"]["state"].values())  # 6 steps, 2 without an update
    # one more than allowed: exit 3 at that step
    monkeypatch.undo()
    nan_at_steps(monkeypatch, FCMAE, {2, 4, 5})
    code = run_cli(pretrain_main, small_pretrain(tmp_path / "three", data, "--max-steps", "6", "--save-every-steps",
                                                 "1", "--skip-nonfinite", "2"))
    err = capsys.readouterr().err
    assert code == EXIT_NONFINITE, err
    assert "non-finite loss (nan) at step 5; stopping" in error_lines(err)[0]
    assert ckpt.latest_loadable(str(tmp_path / "three"))[1]["step"] == 4


# --------------------------------------------------------------------------------------------------
# Output folders and resumes


def test_resume_none_into_another_runs_folder(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert run_cli(pretrain_main, small_pretrain(out, data, "--max-steps", "4", "--save-every-steps", "1",
                                                 "--keep-checkpoints", "3", "--seed", "1")) == 0
    before = {p: os.path.getmtime(p) for p in ckpt.list_checkpoints(str(out))}
    capsys.readouterr()
    fresh = small_pretrain(out, data, "--max-steps", "2", "--save-every-steps", "1", "--keep-checkpoints", "3",
                           "--resume", "none")
    assert run_cli(pretrain_main, fresh) == EXIT_USAGE
    (line,) = error_lines(capsys.readouterr().err)
    assert "holds checkpoints of another run" in line and "--overwrite" in line and "--output-dir" in line, line
    assert {p: os.path.getmtime(p) for p in ckpt.list_checkpoints(str(out))} == before  # untouched
    assert run_cli(pretrain_main, fresh + ["--overwrite"]) == 0
    kept = ckpt.list_checkpoints(str(out))
    assert kept == [str(out / "checkpoint-00000002.pth"), str(out / "checkpoint-00000001.pth")], kept
    assert read_checkpoint(kept[0])["args"]["seed"] == 0  # the new run's
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["complete"]
    assert [s for s, _ in tensorboard_scalars(out, "train/loss")] == [1, 2]  # the old run's curve is gone


def test_resume_with_changed_settings(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert run_cli(pretrain_main, small_pretrain(out, data, "--max-steps", "1")) == 0
    capsys.readouterr()
    # a real process: the warning must reach the run's log.txt, not only stderr
    res = launch([sys.executable, "-m", "fcmae.pretrain"] + small_pretrain(
        out, data, "--max-steps", "2", "--batch-size", "2", "--mask-ratio", "0.75", "--weight-decay", "0.1"))
    (warning,) = [line for line in res.stderr.splitlines() if "resuming with changed settings" in line]
    assert "batch_size 4 -> 2" in warning and "mask_ratio 0.6 -> 0.75" in warning and "weight_decay" in warning
    assert "lr" not in warning.replace("weight_decay", ""), warning  # --lr was not given, now or then
    log_text = (out / "log.txt").read_text()
    assert "resuming with changed settings" in log_text and "batch_size 4 -> 2" in log_text
    # what the warning announces is what the resumed run does: the optimiser's groups take the new weight decay
    # (optimizer.load_state_dict would otherwise bring back the checkpoint's)
    groups = read_checkpoint(str(out / "checkpoint-00000002.pth"))["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1], groups
    for extra, message in [(["--in-chans", "1"], "was trained with --in-chans 3 but this run has 1"),
                           (["--model", "convnextv2_femto"],
                            f"was trained with --model {TINY} but this run has convnextv2_femto"),
                           (["--decoder-dim", "256"], "was trained with --decoder-dim 64 but this run has 256")]:
        files = sorted(os.listdir(out))
        assert run_cli(pretrain_main, small_pretrain(out, data, "--max-steps", "3", *extra)) == EXIT_USAGE
        (line,) = error_lines(capsys.readouterr().err)
        assert message in line, line
        assert sorted(os.listdir(out)) == files


def test_undecodable_file_name_of_a_bad_image(tmp_path, data):
    images = tmp_path / "images"
    shutil.copytree(data, images)
    with open(os.path.join(os.fsencode(images), b"broken-\xff\xfe.png"), "wb") as f:
        f.write(b"\x89PNG not really")
    out = tmp_path / "out"
    cmd = command("pretrain", out, str(images), "--max-bad-fraction", "0.5")
    res = subprocess.run(with_steps(cmd, 4), cwd=ROOT, env=env(), capture_output=True, timeout=600)
    stderr = res.stderr.decode("utf-8")  # valid UTF-8: the name is escaped
    assert res.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "broken-" in stderr, stderr
    line = next(line for line in stderr.splitlines() if "broken-" in line)
    assert "\\udcff\\udcfe" in line or "\\xff\\xfe" in line, line
    assert "broken-" in (out / "log.txt").read_text(encoding="utf-8")
