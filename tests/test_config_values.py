"""Hostile `-c FILE.yaml` configs and option values (issue 23, item 1): each one ends as exactly one `error:` line
naming the file or the option, exit code 2, no traceback, nothing written, quickly and in little memory.

Each row: (cli, config file bytes or None, extra arguments, expected parts of the error line). The config is
written to {cfg}; the rows run in-process after the CLI's harmless base arguments (tests/test_bad_invocations.py),
so a wrongly accepted config runs one tiny step and then fails the "nothing written" check.
"""
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from test_bad_invocations import BASE, CLIS, ROOT, _code, check_clean
from tests.conftest import write_small_folders

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINING = ("pretrain", "finetune")
# a billion laughs, inline in one value: 9 levels of 9 references, the last one 9**9 (387 million) leaves once
# expanded; PyYAML keeps the references
BOMB = b"[&a [x, x, x, x, x, x, x, x, x], " + b", ".join(
    b"&%s [%s]" % (bytes([c]), b", ".join([b"*" + bytes([c - 1])] * 9)) for c in range(ord("b"), ord("j") + 1)) + b"]"
DEEP = b"lr: " + b"[" * 5000 + b"]" * 5000 + b"\n"

ROWS = []


def row(cli, config, args, *expect):
    ROWS.append((cli, config, list(args), list(expect)))


for cli in TRAINING:
    # boolean flags from YAML: a quoted string, a list, a number, null (argparse never saw them)
    row(cli, b"overwrite: 'false'\n", [], "--overwrite", "true or false", "'false'")
    row(cli, b"grad_checkpointing: [false]\n", [], "--grad-checkpointing", "true or false")
    row(cli, b"channels-last: 'no'\n", [], "--channels-last", "true or false")
    row(cli, b"compile: 1\n", [], "--compile", "true or false")
    row(cli, b"overwrite: null\n", [], "--overwrite", "true or false")
    # the file itself: empty, a folder, binary, not UTF-8, nested config, non-string and duplicate keys
    row(cli, b"", [], "{cfg}", "empty")
    row(cli, b"# only a comment\n", [], "{cfg}", "empty")
    row(cli, None, ["-c", "{dir}"], "{dir}", "folder")
    row(cli, b"\x00\x01\x02\x03PK\x03\x04binary\xff\xfe", [], "{cfg}", "binary")
    row(cli, "lr: 0.001  # d\xe9faut\n".encode("latin-1"), [], "{cfg}", "UTF-8")
    row(cli, b"config: other.yaml\n", [], "{cfg}", "config")
    row(cli, b"1: 2\n", [], "{cfg}", "1")
    row(cli, b"true: 2\n", [], "{cfg}", "'true'")
    row(cli, b"lr: 0.1\nlr: 0.2\n", [], "{cfg}", "lr", "twice")
    row(cli, b"batch-size: 2\nbatch_size: 4\n", [], "{cfg}", "batch_size", "twice")
    row(cli, b"help: true\n", [], "{cfg}", "unknown keys: help")
    row(cli, DEEP, [], "{cfg}", "nest")
    # values argparse would have converted or refused: nested maps, empty and nested lists, null, non-finite,
    # strings that are not numbers, numbers too large for what uses them
    row(cli, b"lr: {a: 1}\n", [], "--lr", "number")
    row(cli, b"input-size: []\n", [], "--input-size", "list")
    row(cli, b"input-size: [[64]]\n", [], "--input-size", "integer")
    row(cli, b"input-size: {h: 64}\n", [], "--input-size", "list")
    row(cli, b"batch-size: null\n", [], "--batch-size", "integer")
    row(cli, b"amp: null\n", [], "--amp", "none, bf16, fp16")
    row(cli, b"amp: [bf16]\n", [], "--amp", "none, bf16, fp16")
    row(cli, b"lr: .inf\n", [], "--lr", "> 0")
    row(cli, b"lr: 'nan'\n", [], "--lr", "> 0")
    row(cli, b"blr: .NaN\n", [], "--blr", "> 0")
    row(cli, b"batch-size: 'two'\n", [], "--batch-size", "integer", "'two'")
    row(cli, b"epochs: 1.0e+400\n", [], "--epochs", "integer")
    row(cli, b"seed: 100000000000000000000000000000\n", [], "--seed", "64 bits")
    row(cli, b"max-bad-fraction: 1.0e-400\nmean: [1.0e+400, 0, 0]\n", [], "--mean", "finite")
    # an anchor bomb as a value, a very long string: refused fast, the message short
    row(cli, b"lr: " + BOMB + b"\n", [], "--lr", "number")
    row(cli, b"mean: " + BOMB + b"\n", [], "--mean")
    row(cli, b"input-size: " + BOMB + b"\n", [], "--input-size")
    row(cli, b"model: '" + b"x" * 200_000 + b"'\n", [], "--model")
    row(cli, b"output-dir: [" + b"1, " * 10_000 + b"1]\n", [], "--output-dir", "string")
    row(cli, b"# " + b"x" * 300_000 + b"\n", [], "{cfg}", "bytes")
    row(cli, None, ["--seed", "18446744073709551616"], "--seed", "64 bits")

