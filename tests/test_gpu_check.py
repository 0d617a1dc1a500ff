"""tools/gpu_check.sh --dry-run: the one-shot GPU check's every step (CUDA-marked tests, step benchmark, loader
benchmark, summary) on the CPU at toy sizes, so the script does not rot between sessions that get a GPU."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, FCMAE_SKIP_SETUP="1", FCMAE_VENV=os.path.dirname(os.path.dirname(
        __import__("sys").executable)), OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    status = dict(line.split()[:2] for line in (tmp_path / "status.txt").read_text().splitlines())
    assert status == {"tests": "0", "bench_steps": "0", "bench_loader": "0"}, status
    summary = (tmp_path / "summary.md").read_text()
    assert "cpu (dry run)" in summary and "| sparse/bf16 |" in summary and "sparse_over_dense_time" in summary
    assert "## Input pipeline" in summary
    for name in ("bench_steps.json", "bench_loader.json"):
        assert (tmp_path / name).stat().st_size > 0
