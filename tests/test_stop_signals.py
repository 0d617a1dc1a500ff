"""A stop signal sent to a whole process group (torchrun passing SIGTERM on to its workers, SLURM's scancel, Ctrl-C in
a terminal) while DataLoader worker processes run: the training process still finishes its step, saves and exits
75. Found by tools/gpu_check.sh's stop-and-resume step: the workers died of the signal and the training process
failed with "DataLoader worker ... is killed by signal" before saving."""
import os
import signal
import subprocess
import sys

import numpy as np
from PIL import Image

from fcmae.runtime import checkpoints as ckpt
from fcmae.runtime.errors import EXIT_STOPPED
from tests.conftest import TINY_PRETRAIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits_75(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for k in range(16):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(data / f"{k:02d}.png")
    cmd = [sys.executable, "-m", "fcmae.pretrain", *TINY_PRETRAIN, "--input-size", "64", "--batch-size", "2",
           "--epochs", "50", "--warmup-epochs", "0", "--num-workers", "2", "--log-every", "1", "--knn-every-epochs",
           "0", "--device", "cpu", "--data-path", str(data), "--output-dir", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if " step 3/" in line:
            os.killpg(proc.pid, signal.SIGTERM)  # the training process and its loader workers, as torchrun does
            break
    output += proc.stdout.readlines()
    assert proc.wait(timeout=120) == EXIT_STOPPED, "".join(output[-30:])
    saved = ckpt.latest_loadable(str(tmp_path / "out"))[1]["step"]
    assert saved >= 3 and f"received SIGTERM: checkpoint saved at step {saved}" in "".join(output)