# fine-tuning's flags that change what runs when a string counts as true
row("finetune", b"linear-probe: 'false'\n", [], "--linear-probe", "true or false")
row("finetune", b"keep_head: 'no'\n", [], "--keep-head", "true or false")
row("finetune", b"eval: 'false'\n", [], "--eval", "true or false")
row("finetune", b"model-ema: 'false'\n", [], "--model-ema", "true or false")
# a tool's flag from YAML
row("knn_eval", b"ema: 'false'\n", [], "--ema", "true or false")
row("data_stats", b"max-images: 'lots'\n", [], "--max-images", "integer")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The base arguments' inputs (no checkpoint: these rows never get that far)."""
    root = tmp_path_factory.mktemp("inputs")
    write_small_folders(root)
    (root / "pre.pth").write_bytes(b"")  # knn_eval's positional; never read by these rows
    return {"six": str(root / "six"), "pets": str(root / "pets"), "ckpt": str(root / "pre.pth"), "root": str(root)}


def config_invocation(cli, config, args, folders, tmp_path):
    out, folder = tmp_path / "out", tmp_path / "existing"
    folder.mkdir()
    cfg = tmp_path / "config.yaml"
    names = dict(folders, out=str(out), dir=str(folder), cfg=str(cfg))
    base = list(BASE[cli])
    for key in re.findall(rb"^([\w-]+):", config or b"", re.MULTILINE):  # the config's value must not be overridden
        flag = "--" + key.decode().replace("_", "-")
        if flag in base:
            del base[base.index(flag):base.index(flag) + 2]
    argv = [a.format(**names) for a in base + args]
    if config is not None:
        cfg.write_bytes(config)
        argv += ["-c", str(cfg)]
    return argv, names, out, folder


@pytest.mark.parametrize("cli,config,args,expect", ROWS,
                         ids=[f"{r[0]}-{i}-{(r[1] or b' '.join(a.encode() for a in r[2]))[:30]!r}"
                              for i, r in enumerate(ROWS)])
def test_hostile_config(tmp_path, folders, capsys, cli, config, args, expect):
    argv, names, out, folder = config_invocation(cli, config, args, folders, tmp_path)
    capsys.readouterr()
    t0 = time.perf_counter()
    code = _code(CLIS[cli][0], argv)
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    check_clean(code, err, expect, names, out, folder)
    assert len(err) < 600, f"{len(err)} characters: {err[:300]}..."
    assert seconds < 10, f"{seconds:.1f} s to refuse"


def test_config_that_names_a_fifo_is_refused_without_waiting(tmp_path, folders, capsys):
    """Opening a FIFO for reading waits for a writer forever: only regular files are read."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    argv, names, out, folder = config_invocation("pretrain", None, ["-c", str(fifo)], folders, tmp_path)
    check_clean(_code(CLIS["pretrain"][0], argv), capsys.readouterr().err, [str(fifo), "not a regular file"],
                names, out, folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_config(tmp_path, folders, capsys):
    argv, names, out, folder = config_invocation("pretrain", b"lr: 0.1\n", [], folders, tmp_path)
    os.chmod(tmp_path / "config.yaml", 0)
    check_clean(_code(CLIS["pretrain"][0], argv), capsys.readouterr().err, ["cannot read config"], names, out,
                folder)


def test_anchor_bomb_is_refused_fast_in_little_memory(tmp_path, folders):
    """As a process: the refusal (imports excluded) takes well under 10 s on a loaded machine and adds little to
    the peak memory of the imports (the bomb expanded would be billions of objects)."""
    cfg = tmp_path / "bomb.yaml"
    cfg.write_bytes(b"mean: " + BOMB + b"\n")
    code = ("import resource, sys, time; from fcmae.runtime.cli import run_cli; from fcmae.pretrain.cli import main\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; t0 = time.perf_counter()\n"
            "rc = run_cli(main, sys.argv[1:])\n"
            "print(time.perf_counter() - t0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
            "sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, "-c", str(cfg), "--output-dir", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and len(res.stderr) < 600, res.stderr
    seconds, growth_mib = map(float, res.stdout.split())
    assert seconds < 10 and growth_mib < 200, (seconds, growth_mib)
    assert not (tmp_path / "out").exists()


def test_yaml_strings_that_are_numbers_read_as_on_the_command_line(tmp_path):
    """PyYAML reads `1e-3` (no dot) as a string: a number option takes it as the command line would."""
    from fcmae.pretrain.options import build_parser
    from fcmae.runtime.options import parse_with_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nepochs: '5'\nmin_lr: 0\n")
    args = parse_with_config(build_parser(), ["-c", str(cfg)])
    assert (args.lr, args.epochs, args.min_lr) == (1e-3, 5, 0.0)
    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"  # the reason


def test_real_booleans_from_yaml_still_work(tmp_path):
    from finetune.options import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("overwrite: true\ngrad-checkpointing: false\nmodel-ema: false\n")
    args = parse_args(["-c", str(cfg)])
    assert (args.overwrite, args.grad_checkpointing, args.model_ema) == (True, False, False)
