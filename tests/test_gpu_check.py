"""tools/gpu_check.sh as the lent GPU machine runs it, but with --dry-run (CPU, toy sizes): from a copy of the
checkout with no virtual environment, `python3` on PATH being a Python that has the dependencies, and apt-get, apt,
pip, pip3 and sudo that fail (and leave a mark) if called. Every step passes and writes its JSON; the output folder
holds few files (the device tool brings back at most 8). Without a GPU and without --dry-run the check stops at its
first step with one line; the summary works on a partial output folder."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tools.gpu_summary import summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["probe", "tests", "steps", "compiled", "jpegs", "loader", "pretrain"]
FORBIDDEN = ("apt-get", "apt", "pip", "pip3", "sudo")


def clean_checkout(dest):
    """The checkout's files (tracked, and new ones not ignored) without .venv or build outputs."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = os.path.join(ROOT, name)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, name))
    assert not os.path.exists(os.path.join(dest, ".venv"))


def machine_path(bin_dir, marker):
    """A bin folder first on PATH: python3 runs this interpreter; the package managers fail and leave a mark."""
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for name in FORBIDDEN:
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{marker}"\nexit 1\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def env_for(path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCMAE_") and k not in ("PYTHONPATH", "PYTHON")}
    return dict(env, PATH=path, OMP_NUM_THREADS="1")


def test_gpu_check_dry_run_from_a_clean_checkout(tmp_path):
    checkout, out, marker = tmp_path / "checkout", tmp_path / "out", tmp_path / "called"
    clean_checkout(checkout)
    res = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", str(out)], cwd=checkout,
                         env=env_for(machine_path(tmp_path / "bin", marker)), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    assert not marker.exists(), marker.read_text()
    status = json.loads((out / "status.json").read_text())
    assert [(s["name"], s["exit_code"]) for s in status["steps"]] == [(name, 0) for name in STEPS]
    assert status["device"]["dry_run"] and status["device"]["executable"] == sys.executable
    tests = status["steps"][1]["tests"]
    assert tests["failures"] == tests["errors"] == 0 and tests["passed"] >= 6, tests
    assert "mean_abs_diff_device_vs_cpu_decoder" in " ".join(tests["properties"])
    steps, compiled = (json.loads((out / n).read_text()) for n in ("steps.json", "compiled.json"))
    assert steps["complete"] and {"sparse/bf16", "dense/none", "timm/bf16"} <= set(steps["candidates"])
    assert compiled["complete"] and compiled["candidates"] == ["sparse/bf16", "sparse/none"]
    loader = json.loads((out / "loader.json").read_text())
    assert loader["complete"] and all(r["ours_device"]["ratio"] > 0 for r in loader["runs"])
    pretrain = json.loads((out / "pretrain.json").read_text())
    assert pretrain["passed"] and pretrain["stopped"]["saved_step"] == pretrain["resumed"]["resumed_from"] >= 3
    text = (out / "summary.md").read_text()
    for part in ("CPU (dry run)", "| sparse/bf16 |", "## Input pipeline", "| ours_device |", "## Stop and resume",
                 "- passed"):
        assert part in text, part
    files = sorted(os.listdir(out))
    assert files == ["compiled.json", "gpu_check.log", "loader.json", "pretrain.json", "status.json", "steps.json",
                     "summary.md"], files


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_check_stops_at_the_probe(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(["bash", "tools/gpu_check.sh", str(out)], cwd=ROOT,
                         env=env_for(machine_path(tmp_path / "bin", tmp_path / "called")), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2
    assert "sees no GPU" in res.stderr and "--dry-run" in res.stderr
    status = json.loads((out / "status.json").read_text())
    assert [s["name"] for s in status["steps"]] == ["probe"] and not status["device"]["gpu_available"]


def test_summary_of_a_check_cut_short(tmp_path):
    (tmp_path / "status.json").write_text(json.dumps({"steps": [
        {"name": "probe", "exit_code": 0, "seconds": 4, "limit_s": 15, "timed_out": False},
        {"name": "tests", "exit_code": 124, "seconds": 60, "limit_s": 60, "timed_out": True, "tests": None}]}))
    (tmp_path / "loader.json").write_text(json.dumps({
        "batch_size": 64, "input_size": [224, 224], "device": "cuda", "cpus": 16, "complete": False, "runs": [
            {"workers": 8, "baseline": {"median": 100.0, "min": 90.0},
             "ours_device": {"median": 350.0, "min": 300.0, "ratio": 3.5, "paired_ratio": 3.4}}]}))
    text = summary(str(tmp_path))
    assert "Device: not probed" in text and "| tests | 124 (time limit) | 60 | 60 |" in text
    assert "## Input pipeline (cut short)" in text and "| 8 | ours_device | 350.0 | 300.0 | 3.50 | 3.40 |" in text


@pytest.mark.parametrize("argv,message", [(["--only", "tests,bogus", "out"], "no step bogus"),
                                          (["--frob", "out"], "unknown option --frob")])
def test_bad_options_are_one_line(tmp_path, argv, message):
    res = subprocess.run(["bash", "tools/gpu_check.sh"] + argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and message in res.stderr
    assert res.stderr.count("\n") == 1 and not os.path.exists(os.path.join(ROOT, "out"))
