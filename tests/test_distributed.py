"""torchrun (gloo, 2 processes) gives the losses of one process with the same global batch, and resumes."""
import os
import subprocess
import sys

from fcmae import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--input-size", "64", "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "0", "--blr", "1e-3",
          "--log-every", "1", "--device", "cpu"]


def pretrain(out, procs, batch, steps):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if procs == 1:
        cmd = [sys.executable, "-m", "fcmae.pretrain"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "fcmae.pretrain"]
    res = subprocess.run(cmd + COMMON + ["--batch-size", str(batch), "--max-steps", str(steps), "--output-dir",
                                         str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return ckpt.latest_loadable(str(out))[1]["history"]


def test_two_process_gloo_matches_one_process_and_resumes(tmp_path):
    single = pretrain(tmp_path / "one", 1, 8, 3)
    double = pretrain(tmp_path / "two", 2, 4, 2)
    resumed = pretrain(tmp_path / "two", 2, 4, 3)  # continues the 2-step run from its checkpoint
    assert len(single) == 3 and len(resumed) == 3
    assert resumed[:2] == double
    for a, b in zip(single, resumed):
        assert abs(a - b) <= 1e-5 * abs(a), (single, resumed)
