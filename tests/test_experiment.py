"""The Fashion-MNIST experiment end to end at its smoke budget: every stage runs through the project's CLIs and
the results table, JSON and pictures come out; a second run reuses what the first finished."""
import json

import pytest
from PIL import Image

from tools.experiment_fashion_mnist import BUDGETS, main


pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoke_budget_end_to_end(tmp_path):
    result = main(["--budget", "smoke", "--work-dir", str(tmp_path), "--num-workers", "0"])
    out = tmp_path / "results"
    assert [p["step"] for p in result["knn"]] == [0, 2, 4]  # random init, then every pretraining checkpoint
    assert all(0 <= p["acc1"] <= 100 for p in result["knn"])
    assert set(result["runs"]) == {"probe", "fcmae_0.01", "scratch_0.01"}
    assert all(r["steps"] == 3 for r in result["runs"].values())
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert set(timings) == {"pretraining"} | {r["dir"] for r in result["runs"].values()}
    assert result["minutes"]["total"] == pytest.approx(sum(result["minutes"][k] for k in result["minutes"] if k != "total"))
    md = (out / "results.md").read_text()
    assert "| 1% (600 images) |" in md and "linear probe" in md and "| kNN top-1 |" in md
    assert json.loads((out / "results.json").read_text())["settings"] == {
        **BUDGETS["smoke"].__dict__, "finetune": {"0.01": [1, 64]}}
    for png in ("curves.png", "reconstructions.png"):
        assert Image.open(out / png).size[0] > 100
    # a second run finds every stage done: the same numbers, nothing retrained
    again = main(["--budget", "smoke", "--work-dir", str(tmp_path), "--num-workers", "0"])
    assert again["knn"] == result["knn"] and again["runs"] == result["runs"]
