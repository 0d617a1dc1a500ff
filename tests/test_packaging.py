"""The wheel pyproject.toml builds: the three packages with every subpackage, the YAML recipes inside fcmae/configs/,
no tools/ or tests/ (they run from the checkout), and a console script for every command users run."""
import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fcmae", "finetune", "models")
CONSOLE_SCRIPTS = {
    "fcmae-pretrain": "fcmae.pretrain.__main__:main",
    "fcmae-finetune": "finetune.__main__:main",
    "fcmae-convert": "fcmae.tools.convert:main",
    "fcmae-make-shards": "fcmae.tools.make_shards:main",
    "fcmae-data-stats": "fcmae.tools.data_stats:main",
    "fcmae-visualize": "fcmae.tools.visualize:main",
    "fcmae-knn": "fcmae.tools.knn_eval:main",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Built in-process by setuptools from a copy of the sources (a build writes build/ and *.egg-info next to them),
    tools/ and tests/ included so that leaving them out is what is tested."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in PACKAGES + ("configs", "tools", "tests"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(out)], cwd=src, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with zipfile.ZipFile(out / done.stdout.strip().splitlines()[-1]) as whl:
        return {name: whl.read(name) for name in whl.namelist()}


def dist_info(wheel, name):
    return next(data for path, data in wheel.items() if path.endswith(".dist-info/" + name)).decode()


def test_only_the_three_packages_are_installed(wheel):
    top = {path.split("/")[0] for path in wheel if not path.split("/")[0].endswith(".dist-info")}
    assert top == set(PACKAGES)


def test_every_subpackage_is_in_the_wheel(wheel):
    inits = {p.relative_to(ROOT).as_posix() for name in PACKAGES for p in (ROOT / name).rglob("__init__.py")}
    assert inits - set(wheel) == set()


def test_the_recipes_ship_inside_fcmae(wheel):
    recipes = {f"fcmae/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert {"fcmae/configs/pretrain/convnextv2_base.yaml", "fcmae/configs/finetune/convnextv2_base.yaml"} <= recipes
    assert recipes - set(wheel) == set()
    assert wheel["fcmae/configs/pretrain/convnextv2_base.yaml"] == (ROOT / "configs/pretrain/convnextv2_base.yaml").read_bytes()


def test_a_console_script_for_every_user_command(wheel):
    lines = dist_info(wheel, "entry_points.txt").split("[console_scripts]")[1].split("[")[0].strip().splitlines()
    scripts = dict(line.replace(" ", "").split("=") for line in lines)
    assert scripts == CONSOLE_SCRIPTS
    for target in scripts.values():
        module, function = target.split(":")
        tree = ast.parse(wheel[module.replace(".", "/") + ".py"])
        assert function in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, target


def test_torch_is_a_range_that_admits_the_tested_versions(wheel):
    requires = [line.split(": ", 1)[1] for line in dist_info(wheel, "METADATA").splitlines()
                if line.startswith("Requires-Dist: ") and "extra ==" not in line]
    from packaging.requirements import Requirement
    by_name = {Requirement(r).name: Requirement(r).specifier for r in requires}
    for name, tested in (("torch", ["2.11.0", "2.14.1"]), ("torchvision", ["0.26.0", "0.29.1"])):
        assert all(by_name[name].contains(v) for v in tested), (name, by_name[name])
        assert not by_name[name].contains("99"), f"{name} has no upper bound"
