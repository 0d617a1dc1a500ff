"""Bad invocations of the three commands: each is one `error: ...` line, exit code 2, no traceback, and nothing
written (the output dir is not created). One table; a few rows also run as real processes."""
import os
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from fcmae.cli import run_cli
from fcmae.pretrain import main as pretrain_main
from finetune.__main__ import run as finetune_run
from tools.convert import main as convert_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {
    "pretrain": lambda argv: run_cli(pretrain_main, argv),
    "finetune": lambda argv: run_cli(finetune_run, argv),
    "convert": convert_main,
}
MODULES = {"pretrain": "fcmae.pretrain", "finetune": "finetune", "convert": "tools.convert"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real inputs to get wrong: a pretraining checkpoint of atto, garbage, folders, configs."""
    root = tmp_path_factory.mktemp("inputs")
    pretrain_main(["--input-size", "64", "--batch-size", "4", "--max-steps", "1", "--warmup-epochs", "0",
                   "--num-workers", "0", "--output-dir", str(root / "pre")])
    (root / "garbage.pth").write_bytes(b"not a checkpoint at all")
    (root / "a_file").write_text("")
    (root / "empty").mkdir()
    for split, classes in [("train", ["cat", "dog"]), ("val", ["cat", "yak"])]:
        for c in classes:
            (root / "pets" / split / c).mkdir(parents=True)
            Image.new("RGB", (40, 40)).save(root / "pets" / split / c / "0.png")
    (root / "six").mkdir()
    for i in range(6):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(root / "six" / f"{i}.png")
    (root / "unknown_key.yaml").write_text(yaml.safe_dump({"model": "convnextv2_atto", "maks_ratio": 0.6}))
    return {"ckpt": str(root / "pre" / "checkpoint-00000001.pth"), "garbage": str(root / "garbage.pth"),
            "file": str(root / "a_file"), "empty": str(root / "empty"), "pets": str(root / "pets"),
            "six": str(root / "six"), "yaml": str(root / "unknown_key.yaml"), "root": str(root)}


# (command, arguments, expected part of the message); {ckpt}, {garbage}, ... name the fixture's files, {out} the
# output dir that must not appear.
CASES = [
    ("pretrain", ["--model", "convnextv2_giant"],
     "unknown model 'convnextv2_giant'; valid models: convnextv2_atto, convnextv2_femto, convnextv2_pico"),
    ("pretrain", ["--mask-ratio", "1.5"], "mask ratio must be in (0, 1), got 1.5"),
    ("pretrain", ["--mask-ratio", "0"], "mask ratio must be in (0, 1), got 0.0"),
    ("pretrain", ["--input-size", "100"], "input size 100x100 is not divisible by the patch size 32"),
    ("pretrain", ["--input-size", "224", "200"], "input size 224x200 is not divisible by the patch size 32"),
    ("pretrain", ["--input-size", "64", "64", "64"], "--input-size takes one (square) or two (height width)"),
    ("pretrain", ["--batch_size", "0"], "--batch-size must be >= 1, got 0"),
    ("pretrain", ["--accum-iter", "0"], "--accum-iter must be >= 1, got 0"),
    ("pretrain", ["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
    ("pretrain", ["--grn-stats", "global"], "argument --grn-stats/--grn_stats: invalid choice: 'global'"),
    ("pretrain", ["--device", "cuda"], "CUDA is not available; use --device cpu"),
    ("pretrain", ["--skip-nonfinite", "-1"], "--skip-nonfinite must be >= 0"),
    ("pretrain", ["--resume", "{root}/missing.pth"], "--resume checkpoint not found"),
    ("pretrain", ["--resume", "{garbage}"], "not a PyTorch checkpoint, or corrupt"),
    ("pretrain", ["--resume", "{ckpt}", "--model", "convnextv2_femto"],
     "holds convnextv2_atto, but --model is convnextv2_femto"),
    ("pretrain", ["--resume", "{ckpt}", "--decoder-dim", "256"], "was trained with --decoder-dim 512"),
    ("pretrain", ["--data-path", "{root}/nowhere"], "data folder not found"),
    ("pretrain", ["--data-path", "{empty}"], "no images found"),
    ("pretrain", ["--output-dir", "{file}/out"], "is a file, not a folder"),
    ("pretrain", ["--output-dir", "/proc/fcmae_out"], "is not writable"),
    ("pretrain", ["-c", "{root}/missing.yaml"], "cannot read config"),
    ("pretrain", ["-c", "{yaml}"], "has unknown keys: maks_ratio"),
    ("pretrain", ["--data-path", "{six}", "--batch-size", "4", "env:WORLD_SIZE=4"],
     "6 images give no full step of 4 (batch) x 1 (accumulation) x 4 processes"),
    ("finetune", ["--model", "convnextv2_gigantic"], "unknown model 'convnextv2_gigantic'"),
    ("finetune", ["--finetune", "{root}/missing.pth"], "--finetune checkpoint not found"),
    ("finetune", ["--finetune", "{garbage}"], "not a PyTorch checkpoint"),
    ("finetune", ["--model", "convnextv2_femto", "--finetune", "{ckpt}"],
     "holds convnextv2_atto (depths (2, 2, 6, 2), dims (40, 80, 160, 320)), not convnextv2_femto"),
    ("finetune", ["--resume", "{ckpt}"], "is not a fine-tuning checkpoint (format 'fcmae-pretrain')"),
    ("finetune", ["--eval", "--finetune", "{ckpt}"], "has no classifier head"),
    ("finetune", ["--eval", "--resume", "none"], "--eval needs a checkpoint"),
    ("finetune", ["--eval", "--output-dir", "{empty}"], "no checkpoint in"),
    ("finetune", ["--output-dir", "{file}/out"], "is a file, not a folder"),
    ("finetune", ["--data-path", "{root}/nowhere"], "data folder not found"),
    ("finetune", ["--data-path", "{empty}"], "data folder not found: {empty}/train"),
    ("finetune", ["--data-path", "{pets}"], "{pets}/val has classes not in train/: yak"),
    ("finetune", ["--input-size", "16"], "--input-size must be at least 32"),
    ("finetune", ["--mixup", "0.8", "--batch-size", "7"], "--batch-size must be even"),
    ("finetune", ["--train-subset", "5", "--label-fraction", "0.1"], "not both"),
    ("finetune", ["--label-fraction", "1.5"], "--label-fraction must be in (0, 1]"),
    ("finetune", ["--nb-classes", "3"], "the data has 10 classes but the classifier has 3 outputs"),
    ("convert", ["{root}/missing.pth", "{out}/x.safetensors", "--to", "timm"], "no such file or directory"),
    ("convert", ["{garbage}", "{out}/x.safetensors", "--to", "timm"], "not a PyTorch checkpoint"),
    ("convert", ["{ckpt}", "{out}/x.safetensors", "--to", "timm", "--model", "convnextv2_femto"],
     "holds convnextv2_atto (depths (2, 2, 6, 2), dims (40, 80, 160, 320)), not convnextv2_femto"),
    ("convert", ["{ckpt}", "{out}/x.safetensors", "--to", "onnx"], "argument --to: invalid choice: 'onnx'"),
    ("convert", ["{ckpt}", "{file}/x.safetensors", "--to", "timm"], "cannot write"),
]


def fill(args, files, out):
    return [a.format(out=out, **files) for a in args]


@pytest.mark.parametrize("command,args,message", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_invocation(tmp_path, files, monkeypatch, capsys, command, args, message):
    out = tmp_path / "out"
    for a in args:
        if a.startswith("env:"):  # env:WORLD_SIZE=4 as torchrun sets it: checked before joining a process group
            monkeypatch.setenv(*a[4:].split("=", 1))
    argv = fill([a for a in args if not a.startswith("env:")], files, out)
    if command != "convert" and "--output-dir" not in argv:
        argv += ["--output-dir", str(out)]
    try:
        code = COMMANDS[command](argv)
    except SystemExit as e:  # argparse's own exit in tools.convert
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert lines[-1].startswith("error: ") or "error: argument" in lines[-1], err
    assert message.format(**files) in lines[-1], err
    assert not out.exists(), "something was written"


@pytest.mark.parametrize("command,args,message", [next(c for c in CASES if c[0] == cmd) for cmd in COMMANDS])
def test_bad_invocation_as_a_process(tmp_path, files, command, args, message):
    out = tmp_path / "out"
    argv = fill(args, files, out) + (["--output-dir", str(out)] if command != "convert" else [])
    res = subprocess.run([sys.executable, "-m", MODULES[command]] + argv, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert message.format(**files) in res.stderr
    assert not out.exists()

