"""torchrun (gloo, 2 processes) gives the losses of one process with the same global batch, for pretraining and
fine-tuning; a torchrun run killed with SIGKILL resumes under torchrun and continues exactly; SLURM node lists."""
import csv
import os
import signal
import subprocess
import sys

import pytest

from fcmae.pretrain.cli import main as pretrain_main
from fcmae.runtime import checkpoints as ckpt
from fcmae.runtime.cli import run_cli
from fcmae.runtime.distributed import first_slurm_host
from finetune.cli import run as finetune_run
from tests.conftest import TINY, TINY_PRETRAIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = ["-m", "fcmae.pretrain", *TINY_PRETRAIN, "--input-size", "64", "--epochs", "1", "--warmup-epochs", "0",
            "--num-workers", "0", "--blr", "1e-3", "--log-every", "1", "--device", "cpu"]
# no drop-path and no mixup: their draws are per process, so only then can 2 x 4 images equal 1 x 8;
# RandAugment and random erasing are drawn per image and stay on
FINETUNE = ["-m", "finetune", "--model", TINY, "--input-size", "32", "--train-subset", "64",
            "--val-subset", "20", "--epochs", "1", "--num-workers", "0", "--drop-path", "0", "--lr", "1e-3",
            "--log-every", "1", "--device", "cpu"]


def command(args, procs):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] + args


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(args, procs, out, batch, steps):
    """(per-step losses, the finished process) of a torchrun run of `procs` processes; one process (the reference)
    runs in this one (a child costs seconds of imports), with no process returned."""
    args = args + ["--batch-size", str(batch), "--max-steps", str(steps), "--output-dir", str(out)]
    if procs == 1:
        assert run_cli({"fcmae.pretrain": pretrain_main, "finetune": finetune_run}[args[1]], args[2:]) == 0
        res = None
    else:
        res = subprocess.run(command(args, procs), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = ckpt.latest_loadable(str(out))[1]
    curve = state["history"]["curve"]
    assert [p[0] for p in curve] == list(range(1, steps + 1)) and all(p[2] == 1 for p in curve)
    return [p[1] for p in curve], res


def descendants(pid: int):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def close(a, b):
    return len(a) == len(b) and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b))


def test_pretrain_two_processes_match_one_and_resume(tmp_path):
    single, _ = run(PRETRAIN, 1, tmp_path / "one", 8, 3)
    double, _ = run(PRETRAIN, 2, tmp_path / "two", 4, 2)
    resumed, res = run(PRETRAIN, 2, tmp_path / "two", 4, 3)  # continues the 2-step run from its checkpoint
    assert "resumed from" in res.stdout and "effective batch 8 = 4 x 1 accumulation x 2 processes" in res.stdout
    assert resumed[:2] == double
    assert close(single, resumed), (single, resumed)


def test_pretrain_from_shards_two_processes_match_one_from_the_folder(tmp_path):
    """DDP sharding over tar shards: 2 processes x 4 images read from shards give the losses of 1 process x 8 read
    from the folder the shards were made of."""
    import numpy as np
    from PIL import Image

    from fcmae.tools.make_shards import make_shards

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    make_shards(str(folder), str(tmp_path / "shards"), shard_size=40_000, progress=lambda line: None)
    single, _ = run(PRETRAIN + ["--data-path", str(folder), "--knn-every-epochs", "0"], 1, tmp_path / "one", 8, 2)
    double, _ = run(PRETRAIN + ["--data-path", str(tmp_path / "shards"), "--knn-every-epochs", "0"], 2,
                    tmp_path / "two", 4, 2)
    assert close(single, double), (single, double)


def test_finetune_two_processes_match_one(tmp_path):
    single, _ = run(FINETUNE, 1, tmp_path / "one", 8, 3)
    double, _ = run(FINETUNE, 2, tmp_path / "two", 4, 3)
    assert close(single, double), (single, double)
    # evaluation aggregated over both processes (10 of the 20 images each) equals the one-process evaluation
    rows = [list(csv.DictReader(open(tmp_path / d / "summary.csv")))[-1] for d in ("one", "two")]
    assert rows[0]["acc1"] == rows[1]["acc1"]
    assert abs(float(rows[0]["val_loss"]) - float(rows[1]["val_loss"])) <= 1e-4 * float(rows[0]["val_loss"])


def test_torchrun_killed_with_sigkill_resumes_exactly(tmp_path):
    full, _ = run(PRETRAIN, 2, tmp_path / "full", 4, 5)
    cmd = command(PRETRAIN + ["--batch-size", "4", "--max-steps", "5", "--save-every-steps", "1",
                              "--output-dir", str(tmp_path / "cut")], 2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if " step 3/5 " in line:
            # torchrun and both workers (torchrun starts them in sessions of their own), as a node failure would
            for pid in [proc.pid] + descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    saved = ckpt.latest_loadable(str(tmp_path / "cut"))[1]["step"]
    assert 1 <= saved < 5
    resumed, res = run(PRETRAIN + ["--save-every-steps", "1"], 2, tmp_path / "cut", 4, 5)
    assert f"at step {saved}" in res.stdout
    assert resumed == full


@pytest.mark.parametrize("nodelist,host", [("gpu[07-09,12],cpu1", "gpu07"), ("node1,node2", "node1"),
                                           ("a-b[3]", "a-b3"), ("single", "single")])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host
