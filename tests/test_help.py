"""--help that helps (issue 22, item 4), --version, timm's spellings as aliases, and recipes by name (item 6).

The help is read from the parsers in-process (fast); that --help imports neither torch nor timm is checked in a
fresh process, as users run it.
"""
import os
import re
import subprocess
import sys
import time

import pytest

from fcmae.pretrain.options import build_parser as pretrain_parser
from fcmae.runtime.errors import UsageError
from fcmae.runtime.options import find_config, package_version, parse_with_config, recipe_dirs
from finetune.options import build_parser as finetune_parser
from finetune.options import parse_args as finetune_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {"fcmae.pretrain": pretrain_parser, "finetune": finetune_parser}
UNDERSCORE_OPTION = re.compile(r"--[a-z0-9]+(-[a-z0-9]+)*_[a-z0-9_]+")


@pytest.mark.parametrize("module", list(STAGES))
def test_help_imports_neither_torch_nor_timm(module):
    """`python -m STAGE --help` as users run it: the help is printed, torch and timm never imported."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['{module}', '--help']\n"
            "try:\n"
            f"    runpy.run_module('{module}', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'timm', 'torchvision', 'numpy') if m in sys.modules))\n")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout and "examples:" in res.stdout
    assert res.stdout.strip().endswith("IMPORTED []"), res.stdout[-300:]
    assert seconds < 10, f"{seconds:.1f} s"  # about 0.3 s on an idle machine; torch alone takes 4-12 s here


@pytest.mark.parametrize("module", list(STAGES))
def test_version(module):
    res = subprocess.run([sys.executable, "-m", module, "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith(" " + package_version()), res
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", package_version())


@pytest.fixture(autouse=True)
def terminal_width(monkeypatch):
    """argparse wraps to the terminal's width (COLUMNS, else 80 without a terminal, as under pytest-xdist): the
    checks below are for a usual 100-column terminal."""
    monkeypatch.setenv("COLUMNS", "100")


@pytest.mark.parametrize("stage", list(STAGES))
def test_help_content(stage):
    text = STAGES[stage]().format_help()
    lines = text.splitlines()
    assert lines[0] == f"usage: python -m {stage} [options]"  # one line, not 33
    for group in ("model:", "data:", "optimisation:", "run:", "monitoring:"):
        assert group in lines, group
    assert "examples:" in lines and text.count(f"-m {stage}") >= 3
    assert not UNDERSCORE_OPTION.search(text), UNDERSCORE_OPTION.search(text).group()
    assert "--version" in text and "-b N, --batch-size N" in text
    assert "--amp {none,bf16,fp16}" in text  # choices
    assert "(default: 64)" in text  # defaults, also for options without a help text of their own
    assert re.search(r"--seed N\s+an integer >= 0 \(default: 0\)", text)
    assert "convnextv2_base" in text.split("--config RECIPE")[1]  # the recipes by name


def test_help_shows_the_stage_defaults():
    """set_defaults of each stage (pretraining 800 epochs, fine-tuning 600) is what --help says."""
    assert re.search(r"--epochs N\s+an integer >= 1 \(default: 800\)", pretrain_parser().format_help())
    assert re.search(r"--epochs N\s+an integer >= 1 \(default: 600\)", finetune_parser().format_help())


def test_tool_parsers_share_the_help():
    from fcmae.tools import convert, data_stats, knn_eval, make_shards, visualize

    for module in (convert, data_stats, knn_eval, make_shards, visualize):
        text = module.build_parser().format_help()
        first = text.splitlines()[0]
        assert first.startswith("usage: ") and first.endswith("[options]") and len(first) < 110, first
        assert "--version" in text, module.__name__
        assert not UNDERSCORE_OPTION.search(text), (module.__name__, UNDERSCORE_OPTION.search(text).group())
    assert "usage: fcmae-convert INPUT OUTPUT --to {ours,timm,hf,reference} [options]" in convert.build_parser().format_help()


ALIASES = [  # (stage, timm's spelling, ours, value)
    ("pretrain", ["--data-dir", "/data"], ["--data-path", "/data"], "data_path"),
    ("pretrain", ["--grad-accum-steps", "4"], ["--accum-iter", "4"], "accum_iter"),
    ("pretrain", ["-b", "8"], ["--batch-size", "8"], "batch_size"),
    ("pretrain", ["-j", "3"], ["--num-workers", "3"], "num_workers"),
    ("pretrain", ["--workers", "3"], ["--num-workers", "3"], "num_workers"),
    ("pretrain", ["--output", "runs/x"], ["--output-dir", "runs/x"], "output_dir"),
    ("pretrain", ["--batch_size", "8"], ["--batch-size", "8"], "batch_size"),  # the reference's, not listed
    ("finetune", ["--num-classes", "5"], ["--nb-classes", "5"], "nb_classes"),
    ("finetune", ["--data-dir", "/data"], ["--data-path", "/data"], "data_path"),
    ("finetune", ["-b", "8"], ["--batch-size", "8"], "batch_size"),
    ("finetune", ["--grad-accum-steps", "2"], ["--accum-iter", "2"], "accum_iter"),
    ("finetune", ["-j", "0"], ["--num-workers", "0"], "num_workers"),
    ("finetune", ["--output", "runs/y"], ["--output-dir", "runs/y"], "output_dir"),
]


@pytest.mark.parametrize("stage,alias,ours,dest", ALIASES, ids=[" ".join(a[1]) for a in ALIASES])
def test_alias_parses_to_the_same_option(stage, alias, ours, dest):
    parser = {"pretrain": pretrain_parser, "finetune": finetune_parser}[stage]
    by_alias, by_ours = (parse_with_config(parser(), argv) for argv in (alias, ours))
    assert getattr(by_alias, dest) == getattr(by_ours, dest) != getattr(parse_with_config(parser(), []), dest)
    assert by_alias.typed == by_ours.typed == {dest}


def test_recipe_by_name_per_stage():
    pre = parse_with_config(pretrain_parser(), ["-c", "convnextv2_base"])
    assert (pre.model, pre.epochs, pre.batch_size) == ("convnextv2_base", 1600, 64)
    fine = finetune_args(["-c", "convnextv2_base", "--batch-size", "16"])
    assert (fine.model, fine.layer_decay, fine.layer_decay_type, fine.batch_size) == ("convnextv2_base", 0.6,
                                                                                      "group", 16)
    assert fine.typed == {"config", "batch_size"}  # the recipe's values are not typed
    as_file = parse_with_config(pretrain_parser(), ["-c", os.path.join(ROOT, "configs", "pretrain", "convnextv2_base.yaml")])
    assert vars(as_file) == vars(pre) | {"config": as_file.config}
    assert recipe_dirs("pretrain")[0] == os.path.join(ROOT, "configs", "pretrain")  # the checkout's


def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(UsageError) as e:
        parse_with_config(pretrain_parser(), ["-c", "convnextv2_giant"])
    message = str(e.value)
    assert "convnextv2_giant" in message and "convnextv2_atto" in message and "fashion_mnist_demo" in message
    assert "\n" not in message
    with pytest.raises(UsageError, match="no such file"):
        parse_with_config(pretrain_parser(), ["-c", "configs/pretrain/missing.yaml"])


def test_recipes_are_found_in_the_installed_package_data(tmp_path, monkeypatch):
    """A wheel ships the recipes as fcmae/configs/<stage>/*.yaml: the second place find_config looks."""
    installed = tmp_path / "fcmae" / "configs" / "pretrain"
    installed.mkdir(parents=True)
    (installed / "mine.yaml").write_text("epochs: 3\n")
    import fcmae.runtime.options as options

    monkeypatch.setattr(options, "recipe_dirs", lambda stage: [str(tmp_path / "none" / stage), str(installed)])
    assert find_config("mine", "pretrain") == str(installed / "mine.yaml")
    assert parse_with_config(pretrain_parser(), ["-c", "mine"]).epochs == 3


def test_help_with_a_recipe_shows_its_defaults(capsys):
    from fcmae.runtime.options import answer_help

    with pytest.raises(SystemExit) as e:
        answer_help(pretrain_parser, ["-c", "convnextv2_base", "--help"])
    assert e.value.code == 0
    assert re.search(r"--epochs N\s+an integer >= 1 \(default: 1600\)", capsys.readouterr().out)
    assert answer_help(pretrain_parser, ["--epochs", "3"]) is None  # no help asked: the real parse follows
